"""The job record and its state machine (DESIGN.md).

    (waiting) -> received -> dispatched -> claimed -> runner_started -> in_progress -> completed

Every move is one conditional write on the current state (and demand generation), so two
executors can't both claim a demand, a late `queued` can't resurrect a completed job, and a
duplicate is a no-op. The moves are data (`Move`); the DynamoDB store turns them into condition
expressions and the in-memory store checks the same sets, so the rules live in one place.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from chalicelib import dynamodb
from chalicelib.dynamodb import Record, from_item, to_attribute


class JobState(StrEnum):
    WAITING = "waiting"
    RECEIVED = "received"
    DISPATCHED = "dispatched"
    CLAIMED = "claimed"
    RUNNER_STARTED = "runner_started"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"


BEFORE_IN_PROGRESS = frozenset(
    {
        JobState.WAITING,
        JobState.RECEIVED,
        JobState.DISPATCHED,
        JobState.CLAIMED,
        JobState.RUNNER_STARTED,
    }
)
OPEN_STATES = BEFORE_IN_PROGRESS | {JobState.IN_PROGRESS}
# GitHub gave the job to a runner: no demand of it is served any more.
TAKEN_STATES = frozenset({JobState.IN_PROGRESS, JobState.COMPLETED})
DEMAND_STATES = frozenset({JobState.RECEIVED, JobState.DISPATCHED})
# An executor holds the job by a lease (`host_id` + `lease_until`).
CLAIM_STATES = frozenset({JobState.CLAIMED, JobState.RUNNER_STARTED})
# Demanded, and no runner has taken the job yet.
WAITING_FOR_RUNNER = DEMAND_STATES | CLAIM_STATES


class JobRecord(Record):
    """A job as stored (the other stamps and GitHub's facts are extra fields)."""

    job_id: int
    state: JobState
    demand_generation: int = 0
    pool: str | None = None
    repository: str | None = None
    owner: str | None = None
    labels: tuple[str, ...] = ()
    installation_id: int | None = None
    host_id: str | None = None  # the claimant, while a claim holds the job
    lease_until: float | None = None
    started_runner: str | None = None  # the runner started for the current generation
    runner_name: str | None = None  # the runner GitHub gave the job to
    conclusion: str | None = None
    redemand_reason: str | None = None
    start_failures: int = 0
    dispatched_at: float | None = None
    updated_at: float = 0.0


@dataclass(frozen=True)
class Move:
    """One allowed state change.

    `to` None changes no state (only stamps/fields). `may_create` allows the move on a job with no
    record yet. `needs_generation` conditions it on the demand generation it acts for.
    """

    name: str
    to: JobState | None
    from_states: frozenset[JobState]
    stamp: str
    may_create: bool = False
    needs_generation: bool = False
    needs_host: bool = False
    # Only when the claim's lease (`lease_until`) has passed: a live claim is never taken.
    needs_expired_lease: bool = False
    bumps_generation: bool = False
    stamp_once: bool = True
    removes: tuple[str, ...] = ()
    # Only where the stamp is absent: the move is made once, ever (a second try is refused).
    needs_no_stamp: bool = False


WAIT = Move("wait", JobState.WAITING, frozenset(), "waiting_at", may_create=True)
RECEIVE = Move(
    "receive",
    JobState.RECEIVED,
    frozenset({JobState.WAITING}),
    "received_at",
    may_create=True,
    bumps_generation=True,
)
DISPATCH = Move(
    "dispatch", JobState.DISPATCHED, frozenset({JobState.RECEIVED}), "dispatched_at",
    needs_generation=True,
)
# The demand message can reach an executor before `dispatched` is written; then only the stamp
# is recorded, for the generation that was sent.
NOTE_DISPATCHED = Move(
    "note_dispatched", None, OPEN_STATES, "dispatched_at", needs_generation=True
)
CLAIM = Move("claim", JobState.CLAIMED, DEMAND_STATES, "claimed_at", needs_generation=True)
START_RUNNER = Move(
    "start_runner",
    JobState.RUNNER_STARTED,
    frozenset({JobState.CLAIMED}),
    "runner_started_at",
    needs_generation=True,
    needs_host=True,
)
START_JOB = Move("start_job", JobState.IN_PROGRESS, BEFORE_IN_PROGRESS, "in_progress_at",
                 may_create=True)
COMPLETE = Move("complete", JobState.COMPLETED, OPEN_STATES, "completed_at", may_create=True)
REDEMAND = Move(
    "redemand",
    JobState.RECEIVED,
    WAITING_FOR_RUNNER,
    "redemanded_at",
    needs_generation=True,
    bumps_generation=True,
    stamp_once=False,
    removes=("dispatched_at", "claimed_at", "runner_started_at", "host_id", "lease_until"),
)
# The claiming host keeps its lease while its runner waits for GitHub to assign the job.
RENEW_LEASE = Move(
    "renew_lease",
    None,
    CLAIM_STATES,
    "lease_renewed_at",
    needs_generation=True,
    needs_host=True,
    stamp_once=False,
)
# A spare runner (its own job was taken by another runner) now serves this job's demand.
HAND_OVER = Move(
    "hand_over",
    None,
    frozenset({JobState.RUNNER_STARTED}),
    "handed_over_at",
    needs_generation=True,
    stamp_once=False,
)
# A claim whose lease expired while its host's heartbeat stopped: one other executor takes it
# over, conditional on the dead claimant (`host_id` argument), the generation and the expired
# lease; the change writes the new host and lease. A live host's claim can't be taken.
TAKEOVER = Move(
    "takeover",
    JobState.CLAIMED,
    CLAIM_STATES,
    "taken_over_at",
    needs_generation=True,
    needs_host=True,
    needs_expired_lease=True,
    stamp_once=False,
)
# A draining executor hands back a claim it has not started a runner for: the demand message it
# still holds is made visible at once, and any executor claims the same generation again.
RELEASE = Move(
    "release",
    JobState.DISPATCHED,
    frozenset({JobState.CLAIMED}),
    "released_at",
    needs_generation=True,
    needs_host=True,
    stamp_once=False,
    removes=("claimed_at", "host_id", "lease_until"),
)
# A Spot interruption stopped the runner GitHub had given the job (executor/lifecycle.py): a
# note, no state change (GitHub concludes the job); `lost_to` and the runner are its fields.
NOTE_SPOT_LOST = Move("note_spot_lost", None, OPEN_STATES | {JobState.COMPLETED}, "spot_lost_at")
# The one re-run of a job lost to a Spot interruption (pool `rerun_on_spot_interruption`): made
# only where `spot_rerun_at` is absent, so GitHub is asked at most once, whoever tries again.
MARK_SPOT_RERUN = Move("mark_spot_rerun", None, OPEN_STATES | {JobState.COMPLETED},
                       "spot_rerun_at", needs_no_stamp=True)
MOVES = {
    move.name: move
    for move in (WAIT, RECEIVE, DISPATCH, NOTE_DISPATCHED, CLAIM, START_RUNNER, START_JOB,
                 COMPLETE, REDEMAND, RENEW_LEASE, HAND_OVER, TAKEOVER, RELEASE, NOTE_SPOT_LOST,
                 MARK_SPOT_RERUN)
}


@dataclass(frozen=True)
class Transition:
    """What a move did: `applied`, and the record after it (or as found, when not applied)."""

    applied: bool
    job: JobRecord | None

    @property
    def state(self) -> JobState | None:
        return self.job.state if self.job else None

    @property
    def generation(self) -> int:
        return self.job.demand_generation if self.job else 0


@dataclass(frozen=True)
class Change:
    """Attributes a move writes besides its state and stamp.

    `facts` describe the job and are written only if absent (the first record wins); `fields`
    are overwritten (runner, conclusion, lease).
    """

    facts: Mapping[str, Any] = field(default_factory=dict)
    fields: Mapping[str, Any] = field(default_factory=dict)


NO_CHANGE = Change()


class JobStore(Protocol):
    def apply(
        self,
        job_id: int,
        move: Move,
        now: float,
        change: Change = NO_CHANGE,
        *,
        generation: int | None = None,
        host_id: str | None = None,
    ) -> Transition: ...

    def get(self, job_id: int) -> JobRecord | None: ...


def stage_latencies(job: Mapping[str, Any]) -> dict[str, float]:
    """Seconds spent between consecutive stamps the job has (its stage-by-stage latency)."""
    order = ["received_at", "dispatched_at", "claimed_at", "runner_started_at",
             "in_progress_at", "completed_at"]
    stamps = [(name, float(job[name])) for name in order if job.get(name) is not None]
    return {
        f"{a[:-3]}_to_{b[:-3]}": round(tb - ta, 3)
        for (a, ta), (b, tb) in itertools.pairwise(stamps)
    }


# --- DynamoDB ---------------------------------------------------------------------------------


def build_update(
    move: Move,
    now: float,
    change: Change,
    generation: int | None,
    host_id: str | None,
) -> dict[str, Any]:
    """The UpdateItem arguments (without key and table) that carry out one move. Pure."""
    names: dict[str, str] = {"#state": "state", "#stamp": move.stamp, "#updated": "updated_at"}
    values: dict[str, Any] = {":now": to_attribute(now)}
    sets = ["#updated = :now"]
    if move.to is not None:
        sets.append("#state = :to")
        values[":to"] = {"S": move.to.value}
    sets.append("#stamp = if_not_exists(#stamp, :now)" if move.stamp_once else "#stamp = :now")
    if move.bumps_generation:
        names["#gen"] = "demand_generation"
        values[":zero"] = {"N": "0"}
        values[":one"] = {"N": "1"}
        sets.append("#gen = if_not_exists(#gen, :zero) + :one")
    for index, (name, value) in enumerate(change.facts.items()):
        if value is None:
            continue
        names[f"#f{index}"] = name
        values[f":f{index}"] = to_attribute(value)
        sets.append(f"#f{index} = if_not_exists(#f{index}, :f{index})")
    for index, (name, value) in enumerate(change.fields.items()):
        if value is None:
            continue
        names[f"#v{index}"] = name
        values[f":v{index}"] = to_attribute(value)
        sets.append(f"#v{index} = :v{index}")
    expression = "SET " + ", ".join(sets)
    if move.removes:
        for index, name in enumerate(move.removes):
            names[f"#r{index}"] = name
        expression += " REMOVE " + ", ".join(f"#r{index}" for index in range(len(move.removes)))

    alternatives = []
    if move.may_create:
        alternatives.append("attribute_not_exists(#state)")
    if move.from_states:
        states = sorted(move.from_states)
        for index, state in enumerate(states):
            values[f":s{index}"] = {"S": state.value}
        alternatives.append(f"#state IN ({', '.join(f':s{i}' for i in range(len(states)))})")
    condition = "(" + " OR ".join(alternatives) + ")"
    if move.needs_generation:
        if generation is None:
            raise ValueError(f"move {move.name} needs the demand generation")
        names["#gen"] = "demand_generation"
        values[":g"] = to_attribute(generation)
        condition += " AND #gen = :g"
    if move.needs_host:
        if host_id is None:
            raise ValueError(f"move {move.name} needs the host id")
        names["#host"] = "host_id"
        values[":host"] = {"S": host_id}
        condition += " AND #host = :host"
    if move.needs_expired_lease:
        names["#lease"] = "lease_until"
        condition += " AND (attribute_not_exists(#lease) OR #lease < :now)"
    if move.needs_no_stamp:
        condition += " AND attribute_not_exists(#stamp)"
    return {
        "UpdateExpression": expression,
        "ConditionExpression": condition,
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": values,
        "ReturnValues": "ALL_NEW",
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    }


class DynamoJobStore:
    """The jobs table through a boto3 DynamoDB client (low-level: no resource layer)."""

    def __init__(self, client: Any, table_name: str) -> None:
        self._client = client
        self._table = table_name

    def apply(
        self,
        job_id: int,
        move: Move,
        now: float,
        change: Change = NO_CHANGE,
        *,
        generation: int | None = None,
        host_id: str | None = None,
    ) -> Transition:
        request = build_update(move, now, change, generation, host_id)
        # An outage is DependencyUnavailable: the caller answers 5xx.
        applied, answer = dynamodb.attempt(
            self._client.update_item, TableName=self._table, Key=_key(job_id), **request
        )
        if not applied:
            old = answer.get("Item")
            return Transition(False, JobRecord.model_validate(from_item(old)) if old else None)
        return Transition(True, JobRecord.model_validate(from_item(answer["Attributes"])))

    def get(self, job_id: int) -> JobRecord | None:
        found = dynamodb.get(self._client, self._table, _key(job_id))
        return JobRecord.model_validate(found) if found else None

    @property
    def client(self) -> Any:
        """The DynamoDB client: a transaction spanning this table and another (a host's claim,
        `hosts.DynamoHostStore.claim`) goes through it."""
        return self._client

    def transact_update(
        self,
        job_id: int,
        move: Move,
        now: float,
        change: Change = NO_CHANGE,
        *,
        generation: int | None = None,
        host_id: str | None = None,
    ) -> dict[str, Any]:
        """The move as one `Update` of a TransactWriteItems (which returns no new values)."""
        request = build_update(move, now, change, generation, host_id)
        request.pop("ReturnValues")
        return {"Update": {"TableName": self._table, "Key": _key(job_id), **request}}


def _key(job_id: int) -> dict[str, Any]:
    return {"job_id": {"N": str(job_id)}}
