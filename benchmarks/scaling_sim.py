"""`make bench-scaling`: every policy on the judged (last) week of each of the six generated
traces (forecast/generate.py, 5 weeks, seed 0), in the simulator (forecast/simulate.py).

Prints per trace and policy p50/p95/max wait, instance-hours, utilisation and MASE, and as its
last line
`{"traces": N, "all_pass": .., "worst": {"p95_wait_ratio": .., "mase": ..}, "aperiodic":
{"p95_wait_ratio": .., "instance_hours_ratio": ..}}`: `worst` over the periodic traces
(predictive's p95 over its baseline's, and MASE), `aperiodic` against the default reactive
policy. Targets (issue 16), on every periodic trace: p95_wait_ratio <= 0.6 and MASE < 1; on the
aperiodic one both ratios <= 1.05. Exits 1 when one is missed. Never in `make test` (one
trace-week is: tests/unit/test_simulate_week.py).
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
from forecast.replay import aperiodic_pass, periodic_pass, replay_jobs, table
from forecast.traces import SIM_POOLS, TRACES

APERIODIC = "aperiodic"


def summary(results: dict[str, dict]) -> dict:
    periodic = {name: r for name, r in results.items() if name != APERIODIC}
    passes = [periodic_pass(r) for r in periodic.values()]
    if APERIODIC in results:
        passes.append(aperiodic_pass(results[APERIODIC]))

    def worst(key: str) -> float | None:
        values = [r[key] for r in periodic.values()]
        return None if not values or None in values else max(values)

    line: dict = {"traces": len(results), "all_pass": bool(passes) and all(passes),
                  "worst": {"p95_wait_ratio": worst("p95_wait_ratio"), "mase": worst("mase")}}
    if APERIODIC in results:
        line["aperiodic"] = results[APERIODIC]["default"]
    return line


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
        verdict = (aperiodic_pass(result) if name == APERIODIC else periodic_pass(result))
        print(table(result))
        print(f"  p95_wait_ratio {result['p95_wait_ratio']} (baseline {result['baseline']}), "
              f"vs default {result['default']}, forecast used for {result['forecast_used']}, "
              f"skill {result['skill_by_pool']}: {'pass' if verdict else 'MISS'} "
              f"({time.monotonic() - began:.0f} s)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    line = summary(results)
    print(json.dumps(line))
    return 0 if line["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
