"""`make demo`: the whole system on one machine, a sample workload, a per-job table, a summary.

    python -m devstack.demo [--workload FILE] [--pools FILE] [--slots N] [--timeout S]
                            [--boot-delay S] [--idle S] [--keep]

Starts the moto server, the webhook app over HTTP, the GitHub emulator, the scaler and the
local fleet (devstack/fleet.py: each pool's Auto Scaling group in moto, at its minimum of 0
hosts; an instance becomes an executor daemon after the boot delay), replays the workload in
real Docker containers from the locally built runner images, waits for the fleet to scale back
in, and prints one row per job, the hosts per pool over time, and as its last line the judge's
summary (devstack/judge.py): `jobs`, `completed`, `lost`, `stuck`, `over_commit`, `timed_out`,
`busy_killed`, `cross_pool`, `pickup_p50_s`, `pickup_p95_s`, `pickup_by_pool`, `instance_s`,
`ideal_instance_s`. The judge reads the workload's plan, the pools file (its own routing rule,
not RunnerHub's), the emulator's record and Docker's events; the hosts come from the Auto
Scaling API. Stops everything it started and exits 1 on any failure count.

The dashboard (the management API's page) is printed as a URL at the start, signed in as admin
by a local token in its fragment; `--keep` (`make demo KEEP=1`) keeps the stack up after the
summary, to look at it, until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from chalicelib.jobs import stage_latencies
from chalicelib.pools import DEFAULT_POOLS_FILE
from devstack import judge
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


def pool_rules(stack: LocalStack) -> list[judge.PoolRule]:
    return judge.read_pools(stack.pools_file or DEFAULT_POOLS_FILE)


def outcomes(stack: LocalStack, plan: list[judge.PlannedJob] | None = None
             ) -> list[JobOutcome]:
    """The emulator's ground truth per job, its pool from the plan (else by the judge's own
    routing rule), beside RunnerHub's record."""
    rules = pool_rules(stack) if plan is None else []
    planned = {p.job_id: p.pool for p in plan or ()}
    records = stack.records()
    return [JobOutcome(
        job_id=job["job_id"],
        pool=planned[job["job_id"]] if job["job_id"] in planned else judge.expected_pool(
            rules, job["labels"], job["repository"], job.get("private", True)),
        status=job["status"],
        conclusion=job.get("conclusion"),
        runner=job.get("runner_name"),
        pickup_s=judge.pickup_s(job),
        record=records.get(job["job_id"]),
    ) for job in stack.emulator.jobs()]


def summary(found: list[JobOutcome], verdict: judge.Verdict | None = None) -> dict:
    pickups = [o.pickup_s for o in found if o.pool and o.pickup_s is not None]
    result = {
        "jobs": len(found),
        "completed": sum(o.status == "completed" for o in found),
        "lost": sum(o.lost for o in found) if verdict is None else len(verdict.lost),
        "pickup_p50_s": _round(judge.percentile(pickups, 0.5)),
        "pickup_p95_s": _round(judge.percentile(pickups, 0.95)),
    }
    if verdict is not None:
        counts = verdict.counts()
        result.update({k: counts[k] for k in
                       ("stuck", "over_commit", "timed_out", "cross_pool", "pickup_by_pool")})
        result["served"] = verdict.jobs
    return result


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
        workdir: Path, boot_delay_s: float = 5.0, idle_s: float = 15.0,
        keep: bool = False) -> int:
    import docker

    from benchmarks.scaling import ideal_instance_s
    from devstack.docker_events import ContainerTimeline
    from devstack.fleet import LocalFleet

    spec = json.loads(Path(workload).read_text())
    stack = LocalStack(pools_file, workdir).start()
    startup_s = stack.emulator.runner_startup_s
    fleet = LocalFleet(stack, boot_delay_s=boot_delay_s, slots=slots,
                       executor_env={"RUNNERHUB_IDLE_TIMEOUT_S": "20"}).start()
    timeline = ContainerTimeline(docker.from_env())
    finished = False
    try:
        print(f"dashboard (admin): {stack.dashboard_url('admin')}", file=sys.stderr,
              flush=True)
        scaler = fleet.start_scaler(every_s=10.0, idle_s=idle_s)
        rules = pool_rules(stack)
        plan = judge.plan_workload(spec, stack.emulator.load_workload(spec), rules)
        started = time.monotonic()
        stack.emulator.run_workload()

        def unsettled() -> list[int]:
            truth = {job["job_id"]: job for job in stack.emulator.jobs()}
            return judge.settled(plan, truth, stack.records())

        # Done when every job a pool should serve is completed at the emulator and RunnerHub
        # agrees (jobs that are not ours stay queued at GitHub: nobody serves them).
        done = stack.wait_for(lambda: not unsettled(), timeout_s=timeout_s, interval_s=1.0)
        left = unsettled()
        finished_s = time.monotonic() - started
        # Then scale-in: every pool back to its minimum (0) once its hosts have been idle.
        scaled_in = stack.wait_for(
            lambda: not any(fleet.live(pool) for pool in stack.pools.names),
            timeout_s=idle_s + 60, interval_s=1.0)
        found = outcomes(stack, plan)
        truth = {job["job_id"]: job for job in stack.emulator.jobs()}
        hosts = set(fleet.instances)
        events = [e for e in timeline.close() if e.host in hosts]
        verdict = judge.judge(plan, truth, stack.records(), rules, events,
                              {host: slots for host in hosts}, timed_out=len(left))
        killed = {**judge.busy_killed(events, truth),
                  **judge.busy_at_termination(events, truth, fleet.terminated())}
        print(table(found))
        print("\nhosts per pool over time (Auto Scaling group instances):")
        for row in fleet.hosts_over_time(every_s=10.0):
            print("  " + "  ".join(f"{k}={v}" for k, v in row.items()))
        print(f"\nworkload {'finished' if done else 'TIMED OUT'} in {finished_s:.1f}s; "
              f"fleet {'back to its minimum' if scaled_in else 'NOT scaled in'}; "
              f"logs: {workdir}", file=sys.stderr)
        if not verdict.ok or killed or not scaled_in:
            print(json.dumps({"lost": verdict.lost, "stuck": verdict.stuck,
                              "busy_killed": killed, "unsettled": left,
                              "fleet_errors": fleet.errors,
                              "scaler_alive": scaler.alive()}, indent=1), file=sys.stderr)
        finished = True
    finally:
        fleet.stop()
        if not (keep and finished):
            stack.stop()
    result = summary(found, verdict)
    # Pickup figures state the runner start-up they ran with (the stand-in's own, none added).
    result["runner_startup_s"] = startup_s
    result["busy_killed"] = len(killed)
    result["scaled_in"] = scaled_in
    result["instance_s"] = round(fleet.instance_seconds(), 1)
    served = {p.job_id for p in plan if p.pool is not None}
    result["ideal_instance_s"] = round(sum(
        ideal_instance_s({"jobs": [j for j, p in zip(spec["jobs"], plan, strict=True)
                                   if p.pool == pool and p.job_id in served]},
                         slots, boot_delay_s, gap_s=2 * idle_s)
        for pool in {p.pool for p in plan if p.pool is not None}), 1)
    print(json.dumps(result), flush=True)
    if keep:
        try:
            hold(stack.dashboard_url("admin"))
        finally:
            stack.stop()
    return 0 if verdict.ok and not killed and scaled_in else 1


def hold(url: str) -> None:
    """Keep the stack up (the API, the tables, the emulator) until Ctrl-C or SIGTERM."""
    print(f"\nthe stack stays up (--keep); dashboard (admin): {url}\nCtrl-C to stop",
          file=sys.stderr, flush=True)
    stopped = threading.Event()
    # Both set explicitly: a shell's background job inherits SIGINT ignored.
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stopped.set())
    stopped.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD)
    parser.add_argument("--pools", type=Path, default=None, help="default: the bundled pools")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--workdir", type=Path, default=None, help="logs (default: a temp dir)")
    parser.add_argument("--boot-delay", type=float, default=5.0,
                        help="seconds from an instance's launch to its daemon (default 5)")
    parser.add_argument("--idle", type=float, default=15.0,
                        help="seconds a host stays idle before the scaler retires it")
    parser.add_argument("--keep", action="store_true",
                        help="keep the stack up after the summary (the dashboard) until Ctrl-C")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="runnerhub-demo-"))
    sys.exit(run(args.workload, args.pools, args.slots, args.timeout, workdir,
                 args.boot_delay, args.idle, args.keep))


if __name__ == "__main__":
    main()
