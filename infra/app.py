"""CDK entry (`cdk synth|deploy` in infra/, see cdk.json): runnerhub-images and every stage's
runnerhub-<stage>, or only the stages in `-c stages=dev,prod`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before aws_cdk starts Node: see runnerhub_infra/__init__.py.
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

INFRA = Path(__file__).resolve().parent
# chalicelib (resources, pools) lives at the repo root; runnerhub_infra next to this file.
sys.path[:0] = [str(INFRA.parent), str(INFRA)]

import aws_cdk as cdk  # noqa: E402
from runnerhub_infra.pool_checks import PoolsRefused  # noqa: E402
from runnerhub_infra.stages import DEFAULT_STAGES  # noqa: E402
from runnerhub_infra.synth import build_app, use_wheelhouse, workdir_for  # noqa: E402

use_wheelhouse()
app = cdk.App()
stages = app.node.try_get_context("stages") or ",".join(DEFAULT_STAGES)
try:
    build_app(app, stages.split(","), workdir_for(Path(app.outdir).resolve()))
except PoolsRefused as exc:
    print(f"runnerhub synth: {exc}", file=sys.stderr)
    sys.exit(2)
app.synth()
