"""Runner records (key: runner name): starting -> idle -> busy -> gone.

The executor writes `starting`, `idle` and `gone`; the webhook Lambda writes `busy` and the job
the runner took (from `in_progress`'s `runner_name`). Each write is conditional on the states it
may come from, so `gone` is final and a late `idle` can't hide a `busy`. Records are indexed by
host (`by_host`), so a dead host's runners can be found, and expire by TTL after they are gone.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Protocol

from chalicelib import dynamodb
from chalicelib.dynamodb import Record, conditional, from_item, to_attribute

# Keep a gone runner's record for a week of analytics.
GONE_RECORD_TTL_S = 7 * 24 * 3600


class RunnerState(StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    GONE = "gone"


# Not yet given a job: may still be handed another job's demand (`RunnerStore.reassign`).
BEFORE_BUSY = frozenset({RunnerState.STARTING, RunnerState.IDLE})
ALLOWED_FROM = {
    RunnerState.STARTING: frozenset(),
    RunnerState.IDLE: frozenset({RunnerState.STARTING}),
    RunnerState.BUSY: BEFORE_BUSY,
    RunnerState.GONE: frozenset({RunnerState.STARTING, RunnerState.IDLE, RunnerState.BUSY}),
}


class RunnerRecord(Record):
    """A runner as stored (its stamps and timings are extra fields)."""

    runner_name: str
    state: RunnerState
    pool: str | None = None
    host_id: str | None = None
    job_id: int | None = None  # the job whose demand it serves (a hand-over may change it)
    generation: int | None = None
    installation_id: int | None = None
    repository: str | None = None
    scope_level: str | None = None
    runner_id: int | None = None
    took_job_id: int | None = None  # the job GitHub gave it
    starting_at: float | None = None


class RunnerStore(Protocol):
    def move(self, name: str, to: RunnerState, now: float, **fields: Any) -> RunnerRecord | None:
        """The record after the move, or None when the move is not allowed from its state."""

    def get(self, name: str) -> RunnerRecord | None: ...

    def reassign(self, name: str, from_job: int, to_job: int, generation: int, now: float
                 ) -> bool:
        """Point a not-yet-busy runner at another job's demand (see webhook hand-over)."""

    def on_host(self, host_id: str) -> list[RunnerRecord]: ...


class DynamoRunnerStore:
    def __init__(self, client: Any, table_name: str) -> None:
        self._client = client
        self._table = table_name

    def move(self, name: str, to: RunnerState, now: float, **fields: Any) -> RunnerRecord | None:
        names = {"#state": "state", "#stamp": f"{to.value}_at"}
        values: dict[str, Any] = {":to": {"S": to.value}, ":now": to_attribute(now)}
        sets = ["#state = :to", "#stamp = :now"]
        if to is RunnerState.GONE:
            fields["expires_at"] = int(now) + GONE_RECORD_TTL_S
        for index, (key, value) in enumerate(fields.items()):
            if value is None:
                continue
            names[f"#f{index}"] = key
            values[f":f{index}"] = to_attribute(value)
            sets.append(f"#f{index} = :f{index}")
        allowed = sorted(ALLOWED_FROM[to])
        if allowed:
            for index, state in enumerate(allowed):
                values[f":s{index}"] = {"S": state.value}
            condition = f"#state IN ({', '.join(f':s{i}' for i in range(len(allowed)))})"
        else:
            condition = "attribute_not_exists(#state)"
        answer = conditional(
            self._client.update_item,
            TableName=self._table,
            Key={"runner_name": {"S": name}},
            UpdateExpression="SET " + ", ".join(sets),
            ConditionExpression=condition,
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
            ReturnValues="ALL_NEW",
        )
        if answer is None:
            return None
        return RunnerRecord.model_validate(from_item(answer["Attributes"]))

    def reassign(self, name: str, from_job: int, to_job: int, generation: int, now: float
                 ) -> bool:
        answer = conditional(
            self._client.update_item,
            TableName=self._table,
            Key={"runner_name": {"S": name}},
            UpdateExpression="SET job_id = :to, generation = :g, reassigned_at = :now",
            ConditionExpression="#state IN (:starting, :idle) AND job_id = :from",
            ExpressionAttributeNames={"#state": "state"},
            ExpressionAttributeValues={
                ":to": {"N": str(to_job)}, ":from": {"N": str(from_job)},
                ":g": {"N": str(generation)}, ":now": to_attribute(now),
                ":starting": {"S": RunnerState.STARTING.value},
                ":idle": {"S": RunnerState.IDLE.value},
            },
        )
        return answer is not None

    def get(self, name: str) -> RunnerRecord | None:
        found = dynamodb.get(self._client, self._table, {"runner_name": {"S": name}})
        return RunnerRecord.model_validate(found) if found else None

    def on_host(self, host_id: str) -> list[RunnerRecord]:
        return [RunnerRecord.model_validate(item) for item in dynamodb.query(
            self._client,
            TableName=self._table,
            IndexName="by_host",
            KeyConditionExpression="host_id = :h",
            ExpressionAttributeValues={":h": {"S": host_id}},
        )]
