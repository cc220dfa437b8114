"""Issue #3: the control plane over HTTP, end to end, without Docker.

The webhook app is served over HTTP (devstack.webhook_server, via LocalStack) on the local moto
server; the GitHub emulator replays a 50-job workload over three pools, with unroutable jobs,
jobs cancelled while queued, and duplicate deliveries (redeliveries of the same
`X-GitHub-Delivery`, and second `queued` deliveries under new ids). No executor runs: the test
is a minimal executor itself. It drains each pool's SQS demand queue, generates a JIT config
with the GitHub App client for each demand, and starts the stand-in runner as a separate
process, which registers with the emulator and takes a job.

Invariants (DESIGN.md):
- every routable job has exactly one record, `completed` with the emulator's conclusion, in the
  pool the routing rule picks; an unroutable job has no record and no demand;
- each pool's queue got exactly one demand message per routable job of that pool: a job
  cancelled while queued got its one demand when `queued` arrived, duplicates add none;
- every delivery, duplicates included, was answered 2xx.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from chalicelib import aws
from chalicelib.demand import DemandMessage
from chalicelib.github import GitHubApp, RunnerScope
from chalicelib.jobs import DynamoJobStore
from chalicelib.resources import dead_letter_queue_name, demand_queue_name
from devstack.stack import APP_ID, ROOT, LocalStack
from devstack.stack import environ as _environ
from executor.queue import DemandConsumer

pytestmark = pytest.mark.slow

ORG = "rh-org"
MAX_RUNNERS = 6  # concurrent stand-in runner processes
RUNNER_IDLE_TIMEOUT_S = 20.0  # a surplus runner gives up (and the test counts it)
HELD_POOL = "gamma"  # not served until its cancellations are done: they happen while queued
WORKLOAD_SPAN_S = 10.0
SEED = 3

# Three pools of one organisation with distinct label sets: no pool's labels contain another
# pool's distinguishing label, so a runner started for one pool never takes another's job.
POOLS_TOML = f"""
[[pool]]
name = "alpha"
labels = ["self-hosted", "linux", "x64", "small"]
scope = {{ owner = "{ORG}", repositories = ["api", "web"] }}
runner_group_id = 1
image = "runnerhub/runner-test:local"
max_runners = 6

[[pool]]
name = "beta"
labels = ["self-hosted", "linux", "arm64"]
scope = {{ owner = "{ORG}" }}
runner_group_id = 1
image = "runnerhub/runner-test:local"
max_runners = 6

[[pool]]
name = "gamma"
labels = ["self-hosted", "linux", "x64", "gpu"]
scope = {{ owner = "{ORG}", repositories = ["ml"] }}
runner_group_id = 2
image = "runnerhub/runner-test:local"
max_runners = 4
"""


# --- the workload ------------------------------------------------------------------------------


@dataclass
class Planned:
    spec: dict
    want_pool: str | None  # the pool the routing rule must pick; None: not ours
    kind: str  # routable, cancelled, approval, unroutable reason, invisible
    unroutable_reason: str | None = None


def expected_pool(pools: list[dict], labels: list[str], repository: str, private: bool
                  ) -> tuple[str | None, str | None]:
    """DESIGN.md's routing rule, written out independently of chalicelib.pools.route."""
    wanted = {label.lower() for label in labels}
    owner, name = repository.lower().split("/", 1)
    matches = []
    for pool in pools:
        scope = pool["scope"]
        repos = [r.lower() for r in scope.get("repositories", [])]
        if (wanted <= {label.lower() for label in pool["labels"]}
                and owner == scope["owner"].lower() and (not repos or name in repos)):
            matches.append(pool)
    if not matches:
        return None, "no_matching_pool"
    if not private:
        matches = [pool for pool in matches if pool.get("allow_public_repos", False)]
        if not matches:
            return None, "public_repository"
    best = min(matches, key=lambda p: (len({x.lower() for x in p["labels"]} - wanted), p["name"]))
    return best["name"], None


def build_workload(pools: list[dict]) -> dict[int, Planned]:
    rng = random.Random(SEED)
    plan: dict[int, Planned] = {}
    next_id = iter(range(7_300_000_001, 7_300_001_000))

    def add(kind: str, repository: str, labels: list[str], arrival_s: float, *,
            private: bool = True, **extra) -> int:
        job_id = next(next_id)
        spec = {
            "id": job_id, "repository": repository, "private": private, "labels": labels,
            "arrival_s": round(arrival_s, 3),
            "duration_s": round(rng.uniform(0.2, 1.0), 2),
            "conclusion": rng.choice(["success"] * 6 + ["failure", "skipped"]),
            "name": f"{kind}-{job_id % 1000}",
            **extra,
        }
        want, reason = expected_pool(pools, labels, repository, private)
        plan[job_id] = Planned(spec, want, kind, reason)
        return job_id

    def spread(count: int, start: float = 0.0, end: float = WORKLOAD_SPAN_S) -> list[float]:
        return sorted(rng.uniform(start, end) for _ in range(count))

    alpha_labels = [["self-hosted", "linux", "x64", "small"], ["small"], ["Linux", "SMALL"],
                    ["self-hosted", "X64", "small"]]
    for i, at in enumerate(spread(17)):
        add("routable", f"{ORG}/{'api' if i % 2 else 'web'}", alpha_labels[i % 4], at)
    beta_labels = [["self-hosted", "arm64"], ["linux", "ARM64"], ["self-hosted", "linux", "arm64"]]
    beta_repos = ["api", "mobile", "ml", "infra"]
    for i, at in enumerate(spread(13)):
        add("routable", f"{ORG}/{beta_repos[i % 4]}", beta_labels[i % 3], at)
    # Environment approvals: GitHub announces the held job, then sends `queued` again under a
    # new delivery id once approved (twice as action `queued`, once as action `waiting`).
    for i, action in enumerate(["queued", "queued", "waiting"]):
        add("approval", f"{ORG}/mobile", ["self-hosted", "arm64"], 1.0 + 3.0 * i,
            environment_wait_s=0.5, waiting_action=action)
    gamma_labels = [["self-hosted", "gpu"], ["gpu"], ["linux", "x64", "GPU"]]
    # Two arrive early, while the pool is still held: they get a second `queued` delivery.
    for i, at in enumerate([0.4, 1.2, *spread(6, 2.0)]):
        add("routable", f"{ORG}/ml", gamma_labels[i % 3], at)
    # Cancelled while queued: the held pool has no runner before these are done.
    for at in (0.2, 0.9, 1.6, 2.3):
        add("cancelled", f"{ORG}/ml", ["self-hosted", "gpu"], at, cancel_at_s=at + 0.4)
    # Not ours: labels no pool has (no runner has them either, so they stay queued), a
    # repository outside every pool's scope, a public repository, an owner the App is not
    # installed on (GitHub sends the App nothing). The public ones are safe from our org
    # runners: their runner groups refuse public repositories.
    add("unroutable", f"{ORG}/api", ["self-hosted", "windows"], 0.5)
    add("unroutable", f"{ORG}/ml", ["arm64", "gpu"], 2.5)
    add("unroutable", f"{ORG}/legacy", ["self-hosted", "small"], 4.5, private=False)
    add("unroutable", f"{ORG}/api", ["self-hosted", "linux", "small"], 6.5, private=False)
    add("invisible", "stranger-org/app", ["self-hosted", "small"], 8.5)
    # An open conclusion string beyond the octokit schemas' four.
    odd = [j for j, p in plan.items() if p.kind == "routable"][3:5]
    plan[odd[0]].spec["conclusion"] = "timed_out"
    plan[odd[1]].spec["conclusion"] = "neutral"
    return plan


# --- the minimal executor ----------------------------------------------------------------------


@dataclass
class RunnerProc:
    name: str
    pool: str
    job_id: int  # the demand it was started for (GitHub may give it another job)
    process: subprocess.Popen
    log_path: Path
    jit_path: Path
    started_at: float  # emulator wall clock

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class MiniExecutor:
    """Drain every pool's demand queue; start one stand-in runner per demand (capped), as a
    separate process with a JIT config from the GitHub App. A demand whose job was cancelled
    before any runner took it is withdrawn (DESIGN.md: no runner). Pools in `held` get no
    runners until released."""

    stack: LocalStack
    workdir: Path
    held: set[str]
    # per pool: (message, SQS message id, receive count) for every receive
    messages: dict[str, list[tuple[DemandMessage, str, int]]] = field(default_factory=dict)
    runners: list[RunnerProc] = field(default_factory=list)
    withdrawn: list[tuple[str, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._cv = threading.Condition()
        self._pending: deque[tuple[str, DemandMessage]] = deque()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._count = 0
        self.pools = {pool.name: pool for pool in self.stack.pools.pools}
        with _environ(self.stack.env):
            self._consumers = {name: DemandConsumer(aws.client("sqs"), self.stack.prefix, (name,))
                               for name in self.pools}
            self.jobs = DynamoJobStore(aws.client("dynamodb"), self.stack.tables["jobs_table"])
            self.sqs = aws.client("sqs")
        self._github = GitHubApp(APP_ID, self.stack.app_key_file.read_text(),
                                 self.stack.emulator.base_url)
        (self.workdir / "jit").mkdir(mode=0o700)
        self.messages = {name: [] for name in self.pools}

    def start(self) -> MiniExecutor:
        for name in self.pools:
            self._threads.append(threading.Thread(target=self._drain, args=(name,), daemon=True,
                                                  name=f"drain-{name}"))
        self._threads.append(threading.Thread(target=self._launch_loop, daemon=True,
                                              name="launcher"))
        for thread in self._threads:
            thread.start()
        return self

    def release(self, pool: str) -> None:
        with self._cv:
            self.held.discard(pool)
            self._cv.notify_all()

    def stop(self) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)

    def kill_runners(self) -> None:
        for runner in self.runners:
            if runner.process.poll() is None:
                runner.process.send_signal(signal.SIGTERM)
        for runner in self.runners:
            try:
                runner.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                runner.process.kill()
                runner.process.wait()
            runner.jit_path.unlink(missing_ok=True)

    # --- state the test waits on ---

    def idle(self) -> bool:
        """Nothing pending, nothing on (or in flight from) any queue or DLQ."""
        with self._cv:
            if self._pending:
                return False
        for name in self.pools:
            for queue in (demand_queue_name(self.stack.prefix, name),
                          dead_letter_queue_name(self.stack.prefix, name)):
                if any(self.queue_depth(queue).values()):
                    return False
        return True

    def queue_depth(self, queue: str) -> dict[str, int]:
        url = self.sqs.get_queue_url(QueueName=queue)["QueueUrl"]
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
                 "ApproximateNumberOfMessagesDelayed"]
        attributes = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)
        return {name: int(attributes["Attributes"].get(name, 0)) for name in names}

    def alive(self) -> list[RunnerProc]:
        return [r for r in self.runners if r.process.poll() is None]

    # --- threads ---

    def _drain(self, pool: str) -> None:
        consumer = self._consumers[pool]
        while not self._stop.is_set():
            try:
                batch = consumer.receive(pool, 10, wait_s=1, visibility_s=60)
                for received in batch:
                    message = DemandMessage.model_validate_json(received.body)
                    with self._cv:
                        self.messages[pool].append(
                            (message, received.message_id, received.receive_count))
                        self._pending.append((pool, message))
                        self._cv.notify_all()
                    consumer.delete(received)
            except Exception as exc:
                self.errors.append(f"drain {pool}: {type(exc).__name__}: {exc}")
                self._stop.wait(0.5)

    def _launch_loop(self) -> None:
        while not self._stop.is_set():
            with self._cv:
                item = None
                if len(self.alive()) < MAX_RUNNERS:
                    for candidate in self._pending:
                        if candidate[0] not in self.held:
                            item = candidate
                            break
                if item is None:
                    # Runner exits are not signalled: look again shortly.
                    self._cv.wait(0.05)
                    continue
                self._pending.remove(item)
            try:
                self._launch(*item)
            except Exception as exc:
                self.errors.append(f"launch for job {item[1].job_id}: {type(exc).__name__}: {exc}")

    def _launch(self, pool_name: str, message: DemandMessage) -> None:
        record = self.jobs.get(message.job_id)
        if record and record.state == "completed" and not record.runner_name:
            # Cancelled before any runner took it: the demand is withdrawn.
            self.withdrawn.append((pool_name, message.job_id))
            return
        pool = self.pools[pool_name]
        self._count += 1
        name = f"t3-{pool_name}-{self._count:03d}"
        installation = message.installation_id or self._github.installation_for(pool.scope.owner)
        jit = self._github.generate_jitconfig(
            installation, RunnerScope("org", pool.scope.owner), name, list(pool.labels),
            pool.runner_group_id,
        )
        jit_path = self.workdir / "jit" / f"{name}.jitconfig"
        fd = os.open(jit_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(jit.encoded_jit_config.get_secret_value())
        log_path = self.workdir / f"runner-{name}.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [sys.executable, "emulator/standin_runner.py", "--jitconfig-file", str(jit_path),
                 "--idle-timeout", str(RUNNER_IDLE_TIMEOUT_S)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        self.runners.append(RunnerProc(name, pool_name, message.job_id, process, log_path,
                                       jit_path, self.stack.emulator.clock.wall()))


# --- duplicates ----------------------------------------------------------------------------------


class DeliveryLog:
    """The emulator's delivery log, with each delivery's payload status (a `queued` may say
    `waiting`) and the webhook's answer."""

    def __init__(self, emu) -> None:
        self.emu = emu
        self._status: dict[int, str | None] = {}
        self._lock = threading.Lock()

    def all(self) -> list[dict]:
        return self.emu.deliveries()

    def status(self, delivery: dict) -> str | None:
        with self._lock:
            if delivery["id"] not in self._status:
                stored = self.emu.sender.delivery(delivery["id"])
                self._status[delivery["id"]] = (
                    json.loads(stored.body)["workflow_job"]["status"] if stored else None)
            return self._status[delivery["id"]]

    def originals(self, job_id: int, action: str, status: str) -> list[dict]:
        """First attempts (not redeliveries) of a job's deliveries of one kind, answered."""
        return [d for d in self.all() if d["job_id"] == job_id and d["action"] == action
                and not d["redelivery"] and self.status(d) == status]

    def answer(self, delivery_id: int) -> dict:
        stored = self.emu.sender.delivery(delivery_id)
        try:
            return json.loads(stored.response_body) if stored and stored.response_body else {}
        except ValueError:
            return {"unparsed": stored.response_body[:200]}


@dataclass
class Redeliverer:
    """Once a target delivery (job, action, payload status) was answered, ask the emulator to
    redeliver it through the REST API (`POST /app/hook/deliveries/{id}/attempts`): the
    webhook sees the same X-GitHub-Delivery again."""

    stack: LocalStack
    log: DeliveryLog
    targets: list[tuple[int, str, str]]
    done: dict[tuple[int, str, str], dict] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._finished = threading.Event()
        self._stop = threading.Event()
        self._github = GitHubApp(APP_ID, self.stack.app_key_file.read_text(),
                                 self.stack.emulator.base_url)
        self._thread = threading.Thread(target=self._run, daemon=True, name="redeliverer")

    def start(self) -> Redeliverer:
        self._thread.start()
        return self

    def wait(self, timeout_s: float) -> bool:
        return self._finished.wait(timeout_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        emu = self.stack.emulator
        while not self._stop.is_set() and len(self.done) < len(self.targets):
            for delivery in self.log.all():
                if delivery["redelivery"]:
                    continue
                for target in self.targets:
                    job_id, action, status = target
                    if (target in self.done or delivery["job_id"] != job_id
                            or delivery["action"] != action
                            or self.log.status(delivery) != status):
                        continue
                    self.done[target] = delivery
                    try:
                        answer = requests.post(
                            f"{emu.base_url}/app/hook/deliveries/{delivery['id']}/attempts",
                            headers={"Authorization": f"Bearer {self._github.app_jwt()}",
                                     "Accept": "application/vnd.github+json"},
                            timeout=10,
                        )
                    except requests.RequestException as exc:
                        self.errors.append(f"redeliver {delivery['id']}: {exc}")
                        continue
                    if answer.status_code != 202:
                        self.errors.append(f"redeliver {delivery['id']}: {answer.status_code}")
            self._stop.wait(0.05)
        self._finished.set()


# --- the test ------------------------------------------------------------------------------------


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def test_workload_over_http_every_routable_job_one_record_one_demand(tmp_path):
    pools_file = tmp_path / "pools.toml"
    pools_file.write_text(POOLS_TOML)
    pool_docs = tomllib.loads(POOLS_TOML)["pool"]
    plan = build_workload(pool_docs)
    routable = {j: p for j, p in plan.items() if p.want_pool}
    cancelled = sorted(j for j, p in plan.items() if p.kind == "cancelled")
    not_ours = sorted(j for j, p in plan.items() if not p.want_pool)
    assert len(plan) == 50 and len(not_ours) == 5 and len(cancelled) == 4
    assert all(plan[j].want_pool == HELD_POOL for j in cancelled)

    by_pool = Counter(p.want_pool for p in routable.values())
    first = {pool: sorted(j for j, p in routable.items()
                          if p.want_pool == pool and p.kind == "routable")
             for pool in by_pool}
    # Same X-GitHub-Delivery again: `queued` of routable jobs in every pool (one of them a
    # cancelled job, one an approval's held announcement), later moves, and a job not ours.
    approvals = sorted(j for j, p in plan.items() if p.kind == "approval")
    redeliver = [
        (first["alpha"][0], "queued", "queued"), (first["alpha"][1], "queued", "queued"),
        (first["alpha"][2], "completed", "completed"),
        (first["beta"][0], "queued", "queued"), (first["beta"][1], "in_progress", "in_progress"),
        (approvals[0], "queued", "waiting"), (approvals[1], "queued", "queued"),
        (cancelled[0], "queued", "queued"), (cancelled[1], "completed", "completed"),
        (first["gamma"][0], "queued", "queued"),
        (not_ours[2], "queued", "queued"),
    ]
    # A second, distinct `queued` delivery for held jobs still queued at GitHub.
    held_early = [j for j in first[HELD_POOL] if plan[j].spec["arrival_s"] < 2.5][:2]
    assert len(held_early) == 2, "the seed should give two early jobs in the held pool"

    stack = LocalStack(pools_file, workdir=tmp_path)
    executor = redeliverer = None
    started = time.monotonic()
    try:
        stack.start()
        emu = stack.emulator
        executor = MiniExecutor(stack, tmp_path, held={HELD_POOL}).start()
        log = DeliveryLog(emu)
        redeliverer = Redeliverer(stack, log, redeliver).start()
        ids = emu.load_workload({"name": "issue-3", "jobs": [p.spec for p in plan.values()]})
        assert sorted(ids) == sorted(plan)
        emu.run_workload()
        t0 = time.monotonic()

        def gt() -> dict[int, dict]:
            return {job["job_id"]: job for job in emu.jobs()}

        # Second distinct `queued` for two held jobs, while GitHub still has them queued.
        second_queued: dict[int, str] = {}
        for job_id in held_early:
            assert wait_until(lambda j=job_id: log.originals(j, "queued", "queued"), 15), (
                f"no queued delivery for held job {job_id}")
            assert emu.job(job_id)["status"] == "queued"
            second_queued[job_id] = log.originals(job_id, "queued", "queued")[0]["guid"]
            emu.sender.enqueue_job_event("queued", emu.state.job_snapshot(job_id))
        assert wait_until(lambda: all(len(log.originals(j, "queued", "queued")) == 2
                                      for j in held_early), 15), "second queued not answered"

        # The held pool is served only once its cancellations are done on both sides.
        def cancellations_done() -> bool:
            truth = gt()
            if not all(truth[j]["status"] == "completed" for j in cancelled):
                return False
            found = [executor.jobs.get(j) for j in cancelled]
            return all(job is not None and job.state == "completed" for job in found)

        assert wait_until(cancellations_done, 20), "the cancellations did not complete"
        released_at = emu.clock.wall()
        executor.release(HELD_POOL)

        all_done = wait_until(
            lambda: all(job["status"] == "completed"
                        for j, job in gt().items() if j in routable), 45, 0.1)
        workload_s = time.monotonic() - t0
        redelivered = redeliverer.wait(15)
        flushed = emu.sender.flush(20)
        drained = wait_until(executor.idle, 15, 0.2)
        runners_exited = wait_until(lambda: not executor.alive(), 15, 0.1)
        executor.stop()
        redeliverer.stop()

        truth = gt()
        records = stack.records()
        deliveries = emu.deliveries()
        runners = list(executor.runners)
        # Demand messages are counted by SQS message id (a message received twice is one).
        demands = {pool: Counter(dict({mid: m.job_id for m, mid, _ in msgs}).values())
                   for pool, msgs in executor.messages.items()}
        receives = Counter(count for msgs in executor.messages.values() for _, _, count in msgs)
        problems: list[str] = []

        def check(ok: bool, what: str) -> None:
            if not ok:
                problems.append(what)

        check(all_done, "not every routable job completed at the emulator: " + str(
            {j: truth[j]["status"] for j in routable if truth[j]["status"] != "completed"}))
        check(redelivered, f"redeliveries not all sent: {len(redeliverer.done)}/{len(redeliver)}")
        check(flushed, "the emulator's webhook sender did not flush")
        check(drained, "demand queues not drained: " + str(
            {pool: executor.queue_depth(demand_queue_name(stack.prefix, pool))
             for pool in executor.pools}))
        check(runners_exited, f"runners still alive: {[r.name for r in executor.alive()]}")
        check(not executor.errors, f"executor errors: {executor.errors}")
        check(not redeliverer.errors, f"redelivery errors: {redeliverer.errors}")

        # 1. One record per routable job, none for the others; final state = ground truth.
        missing, extra = sorted(set(routable) - set(records)), sorted(set(records) - set(routable))
        check(not missing and not extra, f"records != routable jobs: missing {missing}, "
              f"extra {extra}")
        for job_id, planned in sorted(routable.items()):
            record, job = records.get(job_id, {}), truth[job_id]
            got = (record.get("state"), record.get("conclusion"), record.get("pool"),
                   record.get("demand_generation"))
            want = ("completed", job["conclusion"], planned.want_pool, 1)
            check(got == want, f"job {job_id} ({planned.kind}): record {got} != truth {want}")
            check(record.get("runner_name") == job["runner_name"],
                  f"job {job_id}: record runner {record.get('runner_name')!r} != "
                  f"{job['runner_name']!r}")
            check(job["conclusion"] == ("cancelled" if planned.kind == "cancelled"
                                        else planned.spec["conclusion"]),
                  f"job {job_id}: emulator conclusion {job['conclusion']} unexpected")

        # 2. Exactly one demand per routable job on its pool's queue; none for the others.
        for pool in executor.pools:
            want = Counter({j: 1 for j, p in routable.items() if p.want_pool == pool})
            check(demands[pool] == want, f"pool {pool}: demands {dict(demands[pool])} != "
                  f"one per routable job {sorted(want)}")
            for message, _, _ in executor.messages[pool]:
                check(message.pool == pool and message.generation == 1,
                      f"pool {pool}: message {message.job_id} for pool {message.pool} "
                      f"generation {message.generation}")
        check(not any(j in demands[p] for p in demands for j in not_ours),
              "a demand for a job that is not ours")
        check(set(receives) <= {1}, f"demand messages received more than once: {receives}")
        undispatched = sorted(j for j in routable
                              if records.get(j, {}).get("dispatched_at") is None)
        check(not undispatched, f"records without dispatched_at: {undispatched}")

        # 3. Cancelled while queued: queued was sent, no runner ever took it, GitHub ended it
        # cancelled before any runner of its pool existed, and its demand was withdrawn.
        gamma_starts = [r.started_at for r in runners if r.pool == HELD_POOL]
        for job_id in cancelled:
            job = truth[job_id]
            actions = [d["action"] for d in deliveries if d["job_id"] == job_id
                       and not d["redelivery"]]
            check(job["taken_at"] is None and job["runner_name"] is None
                  and job["conclusion"] == "cancelled" and job["queued_sent_at"] is not None
                  and job["cancel_requested_at"] >= job["queued_at"],
                  f"job {job_id} was not cancelled while queued: {job}")
            check(job["cancel_requested_at"] < released_at
                  and all(job["cancel_requested_at"] < s for s in gamma_starts),
                  f"job {job_id}: a {HELD_POOL} runner existed before its cancellation")
            check(actions == ["queued", "completed"], f"job {job_id}: deliveries {actions}")
            check("in_progress_at" not in records.get(job_id, {}),
                  f"job {job_id}: record went in progress")
        check(sorted(j for _, j in executor.withdrawn) == cancelled,
              f"withdrawn demands {executor.withdrawn} != cancelled jobs {cancelled}")

        # 4. Duplicates: redeliveries carry the same guid and were answered 2xx as duplicates;
        # second `queued` deliveries (new guids) were answered 2xx and changed nothing.
        for target, original in redeliverer.done.items():
            again = [d for d in deliveries if d["redelivery"] and d["guid"] == original["guid"]]
            check(len(again) == 1 and 200 <= again[0]["status_code"] < 300,
                  f"redelivery of {target}: {again}")
            if again and plan[target[0]].want_pool:
                body = log.answer(again[0]["id"])
                check(body.get("message") == "duplicate delivery",
                      f"redelivery of {target} answered {body}")
        for job_id, guid in second_queued.items():
            extra = [d for d in log.originals(job_id, "queued", "queued") if d["guid"] != guid]
            check(len(extra) == 1 and extra[0]["status_code"] == 200
                  and log.answer(extra[0]["id"]).get("outcome") == "no_change",
                  f"second queued of {job_id}: {extra}")
        for job_id in approvals:
            guids = {d["guid"] for d in deliveries if d["job_id"] == job_id
                     and d["action"] in ("queued", "waiting")}
            check(len(guids) == 2, f"approval job {job_id}: announcements {guids}")

        # 5. Every delivery answered 2xx; jobs not ours answered 202 with the reason.
        bad = [(d["id"], d["job_id"], d["action"], d["status"]) for d in deliveries
               if not 200 <= d["status_code"] < 300]
        check(not bad, f"deliveries not answered 2xx: {bad}")
        for job_id in not_ours:
            sent = [d for d in deliveries if d["job_id"] == job_id]
            if plan[job_id].kind == "invisible":
                check(not sent, f"job {job_id}: the App is not installed there, yet {sent}")
                continue
            reasons = {(d["status_code"], log.answer(d["id"]).get("reason")) for d in sent}
            check(bool(sent) and reasons == {(202, plan[job_id].unroutable_reason)},
                  f"job {job_id} not ours: answers {reasons}")

        # 6. The runners: one per non-withdrawn demand, each a separate process that took one
        # job and exited 0 (no surplus: a duplicate demand would leave one idle).
        codes = Counter(r.process.poll() for r in runners)
        idle = [r.name for r in runners if "idle timeout" in r.output()]
        check(len(runners) == len(routable) - len(cancelled),
              f"{len(runners)} runners for {len(routable) - len(cancelled)} live demands")
        check(codes == Counter({0: len(runners)}), f"runner exit codes {dict(codes)}")
        check(not idle, f"runners that got no job: {idle}")
        ran = {truth[j]["runner_name"] for j in routable if truth[j]["runner_name"]}
        check(ran == {r.name for r in runners}, "runners that ran jobs != runners started")

        pickups = [truth[j]["taken_at"] - truth[j]["queued_sent_at"] for j in routable
                   if truth[j]["taken_at"] and plan[j].want_pool != HELD_POOL]
        summary = {
            "injected": {
                "jobs": len(plan), "routable": dict(by_pool), "not_ours": len(not_ours),
                "cancelled_while_queued": len(cancelled), "approvals": len(approvals),
                "redelivered": len(redeliver), "second_queued": len(second_queued),
            },
            "found": {
                "records": len(records),
                "states": dict(Counter(r.get("state") for r in records.values())),
                "conclusions": dict(Counter(r.get("conclusion") for r in records.values())),
                "demands": {p: sum(c.values()) for p, c in demands.items()},
                "runners": len(runners), "withdrawn": len(executor.withdrawn),
                "deliveries": len(deliveries),
                "delivery_status": dict(Counter(d["status"] for d in deliveries)),
                "pickup_p50_s": round(statistics.median(pickups), 3) if pickups else None,
            },
            "workload_s": round(workload_s, 1),
            "total_s": round(time.monotonic() - started, 1),
            "problems": len(problems),
        }
        print(json.dumps(summary, indent=1))
        for problem in problems:
            print("PROBLEM:", problem)
        assert not problems, "\n".join(problems[:20])
    finally:
        if redeliverer is not None:
            redeliverer.stop()
        if executor is not None:
            executor.stop()
            executor.kill_runners()
        if hasattr(stack, "aws"):  # started (stop() is safe on a partly started stack)
            stack.stop()
