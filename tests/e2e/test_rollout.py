"""Rollouts on the local fleet (issue 19): a deploy makes a new launch template version and sets
it on the group (`LocalFleet.release`); the scaler's rollout (chalicelib/scaler/rollout.py)
replaces every host while a steady workload runs, each replaced host draining through the
terminating lifecycle hook (the fleet plays it), and rolls a version back whose hosts' daemons
exit at start.

Judged from ground truth: the emulator's record (every job completed by its runner, success),
Docker's events (no runner that had a job was killed) and the groups as the Auto Scaling API
shows them (which version each instance was launched with; the group's version)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from devstack import judge
from devstack.docker_events import ContainerTimeline
from devstack.fleet import LOCAL_AMI, LocalFleet
from devstack.stack import LocalStack
from tests.conftest import FIXTURES

POOLS = FIXTURES / "pools" / "fleet.toml"
SLOTS = 2
NEW_AMI = "ami-0e5e1ec0e5e1e0002"
BROKEN_AMI = "ami-0e5e1ec0e5e1ebad1"
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.rollout]

ROLLOUT_ENV = {
    "RUNNERHUB_ROLLOUT_MIN_HEALTHY_PERCENT": "50",  # 2 hosts: one replaced at a time
    "RUNNERHUB_ROLLOUT_CHECKPOINTS": "50",
    "RUNNERHUB_ROLLOUT_CHECKPOINT_DELAY_S": "3",
    "RUNNERHUB_ROLLOUT_HEALTH_GRACE_S": "12",
}


def steady(jobs: int, every_s: float, duration_s: float, name: str) -> dict:
    return {"name": name, "jobs": [
        {"repository": f"runnerhub-e2e/svc-{i % 3}", "labels": ["self-hosted", "alpha"],
         "arrival_s": round(0.5 + i * every_s, 2), "duration_s": duration_s,
         "name": f"{name}-{i}"}
        for i in range(jobs)]}


@pytest.fixture
def fleet(docker_client, tmp_path: Path):
    stack = LocalStack(POOLS, tmp_path, lost_runner_timeout_s=60).start()
    local = LocalFleet(
        stack, boot_delay_s=1.0, slots=SLOTS, min_hosts={"alpha": 2}, lifecycle_hook=True,
        amis={LOCAL_AMI: {}, NEW_AMI: {},
              # A broken build: its daemon stops at start (its pools file is missing).
              BROKEN_AMI: {"RUNNERHUB_POOLS_FILE": str(tmp_path / "missing.toml")}},
        executor_env={"RUNNERHUB_IDLE_TIMEOUT_S": "60", "RUNNERHUB_LIFECYCLE_POLL_S": "0.5",
                      "RUNNERHUB_HEARTBEAT_S": "2"}).start()
    yield local
    local.stop()
    stack.stop()


def serving(fleet: LocalFleet, count: int) -> bool:
    return sum(1 for i in fleet.live("alpha") if i.daemon and i.daemon.alive()) >= count


def run_workload(fleet: LocalFleet, workload: dict):
    stack = fleet.stack
    rules = judge.read_pools(POOLS)
    plan = judge.plan_workload(workload, stack.emulator.load_workload(workload), rules)
    stack.emulator.run_workload()
    return plan, rules


def settle(fleet: LocalFleet, plan, timeout_s: float) -> dict:
    stack = fleet.stack

    def unsettled() -> list[int]:
        truth = {job["job_id"]: job for job in stack.emulator.jobs()}
        return judge.settled(plan, truth, stack.records())

    assert stack.wait_for(lambda: not unsettled(), timeout_s, 1.0), \
        f"unsettled: {unsettled()}; fleet errors {fleet.errors}"
    return {job["job_id"]: job for job in stack.emulator.jobs()}


def assert_no_job_lost_or_killed(plan, truth, fleet, rules, events) -> None:
    verdict = judge.judge(plan, truth, fleet.stack.records(), rules, events)
    assert verdict.ok, verdict.counts()
    assert judge.busy_killed(events, truth) == {}
    assert all((j["status"], j["completed_by"], j["conclusion"]) ==
               ("completed", "runner", "success") for j in truth.values()), truth


def test_a_rolling_replacement_of_every_host_under_a_steady_workload_loses_no_job(
        fleet, docker_client):
    scaler = fleet.start_scaler(every_s=2.0, idle_s=600, **ROLLOUT_ENV)
    assert fleet.stack.wait_for(lambda: serving(fleet, 2), 60, 0.2)
    original = {i.instance_id: i for i in fleet.live("alpha")}
    timeline = ContainerTimeline(docker_client)
    plan, rules = run_workload(fleet, steady(jobs=14, every_s=1.5, duration_s=5.0,
                                             name="steady"))
    time.sleep(3)  # jobs are running on the old hosts
    version = fleet.release("alpha", NEW_AMI)

    def rolled() -> bool:
        versions = fleet.versions("alpha")
        return (not original.keys() & versions.keys() and versions
                and set(versions.values()) == {version} and serving(fleet, 2))

    assert fleet.stack.wait_for(rolled, 180, 1.0), \
        f"versions {fleet.versions('alpha')}\n{scaler.log()[-4000:]}"
    truth = settle(fleet, plan, 120)
    events = timeline.close()
    assert_no_job_lost_or_killed(plan, truth, fleet, rules, events)
    # Every old host drained through the hook: its daemon exited cleanly, after its jobs.
    for instance in original.values():
        assert fleet.stack.wait_for(lambda i=instance: not i.daemon.alive(), 60, 0.2)
        assert instance.daemon.process.returncode == 0, instance.daemon.log()[-3000:]
    assert fleet.group_version("alpha") == version
    assert fleet.errors == []
    assert scaler.alive(), scaler.log()[-3000:]
    assert "rollout completed" in scaler.log()


def test_a_version_whose_daemons_exit_at_start_is_rolled_back_and_the_workload_completes(
        fleet, docker_client):
    scaler = fleet.start_scaler(every_s=2.0, idle_s=600, **ROLLOUT_ENV)
    assert fleet.stack.wait_for(lambda: serving(fleet, 2), 60, 0.2)
    good = fleet.group_version("alpha")
    timeline = ContainerTimeline(docker_client)
    plan, rules = run_workload(fleet, steady(jobs=10, every_s=2.0, duration_s=4.0,
                                             name="during-bad-deploy"))
    bad = fleet.release("alpha", BROKEN_AMI)

    def broken_launched() -> list:
        return [i for i in fleet.instances.values() if fleet.ami_of.get(i.instance_id) ==
                BROKEN_AMI]

    # Rolled back: the group launches the good version again, and every instance in the group
    # was launched with it.
    def back() -> bool:
        versions = fleet.versions("alpha")
        return (fleet.group_version("alpha") == good and versions
                and set(versions.values()) == {good} and serving(fleet, 2))

    assert fleet.stack.wait_for(lambda: fleet.group_version("alpha") == good, 120, 1.0), \
        scaler.log()[-4000:]
    assert fleet.stack.wait_for(back, 120, 1.0), \
        f"versions {fleet.versions('alpha')}\n{scaler.log()[-4000:]}"
    launched_bad = broken_launched()
    assert launched_bad, "the broken version never launched a host"
    # Each broken host's daemon stopped at start and never served (ground truth: its process).
    for instance in launched_bad:
        assert instance.daemon is not None and not instance.daemon.alive()
        assert instance.daemon.process.returncode not in (0, None)
        assert instance.ended_at is not None  # terminated by the rollback
    truth = settle(fleet, plan, 150)
    events = timeline.close()
    assert_no_job_lost_or_killed(plan, truth, fleet, rules, events)
    assert "rollout rolled back" in scaler.log() and f"version {bad} failed" in scaler.log()
    assert scaler.alive(), scaler.log()[-3000:]
    # What an operator sees (the management API): the group back on the good version, every
    # host on it, the rollback's reason naming the failed host.
    shown = requests.get(f"{fleet.stack.api_url}/api/v1/pools/alpha", timeout=15, headers={
        "Authorization": f"Bearer {fleet.stack.token('viewer')}"}).json()["rollout"]
    assert shown["group_version"] == good and set(shown["hosts_by_version"]) == {good}
    assert shown["status"] in ("rolling_back", "done") and shown["previous"] == bad
    assert shown["failed_hosts"] and set(shown["failed_hosts"]) <= {
        i.instance_id for i in launched_bad}
