"""A runner image below GitHub's minimum version, end to end (issue 19): the emulator refuses the
old runners as GitHub does, the executor counts it (its /metrics) and re-demands the jobs, an
operator sets the pool's image override through the management API, and the jobs complete.

Judged from the emulator's record (which runner took each job, and the version that runner
reported when it opened its session), not from RunnerHub's tables. The old image is built here
FROM the local pool image with an older RUNNER_VERSION: no registry."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest
import requests

from devstack.stack import LocalStack
from emulator.standin_runner import STANDIN_VERSION
from tests.conftest import FIXTURES, recording

POOLS = FIXTURES / "pools" / "rollout-image.toml"
OLD_IMAGE = "runnerhub/runner-e2e-old:local"
CURRENT_IMAGE = "runnerhub/runner-linux-small:local"
OLD_VERSION, MIN_VERSION = "2.200.0", "2.300.0"
JOBS = 3
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.rollout]


@pytest.fixture
def old_image(docker_client):
    docker_client.images.get(CURRENT_IMAGE)  # built by the session's image step
    dockerfile = f"FROM {CURRENT_IMAGE}\nENV RUNNER_VERSION={OLD_VERSION}\n".encode()
    image, _ = docker_client.images.build(fileobj=io.BytesIO(dockerfile), tag=OLD_IMAGE,
                                          pull=False, rm=True,
                                          labels={"runnerhub.test": "image-refresh"})
    yield image
    docker_client.images.remove(OLD_IMAGE, force=True)


@pytest.fixture
def stack(docker_client, old_image, tmp_path: Path):
    local = LocalStack(POOLS, tmp_path, lost_runner_timeout_s=20).start()
    yield local
    local.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rejected(port: int) -> float:
    """runnerhub_runner_version_rejected_total{pool="rollout"} from the executor's /metrics."""
    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except requests.RequestException:
        return 0.0
    for line in text.splitlines():
        if line.startswith('runnerhub_runner_version_rejected_total{pool="rollout"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_old_runner_image_is_refused_counted_and_replaced_by_the_override(stack):
    emulator = stack.emulator
    emulator.set_faults({"runners": {"min_version": MIN_VERSION}})
    port = free_port()
    executor = stack.start_executor(
        RUNNERHUB_SLOTS="2", RUNNERHUB_METRICS_PORT=str(port), RUNNERHUB_IDLE_TIMEOUT_S="5",
        RUNNERHUB_START_BACKOFF_S="0.5", RUNNERHUB_MAX_START_BACKOFF_S="2")
    ids = emulator.load_workload({"name": "old-image", "jobs": [
        {"repository": "runnerhub-e2e/svc", "labels": ["self-hosted", "rollout"],
         "arrival_s": 0.0, "duration_s": 1.0, "name": f"old-{i}"} for i in range(JOBS)]})
    emulator.run_workload()

    # The old runners are refused (GitHub's record) and the executor counts it (its metric).
    def refused_runners():
        return [r for r in emulator.runner_records() if r["refused_at"]]

    assert stack.wait_for(lambda: rejected(port) >= 2 and len(refused_runners()) >= 2, 40,
                          0.5), executor.log()[-4000:]
    assert {r["version"] for r in refused_runners()} == {OLD_VERSION}
    assert all(emulator.job(i)["status"] == "queued" for i in ids)  # nothing ran on them
    assert emulator.faults_report()["injected"]["runner_version_refused"] >= 2

    # The alarm's own metric (RunnerVersionTooOld reads RunnerVersionRejected{component=
    # executor}, infra/runnerhub_infra/monitoring.py), as the executor's EMF wrote it.
    def alarm_metric() -> list[dict]:
        return [blob for blob in recording("RUNNERHUB_EMF_LOG")
                if "RunnerVersionRejected" in blob and blob.get("component") == "executor"]
    assert stack.wait_for(lambda: alarm_metric(), 30, 0.5), "no RunnerVersionRejected EMF"

    # The operator points the pool at the current image (audited like every override).
    answer = requests.put(f"{stack.api_url}/api/v1/pools/rollout/image", timeout=15,
                          headers={"Authorization": f"Bearer {stack.token('admin')}"},
                          json={"image": CURRENT_IMAGE})
    assert answer.status_code == 200, answer.text
    assert answer.json()["effective"]["image"] == CURRENT_IMAGE
    bad = requests.put(f"{stack.api_url}/api/v1/pools/rollout/image", timeout=15,
                       headers={"Authorization": f"Bearer {stack.token('admin')}"},
                       json={"image": "runnerhub/no-tag"})
    assert bad.status_code == 422 and "no tag or digest" in bad.text
    forbidden = requests.put(f"{stack.api_url}/api/v1/pools/rollout/image", timeout=15,
                             headers={"Authorization": f"Bearer {stack.token('operator')}"},
                             json={"image": CURRENT_IMAGE})
    assert forbidden.status_code == 403

    # Every job completes (the emulator says so), each taken by a runner that reported the
    # current version; no job was lost on the way.
    def done():
        return all(emulator.job(i)["status"] == "completed" for i in ids)

    assert stack.wait_for(done, 45, 0.5), [emulator.job(i) for i in ids]
    records = {r["name"]: r for r in emulator.runner_records()}
    for job_id in ids:
        job = emulator.job(job_id)
        assert job["conclusion"] == "success", job
        runner = records[job["runner_name"]]
        assert runner["job_id"] == job_id and runner["version"] == STANDIN_VERSION, runner
        assert runner["refused_at"] is None
    assert rejected(port) >= 2  # the metric kept its count
    assert stack.stop_child(executor, timeout_s=60) == 0
    assert "Traceback" not in executor.log()


def test_the_old_image_reports_its_version(docker_client, old_image):
    # The image the test built really carries the old version (what the stand-in reports).
    env = docker_client.images.get(OLD_IMAGE).attrs["Config"]["Env"]
    assert f"RUNNER_VERSION={OLD_VERSION}" in env
