"""Webhook delivery de-duplication on `X-GitHub-Delivery`.

A delivery is taken with one conditional put: new, failed before, or abandoned (its processing
lease expired) may be taken; one already processed or in flight may not. Records expire by TTL.
The job moves themselves are idempotent, so this saves work and keeps the log; it is not what
keeps state correct.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from chalicelib.errors import DependencyUnavailable, aws_error_code, conditional, outage_errors
from chalicelib.jobs import to_attribute

logger = logging.getLogger(__name__)

PROCESSING = "processing"
DONE = "done"
FAILED = "failed"


class DeliveryLog(Protocol):
    def begin(self, delivery_id: str, event: str, now: float) -> bool: ...

    def finish(self, delivery_id: str, now: float, outcome: str, job_id: int | None) -> None: ...

    def fail(self, delivery_id: str, now: float, reason: str) -> None: ...


class DynamoDeliveryLog:
    def __init__(self, client: Any, table_name: str, ttl_s: int, lease_s: int) -> None:
        self._client = client
        self._table = table_name
        self._ttl_s = ttl_s
        self._lease_s = lease_s

    def begin(self, delivery_id: str, event: str, now: float) -> bool:
        answer = conditional(
            self._client.put_item,
            TableName=self._table,
            Item={
                "delivery_id": {"S": delivery_id},
                "event": {"S": event},
                "status": {"S": PROCESSING},
                "received_at": to_attribute(now),
                "lease_until": to_attribute(now + self._lease_s),
                "expires_at": {"N": str(int(now) + self._ttl_s)},
            },
            ConditionExpression=(
                "attribute_not_exists(delivery_id) OR #status = :failed"
                " OR (#status = :processing AND lease_until < :now)"
            ),
            ExpressionAttributeNames={"#status": "status"},
            ExpressionAttributeValues={
                ":failed": {"S": FAILED},
                ":processing": {"S": PROCESSING},
                ":now": to_attribute(now),
            },
        )
        if answer is None:
            return False
        return True

    def finish(self, delivery_id: str, now: float, outcome: str, job_id: int | None) -> None:
        values = {":done": {"S": DONE}, ":outcome": {"S": outcome}, ":now": to_attribute(now)}
        expression = "SET #status = :done, outcome = :outcome, finished_at = :now"
        if job_id is not None:
            values[":job"] = {"N": str(job_id)}
            expression += ", job_id = :job"
        try:
            self._client.update_item(
                TableName=self._table,
                Key={"delivery_id": {"S": delivery_id}},
                UpdateExpression=expression + " REMOVE lease_until",
                ExpressionAttributeNames={"#status": "status"},
                ExpressionAttributeValues=values,
            )
        except outage_errors() as exc:
            raise DependencyUnavailable("dynamodb", aws_error_code(exc)) from exc

    def fail(self, delivery_id: str, now: float, reason: str) -> None:
        # Best effort: if this write fails too, the processing lease expires and a redelivery
        # can take the delivery again.
        try:
            self._client.update_item(
                TableName=self._table,
                Key={"delivery_id": {"S": delivery_id}},
                UpdateExpression="SET #status = :failed, failure = :reason, finished_at = :now"
                " REMOVE lease_until",
                ConditionExpression="#status = :processing",
                ExpressionAttributeNames={"#status": "status"},
                ExpressionAttributeValues={
                    ":failed": {"S": FAILED},
                    ":processing": {"S": PROCESSING},
                    ":reason": {"S": reason},
                    ":now": to_attribute(now),
                },
            )
        except Exception as exc:  # noqa: BLE001 - the lease makes the delivery retryable anyway
            logger.warning("could not mark delivery failed (%s); its lease will expire",
                           aws_error_code(exc))


class InMemoryDeliveryLog:
    def __init__(self, lease_s: int = 30) -> None:
        self._lock = threading.Lock()
        self._lease_s = lease_s
        self.records: dict[str, dict[str, Any]] = {}

    def begin(self, delivery_id: str, event: str, now: float) -> bool:
        with self._lock:
            record = self.records.get(delivery_id)
            if record and not (
                record["status"] == FAILED
                or (record["status"] == PROCESSING and record["lease_until"] < now)
            ):
                return False
            self.records[delivery_id] = {
                "event": event, "status": PROCESSING, "lease_until": now + self._lease_s,
            }
            return True

    def finish(self, delivery_id: str, now: float, outcome: str, job_id: int | None) -> None:
        with self._lock:
            self.records[delivery_id].update(status=DONE, outcome=outcome, job_id=job_id)

    def fail(self, delivery_id: str, now: float, reason: str) -> None:
        with self._lock:
            record = self.records.get(delivery_id)
            if record and record["status"] == PROCESSING:
                record.update(status=FAILED, failure=reason)
