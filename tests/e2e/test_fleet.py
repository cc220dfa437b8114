"""End to end on the local fleet: the scaler drives moto's Auto Scaling groups, whose instances
boot real executor daemons running real runner containers. Judged from ground truth: the
emulator's record (every job done by its own runner), Docker's events (no busy runner killed)
and the groups as the Auto Scaling API shows them (the fleet's poller)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from devstack import judge
from devstack.docker_events import ContainerTimeline
from devstack.fleet import LocalFleet
from devstack.stack import LocalStack
from tests.conftest import FIXTURES

POOLS = FIXTURES / "pools" / "fleet.toml"
SLOTS = 2
BOOT_DELAY_S = 2.5
IDLE_S = 6.0
pytestmark = [pytest.mark.docker, pytest.mark.slow]


def burst(jobs: int, duration_s: float, start_s: float = 0.5, name: str = "burst") -> dict:
    return {"name": name, "jobs": [
        {"repository": f"runnerhub-e2e/svc-{i % 3}", "labels": ["self-hosted", "alpha"],
         "arrival_s": round(start_s + i * 0.1, 2), "duration_s": duration_s,
         "name": f"{name}-{i}"}
        for i in range(jobs)]}


def stopped_with_a_job(events, truth) -> list:
    """Runner containers stopped by someone (Docker's `kill`) whose runner GitHub ever handed a
    job to (the emulator's record)."""
    had_jobs = {job["runner_name"] for job in truth.values() if job.get("runner_name")}
    return [e for e in events if e.action == "kill" and e.runner in had_jobs]


@pytest.fixture
def fleet(docker_client, tmp_path: Path):
    stack = LocalStack(POOLS, tmp_path, lost_runner_timeout_s=60).start()
    local = LocalFleet(stack, boot_delay_s=BOOT_DELAY_S, slots=SLOTS,
                       executor_env={"RUNNERHUB_IDLE_TIMEOUT_S": "30"}).start()
    yield local
    local.stop()
    stack.stop()


def run(fleet: LocalFleet, workload: dict, timeout_s: float) -> tuple[list, dict]:
    stack = fleet.stack
    rules = judge.read_pools(POOLS)
    plan = judge.plan_workload(workload, stack.emulator.load_workload(workload), rules)
    stack.emulator.run_workload()

    def unsettled() -> list[int]:
        truth = {job["job_id"]: job for job in stack.emulator.jobs()}
        return judge.settled(plan, truth, stack.records())

    assert stack.wait_for(lambda: not unsettled(), timeout_s, 1.0), \
        f"unsettled: {unsettled()}; fleet errors {fleet.errors}"
    return plan, {job["job_id"]: job for job in stack.emulator.jobs()}


def test_a_burst_scales_out_and_the_fleet_returns_to_its_minimum_without_killing_a_runner(
        fleet, docker_client):
    timeline = ContainerTimeline(docker_client)
    scaler = fleet.start_scaler(every_s=5.0, idle_s=IDLE_S)
    workload = burst(jobs=5, duration_s=6.0)
    needed = math.ceil(5 / SLOTS)  # 3 hosts; the pool allows 4
    started = time.time()
    plan, truth = run(fleet, workload, timeout_s=120)
    # Back to the minimum (0) once the hosts have been idle for IDLE_S.
    assert fleet.stack.wait_for(lambda: not fleet.live("alpha"), 60, 0.5), \
        f"still in service: {[i.instance_id for i in fleet.live('alpha')]}\n{scaler.log()[-3000:]}"
    events = timeline.close()

    verdict = judge.judge(plan, truth, fleet.stack.records(), judge.read_pools(POOLS), events)
    assert verdict.ok, verdict.counts()
    assert judge.busy_killed(events, truth) == {}
    # The scaler terminated only idle hosts: no running job's container was on a host when its
    # instance left the group (the daemon's drain would have saved the job and hidden it).
    assert len(fleet.terminated()) == needed
    assert judge.busy_at_termination(events, truth, fleet.terminated()) == {}
    # Every runner container that ran a job ended by its own exit; the only ones ever stopped
    # (`kill`) are surplus runners that never got a job (their job went to another runner
    # first; the retirement or the idle reaper removes them).
    assert stopped_with_a_job(events, truth) == []
    # The group was raised to the hosts the burst needed, no more (ground truth: the poller).
    peak = max(s.desired for s in fleet.samples if s.pool == "alpha" and s.at >= started)
    assert peak == needed, f"desired peaked at {peak}, burst needed {needed}"
    assert fleet.errors == []
    assert scaler.alive(), scaler.log()[-3000:]


def test_an_instance_refresh_of_a_busy_host_waits_for_its_job(docker_client, tmp_path):
    stack = LocalStack(POOLS, tmp_path, lost_runner_timeout_s=60).start()
    fleet = LocalFleet(stack, boot_delay_s=0.5, slots=SLOTS, min_hosts={"alpha": 1}).start()
    timeline = ContainerTimeline(docker_client)
    try:
        assert stack.wait_for(lambda: any(i.daemon for i in fleet.live("alpha")), 30)
        old = fleet.live("alpha")[0]
        workload = burst(jobs=1, duration_s=10.0, name="long")
        rules = judge.read_pools(POOLS)
        plan = judge.plan_workload(workload, stack.emulator.load_workload(workload), rules)
        stack.emulator.run_workload()
        assert stack.wait_for(lambda: stack.emulator.jobs()[0].get("taken_at"), 60, 0.2)

        replaced = fleet.refresh("alpha", timeout_s=120)

        job = stack.emulator.jobs()[0]
        assert replaced == [old.instance_id]
        # The host drained: its job finished by its runner's own report before the daemon
        # exited (cleanly), and only then was the instance terminated.
        assert (job["status"], job["completed_by"], job["conclusion"]) == (
            "completed", "runner", "success")
        assert old.daemon.process.returncode == 0, old.daemon.log()[-3000:]
        assert stack.wait_for(lambda: old.ended_at is not None, 10, 0.1)  # the poller saw it go
        assert job["completed_at"] <= old.ended_at
        # A replacement launched (desired capacity unchanged) and serves.
        assert stack.wait_for(lambda: any(i.daemon and i.daemon.alive()
                                          for i in fleet.live("alpha")), 30)
        assert fleet.live("alpha")[0].instance_id != old.instance_id
        events = timeline.close()
        truth = {j["job_id"]: j for j in stack.emulator.jobs()}
        assert judge.busy_killed(events, truth) == {}
        assert judge.busy_at_termination(events, truth, fleet.terminated()) == {}
        assert stopped_with_a_job(events, truth) == []
        assert judge.judge(plan, truth, stack.records(), rules, events).ok
    finally:
        fleet.stop()
        stack.stop()
