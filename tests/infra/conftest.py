"""Synthesize every stage once per test session (the Node.js CDK runtime takes seconds)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "infra") not in sys.path:
    sys.path.insert(0, str(ROOT / "infra"))

from runnerhub_infra.stages import DEFAULT_STAGES, stage_settings  # noqa: E402
from runnerhub_infra.synth import synthesize  # noqa: E402

from chalicelib.pools import load_pools  # noqa: E402


@dataclass(frozen=True)
class Synthesized:
    outdir: Path
    templates: dict[str, dict]  # stage name -> CloudFormation template
    seconds: float
    images: dict  # the runnerhub-images stack's template
    stack_ids: tuple[str, ...]  # what `cdk deploy <selector>` matches (hierarchical ids)


@pytest.fixture(scope="session")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> Synthesized:
    import time

    outdir = tmp_path_factory.mktemp("infra") / "cdk.out"
    started = time.monotonic()
    assembly = synthesize(outdir)
    seconds = time.monotonic() - started
    templates = {
        stack.stack_name.removeprefix("runnerhub-"): json.loads(
            (Path(assembly.directory) / stack.template_file).read_text()
        )
        for stack in assembly.stacks
    }
    images = templates.pop("images")
    assert set(templates) == set(DEFAULT_STAGES)
    return Synthesized(
        outdir=Path(assembly.directory),
        templates=templates,
        seconds=seconds,
        images=images,
        stack_ids=tuple(stack.hierarchical_id for stack in assembly.stacks),
    )


@pytest.fixture(params=sorted(DEFAULT_STAGES))
def stage(request: pytest.FixtureRequest):
    return stage_settings(request.param)


@pytest.fixture
def template(synthesized: Synthesized, stage) -> dict:
    return synthesized.templates[stage.name]


@pytest.fixture
def pools(stage):
    return load_pools(stage.pools_file)
