"""DynamoDB tables and SQS queues, built from chalicelib.resources (the single source of truth)."""

from __future__ import annotations

from dataclasses import dataclass

import aws_cdk as cdk
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from chalicelib import resources
from chalicelib.pools import PoolConfig
from runnerhub_infra.stages import StageSettings, removal_policy

_ATTRIBUTE_TYPES = {"S": dynamodb.AttributeType.STRING, "N": dynamodb.AttributeType.NUMBER}
# A DLQ keeps messages as long as SQS allows, for an operator to inspect and redrive.
DLQ_RETENTION = cdk.Duration.days(14)
# Every call that could change or remove an audit record (chalicelib/api/audit.py: append-only,
# records expire by TTL alone). The audit table's own policy denies them to every principal,
# so no role of the app (nor anyone else) gets them by a grant made later.
AUDIT_IMMUTABLE_ACTIONS = [
    "dynamodb:UpdateItem",
    "dynamodb:DeleteItem",
    "dynamodb:BatchWriteItem",
    "dynamodb:PartiQLUpdate",
    "dynamodb:PartiQLDelete",
]


def _attribute(key: tuple[str, str]) -> dynamodb.Attribute:
    name, kind = key
    return dynamodb.Attribute(name=name, type=_ATTRIBUTE_TYPES[kind])


@dataclass(frozen=True)
class PoolQueues:
    queue: sqs.Queue
    dead_letter_queue: sqs.Queue


class Data(Construct):
    """Tables (`tables[spec.logical_name]`) and one FIFO queue + DLQ per pool (`queues[pool]`)."""

    def __init__(
        self, scope: Construct, id: str, *, stage: StageSettings, pools: PoolConfig
    ) -> None:
        super().__init__(scope, id)
        self.stage = stage
        self.queue_prefix = stage.prefix
        removal = removal_policy(stage)
        self.tables: dict[str, dynamodb.Table] = {}
        for spec in resources.TABLES:
            self.tables[spec.logical_name] = self._table(spec, removal)
        self.queues: dict[str, PoolQueues] = {
            pool: self._pool_queues(pool, removal) for pool in pools.names
        }

    def table_name(self, spec: resources.TableSpec) -> str:
        # runnerhub-jobs -> runnerhub-<stage>-jobs: stages can share an account.
        return self.stage.prefix + spec.default_name.removeprefix("runnerhub-")

    def _table(self, spec: resources.TableSpec, removal: cdk.RemovalPolicy) -> dynamodb.Table:
        table = dynamodb.Table(
            self,
            spec.logical_name,
            table_name=self.table_name(spec),
            partition_key=_attribute(spec.partition_key),
            sort_key=_attribute(spec.sort_key) if spec.sort_key else None,
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            time_to_live_attribute=spec.ttl_attribute,
            # The jobs table's stream triggers the scaler (control_plane.py).
            stream=dynamodb.StreamViewType[spec.stream_view] if spec.stream_view else None,
            deletion_protection=self.stage.prod,
            removal_policy=removal,
            resource_policy=self._append_only() if spec is resources.AUDIT_TABLE else None,
        )
        for index in spec.indexes:
            table.add_global_secondary_index(
                index_name=index.name,
                partition_key=_attribute(index.partition_key),
                sort_key=_attribute(index.sort_key) if index.sort_key else None,
                projection_type=dynamodb.ProjectionType.ALL,
            )
        return table

    @staticmethod
    def _append_only() -> iam.PolicyDocument:
        # "*": a table's policy cannot name the table's own ARN while it is created.
        return iam.PolicyDocument(statements=[iam.PolicyStatement(
            sid="AuditAppendOnly", effect=iam.Effect.DENY, principals=[iam.AnyPrincipal()],
            actions=AUDIT_IMMUTABLE_ACTIONS, resources=["*"])])

    def _pool_queues(self, pool: str, removal: cdk.RemovalPolicy) -> PoolQueues:
        dlq = sqs.Queue(
            self,
            f"{pool}-dlq",
            queue_name=resources.dead_letter_queue_name(self.queue_prefix, pool),
            fifo=True,
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            retention_period=DLQ_RETENTION,
            removal_policy=removal,
        )
        queue = sqs.Queue(
            self,
            f"{pool}-queue",
            queue_name=resources.demand_queue_name(self.queue_prefix, pool),
            fifo=True,
            # The app sets MessageDeduplicationId = job:generation; bodies may repeat.
            content_based_deduplication=False,
            # MessageGroupId is the job id: high-throughput FIFO keeps order only per job.
            deduplication_scope=sqs.DeduplicationScope.MESSAGE_GROUP,
            fifo_throughput_limit=sqs.FifoThroughputLimit.PER_MESSAGE_GROUP_ID,
            visibility_timeout=cdk.Duration.seconds(resources.DEMAND_VISIBILITY_S),
            retention_period=cdk.Duration.seconds(resources.DEMAND_RETENTION_S),
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            dead_letter_queue=sqs.DeadLetterQueue(
                queue=dlq, max_receive_count=resources.DEMAND_MAX_RECEIVES
            ),
            removal_policy=removal,
        )
        return PoolQueues(queue=queue, dead_letter_queue=dlq)
