"""`make bench-pickup`: pickup latency with one new container per job (no warm runners).

Jobs arrive as a Poisson process (0.5 jobs/s, seeded), run 5 s each, on one executor host with
6 slots. Pickup = the emulator's `queued` sent -> job taken by a runner (its ground truth).
Asserted: exactly one new runner container per job, each created after that job's `queued` was
sent (Docker's own event log). Prints as its last line:

    {"jobs": N, "pickup_p50_s": .., "pickup_p95_s": .., "container_start_p50_s": ..,
     "stages": {"webhook": .., "enqueue": .., "claim": .., "jit": .., "container_start": ..,
                "runner_boot_to_job_taken": ..}}

Stages are p50s: webhook = queued sent -> job written; enqueue = written -> demand sent;
claim = demand sent -> claimed by the executor (negative when the claim beats the `dispatched`
write); jit = claim -> JIT config from GitHub;
container_start = the Docker create+start call; runner_boot_to_job_taken = container started ->
the runner registered, polled and took its job.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import docker

from devstack.docker_events import DockerEventLog
from devstack.judge import percentile
from devstack.stack import LocalStack

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["self-hosted", "linux", "x64"]


def poisson_workload(jobs: int, rate_per_s: float, duration_s: float, seed: int) -> dict:
    rng = random.Random(seed)
    arrival, specs = 1.0, []
    for index in range(jobs):
        arrival += rng.expovariate(rate_per_s)
        specs.append({"repository": f"runnerhub-demo/svc-{index % 5}", "labels": LABELS,
                      "arrival_s": round(arrival, 3), "duration_s": duration_s,
                      "name": f"bench-{index}"})
    return {"name": "bench-pickup", "jobs": specs}


def p50(values: list[float]) -> float | None:
    found = percentile([v for v in values if v is not None], 0.5)
    return None if found is None else round(found, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description="pickup latency benchmark")
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--rate", type=float, default=0.5, help="arrivals per second")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per job")
    parser.add_argument("--slots", type=int, default=6)
    parser.add_argument("--seed", type=int, default=20261127)
    args = parser.parse_args()
    client = docker.from_env()
    workdir = Path(tempfile.mkdtemp(prefix="runnerhub-bench-pickup-"))
    stack = LocalStack(None, workdir).start()
    try:
        stack.start_executor("bench-host", RUNNERHUB_SLOTS=str(args.slots),
                             RUNNERHUB_IDLE_TIMEOUT_S="30")
        time.sleep(2.0)  # the executor's first long polls are in place
        began = time.time()
        events = DockerEventLog(client, "create", "bench-host")
        ids = stack.emulator.load_workload(poisson_workload(args.jobs, args.rate,
                                                            args.duration, args.seed))
        stack.emulator.run_workload()
        limit = args.jobs / args.rate + args.duration + 120
        if not stack.wait_for(lambda: all(stack.emulator.job(i)["status"] == "completed"
                                          for i in ids), timeout_s=limit, interval_s=1.0):
            raise SystemExit(f"not every job completed within {limit:.0f}s; logs in {workdir}")
        creates = {name: at for name, (at, _) in events.close().items()}
        jobs = [stack.emulator.job(i) for i in ids]
        records = stack.records()
        runners = stack.runner_records()
    finally:
        stack.stop()

    # exactly one new container per job, created after that job's queued was sent
    problems = []
    if len(creates) != len(jobs):
        problems.append(f"{len(creates)} containers for {len(jobs)} jobs")
    for job in jobs:
        created = creates.get(job["runner_name"])
        if created is None or created < job["queued_sent_at"]:
            problems.append(f"job {job['job_id']}: runner {job['runner_name']} created "
                            f"{created} before queued {job['queued_sent_at']}")
    if problems:
        for job in jobs:
            print(job["job_id"], round(job["queued_sent_at"] - began, 2), job["runner_name"],
                  round(creates.get(job["runner_name"], 0) - began, 2),
                  round(job["taken_at"] - began, 2), file=sys.stderr)
        raise SystemExit("assertion failed: " + "; ".join(problems[:5]))

    pickups = [job["taken_at"] - job["queued_sent_at"] for job in jobs]
    stages: dict[str, list[float]] = {k: [] for k in (
        "webhook", "enqueue", "claim", "jit", "container_start", "runner_boot_to_job_taken")}
    for job in jobs:
        record = records[job["job_id"]]
        runner = runners.get(job["runner_name"], {})
        stages["webhook"].append(record["received_at"] - job["queued_sent_at"])
        stages["enqueue"].append(record.get("dispatched_at", record["received_at"])
                                 - record["received_at"])
        if record.get("claimed_at") and record.get("dispatched_at"):
            # Negative when the executor claimed before the webhook wrote `dispatched` (the
            # message is on the queue before that write); kept as is, not clamped.
            stages["claim"].append(record["claimed_at"] - record["dispatched_at"])
        stages["jit"].append(runner.get("jit_s"))
        stages["container_start"].append(runner.get("container_start_s"))
        if runner.get("idle_at"):
            stages["runner_boot_to_job_taken"].append(job["taken_at"] - runner["idle_at"])
    result = {
        "jobs": len(jobs),
        "pickup_p50_s": round(percentile(pickups, 0.5), 3),
        "pickup_p95_s": round(percentile(pickups, 0.95), 3),
        "container_start_p50_s": p50(stages["container_start"]),
        "stages": {name: p50(values) for name, values in stages.items()},
    }
    print(f"logs: {workdir}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
