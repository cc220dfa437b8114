"""A pool's seats (`max_runners`, warm runners) on the moto server over HTTP: the conditional
counter and the runner record's flags change in one transaction, so racing hosts never overshoot
and every seat is released exactly once (gone, warm taken). Also the in-memory store, which the
unit tests and benchmarks use, against the same cases."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from chalicelib import aws, resources
from chalicelib.memory import InMemoryRunnerStore
from chalicelib.runners import DynamoRunnerStore, NoSeat, RunnerState, Seats
from devstack.resources import create_tables

ROUNDS = 200
RACERS = 6
MAX_RUNNERS = 3


@pytest.fixture
def dynamo(aws_endpoint, unique):
    client = aws.client("dynamodb")
    names = {spec.logical_name: f"rh-{unique}-{spec.default_name.removeprefix('runnerhub-')}"
             for spec in resources.TABLES}
    create_tables(client, names)
    return DynamoRunnerStore(client, names["runners_table"])


@pytest.fixture(params=["dynamodb", "memory"])
def store(request):
    if request.param == "memory":
        return InMemoryRunnerStore()
    return request.getfixturevalue("dynamo")


def start(store, name, *, warm=None, max_runners=MAX_RUNNERS, now=100.0):
    return store.start(name, now, pool="p", max_runners=max_runners, warm_limit=warm,
                       host_id="h1", job_id=7, generation=1)


def test_runner_seats_stop_at_max_runners(store):
    for index in range(MAX_RUNNERS):
        start(store, f"r{index}")
    with pytest.raises(NoSeat, match="no runner seat"):
        start(store, "r-over")
    assert store.get("r-over") is None  # nothing half-written
    assert store.seats("p") == Seats(runners=MAX_RUNNERS, warm=0)


def test_gone_releases_the_runner_seat_once(store):
    start(store, "r1")
    assert store.move("r1", RunnerState.GONE, 101.0, reason="exited") is not None
    assert store.move("r1", RunnerState.GONE, 102.0) is None  # gone is final
    assert store.seats("p") == Seats(runners=0, warm=0)
    assert store.get("r1").seat is None


def test_a_record_without_a_seat_ends_without_touching_the_counter(store):
    # A record written before seats existed (an upgrade) holds none: releasing would undercount.
    store.move("old", RunnerState.STARTING, 100.0, pool="p")
    start(store, "r1")
    store.move("old", RunnerState.GONE, 101.0)
    assert store.seats("p") == Seats(runners=1, warm=0)


def test_warm_seats_stop_at_the_warm_limit(store):
    start(store, "w1", warm=2)
    start(store, "w2", warm=2)
    with pytest.raises(NoSeat, match="no warm seat"):
        start(store, "w3", warm=2)
    assert store.seats("p") == Seats(runners=2, warm=2)
    assert store.get("w1").warm is True


def test_taking_a_job_releases_the_warm_seat_once_and_gone_does_not_again(store):
    start(store, "w1", warm=1)
    store.move("w1", RunnerState.IDLE, 101.0)
    store.move("w1", RunnerState.BUSY, 102.0, took_job_id=9)
    assert store.take_warm("w1", 102.0) is True
    assert store.take_warm("w1", 102.5) is False  # a redelivered in_progress
    assert store.seats("p") == Seats(runners=1, warm=0)
    store.move("w1", RunnerState.GONE, 110.0)
    assert store.seats("p") == Seats(runners=0, warm=0)


def test_a_warm_runner_that_ends_idle_releases_both_seats(store):
    start(store, "w1", warm=1)
    store.move("w1", RunnerState.IDLE, 101.0)
    store.move("w1", RunnerState.GONE, 200.0, reason="warm_idle_limit")
    assert store.seats("p") == Seats(runners=0, warm=0)


def test_a_spare_runner_becomes_warm_within_the_limit_and_stops_serving_its_job(store):
    start(store, "r1")
    start(store, "r2")
    assert store.make_warm("r1", "p", 1, 101.0) is True
    found = store.get("r1")
    assert found.warm is True and found.job_id is None and found.generation is None
    assert store.make_warm("r2", "p", 1, 101.0) is False  # the one warm seat is taken
    assert store.make_warm("r1", "p", 5, 101.0) is False  # already warm
    assert store.seats("p") == Seats(runners=2, warm=1)


def test_a_busy_runner_never_becomes_warm(store):
    start(store, "r1")
    store.move("r1", RunnerState.BUSY, 101.0, took_job_id=3)
    assert store.make_warm("r1", "p", 5, 102.0) is False
    assert store.seats("p").warm == 0


def test_pools_count_apart(store):
    store.start("a1", 100.0, pool="a", max_runners=1)
    store.start("b1", 100.0, pool="b", max_runners=1)
    assert (store.seats("a"), store.seats("b")) == (Seats(1, 0), Seats(1, 0))


def test_racing_starts_never_exceed_max_runners(store):
    """Hosts racing for a pool's seats, 200 rounds (a fresh pool each): never more seated than
    `max_runners` nor warm than the warm limit, and the counter equals the records seated."""
    barrier = threading.Barrier(RACERS)

    def race(round_no: int, racer: int) -> bool:
        barrier.wait(timeout=10)
        try:
            # Some racers ask for a warm seat too: both conditions hold at once.
            store.start(f"r{round_no}-{racer}", 100.0 + round_no, pool=f"p{round_no}",
                        max_runners=MAX_RUNNERS,
                        warm_limit=1 if racer % 2 else None, host_id=f"h{racer}")
            return True
        except NoSeat:
            return False

    with ThreadPoolExecutor(RACERS) as pool:
        for round_no in range(ROUNDS):
            won = [racer for racer, ok in zip(
                range(RACERS),
                pool.map(lambda racer, r=round_no: race(r, racer), range(RACERS)), strict=True)
                if ok]
            seats = store.seats(f"p{round_no}")
            warm = [r for r in won if store.get(f"r{round_no}-{r}").warm]
            assert len(won) == MAX_RUNNERS == seats.runners, (round_no, won, seats)
            assert len(warm) == seats.warm <= 1, (round_no, warm, seats)


def test_a_fallen_target_releases_warm_seats_down_to_it_and_no_further(store):
    for name in ("w1", "w2", "w3"):
        start(store, name, warm=3)
        store.move(name, RunnerState.IDLE, 101.0)
    # Hosts shrinking at once to a target of 1: two releases succeed, the third is refused.
    assert [store.unwarm(name, 1, 102.0) for name in ("w1", "w2", "w3")] == [True, True, False]
    assert store.seats("p") == Seats(runners=3, warm=1)
    assert store.get("w3").warm is True and store.get("w1").warm is None
    store.move("w1", RunnerState.GONE, 103.0)  # the retired runner ends: its runner seat only
    assert store.seats("p") == Seats(runners=2, warm=1)


def test_a_busy_warm_runner_is_not_unwarmed(store):
    start(store, "w1", warm=2)
    store.move("w1", RunnerState.BUSY, 101.0, took_job_id=4)
    assert store.unwarm("w1", 0, 102.0) is False
