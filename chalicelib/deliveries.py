"""Webhook delivery de-duplication on `X-GitHub-Delivery`.

A delivery is taken with one conditional put: new, failed before, or abandoned (its processing
lease expired) may be taken; one already processed or in flight may not. Records expire by TTL.
The job moves themselves are idempotent, so this saves work and keeps the log; it is not what
keeps state correct.
"""

from __future__ import annotations

from typing import Any, Protocol

from aws_lambda_powertools import Logger

from chalicelib import dynamodb
from chalicelib.dynamodb import conditional, to_attribute
from chalicelib.errors import aws_error_code

# The webhook's logger (a child: its lines go out through the webhook's handler, with its keys).
logger = Logger(service="runnerhub-webhook", child=True)

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
        return answer is not None

    def finish(self, delivery_id: str, now: float, outcome: str, job_id: int | None) -> None:
        values = {":done": {"S": DONE}, ":outcome": {"S": outcome}, ":now": to_attribute(now)}
        expression = "SET #status = :done, outcome = :outcome, finished_at = :now"
        if job_id is not None:
            values[":job"] = {"N": str(job_id)}
            expression += ", job_id = :job"
        dynamodb.write(
            self._client.update_item,
            TableName=self._table,
            Key={"delivery_id": {"S": delivery_id}},
            UpdateExpression=expression + " REMOVE lease_until",
            ExpressionAttributeNames={"#status": "status"},
            ExpressionAttributeValues=values,
        )

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
