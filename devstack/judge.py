"""The judge of `make demo` and `make chaos`: did every job end as planned, by ground truth?

It reads only what RunnerHub cannot write: the workload's own plan, the pools file (routed by
a rule written here, independently of `chalicelib.pools.route`), the GitHub emulator's record
of each job, and Docker's event stream of runner containers. RunnerHub's job records are read
only to be judged (`stuck`). Everything here is pure: `judge()` takes plain data and returns a
`Verdict`; the callers collect the data.

The counts (docs/benchmarks.md, "The judge"):
- lost: a job a pool should serve that GitHub did not complete with its planned conclusion
  through a runner's own report: never taken, taken and never finished, failed by GitHub's
  lost-runner time-out, or finished with another conclusion. A planned cancellation counts as
  done when GitHub cancelled it (or, when it came after the job ended, as the plain job).
- stuck: RunnerHub's record disagrees with GitHub after the settling period: not `completed`
  with GitHub's conclusion for a job GitHub completed, or `completed` while GitHub still has
  the job open.
- over_commit: moments when more runner containers ran at once on a host than its slots.
- cross_pool: jobs run by a runner of another pool than the one they route to, per
  "routed->ran" pair. Not a failure (GitHub may hand a job to any idle runner whose labels
  cover it); it is cost.
- timed_out: jobs still unsettled when the wait gave up; any is a failure.
"""

from __future__ import annotations

import tomllib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# How GitHub ended a job (the emulator's `completed_by`).
BY_RUNNER = "runner"
BY_LOST_RUNNER_TIMEOUT = "lost_runner_timeout"


@dataclass(frozen=True)
class PoolRule:
    """A pool as the judge reads it from the pools file."""

    name: str
    labels: frozenset[str]
    owner: str
    repositories: frozenset[str] | None  # None: every repository of the owner
    allow_public: bool = False
    slots: int | None = None

    def serves(self, labels: Iterable[str], repository: str, private: bool) -> bool:
        owner, _, repo = repository.lower().partition("/")
        wanted = {label.lower() for label in labels}
        return (bool(wanted) and wanted <= self.labels and owner == self.owner
                and (self.repositories is None or repo in self.repositories)
                and (private or self.allow_public))


def read_pools(path: Path) -> list[PoolRule]:
    """The pools file, read with tomllib alone (not RunnerHub's loader)."""
    data = tomllib.loads(path.read_text())
    rules = []
    for pool in data.get("pool", []):
        scope = pool.get("scope", {})
        repos = scope.get("repositories")
        rules.append(PoolRule(
            name=pool["name"],
            labels=frozenset(label.lower() for label in pool["labels"]),
            owner=scope["owner"].lower(),
            repositories=frozenset(r.lower() for r in repos) if repos else None,
            allow_public=bool(pool.get("allow_public_repos", False)),
        ))
    return rules


def expected_pool(rules: list[PoolRule], labels: Iterable[str], repository: str,
                  private: bool) -> str | None:
    """The pool that should serve a job: among pools whose labels cover the job's and whose
    scope covers its repository, the fewest extra labels, then the name."""
    labels = list(labels)
    matches = [r for r in rules if r.serves(labels, repository, private)]
    if not matches:
        return None
    wanted = {label.lower() for label in labels}
    return min(matches, key=lambda r: (len(r.labels - wanted), r.name)).name


def pool_of_runner(rules: list[PoolRule], runner_labels: Iterable[str] | None) -> str | None:
    """Which pool a runner belongs to, from the labels GitHub saw on it."""
    if runner_labels is None:
        return None
    labels = {label.lower() for label in runner_labels}
    for rule in rules:
        if rule.labels == labels:
            return rule.name
    return None


@dataclass(frozen=True)
class PlannedJob:
    """What the workload planned for one job (the emulator's job id)."""

    job_id: int
    pool: str | None  # None: no pool should serve it
    conclusion: str
    cancelled: bool = False  # the workload cancels it


@dataclass(frozen=True)
class ContainerEvent:
    """One Docker event of a runner container: `start`, `kill` (someone stopped it) or
    `die`; `runner` is its runner's name (the container's `runnerhub.runner` label)."""

    time: float
    host: str
    container: str
    action: str
    runner: str = ""


@dataclass(frozen=True)
class Verdict:
    jobs: int
    lost: dict[int, str]  # job id -> why
    stuck: dict[int, str]
    over_commit: int
    max_running: dict[str, int]  # host -> most runner containers at once
    cross_pool: dict[str, int]  # "routed->ran" -> jobs
    timed_out: int
    pickup_by_pool: dict[str, dict[str, float | None]] = field(default_factory=dict)

    @property
    def failures(self) -> int:
        return len(self.lost) + len(self.stuck) + self.over_commit + self.timed_out

    @property
    def ok(self) -> bool:
        return self.failures == 0

    def counts(self) -> dict:
        return {"jobs": self.jobs, "lost": len(self.lost), "stuck": len(self.stuck),
                "over_commit": self.over_commit, "timed_out": self.timed_out,
                "cross_pool": dict(sorted(self.cross_pool.items())),
                "pickup_by_pool": self.pickup_by_pool}


def lost_reason(plan: PlannedJob, truth: Mapping | None) -> str | None:
    """Why GitHub did not end a job as planned through a runner's report; None: it did."""
    if truth is None:
        return "unknown to GitHub"
    status, conclusion = truth.get("status"), truth.get("conclusion")
    if plan.cancelled and status == "completed" and conclusion == "cancelled":
        return None  # a cancellation that came too late is judged as the plain job below
    if status != "completed":
        return "never taken" if truth.get("taken_at") is None else "taken, never finished"
    if truth.get("completed_by") == BY_LOST_RUNNER_TIMEOUT:
        return "failed by GitHub's lost-runner time-out"
    if truth.get("completed_by") != BY_RUNNER:
        return f"ended by {truth.get('completed_by')}, not a runner"
    if conclusion != plan.conclusion:
        return f"conclusion {conclusion}, planned {plan.conclusion}"
    return None


def stuck_reason(truth: Mapping | None, record: Mapping | None) -> str | None:
    """Whether RunnerHub's record disagrees with GitHub's."""
    if truth is None:
        return None
    state = (record or {}).get("state")
    if truth.get("status") == "completed":
        if truth.get("queued_at") is None:
            return None  # cancelled before GitHub ever announced it: nothing to record
        if state != "completed":
            return f"GitHub completed it, RunnerHub has {state}"
        if record.get("conclusion") != truth.get("conclusion"):
            return (f"conclusion {record.get('conclusion')}, GitHub has "
                    f"{truth.get('conclusion')}")
        return None
    if state == "completed":
        return f"RunnerHub completed it while GitHub has it {truth.get('status')}"
    return None


def running_peaks(events: Iterable[ContainerEvent], slots: Mapping[str, int]
                  ) -> tuple[int, dict[str, int]]:
    """(moments over a host's slots, most containers running at once per host), by replaying
    Docker's start/die events in time order. A container counts once however often it is
    reported started; a die of a container never seen starting (it started before the
    stream) is ignored."""
    running: dict[str, set[str]] = {}
    peaks: dict[str, int] = {}
    over = 0
    for event in sorted(events, key=lambda e: (e.time, e.action != "die")):
        on_host = running.setdefault(event.host, set())
        if event.action == "start":
            if event.container in on_host:
                continue
            on_host.add(event.container)
            peaks[event.host] = max(peaks.get(event.host, 0), len(on_host))
            limit = slots.get(event.host)
            if limit is not None and len(on_host) > limit:
                over += 1
        elif event.action == "die":
            on_host.discard(event.container)
    return over, peaks


def busy_killed(events: Iterable[ContainerEvent], truth: Mapping[int, Mapping]
                ) -> dict[int, str]:
    """Jobs whose runner container was stopped (Docker's `kill`) while GitHub had the job
    running on that runner: taken before the kill and not completed by then. A runner that
    exits on its own after its job has no `kill`; a surplus idle runner stopped before any
    job was handed to it has no job. Scale-in must never produce one."""
    running_on: dict[str, tuple[int, float, float | None]] = {}
    for job_id, seen in truth.items():
        if seen.get("runner_name") and seen.get("taken_at") is not None:
            running_on[seen["runner_name"]] = (job_id, seen["taken_at"], seen.get("completed_at"))
    killed: dict[int, str] = {}
    for event in sorted(events, key=lambda e: e.time):
        if event.action != "kill" or event.runner not in running_on:
            continue
        job_id, taken_at, completed_at = running_on[event.runner]
        if taken_at <= event.time and (completed_at is None or completed_at > event.time):
            killed.setdefault(job_id, f"runner {event.runner} on {event.host or '?'} stopped "
                                      f"{event.time - taken_at:.1f}s into the job")
    return killed


def busy_at_termination(events: Iterable[ContainerEvent], truth: Mapping[int, Mapping],
                        terminated: Mapping[str, float]) -> dict[int, str]:
    """Jobs whose runner container was still running on a host when its instance was
    terminated (`terminated`: host -> when the instance left its group, from the Auto Scaling
    API), while GitHub had the job running on that runner. The scaler may terminate only idle
    hosts, and a drained host exits before its instance goes: either way no container of a
    running job is left when it does. (A daemon that drains after the fact would save the job
    and hide the mistake from `busy_killed`; this does not.)"""
    running: dict[str, dict[str, str]] = {}  # host -> container -> runner
    found: dict[int, str] = {}
    jobs_of = {seen["runner_name"]: (job_id, seen) for job_id, seen in truth.items()
               if seen.get("runner_name")}
    moments = sorted(((at, host) for host, at in terminated.items()), key=lambda m: m[0])
    timeline = sorted(events, key=lambda e: (e.time, e.action != "die"))
    index = 0
    for at, host in moments:
        while index < len(timeline) and timeline[index].time <= at:
            event = timeline[index]
            on_host = running.setdefault(event.host, {})
            if event.action == "start":
                on_host[event.container] = event.runner
            elif event.action == "die":
                on_host.pop(event.container, None)
            index += 1
        for runner in running.get(host, {}).values():
            job_id, seen = jobs_of.get(runner, (None, {}))
            taken, completed = seen.get("taken_at"), seen.get("completed_at")
            if job_id is not None and taken is not None and taken <= at and (
                    completed is None or completed > at):
                found.setdefault(job_id, f"runner {runner} was running it when {host} was "
                                         f"terminated")
    return found


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def pickup_s(truth: Mapping) -> float | None:
    """GitHub's own pickup: `queued` sent -> job taken."""
    if truth.get("taken_at") is None or truth.get("queued_sent_at") is None:
        return None
    return truth["taken_at"] - truth["queued_sent_at"]


def judge(plan: Iterable[PlannedJob], truth: Mapping[int, Mapping],
          records: Mapping[int, Mapping], rules: list[PoolRule],
          events: Iterable[ContainerEvent] = (), slots: Mapping[str, int] | None = None,
          timed_out: int = 0) -> Verdict:
    """Judge a finished workload. `truth`: the emulator's job records by id; `records`:
    RunnerHub's job records by id; `events`: Docker's start/die events of runner containers;
    `slots`: each host's slots; `timed_out`: jobs unsettled when the wait gave up."""
    lost: dict[int, str] = {}
    stuck: dict[int, str] = {}
    cross: Counter = Counter()
    pickups: dict[str, list[float]] = {}
    served = [p for p in plan if p.pool is not None]
    for job in served:
        seen = truth.get(job.job_id)
        why = lost_reason(job, seen)
        if why:
            lost[job.job_id] = why
        why = stuck_reason(seen, records.get(job.job_id))
        if why:
            stuck[job.job_id] = why
        if seen is None:
            continue
        ran = pool_of_runner(rules, seen.get("runner_labels"))
        if seen.get("runner_name") and ran != job.pool:
            cross[f"{job.pool}->{ran or 'unknown'}"] += 1
        waited = pickup_s(seen)
        if waited is not None:
            pickups.setdefault(job.pool, []).append(waited)
    over, peaks = running_peaks(events, slots or {})
    return Verdict(
        jobs=len(served), lost=lost, stuck=stuck, over_commit=over, max_running=peaks,
        cross_pool=dict(cross), timed_out=timed_out,
        pickup_by_pool={
            pool: {"jobs": len(values), "p50_s": _round(percentile(values, 0.5)),
                   "p95_s": _round(percentile(values, 0.95))}
            for pool, values in sorted(pickups.items())
        },
    )


def settled(plan: Iterable[PlannedJob], truth: Mapping[int, Mapping],
            records: Mapping[int, Mapping]) -> list[int]:
    """The served jobs not yet settled: GitHub has not completed them, or RunnerHub's record
    does not yet agree. A wait is over when this is empty."""
    open_jobs = []
    for job in plan:
        if job.pool is None:
            continue
        seen = truth.get(job.job_id)
        if seen is None or seen.get("status") != "completed" or \
                stuck_reason(seen, records.get(job.job_id)):
            open_jobs.append(job.job_id)
    return open_jobs


def plan_workload(workload: Mapping, job_ids: list[int], rules: list[PoolRule]
                  ) -> list[PlannedJob]:
    """The plan of a workload (its JSON form) whose jobs the emulator created as `job_ids`
    (in order). A job's pool is its own `expected_pool` where the caller set one, else the
    judge's routing rule."""
    planned = []
    for job_id, spec in zip(job_ids, workload["jobs"], strict=True):
        pool = spec.get("expected_pool", _UNSET)
        if pool is _UNSET:
            pool = expected_pool(rules, spec["labels"], spec["repository"],
                                 spec.get("private", True))
        planned.append(PlannedJob(job_id=job_id, pool=pool,
                                  conclusion=spec.get("conclusion", "success"),
                                  cancelled=spec.get("cancel_at_s") is not None))
    return planned


_UNSET = object()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
