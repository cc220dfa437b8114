"""The reconciler's decisions, as pure functions that return frozen dataclasses.

Nothing here calls AWS or GitHub: `chalicelib.reconciler` gathers the inputs, asks these
functions what to do, and carries the answers out in one place. So every rule (what counts as a
lost webhook, a stuck job, an orphan runner) is tested by name without a server.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from chalicelib.github import RunnerScope
from chalicelib.jobs import DEMAND_STATES, OPEN_STATES, JobState
from chalicelib.pools import PoolConfig, route

# GitHub keeps webhook deliveries (and lets an App redeliver them) for 3 days.
# https://docs.github.com/en/webhooks/testing-and-troubleshooting-webhooks/redelivering-webhooks
GITHUB_DELIVERY_RETENTION_S = 3 * 24 * 3600
# Every runner the executor registers is named `rh-<job>-<generation>-<hex>`
# (executor.daemon.runner_name); other runners in the organisation are never touched.
RUNNER_PREFIX = "rh-"
WORKFLOW_JOB = "workflow_job"
DONE = "done"  # chalicelib.deliveries.DONE, the only status that means "processed"

# GitHub's primary REST limit of an installation token when it has not reported one yet (the
# documented minimum: https://docs.github.com/en/rest/using-the-rest-api/rate-limits-for-the-rest-api).
GITHUB_INSTALLATION_HOURLY_LIMIT = 5000
DISCOVERY_SHARE = 0.1
DISCOVERY_SPREAD = 12
DISCOVERY_WINDOW_S = 3600.0
# A sweep remembers at most this many repositories (names) in the state item.
DISCOVERY_MAX_REPOSITORIES = 5000

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
    # Dead-lettered demand messages looked at per run (over all pools).
    dead_letters_per_run: int = 50
    # Discovery of queued jobs GitHub never announced: at most this share of an installation's
    # hourly REST limit (`x-ratelimit-limit`) in any hour, and at most 1/`discovery_spread` of
    # that share in one run (so the hour's share is spread over the hour's runs).
    discovery_share: float = DISCOVERY_SHARE
    discovery_spread: int = DISCOVERY_SPREAD

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


# --- dead-lettered demand -----------------------------------------------------------------


class DeadAct(StrEnum):
    REDRIVE = "redrive"  # re-demand the job now: its demand goes back to the pool's queue
    DROP = "drop"  # delete the message: the demand is met or superseded
    KEEP = "keep"  # leave it in the DLQ (an operator's, or a later run's)


@dataclass(frozen=True)
class DeadLetterAction:
    act: DeadAct
    reason: str
    generation: int = 0  # the generation a re-demand is conditioned on


def settle_dead_letter(
    message: Mapping[str, Any] | None, job: Mapping[str, Any] | None, now: float
) -> DeadLetterAction | None:
    """What to do with a dead-lettered demand message without asking GitHub, or None: GitHub
    must say whether the job is still queued. `message` is the demand (job_id, generation)."""
    if message is None:
        return DeadLetterAction(DeadAct.KEEP, "malformed")
    if job is None:
        return DeadLetterAction(DeadAct.KEEP, "no_record")
    state = _state(job)
    if state not in OPEN_STATES:
        return DeadLetterAction(DeadAct.DROP, "job_closed")
    if int(job.get("demand_generation", 0)) != int(message["generation"]):
        return DeadLetterAction(DeadAct.DROP, "superseded")
    if state not in DEMAND_STATES and state not in LEASED_STATES:
        return DeadLetterAction(DeadAct.DROP, f"job_{state.value}")
    if lease_live(job, now):
        return DeadLetterAction(DeadAct.KEEP, "lease_live")
    return None


def classify_dead_letter(
    message: Mapping[str, Any] | None,
    job: Mapping[str, Any] | None,
    github_job: Mapping[str, Any] | None,
    now: float,
) -> DeadLetterAction:
    """A dead-lettered demand of a job GitHub still has queued, whose generation is the job's
    current one and that no live executor holds, is re-demanded at once (the stuck-job check
    would only find it after `dispatched_stuck_after_s`). GitHub's `in_progress`/`completed`
    drops it; an error or another status keeps it (fail open)."""
    settled = settle_dead_letter(message, job, now)
    if settled is not None:
        return settled
    if github_job is None:
        return DeadLetterAction(DeadAct.KEEP, "github_unavailable")
    status = github_job.get("status")
    if status == "queued":
        return DeadLetterAction(DeadAct.REDRIVE, "still_queued",
                                generation=int(job.get("demand_generation", 0)))
    if status in ("in_progress", "completed"):
        return DeadLetterAction(DeadAct.DROP, f"github_{status}")
    return DeadLetterAction(DeadAct.KEEP, f"github_{status or 'unknown'}")


# --- queued jobs GitHub never announced -------------------------------------------------------


@dataclass(frozen=True)
class DiscoveryState:
    """One repository owner's discovery: the repositories this sweep has still to check (most
    recently active first), when the sweep began, when the last one finished, and the REST calls
    spent per run within the last hour ((time, calls), oldest first)."""

    sweep: tuple[str, ...] = ()
    sweep_started_at: float = 0.0
    last_sweep_s: float | None = None
    spent: tuple[tuple[float, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"sweep": list(self.sweep), "started": self.sweep_started_at,
                "last_sweep_s": self.last_sweep_s, "spent": [list(item) for item in self.spent]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiscoveryState:
        last = data.get("last_sweep_s")
        return cls(
            sweep=tuple(str(name) for name in data.get("sweep", [])),
            sweep_started_at=float(data.get("started", 0.0)),
            last_sweep_s=float(last) if last is not None else None,
            spent=tuple((float(at), int(calls)) for at, calls in data.get("spent", [])),
        )

    def spend(self, now: float, calls: int) -> DiscoveryState:
        """Record `calls` made now; forget what is older than the window."""
        kept = tuple(item for item in self.spent if item[0] > now - DISCOVERY_WINDOW_S)
        return replace(self, spent=(*kept, (now, calls)) if calls else kept)


@dataclass(frozen=True)
class DiscoveryBudget:
    hourly: int  # calls allowed in any hour: discovery_share of the installation's limit
    used: int  # calls made in the last hour
    this_run: int  # calls this run may make (spread over the hour)
    whole: int  # calls this run may make when a sweep must list the repositories first

    @property
    def left(self) -> int:
        return max(0, self.hourly - self.used)


def discovery_budget(
    state: DiscoveryState, limit: int | None, now: float, policy: Policy = DEFAULT_POLICY
) -> DiscoveryBudget:
    """How many REST calls discovery may make now for one installation: at most
    `discovery_share` of its hourly limit (GitHub's `x-ratelimit-limit`; the documented minimum
    when none was seen) in any hour, and 1/`discovery_spread` of that per run."""
    hourly = int(policy.discovery_share * (limit or GITHUB_INSTALLATION_HOURLY_LIMIT))
    used = sum(calls for at, calls in state.spent if at > now - DISCOVERY_WINDOW_S)
    left = max(0, hourly - used)
    per_run = max(1, math.ceil(hourly / max(1, policy.discovery_spread))) if hourly else 0
    return DiscoveryBudget(hourly, used, min(left, per_run), left)


def _activity(repository: Mapping[str, Any]) -> float:
    latest = 0.0
    for key in ("pushed_at", "updated_at"):
        value = repository.get(key)
        if not value:
            continue
        try:
            stamp = datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
        latest = max(latest, stamp)
    return latest


def sweep_order(repositories: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    """The repositories' full names, most recently active first (the later of `pushed_at` and
    `updated_at`), then by name; archived and disabled ones run no workflows and are left out.
    At most DISCOVERY_MAX_REPOSITORIES (the state item's bound): the least active fall out."""
    usable = [
        repo for repo in repositories
        if repo.get("full_name") and not repo.get("archived") and not repo.get("disabled")
    ]
    ordered = sorted(usable, key=lambda repo: (-_activity(repo), str(repo["full_name"]).lower()))
    names = list(dict.fromkeys(str(repo["full_name"]) for repo in ordered))
    return tuple(names[:DISCOVERY_MAX_REPOSITORIES])


@dataclass(frozen=True)
class Discovered:
    """A queued job found through the REST API, and whether to take it in."""

    job_id: int
    pool: str | None
    reason: str  # "unannounced" (take it in), "known", "not_queued", or why it is not routed


def classify_discovered(
    github_job: Mapping[str, Any],
    repository: Mapping[str, Any],
    pools: PoolConfig,
    known: bool,
) -> Discovered:
    """A job from a run's job list is taken in, as its `queued` webhook would have been, when
    GitHub has it queued, it routes to a pool, and RunnerHub has no record of it (`known`)."""
    job_id = int(github_job["id"])
    if github_job.get("status") != "queued":
        return Discovered(job_id, None, "not_queued")
    owner = str((repository.get("owner") or {}).get("login") or "")
    decision = route(pools, list(github_job.get("labels") or ()), owner,
                     str(repository.get("name") or ""), bool(repository.get("private")))
    if not decision.routed:
        return Discovered(job_id, None, decision.reason.value)
    if known:
        return Discovered(job_id, decision.pool.name, "known")
    return Discovered(job_id, decision.pool.name, "unannounced")


def discovery_owners(pools: PoolConfig) -> tuple[tuple[str, str | None], ...]:
    """The accounts whose repositories are swept: each pool owner once, with a repository of
    it when the pools name one (to find a user account's installation)."""
    owners: dict[str, str | None] = {}
    for pool in pools.pools:
        repo = pool.scope.repositories[0] if pool.scope.repositories else None
        if owners.get(pool.scope.owner) is None:
            owners[pool.scope.owner] = repo
    return tuple(owners.items())


# --- what the reconciler remembers between runs -----------------------------------------------


@dataclass(frozen=True)
class ReconcilerState:
    """`deliveries` is the first App's delivery cursor; `app_cursors` the other Apps', by App id
    (each App has its own webhook and delivery log). `discovery` is per repository owner."""

    deliveries: DeliveryCursor = DeliveryCursor()
    offline_since: Mapping[str, float] = field(default_factory=dict)
    app_cursors: Mapping[int, DeliveryCursor] = field(default_factory=dict)
    discovery: Mapping[str, DiscoveryState] = field(default_factory=dict)

    def to_json(self) -> str:
        cursor = self.deliveries
        return json.dumps(
            {
                "v": 1,
                **_cursor_json(cursor),
                "offline_since": dict(self.offline_since),
                "apps": {str(app): _cursor_json(c) for app, c in self.app_cursors.items()},
                "discovery": {owner: d.to_dict() for owner, d in self.discovery.items()},
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
            cursor = _cursor_from(data)
            offline = {str(k): float(v) for k, v in dict(data.get("offline_since", {})).items()}
            apps = {int(k): _cursor_from(v) for k, v in dict(data.get("apps", {})).items()}
            discovery = {
                str(k): DiscoveryState.from_dict(v)
                for k, v in dict(data.get("discovery", {})).items()
            }
        except (ValueError, TypeError, AttributeError, KeyError):
            return cls()
        return cls(cursor, offline, apps, discovery)

    def with_deliveries(self, cursor: DeliveryCursor) -> ReconcilerState:
        return replace(self, deliveries=cursor)

    def cursor_of(self, app_index: int, app_id: int) -> DeliveryCursor:
        """The delivery cursor of the App at `app_index` of the configured list."""
        if app_index == 0:
            return self.deliveries
        return self.app_cursors.get(app_id, DeliveryCursor())

    def with_cursor(self, app_index: int, app_id: int, cursor: DeliveryCursor
                    ) -> ReconcilerState:
        if app_index == 0:
            return replace(self, deliveries=cursor)
        return replace(self, app_cursors={**self.app_cursors, app_id: cursor})

    def with_discovery(self, owner: str, discovery: DiscoveryState) -> ReconcilerState:
        return replace(self, discovery={**self.discovery, owner: discovery})

    def with_offline(self, offline_since: Mapping[str, float]) -> ReconcilerState:
        return replace(self, offline_since=dict(offline_since))


def _cursor_json(cursor: DeliveryCursor) -> dict[str, Any]:
    return {
        "floor_id": cursor.floor_id,
        "resume": cursor.resume,
        "resume_top": cursor.resume_top,
        "pending": [[p.guid, p.delivery_id, p.first_seen] for p in cursor.pending],
    }


def _cursor_from(data: Mapping[str, Any]) -> DeliveryCursor:
    return DeliveryCursor(
        floor_id=int(data.get("floor_id", 0)),
        resume=data.get("resume"),
        resume_top=int(data.get("resume_top", 0)),
        pending=tuple(
            Pending(str(guid), int(delivery_id), float(first))
            for guid, delivery_id, first in data.get("pending", [])
        ),
    )
