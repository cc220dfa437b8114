"""The warm keeper (executor/warm.py) on in-memory stores and fake GitHub and Docker: it fills
the pool's warm runners after the grace, never beyond the pool's target across hosts sharing
the counter, keeps a spare runner as a warm replacement, shrinks when the target falls, and
retires a warm runner idle past its limit. The real thing end to end:
tests/e2e/test_warm_runners.py."""

from __future__ import annotations

import pytest

from chalicelib import jobs as m
from chalicelib.github import RunnerScope
from chalicelib.history import BUCKET_S, ForecastItem, ForecastReader, MemoryHistory
from chalicelib.jobs import Change
from chalicelib.memory import (
    InMemoryClaimIndex,
    InMemoryDemandQueue,
    InMemoryHostStore,
    InMemoryJobStore,
    InMemoryRunnerStore,
)
from chalicelib.pools import PoolConfig
from chalicelib.runners import RunnerState
from chalicelib.warm_targets import WarmTargets
from executor.daemon import Executor
from executor.metrics import ExecutorMetrics
from executor.registry import LocalRunner
from executor.settings import ExecutorSettings
from tests.conftest import wait_for
from tests.unit.test_executor import Clock, FakeConsumer, FakeContainers, FakeGitHub

GRACE_S = 3.0
# The grace plus the placement offset: up to two ticks (1 s each) for an empty host.
FILL_AFTER_S = GRACE_S + 2.0


def pools(warm: int = 2, max_runners: int = 5, **extra) -> PoolConfig:
    return PoolConfig.model_validate({"pool": [{
        "name": "w", "labels": ["self-hosted", "w"], "scope": {"owner": "acme"},
        "image": "img", "max_runners": max_runners, "warm_runners": warm,
        "warm_idle_limit_s": 60, **extra}]})


@pytest.fixture(autouse=True)
def _app_env(monkeypatch):
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_ID", "1")
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_KEY_FILE", "/dev/null")


class Fleet:
    """Hosts sharing one set of stores (one DynamoDB) and one GitHub."""

    def __init__(self, config: PoolConfig):
        self.config = config
        self.jobs, self.runners = InMemoryJobStore(), InMemoryRunnerStore()
        self.hosts, self.github, self.clock = InMemoryHostStore(), FakeGitHub(), Clock(1000.0)

    def host(self, host_id: str, slots: int = 4,
             warm_targets: WarmTargets | None = None) -> Executor:
        settings = ExecutorSettings(host_id=host_id, slots=slots,
                                    warm_refill_grace_s=GRACE_S)
        executor = Executor(
            settings, self.config.pools, jobs=self.jobs, runners=self.runners,
            hosts=self.hosts, claims=InMemoryClaimIndex(self.jobs), consumer=FakeConsumer(),
            demand=InMemoryDemandQueue(), github=self.github, containers=FakeContainers(),
            metrics=ExecutorMetrics(), clock=self.clock, warm_targets=warm_targets)
        executor._beat(force=True)
        return executor


def tick(executor: Executor) -> None:
    executor.warm.tick(executor.ctx.clock())
    # Starts run on the keeper's threads: wait until none is in flight.
    assert wait_for(lambda: not any(executor.warm._starting.values()), 5.0)


def fill(fleet: Fleet, host: Executor) -> None:
    """A first tick sees the deficit; one a grace later fills it."""
    tick(host)
    fleet.clock.now += FILL_AFTER_S
    tick(host)


def warm_locals(executor: Executor) -> list:
    return [r for r in executor.registry.runners() if r.warm]


def test_the_keeper_fills_the_pool_after_the_grace_and_holds_a_slot_each():
    fleet = Fleet(pools(warm=2))
    host = fleet.host("h1")
    tick(host)
    assert fleet.runners.seats("w").warm == 0  # within the grace: a spare may be coming
    fleet.clock.now += FILL_AFTER_S
    tick(host)
    assert fleet.runners.seats("w").warm == 2 and len(warm_locals(host)) == 2
    assert host.slots.used == 2
    specs = host.ctx.containers.started
    assert [s.labels["runnerhub.job"] for s in specs] == ["0", "0"]  # no job's demand
    assert {labels for *_, labels, _ in fleet.github.jit} == {("self-hosted", "w")}
    fleet.clock.now += 1
    tick(host)
    assert len(host.ctx.containers.started) == 2  # full: nothing more


def test_hosts_sharing_the_pool_never_overshoot_its_target():
    fleet = Fleet(pools(warm=3))
    first, second = fleet.host("h1", slots=2), fleet.host("h2", slots=2)
    for host in (first, second):
        tick(host)
    fleet.clock.now += FILL_AFTER_S
    for _ in range(3):
        for host in (first, second):
            tick(host)
        fleet.clock.now += 1
    assert fleet.runners.seats("w").warm == 3
    assert len(warm_locals(first)) + len(warm_locals(second)) == 3
    # A refused start gave its slot back: nothing held but the three runners.
    assert first.slots.used + second.slots.used == 3


class CountingRunners(InMemoryRunnerStore):
    def __init__(self) -> None:
        super().__init__()
        self.seat_reads = 0

    def seats(self, pool):
        self.seat_reads += 1
        return super().seats(pool)


def test_a_pool_whose_file_wants_none_follows_the_trainers_forecast():
    """The forecast's warm runners per 5-minute bucket are the target where they ask more
    than the file: filled, shrunk when the next bucket asks fewer, none from a stale item;
    a bucket asking none costs no seat read."""
    fleet = Fleet(pools(warm=0, max_runners=5))
    fleet.runners = CountingRunners()
    start = (int(fleet.clock.now) // BUCKET_S + 1) * BUCKET_S
    history = MemoryHistory()
    history.put_forecast(ForecastItem("w", start, (0.0,) * 3, trained_at=fleet.clock.now,
                                      warm=(3, 1, 9)))
    reader = ForecastReader(history, refresh_s=10**6, clock=fleet.clock)
    host = fleet.host("h1", warm_targets=WarmTargets(reader))
    tick(host)
    tick(host)
    assert fleet.runners.seat_reads == 0  # before the forecast's first bucket: none wanted
    fleet.clock.now = start + 1
    fill(fleet, host)
    assert fleet.runners.seats("w").warm == 3 and len(warm_locals(host)) == 3
    assert host.metrics.warm_target.labels("w")._value.get() == 3
    fleet.clock.now = start + BUCKET_S + 1
    tick(host)
    assert fleet.runners.seats("w").warm == 1  # the next bucket wants one: two retired
    fleet.clock.now = start + 2 * BUCKET_S + 1
    fill(fleet, host)
    # 9 asked: the target is max_runners' 5; more start as the host's slots free up.
    assert host.metrics.warm_target.labels("w")._value.get() == 5
    assert 1 < fleet.runners.seats("w").warm <= 4
    # Two days after training the item is stale: the file's target (none) again.
    fleet.clock.now = start + 2 * BUCKET_S + 49 * 3600
    tick(host)
    assert fleet.runners.seats("w").warm == 0


def test_a_host_without_a_free_slot_starts_nothing():
    fleet = Fleet(pools(warm=2))
    host = fleet.host("h1", slots=1)
    host.slots.try_take("a-job")
    tick(host)
    fleet.clock.now += FILL_AFTER_S
    tick(host)
    tick(host)
    assert fleet.runners.seats("w").warm == 0 and not host.ctx.containers.started


def test_a_spare_runner_takes_the_seat_its_jobs_warm_runner_left():
    fleet = Fleet(pools(warm=1))
    host = fleet.host("h1")
    fill(fleet, host)
    (warm,) = warm_locals(host)
    # GitHub gave job 7 to the warm runner (the webhook releases its seat) while job 7's own
    # runner was starting; that runner then finds its job taken.
    fleet.runners.move(warm.name, RunnerState.BUSY, fleet.clock.now, took_job_id=7)
    assert fleet.runners.take_warm(warm.name, fleet.clock.now)
    fleet.jobs.apply(7, m.RECEIVE, fleet.clock.now, Change(facts={"pool": "w"}))
    fleet.runners.start("rh-7-1-abc", fleet.clock.now, pool="w", max_runners=5,
                        host_id="h1", job_id=7, generation=1)
    host.registry.add(LocalRunner(name="rh-7-1-abc", pool=fleet.config.pools[0], job_id=7,
                                  generation=1, installation_id=9, scope=warm.scope,
                                  runner_id=99, started_at=fleet.clock.now,
                                  lease_renewed_at=fleet.clock.now))
    host.launcher.spare("rh-7-1-abc", fleet.clock.now)
    assert fleet.runners.get("rh-7-1-abc").warm is True
    assert fleet.runners.seats("w").warm == 1
    fleet.clock.now += FILL_AFTER_S + 1
    tick(host)
    assert len(host.ctx.containers.started) == 1  # no extra start: the spare refilled it


def test_a_falling_target_retires_the_excess_and_no_more():
    # 2 warm runners by day, none outside the window: at the window's end both retire.
    window = {"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "start": "00:00",
              "end": "12:00", "warm_runners": 2}
    fleet = Fleet(pools(warm=0, warm_schedule=[window]))
    host = fleet.host("h1")
    fleet.clock.now = 1_764_583_200.0  # 2025-12-01 10:00 UTC: in the window
    fill(fleet, host)
    assert fleet.runners.seats("w").warm == 2
    fleet.clock.now = 1_764_590_400.0  # 12:00: the window ended
    tick(host)
    assert fleet.runners.seats("w").warm == 0
    assert sorted(host.ctx.containers.stopped) == sorted(r.name for r in host.registry.runners())


def test_a_warm_runner_idle_past_its_limit_is_retired_and_one_taken_is_not():
    fleet = Fleet(pools(warm=2))
    host = fleet.host("h1")
    fill(fleet, host)
    idle, taken = warm_locals(host)
    fleet.runners.move(taken.name, RunnerState.BUSY, fleet.clock.now, took_job_id=3)
    fleet.runners.take_warm(taken.name, fleet.clock.now)
    fleet.github.register(taken.runner_id, taken.name, busy=True)
    fleet.clock.now += 61
    host.watch.check(fleet.clock.now)
    assert host.ctx.containers.stopped == [idle.name]
    assert taken.busy and not taken.reaping


def test_the_busiest_host_with_room_fills_first():
    fleet = Fleet(pools(warm=1))
    empty, busy = fleet.host("h-empty", slots=4), fleet.host("h-busy", slots=4)
    for name in ("a", "b", "c"):
        busy.slots.try_take(name)
    for host in (empty, busy):
        tick(host)
    fleet.clock.now += GRACE_S + 0.6  # past the busy host's offset (0.5 s), not the empty's
    for host in (empty, busy):
        tick(host)
    assert len(warm_locals(busy)) == 1 and not warm_locals(empty)


def test_failed_warm_starts_back_off_instead_of_retrying_every_tick():
    fleet = Fleet(pools(warm=1))
    host = fleet.host("h1")
    host.ctx.containers.fail = True  # a broken image
    fill(fleet, host)
    assert len(fleet.github.jit) == 1 and fleet.runners.seats("w") .runners == 0
    fleet.clock.now += 1
    tick(host)
    assert len(fleet.github.jit) == 1  # backing off (start_backoff_s 5 s)
    fleet.clock.now += 5
    tick(host)
    assert len(fleet.github.jit) == 2
    assert host.metrics.value("runnerhub_warm_runner_failures_total", pool="w") == 2


def test_a_warm_runner_that_starts_then_exits_with_an_error_backs_off_doubling():
    fleet = Fleet(pools(warm=1))
    host = fleet.host("h1")
    fill(fleet, host)
    waits = []
    for _ in range(3):
        (warm,) = warm_locals(host)
        host.ctx.containers.status[warm.name] = "exited"  # its container exits...
        host.ctx.containers.exit_codes[warm.name] = 2  # ...refused by GitHub (exit 2)
        host.watch.check(fleet.clock.now)
        started = len(host.ctx.containers.started)
        waited = 0.0
        while len(host.ctx.containers.started) == started and waited < 60:
            fleet.clock.now += 0.5
            waited += 0.5
            tick(host)
        waits.append(waited)
    assert waits[1] >= 2 * waits[0] - 1 and waits[2] >= 2 * waits[1] - 1, waits


def test_a_runner_the_webhook_made_warm_is_noticed_and_not_reaped_as_surplus():
    fleet = Fleet(pools(warm=1))
    host = fleet.host("h1")
    fleet.jobs.apply(7, m.RECEIVE, fleet.clock.now, Change(facts={"pool": "w"}))
    fleet.runners.start("rh-7-1-abc", fleet.clock.now, pool="w", max_runners=5,
                        host_id="h1", job_id=7, generation=1)
    local = LocalRunner(name="rh-7-1-abc", pool=fleet.config.pools[0], job_id=7,
                        generation=1, installation_id=9, scope=RunnerScope("org", "acme"),
                        runner_id=99, started_at=fleet.clock.now,
                        lease_renewed_at=fleet.clock.now)
    host.registry.add(local)
    host.ctx.containers.started.append(type("Spec", (), {"name": local.name, "labels": {}})())
    assert fleet.runners.make_warm(local.name, "w", 1, fleet.clock.now)  # the webhook's move
    fleet.clock.now += host.settings.idle_timeout_s + 1
    host.watch.check(fleet.clock.now)
    assert local.warm and local.job_id == 0 and not host.ctx.containers.stopped


def test_orphan_records_of_a_live_host_are_ended_and_live_ones_are_not():
    fleet = Fleet(pools(warm=0))
    host = fleet.host("h1")
    now = fleet.clock.now
    for name in ("rh-orphan", "rh-busy-elsewhere", "rh-warm-w-starting", "rh-young"):
        fleet.runners.start(name, now - (10 if name == "rh-young" else 400), pool="w",
                            max_runners=5, host_id="h1")
    # A container still runs for one (a busy runner of a pool this host no longer serves).
    host.ctx.containers.started.append(type("Spec", (), {"name": "rh-busy-elsewhere",
                                                         "labels": {}})())
    host.launcher.starting_warm.add("rh-warm-w-starting")
    assert host.adoption.orphan_records(now) == 1
    assert fleet.runners.get("rh-orphan").state == "gone"
    assert {fleet.runners.get(n).state for n in ("rh-busy-elsewhere", "rh-warm-w-starting",
                                                 "rh-young")} == {"starting"}
    assert fleet.runners.seats("w").runners == 3  # the orphan's seat went back
