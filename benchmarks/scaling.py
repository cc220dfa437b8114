"""`make bench-scaling-local`: the scaler driving the local fleet through bursts and quiet gaps.

The local fleet (devstack/fleet.py) with real runner containers: boot delay 20 s, 4 slots per
host, min 0 hosts, one pool. A seeded workload of 60 jobs in three bursts separated by quiet
gaps of at least twice the idle timeout, job durations 5-60 s. Every figure comes from ground
truth, never from RunnerHub's tables:

- reaction: a job's `queued` sent (the emulator's record) -> the group's desired capacity seen
  by the fleet's poller of the Auto Scaling API raised enough to hold it (every job GitHub had
  queued or running at that moment, at 4 per host), for each job that arrived when the group
  was too small;
- lost: the judge's (never taken, failed by GitHub's lost-runner time-out, ...);
- busy_killed: a runner container stopped (Docker's `kill`) while GitHub had it running a job,
  or still running one when its host's instance left the group (the scaler chose a busy host);
- pickup: `queued` sent -> taken, at the emulator;
- instance_s: seconds each instance spent in the group, as the fleet saw it; the ideal is the
  workload's runner-seconds / slots per host, plus one boot per burst per host that burst needs.

Prints as its last line
`{"jobs", "lost", "busy_killed", "reaction_p95_s", "pickup_p50_s", "pickup_p95_s", "instance_s",
"ideal_instance_s"}` and exits 1 when a target is missed (lost 0, busy_killed 0,
reaction_p95_s <= 5, instance_s <= 1.5 x ideal_instance_s) or the fleet does not scale back in.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

LABELS = ["self-hosted", "linux", "x64"]
REACTION_P95_TARGET_S = 5.0
INSTANCE_RATIO_TARGET = 1.5


@dataclass(frozen=True)
class Burst:
    start_s: float
    jobs: int


def burst_workload(seed: int, jobs: int = 60, bursts: int = 3, burst_span_s: float = 20.0,
                   gap_s: float = 90.0, duration_s: tuple[float, float] = (5.0, 60.0),
                   repository: str = "runnerhub-demo/svc") -> dict:
    """`jobs` jobs in `bursts` bursts, each spread over `burst_span_s`; a burst starts `gap_s`
    after the previous burst's last job could have finished (so hosts go idle in between)."""
    if bursts < 1 or jobs < bursts:
        raise ValueError("need at least one job per burst")
    rng = random.Random(seed)
    sizes = [jobs // bursts + (1 if n < jobs % bursts else 0) for n in range(bursts)]
    specs: list[dict] = []
    start = 1.0
    for number, size in enumerate(sizes):
        ends = []
        for index in range(size):
            arrival = start + rng.uniform(0, burst_span_s)
            duration = round(rng.uniform(*duration_s), 1)
            ends.append(arrival + duration)
            specs.append({"repository": f"{repository}-{index % 5}", "labels": LABELS,
                          "arrival_s": round(arrival, 3), "duration_s": duration,
                          "name": f"burst{number}-{index:02d}"})
        start = max(ends) + gap_s
    specs.sort(key=lambda spec: spec["arrival_s"])
    return {"name": "bench-scaling-local", "jobs": specs}


def bursts_of(workload: Mapping, gap_s: float) -> list[list[Mapping]]:
    """The workload's jobs grouped into bursts: a new burst starts after `gap_s` of nothing
    arriving or running."""
    groups: list[list[Mapping]] = []
    busy_until = -math.inf
    for spec in sorted(workload["jobs"], key=lambda s: s["arrival_s"]):
        if spec["arrival_s"] > busy_until + gap_s or not groups:
            groups.append([])
        groups[-1].append(spec)
        busy_until = max(busy_until, spec["arrival_s"] + spec["duration_s"])
    return groups


def peak_concurrency(specs: Iterable[Mapping]) -> int:
    edges = sorted([(s["arrival_s"], 1) for s in specs] +
                   [(s["arrival_s"] + s["duration_s"], -1) for s in specs],
                   key=lambda edge: (edge[0], edge[1]))
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def ideal_instance_s(workload: Mapping, slots: int, boot_s: float, gap_s: float) -> float:
    """Runner-seconds / slots, plus one boot per burst per host the burst needs (its peak
    concurrency / slots): what a perfectly packed, perfectly timed fleet would pay."""
    runner_s = sum(spec["duration_s"] for spec in workload["jobs"])
    boots = sum(math.ceil(peak_concurrency(burst) / slots)
                for burst in bursts_of(workload, gap_s))
    return runner_s / slots + boots * boot_s


def reactions(truth: Iterable[Mapping], desired: Sequence[tuple[float, int]],
              slots: int) -> list[float]:
    """Per job whose arrival needed more hosts than the group's desired capacity: its `queued`
    sent -> the first moment the poller saw desired capacity cover it. A job's need is the
    hosts for every job sent up to it and not completed when it was sent (the emulator's
    record: what GitHub had queued or running), at `slots` per host. `desired`: the poller's
    (time, desired capacity) samples in time order. Jobs never covered count until the last
    sample (a scaler that never reacts reports the whole wait, not nothing)."""
    jobs = sorted((job for job in truth if job.get("queued_sent_at") is not None),
                  key=lambda job: job["queued_sent_at"])
    if not desired:
        return []
    found = []
    for index, job in enumerate(jobs):
        sent = job["queued_sent_at"]
        open_jobs = sum(1 for other in jobs[:index + 1]
                        if other.get("completed_at") is None or other["completed_at"] > sent)
        need = math.ceil(open_jobs / slots)
        at_sent = [value for at, value in desired if at <= sent]
        if at_sent and at_sent[-1] >= need:
            continue  # the group already had room for it
        covered = next((at for at, value in desired if at >= sent and value >= need), None)
        found.append((covered if covered is not None else desired[-1][0]) - sent)
    return found


def verdict(figures: Mapping) -> list[str]:
    """The targets a run missed (empty: all met)."""
    missed = []
    if figures["lost"]:
        missed.append(f"lost {figures['lost']} (target 0)")
    if figures["busy_killed"]:
        missed.append(f"busy_killed {figures['busy_killed']} (target 0)")
    if figures["reaction_p95_s"] is None or figures["reaction_p95_s"] > REACTION_P95_TARGET_S:
        missed.append(f"reaction_p95_s {figures['reaction_p95_s']} "
                      f"(target <= {REACTION_P95_TARGET_S})")
    if figures["instance_s"] > INSTANCE_RATIO_TARGET * figures["ideal_instance_s"]:
        missed.append(f"instance_s {figures['instance_s']} > {INSTANCE_RATIO_TARGET} x "
                      f"ideal {figures['ideal_instance_s']}")
    return missed


def main() -> None:
    import argparse
    import json
    import sys
    import tempfile
    import time
    from pathlib import Path

    import docker

    from devstack import judge
    from devstack.docker_events import ContainerTimeline
    from devstack.fleet import LocalFleet
    from devstack.stack import LocalStack

    parser = argparse.ArgumentParser(description="the scaler and the local fleet, bursts")
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--boot-delay", type=float, default=20.0)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--idle", type=float, default=5.0, help="scaler idle timeout (s)")
    parser.add_argument("--every", type=float, default=2.0,
                        help="the scaler's scheduled runs (s); new demand triggers it at once")
    parser.add_argument("--timeout", type=float, default=1500.0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    gap_s = 2 * args.idle + 10  # quiet gaps of more than twice the idle timeout
    workload = burst_workload(args.seed, jobs=args.jobs, gap_s=gap_s)
    pools = Path(__file__).resolve().parent / "scaling_pools.toml"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="runnerhub-bench-scaling-"))
    stack = LocalStack(pools, workdir, lost_runner_timeout_s=120).start()
    startup_s = stack.emulator.runner_startup_s  # the stand-in's own: none modelled
    fleet = LocalFleet(stack, boot_delay_s=args.boot_delay, slots=args.slots,
                       executor_env={"RUNNERHUB_IDLE_TIMEOUT_S": "60"}).start()
    timeline = ContainerTimeline(docker.from_env())
    try:
        fleet.start_scaler(every_s=args.every, idle_s=args.idle)
        rules = judge.read_pools(pools)
        plan = judge.plan_workload(workload, stack.emulator.load_workload(workload), rules)
        started = time.monotonic()
        stack.emulator.run_workload()

        def unsettled() -> list[int]:
            truth = {job["job_id"]: job for job in stack.emulator.jobs()}
            return judge.settled(plan, truth, stack.records())

        stack.wait_for(lambda: not unsettled(), args.timeout, 2.0)
        left = unsettled()
        scaled_in = stack.wait_for(lambda: not fleet.live("bench"), args.idle + 60, 1.0)
        print(f"workload done in {time.monotonic() - started:.0f}s; logs {workdir}",
              file=sys.stderr)
        truth = {job["job_id"]: job for job in stack.emulator.jobs()}
        hosts = set(fleet.instances)
        events = [e for e in timeline.close() if e.host in hosts]
        verdict_ = judge.judge(plan, truth, stack.records(), rules, events,
                               {host: args.slots for host in hosts}, timed_out=len(left))
        desired = [(s.at, s.desired) for s in fleet.samples if s.pool == "bench"]
        killed = {**judge.busy_killed(events, truth),
                  **judge.busy_at_termination(events, truth, fleet.terminated())}
        pickups = [p for p in map(judge.pickup_s, truth.values()) if p is not None]
        # The raw ground truth beside the logs, for a look at any figure.
        (workdir / "ground-truth.json").write_text(json.dumps({
            "jobs": list(truth.values()),
            "desired": desired,
            "terminated": fleet.terminated(),
        }, default=str))
        for row in fleet.hosts_over_time(every_s=15.0):
            print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr)
    finally:
        fleet.stop()
        stack.stop()
    figures = {
        "jobs": len(plan),
        "lost": len(verdict_.lost) + verdict_.timed_out,
        "busy_killed": len(killed),
        "reaction_p95_s": _round(judge.percentile(
            reactions(truth.values(), desired, args.slots), 0.95)),
        "pickup_p50_s": _round(judge.percentile(pickups, 0.5)),
        "pickup_p95_s": _round(judge.percentile(pickups, 0.95)),
        "runner_startup_s": startup_s,
        "instance_s": round(fleet.instance_seconds(), 1),
        "ideal_instance_s": round(ideal_instance_s(workload, args.slots, args.boot_delay,
                                                   gap_s=2 * args.idle), 1),
    }
    waits = sorted(round(r, 2) for r in reactions(truth.values(), desired, args.slots))
    print(f"reactions (s): {waits}", file=sys.stderr)
    missed = verdict(figures)
    if not scaled_in:
        missed.append("the fleet did not scale back in to its minimum (0 hosts)")
    for text in missed:
        print(f"MISSED: {text}", file=sys.stderr)
    print(json.dumps(figures))
    sys.exit(1 if missed else 0)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


if __name__ == "__main__":
    main()
