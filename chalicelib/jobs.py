"""The job record and its state machine (DESIGN.md).

    (waiting) -> received -> dispatched -> claimed -> runner_started -> in_progress -> completed

Every move is one conditional write on the current state (and demand generation), so two
executors can't both claim a demand, a late `queued` can't resurrect a completed job, and a
duplicate is a no-op. The moves are data (`Move`); the DynamoDB store turns them into condition
expressions and the in-memory store checks the same sets, so the rules live in one place.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any, Protocol

from chalicelib.errors import DependencyUnavailable, aws_error_code, outage_errors


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
DEMAND_STATES = frozenset({JobState.RECEIVED, JobState.DISPATCHED})


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
    frozenset({JobState.RECEIVED, JobState.DISPATCHED, JobState.CLAIMED, JobState.RUNNER_STARTED}),
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
    frozenset({JobState.CLAIMED, JobState.RUNNER_STARTED}),
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
    frozenset({JobState.CLAIMED, JobState.RUNNER_STARTED}),
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
MOVES = {
    move.name: move
    for move in (WAIT, RECEIVE, DISPATCH, NOTE_DISPATCHED, CLAIM, START_RUNNER, START_JOB,
                 COMPLETE, REDEMAND, RENEW_LEASE, HAND_OVER, TAKEOVER, RELEASE)
}


@dataclass(frozen=True)
class Transition:
    """What a move did: `applied`, and the record after it (or as found, when not applied)."""

    applied: bool
    job: dict[str, Any] | None

    @property
    def state(self) -> JobState | None:
        return JobState(self.job["state"]) if self.job else None

    @property
    def generation(self) -> int:
        return int(self.job.get("demand_generation", 0)) if self.job else 0


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

    def get(self, job_id: int) -> dict[str, Any] | None: ...


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


def _number(value: float) -> Decimal:
    # DynamoDB numbers are decimals; millisecond resolution is plenty for stage latencies.
    return Decimal(str(round(value, 3)))


def to_attribute(value: Any) -> dict[str, Any]:
    """Python value -> DynamoDB AttributeValue (the few types job records hold)."""
    if isinstance(value, bool):
        return {"BOOL": value}
    if isinstance(value, int):
        return {"N": str(value)}
    if isinstance(value, float):
        return {"N": str(_number(value))}
    if isinstance(value, Decimal):
        return {"N": str(value)}
    if isinstance(value, str):
        return {"S": value}
    if isinstance(value, list | tuple):
        return {"L": [to_attribute(item) for item in value]}
    if isinstance(value, dict):
        return {"M": {key: to_attribute(item) for key, item in value.items()}}
    raise TypeError(f"unsupported attribute type {type(value).__name__}")


def from_attribute(value: dict[str, Any]) -> Any:
    (kind, raw), = value.items()
    if kind == "S":
        return raw
    if kind == "N":
        number = Decimal(raw)
        return int(number) if number == number.to_integral_value() else float(number)
    if kind == "BOOL":
        return raw
    if kind == "L":
        return [from_attribute(item) for item in raw]
    if kind == "M":
        return {key: from_attribute(item) for key, item in raw.items()}
    if kind == "NULL":
        return None
    raise TypeError(f"unsupported DynamoDB type {kind}")


def from_item(item: Mapping[str, Any]) -> dict[str, Any]:
    return {key: from_attribute(value) for key, value in item.items()}


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
        try:
            answer = self._client.update_item(
                TableName=self._table, Key={"job_id": {"N": str(job_id)}}, **request
            )
        except self._client.exceptions.ConditionalCheckFailedException as exc:
            old = exc.response.get("Item")
            return Transition(False, from_item(old) if old else None)
        except outage_errors() as exc:  # the service failed: the caller answers 5xx
            raise DependencyUnavailable("dynamodb", aws_error_code(exc)) from exc
        return Transition(True, from_item(answer["Attributes"]))

    def get(self, job_id: int) -> dict[str, Any] | None:
        try:
            answer = self._client.get_item(
                TableName=self._table, Key={"job_id": {"N": str(job_id)}}, ConsistentRead=True
            )
        except outage_errors() as exc:
            raise DependencyUnavailable("dynamodb", aws_error_code(exc)) from exc
        item = answer.get("Item")
        return from_item(item) if item else None



# --- In memory (unit tests, benchmarks) ---------------------------------------------------------


class InMemoryJobStore:
    """Same moves and conditions as DynamoJobStore, on a dict under a lock."""

    def __init__(self) -> None:
        self._jobs: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()

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
        with self._lock:
            current = self._jobs.get(job_id)
            if not self._allowed(move, current, generation, host_id, now):
                return Transition(False, dict(current) if current else None)
            job = dict(current) if current else {"job_id": job_id}
            if move.to is not None:
                job["state"] = move.to.value
            if not (move.stamp_once and move.stamp in job):
                job[move.stamp] = round(now, 3)
            job["updated_at"] = round(now, 3)
            if move.bumps_generation:
                job["demand_generation"] = job.get("demand_generation", 0) + 1
            for name, value in change.facts.items():
                if value is not None:
                    job.setdefault(name, _plain(value))
            for name, value in change.fields.items():
                if value is not None:
                    job[name] = _plain(value)
            for name in move.removes:
                job.pop(name, None)
            self._jobs[job_id] = job
            return Transition(True, dict(job))

    @staticmethod
    def _allowed(move: Move, current: dict | None, generation: int | None,
                 host_id: str | None, now: float) -> bool:
        if current is None or "state" not in current:
            return move.may_create
        if JobState(current["state"]) not in move.from_states:
            return False
        if move.needs_generation and current.get("demand_generation") != generation:
            return False
        if move.needs_host and current.get("host_id") != host_id:
            return False
        lease = current.get("lease_until")
        return not (move.needs_expired_lease and lease is not None and float(lease) >= now)

    def get(self, job_id: int) -> dict[str, Any] | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return dict(job) if job else None

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(job) for job in self._jobs.values()]


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, float):
        return round(value, 3)
    return value
