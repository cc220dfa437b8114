"""A webhook stack on whatever AWS the environment points at (mock_aws or a moto server): the
webhook service wired as the Lambda wires it, with its tables and queues, for tests and
benchmarks (`bench-webhook` compares its own fakes against it)."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from chalicelib import aws, wiring
from chalicelib.jobs import DynamoJobStore
from chalicelib.resources import DELIVERIES_TABLE, JOBS_TABLE, RUNNERS_TABLE
from chalicelib.settings import WebhookSettings
from chalicelib.webhook import WebhookRequest
from devstack.resources import create_queues, create_tables
from devstack.webhook_events import (
    JSON,
    LambdaContext,
    api_gateway_event,
    delivery_body,
    delivery_headers,
    response_json,
)

SECRET = b"test-webhook-secret"
FIXED_NOW = 1_700_000_000.0


class WebhookStack:
    def __init__(self, pools_file: Path | None, suffix: str, clock=None) -> None:
        self.prefix = f"rh-{suffix}-"
        self.env = {
            "RUNNERHUB_WEBHOOK_SECRETS": SECRET.decode(),
            "RUNNERHUB_JOBS_TABLE": f"{self.prefix}{JOBS_TABLE.default_name}",
            "RUNNERHUB_DELIVERIES_TABLE": f"{self.prefix}{DELIVERIES_TABLE.default_name}",
            "RUNNERHUB_RUNNERS_TABLE": f"{self.prefix}{RUNNERS_TABLE.default_name}",
            "RUNNERHUB_QUEUE_PREFIX": self.prefix,
            "RUNNERHUB_EMIT_METRICS": "false",
        }
        if pools_file:
            self.env["RUNNERHUB_POOLS_FILE"] = str(pools_file)
        self.dynamodb = aws.client("dynamodb")
        self.sqs = aws.client("sqs")
        os.environ.update(self.env)
        try:
            self._build(pools_file, clock)
        except BaseException:
            self.close()  # never leave this stack's variables to the tests after it
            raise

    def _build(self, pools_file: Path | None, clock) -> None:
        self.settings = WebhookSettings()
        create_tables(
            self.dynamodb,
            {"jobs_table": self.settings.jobs_table,
             "deliveries_table": self.settings.deliveries_table,
             "runners_table": self.settings.runners_table},
        )
        from chalicelib.pools import load_pools

        self.pools = load_pools(pools_file)
        self.queues = create_queues(self.sqs, self.pools, self.prefix)
        self.service = wiring.build_webhook_service(
            self.settings, **({"clock": clock} if clock else {})
        )
        wiring.use(self.service)
        self.jobs = DynamoJobStore(self.dynamodb, self.settings.jobs_table)

    def close(self) -> None:
        wiring.use(None)
        for key in self.env:
            os.environ.pop(key, None)

    # --- sending ---

    def post(self, payload, event="workflow_job", delivery_id=None, secret=SECRET,
             content_type=JSON, headers=None):
        """Through the whole Lambda handler: app(event, context). Returns (status, body)."""
        from app import app

        body = delivery_body(payload, content_type)
        sent = delivery_headers(body, secret, event, delivery_id, content_type)
        sent.update(headers or {})
        response = app(api_gateway_event(body, sent), LambdaContext())
        return response["statusCode"], response_json(response)

    def handle(self, payload, event="workflow_job", delivery_id=None, service=None):
        """Straight to the service (thread-safe; Chalice's current_request is not)."""
        body = delivery_body(payload)
        headers = delivery_headers(body, SECRET, event, delivery_id)
        result = (service or self.service).handle(WebhookRequest(headers, body))
        return result.status, result.body

    # --- reading ---

    def job(self, job_id: int) -> dict | None:
        """The job's item as stored (ground truth for tests: a dict, not the store's record)."""
        record = self.jobs.get(job_id)
        return record.as_dict() if record else None

    def all_jobs(self) -> list[dict]:
        items = self.dynamodb.scan(TableName=self.settings.jobs_table, ConsistentRead=True)
        from chalicelib.dynamodb import from_item

        return [from_item(item) for item in items["Items"]]

    def delivery(self, delivery_id: str):
        item = self.dynamodb.get_item(
            TableName=self.settings.deliveries_table,
            Key={"delivery_id": {"S": delivery_id}}, ConsistentRead=True,
        ).get("Item")
        from chalicelib.dynamodb import from_item

        return from_item(item) if item else None

    def messages(self, pool: str, limit: int = 10) -> list[dict]:
        """Drain up to `limit` messages from a pool's queue (visibility 60 s: read once)."""
        found: list[dict] = []
        while len(found) < limit:
            answer = self.sqs.receive_message(
                QueueUrl=self.queues[pool], MaxNumberOfMessages=10, WaitTimeSeconds=0,
                AttributeNames=["All"], MessageAttributeNames=["All"],
            )
            batch = answer.get("Messages", [])
            if not batch:
                break
            for message in batch:
                group = message["Attributes"].get("MessageGroupId")
                found.append(json.loads(message["Body"]) | {"_group": group})
        return found


@contextmanager
def webhook_stack(pools_file, suffix, clock=None):
    stack = WebhookStack(pools_file, suffix, clock)
    try:
        yield stack
    finally:
        stack.close()
