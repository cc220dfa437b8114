"""The management API as deployed (infra/runnerhub_infra/management_api.py): its own function,
role, log group, REST API and throttle; the webhook's exactly as before it; the audit table
append-only for every principal; Cognito groups = the API's roles; the authorizer on every
route but the public ones; an optional custom domain (a construct-level synth: no Chalice)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import aws_cdk as cdk
import pytest
from aws_cdk.assertions import Template
from pydantic import ValidationError
from runnerhub_infra.data import Data
from runnerhub_infra.management_api import ManagementApi
from runnerhub_infra.secrets import Secrets
from runnerhub_infra.stages import stage_settings

from chalicelib import resources
from chalicelib.api.settings import ApiSettings
from chalicelib.pools import load_pools
from tests.infra.cfn import actions, as_list, refers_to, role_statements, webhook_role
from tests.infra.cfn import resources as of_type

# What the webhook was before the management API came (control_plane.py and stages.py at that
# commit), written out here so that a change to the shared settings shows.
WEBHOOK_BEFORE = {
    "dev": {"memory": 512, "timeout": 8, "rate": 50.0, "burst": 100},
    "prod": {"memory": 512, "timeout": 8, "rate": 200.0, "burst": 400},
}
WEBHOOK_ACTIONS = {"logs:CreateLogStream", "logs:PutLogEvents", "dynamodb:GetItem",
                   "dynamodb:PutItem", "dynamodb:UpdateItem", "sqs:SendMessage",
                   "sqs:GetQueueUrl", "secretsmanager:GetSecretValue", "kms:Decrypt"}
# Written here, not imported: what may never happen to an audit record.
AUDIT_CHANGES = {"dynamodb:UpdateItem", "dynamodb:DeleteItem", "dynamodb:BatchWriteItem",
                 "dynamodb:PartiQLUpdate", "dynamodb:PartiQLDelete"}
# Written here, not imported: the routes that answer without a token. /health (shallow), the
# OpenAPI document, the dashboard page and how it signs in (the page loads, then signs in;
# every figure on it comes from the routes behind the authorizer).
PUBLIC_PATHS = {("GET", "/api/v1/health"), ("GET", "/api/v1/openapi.json"),
                ("GET", "/api/v1/dashboard"), ("GET", "/api/v1/dashboard/config")}


def _by_name(template: dict, kind: str, key: str) -> dict[str, str]:
    return {r["Properties"][key]: logical_id
            for logical_id, r in of_type(template, kind).items() if key in r["Properties"]}


def _api_function(template: dict, stage) -> tuple[str, dict]:
    logical_id = _by_name(template, "AWS::Lambda::Function", "FunctionName")[f"{stage.prefix}api"]
    return logical_id, template["Resources"][logical_id]["Properties"]


def _api_role(template: dict, stage) -> str:
    return _api_function(template, stage)[1]["Role"]["Fn::GetAtt"][0]


def _table(template: dict, spec: resources.TableSpec, stage) -> str:
    name = stage.prefix + spec.default_name.removeprefix("runnerhub-")
    return _by_name(template, "AWS::DynamoDB::Table", "TableName")[name]


def _method_paths(template: dict, api_id: str) -> dict[tuple[str, str], dict]:
    """(HTTP method, full path) -> the method's properties, for one REST API."""
    res = of_type(template, "AWS::ApiGateway::Resource")

    def path(parent: object) -> str:
        if isinstance(parent, dict) and "Fn::GetAtt" in parent:  # the API's root
            return ""
        logical_id = parent["Ref"]
        props = res[logical_id]["Properties"]
        return f"{path(props['ParentId'])}/{props['PathPart']}"

    return {(m["Properties"]["HttpMethod"], path(m["Properties"]["ResourceId"])): m["Properties"]
            for m in of_type(template, "AWS::ApiGateway::Method").values()
            if refers_to(m["Properties"]["RestApiId"], api_id)}


# --- its own function and role ------------------------------------------------------------

def test_the_api_has_its_own_function_and_role(template, stage):
    function_id, function = _api_function(template, stage)
    assert function["Handler"] == "api_app.handler"
    assert function["Runtime"] == "python3.11"
    role_id = _api_role(template, stage)
    role = template["Resources"][role_id]["Properties"]
    assert role["RoleName"] == f"{stage.prefix}api"
    assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {
        "Service": "lambda.amazonaws.com"}
    others = [r["Properties"]["Role"]["Fn::GetAtt"][0]
              for kind in ("AWS::Serverless::Function", "AWS::Lambda::Function")
              for logical_id, r in of_type(template, kind).items()
              if logical_id != function_id and "Role" in r["Properties"]
              and isinstance(r["Properties"]["Role"], dict)]
    assert webhook_role(template) in others
    assert role_id not in others


def test_the_webhook_is_as_it_was(template, stage):
    """Role, memory, time-out, concurrency and throttle: the values before the API came."""
    before = WEBHOOK_BEFORE[stage.name]
    webhook = template["Resources"]["APIHandler"]["Properties"]
    assert (webhook["MemorySize"], webhook["Timeout"]) == (before["memory"], before["timeout"])
    assert "ReservedConcurrentExecutions" not in webhook
    assert webhook["Handler"] == "app.app"
    role_id = webhook_role(template)
    assert template["Resources"][role_id]["Properties"]["RoleName"] == f"{stage.prefix}webhook"
    statements = list(role_statements(template, role_id))
    assert actions(statements) == WEBHOOK_ACTIONS
    assert all(s.get("Effect", "Allow") == "Allow" for s in statements)
    audit = _table(template, resources.AUDIT_TABLE, stage)
    assert not any(refers_to(s["Resource"], audit) for s in statements)
    (api,) = of_type(template, "AWS::Serverless::Api").values()
    assert api["Properties"]["MethodSettings"] == [{
        "ResourcePath": "/*", "HttpMethod": "*",
        "ThrottlingRateLimit": before["rate"], "ThrottlingBurstLimit": before["burst"]}]


def test_the_api_has_its_own_throttle(template, stage):
    (api_id,) = of_type(template, "AWS::ApiGateway::RestApi")
    (api_stage,) = [s["Properties"] for s in of_type(template, "AWS::ApiGateway::Stage").values()
                    if refers_to(s["Properties"]["RestApiId"], api_id)]
    (settings,) = api_stage["MethodSettings"]
    assert (settings["ThrottlingRateLimit"], settings["ThrottlingBurstLimit"]) == (
        stage.management_api_throttle_rate, stage.management_api_throttle_burst)
    before = WEBHOOK_BEFORE[stage.name]
    assert (settings["ThrottlingRateLimit"], settings["ThrottlingBurstLimit"]) != (
        before["rate"], before["burst"])
    name = template["Resources"][api_id]["Properties"]["Name"]
    assert name == f"{stage.prefix}management" != f"{stage.prefix}api"


def test_the_api_package_is_the_app_package_plus_api_app(synthesized, template, stage):
    _, function = _api_function(template, stage)
    asset = Path(synthesized.outdir) / f"asset.{function['Code']['S3Key']}"
    with zipfile.ZipFile(asset) as package:
        names = set(package.namelist())
    assert {"api_app.py", "app.py", "chalicelib/api/service.py", "chalicelib/api/audit.py",
            "aws_lambda_powertools/__init__.py", "prometheus_client/__init__.py",
            "pydantic/__init__.py"} <= names
    pools_file = function["Environment"]["Variables"]["RUNNERHUB_POOLS_FILE"]
    assert pools_file.removeprefix("/var/task/") in names
    assert not any(name.startswith(("sklearn/", "numpy/", "docker/")) for name in names)


def test_the_api_environment_is_its_settings(template, stage, monkeypatch):
    """Every RUNNERHUB_ variable is an ApiSettings field (a misspelt one would be ignored), and
    the settings they make are valid, with the Cognito authorizer's identity and the page's
    sign-in."""
    _, function = _api_function(template, stage)
    variables = function["Environment"]["Variables"]
    names = {k.removeprefix("RUNNERHUB_").lower() for k in variables if k.startswith("RUNNERHUB_")}
    unknown = names - set(ApiSettings.model_fields)
    assert not unknown, unknown
    assert {"api_cognito_user_pool_id", "api_cognito_client_id", "api_cognito_domain",
            "api_dashboard_url"} <= names
    assert variables["RUNNERHUB_API_AUTH"] == "cognito"
    for key, value in variables.items():
        if key.startswith("RUNNERHUB_") and isinstance(value, str):
            monkeypatch.setenv(key, value)
    settings = ApiSettings()
    assert settings.api_auth == "cognito" and settings.github_configured
    # The tables by reference (their names are CloudFormation's to resolve).
    for name, spec in (("AUDIT", resources.AUDIT_TABLE), ("JOBS", resources.JOBS_TABLE),
                       ("HOSTS", resources.HOSTS_TABLE), ("RUNNERS", resources.RUNNERS_TABLE)):
        assert refers_to(variables[f"RUNNERHUB_{name}_TABLE"], _table(template, spec, stage))
    assert variables["POWERTOOLS_SERVICE_NAME"] == "runnerhub-api"  # its calls are `api`'s


# --- least privilege and the audit log ----------------------------------------------------

def test_the_api_role_may_only_append_to_the_audit_log(template, stage):
    statements = list(role_statements(template, _api_role(template, stage)))
    audit = _table(template, resources.AUDIT_TABLE, stage)
    on_audit = [s for s in statements if refers_to(s["Resource"], audit)]
    allowed = {a for s in on_audit if s.get("Effect", "Allow") == "Allow"
               for a in as_list(s["Action"])}
    assert allowed == {"dynamodb:PutItem", "dynamodb:Query"}
    denied = [s for s in on_audit if s.get("Effect") == "Deny"]
    assert denied and {a for s in denied for a in as_list(s["Action"])} == AUDIT_CHANGES


def test_the_audit_table_denies_every_change_to_everyone(template, stage):
    table = template["Resources"][_table(template, resources.AUDIT_TABLE, stage)]["Properties"]
    (statement,) = table["ResourcePolicy"]["PolicyDocument"]["Statement"]
    assert statement["Effect"] == "Deny"
    assert statement["Principal"] in ("*", {"AWS": "*"})
    assert set(as_list(statement["Action"])) == AUDIT_CHANGES
    assert table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
    assert table["DeletionProtectionEnabled"] is stage.prod
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}
    # And no role is granted a change on it (or on every table).
    for role_id in of_type(template, "AWS::IAM::Role"):
        for s in role_statements(template, role_id):
            if s.get("Effect", "Allow") != "Allow":
                continue
            if refers_to(s["Resource"], _table(template, resources.AUDIT_TABLE, stage)) \
                    or "*" in as_list(s["Resource"]):
                assert not AUDIT_CHANGES & set(as_list(s["Action"])), (role_id, s)


def test_the_api_role_reads_one_item_of_the_deliveries_table_and_no_webhook_secret(template,
                                                                                   stage):
    """Of the webhook's and the forecast's tables, only the items the API reads."""
    statements = list(role_statements(template, _api_role(template, stage)))
    deliveries = _table(template, resources.DELIVERIES_TABLE, stage)
    (read,) = [s for s in statements if refers_to(s["Resource"], deliveries)]
    assert as_list(read["Action"]) == ["dynamodb:GetItem"]
    # The reconciler's lease item alone (when its last run ended, for /health).
    assert read["Condition"] == {"ForAllValues:StringEquals": {
        "dynamodb:LeadingKeys": ["reconciler#lease"]}}
    # Of the history table, the pools' forecast items alone (their warm targets).
    history = _table(template, resources.HISTORY_TABLE, stage)
    (forecasts,) = [s for s in statements if refers_to(s["Resource"], history)]
    assert as_list(forecasts["Action"]) == ["dynamodb:GetItem"]
    assert forecasts["Condition"] == {"ForAllValues:StringLike": {
        "dynamodb:LeadingKeys": ["forecast#*"]}}
    secrets = _by_name(template, "AWS::SecretsManager::Secret", "Name")
    webhook_secret = secrets[f"runnerhub/{stage.name}/webhook-secret"]
    assert not any(refers_to(s, webhook_secret) for s in statements)
    assert any(refers_to(s, secrets[f"runnerhub/{stage.name}/github-app"]) for s in statements)
    # Never the dead-letter queues, never receive or delete a demand message.
    assert not {"sqs:ReceiveMessage", "sqs:DeleteMessage"} & actions(statements)
    queues = _by_name(template, "AWS::SQS::Queue", "QueueName")
    dlqs = [logical_id for name, logical_id in queues.items() if name.endswith("-dlq.fifo")]
    assert not any(refers_to(s["Resource"], dlq) for s in statements for dlq in dlqs)


def test_the_api_logs_to_a_group_kept_as_long_as_the_audit_records(template, stage):
    _, function = _api_function(template, stage)
    groups = _by_name(template, "AWS::Logs::LogGroup", "LogGroupName")
    group_id = groups[f"/aws/lambda/{stage.prefix}api"]
    retention = template["Resources"][group_id]["Properties"]["RetentionInDays"]
    assert retention * 86400 >= resources.AUDIT_TTL_S
    assert refers_to(function["LoggingConfig"], group_id)
    statements = list(role_statements(template, _api_role(template, stage)))
    logging = [s for s in statements if "logs:PutLogEvents" in as_list(s["Action"])]
    assert logging and all(refers_to(s["Resource"], group_id) for s in logging)


# --- sign-in and the authorizer -----------------------------------------------------------

def test_the_user_pool_has_a_group_per_role_and_no_self_sign_up(template):
    (pool_id, pool), = of_type(template, "AWS::Cognito::UserPool").items()
    assert pool["Properties"]["AdminCreateUserConfig"]["AllowAdminCreateUserOnly"] is True
    groups = {g["Properties"]["GroupName"]: g["Properties"]
              for g in of_type(template, "AWS::Cognito::UserPoolGroup").values()}
    assert set(groups) == {"admin", "operator", "viewer"}
    assert all(refers_to(g["UserPoolId"], pool_id) for g in groups.values())
    assert groups["admin"]["Precedence"] < groups["operator"]["Precedence"] \
        < groups["viewer"]["Precedence"]
    (domain,) = of_type(template, "AWS::Cognito::UserPoolDomain").values()
    assert refers_to(domain["Properties"]["UserPoolId"], pool_id)
    (client,) = of_type(template, "AWS::Cognito::UserPoolClient").values()
    props = client["Properties"]
    assert props["AllowedOAuthFlows"] == ["code"] and props["AllowedOAuthFlowsUserPoolClient"]
    assert not props.get("GenerateSecret")
    assert "openid" in props["AllowedOAuthScopes"]
    assert "/api/v1/dashboard" in json.dumps(props["CallbackURLs"])


def test_every_route_but_the_public_ones_needs_a_cognito_token(template, stage):
    (api_id,) = of_type(template, "AWS::ApiGateway::RestApi")
    (authorizer_id, authorizer), = of_type(template, "AWS::ApiGateway::Authorizer").items()
    assert authorizer["Properties"]["Type"] == "COGNITO_USER_POOLS"
    assert authorizer["Properties"]["IdentitySource"] == "method.request.header.Authorization"
    pool_id = next(iter(of_type(template, "AWS::Cognito::UserPool")))
    assert refers_to(authorizer["Properties"]["ProviderARNs"], pool_id)
    methods = _method_paths(template, api_id)
    assert ("ANY", "/api/v1/{proxy+}") in methods
    public = {route for route, m in methods.items() if m["AuthorizationType"] == "NONE"}
    assert public == PUBLIC_PATHS
    for route, method in methods.items():
        if route in public:
            assert "AuthorizerId" not in method, route
            continue
        assert method["AuthorizationType"] == "COGNITO_USER_POOLS", route
        assert refers_to(method["AuthorizerId"], authorizer_id), route
    # Every method reaches the API's function through its `live` alias (and nothing else).
    function_id, _ = _api_function(template, stage)
    (alias_id,) = [alias_id for alias_id, alias in of_type(template, "AWS::Lambda::Alias").items()
                   if alias["Properties"]["FunctionName"] == {"Ref": function_id}]
    assert all(refers_to(m["Integration"]["Uri"], alias_id) for m in methods.values())


def test_the_urls_are_outputs_without_a_domain(template):
    outputs = template["Outputs"]
    assert {"WebhookUrl", "ManagementApiUrl", "DashboardUrl", "UserPoolId", "DashboardClientId",
            "HostedUiUrl"} <= set(outputs)
    assert "execute-api" in json.dumps(outputs["ManagementApiUrl"]["Value"])
    assert "ApiDomainTarget" not in outputs
    assert not of_type(template, "AWS::ApiGateway::DomainName")


def test_api_alarms_watch_its_5xx_and_its_throttles(template, stage):
    alarms = {a["Properties"]["AlarmName"]: a["Properties"]
              for a in of_type(template, "AWS::CloudWatch::Alarm").values()}
    errors = alarms[f"{stage.prefix}ManagementApiErrors"]
    assert (errors["Namespace"], errors["MetricName"]) == ("AWS/ApiGateway", "5XXError")
    assert {d["Name"]: d["Value"] for d in errors["Dimensions"]} == {
        "ApiName": f"{stage.prefix}management", "Stage": "management"}
    throttled = alarms[f"{stage.prefix}ManagementApiThrottled"]
    assert (throttled["Namespace"], throttled["MetricName"]) == ("AWS/Lambda", "Throttles")
    assert throttled["Dimensions"] == [{"Name": "FunctionName", "Value": f"{stage.prefix}api"}]


# --- the custom domain (the construct alone: seconds, no Chalice package) ------------------

DOMAIN = {"api_domain_name": "runners.example.com",
          "api_certificate_arn": "arn:aws:acm:us-east-1:123456789012:certificate/0a1b-2c3d",
          "auth_domain_prefix": "acme-runners"}


@pytest.fixture(scope="module")
def with_domain(tmp_path_factory) -> dict:
    stage = stage_settings("dev", DOMAIN)
    code = tmp_path_factory.mktemp("api-code") / "code.zip"
    with zipfile.ZipFile(code, "w") as package:
        package.writestr("api_app.py", "def handler(event, context):\n    return {}\n")
    app = cdk.App()
    stack = cdk.Stack(app, "domain-test", env=cdk.Environment(region=stage.region))
    data = Data(stack, "Data", stage=stage, pools=load_pools(stage.pools_file))
    secrets = Secrets(stack, "Secrets", stage=stage)
    webhook = cdk.CfnResource(stack, "RestAPI", type="AWS::ApiGateway::RestApi",
                              properties={"Name": "webhook"})
    ManagementApi(stack, "ManagementApi", stage=stage, data=data, secrets=secrets, code=code,
                  webhook_api=webhook)
    return Template.from_stack(stack).to_json()


def test_a_custom_domain_carries_both_apis(with_domain):
    (domain,) = of_type(with_domain, "AWS::ApiGateway::DomainName").values()
    assert domain["Properties"]["DomainName"] == DOMAIN["api_domain_name"]
    assert domain["Properties"]["RegionalCertificateArn"] == DOMAIN["api_certificate_arn"]
    assert domain["Properties"]["EndpointConfiguration"] == {"Types": ["REGIONAL"]}
    mappings = {m["Properties"].get("BasePath", ""): m for m in
                of_type(with_domain, "AWS::ApiGateway::BasePathMapping").values()}
    assert set(mappings) == {"", "webhook"}
    (management_id,) = [k for k, r in of_type(with_domain, "AWS::ApiGateway::RestApi").items()
                        if r["Properties"]["Name"] == "runnerhub-dev-management"]
    # The management API at the root: its paths are the app's routes (/api/v1/...).
    assert refers_to(mappings[""]["Properties"]["RestApiId"], management_id)
    webhook = mappings["webhook"]
    assert webhook["Properties"]["RestApiId"] == {"Ref": "RestAPI"}
    assert webhook["Properties"]["Stage"] == "api"
    assert "RestAPIapiStage" in webhook["DependsOn"]
    outputs = with_domain["Outputs"]
    assert "ApiDomainTarget" in outputs
    assert outputs["WebhookDomainUrl"]["Value"] == "https://runners.example.com/webhook/webhook"
    assert "https://runners.example.com" in json.dumps(outputs["DashboardUrl"]["Value"])
    (client,) = of_type(with_domain, "AWS::Cognito::UserPoolClient").values()
    assert client["Properties"]["CallbackURLs"] == [
        "https://runners.example.com/api/v1/dashboard"]
    (ui,) = of_type(with_domain, "AWS::Cognito::UserPoolDomain").values()
    assert ui["Properties"]["Domain"] == "acme-runners"


@pytest.mark.parametrize("overrides, message", [
    ({"api_domain_name": "runners.example.com"}, "go together"),
    ({"api_certificate_arn": DOMAIN["api_certificate_arn"]}, "go together"),
    ({**DOMAIN, "api_domain_name": "Not A Domain"}, "api_domain_name"),
    ({"auth_domain_prefix": "acme-cognito"}, "cognito"),
    ({"management_api_throttle_rate": 0}, "management_api_throttle_rate"),
])
def test_bad_api_settings_are_refused(overrides, message):
    with pytest.raises(ValidationError, match=message):
        stage_settings("dev", overrides)
