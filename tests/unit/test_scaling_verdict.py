"""The verdict of `make bench-scaling` and `make replay` (forecast/replay.py `verdict`,
`summary`): issue 16's targets on UNROUNDED figures, each failure named, and all_pass only when
the aperiodic trace and at least five periodic ones were judged."""

from __future__ import annotations

import json

import pytest

from benchmarks import scaling_sim
from forecast.replay import (
    aperiodic_pass,
    periodic_pass,
    rounded,
    summary,
    verdict,
)

PERIODIC = ("office_hours", "nightly_cron", "matrix_bursts", "growth_trend", "holiday_week")


def trace(ratio=0.2, mase=0.7, default_p95=1.0, default_hours=1.0) -> dict:
    return {"p95_wait_ratio": ratio, "mase": mase,
            "default": {"p95_wait_ratio": default_p95, "instance_hours_ratio": default_hours}}


def six(**changes) -> dict[str, dict]:
    """The six bundled traces, all passing; `changes` replaces one trace's result."""
    results = {name: trace() for name in PERIODIC}
    results["aperiodic"] = trace(ratio=None, mase=1.3)
    results.update(changes)
    return results


def test_six_passing_traces_pass():
    line, misses = verdict(six())
    assert misses == [] and line["all_pass"] is True
    assert line == {"traces": 6, "all_pass": True,
                    "worst": {"p95_wait_ratio": 0.2, "mase": 0.7},
                    "aperiodic": {"p95_wait_ratio": 1.0, "instance_hours_ratio": 1.0}}


@pytest.mark.parametrize("result, missed", [
    (trace(ratio=0.61), "nightly_cron: p95_wait_ratio 0.61 > 0.6"),
    # Rounded to 3 decimals it would read 0.6 and pass: the verdict compares 0.6004.
    (trace(ratio=0.6004), "nightly_cron: p95_wait_ratio 0.6004 > 0.6"),
    (trace(ratio=None), "nightly_cron: p95_wait_ratio undefined"),
    (trace(mase=1.0), "nightly_cron: MASE 1 >= 1.0"),
    (trace(mase=0.99995), None),  # below 1 unrounded, though it prints 1.0
    (trace(mase=None), "nightly_cron: MASE undefined"),
])
def test_each_periodic_miss_fails_the_run_and_is_named(result, missed):
    line, misses = verdict(six(nightly_cron=result))
    assert periodic_pass(result) is (missed is None)
    if missed is None:
        assert line["all_pass"] is True and misses == []
    else:
        assert line["all_pass"] is False
        assert len(misses) == 1 and misses[0].startswith(missed)


def test_a_ratio_just_over_target_prints_rounded_but_fails():
    line, _ = verdict(six(growth_trend=trace(ratio=0.6004)))
    assert line["worst"]["p95_wait_ratio"] == 0.6 and line["all_pass"] is False


@pytest.mark.parametrize("key", ["default_p95", "default_hours"])
@pytest.mark.parametrize("value, passes", [(1.05, True), (1.0504, False), (None, False)])
def test_each_aperiodic_ratio_over_target_fails(key, value, passes):
    result = trace(ratio=None, mase=1.3, **{key: value})
    line, misses = verdict(six(aperiodic=result))
    assert aperiodic_pass(result) is passes and line["all_pass"] is passes
    name = {"default_p95": "p95_wait_ratio", "default_hours": "instance_hours_ratio"}[key]
    assert (misses == []) is passes
    if not passes:
        assert misses[0].startswith(f"aperiodic: {name} vs default")


def test_the_aperiodic_trace_missing_fails():
    results = six()
    del results["aperiodic"]
    line, misses = verdict(results)
    assert line["all_pass"] is False and "aperiodic" not in line
    assert misses == ["no aperiodic trace judged, the verdict needs one"]


def test_too_few_periodic_traces_fail():
    # `--traces nightly_cron,aperiodic`: both pass, but two traces are not the verdict.
    results = {"nightly_cron": trace(), "aperiodic": trace(ratio=None, mase=1.3)}
    line, misses = verdict(results)
    assert line["all_pass"] is False and line["traces"] == 2
    assert misses == ["1 periodic trace(s) judged, the verdict needs at least 5"]


def test_no_trace_is_no_pass():
    line, misses = verdict({}, min_periodic=0, need_aperiodic=False)
    assert line["all_pass"] is False and misses == ["no trace judged"]


def test_one_replayed_trace_is_judged_alone():
    # make replay: one trace, no coverage rule.
    line, misses = verdict({"mine": trace(ratio=0.3)}, (), min_periodic=0,
                           need_aperiodic=False)
    assert (line["all_pass"], misses) == (True, [])
    line, _ = verdict({"mine": trace(ratio=None, mase=1.3, default_hours=1.2)}, ("mine",),
                      min_periodic=0, need_aperiodic=False)
    assert line["all_pass"] is False and line["aperiodic"]["instance_hours_ratio"] == 1.2


def test_the_bench_prints_the_shared_summary():
    assert scaling_sim.summary is summary
    assert summary(six()) == verdict(six())[0]


def test_the_bench_with_a_subset_of_traces_says_why_and_exits_1(monkeypatch, capsys):
    monkeypatch.setattr(scaling_sim, "generate", lambda name, seed, weeks: [name])
    monkeypatch.setattr(scaling_sim, "replay_jobs", lambda jobs, pools, **_: {
        **trace(), "trace": jobs[0], "judged_from": "a", "judged_to": "b", "judged_jobs": 1,
        "mase_hourly": 1.1, "mase_by_pool": {"linux": 0.7}, "baseline": "r",
        "forecast_used": ["linux"], "skill_by_pool": {"linux": 0.5}, "policies": {}})
    assert scaling_sim.main(["--traces", "nightly_cron", "--workers", "1"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["all_pass"] is False
    assert "1 periodic trace(s) judged" in out[-2] and "no aperiodic trace" in out[-2]
    assert "MASE by pool {'linux': 0.7}" in "\n".join(out)


def test_rounded_rounds_floats_only_for_printing():
    assert rounded({"a": 0.60041, "b": [1.23456, None, 2], "c": "x"}) == {
        "a": 0.6, "b": [1.235, None, 2], "c": "x"}
