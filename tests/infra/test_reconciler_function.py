"""The reconciler's scheduled function: schedule, settings, and a role with only what it calls."""

from __future__ import annotations

import inspect

from chalicelib import aws
from chalicelib.github.client import GitHubApp
from chalicelib.reconciler.service import LEASE_MARGIN_FRACTION
from chalicelib.reconciler.settings import ReconcilerSettings
from tests.infra.cfn import actions, as_list, refers_to, role_statements, webhook_role
from tests.infra.cfn import resources as of_type


def reconciler(template: dict) -> dict:
    return template["Resources"]["Reconcile"]["Properties"]


def test_reconciler_runs_every_minute_within_its_lease(template, stage):
    function = reconciler(template)
    (event,) = function["Events"].values()
    assert event == {"Type": "Schedule", "Properties": {"Schedule": "rate(1 minute)"}}
    assert function["Handler"] == "app.reconcile"
    assert function["FunctionName"] == f"{stage.prefix}reconciler"


def test_reconciler_deadline_ends_before_its_timeout_which_ends_before_its_lease(template):
    """The run stops starting actions at its deadline (lease x 0.75); what was begun just before
    (one GitHub call) and the state save (one AWS call, retries included) must end before Lambda
    kills the run; the lease must outlast the run so a live one is never overtaken."""
    function = reconciler(template)
    timeout = function["Timeout"]
    variables = function["Environment"]["Variables"]
    # The settings the function will read, parsed by the reconciler's own model.
    settings = ReconcilerSettings.model_validate(
        {"reconciler_lease_s": variables["RUNNERHUB_RECONCILER_LEASE_S"],
         "github_app_secret_id": variables["RUNNERHUB_GITHUB_APP_SECRET_ID"]}
    )
    lease = settings.reconciler_lease_s
    deadline = lease * (1 - LEASE_MARGIN_FRACTION)
    github_call = 3.0 + inspect.signature(GitHubApp).parameters["timeout_s"].default
    aws_call = aws.PROFILES.get(aws.RECONCILER, aws.DEFAULT_PROFILE).worst_case_s()
    assert deadline + github_call + aws_call <= timeout < lease


def test_reconciler_environment_matches_its_settings(template, stage):
    variables = reconciler(template)["Environment"]["Variables"]
    names = {
        key.removeprefix("RUNNERHUB_").lower() for key in variables if key.startswith("RUNNERHUB_")
    }
    assert names <= set(ReconcilerSettings.model_fields)
    assert {"jobs_table", "deliveries_table", "runners_table", "queue_prefix", "pools_file",
            "github_app_secret_id"} <= names
    assert variables["RUNNERHUB_GITHUB_APP_SECRET_ID"] == f"runnerhub/{stage.name}/github-app"
    assert variables["POWERTOOLS_SERVICE_NAME"] == "runnerhub-reconciler"


def test_reconciler_role_is_exactly_what_it_calls(template, stage):
    role = reconciler(template)["Role"]["Fn::GetAtt"][0]
    assert role != webhook_role(template)
    statements = list(role_statements(template, role))
    assert actions(statements) == {
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        "dynamodb:GetItem",
        "dynamodb:BatchGetItem",
        "dynamodb:UpdateItem",
        "dynamodb:Query",
        "sqs:SendMessage",
        "sqs:GetQueueUrl",
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "secretsmanager:GetSecretValue",
        "kms:Decrypt",
    }
    secrets = {
        r["Properties"]["Name"]: logical_id
        for logical_id, r in of_type(template, "AWS::SecretsManager::Secret").items()
    }
    text = str(statements)
    assert secrets[f"runnerhub/{stage.name}/github-app"] in text
    assert secrets[f"runnerhub/{stage.name}/webhook-secret"] not in text
    queues = of_type(template, "AWS::SQS::Queue")
    for statement in statements:
        for queue_id, queue in queues.items():
            if not refers_to(statement["Resource"], queue_id):
                continue
            granted = set(as_list(statement["Action"]))
            if queue["Properties"]["QueueName"].endswith("-dlq.fifo"):
                # Dead-lettered demand of open jobs is taken back; nothing is sent to a DLQ.
                assert granted == {"sqs:ReceiveMessage", "sqs:DeleteMessage",
                                   "sqs:GetQueueUrl"}
            else:
                assert granted == {"sqs:SendMessage", "sqs:GetQueueUrl"}
        if "dynamodb:Query" in as_list(statement["Action"]):
            # Only the by_state index, not the tables.
            assert "/index/by_state" in str(statement["Resource"])
        if "kms:Decrypt" in as_list(statement["Action"]):
            assert "kms:ViaService" in str(statement["Condition"])
