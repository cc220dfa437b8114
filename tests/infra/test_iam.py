"""Least privilege: one role per function and per pool, no wildcards on data, no crossing over."""

from __future__ import annotations

from chalicelib import resources
from tests.infra.cfn import (
    actions,
    as_list,
    executor_roles,
    refers_to,
    role_statements,
    webhook_role,
)
from tests.infra.cfn import resources as of_type

DATA_TYPES = ("AWS::DynamoDB::Table", "AWS::SQS::Queue")


def _all_statements(template: dict) -> list[dict]:
    found = []
    for role in of_type(template, "AWS::IAM::Role").values():
        for policy in role["Properties"].get("Policies", []):
            found += policy["PolicyDocument"]["Statement"]
    for kind in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
        for policy in of_type(template, kind).values():
            found += policy["Properties"]["PolicyDocument"]["Statement"]
    return found


def _named(template: dict, kind: str, name_key: str) -> dict[str, str]:
    return {
        resource["Properties"][name_key]: logical_id
        for logical_id, resource in of_type(template, kind).items()
    }


def test_no_wildcard_actions_on_tables_and_queues(template):
    data_ids = [logical_id for kind in DATA_TYPES for logical_id in of_type(template, kind)]
    statements = _all_statements(template)
    assert statements
    for statement in statements:
        on_data = any(refers_to(statement["Resource"], data_id) for data_id in data_ids)
        statement_actions = as_list(statement["Action"])
        if on_data:
            assert not any("*" in action for action in statement_actions), statement
        # Nothing reaches the data through a `*` resource either.
        if "*" in as_list(statement.get("Resource", [])):
            assert not any(a.startswith(("dynamodb:", "sqs:")) for a in statement_actions)


def test_every_function_has_its_own_role(template):
    functions = of_type(template, "AWS::Serverless::Function")
    assert functions
    role_ids = [function["Properties"]["Role"]["Fn::GetAtt"][0] for function in functions.values()]
    assert len(set(role_ids)) == len(role_ids)
    for role_id in role_ids:
        assume = template["Resources"][role_id]["Properties"]["AssumeRolePolicyDocument"]
        assert assume["Statement"][0]["Principal"] == {"Service": "lambda.amazonaws.com"}
    # Chalice's own shared role is not emitted.
    assert "DefaultRole" not in template["Resources"]


def test_webhook_role_is_exactly_what_the_webhook_calls(template, stage):
    statements = list(role_statements(template, webhook_role(template)))
    assert actions(statements) == {
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        "dynamodb:GetItem",
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
        "sqs:SendMessage",
        "sqs:GetQueueUrl",
        "secretsmanager:GetSecretValue",
        "kms:Decrypt",
    }
    secrets = _named(template, "AWS::SecretsManager::Secret", "Name")
    queues = _named(template, "AWS::SQS::Queue", "QueueName")
    text = str(statements)
    assert secrets[f"runnerhub/{stage.name}/webhook-secret"] in text
    # Not the executor's: the App key, the DLQs, receiving.
    assert secrets[f"runnerhub/{stage.name}/github-app"] not in text
    assert not any(name.endswith("-dlq.fifo") and queues[name] in text for name in queues)
    for statement in statements:
        if "kms:Decrypt" in as_list(statement["Action"]):
            assert "kms:ViaService" in str(statement["Condition"])


def test_executor_roles_touch_only_their_pool(template, stage, pools):
    roles = executor_roles(template)
    tables = _named(template, "AWS::DynamoDB::Table", "TableName")
    queues = _named(template, "AWS::SQS::Queue", "QueueName")
    secrets = _named(template, "AWS::SecretsManager::Secret", "Name")
    deliveries = tables[stage.prefix + resources.DELIVERIES_TABLE.default_name[10:]]
    for pool, role_id in roles.items():
        statements = list(role_statements(template, role_id))
        text = str(statements)
        assert {
            "sqs:ReceiveMessage",
            "sqs:DeleteMessage",
            "sqs:ChangeMessageVisibility",
            "sqs:SendMessage",
            "secretsmanager:GetSecretValue",
        } <= actions(statements)
        own = {
            queues[resources.demand_queue_name(stage.prefix, pool)],
            queues[resources.dead_letter_queue_name(stage.prefix, pool)],
        }
        assert all(queue_id in text for queue_id in own)
        assert not any(queue_id in text for queue_id in set(queues.values()) - own)
        assert secrets[f"runnerhub/{stage.name}/github-app"] in text
        # Not the webhook's: its secret and the deliveries table.
        assert secrets[f"runnerhub/{stage.name}/webhook-secret"] not in text
        assert deliveries not in text
        # DLQ: send only (an operator redrives it, not a host).
        for statement in statements:
            if any(
                refers_to(statement["Resource"], queues[name])
                for name in queues
                if name.endswith("-dlq.fifo")
            ):
                assert set(as_list(statement["Action"])) <= {"sqs:SendMessage", "sqs:GetQueueUrl"}
    # And the webhook's role is none of these.
    assert webhook_role(template) not in roles.values()


def test_executors_read_only_the_forecast_items_of_the_history_table(template, stage):
    """Warm targets follow the trainer's forecast: a host may GetItem `forecast#<pool>` items
    and nothing else of the history table (no bucket of demand, no write)."""
    tables = _named(template, "AWS::DynamoDB::Table", "TableName")
    history = tables[stage.prefix + resources.HISTORY_TABLE.default_name[10:]]
    for role_id in executor_roles(template).values():
        found = [s for s in role_statements(template, role_id) if history in str(s["Resource"])]
        assert len(found) == 1, found
        (statement,) = found
        assert as_list(statement["Action"]) == ["dynamodb:GetItem"]
        assert statement["Condition"] == {"ForAllValues:StringLike": {
            "dynamodb:LeadingKeys": ["forecast#*"]}}
