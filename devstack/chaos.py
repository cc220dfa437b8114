"""The fault suite: a workload under combined faults, judged against ground truth.

    python -m devstack.chaos --profile long     # `make chaos`: 300 jobs, every fault at once
    python -m devstack.chaos --profile short    # what `make test` runs (tests/e2e/test_chaos.py)
    python -m devstack.chaos --selftest         # plants a job nothing can serve correctly

Faults, together (docs/operations.md, "The fault suite"):
- webhooks: dropped (logged as failed, redeliverable), duplicated (same delivery id), a second
  `queued` under a new delivery id, reordered, and never sent nor logged (only the REST API
  shows the job); spread over two or more webhook processes, as several Lambda containers;
- GitHub API: 5xx answers, 5xx after the call took effect, calls answered only after the
  client's time-out;
- executors: SIGKILLed daemons (their containers keep running) restarted under the same host
  id, and a host lost with its containers (daemon and runner containers SIGKILLed together),
  replaced by a new host;
- AWS: the whole endpoint cut by a TCP proxy, and DynamoDB alone failing, then throttling,
  while SQS works.

Judged by devstack/judge.py from the workload's plan, the emulator's record and Docker's events:
lost, stuck, over_commit, timed_out (failures) and cross_pool (cost). A job running on the lost
host when it died is failed by GitHub (its runner is gone): it is counted as `casualties`, not
lost, when GitHub failed exactly that job through its lost-runner time-out. Also counted:
leaked containers and runners, how many webhook processes each answered at least 10 % of the
deliveries (the emulator's log), and how often each fault was really injected. The last line
printed is the JSON summary; the run fails (exit 1) on any failure count, any leak, or a fault
kind injected less than half as often as configured.
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
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from devstack import judge
from devstack.docker_events import ContainerTimeline
from devstack.stack import LocalStack

ROOT = Path(__file__).resolve().parent.parent
POOLS = ROOT / "tests" / "fixtures" / "pools" / "e2e.toml"
POOL_NAMES = ("alpha", "beta", "gamma")


@dataclass(frozen=True)
class Profile:
    jobs: int
    spread_s: float  # arrivals over this long
    drop: float
    duplicate: float
    duplicate_new_id: float
    reorder: float
    never_sent: float
    api_5xx: float
    api_after_effect: float  # of the 5xx answers, the share given after the call took effect
    api_timeout: float
    kills: int
    host_losses: int
    outage_s: float
    dynamodb_outage_s: float
    webhook_processes: int = 2
    reconcile_every_s: float = 10.0
    slots: int = 4
    selftest: bool = False
    # Fault decisions are hashes of the seed and the job ids, so a seed fixes which deliveries
    # are faulted. The short profile's 41 jobs are few: its seed is one whose draws come near
    # the configured shares for every kind (a run fails below half of them).
    seed: int = 7


PROFILES = {
    "long": Profile(jobs=300, spread_s=210, drop=0.05, duplicate=0.03, duplicate_new_id=0.04,
                    reorder=0.05, never_sent=0.02, api_5xx=0.04, api_after_effect=0.3,
                    api_timeout=0.004, kills=2, host_losses=1, outage_s=20,
                    dynamodb_outage_s=30),
    "short": Profile(jobs=40, spread_s=40, drop=0.08, duplicate=0.08, duplicate_new_id=0.1,
                     reorder=0.1, never_sent=0.1, api_5xx=0.05, api_after_effect=0.4,
                     api_timeout=0.02, kills=1, host_losses=1, outage_s=5,
                     dynamodb_outage_s=8, seed=46),
}


@dataclass
class Injected:
    kills: int = 0
    host_losses: int = 0
    outage_s: float = 0.0
    dynamodb_outage_s: float = 0.0
    killed_runners: set[str] = field(default_factory=set)
    log: list[str] = field(default_factory=list)

    def note(self, what: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S')} {what}")
        print(f"chaos: {what}", file=sys.stderr, flush=True)


def workload(profile: Profile, seed: int) -> dict:
    """The workload with each job's planned pool (`expected_pool`, for the judge; stripped
    before the emulator sees it). The self-test plants one job whose runner reports `failure`
    where `success` is planned: nothing can serve it correctly."""
    rng = random.Random(seed)
    jobs = []
    for index in range(profile.jobs):
        pool = POOL_NAMES[index % 3]
        repo = "runnerhub-e2e/ml" if pool == "gamma" else f"runnerhub-e2e/svc-{index % 4}"
        jobs.append({
            "repository": repo, "labels": ["self-hosted", pool], "expected_pool": pool,
            "arrival_s": round(rng.uniform(0, profile.spread_s), 2),
            "duration_s": round(rng.uniform(1.0, 3.0), 1),
            "conclusion": "failure" if index % 13 == 7 else "success",
            "name": f"chaos-{index}",
        })
    if profile.selftest:
        jobs.append({"repository": "runnerhub-e2e/svc-0", "labels": ["self-hosted", "alpha"],
                     "expected_pool": "alpha", "arrival_s": 1.0, "duration_s": 1.0,
                     "conclusion": "success", "runner_reports": "failure",
                     "name": "selftest-planted"})
    return {"name": "chaos", "jobs": jobs}


def for_emulator(spec: dict) -> dict:
    return {**spec, "jobs": [{k: v for k, v in job.items() if k != "expected_pool"}
                             for job in spec["jobs"]]}


def faults(profile: Profile, seed: int) -> dict:
    return {
        "seed": seed,
        # Holding `in_progress` back lets `completed` (jobs last 1-3 s) overtake it; a held
        # `queued` is only overtaken when a spare runner takes the job meanwhile.
        "webhooks": {"drop": profile.drop, "duplicate": profile.duplicate,
                     "duplicate_new_id": profile.duplicate_new_id,
                     "never_sent": profile.never_sent, "reorder": profile.reorder,
                     "reorder_actions": ["in_progress"], "duplicate_delay_s": 0.5},
        # Only what runners and the control plane call; the runner protocol itself is not
        # GitHub's REST API and is never faulted.
        "api": {"error_share": profile.api_5xx, "after_effect_share": profile.api_after_effect,
                "timeout_share": profile.api_timeout, "timeout_s": 12.0},
    }


def webhook_processes(deliveries: list[dict], urls: list[str], share: float = 0.1) -> int:
    """How many receivers answered (OK) at least `share` of the answered deliveries, from the
    emulator's delivery log."""
    answered = Counter(d["url"] for d in deliveries if d.get("status") == "OK")
    total = sum(answered.values())
    return sum(1 for url in urls if total and answered[url] >= share * total)


def shortfalls(profile: Profile, injected: Injected, report: dict) -> list[str]:
    """Each kind injected less than half as often as configured."""
    problems = list(report.get("problems", []))
    for kind, want, got in (("kills", profile.kills, injected.kills),
                            ("host_losses", profile.host_losses, injected.host_losses),
                            ("outage_s", profile.outage_s, injected.outage_s),
                            ("dynamodb_outage_s", profile.dynamodb_outage_s,
                             injected.dynamodb_outage_s)):
        if want and got < want / 2:
            problems.append(f"{kind}: {got} of {want}")
    return problems


def casualties(verdict: judge.Verdict, truth: dict[int, dict], killed: set[str]
               ) -> list[int]:
    """Jobs lost only because the host they ran on was killed with them: GitHub failed exactly
    those through its lost-runner time-out."""
    return [job_id for job_id in verdict.lost
            if truth.get(job_id, {}).get("runner_name") in killed
            and truth[job_id].get("completed_by") == judge.BY_LOST_RUNNER_TIMEOUT]


def run(profile: Profile, workdir: Path, seed: int | None = None) -> dict:
    import docker

    seed = profile.seed if seed is None else seed
    client = docker.from_env()
    stack = LocalStack(POOLS, workdir, lost_runner_timeout_s=20, outage_proxy=True,
                       webhook_processes=profile.webhook_processes,
                       emulator_options={"faults": faults(profile, seed)}).start()
    injected = Injected()
    executor_env = {"RUNNERHUB_SLOTS": str(profile.slots), "RUNNERHUB_LEASE_S": "15",
                    "RUNNERHUB_IDLE_TIMEOUT_S": "15", "RUNNERHUB_START_BACKOFF_S": "1",
                    "RUNNERHUB_MAX_START_BACKOFF_S": "10", "RUNNERHUB_DRAIN_TIMEOUT_S": "60"}
    # Unique per run: two runs on one Docker engine never see each other's containers.
    run_id = uuid.uuid4().hex[:4]
    hosts = [f"chaos-{run_id}-a", f"chaos-{run_id}-b"]
    every_host = list(hosts)
    timeline = ContainerTimeline(client)
    try:
        executors = {host: stack.start_executor(host, **executor_env) for host in hosts}
        reconciler = stack.start_reconciler(
            profile.reconcile_every_s, RUNNERHUB_STUCK_AFTER_S="30",
            RUNNERHUB_DISPATCHED_STUCK_AFTER_S="30", RUNNERHUB_REDELIVER_EVERY_S="60",
            RUNNERHUB_ORPHAN_GRACE_S="30", RUNNERHUB_RECONCILER_LEASE_S="10",
        )
        # Like systemd's Restart=on-failure on the hosts (infra/): an executor that exits (e.g.
        # it could not reach AWS at start) is started again under its host id.
        supervising = threading.Event()
        pausing = threading.Event()

        def supervise() -> None:
            while not supervising.wait(1.0):
                for host in list(hosts):
                    if not executors[host].alive() and not pausing.is_set():
                        injected.note(f"executor {host} exited "
                                      f"({executors[host].process.returncode}); restarting")
                        executors[host] = stack.start_executor(host, **executor_env)

        supervisor = threading.Thread(target=supervise, daemon=True)
        supervisor.start()
        time.sleep(2.0)
        spec = workload(profile, seed)
        rules = judge.read_pools(POOLS)
        plan = judge.plan_workload(spec, stack.emulator.load_workload(for_emulator(spec)),
                                   rules)
        stack.emulator.run_workload()
        began = time.monotonic()

        def kill(victim: str) -> None:
            child = executors[victim]
            running = len(client.containers.list(filters={"label": f"runnerhub.host={victim}"}))
            child.process.send_signal(signal.SIGKILL)
            child.process.wait()
            injected.kills += 1
            injected.note(f"SIGKILL executor {victim} ({running} of its containers running, "
                          "left running)")
            time.sleep(3.0)
            executors[victim] = stack.start_executor(victim, **executor_env)
            injected.note(f"restarted executor {victim}")

        def lose_host(victim: str) -> None:
            """The host dies: its daemon and its runner containers at once, for good; a new
            host replaces it (as Auto Scaling would)."""
            executors[victim].process.send_signal(signal.SIGKILL)
            executors[victim].process.wait()
            # SIGKILL, and gone with the host's disk: every container of the host, also one
            # the daemon was creating as it died (listed again until none is left).
            killed: set[str] = set()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                left = client.containers.list(
                    all=True, filters={"label": f"runnerhub.host={victim}"})
                if not left:
                    break
                for container in left:
                    killed.add(container.labels.get("runnerhub.runner", ""))
                    with contextlib.suppress(docker.errors.APIError):
                        container.remove(force=True)
            injected.killed_runners |= killed
            hosts.remove(victim)
            injected.host_losses += 1
            injected.note(f"host {victim} lost with {len(killed)} runner containers")
            replacement = f"chaos-{run_id}-r{injected.host_losses}"
            time.sleep(5.0)
            # Started before it is listed: the supervisor reads `executors` for listed hosts.
            executors[replacement] = stack.start_executor(replacement, **executor_env)
            hosts.append(replacement)
            every_host.append(replacement)
            injected.note(f"replacement host {replacement} started")

        def dynamodb_outage() -> None:
            half = profile.dynamodb_outage_s / 2
            refused = stack.aws.dynamodb.refused
            injected.note(f"DynamoDB failing for {half:.0f}s, then throttling for {half:.0f}s")
            stack.aws.dynamodb_outage(half, "unavailable")
            time.sleep(half)
            stack.aws.dynamodb_outage(half, "throttle")
            time.sleep(half)
            # Seconds between the first and the last request refused: only time that really
            # failed requests counts.
            injected.dynamodb_outage_s += stack.aws.dynamodb.refusing_s(since=refused)
            injected.note(f"DynamoDB back ({stack.aws.dynamodb.refused - refused} "
                          "requests refused)")

        # Spread over the arrivals: kills, the AWS outage in the middle, DynamoDB's at a
        # quarter, the host loss at three quarters.
        plan_of_faults = sorted(
            [(profile.spread_s * (k + 1) / (profile.kills + 1), "kill")
             for k in range(profile.kills)]
            + [(profile.spread_s * 0.5 + 3, "outage"), (profile.spread_s * 0.25, "dynamodb")]
            + [(profile.spread_s * (0.75 + 0.1 * k), "host") for k in range(profile.host_losses)])
        for at, what in plan_of_faults:
            time.sleep(max(0.0, at - (time.monotonic() - began)))
            pausing.set()
            try:
                if what == "kill":
                    kill(hosts[injected.kills % len(hosts)])
                elif what == "host":
                    lose_host(hosts[0])
                elif what == "dynamodb":
                    threading.Thread(target=dynamodb_outage, daemon=True).start()
                else:
                    injected.note(f"AWS endpoint down for {profile.outage_s:.0f}s")
                    stack.aws_proxy.outage(profile.outage_s, wait=False)
            finally:
                pausing.clear()

        def truth() -> dict[int, dict]:
            return {job["job_id"]: job for job in stack.emulator.jobs()}

        limit = profile.spread_s + 300
        stack.wait_for(lambda: not judge.settled(plan, truth(), stack.records()),
                       timeout_s=max(0.0, limit - (time.monotonic() - began)), interval_s=2.0)
        unsettled = judge.settled(plan, truth(), stack.records())
        # One reconciler period after the workload ends: RunnerHub must agree by now.
        time.sleep(profile.reconcile_every_s)
        supervising.set()
        supervisor.join(5)
        for host in hosts:
            stack.stop_child(executors[host], timeout_s=90)
        stack.stop_child(reconciler, timeout_s=30)
        seen = truth()
        verdict = judge.judge(plan, seen, stack.records(), rules, timeline.close(),
                              {host: profile.slots for host in every_host},
                              timed_out=len(unsettled))
        dead = casualties(verdict, seen, injected.killed_runners)
        lost = {job_id: why for job_id, why in verdict.lost.items() if job_id not in dead}
        verdict = replace(verdict, lost=lost)
        leaked_containers = [c.name for c in client.containers.list(
            all=True, filters={"label": "runnerhub.managed=true"})
            if c.labels.get("runnerhub.host") in every_host]
        leaked_runners = [r["name"] for r in stack.emulator.runners()
                          if r["name"].startswith("rh-")]
        report = stack.emulator.faults_report()
        summaries = [json.loads(line) for line in reconciler.log().splitlines()
                     if line.startswith("{") and '"redelivered"' in line]
        injected.outage_s = stack.aws_proxy.outage_seconds
        counted = report["injected"]
        result = {
            **{k: v for k, v in verdict.counts().items() if k != "pickup_by_pool"},
            "casualties": len(dead),
            "leaked_containers": len(leaked_containers),
            "leaked_runners": len(leaked_runners),
            "webhook_processes": webhook_processes(stack.emulator.deliveries(),
                                                   stack.webhook_urls),
            "injected": {
                **{kind: counted.get(kind, 0) for kind in (
                    "dropped", "duplicated", "duplicated_new_id", "reordered", "api_5xx",
                    "api_5xx_after_effect", "api_timeouts", "never_sent")},
                "dynamodb_outage_s": injected.dynamodb_outage_s,
                "kills": injected.kills,
                "host_losses": injected.host_losses,
                "outage_s": round(injected.outage_s, 1),
            },
            "redelivered": sum(s.get("redelivered", 0) for s in summaries),
            "re_demanded": sum(s.get("re_demanded", 0) for s in summaries),
            "pickup_by_pool": verdict.pickup_by_pool,
            # Pickup figures state the runner start-up they ran with (the stand-in's own).
            "runner_startup_s": stack.emulator.runner_startup_s,
        }
        problems = shortfalls(profile, injected, report)
        if result["webhook_processes"] < profile.webhook_processes:
            problems.append(f"webhook_processes: {result['webhook_processes']} answered >= 10%")
        detail = {"lost": lost, "stuck": dict(list(verdict.stuck.items())[:20]),
                  "casualties": dead, "max_running": verdict.max_running,
                  "unsettled": unsettled[:20], "leaked_containers": leaked_containers,
                  "leaked_runners": leaked_runners, "fault_shortfall": problems,
                  "injections": injected.log, "logs": str(workdir)}
        print(json.dumps(detail, indent=1), file=sys.stderr)
        result["fault_shortfall"] = problems
        result["lost_jobs"] = sorted(lost)
        result["planted"] = [p.job_id for p, s in zip(plan, spec["jobs"], strict=True)
                             if s.get("runner_reports")]
        result["ok"] = verdict.ok and not (leaked_containers or leaked_runners or problems)
        return result
    finally:
        with contextlib.suppress(Exception):
            timeline.close()
        with contextlib.suppress(Exception):
            stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="long")
    parser.add_argument("--seed", type=int, default=None, help="default: the profile's")
    parser.add_argument("--selftest", action="store_true",
                        help="plant one job nothing can serve correctly: must report lost 1")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="runnerhub-chaos-"))
    profile = replace(PROFILES[args.profile], selftest=args.selftest)
    result = run(profile, workdir, args.seed)
    ok = result.pop("ok")
    print(json.dumps(result))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
