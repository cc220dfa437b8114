"""Executor hosts: the heartbeat record each executor writes, and which hosts are alive.

One record per host (key: host id) in the hosts table, written only by the host itself every
`heartbeat_s`: the pools it serves, its slots (total and busy: what the scaler reads), its
version and the demand schema versions it accepts, and its state (`serving`, `draining`,
`stopped`). Another executor reads it to decide whether a claim whose lease expired belongs to a
dead host (takeover) or to a live one (left alone), and marks a dead host `lost` once nothing of
it is left to recover.

A host is alive while its record is `serving` or `draining` and its last heartbeat is at most
`DEAD_AFTER_BEATS` of its own heartbeat intervals old. The claims of a host are found through the
jobs table's `by_host` index (`ClaimIndex`), its runners through the runners table's.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from chalicelib import dynamodb
from chalicelib.dynamodb import Record, conditional, to_attribute, to_item
from chalicelib.jobs import JobRecord, JobState

# A host that missed this many heartbeats in a row is dead.
DEAD_AFTER_BEATS = 3
# A host's record expires (DynamoDB TTL) this long after its last heartbeat.
HOST_RECORD_TTL_S = 24 * 3600


class HostState(StrEnum):
    SERVING = "serving"
    DRAINING = "draining"  # SIGTERM: receives nothing, its running jobs finish
    STOPPED = "stopped"  # exited (`clean`: holding nothing)
    LOST = "lost"  # declared dead by another executor, which recovered what it held


# What a live host says it is (its heartbeat must also be fresh: `host_alive`).
LIVE_STATES = frozenset({HostState.SERVING, HostState.DRAINING})


class HostRecord(Record):
    """A host's last heartbeat as stored (`Heartbeat.item`; slots, version... are extra)."""

    host_id: str
    state: HostState
    pools: tuple[str, ...] = ()
    heartbeat_at: float = 0.0
    heartbeat_s: float = 0.0
    clean: bool | None = None  # a stopped host's: it exited holding nothing


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

    def item(self, now: float) -> dict[str, Any]:
        extra = {} if self.clean is None else {"clean": self.clean}
        return extra | {
            "host_id": self.host_id,
            "pools": list(self.pools),
            "slots_total": self.slots_total,
            "slots_busy": self.slots_busy,
            "slots_free": max(0, self.slots_total - self.slots_busy),
            "runners": self.runners,
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
    def beat(self, heartbeat: Heartbeat, now: float) -> None: ...

    def get(self, host_id: str) -> HostRecord | None: ...

    def all(self) -> list[HostRecord]: ...

    def mark_lost(self, host_id: str, seen_heartbeat_at: float, now: float, by: str) -> bool:
        """`lost`, unless the host beat again since `seen_heartbeat_at` (then False)."""


class ClaimIndex(Protocol):
    def open_claims(self, host_id: str) -> list[JobRecord]:
        """Jobs in `claimed`/`runner_started` (`CLAIM_STATES`) whose `host_id` is this host."""


class DynamoHostStore:
    def __init__(self, client: Any, table_name: str) -> None:
        self._client = client
        self._table = table_name

    def beat(self, heartbeat: Heartbeat, now: float) -> None:
        dynamodb.write(self._client.put_item, TableName=self._table,
                       Item=to_item(heartbeat.item(now)))

    def get(self, host_id: str) -> HostRecord | None:
        found = dynamodb.get(self._client, self._table, {"host_id": {"S": host_id}})
        return HostRecord.model_validate(found) if found else None

    def all(self) -> list[HostRecord]:
        return [HostRecord.model_validate(item)
                for item in dynamodb.scan(self._client, self._table)]

    def mark_lost(self, host_id: str, seen_heartbeat_at: float, now: float, by: str) -> bool:
        answer = conditional(
            self._client.update_item,
            TableName=self._table,
            Key={"host_id": {"S": host_id}},
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
