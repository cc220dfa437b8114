"""The webhook's part in warm runners: a warm runner taking a job releases its warm seat (once,
whatever the redeliveries), the job's own runner waiting beside it becomes the pool's warm
replacement, and a job taken by another pool's runner is counted per pool pair."""

from __future__ import annotations

import pytest

from chalicelib import jobs as m
from chalicelib.jobs import Change
from chalicelib.memory import (
    InMemoryDeliveryLog,
    InMemoryDemandQueue,
    InMemoryJobStore,
    InMemoryRunnerStore,
)
from chalicelib.pools import PoolConfig, load_pools
from chalicelib.runners import RunnerState, Seats
from chalicelib.secrets import CachedSecrets
from chalicelib.telemetry import Telemetry
from chalicelib.webhook import WebhookService
from tests.conftest import TEST_POOLS
from tests.unit.test_demand_handover import A, send

POOL = "hosted-like"  # where the fixture's jobs route


def service(warm: int) -> WebhookService:
    base = load_pools(TEST_POOLS)
    pools = PoolConfig.model_validate({"pool": [
        p.model_dump() | ({"warm_runners": warm} if p.name == POOL else {})
        for p in base.pools]})
    return WebhookService(
        pools=pools, secrets=CachedSecrets(lambda: "s", 60), jobs=InMemoryJobStore(),
        deliveries=InMemoryDeliveryLog(), demand=InMemoryDemandQueue(),
        runners=InMemoryRunnerStore(), telemetry=Telemetry("test", emit=False),
        max_body_bytes=6 * 1024 * 1024)


def warm_runner(world: WebhookService, name: str, pool: str = POOL) -> None:
    world._runners.start(name, 1.0, pool=pool, max_runners=10, warm_limit=5, host_id="h")
    world._runners.move(name, RunnerState.IDLE, 1.1)


def start_runner(world: WebhookService, job_id: int, name: str) -> None:
    """What an executor does now: claim, seat and start the job's own runner."""
    jobs, runners = world._jobs, world._runners
    assert jobs.apply(job_id, m.CLAIM, 1.0, Change(fields={"host_id": "h"}), generation=1).applied
    runners.start(name, 1.0, pool=POOL, max_runners=10, job_id=job_id, generation=1,
                  host_id="h")
    runners.move(name, RunnerState.IDLE, 1.1)
    assert jobs.apply(job_id, m.START_RUNNER, 1.1, Change(fields={"started_runner": name}),
                      generation=1, host_id="h").applied


@pytest.fixture
def world():
    return service(warm=1)


def test_a_warm_runner_taking_a_job_hands_its_seat_to_the_jobs_own_runner(world):
    warm_runner(world, "rh-warm")
    send(world, "queued", A)
    start_runner(world, A, "rh-a")
    send(world, "in_progress", A, runner="rh-warm")
    assert world._runners.get("rh-warm").state == "busy"
    assert world._runners.get("rh-warm").warm is None  # its seat released
    replacement = world._runners.get("rh-a")
    assert replacement.warm is True and replacement.job_id is None
    assert world._runners.seats(POOL).warm == 1  # the pool is whole again


def test_a_redelivered_in_progress_releases_nothing_twice(world):
    warm_runner(world, "rh-warm")
    warm_runner(world, "rh-warm-2")
    send(world, "queued", A)
    send(world, "in_progress", A, runner="rh-warm")
    assert world._runners.seats(POOL) == Seats(runners=2, warm=1)
    send(world, "in_progress", A, runner="rh-warm")  # GitHub redelivers
    assert world._runners.seats(POOL) == Seats(runners=2, warm=1)


def test_no_replacement_when_the_pool_wants_no_warm_runner():
    world = service(warm=0)
    warm_runner(world, "rh-warm")  # left over from before the target fell
    send(world, "queued", A)
    start_runner(world, A, "rh-a")
    send(world, "in_progress", A, runner="rh-warm")
    assert world._runners.get("rh-a").warm is None
    assert world._runners.seats(POOL).warm == 0


def test_a_job_taken_by_another_pools_runner_is_counted_per_pair_once(world):
    warm_runner(world, "rh-k8s", pool="k8s")
    send(world, "queued", A)
    send(world, "in_progress", A, runner="rh-k8s")
    send(world, "in_progress", A, runner="rh-k8s")  # a redelivery counts nothing more
    assert world._telemetry.counts[("JobsTakenByOtherPool", f"k8s>{POOL}")] == 1
    assert world._runners.seats("k8s").warm == 0  # the taken warm runner's pool refills
