"""Tables and queues match chalicelib.resources and the pools file."""

from __future__ import annotations

from chalicelib import resources
from tests.infra.cfn import refers_to
from tests.infra.cfn import resources as of_type


def _table(template: dict, spec: resources.TableSpec, stage) -> dict:
    name = stage.prefix + spec.default_name.removeprefix("runnerhub-")
    matches = [
        table
        for table in of_type(template, "AWS::DynamoDB::Table").values()
        if table["Properties"]["TableName"] == name
    ]
    assert len(matches) == 1, name
    return matches[0]


def test_tables_follow_resources(template, stage):
    assert len(of_type(template, "AWS::DynamoDB::Table")) == len(resources.TABLES)
    for spec in resources.TABLES:
        props = _table(template, spec, stage)["Properties"]
        expected = spec.create_table_args(props["TableName"])
        assert props["BillingMode"] == "PAY_PER_REQUEST"
        assert props["KeySchema"] == expected["KeySchema"]
        assert (
            sorted(props["AttributeDefinitions"], key=lambda a: a["AttributeName"])
            == (expected["AttributeDefinitions"])
        )
        indexes = {
            index["IndexName"]: (index["KeySchema"], index["Projection"])
            for index in props.get("GlobalSecondaryIndexes", [])
        }
        assert indexes == {
            index["IndexName"]: (index["KeySchema"], index["Projection"])
            for index in expected.get("GlobalSecondaryIndexes", [])
        }


def test_tables_have_pitr(template, stage):
    for spec in resources.TABLES:
        props = _table(template, spec, stage)["Properties"]
        assert props["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True


def test_ttl_where_set(template, stage):
    for spec in resources.TABLES:
        props = _table(template, spec, stage)["Properties"]
        if spec.ttl_attribute:
            assert props["TimeToLiveSpecification"] == {
                "AttributeName": spec.ttl_attribute,
                "Enabled": True,
            }
        else:
            assert "TimeToLiveSpecification" not in props


def test_prod_protects_data_and_dev_does_not(template, stage):
    for spec in resources.TABLES:
        table = _table(template, spec, stage)
        assert table["Properties"].get("DeletionProtectionEnabled", False) is stage.prod
        assert table["DeletionPolicy"] == ("Retain" if stage.prod else "Delete")
    for kind in ("AWS::SQS::Queue", "AWS::SecretsManager::Secret", "AWS::KMS::Key"):
        for resource in of_type(template, kind).values():
            assert resource["DeletionPolicy"] == ("Retain" if stage.prod else "Delete"), kind


def test_one_fifo_queue_with_dlq_per_pool(template, stage, pools):
    queues = {
        queue["Properties"]["QueueName"]: (logical_id, queue["Properties"])
        for logical_id, queue in of_type(template, "AWS::SQS::Queue").items()
    }
    assert len(queues) == 2 * len(pools.pools)
    for pool in pools.names:
        props = queues[resources.demand_queue_name(stage.prefix, pool)][1]
        dlq_id, dlq = queues[resources.dead_letter_queue_name(stage.prefix, pool)]
        assert props["FifoQueue"] is True and dlq["FifoQueue"] is True
        assert props.get("ContentBasedDeduplication", False) is False
        assert props["VisibilityTimeout"] == resources.DEMAND_VISIBILITY_S
        assert props["MessageRetentionPeriod"] == resources.DEMAND_RETENTION_S
        redrive = props["RedrivePolicy"]
        assert redrive["maxReceiveCount"] == resources.DEMAND_MAX_RECEIVES
        assert refers_to(redrive["deadLetterTargetArn"], dlq_id)
        for queue in (props, dlq):
            assert queue.get("SqsManagedSseEnabled") is True or "KmsMasterKeyId" in queue


def test_queues_refuse_plain_http(template):
    policies = of_type(template, "AWS::SQS::QueuePolicy").values()
    queues = of_type(template, "AWS::SQS::Queue")
    covered = {
        queue_id
        for policy in policies
        for queue_id in queues
        if refers_to(policy["Properties"]["Queues"], queue_id)
        and any(
            statement["Effect"] == "Deny"
            and statement.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false"
            for statement in policy["Properties"]["PolicyDocument"]["Statement"]
        )
    }
    assert covered == set(queues)


def test_jobs_table_streams_what_the_scaler_reads(template, stage):
    """The stream the scaler's trigger reads: the same view as chalicelib.resources (so the
    local stack's table has it too), and only where a spec asks for one."""
    for spec in resources.TABLES:
        props = _table(template, spec, stage)["Properties"]
        expected = spec.create_table_args(props["TableName"]).get("StreamSpecification")
        if spec.stream_view:
            assert props["StreamSpecification"] == {"StreamViewType": spec.stream_view}
            assert expected == {"StreamEnabled": True, "StreamViewType": spec.stream_view}
        else:
            assert "StreamSpecification" not in props and expected is None
    # The handler reads each record's new image (state, pool).
    assert resources.JOBS_TABLE.stream_view in ("NEW_IMAGE", "NEW_AND_OLD_IMAGES")


def test_a_stream_view_dynamodb_lacks_is_refused():
    import pytest

    with pytest.raises(ValueError, match="stream_view 'NEW' is none of"):
        resources.TableSpec("t", "runnerhub-t", ("id", "S"), stream_view="NEW")
