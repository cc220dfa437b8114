"""What the scaler reads and writes in DynamoDB besides the hosts' own records.

- The lease, one per pool: an item of the hosts table under `scaler#<pool>` (no new table; the
  hosts store skips these items: `hosts.NOT_A_HOST_PREFIX`). One conditional write takes it
  (free: no `owner`; expired; or already ours), so one scaler run per pool acts at a time. A
  run that finds the lease held sets `again` on it instead of waiting, conditional on it being
  still held; the holder, releasing, reads `again` in the same write and runs once more. When
  `again` cannot be set because the holder released in between, the lease is free: the run
  tries to take it again (`acquire_or_ask`), so no wake-up falls between the two writes. A
  holder that stops after its last round (`MAX_ROUNDS`) leaves `again` on the item
  (`keep_again`) and reports it: the next run (the handler's second pass, the next stream
  batch or the schedule) takes it up.
  "Free" is the absence of `owner`, not a time: a run whose clock lags the releaser's cannot
  mistake a released lease for a held one. Only an expiry (a holder killed mid-run) is a time.
- The backlog: the pool's jobs waiting for a runner, through the jobs table's `by_state` index
  (one query per state, filtered by pool; eventually consistent, which scaling tolerates).
"""

from __future__ import annotations

from typing import Any, Protocol

from chalicelib import dynamodb
from chalicelib.dynamodb import conditional, to_attribute
from chalicelib.errors import DependencyUnavailable
from chalicelib.hosts import NOT_A_HOST_PREFIX
from chalicelib.jobs import CLAIM_STATES, WAITING_FOR_RUNNER, JobRecord, JobState
from chalicelib.scaler.rollout import RolloutState

# A pool's lease item outlives its last run by a day (a removed pool's item then expires).
LEASE_TTL_S = 24 * 3600
# Tries to take the lease or ask its holder for one more run: each try fails only because the
# lease changed hands between two writes, so more than a few means something is wrong.
LEASE_ATTEMPTS = 5
# What a host holds (`HeldJobs`): its claims, and a job its runner runs (a host whose daemon
# died may still run one in a container: terminating it would kill the job).
HELD_STATES = CLAIM_STATES | {JobState.IN_PROGRESS}


def lease_key(pool: str) -> str:
    return f"{NOT_A_HOST_PREFIX}{pool}"


class ScalerLease(Protocol):
    def acquire(self, pool: str, owner: str, now: float, lease_s: float) -> bool:
        """True when the pool's lease is now `owner`'s; False when another run holds it and
        has been asked for one more run (`again`). Never False while the lease is free."""

    def release(self, pool: str, owner: str, now: float, keep_again: bool = False) -> bool:
        """Free the lease; True when another run asked for one more run meanwhile (`again`).
        `keep_again`: leave that request on the item for the next run (the holder stops)."""


class LeasePrimitives(Protocol):
    """The two conditional writes `acquire_or_ask` is made of."""

    def take(self, pool: str, owner: str, now: float, lease_s: float) -> bool:
        """Take the lease if it is free, expired or ours."""

    def ask_again(self, pool: str, owner: str, now: float) -> bool:
        """Set `again` on the lease if another run holds it (False: it is free or expired)."""


def acquire_or_ask(lease: LeasePrimitives, pool: str, owner: str, now: float,
                   lease_s: float, attempts: int = LEASE_ATTEMPTS) -> bool:
    """Take the lease, or leave `again` with its holder. Between a failed take and the ask the
    holder may release: the ask then fails and the lease is free, so take it again; a wake-up
    is never lost between the two writes."""
    for _ in range(attempts):
        if lease.take(pool, owner, now, lease_s):
            return True
        if lease.ask_again(pool, owner, now):
            return False
    raise DependencyUnavailable("dynamodb", f"scaler lease of {pool} changed hands "
                                f"{attempts} times in a row")


class WaitingJobs(Protocol):
    def waiting(self, pool: str) -> list[JobRecord]:
        """The pool's jobs in `WAITING_FOR_RUNNER` (state, host_id at least)."""


class HeldJobs(Protocol):
    def holding(self, host_id: str) -> list[JobRecord]:
        """The jobs a host holds: claimed, runner started or in progress on it."""


class DynamoScalerLease:
    def __init__(self, client: Any, hosts_table: str) -> None:
        self._client = client
        self._table = hosts_table

    def acquire(self, pool: str, owner: str, now: float, lease_s: float) -> bool:
        return acquire_or_ask(self, pool, owner, now, lease_s)

    def take(self, pool: str, owner: str, now: float, lease_s: float) -> bool:
        return conditional(
            self._client.update_item, TableName=self._table,
            Key={"host_id": {"S": lease_key(pool)}},
            UpdateExpression=("SET #owner = :me, lease_until = :until, acquired_at = :now,"
                              " expires_at = :expires REMOVE again"),
            ConditionExpression=("attribute_not_exists(#owner) OR lease_until < :now"
                                 " OR #owner = :me"),
            ExpressionAttributeNames={"#owner": "owner"},
            ExpressionAttributeValues={
                ":me": {"S": owner}, ":until": to_attribute(now + lease_s),
                ":now": to_attribute(now), ":expires": {"N": str(int(now) + LEASE_TTL_S)},
            },
        ) is not None

    def ask_again(self, pool: str, owner: str, now: float) -> bool:
        # Held by another, and not expired: its holder will read `again` when it releases.
        return conditional(
            self._client.update_item, TableName=self._table,
            Key={"host_id": {"S": lease_key(pool)}},
            UpdateExpression="SET again = :yes",
            ConditionExpression=("attribute_exists(#owner) AND #owner <> :me"
                                 " AND lease_until >= :now"),
            ExpressionAttributeNames={"#owner": "owner"},
            ExpressionAttributeValues={":yes": {"BOOL": True}, ":now": to_attribute(now),
                                       ":me": {"S": owner}},
        ) is not None

    def release(self, pool: str, owner: str, now: float, keep_again: bool = False) -> bool:
        answer = conditional(
            self._client.update_item, TableName=self._table,
            Key={"host_id": {"S": lease_key(pool)}},
            # Free at once (no owner): any later run may take it, whatever its clock says.
            UpdateExpression=("SET lease_until = :free, released_at = :now, released_by = :me"
                              " REMOVE #owner" + ("" if keep_again else ", again")),
            ConditionExpression="#owner = :me",
            ExpressionAttributeNames={"#owner": "owner"},
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


class DynamoHeldJobs:
    """The jobs a host holds, through the jobs table's `by_host` index (the host's claims and
    the jobs its runners run): a host holding one is never terminated by the scaler."""

    def __init__(self, client: Any, jobs_table: str) -> None:
        self._client = client
        self._table = jobs_table

    def holding(self, host_id: str) -> list[JobRecord]:
        names = {"#state": "state"}
        held = sorted(state.value for state in HELD_STATES)
        values = {f":s{i}": {"S": state} for i, state in enumerate(held)}
        return [JobRecord.model_validate(item) for item in dynamodb.query(
            self._client,
            TableName=self._table,
            IndexName="by_host",
            KeyConditionExpression="host_id = :h",
            FilterExpression=f"#state IN ({', '.join(values)})",
            ProjectionExpression="job_id, #state, host_id",
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values | {":h": {"S": host_id}},
        )]


# --- a pool's rollout (chalicelib/scaler/rollout.py), written only under the pool's lease ---

ROLLOUT_TTL_S = 30 * 24 * 3600  # a finished rollout stays readable (API, runbook) for a month


def rollout_key(pool: str) -> str:
    return f"{NOT_A_HOST_PREFIX}rollout#{pool}"


class RolloutStore(Protocol):
    def get(self, pool: str) -> RolloutState | None: ...

    def put(self, pool: str, state: RolloutState, now: float) -> None: ...


def rollout_item(pool: str, state: RolloutState, now: float) -> dict[str, Any]:
    return {"host_id": rollout_key(pool), "pool": pool, "target": state.target,
            "previous": state.previous, "status": state.status, "started_at": state.started_at,
            "checkpoint_until": state.checkpoint_until,
            "passed_checkpoints": list(state.passed_checkpoints), "reason": state.reason[:1000],
            "failed_hosts": list(state.failed_hosts), "last_replaced_at": state.last_replaced_at,
            "updated_at": now,
            "expires_at": int(now) + ROLLOUT_TTL_S}


def rollout_state(item: dict[str, Any] | None) -> RolloutState | None:
    if not item:
        return None
    return RolloutState(target=str(item["target"]), previous=str(item["previous"]),
                        status=item["status"], started_at=float(item["started_at"]),
                        checkpoint_until=float(item.get("checkpoint_until") or 0),
                        passed_checkpoints=tuple(int(c) for c in
                                                 item.get("passed_checkpoints") or ()),
                        reason=str(item.get("reason") or ""),
                        failed_hosts=tuple(item.get("failed_hosts") or ()),
                        last_replaced_at=float(item.get("last_replaced_at") or 0))


class DynamoRolloutStore:
    def __init__(self, client: Any, hosts_table: str) -> None:
        self._client = client
        self._table = hosts_table

    def get(self, pool: str) -> RolloutState | None:
        return rollout_state(dynamodb.get(self._client, self._table,
                                          {"host_id": {"S": rollout_key(pool)}}))

    def put(self, pool: str, state: RolloutState, now: float) -> None:
        dynamodb.write(self._client.put_item, TableName=self._table,
                       Item=dynamodb.to_item(rollout_item(pool, state, now)))


class InMemoryRolloutStore:
    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}

    def get(self, pool: str) -> RolloutState | None:
        return rollout_state(self.items.get(pool))

    def put(self, pool: str, state: RolloutState, now: float) -> None:
        self.items[pool] = rollout_item(pool, state, now)
