"""The Chalice app as packaged into the stack: function, API, environment, code."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from runnerhub_infra.stages import GITHUB_WEBHOOK_TIMEOUT_S

from chalicelib import aws
from chalicelib.settings import WebhookSettings
from tests.infra.cfn import refers_to
from tests.infra.cfn import resources as of_type


def test_api_is_throttled(template, stage):
    (api,) = of_type(template, "AWS::Serverless::Api").values()
    (settings,) = api["Properties"]["MethodSettings"]
    assert settings["ThrottlingRateLimit"] == stage.api_throttle_rate
    assert settings["ThrottlingBurstLimit"] == stage.api_throttle_burst
    assert template["Transform"] == "AWS::Serverless-2016-10-31"


def test_webhook_environment_matches_the_app_settings(template, stage):
    function = template["Resources"]["APIHandler"]["Properties"]
    variables = function["Environment"]["Variables"]
    names = {
        key.removeprefix("RUNNERHUB_").lower() for key in variables if key.startswith("RUNNERHUB_")
    }
    # Every variable set is one the app reads (a typo would be silently ignored).
    assert names <= set(WebhookSettings.model_fields)
    for spec in ("jobs_table", "deliveries_table", "runners_table"):
        assert spec in names
    assert variables["RUNNERHUB_QUEUE_PREFIX"] == stage.prefix
    assert variables["RUNNERHUB_WEBHOOK_SECRET_ID"] == f"runnerhub/{stage.name}/webhook-secret"
    assert variables["RUNNERHUB_STAGE"] == stage.name
    assert function["FunctionName"] == f"{stage.prefix}webhook"


def test_webhook_answers_within_githubs_ten_seconds(template):
    timeout = template["Resources"]["APIHandler"]["Properties"]["Timeout"]
    # GitHub gives up at 10 s: an answer after that is a failed delivery anyway.
    assert timeout < GITHUB_WEBHOOK_TIMEOUT_S == 10
    # Its slowest single AWS call (retries included) still fits.
    assert aws.PROFILES[aws.WEBHOOK].worst_case_s() < timeout
    # Below the app's delivery lease, so a live attempt is never taken over.
    assert timeout < WebhookSettings.model_fields["delivery_lease_s"].default


@pytest.mark.parametrize(
    ("function_id", "short_name"),
    [("APIHandler", "webhook"), ("Reconcile", "reconciler"), ("Scaler", "scaler")],
)
def test_function_logs_to_its_own_group(template, stage, function_id, short_name):
    groups = {
        group["Properties"]["LogGroupName"]: (group_id, group)
        for group_id, group in of_type(template, "AWS::Logs::LogGroup").items()
    }
    group_id, group = groups[f"/aws/lambda/{stage.prefix}{short_name}"]
    assert "RetentionInDays" in group["Properties"]
    assert group_id in template["Resources"][function_id]["DependsOn"]
    role = template["Resources"][function_id]["Properties"]["Role"]["Fn::GetAtt"][0]
    statements = template["Resources"][role]["Properties"]["Policies"][0]["PolicyDocument"]
    logging = [s for s in statements["Statement"] if "logs:PutLogEvents" in s["Action"]]
    assert refers_to(logging[0]["Resource"], group_id)
    # Only its own group.
    assert all(refers_to(s["Resource"], group_id) for s in logging)


def test_lambda_package_carries_app_and_pools(synthesized, template, stage):
    code = template["Resources"]["APIHandler"]["Properties"]["CodeUri"]
    asset = Path(synthesized.outdir) / f"asset.{code['Key']}"
    with zipfile.ZipFile(asset) as package:
        names = set(package.namelist())
    pools_file = template["Resources"]["APIHandler"]["Properties"]["Environment"]["Variables"][
        "RUNNERHUB_POOLS_FILE"
    ]
    assert pools_file.removeprefix("/var/task/") in names
    assert {"app.py", "chalicelib/settings.py", "pydantic/__init__.py"} <= names
    # The webhook package carries no scientific stack and no Docker client.
    assert not any(name.startswith(("sklearn/", "numpy/", "scipy/", "docker/")) for name in names)


def test_webhook_url_is_an_output(template):
    assert "WebhookUrl" in template["Outputs"]


# --- the scaler ---------------------------------------------------------------------------


def test_scaler_runs_on_the_jobs_stream_debounced_and_on_a_schedule(template, stage, pools):
    from runnerhub_infra.control_plane import SCALER_LEASE_S, SCALER_TIMEOUT_S

    from chalicelib.scaler.handler import pools_of
    from chalicelib.scaler.settings import ScalerSettings

    function = template["Resources"]["Scaler"]["Properties"]
    assert function["FunctionName"] == f"{stage.prefix}scaler"
    assert function["Handler"] == "app.scale"
    events = function["Events"]
    assert events["Schedule"] == {"Type": "Schedule",
                                  "Properties": {"Schedule": "rate(1 minute)"}}
    stream = events["JobsStream"]["Properties"]
    assert events["JobsStream"]["Type"] == "DynamoDB"
    (table_id, attribute) = stream["Stream"]["Fn::GetAtt"]
    assert attribute == "StreamArn"
    assert template["Resources"][table_id]["Properties"]["TableName"] == f"{stage.prefix}jobs"
    # Debounced: a second of records is one invocation; a failing batch is split, retried a
    # bounded number of times, and never older than the schedule's catch-up.
    assert 1 <= stream["MaximumBatchingWindowInSeconds"] <= 2
    assert stream["BisectBatchOnFunctionError"] is True
    assert 0 < stream["MaximumRetryAttempts"] <= 3
    assert stream["StartingPosition"] == "LATEST"
    # The filter lets through exactly the records the handler acts on: a run, or history.
    from chalicelib.history import HISTORY_STATES

    (rule,) = stream["FilterCriteria"]["Filters"]
    states = json.loads(rule["Pattern"])["dynamodb"]["NewImage"]["state"]["S"]
    record = {"eventSource": "aws:dynamodb",
              "dynamodb": {"NewImage": {"pool": {"S": "p"}, "state": {"S": ""}}}}
    for state in ("received", "dispatched", "claimed", "in_progress", "completed"):
        record["dynamodb"]["NewImage"]["state"]["S"] = state
        runs = pools_of({"Records": [record]}, ["p"]) == ("p",)
        assert (state in states) == (runs or state in HISTORY_STATES), state
    # The lease outlasts the timeout: a live run is never overtaken.
    assert function["Timeout"] == SCALER_TIMEOUT_S < SCALER_LEASE_S
    variables = function["Environment"]["Variables"]
    assert variables["RUNNERHUB_SCALER_LEASE_S"] == str(SCALER_LEASE_S)
    names = {k.removeprefix("RUNNERHUB_").lower() for k in variables if k.startswith("RUNNERHUB_")}
    assert names <= set(ScalerSettings.model_fields)


def test_scaler_settings_name_each_pools_group_and_slots(template, stage, pools):
    """The groups the scaler drives are the executors' groups, with their hosts' slots."""
    from runnerhub_infra.pool_checks import host_slots

    from chalicelib.scaler.settings import parse_pool_slots

    variables = template["Resources"]["Scaler"]["Properties"]["Environment"]["Variables"]
    groups = {g["Properties"]["AutoScalingGroupName"]
              for g in of_type(template, "AWS::AutoScaling::AutoScalingGroup").values()}
    prefix = variables["RUNNERHUB_SCALER_GROUP_PREFIX"]
    assert {prefix + pool for pool in pools.names} == groups
    assert parse_pool_slots(variables["RUNNERHUB_SCALER_POOL_SLOTS"]) == {
        pool.name: host_slots(pool, stage.host_settings(pool.name)) for pool in pools.pools}


def test_scaler_role_acts_only_on_the_stages_groups(template, stage, pools):
    from tests.infra.cfn import role_statements

    role_id = template["Resources"]["Scaler"]["Properties"]["Role"]["Fn::GetAtt"][0]
    assert template["Resources"][role_id]["Properties"]["RoleName"] == f"{stage.prefix}scaler"
    writes = [s for s in role_statements(template, role_id)
              if "autoscaling:SetDesiredCapacity" in s["Action"]]
    (statement,) = writes
    assert set(statement["Action"]) == {"autoscaling:SetDesiredCapacity",
                                        "autoscaling:SetInstanceProtection",
                                        "autoscaling:TerminateInstanceInAutoScalingGroup",
                                        # A failed executor rollout's launch template version
                                        # set back (tests/infra/test_rollouts.py).
                                        "autoscaling:UpdateAutoScalingGroup"}
    arns = [json.dumps(arn) for arn in statement["Resource"]]
    assert len(arns) == len(pools.pools)
    for pool in pools.names:
        assert any(f":autoScalingGroupName/{stage.prefix}{pool}\"" in arn for arn in arns), pool


def test_scaler_code_is_the_chalice_package(template):
    """The same package as the webhook: one Chalice app, one zip."""
    resources = template["Resources"]
    assert resources["Scaler"]["Properties"]["CodeUri"] == \
        resources["APIHandler"]["Properties"]["CodeUri"]
