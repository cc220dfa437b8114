"""The scaling simulator (forecast/simulate.py) on hand-made traces whose waits and costs can be
worked out by hand: boots, runner start-ups, warm runners, idle retirement, caps, the seed."""

from __future__ import annotations

import math

import pytest

from chalicelib.pools import PoolConfig
from forecast.policies import Plan, Planned, Reactive
from forecast.simulate import SimConfig, simulate
from forecast.traces import TraceJob

T0 = 1_767_571_200.0  # 2026-01-05 00:00 UTC, a Monday
SMALL = ("self-hosted", "linux")
# No jitter: every boot takes exactly 60 s, so waits are exact.
EXACT = SimConfig(boot_s=60.0, boot_jitter_s=0.0, runner_startup_s=5.0, pickup_s=0.5, start=T0)
COLD = 5.5  # a free slot: the job's own runner starts (5 s), then GitHub hands it the job


def pools(max_runners: int = 16, warm: int = 0) -> PoolConfig:
    return PoolConfig.model_validate({"pool": [{
        "name": "small", "labels": list(SMALL), "scope": {"owner": "acme"},
        "image": "img", "max_runners": max_runners, "warm_runners": warm}]})


def job(at: float, duration: float = 100.0, labels: tuple[str, ...] = SMALL) -> TraceJob:
    return TraceJob(T0 + at, labels, duration)


REACTIVE = Reactive("reactive", idle_s=300.0)


def test_first_job_waits_trigger_boot_and_startup():
    # Arrival at 30 s: the debounced trigger runs the scaler at 31 s; the host boots 60 s.
    result = simulate([job(30)], pools(), REACTIVE, EXACT)
    assert result.waits == [pytest.approx(1.0 + 60.0 + COLD)]
    assert result.hosts_launched == 1


def test_job_on_a_serving_host_waits_only_its_runner_startup():
    result = simulate([job(30, duration=600), job(200)], pools(), REACTIVE, EXACT)
    assert result.waits[1] == pytest.approx(COLD)
    assert result.hosts_launched == 1


def test_burst_above_one_host_launches_enough_hosts_at_once():
    burst = [job(10 + i * 0.01, duration=300) for i in range(10)]  # 10 jobs, 4 slots a host
    result = simulate(burst, pools(), REACTIVE, EXACT)
    assert result.hosts_launched == 3
    assert max(result.waits) == pytest.approx(1.0 + 60.0 + COLD, abs=0.1)


def test_idle_host_is_retired_after_idle_timeout_on_the_schedule():
    # Host launched at 31 s, up at 91 s, job ends at 96.5 + 100; idle 300 s -> retired at the
    # first minute tick at or after 496.5 s: 540 s. Billed 31 s -> 540 s.
    result = simulate([job(30)], pools(), REACTIVE,
                      SimConfig(boot_s=60.0, boot_jitter_s=0.0, measure_to=T0 + 3600))
    assert result.instance_hours == pytest.approx((540 - 31) / 3600)
    # Busy slot-s: the job's slot from 91 s to 196.5 s, of 4 slots x 509 s.
    assert result.utilisation == pytest.approx((196.5 - 91) / (4 * 509))


def test_scale_in_delay_keeps_the_host_longer():
    config = SimConfig(boot_s=60.0, boot_jitter_s=0.0, measure_to=T0 + 7200)
    short = simulate([job(30)], pools(), Reactive("a", idle_s=60.0), config)
    delayed = simulate([job(30)], pools(), Reactive("b", idle_s=60.0, scale_in_delay_s=600.0),
                       config)
    assert delayed.instance_hours > short.instance_hours + 500 / 3600


def test_spare_hosts_serve_a_job_without_a_boot():
    # One spare host from the first scaler run (the minute tick at 0 s): up at 60 s.
    result = simulate([job(300)], pools(), Reactive("spare", spare_hosts=1), EXACT)
    assert result.waits == [pytest.approx(COLD)]


def test_warm_runner_takes_a_job_at_pickup_time():
    plan = Plan(T0, 3600.0, hosts=(1, 1), warm=(2, 2))
    policy = Planned("plan", plans={"small": plan})
    result = simulate([job(300), job(301)], pools(), policy, EXACT)
    assert result.waits == [pytest.approx(0.5), pytest.approx(0.5)]


def test_third_job_finds_the_warm_runners_taken_and_starts_its_own():
    plan = Plan(T0, 3600.0, hosts=(1, 1), warm=(2, 2))
    policy = Planned("plan", plans={"small": plan})
    # Two warm runners on a 4-slot host; three jobs within 0.2 s. The first two take the warm
    # runners, whose replacements start on the two free slots (at 300.0 and 300.1); the third
    # finds no slot and is taken by the first replacement when it comes up, at 305.0 + 0.5.
    result = simulate([job(300), job(300.1), job(300.2)], pools(), policy, EXACT)
    assert result.waits == [pytest.approx(0.5), pytest.approx(0.5),
                            pytest.approx(305.5 - 300.2, abs=1e-3)]


def test_warm_runners_from_the_pools_file_count_too():
    result = simulate([job(600)], pools(warm=1), REACTIVE, EXACT)
    assert result.waits == [pytest.approx(0.5)]


def test_floor_is_looked_up_one_lead_ahead():
    # Floor 1 host from 10:00 only; with lead 120 s the host is launched at 09:58 and serves
    # the 10:00:30 job with no boot wait.
    hosts = tuple(1 if hour >= 10 else 0 for hour in range(24))
    plan = Plan(T0, 3600.0, hosts=hosts, warm=(0,) * 24, lead_s=120.0)
    policy = Planned("plan", plans={"small": plan})
    result = simulate([job(36030)], pools(), policy, EXACT)
    assert result.waits == [pytest.approx(COLD)]
    without = simulate([job(36030)], pools(), REACTIVE, EXACT)
    assert without.waits[0] > 60


def test_max_runners_caps_concurrent_runners():
    # max_runners 2: at most 2 runners; the third and fourth job wait for a slot to free.
    burst = [job(10 + i * 0.01, duration=100) for i in range(4)]
    result = simulate(burst, pools(max_runners=2), REACTIVE, EXACT)
    assert result.hosts_launched == 1
    first = 1.0 + 60.0 + COLD
    assert sorted(result.waits)[:2] == [pytest.approx(first, abs=0.1)] * 2
    assert sorted(result.waits)[2] == pytest.approx(first + 100 + COLD, abs=0.1)


def test_unrouted_jobs_are_counted_not_dropped():
    result = simulate([job(30), job(40, labels=("windows",))], pools(), REACTIVE, EXACT)
    assert result.unrouted == 1
    assert len(result.waits) == 1


def test_a_busy_host_is_never_retired_by_a_short_idle_timeout():
    # A 2 h job with a 1-minute idle timeout: the host is kept until it ends (the simulator
    # raises if the scaler ever chose a busy host).
    result = simulate([job(30, duration=7200)], pools(), Reactive("r", idle_s=60.0),
                      SimConfig(boot_s=60.0, boot_jitter_s=0.0, measure_to=T0 + 4 * 3600))
    assert result.hosts_launched == 1
    assert result.instance_hours == pytest.approx((96.5 + 7200 + 60 - 31) / 3600, abs=70 / 3600)


def test_only_jobs_in_the_measured_window_are_judged():
    trace = [job(30), job(4000), job(8000)]
    config = SimConfig(boot_s=60.0, boot_jitter_s=0.0, measure_from=T0 + 3600,
                       measure_to=T0 + 7200)
    result = simulate(trace, pools(), REACTIVE, config)
    assert len(result.waits) == 1
    assert result.instance_hours <= 1.0


def test_deterministic_for_a_seed_and_the_seed_matters():
    trace = [job(i * 37.0, duration=500 + (i % 7) * 60) for i in range(200)]
    config = SimConfig(boot_s=60.0, boot_jitter_s=20.0)
    one = simulate(trace, pools(), REACTIVE, config, seed=3)
    again = simulate(trace, pools(), REACTIVE, config, seed=3)
    other = simulate(trace, pools(), REACTIVE, config, seed=4)
    assert one.waits == again.waits and one.instance_hours == again.instance_hours
    assert one.waits != other.waits


def test_hours_of_simulated_time_per_second():
    import time
    trace = [job(i * 20.0, duration=300) for i in range(3 * 180)]  # 3 h, ~6 busy slots
    began = time.perf_counter()
    simulate(trace, pools(), REACTIVE, EXACT)
    assert time.perf_counter() - began < 1.5  # 3 simulated hours, well under a second


def test_unserved_job_at_the_end_counts_its_wait_so_far():
    # max_runners 1 and a job longer than the overrun: the second job never starts.
    trace = [job(10, duration=10_000), job(11)]
    config = SimConfig(boot_s=60.0, boot_jitter_s=0.0, overrun_s=600.0)
    result = simulate(trace, pools(max_runners=1), REACTIVE, config)
    assert result.unserved == 1
    assert result.waits[1] == pytest.approx(600.0, abs=1.0)


@pytest.mark.parametrize("bad", [
    {"boot_s": -1.0}, {"boot_jitter_s": 100.0}, {"schedule_s": 0.0},
    {"boot_s": 700.0, "boot_jitter_s": 0.0}, {"slots_per_host": 0},
    {"measure_from": 10.0, "measure_to": 5.0}, {"pickup_s": math.nan},
])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        SimConfig(**bad)


def test_config_naming_an_unknown_pool_is_refused():
    with pytest.raises(ValueError, match="not in the pools file"):
        simulate([job(1)], pools(), REACTIVE, SimConfig(pool_slots={"nope": 2}))


def test_empty_trace_and_bad_jobs_are_refused():
    with pytest.raises(ValueError, match="no job"):
        simulate([], pools(), REACTIVE, EXACT)
    with pytest.raises(ValueError, match="bad job"):
        simulate([job(1, duration=-5)], pools(), REACTIVE, EXACT)
    with pytest.raises(ValueError, match="bad job"):
        simulate([TraceJob(math.inf, SMALL, 1.0)], pools(), REACTIVE, EXACT)


def test_negative_floor_from_a_policy_is_refused():
    class Broken(Reactive):
        def floor_hosts(self, pool, now):
            return -1

    with pytest.raises(ValueError, match="negative"):
        simulate([job(1)], pools(), Broken("broken"), EXACT)


def test_spare_hosts_are_kept_only_on_pools_the_trace_uses():
    # Three pools, the trace uses one: spare=1 keeps one host (on that pool) for the 4 h
    # window, not one per pool; the unused pools' warm runners (file) cost nothing either.
    three = PoolConfig.model_validate({"pool": [
        {"name": name, "labels": ["self-hosted", name], "scope": {"owner": "acme"},
         "image": "img", "max_runners": 16, "warm_runners": warm}
        for name, warm in (("used", 0), ("idle-a", 0), ("idle-b", 2))]})
    jobs = [TraceJob(T0 + at, ("self-hosted", "used"), 60.0) for at in (60.0, 7200.0)]
    config = SimConfig(boot_s=60.0, boot_jitter_s=0.0, start=T0, measure_from=T0,
                       measure_to=T0 + 4 * 3600)
    spare = Reactive("spare", spare_hosts=1, idle_s=300.0)
    result = simulate(jobs, three, spare, config)
    # One spare host all 4 h, plus a second host while each job holds a slot of the first
    # (busy slots + a host's spare slots need two hosts): ~4.2 h, not 3 x 4 h.
    assert result.instance_hours == pytest.approx(4.2, abs=0.05)
    assert result.waits == [pytest.approx(COLD)] * 2
    alone = simulate(jobs, PoolConfig.model_validate({"pool": [three.pools[0].model_dump()]}),
                     spare, config)
    assert (result.instance_hours, result.hosts_launched) == (alone.instance_hours,
                                                              alone.hosts_launched)
