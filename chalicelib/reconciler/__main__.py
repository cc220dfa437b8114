"""`python -m chalicelib.reconciler [--every SECONDS]`: one reconciler run (or a loop) from
RUNNERHUB_* settings, each summary printed as JSON. The CLI is outside the library, so the
library never imports the wiring that builds it."""

from __future__ import annotations

import argparse
import json
import sys
import time

from chalicelib import wiring
from chalicelib.errors import ConfigurationError, DependencyUnavailable, startup_failure
from chalicelib.reconciler.common import logger
from chalicelib.reconciler.settings import ReconcilerSettings


def main(argv: list[str] | None = None) -> int:
    """Run once (or every N seconds) from RUNNERHUB_* settings; print each summary as JSON."""
    parser = argparse.ArgumentParser(prog="python -m chalicelib.reconciler",
                                     description="RunnerHub reconciler: one run, or a loop")
    parser.add_argument("--every", type=float, default=0.0,
                        help="run every SECONDS until interrupted (default: once)")
    args = parser.parse_args(argv)
    try:
        reconciler = wiring.build_reconciler(ReconcilerSettings())
    except (ConfigurationError, ValueError, DependencyUnavailable) as exc:
        # pydantic's ValidationError is a ValueError: every bad setting lands here.
        return startup_failure("runnerhub reconciler", exc)
    while True:
        try:
            summary = reconciler.run()
        except DependencyUnavailable as exc:
            # AWS or GitHub unreachable for the whole run (e.g. the lease could not be taken):
            # nothing was decided; a loop tries again next period, as the schedule would.
            logger.warning("reconcile run failed: %s", exc)
            if args.every <= 0:
                return 1
            time.sleep(args.every)
            continue
        print(json.dumps(summary.as_dict(), sort_keys=True), flush=True)
        if args.every <= 0:
            return 0 if summary.errors == 0 else 1
        try:
            time.sleep(args.every)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
