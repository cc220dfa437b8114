"""What the scaler reads and writes in DynamoDB besides the hosts' own records.

- The lease, one per pool: an item of the hosts table under `scaler#<pool>` (no new table; the
  hosts store skips these items: `hosts.NOT_A_HOST_PREFIX`). One conditional write takes it
  (free, expired, or already ours), so one scaler run per pool acts at a time. A run that finds
  the lease taken sets `again` on it instead of waiting; the holder, releasing, sees `again` and
  runs once more: demand that arrived during a run is never left for the next schedule.
- The backlog: the pool's jobs waiting for a runner, through the jobs table's `by_state` index
  (one query per state, filtered by pool; eventually consistent, which scaling tolerates).
"""

from __future__ import annotations

from typing import Any, Protocol

from chalicelib import dynamodb
from chalicelib.dynamodb import conditional, to_attribute
from chalicelib.hosts import NOT_A_HOST_PREFIX
from chalicelib.jobs import WAITING_FOR_RUNNER, JobRecord

# A pool's lease item outlives its last run by a day (a removed pool's item then expires).
LEASE_TTL_S = 24 * 3600


def lease_key(pool: str) -> str:
    return f"{NOT_A_HOST_PREFIX}{pool}"


class ScalerLease(Protocol):
    def acquire(self, pool: str, owner: str, now: float, lease_s: float) -> bool:
        """True when the pool's lease is now `owner`'s; False (and `again` noted for the
        holder) while another run holds it."""

    def release(self, pool: str, owner: str, now: float) -> bool:
        """Free the lease; True when another run asked for one more run meanwhile (`again`)."""


class WaitingJobs(Protocol):
    def waiting(self, pool: str) -> list[JobRecord]:
        """The pool's jobs in `WAITING_FOR_RUNNER` (state, host_id at least)."""


class DynamoScalerLease:
    def __init__(self, client: Any, hosts_table: str) -> None:
        self._client = client
        self._table = hosts_table

    def acquire(self, pool: str, owner: str, now: float, lease_s: float) -> bool:
        key = {"host_id": {"S": lease_key(pool)}}
        taken = conditional(
            self._client.update_item, TableName=self._table, Key=key,
            UpdateExpression=("SET #owner = :me, lease_until = :until, acquired_at = :now,"
                              " expires_at = :expires REMOVE again"),
            ConditionExpression=("attribute_not_exists(host_id) OR lease_until < :now"
                                 " OR #owner = :me"),
            ExpressionAttributeNames={"#owner": "owner"},
            ExpressionAttributeValues={
                ":me": {"S": owner}, ":until": to_attribute(now + lease_s),
                ":now": to_attribute(now), ":expires": {"N": str(int(now) + LEASE_TTL_S)},
            },
        )
        if taken is not None:
            return True
        # Held: ask the holder for one more run (it may have read the demand before ours).
        conditional(
            self._client.update_item, TableName=self._table, Key=key,
            UpdateExpression="SET again = :yes",
            ConditionExpression="lease_until >= :now AND #owner <> :me",
            ExpressionAttributeNames={"#owner": "owner"},
            ExpressionAttributeValues={":yes": {"BOOL": True}, ":now": to_attribute(now),
                                       ":me": {"S": owner}},
        )
        return False

    def release(self, pool: str, owner: str, now: float) -> bool:
        answer = conditional(
            self._client.update_item, TableName=self._table,
            Key={"host_id": {"S": lease_key(pool)}},
            UpdateExpression="SET lease_until = :free, released_at = :now REMOVE again",
            ConditionExpression="#owner = :me",
            ExpressionAttributeNames={"#owner": "owner"},
            # Free at once: any later run may take it.
            ExpressionAttributeValues={":me": {"S": owner}, ":now": to_attribute(now),
                                       ":free": to_attribute(now - 1)},
            ReturnValues="ALL_OLD",
        )
        return bool(answer and answer.get("Attributes", {}).get("again", {}).get("BOOL"))


class DynamoWaitingJobs:
    def __init__(self, client: Any, jobs_table: str) -> None:
        self._client = client
        self._table = jobs_table

    def waiting(self, pool: str) -> list[JobRecord]:
        found: list[JobRecord] = []
        for state in sorted(WAITING_FOR_RUNNER):
            found += [JobRecord.model_validate(item) for item in dynamodb.query(
                self._client,
                TableName=self._table,
                IndexName="by_state",
                KeyConditionExpression="#state = :state",
                FilterExpression="#pool = :pool",
                ProjectionExpression="job_id, #state, #pool, host_id",
                ExpressionAttributeNames={"#state": "state", "#pool": "pool"},
                ExpressionAttributeValues={":state": {"S": state.value},
                                           ":pool": {"S": pool}},
            )]
        return found
