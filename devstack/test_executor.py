"""`python -m devstack.test_executor [--start-delay-s S] [--register-only]`: the executor daemon
with a launcher for tests and benchmarks; configured like `python -m executor` otherwise.

- `--start-delay-s S`: hold each claim S seconds before starting its runner, so the resilience
  tests can catch a host holding unstarted claims (tests/e2e/test_executor_resilience.py);
- `--register-only`: register each JIT runner with GitHub but start no container; the demand
  counts as met and the slot is free again (benchmarks/dispatch.py)."""

from __future__ import annotations

import argparse
import sys
from functools import partial

from chalicelib import jobs as moves
from chalicelib.demand import DemandMessage
from chalicelib.jobs import Change
from chalicelib.runners import RunnerState
from executor.__main__ import main
from executor.launch import Launcher
from executor.messages import Ack, Disposition


class HarnessLauncher(Launcher):
    def __init__(self, *args, start_delay_s: float = 0.0, register_only: bool = False) -> None:
        super().__init__(*args)
        self.start_delay_s = start_delay_s
        self.register_only = register_only

    def before_start(self, message: DemandMessage) -> None:
        if self.start_delay_s:
            self.ctx.stopping.wait(self.start_delay_s)

    def registered(self, message, name, jit, claimed_at, jit_at) -> Disposition | None:
        if not self.register_only:
            return None
        self.ctx.jobs.apply(message.job_id, moves.START_RUNNER, jit_at,
                            Change(fields={"started_runner": name}),
                            generation=message.generation, host_id=self.ctx.host_id)
        self.ctx.runners.move(name, RunnerState.GONE, jit_at, runner_id=jit.runner_id,
                              reason="register_only", jit_s=round(jit_at - claimed_at, 3))
        self.ctx.metrics.started.labels(message.pool).inc()
        return Ack()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m devstack.test_executor")
    parser.add_argument("--start-delay-s", type=float, default=0.0)
    parser.add_argument("--register-only", action="store_true")
    args = parser.parse_args()
    sys.exit(main(partial(HarnessLauncher, start_delay_s=args.start_delay_s,
                          register_only=args.register_only)))
