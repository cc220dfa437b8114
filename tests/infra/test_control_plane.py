"""The Chalice app as packaged into the stack: function, API, environment, code."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

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
    # Below the app's delivery lease, so a live attempt is never taken over.
    assert function["Timeout"] < WebhookSettings.model_fields["delivery_lease_s"].default
    assert function["FunctionName"] == f"{stage.prefix}webhook"


@pytest.mark.parametrize(
    ("function_id", "short_name"), [("APIHandler", "webhook"), ("Reconcile", "reconciler")]
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
