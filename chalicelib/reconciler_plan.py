"""The reconciler's decisions, as pure functions that return frozen dataclasses.

Nothing here calls AWS or GitHub: `chalicelib.reconciler` gathers the inputs, asks these
functions what to do, and carries the answers out in one place. So every rule (what counts as a
lost webhook, a stuck job, an orphan runner) is tested by name without a server.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from chalicelib.github import RunnerScope
from chalicelib.jobs import JobState
from chalicelib.pools import PoolConfig

# GitHub keeps webhook deliveries (and lets an App redeliver them) for 3 days.
# https://docs.github.com/en/webhooks/testing-and-troubleshooting-webhooks/redelivering-webhooks
GITHUB_DELIVERY_RETENTION_S = 3 * 24 * 3600
# Every runner the executor registers is named `rh-<job>-<generation>-<hex>`
# (executor.daemon.runner_name); other runners in the organisation are never touched.
RUNNER_PREFIX = "rh-"
WORKFLOW_JOB = "workflow_job"
DONE = "done"  # chalicelib.deliveries.DONE, the only status that means "processed"

STUCK_STATES = (
    JobState.RECEIVED,
    JobState.DISPATCHED,
    JobState.CLAIMED,
    JobState.RUNNER_STARTED,
)
# States in which an executor holds the job by a lease (host id + lease_until).
LEASED_STATES = frozenset({JobState.CLAIMED, JobState.RUNNER_STARTED})


@dataclass(frozen=True)
class Policy:
    """The reconciler's thresholds and per-run budgets (from ReconcilerSettings)."""

    # A job with no progress this long in received/claimed/runner_started is checked on GitHub.
    stuck_after_s: float = 300.0
    # A dispatched job's demand may simply be waiting for capacity on its queue: wait longer,
    # since a re-demand sends the job to the back of the line.
    dispatched_stuck_after_s: float = 900.0
    redeliver_every_s: float = 600.0
    max_redeliveries: int = 5
    # How far back the first run (or a run after a long outage) looks at deliveries.
    delivery_lookback_s: float = 6 * 3600.0
    delivery_pages_per_run: int = 5
    redeliveries_per_run: int = 50
    jobs_per_run: int = 50
    # A runner of ours seen offline on GitHub this long (across runs) is deleted.
    orphan_grace_s: float = 300.0
    # Bounds of what the state item remembers (DynamoDB items are at most 400 KB).
    max_pending: int = 500
    max_offline_tracked: int = 2000

    def stuck_after(self, state: JobState) -> float:
        if state is JobState.DISPATCHED:
            return self.dispatched_stuck_after_s
        return self.stuck_after_s


DEFAULT_POLICY = Policy()


# --- lost webhooks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One row of GitHub's delivery log: one attempt to deliver one event (guid)."""

    id: int
    guid: str
    event: str
    status_code: int
    delivered_at: float
    action: str | None = None
    redelivery: bool = False

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300

    @classmethod
    def from_github(cls, item: Mapping[str, Any]) -> Attempt:
        """GitHub's summary -> Attempt; ValueError/KeyError/TypeError on a malformed row."""
        delivered = datetime.fromisoformat(str(item["delivered_at"]).replace("Z", "+00:00"))
        return cls(
            id=int(item["id"]),
            guid=str(item["guid"]),
            event=str(item.get("event") or ""),
            status_code=int(item.get("status_code") or 0),
            delivered_at=delivered.timestamp(),
            action=item.get("action"),
            redelivery=bool(item.get("redelivery")),
        )


@dataclass(frozen=True)
class Pending:
    """A guid whose delivery failed and that RunnerHub has not processed yet."""

    guid: str
    delivery_id: int  # the newest failed attempt: what to ask GitHub to redeliver
    first_seen: float  # when GitHub first tried it (redelivery is possible for 3 days)


@dataclass(frozen=True)
class Mark:
    """The reconciler's own record of redelivering a guid (`redeliver#<guid>` item)."""

    last_at: float
    attempts: int


@dataclass(frozen=True)
class Redeliver:
    guid: str
    delivery_id: int
    attempt: int  # 1 for the first redelivery of this guid


@dataclass(frozen=True)
class Abandoned:
    pending: Pending
    reason: str  # "too_many_redeliveries", "older_than_github_keeps", "too_many_pending"


@dataclass(frozen=True)
class DeliveryPlan:
    redeliver: tuple[Redeliver, ...]
    pending: tuple[Pending, ...]  # still unprocessed: kept for later runs (redelivered included)
    settled: tuple[str, ...]
    abandoned: tuple[Abandoned, ...]
    deferred: int  # redelivered less than `redeliver_every_s` ago: waits


def candidate_guids(attempts: Iterable[Attempt], pending: Iterable[Pending]) -> list[str]:
    """The guids whose RunnerHub record must be read to plan: failed workflow_job attempts,
    and the guids still pending from earlier runs."""
    guids = {p.guid for p in pending}
    guids |= {a.guid for a in attempts if a.event == WORKFLOW_JOB and not a.ok}
    return sorted(guids)


def plan_deliveries(
    attempts: Sequence[Attempt],
    pending: Sequence[Pending],
    processed: Mapping[str, str],
    marks: Mapping[str, Mark],
    now: float,
    policy: Policy = DEFAULT_POLICY,
) -> DeliveryPlan:
    """Which failed deliveries to redeliver now.

    `attempts` are the new rows of GitHub's log; `pending` what earlier runs left; `processed`
    RunnerHub's delivery log status per guid; `marks` past redeliveries per guid. A guid is
    settled when RunnerHub recorded it `done`, or when GitHub got a 2xx for it and RunnerHub
    keeps no record (an event it answers without storing, e.g. a job for no pool). A `failed` or
    `processing` record is not settled even after a 2xx: a redelivery answered "duplicate" while
    the first attempt was still running proves nothing.
    """
    jobs = [a for a in attempts if a.event == WORKFLOW_JOB]
    answered = {a.guid for a in jobs if a.ok}
    candidates: dict[str, Pending] = {p.guid: p for p in pending}
    for attempt in sorted(jobs, key=lambda a: a.id):
        if attempt.ok:
            continue
        known = candidates.get(attempt.guid)
        if known is None:
            candidates[attempt.guid] = Pending(attempt.guid, attempt.id, attempt.delivered_at)
        else:
            candidates[attempt.guid] = Pending(
                attempt.guid,
                max(attempt.id, known.delivery_id),
                min(attempt.delivered_at, known.first_seen),
            )
    redeliver: list[Redeliver] = []
    keep: list[Pending] = []
    settled: list[str] = []
    abandoned: list[Abandoned] = []
    deferred = 0
    # Oldest first: closest to GitHub's retention limit.
    for item in sorted(candidates.values(), key=lambda p: (p.first_seen, p.guid)):
        status = processed.get(item.guid)
        if status == DONE or (status is None and item.guid in answered):
            settled.append(item.guid)
            continue
        mark = marks.get(item.guid)
        attempts_made = mark.attempts if mark else 0
        if attempts_made >= policy.max_redeliveries:
            abandoned.append(Abandoned(item, "too_many_redeliveries"))
            continue
        if now - item.first_seen > GITHUB_DELIVERY_RETENTION_S:
            abandoned.append(Abandoned(item, "older_than_github_keeps"))
            continue
        keep.append(item)
        if mark and now - mark.last_at < policy.redeliver_every_s:
            deferred += 1
        elif len(redeliver) < policy.redeliveries_per_run:
            redeliver.append(Redeliver(item.guid, item.delivery_id, attempts_made + 1))
        else:
            deferred += 1
    if len(keep) > policy.max_pending:
        # Keep the newest: they have the longest left before GitHub forgets them.
        overflow, keep = keep[: len(keep) - policy.max_pending], keep[-policy.max_pending :]
        dropped = {p.guid for p in overflow}
        abandoned += [Abandoned(p, "too_many_pending") for p in overflow]
        redeliver = [r for r in redeliver if r.guid not in dropped]
    return DeliveryPlan(
        redeliver=tuple(redeliver),
        pending=tuple(keep),
        settled=tuple(settled),
        abandoned=tuple(abandoned),
        deferred=deferred,
    )


@dataclass(frozen=True)
class DeliveryCursor:
    """How far the reconciler has read GitHub's delivery log (newest first).

    Every delivery with id <= `floor_id` has been looked at. A scan that ran out of its page
    budget keeps GitHub's cursor (`resume`) and the newest id it started from (`resume_top`):
    the next run finishes that scan first, then `floor_id` becomes `resume_top`.
    """

    floor_id: int = 0
    resume: str | None = None
    resume_top: int = 0
    pending: tuple[Pending, ...] = ()


@dataclass(frozen=True)
class PageVerdict:
    fresh: tuple[Attempt, ...]  # not looked at before, and recent enough
    reached_end: bool  # the page reached what earlier runs saw (or the lookback limit)


REREAD_DELIVERIES = 100


def read_page(page: Sequence[Attempt], floor_id: int, oldest: float) -> PageVerdict:
    """Split one page (newest first) into what is new, and say whether the scan is done."""
    fresh = tuple(a for a in page if a.id > floor_id and a.delivered_at >= oldest)
    return PageVerdict(fresh, len(fresh) < len(page))


def advance_cursor(
    cursor: DeliveryCursor, top_id: int, finished: bool, next_cursor: str | None,
    pending: Sequence[Pending],
) -> DeliveryCursor:
    """The cursor after a scan that started at `top_id` (its newest delivery) and either
    `finished` (reached the floor, the lookback limit or the last page) or stopped before
    GitHub's page `next_cursor`."""
    if finished or next_cursor is None:
        # Keep re-reading the newest REREAD_DELIVERIES rows: a delivery's id is given when it
        # is queued, so one still in flight during this scan shows up later below `top_id`.
        floor = max(cursor.floor_id, top_id - REREAD_DELIVERIES)
        return DeliveryCursor(floor, None, 0, tuple(pending))
    return DeliveryCursor(cursor.floor_id, next_cursor, top_id, tuple(pending))


# --- stuck jobs -------------------------------------------------------------------------------


class Act(StrEnum):
    LEAVE = "leave"
    REDEMAND = "redemand"
    START_JOB = "start_job"
    COMPLETE = "complete"


@dataclass(frozen=True)
class StuckAction:
    act: Act
    job_id: int
    reason: str
    generation: int = 0  # the demand generation a re-demand is conditioned on
    fields: Mapping[str, Any] = field(default_factory=dict)


def _state(job: Mapping[str, Any]) -> JobState | None:
    try:
        return JobState(job.get("state"))
    except ValueError:
        return None


def lease_live(job: Mapping[str, Any], now: float) -> bool:
    """An executor still answers for this job: its claim's lease has not expired."""
    lease = job.get("lease_until")
    return _state(job) in LEASED_STATES and lease is not None and float(lease) > now


def unserved_reason(
    job: Mapping[str, Any], now: float, policy: Policy = DEFAULT_POLICY
) -> str | None:
    """Why a job looks unserved (then GitHub is asked about it), or None: leave it alone."""
    state = _state(job)
    if state not in STUCK_STATES:
        return None
    if lease_live(job, now):
        return None
    if now - float(job.get("updated_at") or 0) < policy.stuck_after(state):
        return None
    if state in LEASED_STATES:
        return "lease_expired"
    return f"stale_{state.value}"


def classify_stuck(
    job: Mapping[str, Any],
    github_job: Mapping[str, Any] | None,
    now: float,
    policy: Policy = DEFAULT_POLICY,
) -> StuckAction:
    """What to do with a job that may be stuck, given GitHub's view of it (None: GitHub could
    not be asked). GitHub's answer only ever moves a job forward or re-demands it: an error or
    an unknown status leaves it as it is, so a GitHub outage never closes a job."""
    job_id = int(job["job_id"])
    reason = unserved_reason(job, now, policy)
    if reason is None:
        why = "lease_live" if lease_live(job, now) else "not_stuck"
        return StuckAction(Act.LEAVE, job_id, why)
    if github_job is None:
        return StuckAction(Act.LEAVE, job_id, "github_unavailable")
    status = github_job.get("status")
    if status == "queued":
        return StuckAction(
            Act.REDEMAND, job_id, reason, generation=int(job.get("demand_generation", 0))
        )
    runner = {
        "runner_name": github_job.get("runner_name"),
        "runner_id": github_job.get("runner_id"),
    }
    if status == "in_progress":
        return StuckAction(
            Act.START_JOB, job_id, "github_in_progress",
            fields={**runner, "started_at": github_job.get("started_at")},
        )
    if status == "completed":
        return StuckAction(
            Act.COMPLETE, job_id, "github_completed",
            fields={
                **runner,
                "conclusion": github_job.get("conclusion") or "unknown",
                "github_completed_at": github_job.get("completed_at"),
            },
        )
    # waiting (an environment approval), pending, requested, or something new: not ours to move.
    return StuckAction(Act.LEAVE, job_id, f"github_{status or 'unknown'}")


# --- orphan runners ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ListedRunner:
    """A runner as GitHub lists it, with where it is registered."""

    scope: RunnerScope
    installation_id: int
    runner_id: int
    name: str
    status: str  # "online" | "offline"
    busy: bool


@dataclass(frozen=True)
class DeleteRunner:
    runner: ListedRunner
    reason: str  # "record_gone" | "offline"


@dataclass(frozen=True)
class OrphanPlan:
    delete: tuple[DeleteRunner, ...]
    offline_since: Mapping[str, float]  # what to remember for the next run
    busy_kept: int


def runner_scopes(pools: PoolConfig) -> tuple[RunnerScope, ...]:
    """Where the pools register runners: each organisation once, and the listed repositories of
    repository-scoped pools (a repo-scoped pool over all repositories cannot be listed)."""
    scopes: dict[tuple, RunnerScope] = {}
    for pool in pools.pools:
        owner = pool.scope.owner
        if pool.runner_scope == "org":
            scopes.setdefault(("org", owner), RunnerScope("org", owner))
            continue
        for repo in pool.scope.repositories:
            scopes.setdefault(("repo", owner, repo), RunnerScope("repo", owner, repo))
    return tuple(scopes.values())


def plan_orphans(
    listed: Sequence[ListedRunner],
    records: Mapping[str, Mapping[str, Any] | None],
    offline_since: Mapping[str, float],
    now: float,
    policy: Policy = DEFAULT_POLICY,
) -> OrphanPlan:
    """Which of RunnerHub's runners to delete from GitHub.

    Only runners named `rh-...` that have a record in the runners table are RunnerHub's. A busy
    runner is never deleted. One whose record is `gone` is deleted at once (its container is
    gone); one offline on GitHub only after `orphan_grace_s` seen offline, because a runner is
    offline for a few seconds between its JIT config and its first poll.
    """
    delete: list[DeleteRunner] = []
    remembered: dict[str, float] = {}
    busy_kept = 0
    for runner in listed:
        if not runner.name.startswith(RUNNER_PREFIX):
            continue
        if runner.busy:
            busy_kept += 1
            continue
        record = records.get(runner.name)
        if record is None:
            continue  # not this deployment's (another stage may share the organisation)
        if record.get("state") == "gone":
            delete.append(DeleteRunner(runner, "record_gone"))
            continue
        if runner.status != "offline":
            continue
        since = float(offline_since.get(runner.name, now))
        if now - since >= policy.orphan_grace_s:
            delete.append(DeleteRunner(runner, "offline"))
        else:
            remembered[runner.name] = since
    if len(remembered) > policy.max_offline_tracked:
        newest = sorted(remembered.items(), key=lambda kv: kv[1])[-policy.max_offline_tracked :]
        remembered = dict(newest)
    return OrphanPlan(tuple(delete), remembered, busy_kept)


# --- what the reconciler remembers between runs -----------------------------------------------


@dataclass(frozen=True)
class ReconcilerState:
    deliveries: DeliveryCursor = DeliveryCursor()
    offline_since: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        cursor = self.deliveries
        return json.dumps(
            {
                "v": 1,
                "floor_id": cursor.floor_id,
                "resume": cursor.resume,
                "resume_top": cursor.resume_top,
                "pending": [[p.guid, p.delivery_id, p.first_seen] for p in cursor.pending],
                "offline_since": dict(self.offline_since),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | None) -> ReconcilerState:
        """The stored state; an unreadable one starts afresh (the lookback bounds the cost)."""
        if not text:
            return cls()
        try:
            data = json.loads(text)
            cursor = DeliveryCursor(
                floor_id=int(data.get("floor_id", 0)),
                resume=data.get("resume"),
                resume_top=int(data.get("resume_top", 0)),
                pending=tuple(
                    Pending(str(guid), int(delivery_id), float(first))
                    for guid, delivery_id, first in data.get("pending", [])
                ),
            )
            offline = {str(k): float(v) for k, v in dict(data.get("offline_since", {})).items()}
        except (ValueError, TypeError, AttributeError):
            return cls()
        return cls(cursor, offline)

    def with_deliveries(self, cursor: DeliveryCursor) -> ReconcilerState:
        return replace(self, deliveries=cursor)

    def with_offline(self, offline_since: Mapping[str, float]) -> ReconcilerState:
        return replace(self, offline_since=dict(offline_since))
