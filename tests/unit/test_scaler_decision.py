"""The scaler's pure decision, edge by edge (chalicelib/scaler/decision.py)."""

from __future__ import annotations

import pytest

from chalicelib.hosts import HostRecord, HostState
from chalicelib.jobs import JobRecord, JobState
from chalicelib.scaler.decision import (
    Instance,
    Limits,
    PoolView,
    Role,
    backlog,
    decide,
    with_seen,
)

NOW = 10_000.0
LIMITS = Limits(min_hosts=0, max_hosts=10, slots_per_host=4, max_runners=40, idle_s=300,
                boot_timeout_s=600)


def host(host_id, busy=0, state=HostState.SERVING, idle_for=1000.0, age=0.0, total=4,
         heartbeat_s=10.0):
    """A heartbeat record `age` seconds old, idle (no slot, no claim) for `idle_for`."""
    return HostRecord(host_id=host_id, state=state, slots_total=total, slots_busy=busy,
                      heartbeat_at=NOW - age, heartbeat_s=heartbeat_s, started_at=0.0,
                      busy_at=NOW - idle_for)


def inst(instance_id, lifecycle="InService", zone="a", launched=NOW - 5000, protected=True):
    return Instance(instance_id, lifecycle, zone, launched, protected)


def view(hosts=(), booting=(), backlog_=0, desired=None, forecast=0, extra=()):
    """A group holding the hosts (InService) and the booting instances (no heartbeat)."""
    instances = tuple(inst(h.host_id) for h in hosts) + tuple(booting) + tuple(extra)
    return PoolView(pool="p", now=NOW,
                    desired=len(instances) if desired is None else desired,
                    instances=instances, hosts={h.host_id: h for h in hosts},
                    backlog=backlog_, forecast_hosts=forecast)


def limits(**changes):
    return Limits(**({f: getattr(LIMITS, f) for f in LIMITS.__dataclass_fields__} | changes))


@pytest.mark.parametrize(
    ("name", "pool", "lim", "desired", "retire"),
    [
        ("empty pool, no demand: nothing", view(), LIMITS, 0, ()),
        ("min floor from zero", view(), limits(min_hosts=2), 2, ()),
        ("burst above capacity: ceil(backlog / slots)", view(backlog_=9), LIMITS, 3, ()),
        ("burst on a full host adds only the missing hosts",
         view([host("h1", busy=4)], backlog_=5), LIMITS, 3, ()),
        ("free slots absorb the backlog", view([host("h1", busy=1)], backlog_=3), LIMITS, 1,
         ()),
        ("booting hosts count as capacity",
         view(booting=[inst("b1", launched=NOW - 30), inst("b2", lifecycle="Pending",
                                                          launched=NOW - 5)], backlog_=8),
         LIMITS, 2, ()),
        ("desired above the listed instances counts as booting",
         view(backlog_=8, desired=2), LIMITS, 2, ()),
        ("a booting instance past its boot timeout is not capacity",
         view(booting=[inst("b1", launched=NOW - 700)], backlog_=4), LIMITS, 2, ()),
        ("max_runners caps the hosts: ceil(6 / 4) = 2",
         view(backlog_=100), limits(max_runners=6), 2, ()),
        ("the group's max caps the hosts", view(backlog_=100), limits(max_hosts=3), 3, ()),
        ("warm slots ask for capacity", view(), limits(warm_slots=1), 1, ()),
        ("idle host past the timeout is retired",
         view([host("h1", idle_for=301)]), LIMITS, 1, ("h1",)),
        ("idle host below the timeout is kept", view([host("h1", idle_for=299)]), LIMITS, 1,
         ()),
        ("a busy host is never retired, even at zero demand",
         view([host("h1", busy=1, idle_for=5000)]), LIMITS, 1, ()),
        ("min floor keeps idle hosts", view([host("h1"), host("h2")]), limits(min_hosts=1), 2,
         ("h1",)),
        ("retire only the surplus the backlog leaves",
         view([host("h1"), host("h2"), host("h3")], backlog_=5), LIMITS, 3, ("h1",)),
        ("booting hosts are never retired",
         view(booting=[inst("b1", launched=NOW - 30)]), LIMITS, 1, ()),
        ("over the cap: idle surplus retired down to the cap",
         view([host("h1"), host("h2", busy=2), host("h3")]), limits(max_runners=4), 3,
         ("h1", "h3")),
    ],
)
def test_decision(name, pool, lim, desired, retire):
    decided = decide(pool, lim)
    assert (decided.desired, decided.retire) == (desired, retire), name


def test_forecast_floor_raises_the_target():
    decided = decide(view(forecast=3), LIMITS)
    assert decided.desired == 3 and decided.target == 3


@pytest.mark.parametrize(
    ("state", "age", "role"),
    [
        (HostState.SERVING, 0.0, Role.SERVING),
        (HostState.SERVING, 31.0, Role.DOWN),  # stale: three beats of 10 s missed
        (HostState.DRAINING, 0.0, Role.DRAINING),
        (HostState.RETIRING, 0.0, Role.RETIRING),
        (HostState.LOST, 0.0, Role.DOWN),
        (HostState.STOPPED, 0.0, Role.DOWN),
    ],
)
def test_draining_lost_retiring_and_stale_hosts_are_not_capacity(state, age, role):
    other = host("h1", state=state, age=age, busy=0)
    decided = decide(view([other], backlog_=1), LIMITS)
    assert decided.roles["h1"] is role
    if role is not Role.SERVING:
        # the backlog needs a host: one is added beside the one that can't take it
        assert decided.desired == 2 and decided.retire == ()


def test_leaving_instances_are_neither_counted_nor_retired():
    leaving = inst("t1", lifecycle="Terminating:Wait")
    decided = decide(view([host("h1", busy=4)], backlog_=1, extra=[leaving], desired=1),
                     LIMITS)
    assert decided.roles["t1"] is Role.LEAVING and decided.desired == 2


def test_retiring_idle_hosts_are_finished_busy_ones_are_not():
    hosts = [host("r1", state=HostState.RETIRING), host("r2", state=HostState.RETIRING, busy=1)]
    decided = decide(view(hosts), LIMITS)
    assert decided.finish == ("r1",) and decided.retire == ()


def test_unprotected_instances_are_protected():
    decided = decide(view(extra=[inst("u1", protected=False)], backlog_=4, desired=1), LIMITS)
    assert decided.protect == ("u1",)


def test_scale_out_never_lowers_desired_and_scale_in_never_sets_it():
    decided = decide(view([host("h1"), host("h2")], desired=2), LIMITS)
    assert decided.desired == 2 and decided.scale_out == 0 and decided.retire == ("h1", "h2")


def test_victims_longest_idle_first_then_oldest_launched():
    hosts = [host("h1", idle_for=400), host("h2", idle_for=900), host("h3", idle_for=900)]
    pool = PoolView(pool="p", now=NOW, desired=3,
                    instances=(inst("h1"), inst("h2", launched=NOW - 100),
                               inst("h3", launched=NOW - 200)),
                    hosts={h.host_id: h for h in hosts}, backlog=0)
    assert decide(pool, limits(min_hosts=1)).retire == ("h3", "h2")


def test_victims_keep_the_zones_balanced():
    hosts = [host("a1", idle_for=5000), host("b1", idle_for=400), host("b2", idle_for=400)]
    pool = PoolView(pool="p", now=NOW, desired=3,
                    instances=(inst("a1", zone="a"), inst("b1", zone="b"), inst("b2", zone="b")),
                    hosts={h.host_id: h for h in hosts}, backlog=0)
    # a1 idled longest, but zone b holds two: one of b goes first
    assert decide(pool, limits(min_hosts=2)).retire == ("b1",)


def test_a_retirement_never_leaves_fewer_slots_than_needed():
    # hosts smaller than the pool's slots per host (2, not 4): the host count says one host is
    # surplus, the slots say the idle one is still needed for the backlog
    hosts = [host("h1", busy=2, total=2), host("h2", busy=2, total=2), host("h3", total=2)]
    assert decide(view(hosts, backlog_=0), LIMITS).retire == ("h3",)
    decided = decide(view(hosts, backlog_=1), LIMITS)
    assert decided.target == 2 and decided.needed_slots == 5 and decided.retire == ()


def test_limits_reject_nonsense():
    with pytest.raises(ValueError, match="min_hosts"):
        limits(min_hosts=5, max_hosts=2)
    with pytest.raises(ValueError, match="slots_per_host"):
        limits(slots_per_host=0)
    with pytest.raises(ValueError, match="boot_timeout_s"):
        limits(boot_timeout_s=0)


def test_min_above_the_cap_is_held_to_the_cap():
    assert decide(view(), limits(min_hosts=5, max_runners=8)).desired == 2


@pytest.mark.parametrize(
    ("state", "holder", "counted"),
    [
        (JobState.RECEIVED, None, True),
        (JobState.DISPATCHED, None, True),
        (JobState.CLAIMED, "live", False),  # its slot is busy on a live host already
        (JobState.RUNNER_STARTED, "live", False),
        (JobState.CLAIMED, "dead", True),  # a dead host's claim comes back as demand
        (JobState.RUNNER_STARTED, "dead", True),
        (JobState.IN_PROGRESS, "live", False),
        (JobState.WAITING, None, False),
    ],
)
def test_backlog_is_demand_no_live_host_holds(state, holder, counted):
    job = JobRecord(job_id=1, state=state, host_id=holder)
    assert backlog([job], frozenset({"live"})) == int(counted)


@pytest.mark.parametrize(
    ("claimed_at", "counted"),
    [
        (105.0, True),  # claimed after the host's last heartbeat: not in its busy slots yet
        (95.0, False),  # the heartbeat at 100 already counts its slot
        (None, False),  # no stamp: the heartbeat is trusted
    ],
)
def test_a_live_hosts_claim_counts_until_its_next_heartbeat(claimed_at, counted):
    extra = {} if claimed_at is None else {"claimed_at": claimed_at}
    job = JobRecord(job_id=1, state=JobState.CLAIMED, host_id="live", **extra)
    assert backlog([job], {"live": 100.0}) == int(counted)


# --- the cap, stuck and down instances ----------------------------------------------------------


def stuck(instance_id, zone="a"):
    """In the group, no heartbeat, launched past the boot timeout (600 s)."""
    return inst(instance_id, zone=zone, launched=NOW - 700)


def test_desired_never_exceeds_the_cap_when_stuck_instances_hold_it():
    # max_runners 8 at 4 slots a host: cap 2. Two stuck instances and a backlog of 8: the
    # missing capacity is not asked for on top of them (that made desired 4).
    decided = decide(view(booting=[stuck("s1"), stuck("s2")], backlog_=8),
                     limits(max_runners=8))
    assert decided.target == 2 and decided.desired == 2
    assert [(r.instance_id, r.role, r.decrement) for r in decided.reap] == [
        ("s1", Role.STUCK, True), ("s2", Role.STUCK, True)]


def test_scale_out_beside_a_stuck_instance_stops_at_the_cap():
    decided = decide(view([host("h1", busy=4)], booting=[stuck("s1")], backlog_=8),
                     limits(max_runners=12))  # cap 3: h1 and s1 leave room for one
    assert decided.desired == 3 and decided.scale_out == 1


@pytest.mark.parametrize(
    ("state", "age", "reaped"),
    [
        (HostState.STOPPED, 601.0, True),  # its daemon exited long ago
        (HostState.LOST, 700.0, True),  # declared dead, its claims taken over
        (HostState.SERVING, 601.0, True),  # stale past the boot timeout
        (HostState.SERVING, 31.0, False),  # stale, but a restarted daemon may beat again
        (HostState.STOPPED, 5.0, False),
        (HostState.DRAINING, 0.0, False),  # live: finishing its jobs
        (HostState.RETIRING, 0.0, False),  # finished by the retire protocol instead
    ],
)
def test_down_hosts_are_reaped_once_silent_for_the_boot_timeout(state, age, reaped):
    decided = decide(view([host("h1", state=state, age=age)]), LIMITS)
    assert [r.instance_id for r in decided.reap] == (["h1"] if reaped else [])


def test_a_booting_instance_is_not_reaped():
    assert decide(view(booting=[inst("b1", launched=NOW - 599)]), LIMITS).reap == ()


def test_reaps_below_the_group_minimum_keep_capacity():
    # MinSize 2, desired 3: one termination may lower desired capacity, the next may not
    # (the group refuses that): it is replaced instead.
    decided = decide(view(booting=[stuck("s1"), stuck("s2")], desired=3,
                          extra=[inst("b1", launched=NOW - 10)]), limits(min_hosts=2))
    assert [(r.instance_id, r.decrement) for r in decided.reap] == [("s1", True),
                                                                    ("s2", False)]


def test_retirement_never_takes_the_group_below_its_minimum():
    # MinSize 3 above the cap (1): the cap holds the target, but the group would refuse a
    # termination below its minimum, so no idle host is chosen.
    decided = decide(view([host("h1"), host("h2"), host("h3")]),
                     limits(min_hosts=3, max_runners=4))
    assert decided.target == 1 and decided.retire == ()
    assert decide(view([host("h1"), host("h2"), host("h3")]),
                  limits(min_hosts=2, max_runners=4)).retire == ("h1",)


# --- the stream's jobs beside the index -----------------------------------------------------------


def test_a_seen_job_the_index_does_not_list_yet_is_counted_once():
    listed = [JobRecord(job_id=1, state=JobState.RECEIVED)]
    seen = [JobRecord(job_id=1, state=JobState.RECEIVED), JobRecord(job_id=2,
                                                                     state=JobState.DISPATCHED)]
    assert backlog(with_seen(listed, seen), frozenset()) == 2


def test_the_index_wins_over_an_older_stream_image():
    listed = [JobRecord(job_id=1, state=JobState.CLAIMED, host_id="live")]
    seen = [JobRecord(job_id=1, state=JobState.RECEIVED)]
    assert backlog(with_seen(listed, seen), frozenset({"live"})) == 0


def test_a_seen_job_no_longer_waiting_is_not_demand():
    seen = [JobRecord(job_id=3, state=JobState.COMPLETED)]
    assert with_seen([], seen) == []
