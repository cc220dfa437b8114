"""End to end: Docker engine, moto server, the webhook app over HTTP, the GitHub emulator and
one executor process. Every routable job ends as the emulator (ground truth) says, each pool's
jobs ran only in its image (Docker's own event log), and nothing of RunnerHub's is left."""

from __future__ import annotations

from pathlib import Path

import pytest

from devstack.demo import outcomes, summary
from devstack.docker_events import ContainerTimeline, DockerEventLog
from devstack.judge import running_peaks
from devstack.stack import LocalStack
from tests.conftest import FIXTURES

POOLS = FIXTURES / "pools" / "e2e.toml"
SLOTS = 4
pytestmark = [pytest.mark.docker, pytest.mark.slow]


def workload() -> dict:
    jobs = []
    for i in range(33):
        pool = ("alpha", "beta", "gamma")[i % 3]
        repo = "runnerhub-e2e/ml" if pool == "gamma" else f"runnerhub-e2e/svc-{i % 4}"
        jobs.append({
            "repository": repo, "labels": ["self-hosted", pool],
            "arrival_s": round(i * 0.25, 2), "duration_s": 1.0 + (i % 3) * 0.5,
            "conclusion": "failure" if i % 11 == 5 else "success", "name": f"{pool}-{i}",
        })
    # not ours: GitHub-hosted labels, and a pool label from a repository outside its scope
    jobs.append({"repository": "runnerhub-e2e/svc-1", "labels": ["ubuntu-latest"],
                 "arrival_s": 1.0})
    jobs.append({"repository": "runnerhub-e2e/svc-1", "labels": ["self-hosted", "gamma"],
                 "arrival_s": 1.5})
    # cancelled while queued (arrives when every slot is busy) and while running
    jobs.append({"repository": "runnerhub-e2e/svc-2", "labels": ["self-hosted", "alpha"],
                 "arrival_s": 2.0, "cancel_at_s": 2.05, "name": "cancel-queued"})
    jobs.append({"repository": "runnerhub-e2e/svc-3", "labels": ["self-hosted", "beta"],
                 "arrival_s": 2.5, "duration_s": 60, "cancel_at_s": 6.0,
                 "name": "cancel-running"})
    return {"name": "e2e", "jobs": jobs}


@pytest.fixture
def stack(docker_client, tmp_path: Path):
    local = LocalStack(POOLS, tmp_path, lost_runner_timeout_s=20).start()
    yield local
    local.stop()


def test_workload_runs_in_real_containers_and_leaves_nothing(stack, docker_client):
    executor = stack.start_executor(RUNNERHUB_SLOTS=str(SLOTS), RUNNERHUB_IDLE_TIMEOUT_S="5")
    host = executor.host_id
    events = DockerEventLog(docker_client, "start", host)
    timeline = ContainerTimeline(docker_client, [host])  # every start and die, in order
    specs = workload()["jobs"]
    spec_of = dict(zip(stack.emulator.load_workload(workload()), specs, strict=True))
    stack.emulator.run_workload()

    def settled():
        found = outcomes(stack)
        return all(o.status == "completed" and (o.record or {}).get("state") == "completed"
                   for o in found if o.pool)

    finished = stack.wait_for(settled, timeout_s=150, interval_s=1.0)
    found = outcomes(stack)
    result = summary(found)
    print("summary:", result)
    assert finished, f"not settled: {[o for o in found if o.pool and o.status != 'completed']}"
    assert result["lost"] == 0

    routable = [o for o in found if o.pool]
    assert len(routable) == 35 and len(found) - len(routable) == 2
    for outcome in routable:
        spec = spec_of[outcome.job_id]
        want = "cancelled" if "cancel_at_s" in spec else spec.get("conclusion", "success")
        assert outcome.conclusion == want, (outcome, spec)
        assert outcome.record["state"] == "completed"
        assert outcome.record["conclusion"] == want
        assert outcome.record["pool"] == outcome.pool
    for outcome in found:
        if outcome.pool is None:
            assert outcome.record is None  # not ours: counted and dropped, never stored
            if spec_of[outcome.job_id]["labels"] == ["ubuntu-latest"]:
                assert outcome.status == "queued"  # nobody of ours can serve it
            # (the out-of-scope gamma job may still be taken by a spare gamma runner: an
            # org-level runner serves every repository its runner group allows, as on GitHub)
    cancelled_queued = next(o for o in routable
                            if spec_of[o.job_id].get("name") == "cancel-queued")
    assert cancelled_queued.runner is None, "cancel-queued was taken before it was cancelled"

    # each pool's jobs ran only in its image, per Docker's own event log
    starts = {name: image for name, (_, image) in events.close().items()}
    images = {pool.name: pool.image for pool in stack.pools.pools}
    ran = [o for o in routable if o.runner]
    assert all(o.runner for o in routable if o.conclusion != "cancelled")
    for outcome in ran:
        assert starts.get(outcome.runner) == images[outcome.pool], (outcome, starts)

    # after a drain: no container, runner registration or secret file of RunnerHub's is left
    assert stack.stop_child(executor, timeout_s=90) == 0

    # more jobs than slots: never more runner containers at once than slots, by replaying
    # Docker's own start/die events of this host's containers (not RunnerHub's tables); and
    # the slots were all used at some moment, so the bound was reached, not just not tested
    assert SLOTS < len(ran)
    replayed = timeline.close()
    over, peaks = running_peaks(replayed, {host: SLOTS})
    started = {e.container for e in replayed if e.action == "start"}
    assert len(started) >= len(ran), (len(started), len(ran))
    assert {e.container for e in replayed if e.action == "die"} >= started, "a start without die"
    assert over == 0, f"more than {SLOTS} runner containers at once: peak {peaks}"
    assert peaks.get(host) == SLOTS, f"peak {peaks}: the slots were never all in use"
    left = docker_client.containers.list(all=True, filters={"label": f"runnerhub.host={host}"})
    assert left == []
    assert [n.name for n in docker_client.networks.list(
        filters={"label": "runnerhub.managed=true"})] == []
    assert [r for r in stack.emulator.runners() if r["name"].startswith("rh-")] == []
    assert not any(Path(f"/dev/shm/runnerhub-{host}").glob("*"))
    assert "Traceback" not in executor.log()
