"""Executors that fail safely: takeover of a dead host's expired claims (never a live host's),
draining, start-up adoption and heartbeats. Pure decisions first, then the daemon with in-memory
stores and the fakes of tests/unit/test_executor.py."""

from __future__ import annotations

import json
import threading

import pytest

from chalicelib import jobs as m
from chalicelib.demand import DEMAND_SCHEMA_VERSION
from chalicelib.hosts import Heartbeat, HostRecord, HostState
from chalicelib.jobs import Change, JobRecord
from chalicelib.memory import (
    InMemoryDemandQueue,
    InMemoryHostStore,
    InMemoryJobStore,
    InMemoryRunnerStore,
)
from chalicelib.runners import RunnerRecord, RunnerState
from executor import messages, recovery
from executor.containers import RunnerContainer, docker_time
from executor.recovery import (
    UNKNOWN,
    Adopt,
    Discard,
    Drop,
    Retry,
    TakeOver,
    adopt_or_discard,
    on_claim_refused,
    orphan_claims,
    plan_dead_host,
)
from executor.serve import apply
from tests.conftest import wait_for
from tests.unit.test_executor import (
    JOB,
    Clock,
    FakeContainers,
    FakeGitHub,
    app_env,  # noqa: F401 - fixture
    make_executor,
    message,
    receive_job,
    received,
)

# --- the moves: TAKEOVER and RELEASE, on both stores ------------------------------------------




def claimed(store, host="dead", lease_until=50.0, now=10.0):
    store.apply(JOB, m.RECEIVE, 1.0, Change(facts={"pool": "linux-small"}))
    store.apply(JOB, m.CLAIM, now, Change(fields={"host_id": host, "lease_until": lease_until}),
                generation=1)


def take(store, now, from_host="dead", generation=1):
    return store.apply(JOB, m.TAKEOVER, now,
                       Change(fields={"host_id": "me", "lease_until": now + 60}),
                       generation=generation, host_id=from_host)


def test_takeover_needs_the_lease_expired(store):
    claimed(store, lease_until=50.0)
    assert not take(store, now=50.0).applied  # not yet: a live lease is never taken
    moved = take(store, now=50.5)
    assert moved.applied and moved.job.state == "claimed" and moved.job.host_id == "me"
    assert moved.job.lease_until == 110.5 and moved.job.taken_over_at == 50.5


def test_takeover_is_one_conditional_write_one_winner(store):
    claimed(store)
    assert take(store, now=60.0).applied
    # The second executor conditioned on the dead host: the claim is no longer its.
    assert not take(store, now=60.1).applied


def test_takeover_needs_the_same_generation_and_a_claim(store):
    claimed(store)
    assert not take(store, now=60.0, generation=2).applied
    store.apply(JOB, m.START_JOB, 55.0)
    assert not take(store, now=60.0).applied  # in progress: GitHub's now


def test_takeover_from_runner_started_goes_back_to_claimed(store):
    claimed(store)
    store.apply(JOB, m.START_RUNNER, 20.0, Change(fields={"started_runner": "rh-old"}),
                generation=1, host_id="dead")
    moved = take(store, now=60.0)
    assert moved.applied and moved.job.state == "claimed"


def test_release_hands_an_unstarted_claim_back(store):
    claimed(store, host="me")
    assert not store.apply(JOB, m.RELEASE, 20.0, generation=1, host_id="other").applied
    moved = store.apply(JOB, m.RELEASE, 20.0, generation=1, host_id="me")
    assert moved.applied and moved.job.state == "dispatched"
    assert moved.job.host_id is None and moved.job.lease_until is None
    # ... and the same generation can be claimed again by any executor
    again = store.apply(JOB, m.CLAIM, 21.0, Change(fields={"host_id": "b", "lease_until": 99}),
                        generation=1)
    assert again.applied and again.job.host_id == "b"


# --- pure decisions ---------------------------------------------------------------------------

def host(heartbeat_at, state="serving"):
    return HostRecord(host_id="a", state=state, heartbeat_at=heartbeat_at, heartbeat_s=10)


LIVE = host(95.0)
DEAD = host(50.0)


def job(state="claimed", host="a", lease_until=150.0, generation=1, **fields):
    return JobRecord(**{"job_id": JOB, "state": state, "host_id": host,
                        "lease_until": lease_until, "demand_generation": generation,
                        "pool": "linux-small", **fields})


def runner(state, name="rh"):
    return RunnerRecord(runner_name=name, state=state)


@pytest.mark.parametrize(
    ("found", "claimant", "known", "verdict"),
    [
        (job(), LIVE, False, Drop("claimed_already")),
        (job(lease_until=90.0), DEAD, False, TakeOver("a")),
        (job(lease_until=90.0), None, False, TakeOver("a")),
        (job(lease_until=90.0), host(95.0, state="stopped"), False, TakeOver("a")),
        (job(state="runner_started", lease_until=90.0), DEAD, False, TakeOver("a")),
        (job(lease_until=150.0), DEAD, False, Retry(51.0, "lease_live")),
        (job(lease_until=90.0), LIVE, False, Retry(26.0, "host_alive")),
        (job(host="me"), None, True, Drop("claimed_already")),
        (job(host="me", lease_until=90.0), None, False, TakeOver("me")),
        (job(host="me", lease_until=120.0), None, False, Retry(21.0, "own_previous_claim")),
        (job(generation=2), DEAD, False, Drop("stale_generation")),
        (job(state="in_progress"), DEAD, False, Drop("job_in_progress")),
        (None, None, False, Drop("unknown_job")),
    ],
)
def test_on_claim_refused(found, claimant, known, verdict):
    assert on_claim_refused(found, 1, "me", claimant, known, 100.0) == verdict


def test_a_live_hosts_claim_is_never_taken_whatever_its_lease():
    for lease in (0.0, 99.0, 100.0, 1000.0):
        verdict = on_claim_refused(job(lease_until=lease), 1, "me", LIVE, False, 100.0)
        assert not isinstance(verdict, TakeOver)


def test_retry_is_bounded():
    verdict = on_claim_refused(job(lease_until=1e9), 1, "me", DEAD, False, 100.0)
    assert verdict == Retry(recovery.MAX_RETRY_S, "lease_live")
    verdict = on_claim_refused(job(lease_until=100.0 + 1e-3), 1, "me", DEAD, False, 100.0)
    assert isinstance(verdict, Retry) and verdict.after_s == recovery.MIN_RETRY_S


def test_plan_dead_host():
    claims = [job(lease_until=90.0), job(lease_until=150.0, job_id=2),
              job(lease_until=90.0, job_id=3, pool="gpu")]
    runners = [runner("idle", "r1"), runner("gone", "r2"), runner("busy", "r3")]
    plan = plan_dead_host(DEAD, claims, runners, frozenset({"linux-small"}), 100.0)
    assert [j.job_id for j in plan.take_over] == [JOB]
    assert plan.waiting == 2  # a live lease, and a pool this executor does not serve
    assert [r.runner_name for r in plan.deregister] == ["r1", "r3"]
    assert not plan.nothing_left
    assert plan_dead_host(DEAD, [], [runners[1]], frozenset(), 100.0).nothing_left


def test_orphan_claims_of_a_previous_daemon():
    claims = [job(host="me", lease_until=150.0), job(host="me", job_id=2),
              job(host="me", lease_until=90.0, job_id=3),
              job(host="me", lease_until=90.0, job_id=4, started_runner="rh-4")]
    at_start = orphan_claims(claims, frozenset({2}), frozenset({"rh-4"}), 100.0, at_start=True)
    assert [j.job_id for j in at_start] == [JOB, 3]
    later = orphan_claims(claims, frozenset({2}), frozenset({"rh-4"}), 100.0, at_start=False)
    assert [j.job_id for j in later] == [3]  # a fresh lease: a serving thread's claim


@pytest.mark.parametrize(
    ("record", "github", "age", "verdict"),
    [
        ({"state": "idle"}, {"status": "online", "busy": False}, 300, Adopt(busy=False)),
        ({"state": "busy"}, {"status": "online", "busy": True}, 300, Adopt(busy=True)),
        ({"state": "idle"}, {"status": "online", "busy": True}, 300, Adopt(busy=True)),
        ({"state": "gone"}, {"status": "online", "busy": True}, 300, Adopt(busy=True)),
        ({"state": "starting"}, {"status": "offline", "busy": False}, 5, Adopt(busy=False)),
        ({"state": "idle"}, {"status": "offline", "busy": False}, 300, Discard("offline")),
        ({"state": "idle"}, None, 5, Discard("not_registered")),
        ({"state": "gone"}, {"status": "online", "busy": False}, 5, Discard("record_gone")),
        (None, {"status": "online", "busy": False}, 5, Discard("no_record")),
        ({"state": "idle"}, UNKNOWN, 300, Adopt(busy=False)),
        ({"state": "busy"}, UNKNOWN, 300, Adopt(busy=True)),
    ],
)
def test_adopt_or_discard(record, github, age, verdict):
    found = runner(**record) if record else None
    assert adopt_or_discard(found, github, age, 30.0, True) == verdict


def test_a_container_of_an_unserved_pool_is_discarded_unless_busy():
    assert adopt_or_discard(runner("idle"), {"status": "online"}, 5, 30, False) == Discard(
        "pool_not_served")
    assert adopt_or_discard(runner("busy"), {"busy": True}, 5, 30, False) == Adopt(True)


def test_docker_time_parses_nanoseconds():
    assert docker_time("1970-01-01T00:01:40.500000000Z") == pytest.approx(100.5)
    assert docker_time("0001-01-01T00:00:00Z") is None and docker_time(None) is None


# --- the daemon: taking over ------------------------------------------------------------------


class World:
    """Two hosts' worth of state: shared job, runner and host stores, one demand queue."""

    def __init__(self):
        self.clock = Clock(100.0)
        self.jobs = InMemoryJobStore()
        self.runners = InMemoryRunnerStore()
        self.hosts = InMemoryHostStore()
        self.demand = InMemoryDemandQueue()
        self.github = FakeGitHub()
        receive_job(self.jobs)

    def executor(self, host_id="h1", **settings):
        settings.setdefault("heartbeat_s", 10.0)
        settings.setdefault("lease_s", 60.0)
        return make_executor(self.jobs, self.runners, self.hosts, host_id=host_id,
                             clock=self.clock, github=self.github, demand=self.demand,
                             containers=FakeContainers(), **settings)

    def beat(self, host_id, at, state=HostState.SERVING, pools=("linux-small",)):
        self.hosts.beat(Heartbeat(host_id, pools, 2, 1, 1, "0.1.0", (1, 1), state, 10.0, 0.0),
                        at)

    def claim_by(self, host_id, at, lease_s=60.0, job_id=JOB):
        return self.jobs.apply(job_id, m.CLAIM, at,
                               Change(fields={"host_id": host_id, "lease_until": at + lease_s}),
                               generation=1)


@pytest.fixture
def two(app_env):  # noqa: F811 - the fixture imported above
    return World()


def body(**overrides) -> str:
    return message(**overrides).model_dump_json()


def test_duplicate_message_of_a_live_claim_is_deleted(two):
    two.beat("a", at=95.0)
    two.claim_by("a", at=90.0)
    executor = two.executor()
    assert executor.server.handle(received(body())) is False
    assert executor.ctx.consumer.deleted == ["m1"] and executor.ctx.containers.started == []
    assert two.jobs.get(JOB).host_id == "a"


def test_expired_claim_of_a_dead_host_is_taken_over_and_started(two):
    two.beat("a", at=20.0)  # dead: last beat 80 s ago, heartbeat 10 s
    two.claim_by("a", at=20.0, lease_s=60.0)  # lease ended at 80
    executor = two.executor()
    assert executor.server.handle(received(body())) is True
    found = two.jobs.get(JOB)
    assert found.state == "runner_started" and found.host_id == "h1"
    assert found.taken_over_from == "a" and found.demand_generation == 1
    assert executor.metrics.value("runnerhub_claims_taken_over_total", pool="linux-small",
                                  via="message") == 1
    assert executor.ctx.consumer.deleted == ["m1"]


def test_a_live_hosts_expired_claim_is_left_alone_and_looked_at_later(two):
    two.beat("a", at=95.0)  # alive
    two.claim_by("a", at=20.0, lease_s=60.0)  # but its lease passed
    executor = two.executor()
    assert executor.server.handle(received(body())) is False
    assert two.jobs.get(JOB).host_id == "a" and executor.ctx.containers.started == []
    assert executor.ctx.consumer.deleted == []
    ((_, delay),) = executor.ctx.consumer.visibility
    assert 25 <= delay <= 30  # when its heartbeat would be stale


def test_dead_host_claim_with_a_live_lease_waits_for_the_lease(two):
    two.beat("a", at=20.0)
    two.claim_by("a", at=90.0, lease_s=60.0)  # lease until 150
    executor = two.executor()
    assert executor.server.handle(received(body())) is False
    assert executor.ctx.consumer.visibility == [("m1", 51)]
    assert two.jobs.get(JOB).host_id == "a"


def test_scan_takes_over_a_dead_hosts_expired_claims_and_redemands(two):
    two.beat("a", at=20.0)
    two.claim_by("a", at=20.0)
    two.jobs.apply(JOB, m.START_RUNNER, 21.0, Change(fields={"started_runner": "rh-a"}),
                   generation=1, host_id="a")
    two.runners.move("rh-a", RunnerState.STARTING, 21.0, host_id="a", pool="linux-small",
                     job_id=JOB, generation=1, installation_id=9,
                     repository="runnerhub-demo/api", scope_level="org")
    two.runners.move("rh-a", RunnerState.IDLE, 22.0, runner_id=7)
    two.github.register(7, "rh-a", status="offline")
    executor = two.executor()
    executor.takeover.scan_dead_hosts(100.0)
    found = two.jobs.get(JOB)
    assert found.state == "dispatched" and found.demand_generation == 2
    assert found.redemand_reason == "host_lost:a"
    assert [msg.generation for msg in two.demand.messages] == [2]
    assert two.github.deleted == [7] and two.runners.get("rh-a").state == "gone"
    assert two.hosts.get("a").state == "serving"  # marked lost at the next scan
    executor.takeover.scan_dead_hosts(101.0)
    assert two.hosts.get("a").state == "lost"


def test_scan_never_takes_a_live_hosts_claims(two):
    two.beat("a", at=95.0)
    two.claim_by("a", at=20.0)  # lease expired, host alive
    two.executor().takeover.scan_dead_hosts(100.0)
    assert two.jobs.get(JOB).host_id == "a" and two.demand.messages == []


def test_scan_leaves_a_job_github_no_longer_queues(two):
    two.beat("a", at=20.0)
    two.claim_by("a", at=20.0)
    two.github.job_status[JOB] = "in_progress"
    executor = two.executor()
    executor.takeover.scan_dead_hosts(100.0)
    found = two.jobs.get(JOB)
    assert found.state == "claimed" and found.host_id == "h1"  # taken, not re-demanded
    assert two.demand.messages == []


def test_scan_when_github_is_down_redemands_nothing(two):
    two.beat("a", at=20.0)
    two.claim_by("a", at=20.0)
    two.github.down = True
    two.executor().takeover.scan_dead_hosts(100.0)
    assert two.demand.messages == [] and two.jobs.get(JOB).demand_generation == 1


def test_scan_ignores_dead_hosts_of_other_pools(two):
    two.beat("a", at=20.0, pools=("not-served-here",))
    two.claim_by("a", at=20.0)
    two.executor().takeover.scan_dead_hosts(100.0)
    assert two.jobs.get(JOB).host_id == "a"


def test_two_executors_racing_for_one_dead_claim_make_one_new_demand(two):
    two.beat("a", at=20.0)
    two.claim_by("a", at=20.0)
    first, second = two.executor("h1"), two.executor("h2")
    barrier = threading.Barrier(2)

    def scan(executor):
        barrier.wait()
        executor.takeover.scan_dead_hosts(100.0)

    threads = [threading.Thread(target=scan, args=(e,)) for e in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert [msg.generation for msg in two.demand.messages] == [2]
    taken = [e.metrics.value("runnerhub_claims_taken_over_total", pool="linux-small",
                             via="scan") for e in (first, second)]
    assert sorted(taken) == [0, 1]


def test_own_claims_of_a_previous_daemon_are_redemanded_once_their_lease_expired(two):
    two.claim_by("h1", at=20.0)  # this host's, from a daemon that is gone
    executor = two.executor()
    executor.adoption.orphan_claims(100.0, at_start=False)
    assert two.jobs.get(JOB).demand_generation == 2
    assert two.jobs.get(JOB).redemand_reason == "previous_daemon"


def test_own_claim_with_a_fresh_lease_is_a_serving_threads(two):
    two.claim_by("h1", at=95.0)
    two.executor().adoption.orphan_claims(100.0, at_start=False)
    assert two.jobs.get(JOB).state == "claimed" and two.demand.messages == []


# --- heartbeat, draining, retiring ------------------------------------------------------------


def test_heartbeat_reports_slots_pools_version_and_schema(two):
    executor = two.executor()
    assert executor.slots.try_take("r-m1")  # as the poller does for the message
    assert executor.server.handle(received(body())) is True
    executor._beat(force=True)
    record = two.hosts.get("h1")
    assert record.slots_total == 2 and record.slots_busy == 1  # now its runner's
    assert record.runners == 1 and record.state == "serving"
    assert record.schema_versions == [messages.OLDEST_ACCEPTED_SCHEMA_VERSION,
                                         DEMAND_SCHEMA_VERSION]
    assert set(record.pools) == set(executor.pools) and record.version


def test_heartbeat_is_written_every_interval_only(two):
    executor = two.executor(heartbeat_s=5.0)
    executor._beat()
    first = two.hosts.get("h1").heartbeat_at
    two.clock.now += 4.0
    executor._beat()
    assert two.hosts.get("h1").heartbeat_at == first
    two.clock.now += 1.0
    executor._beat()
    assert two.hosts.get("h1").heartbeat_at == first + 5.0


def test_draining_releases_an_unstarted_claim_and_returns_its_message_at_once(two):
    executor = two.executor()
    executor.stop()
    found = two.jobs.apply(JOB, m.CLAIM, 100.0, Change(fields={"host_id": "h1",
                                                               "lease_until": 160.0}),
                           generation=1).job
    item = received(body())
    started = executor.launcher.launch(executor.pools["linux-small"], message(), found, item, {})
    assert apply(executor.ctx.consumer, item, started) is False
    assert two.jobs.get(JOB).state == "dispatched" and two.jobs.get(JOB).host_id is None
    assert executor.ctx.consumer.visibility == [("m1", 0)]
    assert executor.ctx.containers.started == [] and executor.ctx.github.jit == []


def test_retire_deregisters_an_idle_runner_and_redemands_its_job(two):
    executor = two.executor()
    assert executor.server.handle(received(body())) is True
    (local,) = executor.registry.local.values()
    executor.watch.retire(local, "host_stopped:forced")
    assert executor.ctx.github.deleted == [local.runner_id]
    assert executor.ctx.containers.stopped == [local.name]
    found = two.jobs.get(JOB)
    assert found.demand_generation == 2 and found.redemand_reason == "host_stopped:forced"


def test_retire_stops_a_busy_runner_without_redemand(two):
    executor = two.executor()
    assert executor.server.handle(received(body())) is True
    (local,) = executor.registry.local.values()
    executor.ctx.github.runners[local.runner_id]["busy"] = True
    executor.watch.retire(local, "host_stopped:forced")
    assert executor.ctx.containers.stopped == [local.name]
    assert two.jobs.get(JOB).demand_generation == 1


def test_run_drains_and_exits_clean_with_a_stopped_heartbeat(two):
    executor = two.executor(tick_s=0.05, poll_wait_s=0, drain_timeout_s=5)
    executor.ctx.consumer.inbox.append(received(body()))
    thread = threading.Thread(target=executor.run)
    thread.start()
    assert wait_for(lambda: executor.registry.local)
    executor.stop()
    # the running job ends: its container exits
    for name in list(executor.registry.local):
        executor.ctx.containers.status[name] = "exited"
    thread.join(10)
    assert not thread.is_alive()
    assert two.hosts.get("h1").state == "stopped" and not executor.registry.local
    assert executor.ctx.containers.network_released


def test_second_stop_retires_runners_and_exits(two):
    executor = two.executor(tick_s=0.05, poll_wait_s=0, drain_timeout_s=600)
    executor.ctx.consumer.inbox.append(received(body()))
    result = {}
    thread = threading.Thread(target=lambda: result.update(clean=executor.run()))
    thread.start()
    assert wait_for(lambda: executor.registry.local)
    name = next(iter(executor.registry.local))
    executor.stop()
    executor.stop()
    thread.join(10)
    assert not thread.is_alive() and result["clean"] is True
    assert executor.ctx.containers.stopped == [name] and name in executor.ctx.containers.removed
    assert two.jobs.get(JOB).demand_generation == 2  # its demand went back to the queue


def test_shutdown_returns_messages_still_held(two):
    executor = two.executor()
    from executor.intake import Held

    executor.intake.held["r-m9"] = Held(received(body(), "m9"), 0.0)
    assert executor.intake.return_all() is True
    assert executor.ctx.consumer.visibility == [("m9", 0)]


# --- start-up adoption ------------------------------------------------------------------------


def left_container(name, status="running", age_s=300.0, now=100.0, job_id=JOB, pool="linux-small"):
    labels = {"runnerhub.managed": "true", "runnerhub.runner": name, "runnerhub.pool": pool,
              "runnerhub.job": str(job_id), "runnerhub.generation": "1",
              "runnerhub.host": "h1"}
    return RunnerContainer(name, f"cid-{name}", status, 0 if status == "exited" else None,
                           labels, started_at=now - age_s)


def left_runner(world, name, runner_id, state=RunnerState.IDLE, job_id=JOB):
    world.runners.move(name, RunnerState.STARTING, 10.0, host_id="h1", pool="linux-small",
                       job_id=job_id, generation=1, installation_id=9,
                       repository="runnerhub-demo/api", scope_level="org")
    if state is not RunnerState.STARTING:
        world.runners.move(name, RunnerState.IDLE, 11.0, runner_id=runner_id)
    if state is RunnerState.BUSY:
        world.runners.move(name, RunnerState.BUSY, 12.0)


def test_adoption_keeps_healthy_runners_and_removes_the_rest(two):
    for job_id in (2, 3, 4):
        receive_job(two.jobs, job_id)
    # healthy idle runner (job 77 waits on it) and a busy one (job 2 running)
    two.claim_by("h1", at=10.0)
    two.jobs.apply(JOB, m.START_RUNNER, 11.0, Change(fields={"started_runner": "rh-idle"}),
                   generation=1, host_id="h1")
    left_runner(two, "rh-idle", 1)
    two.github.register(1, "rh-idle")
    left_runner(two, "rh-busy", 2, RunnerState.BUSY, job_id=2)
    two.github.register(2, "rh-busy", busy=True)
    two.jobs.apply(2, m.START_JOB, 12.0)
    # a runner GitHub no longer knows (deleted), whose job 3 still waits on it
    two.claim_by("h1", at=10.0, job_id=3)
    two.jobs.apply(3, m.START_RUNNER, 11.0, Change(fields={"started_runner": "rh-deleted"}),
                   generation=1, host_id="h1")
    left_runner(two, "rh-deleted", 3, job_id=3)
    # an unstarted claim (the daemon died between claim and container)
    two.claim_by("h1", at=10.0, job_id=4)
    executor = two.executor()
    executor.ctx.containers.left = [left_container("rh-idle"), left_container("rh-busy", job_id=2),
                                 left_container("rh-deleted", job_id=3)]
    executor.ctx.containers.files = {"rh-idle", "rh-busy", "rh-deleted", "rh-stray"}
    counts = executor.adopt()
    assert counts["adopted"] == 1 and counts["adopted_busy"] == 1 and counts["discarded"] == 1
    assert counts["claims_redemanded"] == 2  # job 3 (its runner gone) and job 4 (unstarted)
    assert set(executor.registry.local) == {"rh-idle", "rh-busy"}
    assert executor.registry.local["rh-busy"].busy and not executor.registry.local["rh-idle"].busy
    assert executor.slots.used == 2
    assert "rh-deleted" in executor.ctx.containers.removed
    assert two.runners.get("rh-deleted").state == "gone"
    assert two.jobs.get(3).demand_generation == 2 and two.jobs.get(4).demand_generation == 2
    assert two.jobs.get(JOB).demand_generation == 1  # served by its adopted runner
    assert executor.ctx.containers.files == {"rh-idle", "rh-busy"}  # stray JIT files removed
    # the adopted idle runner keeps its claim alive
    executor._tick()
    assert two.jobs.get(JOB).lease_until == 100.0 + 60.0


def test_adoption_of_a_runner_the_previous_daemon_never_recorded_idle(two):
    two.claim_by("h1", at=95.0)  # the daemon died after the container started
    left_runner(two, "rh-new", None, RunnerState.STARTING)
    two.github.register(5, "rh-new", status="offline")  # still registering
    executor = two.executor()
    executor.ctx.containers.left = [left_container("rh-new", age_s=3.0)]
    counts = executor.adopt()
    assert counts["adopted"] == 1
    assert executor.registry.local["rh-new"].runner_id == 5  # found by name
    assert two.runners.get("rh-new").state == "idle"
    assert two.jobs.get(JOB).state == "runner_started"
    assert two.jobs.get(JOB).started_runner == "rh-new"


def test_adoption_cleans_up_exited_containers_and_runners_without_one(two):
    left_runner(two, "rh-exited", 1)
    two.github.register(1, "rh-exited", status="offline")
    left_runner(two, "rh-nocontainer", 2)
    two.github.register(2, "rh-nocontainer", status="offline")
    executor = two.executor()
    executor.ctx.containers.left = [left_container("rh-exited", status="exited")]
    counts = executor.adopt()
    assert counts["exited"] == 1 and counts["runners_deregistered"] == 1
    assert sorted(two.github.deleted) == [1, 2]
    assert two.runners.get("rh-exited").state == "gone"
    assert two.runners.get("rh-nocontainer").state == "gone"
    assert executor.slots.used == 0 and not executor.registry.local


def test_newer_schema_is_left_for_an_upgraded_executor_and_previous_is_accepted(two,
                                                                                monkeypatch):
    # An upgraded executor (schema N+1) accepts N+1 and N; this one (N) leaves N+1 alone.
    newer = json.loads(body()) | {"schema_version": DEMAND_SCHEMA_VERSION + 1}
    assert isinstance(messages.classify(json.dumps(newer), "linux-small"), messages.TooNew)
    monkeypatch.setattr(messages, "DEMAND_SCHEMA_VERSION", DEMAND_SCHEMA_VERSION + 1)
    monkeypatch.setattr(messages, "OLDEST_ACCEPTED_SCHEMA_VERSION", DEMAND_SCHEMA_VERSION)
    for version in (DEMAND_SCHEMA_VERSION, DEMAND_SCHEMA_VERSION + 1):
        verdict = messages.classify(json.dumps(newer | {"schema_version": version}),
                                    "linux-small")
        assert isinstance(verdict, messages.Accepted)


# --- slots: a message that finds no free slot -------------------------------------------------


def test_slots_take_waits_for_a_release_or_gives_up():
    from executor.slots import Slots

    slots, cancel = Slots(1), threading.Event()
    assert slots.take("a", 0.01, cancel)
    assert not slots.take("b", 0.05, cancel)  # full: gives up after the timeout
    threading.Timer(0.05, slots.release, args=("a",)).start()
    assert slots.take("b", 2.0, cancel)  # a runner exited meanwhile
    cancel.set()
    assert not slots.take("c", None, cancel)  # stopping: no waiting


def test_a_message_one_receive_from_the_dlq_waits_for_a_slot_as_long_as_it_takes(two,
                                                                                 monkeypatch):
    from executor import intake
    from executor.queue import Received

    monkeypatch.setattr(intake, "SLOT_WAIT_S", 0.05)
    executor = two.executor(slots=1)
    assert executor.slots.try_take("rh-running")
    fresh = received(body(), "m1")
    assert executor.intake.wait_for_slot(fresh) is False  # returned to the queue after a while
    near = Received("linux-small", "m2", "r-m2", body(), intake.DEMAND_MAX_RECEIVES - 1)
    threading.Timer(0.3, executor.slots.release, args=("rh-running",)).start()
    assert executor.intake.wait_for_slot(near) is True  # held until the slot freed


# --- containers: only this host's and this deployment's -------------------------------------


class FakeDockerApi:
    def __init__(self, containers):
        self._containers = containers  # id -> (labels, status, vanished)

    def containers(self, all, filters):
        wanted = dict(item.split("=", 1) for item in filters["label"])
        return [{"Id": cid, "Labels": labels, "State": status}
                for cid, (labels, status, _) in self._containers.items()
                if all and all_match(labels, wanted)]

    def inspect_container(self, cid):
        import docker.errors

        labels, status, vanished = self._containers[cid]
        if vanished:
            raise docker.errors.NotFound("gone")
        return {"Id": cid, "Name": f"/{labels['runnerhub.runner']}",
                "State": {"Status": status, "ExitCode": 0,
                          "StartedAt": "2026-01-01T00:00:00.5Z"},
                "Config": {"Labels": labels}}


def all_match(labels, wanted):
    return all(labels.get(key) == value for key, value in wanted.items())


def test_managed_lists_this_deployments_containers_and_skips_vanished_ones(tmp_path):
    from types import SimpleNamespace

    from executor.containers import RunnerContainers

    def labels(name, host="h1", deployment=None):
        found = {"runnerhub.managed": "true", "runnerhub.runner": name, "runnerhub.host": host}
        if deployment:
            found["runnerhub.deployment"] = deployment
        return found

    api = FakeDockerApi({
        "c1": (labels("mine", deployment="local/jobs-a"), "running", False),
        "c2": (labels("older-executor"), "exited", False),  # no label: counts as ours
        "c3": (labels("other-stack", deployment="local/jobs-b"), "running", False),
        "c4": (labels("other-host", host="h2", deployment="local/jobs-a"), "running", False),
        "c5": (labels("vanished", deployment="local/jobs-a"), "running", True),
    })
    containers = RunnerContainers(SimpleNamespace(api=api), tmp_path, "host",
                                  deployment="local/jobs-a")
    found = {c.name: c for c in containers.managed("h1")}
    assert sorted(found) == ["mine", "older-executor"]
    assert found["older-executor"].finished and found["older-executor"].exit_code == 0
    assert found["mine"].started_at == docker_time("2026-01-01T00:00:00.5Z")


def test_adoption_discards_a_container_that_was_created_but_never_started(two):
    two.claim_by("h1", at=95.0)
    two.jobs.apply(JOB, m.START_RUNNER, 96.0, Change(fields={"started_runner": "rh-created"}),
                   generation=1, host_id="h1")
    left_runner(two, "rh-created", 4)
    two.github.register(4, "rh-created", status="offline")  # young: would pass the grace
    executor = two.executor()
    container = left_container("rh-created", status="created", age_s=1.0)
    executor.ctx.containers.left = [container]
    counts = executor.adopt()
    assert counts["discarded"] == 1 and not executor.registry.local
    assert "rh-created" in executor.ctx.containers.removed and two.github.deleted == [4]
    assert two.runners.get("rh-created").state == "gone"
    assert two.jobs.get(JOB).demand_generation == 2  # its demand went back to the queue


def test_a_wanted_idle_runner_that_github_no_longer_sees_online_is_retired(two):
    executor = two.executor(idle_timeout_s=30.0)
    assert executor.server.handle(received(body())) is True
    (local,) = executor.registry.local.values()
    two.clock.now += 31.0
    executor._tick()  # online: keeps waiting for its job
    assert executor.ctx.containers.stopped == []
    two.github.runners[local.runner_id]["status"] = "offline"
    two.clock.now += 31.0
    executor._tick()
    assert executor.ctx.containers.stopped == [local.name]
    assert two.jobs.get(JOB).demand_generation == 2
    assert two.jobs.get(JOB).redemand_reason == "runner_not_online"
