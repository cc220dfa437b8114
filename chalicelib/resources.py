"""The AWS resources RunnerHub uses, defined once.

The local stack (`devstack/resources.py`), the tests and the CDK app (`infra/`) all build tables
and queues from these definitions, so the code and what is deployed cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# SQS quotas: https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/quotas-queues.html
SQS_MAX_QUEUE_NAME = 80
SQS_MAX_LONG_POLL_S = 20
SQS_MAX_VISIBILITY_S = 12 * 60 * 60
SQS_MAX_BATCH = 10
# A demand message that fails this many receives goes to the pool's DLQ.
DEMAND_MAX_RECEIVES = 5
DEMAND_VISIBILITY_S = 60
# Messages are kept 4 days; GitHub keeps a queued job for 24 h before it fails it.
DEMAND_RETENTION_S = 4 * 24 * 3600


# DynamoDB's stream view types.
STREAM_VIEWS = ("KEYS_ONLY", "NEW_IMAGE", "OLD_IMAGE", "NEW_AND_OLD_IMAGES")


@dataclass(frozen=True)
class Index:
    name: str
    partition_key: tuple[str, str]  # (attribute, "S" | "N")
    sort_key: tuple[str, str] | None = None


@dataclass(frozen=True)
class TableSpec:
    logical_name: str  # settings field and CDK id
    default_name: str
    partition_key: tuple[str, str]
    ttl_attribute: str | None = None
    # The table's sort key (attribute, "S" | "N"), or None for a partition key alone.
    sort_key: tuple[str, str] | None = None
    indexes: tuple[Index, ...] = field(default=())
    # A DynamoDB stream of the table's changes (StreamViewType), or None for no stream.
    stream_view: str | None = None

    def __post_init__(self) -> None:
        if self.stream_view not in (None, *STREAM_VIEWS):
            raise ValueError(f"table {self.logical_name}: stream_view {self.stream_view!r} is "
                             f"none of {', '.join(STREAM_VIEWS)}")

    def create_table_args(self, table_name: str) -> dict:
        """Arguments for DynamoDB CreateTable (on-demand)."""
        keys = {self.partition_key}
        if self.sort_key:
            keys.add(self.sort_key)
        for index in self.indexes:
            keys.add(index.partition_key)
            if index.sort_key:
                keys.add(index.sort_key)
        args: dict = {
            "TableName": table_name,
            "BillingMode": "PAY_PER_REQUEST",
            "AttributeDefinitions": [
                {"AttributeName": name, "AttributeType": kind} for name, kind in sorted(keys)
            ],
            "KeySchema": [{"AttributeName": self.partition_key[0], "KeyType": "HASH"}]
            + ([{"AttributeName": self.sort_key[0], "KeyType": "RANGE"}] if self.sort_key else []),
        }
        if self.stream_view:
            args["StreamSpecification"] = {"StreamEnabled": True,
                                           "StreamViewType": self.stream_view}
        if self.indexes:
            args["GlobalSecondaryIndexes"] = [
                {
                    "IndexName": index.name,
                    "KeySchema": [{"AttributeName": index.partition_key[0], "KeyType": "HASH"}]
                    + (
                        [{"AttributeName": index.sort_key[0], "KeyType": "RANGE"}]
                        if index.sort_key
                        else []
                    ),
                    "Projection": {"ProjectionType": "ALL"},
                }
                for index in self.indexes
            ]
        return args


JOBS_TABLE = TableSpec(
    logical_name="jobs_table",
    default_name="runnerhub-jobs",
    partition_key=("job_id", "N"),
    indexes=(
        # The reconciler finds jobs that stay too long in one state.
        Index("by_state", ("state", "S"), ("updated_at", "N")),
        # A dead host's claims are found by host.
        Index("by_host", ("host_id", "S")),
    ),
    # The scaler reacts to new demand within seconds: the stream invokes it with each changed
    # job's new image (its state and pool), chalicelib/scaler/handler.py.
    stream_view="NEW_IMAGE",
)
DELIVERIES_TABLE = TableSpec(
    logical_name="deliveries_table",
    default_name="runnerhub-deliveries",
    partition_key=("delivery_id", "S"),
    ttl_attribute="expires_at",
)
RUNNERS_TABLE = TableSpec(
    logical_name="runners_table",
    default_name="runnerhub-runners",
    partition_key=("runner_name", "S"),
    ttl_attribute="expires_at",
    indexes=(Index("by_host", ("host_id", "S")),),
)
# One heartbeat record per executor host (chalicelib/hosts.py): liveness for takeovers, slot
# figures for the scaler. Small (one item per host), so it is read with a Scan.
HOSTS_TABLE = TableSpec(
    logical_name="hosts_table",
    default_name="runnerhub-hosts",
    partition_key=("host_id", "S"),
    ttl_attribute="expires_at",
)
# Demand history for the forecast (chalicelib/history.py): per pool, one item per 5-minute
# bucket (arrivals, runner-seconds), written by the scaler's stream handler, off the webhook's
# path; kept HISTORY_TTL_S, independent of the job records' own TTL. The trainer's forecast of a
# pool is an item of this table too (`forecast#<pool>`, bucket 0).
HISTORY_BUCKET_S = 300
HISTORY_TTL_S = 6 * 7 * 24 * 3600
HISTORY_TABLE = TableSpec(
    logical_name="history_table",
    default_name="runnerhub-history",
    partition_key=("pool", "S"),
    sort_key=("bucket", "N"),
    ttl_attribute="expires_at",
)
# The management API's audit log (chalicelib/api/audit.py): append-only, one partition per UTC
# day (`day#YYYY-MM-DD`), sort key `<iso time>#<uuid>`; kept at least AUDIT_TTL_S (TTL).
AUDIT_TTL_S = 400 * 24 * 3600
AUDIT_TABLE = TableSpec(
    logical_name="audit_table",
    default_name="runnerhub-audit",
    partition_key=("pk", "S"),
    sort_key=("sk", "S"),
    ttl_attribute="expires_at",
)
# A pool's operator overrides (warm target, host min/max: chalicelib/overrides.py) are one
# item of the runners table beside its seat counters, under this prefix (never a runner name).
OVERRIDES_PREFIX = "overrides#"
TABLES = (JOBS_TABLE, DELIVERIES_TABLE, RUNNERS_TABLE, HOSTS_TABLE, HISTORY_TABLE, AUDIT_TABLE)


def demand_queue_name(prefix: str, pool: str) -> str:
    name = f"{prefix}{pool}.fifo"
    if len(name) > SQS_MAX_QUEUE_NAME:
        raise ValueError(f"queue name {name!r} exceeds {SQS_MAX_QUEUE_NAME} characters")
    return name


def dead_letter_queue_name(prefix: str, pool: str) -> str:
    name = f"{prefix}{pool}-dlq.fifo"
    if len(name) > SQS_MAX_QUEUE_NAME:
        raise ValueError(f"queue name {name!r} exceeds {SQS_MAX_QUEUE_NAME} characters")
    return name
