"""Create RunnerHub's tables and queues (idempotently) from chalicelib.resources.

    python -m devstack.resources [--pools FILE]     # uses AWS_ENDPOINT_URL
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from chalicelib import aws
from chalicelib.pools import PoolConfig, load_pools
from chalicelib.resources import (
    DEMAND_MAX_RECEIVES,
    DEMAND_RETENTION_S,
    DEMAND_VISIBILITY_S,
    TABLES,
    TableSpec,
    dead_letter_queue_name,
    demand_queue_name,
)


def create_tables(dynamodb: Any, names: dict[str, str] | None = None) -> dict[str, str]:
    """Create every table; `names` maps a spec's logical name to a table name."""
    created = {}
    # Every page: a session's moto server holds hundreds of tests' tables (100 a page).
    existing = {name for page in dynamodb.get_paginator("list_tables").paginate()
                for name in page.get("TableNames", [])}
    for spec in TABLES:
        name = (names or {}).get(spec.logical_name, spec.default_name)
        if name not in existing:
            _create_table(dynamodb, spec, name)
        created[spec.logical_name] = name
    return created


def _create_table(dynamodb: Any, spec: TableSpec, name: str) -> None:
    dynamodb.create_table(**spec.create_table_args(name))
    dynamodb.get_waiter("table_exists").wait(TableName=name)
    if spec.ttl_attribute:
        dynamodb.update_time_to_live(
            TableName=name,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": spec.ttl_attribute},
        )


def create_queues(sqs: Any, pools: PoolConfig, prefix: str) -> dict[str, str]:
    """One FIFO demand queue per pool with its DLQ; returns pool -> queue URL."""
    urls = {}
    for pool in pools.pools:
        dlq_url = sqs.create_queue(
            QueueName=dead_letter_queue_name(prefix, pool.name),
            Attributes={"FifoQueue": "true", "MessageRetentionPeriod": str(14 * 24 * 3600)},
        )["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
        urls[pool.name] = sqs.create_queue(
            QueueName=demand_queue_name(prefix, pool.name),
            Attributes={
                "FifoQueue": "true",
                "VisibilityTimeout": str(DEMAND_VISIBILITY_S),
                "MessageRetentionPeriod": str(DEMAND_RETENTION_S),
                "RedrivePolicy": json.dumps(
                    {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": DEMAND_MAX_RECEIVES}
                ),
            },
        )["QueueUrl"]
    return urls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", help="pools file (default: the bundled one)")
    parser.add_argument("--queue-prefix", default="runnerhub-")
    args = parser.parse_args()
    tables = create_tables(aws.client("dynamodb"))
    queues = create_queues(aws.client("sqs"), load_pools(args.pools), args.queue_prefix)
    print(json.dumps({"tables": tables, "queues": queues}, indent=2))


if __name__ == "__main__":
    main()
