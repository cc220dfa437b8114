"""The fault suite: a workload under combined faults, counted against ground truth.

    python -m devstack.chaos --profile long     # `make chaos`: 200 jobs, every fault at once
    python -m devstack.chaos --profile short    # what `make test` runs (tests/e2e/test_chaos.py)

Faults, together: the emulator drops, duplicates and reorders webhook deliveries and fails a
share of GitHub API calls with 5xx; an executor is SIGKILLed (its containers keep running) and
restarted under the same host id; the AWS endpoint is cut by a TCP proxy for a while (moto keeps
its state). Two executors and the reconciler (looping) run throughout.

Counted against the emulator's ground truth and Docker's own listing, not RunnerHub's records:
- lost: a routable job the emulator never saw taken and never completed;
- stuck: a job whose RunnerHub state disagrees with the emulator's final state one reconciler
  period after the workload ends;
- leaked_containers / leaked_runners: RunnerHub's containers (Docker) and `rh-` runners (the
  emulator) left after the executors drained.
The last line printed is the JSON summary; the run fails (exit 1) when anything was lost, stuck
or leaked, or when a fault kind was injected less than half as often as configured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from devstack.demo import outcomes
from devstack.stack import LocalStack

ROOT = Path(__file__).resolve().parent.parent
POOLS = ROOT / "tests" / "fixtures" / "pools" / "e2e.toml"


@dataclass(frozen=True)
class Profile:
    jobs: int
    spread_s: float  # arrivals over this long
    drop: float
    duplicate: float
    reorder: float
    api_5xx: float
    kills: int
    outage_s: float
    reconcile_every_s: float = 10.0
    slots: int = 4


PROFILES = {
    "long": Profile(jobs=200, spread_s=150, drop=0.10, duplicate=0.05, reorder=0.05,
                    api_5xx=0.05, kills=2, outage_s=20),
    "short": Profile(jobs=40, spread_s=30, drop=0.10, duplicate=0.10, reorder=0.10,
                     api_5xx=0.05, kills=1, outage_s=5),
}


@dataclass
class Injected:
    kills: int = 0
    outage_s: float = 0.0
    log: list[str] = field(default_factory=list)

    def note(self, what: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S')} {what}")
        print(f"chaos: {what}", file=sys.stderr, flush=True)


def workload(profile: Profile, seed: int) -> dict:
    rng = random.Random(seed)
    jobs = []
    for index in range(profile.jobs):
        pool = ("alpha", "beta", "gamma")[index % 3]
        repo = "runnerhub-e2e/ml" if pool == "gamma" else f"runnerhub-e2e/svc-{index % 4}"
        jobs.append({
            "repository": repo, "labels": ["self-hosted", pool],
            "arrival_s": round(rng.uniform(0, profile.spread_s), 2),
            "duration_s": round(rng.uniform(1.0, 3.0), 1),
            "conclusion": "failure" if index % 13 == 7 else "success",
            "name": f"chaos-{index}",
        })
    return {"name": "chaos", "jobs": jobs}


def faults(profile: Profile, seed: int) -> dict:
    return {
        "seed": seed,
        # Holding `in_progress` back lets `completed` (jobs last 1-3 s) overtake it; a held
        # `queued` is only overtaken when a spare runner takes the job meanwhile.
        "webhooks": {"drop": profile.drop, "duplicate": profile.duplicate,
                     "reorder": profile.reorder, "reorder_actions": ["in_progress"]},
        # Only what runners and the control plane call; the runner protocol itself is not
        # GitHub's REST API and is never faulted.
        "api": {"error_share": profile.api_5xx},
    }


def run(profile: Profile, workdir: Path, seed: int = 7) -> dict:
    import docker

    client = docker.from_env()
    stack = LocalStack(POOLS, workdir, lost_runner_timeout_s=20, outage_proxy=True,
                       emulator_options={"faults": faults(profile, seed)}).start()
    injected = Injected()
    executor_env = {"RUNNERHUB_SLOTS": str(profile.slots), "RUNNERHUB_LEASE_S": "15",
                    "RUNNERHUB_IDLE_TIMEOUT_S": "15", "RUNNERHUB_START_BACKOFF_S": "1",
                    "RUNNERHUB_MAX_START_BACKOFF_S": "10", "RUNNERHUB_DRAIN_TIMEOUT_S": "60"}
    # Unique per run: two runs on one Docker engine never see each other's containers.
    run_id = uuid.uuid4().hex[:4]
    hosts = [f"chaos-{run_id}-a", f"chaos-{run_id}-b"]
    try:
        executors = {host: stack.start_executor(host, **executor_env) for host in hosts}
        reconciler = stack.start_reconciler(
            profile.reconcile_every_s, RUNNERHUB_STUCK_AFTER_S="30",
            RUNNERHUB_DISPATCHED_STUCK_AFTER_S="30", RUNNERHUB_REDELIVER_EVERY_S="60",
            RUNNERHUB_ORPHAN_GRACE_S="30", RUNNERHUB_RECONCILER_LEASE_S="10",
        )
        # Like systemd's Restart=always on the hosts (infra/): an executor that exits (e.g. it
        # could not reach AWS at start) is started again under its host id.
        supervising = threading.Event()

        def supervise() -> None:
            while not supervising.wait(1.0):
                for host in hosts:
                    if not executors[host].alive() and not killing.is_set():
                        injected.note(f"executor {host} exited "
                                      f"({executors[host].process.returncode}); restarting")
                        executors[host] = stack.start_executor(host, **executor_env)

        killing = threading.Event()
        supervisor = threading.Thread(target=supervise, daemon=True)
        supervisor.start()
        time.sleep(2.0)
        stack.emulator.load_workload(workload(profile, seed))
        stack.emulator.run_workload()
        began = time.monotonic()

        # Kills spread over the arrivals; the outage in the middle.
        plan = sorted(
            [(profile.spread_s * (k + 1) / (profile.kills + 1), "kill") for k in
             range(profile.kills)] + [(profile.spread_s * 0.5 + 3, "outage")])
        for at, what in plan:
            time.sleep(max(0.0, at - (time.monotonic() - began)))
            if what == "kill":
                killing.set()
                victim = hosts[injected.kills % 2]
                child = executors[victim]
                running = len(client.containers.list(
                    filters={"label": f"runnerhub.host={victim}"}))
                child.process.send_signal(signal.SIGKILL)
                child.process.wait()
                injected.kills += 1
                injected.note(f"SIGKILL executor {victim} ({running} of its containers "
                              "running, left running)")
                time.sleep(3.0)
                executors[victim] = stack.start_executor(victim, **executor_env)
                injected.note(f"restarted executor {victim}")
                killing.clear()
            else:
                injected.note(f"AWS endpoint down for {profile.outage_s:.0f}s")
                stack.aws_proxy.outage(profile.outage_s, wait=False)

        def settled() -> bool:
            found = outcomes(stack, stack.pools)
            return all(o.status == "completed" and (o.record or {}).get("state") == "completed"
                       and (o.record or {}).get("conclusion") == o.conclusion
                       for o in found if o.pool)

        limit = profile.spread_s + 240
        stack.wait_for(settled, timeout_s=max(0.0, limit - (time.monotonic() - began)),
                       interval_s=2.0)
        # One reconciler period after the workload ends: RunnerHub must agree by now.
        time.sleep(profile.reconcile_every_s)
        found = outcomes(stack, stack.pools)
        lost = [o.job_id for o in found
                if o.pool and o.status != "completed" and o.runner is None]
        stuck = [o.job_id for o in found if o.pool and not (
            (o.record or {}).get("state") == ("completed" if o.status == "completed"
                                              else (o.record or {}).get("state"))
            and (o.status != "completed" or (o.record or {}).get("conclusion") == o.conclusion)
        )]
        supervising.set()
        supervisor.join(5)
        for host in hosts:
            stack.stop_child(executors[host], timeout_s=90)
        stack.stop_child(reconciler, timeout_s=30)
        leaked_containers = [c.name for c in client.containers.list(
            all=True, filters={"label": "runnerhub.managed=true"})
            if c.labels.get("runnerhub.host") in hosts]
        leaked_runners = [r["name"] for r in stack.emulator.runners()
                          if r["name"].startswith("rh-")]
        report = stack.emulator.faults_report()
        summaries = [json.loads(line) for line in reconciler.log().splitlines()
                     if line.startswith("{") and '"redelivered"' in line]
        injected.outage_s = stack.aws_proxy.outage_seconds
        result = {
            "jobs": len([o for o in found if o.pool]),
            "lost": len(lost),
            "stuck": len(stuck),
            "leaked_containers": len(leaked_containers),
            "leaked_runners": len(leaked_runners),
            "injected": {
                "dropped": report["injected"].get("dropped", 0),
                "duplicated": report["injected"].get("duplicated", 0),
                "reordered": report["injected"].get("reordered", 0),
                "api_5xx": report["injected"].get("api_5xx", 0),
                "kills": injected.kills,
                "outage_s": round(injected.outage_s, 1),
            },
            "redelivered": sum(s.get("redelivered", 0) for s in summaries),
            "re_demanded": sum(s.get("re_demanded", 0) for s in summaries),
        }
        problems = list(report.get("problems", []))
        if profile.kills and injected.kills < profile.kills:
            problems.append(f"kills: {injected.kills} of {profile.kills}")
        if profile.outage_s and injected.outage_s < profile.outage_s / 2:
            problems.append(f"outage: {injected.outage_s:.1f}s of {profile.outage_s}s")
        detail = {"lost": lost, "stuck": stuck[:20], "leaked_containers": leaked_containers,
                  "leaked_runners": leaked_runners, "fault_shortfall": problems,
                  "injections": injected.log, "logs": str(workdir)}
        print(json.dumps(detail, indent=1), file=sys.stderr)
        result["ok"] = not (lost or stuck or leaked_containers or leaked_runners or problems)
        return result
    finally:
        with contextlib.suppress(Exception):
            stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="long")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="runnerhub-chaos-"))
    result = run(PROFILES[args.profile], workdir, args.seed)
    ok = result.pop("ok")
    print(json.dumps(result))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
