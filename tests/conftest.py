"""Shared fixtures: fake AWS credentials, fixture payloads, pools, and the CI rule for skips.

A test that needs Docker, the emulators or a Vault server may skip on a laptop that lacks them,
but never when CI=true: there `require()` fails the test instead.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
EXAMPLES = FIXTURES / "octokit-webhooks" / "examples"
TEST_POOLS = FIXTURES / "pools" / "fixtures.toml"
IN_CI = os.environ.get("CI", "").lower() == "true"


def shared_dir() -> Path:
    """`../shared` beside the checkout (CI lays a copy there too)."""
    return Path(os.environ.get("RUNNERHUB_SHARED_DIR", ROOT.parent / "shared"))


def require(available: bool, what: str) -> None:
    """Skip when a component is missing on a developer machine; fail in CI."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is required when CI=true")
    pytest.skip(f"{what} not available")


def wait_for(condition, timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll `condition` until it holds (True) or `timeout` passes (False): a bounded wait,
    never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def example(name: str) -> dict:
    return json.loads((EXAMPLES / f"{name}.payload.json").read_text())


def example_names() -> list[str]:
    return sorted(path.name.removesuffix(".payload.json") for path in EXAMPLES.glob("*.json"))


@pytest.fixture(autouse=True, scope="session")
def _aws_credentials():
    """Never reach a real AWS account from tests."""
    saved = {key: os.environ.get(key) for key in _AWS_ENV}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_SESSION_TOKEN="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    os.environ.pop("AWS_PROFILE", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# What the deployables really did during the session, for the checks that run after the tiers
# that exercise them (pytest runs tests/ alphabetically: e2e, functional, then infra): every
# AWS call (chalicelib/aws.py; tests/infra/test_iam_calls.py) and every EMF blob
# (chalicelib/telemetry.py; tests/infra/test_monitoring.py). Set in the environment, so the
# webhook, executor and reconciler processes the tests start write them too.
RECORDINGS = {"RUNNERHUB_AWS_CALL_LOG": "aws-calls.jsonl", "RUNNERHUB_EMF_LOG": "emf.jsonl"}


@pytest.fixture(autouse=True, scope="session")
def _recordings(tmp_path_factory):
    directory = tmp_path_factory.mktemp("recordings")
    saved = {key: os.environ.get(key) for key in RECORDINGS}
    for key, name in RECORDINGS.items():
        # Kept when already set: a run can leave its recordings where it wants them.
        os.environ.setdefault(key, str(directory / name))
    yield {key: Path(os.environ[key]) for key in RECORDINGS}
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)


def recording(key: str) -> list[dict]:
    """The lines recorded so far under RECORDINGS[key] ([] when nothing was)."""
    path = Path(os.environ.get(key, ""))
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


_AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
            "AWS_DEFAULT_REGION", "AWS_PROFILE")


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:8]
