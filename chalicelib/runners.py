"""Runner records (key: runner name): starting -> idle -> busy -> gone.

The executor writes `starting`, `idle` and `gone`; the webhook Lambda writes `busy` and the job
the runner took (from `in_progress`'s `runner_name`). Each write is conditional on the states it
may come from, so `gone` is final and a late `idle` can't hide a `busy`. Records are indexed by
host (`by_host`), so a dead host's runners can be found, and expire by TTL after they are gone.

Seats (issue 15): each pool has one counter item in this table (`seats#<pool>`: `runners`,
`warm`). A runner takes a runner seat when its record is created (`start`, conditional on
`runners < max_runners`) and, while it is an idle warm runner, a warm seat (conditional on
`warm < ` the pool's warm target). Each seat is also a flag on the runner's record (`seat`,
`warm`), changed in the same transaction as the counter, so each is released exactly once: the
warm seat when the runner takes a job (`take_warm`, the webhook) or ends, the runner seat when
the record goes `gone` (every path: exit, failed start, reaping, a dead host's takeover).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from chalicelib import dynamodb
from chalicelib.dynamodb import CONDITION_FAILED, Record, conditional, from_item, to_attribute
from chalicelib.errors import DependencyUnavailable

# Keep a gone runner's record for a week of analytics.
GONE_RECORD_TTL_S = 7 * 24 * 3600
# The pools' seat counters share the runners table under this key prefix (never a runner name:
# runner names start `rh-`).
SEATS_PREFIX = "seats#"
# A release re-reads the record when it changed between the read and the transaction.
RELEASE_ATTEMPTS = 5
# Seat transactions share their pool's counter item: conflicts are expected under bursts.
SEAT_TRANSACTION_ATTEMPTS = 10


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
    seat: bool | None = None  # holds one of its pool's runner seats (`max_runners`)
    warm: bool | None = None  # an idle warm runner: holds one of its pool's warm seats
    warm_at: float | None = None
    # An operator asked to retire it while idle (the management API); its executor does.
    retire_requested_at: float | None = None
    retire_requested_by: str | None = None


def seats_key(pool: str) -> str:
    return f"{SEATS_PREFIX}{pool}"


@dataclass(frozen=True)
class Seats:
    """A pool's seats in use: runners (any state but gone) and idle warm runners."""

    runners: int = 0
    warm: int = 0


class RunnerExists(ValueError):
    """A runner record of that name exists already (a name is unique to one start)."""


class NoSeat(Exception):
    """The pool's runner seats (`max_runners`) or warm seats (its warm target) are all taken."""

    def __init__(self, pool: str, kind: str) -> None:
        super().__init__(f"pool {pool}: no {kind} seat free")
        self.pool = pool
        self.kind = kind


class RunnerStore(Protocol):
    def move(self, name: str, to: RunnerState, now: float, **fields: Any) -> RunnerRecord | None:
        """The record after the move, or None when the move is not allowed from its state."""

    def get(self, name: str) -> RunnerRecord | None: ...

    def reassign(self, name: str, from_job: int, to_job: int, generation: int, now: float
                 ) -> bool:
        """Point a not-yet-busy runner at another job's demand (see webhook hand-over)."""

    def on_host(self, host_id: str) -> list[RunnerRecord]: ...

    def start(self, name: str, now: float, *, pool: str, max_runners: int,
              warm_limit: int | None = None, **fields: Any) -> RunnerRecord:
        """Create the runner's record (`starting`) holding a runner seat, and a warm seat when
        `warm_limit` is given (a warm runner); NoSeat when the pool has none free."""

    def make_warm(self, name: str, pool: str, warm_limit: int, now: float) -> bool:
        """A not-yet-busy runner whose job another runner took becomes a warm runner (it no
        longer serves any job's demand); False when no warm seat is free (or it is busy)."""

    def take_warm(self, name: str, now: float) -> bool:
        """The warm runner took a job: release its warm seat (once; False if it held none)."""

    def unwarm(self, name: str, keep: int, now: float) -> bool:
        """Release the runner's warm seat while the pool holds more than `keep` (its target
        fell): True when released; the caller then retires the runner."""

    def seats(self, pool: str) -> Seats: ...


def took_job(store: RunnerStore, name: str, job_id: int, now: float,
             release_warm: bool = True) -> tuple[RunnerRecord | None, bool]:
    """One of our runners took a job (`in_progress` names it; the webhook, or the reconciler
    from GitHub's view): record it busy, and release a warm runner's warm seat so its pool
    refills. (record, first): None when the runner is not ours (no record: the conditional
    write does nothing) or busy with another job; `first` False when a retry of the same event
    found it recorded already (then only what was left undone is done)."""
    runner = store.move(name, RunnerState.BUSY, now, took_job_id=job_id)
    first = runner is not None
    if runner is None:
        found = store.get(name)
        if not found or found.state is not RunnerState.BUSY or found.took_job_id != job_id:
            return None, False
        runner = found
    if runner.warm and release_warm:
        store.take_warm(name, now)  # once: a retry finds it released
    return runner, first


class DynamoRunnerStore:
    def __init__(self, client: Any, table_name: str) -> None:
        self._client = client
        self._table = table_name

    def move(self, name: str, to: RunnerState, now: float, **fields: Any) -> RunnerRecord | None:
        if to is not RunnerState.GONE:
            return self._update(name, to, now, fields)
        # `gone` releases the seats the record holds, in one transaction with the move.
        for _ in range(RELEASE_ATTEMPTS):
            found = self.get(name)
            if found is None or found.state not in ALLOWED_FROM[to]:
                return None
            if not found.seat:
                moved = self._update(name, to, now, dict(fields), seatless=True)
                if moved is not None:
                    return moved
                continue
            if self._gone_releasing(found, now, fields):
                return self.get(name)
        raise DependencyUnavailable(dynamodb.SERVICE, f"runner {name} changing while it ends")

    def _update(self, name: str, to: RunnerState, now: float, fields: dict[str, Any],
                seatless: bool = False) -> RunnerRecord | None:
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
        if seatless:
            condition = f"({condition}) AND attribute_not_exists(seat)"
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

    # --- seats ---

    def _seats_update(self, pool: str, runners: int, warm: int, now: float,
                      condition: str | None = None, values: dict | None = None) -> dict:
        """The pool's counter item: add `runners` and `warm` (attribute names are aliased:
        DynamoDB reserves many words)."""
        deltas = {attr: delta for attr, delta in (("runners", runners), ("warm", warm)) if delta}
        update: dict[str, Any] = {
            "TableName": self._table,
            "Key": {"runner_name": {"S": seats_key(pool)}},
            "UpdateExpression": "SET #pool = :pool, changed_at = :now ADD "
                                + ", ".join(f"#{attr} :{attr}" for attr in deltas),
            "ExpressionAttributeNames": {"#pool": "pool", "#runners": "runners",
                                         "#warm": "warm"},
            "ExpressionAttributeValues": {
                ":pool": {"S": pool}, ":now": to_attribute(now),
                **{f":{attr}": {"N": str(delta)} for attr, delta in deltas.items()},
                **(values or {}),
            },
        }
        if condition:
            update["ConditionExpression"] = condition
        if not deltas:  # nothing to add: an ADD clause may not be empty
            update["UpdateExpression"] = "SET #pool = :pool, changed_at = :now"
        # DynamoDB refuses a name the expressions do not use.
        used = update["UpdateExpression"] + " " + (condition or "")
        update["ExpressionAttributeNames"] = {
            alias: attr for alias, attr in update["ExpressionAttributeNames"].items()
            if alias in used}
        return {"Update": update}

    def _transact(self, items: list[dict]) -> list[dict] | None:
        """None when committed; the cancellation reasons when a condition failed. Every seat
        change of a pool touches its one counter item, so concurrent ones conflict on real
        DynamoDB (TransactionConflict): tried again more than other transactions are."""
        reasons = dynamodb.transact(self._client, items, attempts=SEAT_TRANSACTION_ATTEMPTS)
        if reasons is None:
            return None
        codes = {str(reason.get("Code")) for reason in reasons} - {"None"}
        if CONDITION_FAILED in codes:
            return reasons
        raise DependencyUnavailable(dynamodb.SERVICE, ",".join(sorted(codes)))

    def _gone_releasing(self, found: RunnerRecord, now: float, fields: dict[str, Any]) -> bool:
        warm = 1 if found.warm else 0
        names = {"#state": "state", "#stamp": "gone_at", "#warm": "warm"}
        values: dict[str, Any] = {":to": {"S": RunnerState.GONE.value},
                                  ":from": {"S": found.state.value},
                                  ":now": to_attribute(now),
                                  ":ttl": to_attribute(int(now) + GONE_RECORD_TTL_S)}
        sets = ["#state = :to", "#stamp = :now", "expires_at = :ttl"]
        for index, (key, value) in enumerate(fields.items()):
            if value is not None:
                names[f"#f{index}"] = key
                values[f":f{index}"] = to_attribute(value)
                sets.append(f"#f{index} = :f{index}")
        runner = {"Update": {
            "TableName": self._table,
            "Key": {"runner_name": {"S": found.runner_name}},
            "UpdateExpression": "SET " + ", ".join(sets) + " REMOVE seat, #warm",
            "ConditionExpression": "#state = :from AND attribute_exists(seat) AND "
                                   + ("attribute_exists(#warm)" if warm
                                      else "attribute_not_exists(#warm)"),
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
        }}
        pool = found.pool or ""
        return self._transact([runner, self._seats_update(pool, -1, -warm, now)]) is None

    def start(self, name: str, now: float, *, pool: str, max_runners: int,
              warm_limit: int | None = None, **fields: Any) -> RunnerRecord:
        record = {k: v for k, v in fields.items() if v is not None}
        record.update(runner_name=name, state=RunnerState.STARTING.value, starting_at=now,
                      pool=pool, seat=True)
        if warm_limit is not None:
            record.update(warm=True, warm_at=now)
        condition = "(attribute_not_exists(#runners) OR #runners < :max)"
        values = {":max": {"N": str(max_runners)}}
        if warm_limit is not None:
            condition += " AND (attribute_not_exists(#warm) OR #warm < :wmax)"
            values[":wmax"] = {"N": str(warm_limit)}
        items = [
            {"Put": {"TableName": self._table, "Item": dynamodb.to_item(record),
                     "ConditionExpression": "attribute_not_exists(runner_name)"}},
            self._seats_update(pool, 1, 1 if warm_limit is not None else 0, now,
                               condition, values),
        ]
        reasons = self._transact(items)
        if reasons is not None:
            if reasons[0].get("Code") == CONDITION_FAILED:
                raise RunnerExists(f"runner {name} exists already")
            raise NoSeat(pool, "warm" if warm_limit is not None else "runner")
        return RunnerRecord.model_validate(record)

    def make_warm(self, name: str, pool: str, warm_limit: int, now: float) -> bool:
        runner = {"Update": {
            "TableName": self._table,
            "Key": {"runner_name": {"S": name}},
            "UpdateExpression": "SET #warm = :true, warm_at = :now,"
                                " warm_from_job = if_not_exists(job_id, :zero)"
                                " REMOVE job_id, generation",
            "ConditionExpression": "#state IN (:starting, :idle) AND attribute_exists(seat)"
                                   " AND attribute_not_exists(#warm) AND #pool = :pool",
            "ExpressionAttributeNames": {"#state": "state", "#warm": "warm", "#pool": "pool"},
            "ExpressionAttributeValues": {
                ":true": {"BOOL": True}, ":now": to_attribute(now), ":pool": {"S": pool},
                ":zero": {"N": "0"},
                ":starting": {"S": RunnerState.STARTING.value},
                ":idle": {"S": RunnerState.IDLE.value},
            },
        }}
        seats = self._seats_update(pool, 0, 1, now,
                                   "attribute_not_exists(#warm) OR #warm < :wmax",
                                   {":wmax": {"N": str(warm_limit)}})
        return self._transact([runner, seats]) is None

    def take_warm(self, name: str, now: float) -> bool:
        return self._release_warm(name, now, "warm_taken_at")

    def unwarm(self, name: str, keep: int, now: float) -> bool:
        return self._release_warm(name, now, "unwarmed_at", keep=keep)

    def _release_warm(self, name: str, now: float, stamp: str, keep: int | None = None
                      ) -> bool:
        """Release the runner's warm seat (its flag and its pool's count, at once); with
        `keep`, only an idle runner's and only while the pool holds more than `keep`."""
        found = self.get(name)
        if found is None or not found.warm or not found.pool:
            return False
        names = {"#warm": "warm"}
        values: dict[str, Any] = {":now": to_attribute(now)}
        condition = "attribute_exists(#warm)"
        seats_condition, seats_values = None, None
        if keep is not None:
            names["#state"] = "state"
            values[":idle"] = {"S": RunnerState.IDLE.value}
            condition += " AND #state = :idle"
            seats_condition, seats_values = "#warm > :keep", {":keep": {"N": str(keep)}}
        runner = {"Update": {
            "TableName": self._table,
            "Key": {"runner_name": {"S": name}},
            "UpdateExpression": f"SET {stamp} = :now REMOVE #warm",
            "ConditionExpression": condition,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
        }}
        seats = self._seats_update(found.pool, 0, -1, now, seats_condition, seats_values)
        return self._transact([runner, seats]) is None

    def seats(self, pool: str) -> Seats:
        found = dynamodb.get(self._client, self._table,
                             {"runner_name": {"S": seats_key(pool)}}) or {}
        return Seats(runners=int(found.get("runners", 0)), warm=int(found.get("warm", 0)))
