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

from collections.abc import Sequence
from typing import Any, Protocol

from chalicelib import dynamodb
from chalicelib.dynamodb import conditional, from_item, to_attribute
from chalicelib.errors import DependencyUnavailable
from chalicelib.jobs import JobRecord, JobState
from chalicelib.reconciler.deliveries import Mark
from chalicelib.reconciler.policy import GITHUB_DELIVERY_RETENTION_S
from chalicelib.reconciler.state import ReconcilerState

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
    def stale(self, state: JobState, before: float, limit: int) -> list[JobRecord]:
        """Up to `limit` jobs in `state` last updated before `before`, oldest first."""

    def census(self, states: Sequence[JobState]) -> dict[JobState, tuple[int, int]]:
        """Per state: (jobs in it, those of them flagged after failed starts)."""


# The census reads at most this many index pages a state per run (1 MB each): beyond that the
# count is a lower bound, and the backlog graph says so by being flat at its top.
CENSUS_PAGES = 20


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
        return answer is not None


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
        with dynamodb.unavailable():
            for _ in range(BATCH_GET_ROUNDS):
                answer = self._client.batch_get_item(RequestItems=request)
                found += [from_item(item) for item in answer["Responses"].get(self._table, [])]
                request = answer.get("UnprocessedKeys") or {}
                if not request:
                    return found
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

    def stale(self, state: JobState, before: float, limit: int) -> list[JobRecord]:
        if limit <= 0:
            return []
        found: list[JobRecord] = []
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
        with dynamodb.unavailable():
            while len(found) < limit:
                answer = self._client.query(**request, Limit=limit - len(found))
                found += [JobRecord.model_validate(from_item(item))
                          for item in answer.get("Items", [])]
                if "LastEvaluatedKey" not in answer:
                    break
                request["ExclusiveStartKey"] = answer["LastEvaluatedKey"]
        return found[:limit]

    def census(self, states: Sequence[JobState]) -> dict[JobState, tuple[int, int]]:
        found = {}
        for state in states:
            count = flagged = 0
            request: dict[str, Any] = {
                "TableName": self._table,
                "IndexName": "by_state",
                "KeyConditionExpression": "#state = :state",
                "ProjectionExpression": "#flagged",
                "ExpressionAttributeNames": {"#state": "state", "#flagged": "flagged"},
                "ExpressionAttributeValues": {":state": {"S": state.value}},
            }
            with dynamodb.unavailable():
                for _ in range(CENSUS_PAGES):
                    answer = self._client.query(**request)
                    items = answer.get("Items", [])
                    count += len(items)
                    flagged += sum(1 for item in items if item.get("flagged", {}).get("BOOL"))
                    if "LastEvaluatedKey" not in answer:
                        break
                    request["ExclusiveStartKey"] = answer["LastEvaluatedKey"]
            found[state] = (count, flagged)
        return found
