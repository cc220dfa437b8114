"""Executor hosts: the heartbeat record each executor writes, and which hosts are alive.

One record per host (key: host id; on AWS the EC2 instance id) in the hosts table, written by
the host itself every `heartbeat_s`: the pools it serves, its slots (total and busy: what the
scaler reads), when it last held a slot, its version and the demand schema versions it accepts,
and its state. Another executor reads it to decide whether a claim whose lease expired belongs
to a dead host (takeover) or to a live one (left alone), and marks a dead host `lost` once
nothing of it is left to recover.

States: the host writes `serving`, `draining`, `stopped`; the scaler writes `retiring` (from
`serving` only, and only while the host's last heartbeat shows it idle and saw its last claim)
and puts a host it could not retire back to `serving`; another executor writes `lost`. A
heartbeat is an UpdateItem that never changes `retiring` or `lost` (a restarted daemon, a new
incarnation, may leave `lost`); it answers with the state stored, which is how a daemon learns
it is retiring (docs/scaling.md).

A claim is a transaction (`claim`): the job's move plus an update of the claimant's record that
holds only while it is `serving`, bumping `claims` and stamping `last_claim_at`. Retiring is
conditional on `last_claim_at < heartbeat_at` and `slots_busy = 0`: a claim racing a
retirement either commits first (the retirement's condition fails: the host keeps serving) or
after (the claim's condition fails: the demand is left for another host). Never both.

A host is alive while its record is `serving`, `draining` or `retiring` and its last heartbeat
is at most `DEAD_AFTER_BEATS` of its own heartbeat intervals old. The claims of a host are found
through the jobs table's `by_host` index (`ClaimIndex`), its runners through the runners table's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from chalicelib import dynamodb
from chalicelib.dynamodb import (
    CONDITION_FAILED,
    Record,
    attempt,
    conditional,
    from_item,
    to_attribute,
)
from chalicelib.errors import DependencyUnavailable, RunnerHubError
from chalicelib.jobs import NO_CHANGE, Change, JobRecord, JobState, Move, Transition

# A host that missed this many heartbeats in a row is dead.
DEAD_AFTER_BEATS = 3
# A host's record expires (DynamoDB TTL) this long after its last heartbeat.
HOST_RECORD_TTL_S = 24 * 3600
# Items of the hosts table that are not hosts (the scaler's per-pool lease) start with this; EC2
# instance ids and host names never contain "#".
NOT_A_HOST_PREFIX = "scaler#"
# A heartbeat refused because the state changed under it is written again at most this often.
BEAT_ATTEMPTS = 3


class HostState(StrEnum):
    SERVING = "serving"
    DRAINING = "draining"  # SIGTERM: receives nothing, its running jobs finish
    STOPPED = "stopped"  # exited (`clean`: holding nothing)
    LOST = "lost"  # declared dead by another executor, which recovered what it held
    RETIRING = "retiring"  # chosen by the scaler to be terminated: claims nothing


# What a live host says it is (its heartbeat must also be fresh: `host_alive`).
LIVE_STATES = frozenset({HostState.SERVING, HostState.DRAINING, HostState.RETIRING})
# States a heartbeat never overwrites (the scaler's and the other executors' verdicts).
KEPT_STATES = frozenset({HostState.RETIRING, HostState.LOST})


class HostNotServing(RunnerHubError):
    """A claim refused because the claimant's own record is not `serving` (retiring, draining,
    lost, or no record yet): the job was not touched; its demand is for another host."""

    def __init__(self, host_id: str, state: HostState | None) -> None:
        super().__init__(f"host {host_id} is {state.value if state else 'unknown'}: "
                         "it claims nothing")
        self.host_id = host_id
        self.state = state


class HostRecord(Record):
    """A host's last heartbeat as stored (`Heartbeat.item`; slots, version... are extra)."""

    host_id: str
    state: HostState
    pools: tuple[str, ...] = ()
    heartbeat_at: float = 0.0
    heartbeat_s: float = 0.0
    clean: bool | None = None  # a stopped host's: it exited holding nothing
    slots_total: int = 0
    slots_busy: int = 0
    started_at: float = 0.0  # when its daemon started (one incarnation)
    busy_at: float | None = None  # the last time it held a slot (its daemon's clock)
    last_claim_at: float | None = None  # stamped by its last claim (same clock)
    claims: int = 0  # claims it made (each claim transaction adds one)
    # An operator asked it to drain (the management API: a busy host); its daemon drains.
    drain_requested_at: float | None = None
    drain_requested_by: str | None = None
    # Runner starts since its daemon started, and failed ones (a rollout's health check).
    starts: int = 0
    start_failures: int = 0

    @property
    def idle_since(self) -> float:
        """Since when it holds nothing, as far as its record tells: its last busy moment, its
        last claim, or its daemon's start."""
        return max(self.started_at, self.busy_at or 0.0, self.last_claim_at or 0.0)


@dataclass(frozen=True)
class Heartbeat:
    host_id: str
    pools: tuple[str, ...]
    slots_total: int
    slots_busy: int
    runners: int
    version: str
    schema_versions: tuple[int, int]  # (oldest, newest) demand schema accepted
    state: HostState
    heartbeat_s: float
    started_at: float
    # Only in a stopped host's last heartbeat: True when it exited holding nothing.
    clean: bool | None = None
    # The last time the host held a slot (None: never since it started).
    busy_at: float | None = None
    # Runner starts since the daemon started, and failed ones (chalicelib/scaler/rollout.py).
    starts: int = 0
    start_failures: int = 0

    def item(self, now: float) -> dict[str, Any]:
        """The record's fields. `now` must be read before `slots_busy` was: a claim stamped
        before `now` then took its slot before `slots_busy` was counted (the retire condition
        `last_claim_at < heartbeat_at AND slots_busy = 0` relies on it)."""
        extra = {} if self.clean is None else {"clean": self.clean}
        if self.busy_at is not None:
            extra["busy_at"] = self.busy_at
        return extra | {
            "host_id": self.host_id,
            "pools": list(self.pools),
            "slots_total": self.slots_total,
            "slots_busy": self.slots_busy,
            "slots_free": max(0, self.slots_total - self.slots_busy),
            "runners": self.runners,
            "starts": self.starts,
            "start_failures": self.start_failures,
            "version": self.version,
            "schema_versions": list(self.schema_versions),
            "state": self.state.value,
            "heartbeat_s": self.heartbeat_s,
            "started_at": self.started_at,
            "heartbeat_at": now,
            "expires_at": int(now) + HOST_RECORD_TTL_S,
        }


def dead_at(record: HostRecord) -> float:
    """When a host whose last heartbeat is `record` counts as dead (if no newer one comes)."""
    return record.heartbeat_at + DEAD_AFTER_BEATS * record.heartbeat_s


def host_alive(record: HostRecord | None, now: float) -> bool:
    """A host is alive while it says it serves or drains and its heartbeat is fresh. Pure."""
    if record is None or record.state not in LIVE_STATES:
        return False
    return now <= dead_at(record)


class HostStore(Protocol):
    def beat(self, heartbeat: Heartbeat, now: float) -> HostState:
        """Write the heartbeat; the state stored after it (the heartbeat's own, or `retiring` /
        `lost`, which a heartbeat never overwrites)."""

    def get(self, host_id: str) -> HostRecord | None: ...

    def all(self) -> list[HostRecord]: ...

    def mark_lost(self, host_id: str, seen_heartbeat_at: float, now: float, by: str) -> bool:
        """`lost`, unless the host beat again since `seen_heartbeat_at` (then False)."""

    def claim(self, claimant: str, jobs: Any, job_id: int, move: Move, now: float,
              change: Change = NO_CHANGE, *, generation: int | None = None,
              host_id: str | None = None) -> Transition:
        """The job's `move` (as `jobs.apply` makes it) by host `claimant`, in one transaction
        with a condition that the claimant's record is `serving`, which also marks the claim
        on it (`claims` + 1, `last_claim_at` = `now`). HostNotServing when the claimant's record
        is not serving (the job is untouched)."""

    def retire(self, host_id: str, now: float, fresh_after: float, by: str) -> bool:
        """`retiring`, only from `serving` with a heartbeat at or after `fresh_after` that
        shows no busy slot and came after the host's last claim."""

    def unretire(self, host_id: str, now: float) -> bool:
        """Back to `serving` from `retiring` (a retirement given up)."""


class ClaimIndex(Protocol):
    def open_claims(self, host_id: str) -> list[JobRecord]:
        """Jobs in `claimed`/`runner_started` (`CLAIM_STATES`) whose `host_id` is this host."""


def _key(host_id: str) -> dict[str, Any]:
    return {"host_id": {"S": host_id}}


class DynamoHostStore:
    def __init__(self, client: Any, table_name: str,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._client = client
        self._table = table_name
        self._sleep = sleep

    def beat(self, heartbeat: Heartbeat, now: float) -> HostState:
        fields = heartbeat.item(now)
        del fields["host_id"]
        state = HostState(fields.pop("state"))
        names: dict[str, str] = {"#state": "state"}
        values: dict[str, Any] = {}
        sets = []
        for index, (name, value) in enumerate(fields.items()):
            names[f"#a{index}"] = name
            values[f":a{index}"] = to_attribute(value)
            sets.append(f"#a{index} = :a{index}")
        # A stopped host's `clean` is about that stop only.
        removes = [] if heartbeat.clean is not None else ["clean"]
        for _ in range(BEAT_ATTEMPTS):
            # 1. With its state, unless the record is retiring or lost (a new incarnation, with
            #    another start time, may leave lost: a daemon restarted on a host declared dead).
            applied, answer = attempt(
                self._client.update_item, TableName=self._table, Key=_key(heartbeat.host_id),
                UpdateExpression=("SET " + ", ".join([*sets, "#state = :state"])
                                  + " REMOVE " + ", ".join([*removes, "lost_at", "lost_by"])),
                ConditionExpression=(
                    "attribute_not_exists(#state) OR NOT (#state IN (:retiring, :lost))"
                    " OR (#state = :lost AND #started <> :started)"),
                ExpressionAttributeNames=names | {"#started": "started_at"},
                ExpressionAttributeValues=values | {
                    ":state": {"S": state.value},
                    ":retiring": {"S": HostState.RETIRING.value},
                    ":lost": {"S": HostState.LOST.value},
                    ":started": to_attribute(heartbeat.started_at),
                },
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
            if applied:
                return state
            found = HostState(from_item(answer.get("Item") or {}).get("state", state.value))
            # 2. Everything but the state, while the state is still the one found.
            applied, _ = attempt(
                self._client.update_item, TableName=self._table, Key=_key(heartbeat.host_id),
                UpdateExpression="SET " + ", ".join(sets)
                + (" REMOVE " + ", ".join(removes) if removes else ""),
                ConditionExpression="#state = :found",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values | {":found": {"S": found.value}},
            )
            if applied:
                return found
        raise DependencyUnavailable(dynamodb.SERVICE, "host state changing under heartbeat")

    def get(self, host_id: str) -> HostRecord | None:
        found = dynamodb.get(self._client, self._table, _key(host_id))
        return HostRecord.model_validate(found) if found else None

    def all(self) -> list[HostRecord]:
        return [HostRecord.model_validate(item)
                for item in dynamodb.scan(self._client, self._table)
                if not str(item.get("host_id", "")).startswith(NOT_A_HOST_PREFIX)]

    def mark_lost(self, host_id: str, seen_heartbeat_at: float, now: float, by: str) -> bool:
        answer = conditional(
            self._client.update_item,
            TableName=self._table,
            Key=_key(host_id),
            UpdateExpression="SET #state = :lost, lost_at = :now, lost_by = :by",
            ConditionExpression="heartbeat_at = :seen",
            ExpressionAttributeNames={"#state": "state"},
            ExpressionAttributeValues={
                ":lost": {"S": HostState.LOST.value},
                ":now": to_attribute(now),
                ":by": {"S": by},
                ":seen": to_attribute(seen_heartbeat_at),
            },
        )
        return answer is not None

    def claim(self, claimant: str, jobs: Any, job_id: int, move: Move, now: float,
              change: Change = NO_CHANGE, *, generation: int | None = None,
              host_id: str | None = None) -> Transition:
        items = [
            jobs.transact_update(job_id, move, now, change, generation=generation,
                                 host_id=host_id),
            {"Update": {
                "TableName": self._table,
                "Key": _key(claimant),
                "UpdateExpression": "SET last_claim_at = :now ADD claims :one",
                "ConditionExpression": "#state = :serving",
                "ExpressionAttributeNames": {"#state": "state"},
                "ExpressionAttributeValues": {
                    ":now": to_attribute(now), ":one": {"N": "1"},
                    ":serving": {"S": HostState.SERVING.value},
                },
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
            }},
        ]
        reasons = dynamodb.transact(self._client, items, sleep=self._sleep)
        if reasons is None:
            return Transition(True, jobs.get(job_id))
        job_reason, host_reason = [*reasons, {}, {}][:2]
        if host_reason.get("Code") == CONDITION_FAILED:
            found = from_item(host_reason.get("Item") or {}).get("state")
            raise HostNotServing(claimant, HostState(found) if found else None)
        if job_reason.get("Code") == CONDITION_FAILED:
            old = job_reason.get("Item")
            return Transition(False, JobRecord.model_validate(from_item(old)) if old else None)
        codes = sorted({str(reason.get("Code")) for reason in reasons} - {"None"})
        if set(codes) & THROTTLED_CODES:
            raise DependencyUnavailable(dynamodb.SERVICE, ",".join(codes))
        raise RuntimeError(f"claim transaction cancelled: {codes}")

    def retire(self, host_id: str, now: float, fresh_after: float, by: str) -> bool:
        applied, answer = attempt(
            self._client.update_item,
            TableName=self._table,
            Key=_key(host_id),
            ReturnValuesOnConditionCheckFailure="ALL_OLD",
            UpdateExpression="SET #state = :retiring, retiring_at = :now, retiring_by = :by",
            ConditionExpression=(
                "#state = :serving AND slots_busy = :zero AND heartbeat_at >= :fresh"
                " AND (attribute_not_exists(last_claim_at) OR last_claim_at < heartbeat_at)"),
            ExpressionAttributeNames={"#state": "state"},
            ExpressionAttributeValues={
                ":retiring": {"S": HostState.RETIRING.value},
                ":serving": {"S": HostState.SERVING.value},
                ":zero": {"N": "0"},
                ":fresh": to_attribute(fresh_after),
                ":now": to_attribute(now),
                ":by": {"S": by},
            },
        )
        if applied:
            return True
        # Refused: by our own earlier attempt when botocore retried a write whose answer was
        # lost (a slow network); then the host is retiring by us, at this very time.
        found = from_item(answer.get("Item") or {})
        return (found.get("state") == HostState.RETIRING.value
                and found.get("retiring_by") == by
                and abs(float(found.get("retiring_at", -1.0)) - now) < 0.001)

    def unretire(self, host_id: str, now: float) -> bool:
        answer = conditional(
            self._client.update_item,
            TableName=self._table,
            Key=_key(host_id),
            UpdateExpression="SET #state = :serving, unretired_at = :now"
                             " REMOVE retiring_at, retiring_by",
            ConditionExpression="#state = :retiring",
            ExpressionAttributeNames={"#state": "state"},
            ExpressionAttributeValues={
                ":retiring": {"S": HostState.RETIRING.value},
                ":serving": {"S": HostState.SERVING.value},
                ":now": to_attribute(now),
            },
        )
        return answer is not None


# Cancellation reasons that mean DynamoDB throttled the transaction (an outage, retried later).
THROTTLED_CODES = frozenset({"ProvisionedThroughputExceeded", "ThrottlingError",
                             "RequestLimitExceeded"})


class DynamoClaimIndex:
    """Open claims of a host, through the jobs table's `by_host` index."""

    def __init__(self, client: Any, jobs_table: str) -> None:
        self._client = client
        self._table = jobs_table

    def open_claims(self, host_id: str) -> list[JobRecord]:
        return [JobRecord.model_validate(item) for item in dynamodb.query(
            self._client,
            TableName=self._table,
            IndexName="by_host",
            KeyConditionExpression="host_id = :h",
            FilterExpression="#state IN (:claimed, :started)",
            ExpressionAttributeNames={"#state": "state"},
            ExpressionAttributeValues={
                ":h": {"S": host_id},
                ":claimed": {"S": JobState.CLAIMED.value},
                ":started": {"S": JobState.RUNNER_STARTED.value},
            },
        )]
