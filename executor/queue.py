"""The pools' demand queues, as the executor uses them: receive, delete, delay, dead-letter.

Ack = delete; requeue = visibility 0 (or a delay); a malformed message goes to the pool's DLQ
with its reason, never back to the queue and never dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from chalicelib.errors import DependencyUnavailable, aws_error_code
from chalicelib.resources import SQS_MAX_BATCH, dead_letter_queue_name, demand_queue_name


@dataclass(frozen=True)
class Received:
    pool: str
    message_id: str
    receipt: str
    body: str
    receive_count: int


class DemandConsumer:
    def __init__(self, client: Any, queue_prefix: str, pools: tuple[str, ...]) -> None:
        self._client = client
        self._prefix = queue_prefix
        self._urls: dict[str, str] = {}
        self._dlq_urls: dict[str, str] = {}
        for pool in pools:
            self._urls[pool] = self._url(demand_queue_name(queue_prefix, pool))
            self._dlq_urls[pool] = self._url(dead_letter_queue_name(queue_prefix, pool))

    def _url(self, name: str) -> str:
        try:
            return self._client.get_queue_url(QueueName=name)["QueueUrl"]
        except Exception as exc:
            raise DependencyUnavailable("sqs", f"{aws_error_code(exc)} for queue {name}") from exc

    def receive(self, pool: str, max_messages: int, wait_s: int, visibility_s: int
                ) -> list[Received]:
        if not 1 <= max_messages <= SQS_MAX_BATCH:
            raise ValueError(f"max_messages must be 1-{SQS_MAX_BATCH}")
        try:
            answer = self._client.receive_message(
                QueueUrl=self._urls[pool],
                MaxNumberOfMessages=max_messages,
                WaitTimeSeconds=wait_s,
                VisibilityTimeout=visibility_s,
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
            )
        except Exception as exc:
            raise DependencyUnavailable("sqs", aws_error_code(exc)) from exc
        return [
            Received(
                pool=pool,
                message_id=message["MessageId"],
                receipt=message["ReceiptHandle"],
                body=message["Body"],
                receive_count=int(message.get("Attributes", {}).get("ApproximateReceiveCount", 1)),
            )
            for message in answer.get("Messages", [])
        ]

    def delete(self, received: Received) -> None:
        try:
            self._client.delete_message(
                QueueUrl=self._urls[received.pool], ReceiptHandle=received.receipt
            )
        except Exception as exc:
            raise DependencyUnavailable("sqs", aws_error_code(exc)) from exc

    def set_visibility(self, received: Received, seconds: int) -> None:
        """0 makes the message visible again at once; more delays it (or keeps it held)."""
        try:
            self._client.change_message_visibility(
                QueueUrl=self._urls[received.pool],
                ReceiptHandle=received.receipt,
                VisibilityTimeout=max(0, int(seconds)),
            )
        except Exception as exc:
            raise DependencyUnavailable("sqs", aws_error_code(exc)) from exc

    def recycle(self, received: Received) -> None:
        """Send the same body again as a new message, then delete this one: its receive count
        starts over (a message this executor can't read must not reach the DLQ by bouncing)."""
        try:
            group = str(json.loads(received.body).get("job_id", "recycled"))
        except (ValueError, AttributeError):
            group = "recycled"
        try:
            self._client.send_message(
                QueueUrl=self._urls[received.pool],
                MessageBody=received.body,
                MessageGroupId=group,
                MessageDeduplicationId=f"recycled:{received.message_id}",
            )
        except Exception as exc:
            raise DependencyUnavailable("sqs", aws_error_code(exc)) from exc
        self.delete(received)

    def dead_letter(self, received: Received, reason: str) -> None:
        """Move a message to the pool's DLQ with the reason, then delete it from the queue."""
        try:
            self._client.send_message(
                QueueUrl=self._dlq_urls[received.pool],
                MessageBody=received.body,
                MessageGroupId="rejected",
                MessageDeduplicationId=received.message_id,
                MessageAttributes={
                    "rejected_reason": {"DataType": "String", "StringValue": reason[:256]}
                },
            )
        except Exception as exc:
            raise DependencyUnavailable("sqs", aws_error_code(exc)) from exc
        self.delete(received)
