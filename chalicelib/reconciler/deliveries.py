"""Lost webhooks, decided: which failed deliveries to redeliver, and how far GitHub's delivery
log has been read. Pure: the reconciler reads the log and acts (`reconciler.redelivery`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from chalicelib.reconciler.policy import DEFAULT_POLICY, GITHUB_DELIVERY_RETENTION_S, Policy

WORKFLOW_JOB = "workflow_job"
DONE = "done"  # chalicelib.deliveries.DONE, the only status that means "processed"


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

