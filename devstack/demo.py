"""`make demo`: the whole system on one machine, a sample workload, a per-job table, a summary.

    python -m devstack.demo [--workload FILE] [--pools FILE] [--slots N] [--timeout S]

Starts the moto server, the webhook app over HTTP, the GitHub emulator and one executor (real
Docker containers from the locally built runner images), replays the workload, prints one row
per job and, as its last line, `{"jobs", "completed", "lost", "pickup_p50_s", "pickup_p95_s"}`
where lost counts routable jobs the emulator (the ground truth) never saw completed. Stops
everything it started and exits 1 if any job was lost.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from chalicelib.jobs import stage_latencies
from chalicelib.pools import PoolConfig, route
from devstack.stack import LocalStack

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKLOAD = ROOT / "devstack" / "workloads" / "demo.json"


@dataclass(frozen=True)
class JobOutcome:
    job_id: int
    pool: str | None  # None: not routable, not ours
    status: str
    conclusion: str | None
    runner: str | None
    pickup_s: float | None
    record: dict | None

    @property
    def lost(self) -> bool:
        return self.pool is not None and self.status != "completed"


def outcomes(stack: LocalStack, pools: PoolConfig) -> list[JobOutcome]:
    """Join the emulator's ground truth with RunnerHub's records."""
    records = stack.records()
    found = []
    for job in stack.emulator.jobs():
        owner, repo = job["repository"].split("/", 1)
        decision = route(pools, job["labels"], owner, repo, job.get("private", True))
        pickup = None
        if job.get("taken_at") and job.get("queued_sent_at"):
            pickup = job["taken_at"] - job["queued_sent_at"]
        found.append(JobOutcome(
            job_id=job["job_id"],
            pool=decision.pool.name if decision.pool else None,
            status=job["status"],
            conclusion=job.get("conclusion"),
            runner=job.get("runner_name"),
            pickup_s=pickup,
            record=records.get(job["job_id"]),
        ))
    return found


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def summary(found: list[JobOutcome]) -> dict:
    pickups = [o.pickup_s for o in found if o.pool and o.pickup_s is not None]
    return {
        "jobs": len(found),
        "completed": sum(o.status == "completed" for o in found),
        "lost": sum(o.lost for o in found),
        "pickup_p50_s": _round(percentile(pickups, 0.5)),
        "pickup_p95_s": _round(percentile(pickups, 0.95)),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def table(found: list[JobOutcome]) -> str:
    header = (f"{'job':>12}  {'pool':<12} {'runner':<24} {'pickup':>7}  {'state':<10} "
              f"{'conclusion':<10} stages (s)")
    rows = [header, "-" * len(header)]
    for o in sorted(found, key=lambda o: o.job_id):
        record = o.record or {}
        stages = " ".join(f"{k.replace('_to_', '>')}={v}" for k, v in
                          stage_latencies(record).items())
        rows.append(
            f"{o.job_id:>12}  {o.pool or '(not ours)':<12} {(o.runner or '-'):<24} "
            f"{(f'{o.pickup_s:.2f}' if o.pickup_s is not None else '-'):>7}  "
            f"{record.get('state', '-'):<10} {(o.conclusion or '-'):<10} {stages}"
        )
    return "\n".join(rows)


def run(workload: Path, pools_file: Path | None, slots: int, timeout_s: float,
        workdir: Path) -> int:
    stack = LocalStack(pools_file, workdir).start()
    try:
        executor = stack.start_executor("demo-host", RUNNERHUB_SLOTS=str(slots),
                                        RUNNERHUB_IDLE_TIMEOUT_S="20")
        stack.emulator.load_workload(workload)
        started = time.monotonic()
        stack.emulator.run_workload()
        # Done when every routable job is completed at the emulator and in RunnerHub's records
        # (jobs that are not ours stay queued at GitHub: nobody serves them).
        done = stack.wait_for(lambda: all(
            o.status == "completed" and (o.record or {}).get("state") == "completed"
            for o in outcomes(stack, stack.pools) if o.pool
        ), timeout_s=timeout_s, interval_s=1.0)
        found = outcomes(stack, stack.pools)
        print(table(found))
        print(f"\nworkload {'finished' if done else 'TIMED OUT'} in "
              f"{time.monotonic() - started:.1f}s; executor log: {executor.log_path}",
              file=sys.stderr)
    finally:
        stack.stop()
    result = summary(found)
    print(json.dumps(result))
    return 1 if result["lost"] else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD)
    parser.add_argument("--pools", type=Path, default=None, help="default: the bundled pools")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--workdir", type=Path, default=None, help="logs (default: a temp dir)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="runnerhub-demo-"))
    sys.exit(run(args.workload, args.pools, args.slots, args.timeout, workdir))


if __name__ == "__main__":
    main()
