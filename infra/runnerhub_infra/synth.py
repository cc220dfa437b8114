"""Synthesize every stage to one cloud assembly, without an AWS account.

Shared by `infra/app.py` (the `cdk` CLI entry), `make synth` and tests/infra.

    python infra/synth.py [--outdir infra/cdk.out] [--stage dev --stage prod] [-c key=value]

Stacks: runnerhub-images (ECR repositories, executor AMI pipeline) and runnerhub-<stage> per
stage. A pools file a deployed stage must not run (pool_checks) fails the synth, exit 2.

The Chalice package pulls the app's requirements (Linux wheels) with pip. To synth offline, fill
a wheelhouse once (see docs/deploy.md) and point RUNNERHUB_WHEELHOUSE at it (default
`.cache/wheels` at the repo root, used when present): pip then reads only from it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aws_cdk as cdk
from aws_cdk import cx_api

from chalicelib.pools import load_pools
from runnerhub_infra.pool_checks import PoolsRefused, require_deployable
from runnerhub_infra.stack import RunnerHubImagesStack, RunnerHubStack
from runnerhub_infra.stages import (
    DEFAULT_STAGES,
    REPO_ROOT,
    overrides_from_context,
    stage_settings,
)

DEFAULT_OUTDIR = REPO_ROOT / "infra" / "cdk.out"
DEFAULT_WHEELHOUSE = REPO_ROOT / ".cache" / "wheels"


def use_wheelhouse() -> None:
    """Make Chalice's pip read only local wheels, when a wheelhouse exists."""
    wheelhouse = Path(os.environ.get("RUNNERHUB_WHEELHOUSE", DEFAULT_WHEELHOUSE))
    if wheelhouse.is_dir() and any(wheelhouse.glob("*.whl")):
        os.environ["PIP_NO_INDEX"] = "1"
        # pip takes a space-separated list; keep any links the machine already sets.
        links = os.environ.get("PIP_FIND_LINKS", "").split()
        if str(wheelhouse) not in links:
            os.environ["PIP_FIND_LINKS"] = " ".join([str(wheelhouse), *links])


def workdir_for(outdir: Path) -> Path:
    # Next to the assembly, not in it: the assembly gets its own copies of the assets.
    return outdir.with_name(outdir.name + ".work")


def build_app(app: cdk.App, stages: Iterable[str], workdir: Path) -> dict[str, cdk.Stack]:
    """The images stack (always, from every known stage's pools file, so that synthesizing one
    stage never drops another's repository) and the selected stages' stacks, by stack name."""
    overrides = overrides_from_context(app.node.try_get_context)
    stages = list(stages)
    every = [stage_settings(name, overrides) for name in DEFAULT_STAGES]
    # Refuse a pools file before building anything (the selected stages first: their message).
    for stage in sorted(every, key=lambda stage: stage.name not in stages):
        require_deployable(load_pools(stage.pools_file), stage)
    built: dict[str, cdk.Stack] = {}
    images = RunnerHubImagesStack(app, stages=every, workdir=workdir)
    built[images.stack_name] = images
    for name in stages:
        stack = RunnerHubStack(app, stage=stage_settings(name, overrides), workdir=workdir)
        built[stack.stack_name] = stack
    return built


def synthesize(
    outdir: Path = DEFAULT_OUTDIR,
    stages: Iterable[str] | None = None,
    context: dict[str, Any] | None = None,
) -> cx_api.CloudAssembly:
    outdir = Path(outdir).resolve()
    use_wheelhouse()
    app = cdk.App(outdir=str(outdir), context=context or {})
    build_app(app, list(stages or DEFAULT_STAGES), workdir_for(outdir))
    return app.synth()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", type=Path, default=DEFAULT_OUTDIR)
    parser.add_argument("--stage", action="append", choices=sorted(DEFAULT_STAGES))
    parser.add_argument(
        "-c",
        "--context",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="CDK context, as with `cdk synth -c` (e.g. region=eu-west-1)",
    )
    args = parser.parse_args(argv)
    context = dict(item.split("=", 1) for item in args.context)
    started = time.monotonic()
    try:
        assembly = synthesize(args.outdir, args.stage, context)
    except PoolsRefused as exc:
        print(f"runnerhub synth: {exc}", file=sys.stderr)
        return 2
    for stack in assembly.stacks:
        print(f"{stack.stack_name}: {Path(assembly.directory) / stack.template_file}")
    print(f"synthesized in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
