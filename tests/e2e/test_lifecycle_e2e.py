"""The instance's end seen by a real daemon (`python -m executor`), end to end: real Docker, moto
server, the webhook app over HTTP, the GitHub emulator, and the IMDS stand-in (devstack/imds.py)
the daemon reads through RUNNERHUB_IMDS_ENDPOINT (its host id comes from there too). No
lifecycle hook is configured (moto has no CompleteLifecycleAction): the daemon's exit is what the
local fleet waits on.

- target lifecycle state `Terminated` while a job runs: the job completes through its runner's
  own report (the emulator's record), the daemon exits 0 afterwards, and Docker's events show no
  runner container stopped while busy;
- a Spot notice while a job runs, on a pool that opts in to re-runs: the runner is stopped at
  once, the job is recorded lost to the interruption, re-run exactly once as a new attempt, and
  the re-run completes on another executor.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from devstack.docker_events import ContainerTimeline
from devstack.imds import ImdsStandIn
from devstack.judge import busy_killed
from devstack.stack import Child, LocalStack
from tests.conftest import FIXTURES

pytestmark = [pytest.mark.docker, pytest.mark.slow]

FAST = {
    "RUNNERHUB_HEARTBEAT_S": "1",
    "RUNNERHUB_LEASE_S": "5",
    "RUNNERHUB_TICK_S": "0.25",
    "RUNNERHUB_POLL_WAIT_S": "1",
    "RUNNERHUB_VISIBILITY_S": "10",
    "RUNNERHUB_DRAIN_TIMEOUT_S": "60",
    "RUNNERHUB_LIFECYCLE_POLL_S": "0.5",
    "RUNNERHUB_SLOTS": "2",
}
JOB_S = 8.0


def instance_id() -> str:
    return "i-" + secrets.token_hex(9)[:17]


@pytest.fixture
def stack(docker_client, tmp_path: Path):
    # The e2e pools, with `alpha` opted in to re-runs after a Spot interruption.
    pools = (FIXTURES / "pools" / "e2e.toml").read_text().replace(
        'name = "alpha"\n', 'name = "alpha"\nrerun_on_spot_interruption = true\n', 1)
    pools_file = tmp_path / "pools.toml"
    pools_file.write_text(pools)
    started = LocalStack(pools_file, tmp_path / "stack", lost_runner_timeout_s=30).start()
    hosts: list[str] = []
    yield started, hosts
    started.stop()
    for host in hosts:  # whatever a failed test left
        for container in docker_client.api.containers(
                all=True, filters={"label": f"runnerhub.host={host}"}):
            docker_client.api.remove_container(container["Id"], force=True)
        shutil.rmtree(f"/dev/shm/runnerhub-{host}", ignore_errors=True)


def start_on_instance(stack: LocalStack, hosts: list[str], imds: ImdsStandIn | None,
                      instance: str = "", **env: str) -> Child:
    """A daemon as the fleet starts one: its host id from the instance's IMDS (none: a plain
    executor with a host id of its own)."""
    host = instance or f"plain-{secrets.token_hex(3)}"
    hosts.append(host)
    overrides = FAST | env
    if imds is not None:
        overrides |= {"RUNNERHUB_IMDS_ENDPOINT": imds.endpoint, "RUNNERHUB_HOST_ID": ""}
    child = stack._spawn(f"executor-{host}", [sys.executable, "-m", "executor"],
                         env=stack.executor_env(host, **overrides))
    child.host_id = host  # type: ignore[attr-defined]
    return child


def job_running(stack: LocalStack, job_id: int, timeout_s: float = 45.0) -> dict:
    assert stack.wait_for(lambda: stack.emulator.job(job_id)["status"] == "in_progress",
                          timeout_s, 0.1), stack.emulator.job(job_id)
    return stack.emulator.job(job_id)


def exit_code(child: Child, timeout_s: float) -> int | None:
    try:
        return child.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None


def test_terminated_target_state_waits_for_the_running_job_then_exits_0(stack, docker_client):
    local, hosts = stack
    instance = instance_id()
    with ImdsStandIn(instance) as imds:
        daemon = start_on_instance(local, hosts, imds, instance)
        timeline = ContainerTimeline(docker_client, [instance])
        job_id = local.emulator.add_job(repository="runnerhub-e2e/svc", duration_s=JOB_S,
                                        labels=["self-hosted", "alpha"])
        taken = job_running(local, job_id)
        assert taken["runner_name"]
        imds.set_target_lifecycle_state("Terminated")  # e.g. an instance refresh
        set_at = time.time()
        code = exit_code(daemon, 60)
        exited_at = time.time()
        events = timeline.close()
    truth = local.emulator.job(job_id)
    print(f"job taken {taken['taken_at'] - set_at:+.1f}s, completed "
          f"{truth['completed_at'] - set_at:+.1f}s, daemon exit {exited_at - set_at:+.1f}s "
          f"after Terminated; {len(events)} container events")
    assert code == 0, daemon.log()[-3000:]
    # Ground truth: the job ended by its runner's own report, before the daemon left.
    assert (truth["status"], truth["conclusion"], truth["completed_by"]) == (
        "completed", "success", "runner")
    assert truth["completed_at"] <= exited_at
    assert truth["completed_at"] - set_at >= 1.0  # the drain waited for it
    assert busy_killed(events, {job_id: truth}) == {}
    assert [e.action for e in events if e.runner == taken["runner_name"]].count("start") == 1
    log = daemon.log()
    assert "target lifecycle state is Terminated" in log
    assert f'"host_id":"{instance}"' in log  # the host id came from IMDS
    assert ("GET", "/latest/meta-data/autoscaling/target-lifecycle-state", 200) in imds.requests


def test_spot_notice_stops_the_job_records_it_and_reruns_it_once(stack, docker_client):
    local, hosts = stack
    instance = instance_id()
    with ImdsStandIn(instance) as imds:
        spot = start_on_instance(local, hosts, imds, instance)
        job_id = local.emulator.add_job(repository="runnerhub-e2e/svc", duration_s=20.0,
                                        labels=["self-hosted", "alpha"])
        taken = job_running(local, job_id)
        # Another executor, for the re-run (the Spot host takes nothing more).
        other = start_on_instance(local, hosts, None)
        noticed_at = time.time()
        imds.set_spot_instance_action(
            "terminate", datetime.fromtimestamp(noticed_at + 5, UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ"))
        code = exit_code(spot, 60)
        exited_at = time.time()
    assert code == 0, spot.log()[-3000:]
    truth = local.emulator.job(job_id)
    queued = [j["queued_at"] for j in local.emulator.jobs() if j.get("rerun_of") == job_id]
    print(f"after the notice: job ended {truth['completed_at'] - noticed_at:.1f}s, re-run "
          f"queued {[round(q - noticed_at, 1) for q in queued]}s, daemon exit "
          f"{exited_at - noticed_at:.1f}s")
    # The runner was stopped: it reported its shutdown, so GitHub ended the job at once.
    assert (truth["status"], truth["conclusion"], truth["completed_by"]) == (
        "completed", "cancelled", "runner")
    reruns = [j for j in local.emulator.jobs() if j.get("rerun_of") == job_id]
    assert len(reruns) == 1, reruns
    (rerun,) = reruns
    assert rerun["run_attempt"] == 2 and rerun["run_id"] == truth["run_id"]
    assert local.wait_for(lambda: local.emulator.job(rerun["job_id"])["status"] == "completed",
                          60, 0.25)
    done = local.emulator.job(rerun["job_id"])
    assert (done["conclusion"], done["completed_by"]) == ("success", "runner")
    assert local.runner_records()[done["runner_name"]]["host_id"] == other.host_id
    record = local.records()[job_id]
    assert record["lost_to"] == "spot_interruption" and record["lost_runner"] == \
        taken["runner_name"]
    assert record["spot_rerun"] == "requested" and record["spot_rerun_at"]
    assert "Spot interruption notice" in spot.log()
