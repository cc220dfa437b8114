"""The local AWS's DynamoDB-only outage (the fault suite's `dynamodb_outage_s`): DynamoDB
answers as AWS does when it fails or throttles, SQS works on, the harness's ground-truth reads
pass, and the outage ends on time."""

from __future__ import annotations

import time

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from devstack.aws_server import GROUND_TRUTH_AGENT

NO_RETRIES = Config(retries={"mode": "standard", "max_attempts": 1})


@pytest.fixture
def clients(aws_endpoint):
    dynamodb = boto3.client("dynamodb", config=NO_RETRIES)
    sqs = boto3.client("sqs", config=NO_RETRIES)
    dynamodb.create_table(
        TableName="outage-t", BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "k", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "k", "AttributeType": "S"}])
    queue = sqs.create_queue(QueueName="outage-q")["QueueUrl"]
    yield dynamodb, sqs, queue
    dynamodb.delete_table(TableName="outage-t")
    sqs.delete_queue(QueueUrl=queue)


@pytest.mark.parametrize(("mode", "status", "code"), [
    ("unavailable", 500, "InternalServerError"),
    ("throttle", 400, "ProvisionedThroughputExceededException"),
])
def test_dynamodb_fails_alone_while_sqs_works(local_aws, clients, mode, status, code):
    dynamodb, sqs, queue = clients
    local_aws.dynamodb_outage(1.0, mode)
    with pytest.raises(ClientError) as failed:
        dynamodb.put_item(TableName="outage-t", Item={"k": {"S": "a"}})
    assert failed.value.response["Error"]["Code"] == code
    assert failed.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    sqs.send_message(QueueUrl=queue, MessageBody="still works")
    assert sqs.receive_message(QueueUrl=queue)["Messages"][0]["Body"] == "still works"
    truth = boto3.client("dynamodb", config=Config(user_agent_extra=GROUND_TRUTH_AGENT))
    assert truth.scan(TableName="outage-t")["Items"] == []  # the harness still reads
    time.sleep(1.1)
    dynamodb.put_item(TableName="outage-t", Item={"k": {"S": "a"}})  # over: it works again
    assert local_aws.dynamodb.refused >= 1


def test_the_outage_is_measured_from_first_to_last_refusal(local_aws, clients):
    dynamodb, _, _ = clients
    before = local_aws.dynamodb.refused
    local_aws.dynamodb_outage(2.0, "unavailable")
    for _ in range(2):
        with pytest.raises(ClientError):
            dynamodb.get_item(TableName="outage-t", Key={"k": {"S": "a"}})
        time.sleep(0.6)
    assert 0.5 <= local_aws.dynamodb.refusing_s(since=before) < 2.0
    assert local_aws.dynamodb.refusing_s(since=local_aws.dynamodb.refused) == 0.0
    time.sleep(1.0)


def test_an_unknown_mode_is_refused(local_aws):
    with pytest.raises(ValueError, match="mode must be one of"):
        local_aws.dynamodb_outage(1.0, "flaky")
