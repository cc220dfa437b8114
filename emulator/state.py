"""Jobs, runners and the assignment rule, behind one lock. No HTTP here: the routes translate.

GitHub, not the runner's owner, decides which runner takes which job. The rule reproduced here:
a queued job is offered to an online idle runner whose labels are a superset of the job's labels
(case-insensitive) and whose scope (the repository, or the organisation owning it) covers the
job's repository. The runner then acquires the job (GitHub's AcquireJob) and only then is the job
in progress. Assignment is event-driven: a job is matched the moment it is queued, and a runner
the moment it polls, so pickup latency here is a few milliseconds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized, Unprocessable

# Labels GitHub gives runners itself; the rest are "custom".
READ_ONLY_LABELS = {"self-hosted", "linux", "windows", "macos", "x64", "arm", "arm64"}
DEFAULT_RUNNER_LABELS = ["self-hosted", "Linux", "X64"]
JIT_CONFIG_VERSION = 1
RERUN_DOC = ("https://docs.github.com/rest/actions/workflow-runs"
             "#re-run-a-job-from-a-workflow-run")


class Clock:
    """Wall-clock seconds that never go backwards: a wall-clock origin plus monotonic time."""

    def __init__(self):
        self._wall0 = time.time()
        self._mono0 = time.monotonic()

    def mono(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return self._wall0 + (time.monotonic() - self._mono0)


@dataclass(frozen=True)
class Scope:
    """Where a runner lives: an organisation (`org`, login) or a repository (`repo`, o/n)."""

    kind: str
    name: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.name.lower())

    def covers(self, repository: str) -> bool:
        if self.kind == "repo":
            return repository.lower() == self.name.lower()
        return repository.split("/", 1)[0].lower() == self.name.lower()


@dataclass
class Job:
    id: int
    run_id: int
    repository: str
    private: bool
    labels: list[str]
    duration_s: float
    planned_conclusion: str
    runner_reports: str | None = None  # planted: the runner reports this instead
    name: str = "build"
    workflow_name: str = "CI"
    head_branch: str = "main"
    head_sha: str = ""
    environment: str | None = None
    environment_wait_s: float | None = None
    waiting_action: str = "waiting"
    installation_id: int | None = None
    app_id: int | None = None
    owner_type: str = "Organization"
    status: str = "pending"  # pending, waiting, queued, in_progress, completed
    conclusion: str | None = None
    created_at: float | None = None
    queued_at: float | None = None
    queued_sent_at: float | None = None
    taken_at: float | None = None
    completed_at: float | None = None
    cancel_requested_at: float | None = None
    runner_id: int | None = None
    runner_name: str | None = None
    runner_labels: list[str] | None = None
    # When the runner that took it registered and first polled: a "warm hit" is a job whose
    # runner was listening before its `queued` delivery was sent.
    runner_registered_at: float | None = None
    runner_listening_at: float | None = None
    # Who ended it: "runner" (its own report), "lost_runner_timeout" (GitHub gave up on a
    # silent runner), "cancel" (cancelled before any runner took it).
    completed_by: str | None = None
    runner_group_id: int | None = None
    runner_group_name: str | None = None
    offered_to: int | None = None
    offered_at: float = 0.0
    deployment_id: int | None = None
    # A re-run (`State.rerun`) is a new job of the same run, one attempt later.
    run_attempt: int = 1
    rerun_of: int | None = None
    rerun_by: int | None = None  # the job that re-ran this one (it is no longer the latest)

    def record(self) -> dict:
        """The ground-truth view of this job."""
        return {
            "job_id": self.id,
            "run_id": self.run_id,
            "repository": self.repository,
            "private": self.private,
            "labels": list(self.labels),
            "status": self.status,
            "conclusion": self.conclusion,
            "planned_conclusion": self.planned_conclusion,
            "completed_by": self.completed_by,
            "created_at": self.created_at,
            "queued_at": self.queued_at,
            "queued_sent_at": self.queued_sent_at,
            "taken_at": self.taken_at,
            "completed_at": self.completed_at,
            "cancel_requested_at": self.cancel_requested_at,
            "runner_id": self.runner_id,
            "runner_name": self.runner_name,
            "runner_labels": list(self.runner_labels) if self.runner_labels is not None else None,
            "runner_registered_at": self.runner_registered_at,
            "runner_listening_at": self.runner_listening_at,
            "warm_hit": self.warm_hit(),
            "runner_group_id": self.runner_group_id,
            "runner_group_name": self.runner_group_name,
            "installation_id": self.installation_id,
            "environment": self.environment,
            "run_attempt": self.run_attempt,
            "rerun_of": self.rerun_of,
            "rerun_by": self.rerun_by,
        }

    def warm_hit(self) -> bool | None:
        """Was its runner listening before `queued` was sent? None until both are known."""
        if self.runner_listening_at is None or self.queued_sent_at is None:
            return None
        return self.runner_listening_at < self.queued_sent_at

    def snapshot(self) -> dict:
        """What a webhook payload or REST answer needs, copied under the lock."""
        snap = self.record()
        snap.update(
            name=self.name,
            workflow_name=self.workflow_name,
            head_branch=self.head_branch,
            head_sha=self.head_sha,
            app_id=self.app_id,
            owner_type=self.owner_type,
            deployment_id=self.deployment_id,
        )
        return snap


@dataclass
class Runner:
    id: int
    name: str
    scope: Scope
    labels: list[dict]
    group_id: int
    group_name: str
    group_allows_public: bool
    ephemeral: bool
    work_folder: str = "_work"
    os: str = "unknown"
    jit_secret_hash: str | None = None
    registered: bool = False
    session: str | None = None
    busy: bool = False
    job_id: int | None = None
    offer: int | None = None
    polling: bool = False
    last_seen: float | None = None
    wakeup: threading.Event = field(default_factory=threading.Event)
    # Ground truth (wall clock), kept after the runner is removed: see `State.runner_records`.
    startup_s: float | None = None  # the start-up its JIT config carries (None: no JIT)
    created_at: float | None = None
    registered_at: float | None = None
    listening_at: float | None = None
    took_job_id: int | None = None
    taken_at: float | None = None
    disconnected_at: float | None = None
    deleted_at: float | None = None
    # "delete" (REST), "job_done" (ephemeral, after its job), "lost_runner_timeout".
    removed_by: str | None = None
    # The version the runner reported when it opened its session, and when GitHub refused it
    # for being below the minimum (emulator.faults.RunnerFaults).
    version: str | None = None
    refused_at: float | None = None

    def record(self) -> dict:
        """The ground-truth view of this runner's life."""
        return {
            "runner_id": self.id,
            "name": self.name,
            "scope": {"kind": self.scope.kind, "name": self.scope.name},
            "labels": [label["name"] for label in self.labels],
            "ephemeral": self.ephemeral,
            "startup_s": self.startup_s,
            "created_at": self.created_at,
            "registered_at": self.registered_at,
            "listening_at": self.listening_at,
            "job_id": self.took_job_id,
            "taken_at": self.taken_at,
            "disconnected_at": self.disconnected_at,
            "deleted_at": self.deleted_at,
            "removed_by": self.removed_by,
            "version": self.version,
            "refused_at": self.refused_at,
        }

    def label_set(self) -> set[str]:
        return {label["name"].lower() for label in self.labels}

    def can_take(self, job: Job) -> bool:
        if not self.scope.covers(job.repository):
            return False
        if not job.private and self.scope.kind == "org" and not self.group_allows_public:
            return False
        return {label.lower() for label in job.labels} <= self.label_set()


class State:
    """All mutable emulator state. Every public method takes the lock; none blocks on I/O.

    `emit(action, snapshot)` is called under the lock for every webhook-worthy transition, so
    the order of emits per job is the order of transitions; it must only enqueue.
    """

    def __init__(
        self,
        *,
        emit: Callable[[str, dict], None] = lambda action, snap: None,
        clock: Clock | None = None,
        acquire_timeout_s: float = 10.0,
        lost_runner_timeout_s: float = 30.0,
        runner_offline_after_s: float = 60.0,
        heartbeat_interval_s: float = 5.0,
        runner_url: str = "",
        runner_startup_s: float = 0.0,
    ):
        self.emit = emit
        self.clock = clock or Clock()
        self.acquire_timeout_s = acquire_timeout_s
        self.lost_runner_timeout_s = lost_runner_timeout_s
        self.runner_offline_after_s = runner_offline_after_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.runner_url = runner_url
        self._runner_startup_s = runner_startup_s
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._jobs: dict[int, Job] = {}
        self._queued: dict[int, Job] = {}  # insertion order = queue order
        self._runners: dict[int, Runner] = {}
        # Every runner ever created, removed ones included (the ground truth's history).
        self._runner_history: dict[int, Runner] = {}
        self._idle: dict[int, Runner] = {}  # runners blocked in a poll, longest-waiting first
        self._sessions: dict[str, int] = {}
        self._label_ids: dict[str, int] = {}
        self._job_ids = itertools.count(30_000_000_001)
        self._run_ids = itertools.count(12_000_000_001)
        self._runner_ids = itertools.count(1)
        self._deployment_ids = itertools.count(900_000_001)
        # JIT configs issued (generate-jitconfig answered), per App id (None: no App known).
        self._jit_issued: dict[int | None, int] = {}

    # -- jobs ------------------------------------------------------------------------------

    def add_job(self, job_id: int | None, run_id: int | None, **fields) -> Job:
        with self._lock:
            if job_id is None:
                job_id = self._next_job_id()
            elif job_id in self._jobs:
                raise Unprocessable(f"job {job_id} already exists")
            job = Job(id=job_id, run_id=run_id or next(self._run_ids), **fields)
            job.head_sha = hashlib.sha1(str(job.id).encode(), usedforsecurity=False).hexdigest()
            if job.environment_wait_s is not None:
                job.deployment_id = next(self._deployment_ids)
                job.environment = job.environment or "production"
            else:
                job.environment = None
            self._jobs[job.id] = job
            return job

    def add_past_job(self, job_id: int | None, run_id: int | None, *, created_at: float,
                     started_at: float, completed_at: float, conclusion: str,
                     **fields) -> Job:
        """A job that ran and completed in the past (history for the REST listings): no
        webhook is sent, no runner takes it; its times are the given wall-clock seconds."""
        with self._lock:
            job = self.add_job(job_id, run_id, duration_s=completed_at - started_at,
                               planned_conclusion=conclusion, **fields)
            job.created_at = job.queued_at = created_at
            job.taken_at, job.completed_at = started_at, completed_at
            job.status, job.conclusion, job.completed_by = "completed", conclusion, "history"
            return job

    def arrive(self, job_id: int) -> None:
        """The job's workflow run reached it: it waits for approval or is queued."""
        with self._lock:
            job = self._job(job_id)
            if job.status != "pending":
                return
            job.created_at = self.clock.wall()
            if job.environment_wait_s is not None:
                job.status = "waiting"
                self.emit(job.waiting_action, job.snapshot())
            else:
                self._enqueue(job)

    def approve(self, job_id: int) -> None:
        """Environment approval granted: a second, separate `queued` delivery follows."""
        with self._lock:
            job = self._job(job_id)
            if job.status != "waiting":
                raise Conflict(f"job {job_id} is not waiting for approval (it is {job.status})")
            self._enqueue(job)

    def cancel(self, job_id: int) -> dict:
        with self._lock:
            job = self._job(job_id)
            if job.status == "completed":
                raise Conflict(f"job {job_id} is already completed")
            job.cancel_requested_at = self.clock.wall()
            if job.status == "in_progress":
                # The runner learns it from its next heartbeat and reports `cancelled`.
                return job.record()
            if job.status == "pending":
                # Cancelled before GitHub ever announced it: nothing is sent.
                job.created_at = job.cancel_requested_at
                self._finish(job, "cancelled", send=False, by="cancel")
                return job.record()
            self._queued.pop(job.id, None)
            if job.offered_to is not None:
                runner = self._runners.get(job.offered_to)
                if runner is not None and runner.offer == job.id:
                    runner.offer = None
                job.offered_to = None
            self._finish(job, "cancelled", by="cancel")
            return job.record()

    def rerun(self, job_id: int) -> Job:
        """GitHub's "re-run a job": the job's run must be completed (every job of its latest
        attempt), and the job must be of that latest attempt; the re-run is a new job of the
        same run, one attempt later, queued now (a `queued` webhook follows)."""
        with self._lock:
            job = self._job(job_id)
            if job.rerun_by is not None:
                raise Forbidden("This job was re-run already: re-run the latest attempt instead",
                                documentation_url=RERUN_DOC)
            latest = [other for other in self._jobs.values()
                      if other.run_id == job.run_id and other.rerun_by is None]
            if job.status != "completed" or any(o.status != "completed" for o in latest):
                raise Forbidden("This workflow is already running", documentation_url=RERUN_DOC)
            again = Job(
                id=self._next_job_id(), run_id=job.run_id, repository=job.repository,
                private=job.private, labels=list(job.labels), duration_s=job.duration_s,
                planned_conclusion=job.planned_conclusion, name=job.name,
                workflow_name=job.workflow_name, head_branch=job.head_branch,
                head_sha=job.head_sha, installation_id=job.installation_id, app_id=job.app_id,
                owner_type=job.owner_type, run_attempt=job.run_attempt + 1, rerun_of=job.id,
            )
            job.rerun_by = again.id
            self._jobs[again.id] = again
            again.created_at = self.clock.wall()
            self._enqueue(again)
            return again

    def _next_job_id(self) -> int:
        job_id = next(self._job_ids)
        while job_id in self._jobs:
            job_id = next(self._job_ids)
        return job_id

    def mark_sent(self, job_id: int, action: str, status: str, when: float) -> None:
        """The sender started POSTing a delivery: stamp the ground truth's `queued_sent_at`."""
        if action != "queued" or status != "queued":
            return
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.queued_sent_at is None:
                job.queued_sent_at = when

    def job_record(self, job_id: int) -> dict:
        with self._lock:
            return self._job(job_id).record()

    def job_snapshot(self, job_id: int) -> dict:
        with self._lock:
            return self._job(job_id).snapshot()

    def jobs(self) -> list[dict]:
        with self._lock:
            return [job.record() for job in self._jobs.values()]

    def repositories(self) -> list[dict]:
        """The repositories jobs were seen in, with their latest activity (`pushed_at`: when a
        job of it last arrived), as the REST API's repository listing needs them."""
        with self._lock:
            seen: dict[str, dict] = {}
            for job in self._jobs.values():
                if job.created_at is None:
                    continue  # not arrived yet: no push has happened
                repo = seen.setdefault(job.repository.lower(), {
                    "full_name": job.repository, "private": job.private,
                    "owner_type": job.owner_type, "pushed_at": job.created_at,
                    "created_at": job.created_at,
                })
                repo["pushed_at"] = max(repo["pushed_at"], job.created_at)
                repo["created_at"] = min(repo["created_at"], job.created_at)
            return list(seen.values())

    def workflow_runs(self, repository: str) -> list[dict]:
        """A repository's workflow runs, newest first: each run's arrived jobs (snapshots) and
        the run's status and conclusion as GitHub derives them from its jobs."""
        with self._lock:
            runs: dict[int, list[Job]] = {}
            attempts: dict[int, list[Job]] = {}
            for job in self._jobs.values():
                if job.repository.lower() != repository.lower() or job.status == "pending":
                    continue
                attempts.setdefault(job.run_id, []).append(job)
                # A re-run job is no longer its run's: its re-run (the latest attempt) is.
                if job.rerun_by is None:
                    runs.setdefault(job.run_id, []).append(job)
            out = []
            for run_id, jobs in runs.items():
                statuses = {job.status for job in jobs}
                status = next(
                    (s for s in ("in_progress", "queued", "waiting") if s in statuses),
                    "completed",
                )
                conclusion = None
                if status == "completed":
                    found = {job.conclusion for job in jobs}
                    conclusion = next(
                        (c for c in ("failure", "cancelled", "timed_out") if c in found), "success"
                    )
                out.append({
                    "run_id": run_id,
                    "run_attempt": max(job.run_attempt for job in jobs),
                    "status": status,
                    "conclusion": conclusion,
                    # A re-run keeps its run's creation time (GitHub's `created_at`).
                    "created_at": min(job.created_at or 0.0 for job in attempts[run_id]),
                    "started_at": min(job.created_at or 0.0 for job in jobs),
                    "updated_at": max(
                        max(job.created_at or 0.0, job.queued_at or 0.0, job.taken_at or 0.0,
                            job.completed_at or 0.0)
                        for job in jobs
                    ),
                    "jobs": [job.snapshot() for job in sorted(jobs, key=lambda j: j.id)],
                    # Every attempt's jobs (GitHub's `filter=all`).
                    "all_jobs": [job.snapshot()
                                 for job in sorted(attempts[run_id], key=lambda j: j.id)],
                })
            # GitHub lists runs newest first by creation.
            return sorted(out, key=lambda run: (-run["created_at"], -run["run_id"]))

    def wait_until_completed(self, job_ids: list[int], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if all(self._jobs[j].status == "completed" for j in job_ids if j in self._jobs):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 1.0))

    def _job(self, job_id: int) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        return job

    def _enqueue(self, job: Job) -> None:
        job.status = "queued"
        job.queued_at = self.clock.wall()
        self._queued[job.id] = job
        self.emit("queued", job.snapshot())
        self._dispatch(job)

    def _dispatch(self, job: Job) -> None:
        for runner in self._idle.values():
            if runner.can_take(job):
                self._offer(runner, job)
                return

    def _offer(self, runner: Runner, job: Job) -> None:
        self._queued.pop(job.id, None)
        job.offered_to = runner.id
        job.offered_at = self.clock.mono()
        runner.offer = job.id
        runner.polling = False
        self._idle.pop(runner.id, None)
        runner.wakeup.set()

    def _finish(self, job: Job, conclusion: str, by: str, send: bool = True) -> None:
        job.status = "completed"
        job.conclusion = conclusion
        job.completed_by = by
        job.completed_at = self.clock.wall()
        if send:
            self.emit("completed", job.snapshot())
        self._changed.notify_all()

    # -- runners: the REST side ------------------------------------------------------------

    def create_runner(
        self,
        scope: Scope,
        name: str,
        labels: list[str],
        group: tuple[int, str, bool],
        work_folder: str = "_work",
        ephemeral: bool = True,
        jit: bool = True,
        app_id: int | None = None,
    ) -> tuple[Runner, str | None]:
        """A new runner (offline until it registers); with `jit`, also its encoded JIT config,
        counted for `app_id` (see `jit_issued`)."""
        with self._lock:
            if any(
                r.scope.key == scope.key and r.name.lower() == name.lower()
                for r in self._runners.values()
            ):
                raise Conflict(
                    f"Already exists - A runner with the name {name} already exists.",
                    documentation_url="https://docs.github.com/rest/actions/self-hosted-runners",
                )
            runner = Runner(
                id=next(self._runner_ids),
                name=name,
                scope=scope,
                labels=self._labels(labels),
                group_id=group[0],
                group_name=group[1],
                group_allows_public=group[2],
                ephemeral=ephemeral,
                work_folder=work_folder,
                created_at=self.clock.wall(),
            )
            blob = None
            if jit:
                secret = secrets.token_urlsafe(32)
                runner.jit_secret_hash = _digest(secret)
                runner.startup_s = self._runner_startup_s
                blob = _encode_jit_config(self.runner_url, runner, secret)
                self._jit_issued[app_id] = self._jit_issued.get(app_id, 0) + 1
            self._runners[runner.id] = runner
            self._runner_history[runner.id] = runner
            return runner, blob

    @property
    def runner_startup_s(self) -> float:
        with self._lock:
            return self._runner_startup_s

    def set_runner_startup(self, seconds: float) -> None:
        """The start-up written into JIT configs issued from now on (already checked)."""
        with self._lock:
            self._runner_startup_s = seconds

    def runner_records(self) -> list[dict]:
        """Every runner ever created, in creation order, removed ones included."""
        with self._lock:
            return [runner.record() for runner in self._runner_history.values()]

    def jit_issued(self) -> dict[int | None, int]:
        """JIT configs issued so far, per App id: GitHub's own count of registrations."""
        with self._lock:
            return dict(self._jit_issued)

    def runners(self, scope: Scope | None = None, with_scope: bool = False) -> list[dict]:
        with self._lock:
            views = []
            for runner in self._runners.values():
                if scope is None or runner.scope.key == scope.key:
                    view = self._runner_view(runner)
                    if with_scope:
                        view["scope"] = {"kind": runner.scope.kind, "name": runner.scope.name}
                        view["registered"] = runner.registered
                    views.append(view)
            return views

    def runner(self, scope: Scope, runner_id: int) -> dict:
        with self._lock:
            return self._runner_view(self._scoped_runner(scope, runner_id))

    def delete_runner(self, scope: Scope, runner_id: int) -> None:
        with self._lock:
            runner = self._scoped_runner(scope, runner_id)
            if runner.busy:
                raise Unprocessable(
                    f'Bad request - Runner "{runner.name}" is still running a job"',
                    documentation_url="https://docs.github.com/rest/actions/self-hosted-runners"
                    "#delete-a-self-hosted-runner-from-an-organization",
                )
            self._remove_runner(runner, by="delete")

    def set_labels(self, scope: Scope, runner_id: int, labels: list[str], mode: str) -> list:
        """mode: `add`, `set` (replace the custom labels) or `remove` (one label)."""
        with self._lock:
            runner = self._scoped_runner(scope, runner_id)
            read_only = [lab for lab in runner.labels if lab["type"] == "read-only"]
            custom = [lab for lab in runner.labels if lab["type"] == "custom"]
            if mode == "add":
                known = runner.label_set()
                custom += self._labels([n for n in labels if n.lower() not in known])
            elif mode == "set":
                custom = self._labels(labels)
            elif mode == "remove":
                wanted = labels[0].lower()
                if wanted not in {lab["name"].lower() for lab in custom}:
                    raise NotFound(
                        f"Label {labels[0]} not found",
                        documentation_url="https://docs.github.com/rest/actions/"
                        "self-hosted-runners",
                    )
                custom = [lab for lab in custom if lab["name"].lower() != wanted]
            runner.labels = read_only + custom
            if runner.polling:
                self._match_runner(runner)
            return [dict(lab) for lab in runner.labels]

    def _labels(self, names: list[str]) -> list[dict]:
        out, seen = [], set()
        for name in names:
            if name.lower() in seen:
                continue
            seen.add(name.lower())
            label_id = self._label_ids.setdefault(name.lower(), len(self._label_ids) + 1)
            kind = "read-only" if name.lower() in READ_ONLY_LABELS else "custom"
            out.append({"id": label_id, "name": name, "type": kind})
        return out

    def _scoped_runner(self, scope: Scope, runner_id: int) -> Runner:
        runner = self._runners.get(runner_id)
        if runner is None or runner.scope.key != scope.key:
            raise NotFound(
                documentation_url="https://docs.github.com/rest/actions/self-hosted-runners"
            )
        return runner

    def _runner_view(self, runner: Runner) -> dict:
        recently = (
            runner.last_seen is not None
            and self.clock.mono() - runner.last_seen < self.runner_offline_after_s
        )
        online = runner.registered and (
            runner.polling or runner.busy or runner.offer is not None or recently
        )
        return {
            "id": runner.id,
            "name": runner.name,
            "os": runner.os,
            "status": "online" if online else "offline",
            "busy": runner.busy,
            "ephemeral": runner.ephemeral,
            "runner_group_id": runner.group_id,
            "labels": [dict(lab) for lab in runner.labels],
        }

    def _remove_runner(self, runner: Runner, by: str) -> None:
        if runner.id in self._runners:
            runner.deleted_at = self.clock.wall()
            runner.removed_by = by
        self._runners.pop(runner.id, None)
        self._idle.pop(runner.id, None)
        if runner.session:
            self._sessions.pop(runner.session, None)
        if runner.offer is not None:
            self._withdraw(runner)
        runner.wakeup.set()  # a poll in progress returns and finds the runner gone

    # -- runners: the runner protocol ------------------------------------------------------

    def register_jit(self, blob: str, os_name: str = "Linux", version: str | None = None,
                     refuse=None, refused=None) -> dict:
        """A JIT runner opens its session. `refuse(version)`: GitHub's minimum runner version
        (emulator.faults.RunnerFaults.refuses): an older runner is answered 403 as GitHub
        answers it, its registration kept (ground truth: `version`, `refused_at`); `refused()`
        counts it."""
        config = decode_jit_config(blob)
        with self._lock:
            runner = self._runners.get(config["runner_id"])
            if runner is None or runner.jit_secret_hash is None:
                raise NotFound("the runner of this JIT config no longer exists")
            if not hmac.compare_digest(runner.jit_secret_hash, _digest(config["secret"])):
                raise Unauthorized("invalid JIT config")
            if runner.registered:
                raise Conflict("this JIT config was already used to register a runner")
            runner.version = version
            if refuse is not None and refuse(version):
                runner.refused_at = self.clock.wall()
                if refused is not None:
                    refused()
                raise Forbidden(f"Runner version v{version} is deprecated and cannot receive "
                                "messages.")
            return self._start_session(runner, os_name)

    def register_with_token(
        self, scope: Scope, name: str, labels: list[str], ephemeral: bool, group: tuple
    ) -> dict:
        """config.sh's path: a registration token, the default labels plus the given ones."""
        runner, _ = self.create_runner(
            scope, name, DEFAULT_RUNNER_LABELS + labels, group, ephemeral=ephemeral, jit=False
        )
        with self._lock:
            return self._start_session(runner, "Linux")

    def _start_session(self, runner: Runner, os_name: str) -> dict:
        runner.registered = True
        runner.os = os_name
        runner.session = secrets.token_urlsafe(32)
        runner.last_seen = self.clock.mono()
        runner.registered_at = self.clock.wall()
        self._sessions[runner.session] = runner.id
        return {
            "session": runner.session,
            "runner_id": runner.id,
            "runner_name": runner.name,
            "ephemeral": runner.ephemeral,
            "heartbeat_interval_s": self.heartbeat_interval_s,
        }

    def poll(self, session: str, timeout: float) -> dict | None:
        """Block until a job is offered to this runner (its offer) or `timeout` passes (None)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                runner = self._session_runner(session)
                runner.last_seen = self.clock.mono()
                if runner.listening_at is None:
                    runner.listening_at = self.clock.wall()
                if runner.busy:
                    raise Conflict("this runner is already running a job")
                if runner.offer is None and not runner.polling:
                    self._match_runner(runner)
                if runner.offer is not None:
                    return self._offer_view(self._jobs[runner.offer])
                if time.monotonic() >= deadline:
                    runner.polling = False
                    self._idle.pop(runner.id, None)
                    return None
                if not runner.polling:
                    runner.polling = True
                    self._idle[runner.id] = runner
                runner.wakeup.clear()
                wakeup = runner.wakeup
            wakeup.wait(max(0.0, deadline - time.monotonic()))

    def _match_runner(self, runner: Runner) -> None:
        for job in self._queued.values():
            if runner.can_take(job):
                self._offer(runner, job)
                return

    def _offer_view(self, job: Job) -> dict:
        return {
            "job_id": job.id,
            "run_id": job.run_id,
            "repository": job.repository,
            "labels": list(job.labels),
            "acquire_timeout_s": self.acquire_timeout_s,
        }

    def acquire(self, session: str, job_id: int) -> dict:
        """The runner takes the offered job: now it is in progress (and `in_progress` is sent)."""
        with self._lock:
            runner = self._session_runner(session)
            runner.last_seen = self.clock.mono()
            job = self._jobs.get(job_id)
            if runner.offer != job_id or job is None or job.status != "queued":
                if runner.offer == job_id:
                    runner.offer = None
                raise Conflict(f"job {job_id} is not offered to this runner (any more)")
            runner.offer = None
            runner.busy = True
            runner.job_id = job.id
            job.offered_to = None
            job.status = "in_progress"
            job.taken_at = self.clock.wall()
            runner.took_job_id = job.id
            runner.taken_at = job.taken_at
            job.runner_registered_at = runner.registered_at
            job.runner_listening_at = runner.listening_at
            job.runner_id = runner.id
            job.runner_name = runner.name
            job.runner_labels = sorted(runner.label_set())
            job.runner_group_id = runner.group_id
            job.runner_group_name = runner.group_name
            self.emit("in_progress", job.snapshot())
            return {
                "job_id": job.id,
                "run_id": job.run_id,
                "repository": job.repository,
                "labels": list(job.labels),
                "duration_s": job.duration_s,
                "conclusion": job.runner_reports or job.planned_conclusion,
                "heartbeat_interval_s": self.heartbeat_interval_s,
            }

    def heartbeat(self, session: str, job_id: int) -> dict:
        with self._lock:
            runner = self._session_runner(session)
            if runner.job_id != job_id:
                raise NotFound(f"job {job_id} is not running on this runner")
            runner.last_seen = self.clock.mono()
            return {"cancelled": self._jobs[job_id].cancel_requested_at is not None}

    def complete(self, session: str, job_id: int, conclusion: str) -> dict:
        with self._lock:
            runner = self._session_runner(session)
            if runner.job_id != job_id:
                raise NotFound(f"job {job_id} is not running on this runner")
            job = self._jobs[job_id]
            if job.cancel_requested_at is not None:
                conclusion = "cancelled"
            runner.busy = False
            runner.job_id = None
            runner.last_seen = self.clock.mono()
            self._finish(job, conclusion, by="runner")
            if runner.ephemeral:
                # An ephemeral runner is deregistered after its one job, as on GitHub.
                self._remove_runner(runner, by="job_done")
            return {"deregistered": runner.ephemeral}

    def disconnect(self, session: str) -> None:
        """The runner is going away (SIGTERM while idle): its session ends, so no poll of it
        (not even one still blocked on a dead connection) is offered a job; it stays listed,
        offline, until deleted."""
        with self._lock:
            runner = self._session_runner(session)
            self._sessions.pop(session, None)
            runner.session = None
            runner.polling = False
            runner.last_seen = None
            runner.disconnected_at = self.clock.wall()
            self._idle.pop(runner.id, None)
            if runner.offer is not None:
                self._withdraw(runner)
            runner.wakeup.set()

    def _session_runner(self, session: str) -> Runner:
        runner_id = self._sessions.get(session)
        runner = self._runners.get(runner_id) if runner_id is not None else None
        if runner is None:
            raise Unauthorized("unknown runner session (the runner was removed)")
        return runner

    def _withdraw(self, runner: Runner) -> None:
        """Take an un-acquired offer back; the job goes to the head of the queue."""
        job = self._jobs.get(runner.offer)
        runner.offer = None
        if job is None or job.status != "queued":
            return
        job.offered_to = None
        self._queued = {job.id: job, **self._queued}
        self._dispatch(job)

    # -- time-outs -------------------------------------------------------------------------

    def reap(self) -> None:
        """Withdraw offers nobody acquired and fail the jobs of runners that went silent."""
        with self._lock:
            now = self.clock.mono()
            for runner in list(self._runners.values()):
                if runner.offer is not None:
                    job = self._jobs.get(runner.offer)
                    if job is None or now - job.offered_at > self.acquire_timeout_s:
                        runner.last_seen = None  # it did not answer: treat it as offline
                        self._withdraw(runner)
                if runner.busy and now - (runner.last_seen or 0) > self.lost_runner_timeout_s:
                    job = self._jobs[runner.job_id]
                    runner.busy = False
                    runner.job_id = None
                    cancelled = job.cancel_requested_at is not None
                    self._finish(job, "cancelled" if cancelled else "failure",
                                 by="lost_runner_timeout")
                    self._remove_runner(runner, by="lost_runner_timeout")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _encode_jit_config(url: str, runner: Runner, secret: str) -> str:
    # Like GitHub's: base64 of JSON naming the service URL and the runner, plus a secret that
    # only this emulator can match (it keeps a hash, not the secret).
    doc = {
        "v": JIT_CONFIG_VERSION,
        "url": url,
        "runner_id": runner.id,
        "runner_name": runner.name,
        "work_folder": runner.work_folder,
        # The stand-in sleeps this long before registering (the real runner's start-up);
        # absent in older blobs, which the stand-in reads as 0.
        "startup_s": runner.startup_s or 0.0,
        "secret": secret,
    }
    return base64.b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode()


def decode_jit_config(blob: str) -> dict:
    try:
        doc = json.loads(base64.b64decode(blob.strip(), validate=True))
        if doc.get("v") != JIT_CONFIG_VERSION:
            raise ValueError("unknown JIT config version")
        doc["runner_id"] = int(doc["runner_id"])
        if not isinstance(doc["secret"], str) or not isinstance(doc["url"], str):
            raise ValueError("malformed")
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise BadRequest("invalid JIT config") from exc
    return doc
