"""What an operator asks through the management API, done by the executor (in-memory stores,
fake GitHub and Docker; tests/unit/test_warm_keeper.py's fleet): a retire request on an idle
runner's record, a drain request on a busy host's record."""

from __future__ import annotations

from chalicelib.runners import RunnerState
from executor.registry import RETIRE_REQUESTS_EVERY_S
from tests.unit.test_warm_keeper import Fleet, _app_env, fill, pools, warm_locals

_env = _app_env  # the App's settings every executor needs (an autouse fixture)


def request_retire(fleet: Fleet, name: str) -> None:
    fleet.runners.records[name].update(retire_requested_at=fleet.clock.now,
                                       retire_requested_by="alice")


def test_a_retire_request_reaps_that_idle_warm_runner_only():
    fleet = Fleet(pools(warm=2))
    host = fleet.host("h1")
    fill(fleet, host)
    asked, other = warm_locals(host)
    host.watch.check(fleet.clock.now)  # nothing asked yet: this read finds no request
    request_retire(fleet, asked.name)
    host.watch.check(fleet.clock.now + 1)
    assert host.ctx.containers.stopped == []  # read at most every RETIRE_REQUESTS_EVERY_S
    fleet.clock.now += RETIRE_REQUESTS_EVERY_S
    host.watch.check(fleet.clock.now)
    assert host.ctx.containers.stopped == [asked.name] and asked.reaping and not other.reaping
    assert host.metrics.retire_requests.labels("w")._value.get() == 1


def test_a_retire_request_on_a_runner_that_took_a_job_is_not_done():
    fleet = Fleet(pools(warm=1))
    host = fleet.host("h1")
    fill(fleet, host)
    (taken,) = warm_locals(host)
    request_retire(fleet, taken.name)
    fleet.runners.move(taken.name, RunnerState.BUSY, fleet.clock.now, took_job_id=3)
    fleet.clock.now += RETIRE_REQUESTS_EVERY_S
    host.watch.check(fleet.clock.now)
    assert host.ctx.containers.stopped == [] and taken.busy


def test_a_drain_request_on_the_hosts_record_drains_it_for_the_long_drain():
    fleet = Fleet(pools(warm=0))
    host = fleet.host("h1")
    assert not host.ctx.stopping.is_set()
    fleet.hosts.records["h1"].update(drain_requested_at=fleet.clock.now,
                                     drain_requested_by="alice")
    host._beat(force=True)  # read at most every heartbeat_s: the first beat read it already
    assert not host.ctx.stopping.is_set()
    fleet.clock.now += host.settings.heartbeat_s
    host._beat(force=True)
    assert host.ctx.stopping.is_set() and host.metrics.drain_requests._value.get() == 1
    # Jobs may finish for as long as an instance's end waits, not SIGTERM's 10 minutes.
    assert host._drain_deadline(0) == fleet.clock.now + host.settings.lifecycle_drain_timeout_s
