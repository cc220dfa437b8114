"""`make bench-scaling`: every policy on the judged (last) week of each of the six generated
traces (forecast/generate.py, 5 weeks, seed 0), in the simulator (forecast/simulate.py).

Prints per trace and policy p50/p95/max wait, instance-hours, utilisation and MASE, and as its
last line
`{"traces": N, "all_pass": .., "worst": {"p95_wait_ratio": .., "mase": ..}, "aperiodic":
{"p95_wait_ratio": .., "instance_hours_ratio": ..}}`: `worst` over the periodic traces
(predictive's p95 over its baseline's, and MASE), `aperiodic` against the default reactive
policy. Targets (issue 16), on every periodic trace: p95_wait_ratio <= 0.6 and MASE < 1; on the
aperiodic one both ratios <= 1.05; the ratios and MASE are compared unrounded. Exits 1 when one
is missed, or when it judged no aperiodic trace or fewer than five periodic ones (`--traces`
a subset; the line before the JSON says why). Never in `make test` (one trace-week is:
tests/unit/test_simulate_week.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from chalicelib.pools import load_pools
from forecast.generate import generate
from forecast.replay import (
    APERIODIC,
    MIN_PERIODIC_TRACES,
    aperiodic_misses,
    periodic_misses,
    replay_jobs,
    rounded,
    summary,
    table,
    verdict,
)
from forecast.traces import SIM_POOLS, TRACES

__all__ = ["APERIODIC", "main", "summary"]  # summary: forecast/replay.py's, shared with replay


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling_sim")
    parser.add_argument("--traces", default=",".join(TRACES),
                        help="comma-separated trace names (default: all six)")
    parser.add_argument("--weeks", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, help="also write every trace's full result here")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.traces.split(",") if n.strip()]
    unknown = [n for n in names if n not in TRACES]
    if unknown or not names:
        parser.error(f"unknown trace(s) {unknown}: choose from {', '.join(TRACES)}")
    pools = load_pools(SIM_POOLS)
    results = {}
    for name in names:
        began = time.monotonic()
        jobs = generate(name, seed=args.seed, weeks=args.weeks)
        result = replay_jobs(jobs, pools, name=name, seed=args.seed, workers=args.workers)
        results[name] = result
        misses = (aperiodic_misses(result) if name == APERIODIC else periodic_misses(result))
        shown = rounded(result)
        print(table(result))
        print(f"  p95_wait_ratio {shown['p95_wait_ratio']} (baseline {result['baseline']}), "
              f"vs default {shown['default']}, forecast used for {result['forecast_used']}, "
              f"skill {shown['skill_by_pool']}, MASE by pool {shown['mase_by_pool']}: "
              f"{'MISS: ' + '; '.join(misses) if misses else 'pass'} "
              f"({time.monotonic() - began:.0f} s)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    # all_pass also needs the aperiodic trace and MIN_PERIODIC_TRACES periodic ones judged.
    line, misses = verdict(results, (APERIODIC,), min_periodic=MIN_PERIODIC_TRACES)
    if misses:
        print("verdict: MISS: " + "; ".join(misses))
    print(json.dumps(line))
    return 0 if line["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
