"""`python -m chalicelib.scaler [--once] [--pool NAME] [--every SECONDS]`: scaler runs from
RUNNERHUB_* settings, each summary printed as JSON (by default a loop every 10 s)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from chalicelib.errors import ConfigurationError, DependencyUnavailable, startup_failure
from chalicelib.scaler.handler import build, run_pools
from chalicelib.scaler.settings import ScalerSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chalicelib.scaler",
                                     description="RunnerHub scaler: one run, or a loop")
    parser.add_argument("--once", action="store_true", help="one run per pool, then exit")
    parser.add_argument("--pool", action="append", default=[],
                        help="scale this pool only (repeatable; default: every pool)")
    parser.add_argument("--every", type=float, default=10.0,
                        help="seconds between runs when looping (default 10)")
    args = parser.parse_args(argv)
    if args.every <= 0:
        parser.error("--every must be positive")
    try:
        scaler = build(ScalerSettings())
    except (ConfigurationError, ValueError, DependencyUnavailable) as exc:
        # pydantic's ValidationError is a ValueError: every bad setting lands here.
        return startup_failure("runnerhub scaler", exc)
    unknown = sorted(set(args.pool) - set(scaler.pools))
    if unknown:
        print(f"runnerhub scaler: unknown pools {unknown} (pools: {sorted(scaler.pools)})",
              file=sys.stderr)
        return 2
    pools = [pool for pool in scaler.pools if not args.pool or pool in args.pool]
    while True:
        summary = run_pools(scaler, pools)
        print(json.dumps(summary, sort_keys=True), flush=True)
        if args.once:
            return 0 if summary["errors"] == 0 else 1
        try:
            time.sleep(args.every)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
