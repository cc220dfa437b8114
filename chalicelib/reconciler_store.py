"""What the reconciler reads and writes in DynamoDB besides jobs and runners.

Its own items live in the deliveries table, under keys no GitHub guid can take (guids are
UUIDs), so no new table is needed:

- `reconciler#lease`: the lease (`owner`, `lease_until`) and, in the same item, the state the
  next run continues from (`state`: the delivery cursor, pending guids, runners seen offline).
  One item, so saving the state is conditional on still holding the lease: a run that lost its
  lease cannot roll the cursor back.
- `redeliver#<guid>`: when a guid was last redelivered and how often (`last_at`, `attempts`),
  expiring by TTL after GitHub has forgotten the delivery. Claimed by a conditional write before
  each redelivery, so a guid is redelivered at most once per `redeliver_every_s`, even by a run
  repeated after a crash.

The by_state index of the jobs table finds stuck jobs without a scan.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

from chalicelib.errors import DependencyUnavailable, aws_error_code, conditional, outage_errors
from chalicelib.jobs import InMemoryJobStore, JobState, from_item, to_attribute
from chalicelib.reconciler_plan import GITHUB_DELIVERY_RETENTION_S, Mark, ReconcilerState

LEASE_KEY = "reconciler#lease"
MARK_PREFIX = "redeliver#"
# Marks outlive GitHub's retention by a day: a guid GitHub still has is never redelivered twice
# within the interval because its mark expired.
MARK_TTL_S = GITHUB_DELIVERY_RETENTION_S + 24 * 3600
# DynamoDB BatchGetItem takes at most 100 keys.
BATCH_GET_MAX_KEYS = 100
BATCH_GET_ROUNDS = 5


class LeaseStore(Protocol):
    def acquire(self, owner: str, now: float, lease_s: float) -> ReconcilerState | None:
        """The stored state when the lease is now `owner`'s; None while another holds it."""

    def save(self, owner: str, state: ReconcilerState, now: float) -> bool:
        """Store the state and release the lease; False when the lease is no longer ours."""


class DeliveryRecords(Protocol):
    def lookup(self, guids: Sequence[str]) -> tuple[dict[str, str], dict[str, Mark]]:
        """(RunnerHub's delivery status per guid, the reconciler's redelivery mark per guid)."""

    def claim_redelivery(self, guid: str, now: float, every_s: float) -> Mark | None:
        """Record a redelivery of `guid` now, unless one was made less than `every_s` ago."""


class JobIndex(Protocol):
    def stale(self, state: JobState, before: float, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` jobs in `state` last updated before `before`, oldest first."""


# --- DynamoDB ---------------------------------------------------------------------------------


class DynamoLeaseStore:
    def __init__(self, client: Any, table_name: str) -> None:
        self._client = client
        self._table = table_name

    def acquire(self, owner: str, now: float, lease_s: float) -> ReconcilerState | None:
        answer = conditional(
            self._client.update_item,
            TableName=self._table,
            Key={"delivery_id": {"S": LEASE_KEY}},
            UpdateExpression="SET #owner = :me, lease_until = :until, acquired_at = :now",
            ConditionExpression=(
                "attribute_not_exists(delivery_id) OR lease_until < :now OR #owner = :me"
            ),
            ExpressionAttributeNames={"#owner": "owner"},
            ExpressionAttributeValues={
                ":me": {"S": owner},
                ":until": to_attribute(now + lease_s),
                ":now": to_attribute(now),
            },
            ReturnValues="ALL_NEW",
        )
        if answer is None:
            return None
        return ReconcilerState.from_json(answer["Attributes"].get("state", {}).get("S"))

    def save(self, owner: str, state: ReconcilerState, now: float) -> bool:
        answer = conditional(
            self._client.update_item,
            TableName=self._table,
            Key={"delivery_id": {"S": LEASE_KEY}},
            UpdateExpression="SET #state = :state, lease_until = :now, saved_at = :now",
            ConditionExpression="#owner = :me",
            ExpressionAttributeNames={"#owner": "owner", "#state": "state"},
            ExpressionAttributeValues={
                ":me": {"S": owner},
                ":state": {"S": state.to_json()},
                ":now": to_attribute(now),
            },
        )
        if answer is None:
            return False
        return True


class DynamoDeliveryRecords:
    def __init__(self, client: Any, table_name: str) -> None:
        self._client = client
        self._table = table_name

    def lookup(self, guids: Sequence[str]) -> tuple[dict[str, str], dict[str, Mark]]:
        keys = [key for guid in dict.fromkeys(guids) for key in (guid, MARK_PREFIX + guid)]
        statuses: dict[str, str] = {}
        marks: dict[str, Mark] = {}
        for start in range(0, len(keys), BATCH_GET_MAX_KEYS):
            for item in self._batch_get(keys[start : start + BATCH_GET_MAX_KEYS]):
                key = item["delivery_id"]
                if key.startswith(MARK_PREFIX):
                    marks[key[len(MARK_PREFIX) :]] = Mark(
                        float(item.get("last_at", 0)), int(item.get("attempts", 0))
                    )
                elif item.get("status"):
                    statuses[key] = str(item["status"])
        return statuses, marks

    def _batch_get(self, keys: list[str]) -> list[dict[str, Any]]:
        request = {
            self._table: {
                "Keys": [{"delivery_id": {"S": key}} for key in keys],
                "ConsistentRead": True,
                "ProjectionExpression": "delivery_id, #status, last_at, attempts",
                "ExpressionAttributeNames": {"#status": "status"},
            }
        }
        found: list[dict[str, Any]] = []
        try:
            for _ in range(BATCH_GET_ROUNDS):
                answer = self._client.batch_get_item(RequestItems=request)
                found += [from_item(item) for item in answer["Responses"].get(self._table, [])]
                request = answer.get("UnprocessedKeys") or {}
                if not request:
                    return found
        except outage_errors() as exc:
            raise DependencyUnavailable("dynamodb", aws_error_code(exc)) from exc
        raise DependencyUnavailable("dynamodb", "UnprocessedKeys")

    def claim_redelivery(self, guid: str, now: float, every_s: float) -> Mark | None:
        answer = conditional(
            self._client.update_item,
            TableName=self._table,
            Key={"delivery_id": {"S": MARK_PREFIX + guid}},
            UpdateExpression="SET last_at = :now, expires_at = :exp ADD attempts :one",
            ConditionExpression="attribute_not_exists(delivery_id) OR last_at <= :cutoff",
            ExpressionAttributeValues={
                ":now": to_attribute(now),
                ":exp": {"N": str(int(now) + MARK_TTL_S)},
                ":one": {"N": "1"},
                ":cutoff": to_attribute(now - every_s),
            },
            ReturnValues="ALL_NEW",
        )
        if answer is None:
            return None
        item = from_item(answer["Attributes"])
        return Mark(float(item["last_at"]), int(item["attempts"]))


class DynamoJobIndex:
    """The jobs table's by_state index (state, updated_at)."""

    def __init__(self, client: Any, table_name: str) -> None:
        self._client = client
        self._table = table_name

    def stale(self, state: JobState, before: float, limit: int) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        found: list[dict[str, Any]] = []
        request: dict[str, Any] = {
            "TableName": self._table,
            "IndexName": "by_state",
            "KeyConditionExpression": "#state = :state AND updated_at < :before",
            "ExpressionAttributeNames": {"#state": "state"},
            "ExpressionAttributeValues": {
                ":state": {"S": state.value},
                ":before": to_attribute(before),
            },
            "ScanIndexForward": True,  # oldest first
        }
        try:
            while len(found) < limit:
                answer = self._client.query(**request, Limit=limit - len(found))
                found += [from_item(item) for item in answer.get("Items", [])]
                if "LastEvaluatedKey" not in answer:
                    break
                request["ExclusiveStartKey"] = answer["LastEvaluatedKey"]
        except outage_errors() as exc:
            raise DependencyUnavailable("dynamodb", aws_error_code(exc)) from exc
        return found[:limit]


# --- In memory (unit tests) -------------------------------------------------------------------


class InMemoryReconcilerTable:
    """Lease, state, delivery statuses and marks in one dict, like the deliveries table."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.lease: dict[str, Any] = {}
        self.state_json: str | None = None
        self.statuses: dict[str, str] = {}
        self.marks: dict[str, Mark] = {}

    # LeaseStore
    def acquire(self, owner: str, now: float, lease_s: float) -> ReconcilerState | None:
        with self._lock:
            if self.lease and self.lease["lease_until"] >= now and self.lease["owner"] != owner:
                return None
            self.lease = {"owner": owner, "lease_until": now + lease_s}
            return ReconcilerState.from_json(self.state_json)

    def save(self, owner: str, state: ReconcilerState, now: float) -> bool:
        with self._lock:
            if self.lease.get("owner") != owner:
                return False
            self.state_json = state.to_json()
            self.lease["lease_until"] = now
            return True

    @property
    def state(self) -> ReconcilerState:
        return ReconcilerState.from_json(self.state_json)

    # DeliveryRecords
    def lookup(self, guids: Sequence[str]) -> tuple[dict[str, str], dict[str, Mark]]:
        with self._lock:
            return (
                {g: self.statuses[g] for g in guids if g in self.statuses},
                {g: self.marks[g] for g in guids if g in self.marks},
            )

    def claim_redelivery(self, guid: str, now: float, every_s: float) -> Mark | None:
        with self._lock:
            mark = self.marks.get(guid)
            if mark and mark.last_at > now - every_s:
                return None
            self.marks[guid] = Mark(now, (mark.attempts if mark else 0) + 1)
            return self.marks[guid]


class InMemoryJobIndex:
    def __init__(self, store: InMemoryJobStore) -> None:
        self._store = store

    def stale(self, state: JobState, before: float, limit: int) -> list[dict[str, Any]]:
        jobs = [
            job for job in self._store.all()
            if job.get("state") == state.value and float(job.get("updated_at", 0)) < before
        ]
        return sorted(jobs, key=lambda job: job["updated_at"])[: max(0, limit)]
