"""Safe rollouts (issue 19, infra/runnerhub_infra/rollouts.py), read from each stage's template
as CloudFormation runs it: the SAM transform applied (aws-sam-translator, the library behind
CloudFormation's AWS::Serverless transform), so the aliases, versions, deployment groups,
schedules and stream mappings SAM makes are what is checked, not the properties asking for
them."""

from __future__ import annotations

import copy
import json
import re

import pytest
from runnerhub_infra.stages import (
    LIVE_ALIAS,
    PREDEFINED_LAMBDA_CANARIES,
    LambdaCanary,
    stage_settings,
)

from tests.infra.cfn import as_list, refers_to, role_statements
from tests.infra.cfn import resources as of_type

FUNCTIONS = ("webhook", "reconciler", "scaler", "trainer", "api", "image-refresh")
# Where a function may be named unqualified: its versions and aliases are of it by definition.
OWN_KINDS = ("AWS::Lambda::Version", "AWS::Lambda::Alias")
SUB_VARIABLE = re.compile(r"\$\{([A-Za-z0-9]+)(?:\.Arn)?\}")


class _NoManagedPolicies:
    """The transform's policy loader: only `Policies` by managed-policy name need it (none)."""

    def load(self) -> dict:
        return {}


def expand(template: dict) -> dict:
    from samtranslator.translator.transform import transform

    return transform(copy.deepcopy(template), {}, _NoManagedPolicies())


@pytest.fixture(scope="module")
def expanded_templates(synthesized, monkeypatch_module) -> dict[str, dict]:
    # The transform reads the region for its ARNs (no AWS call is made).
    monkeypatch_module.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return {name: expand(template) for name, template in synthesized.templates.items()}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture
def expanded(expanded_templates, stage) -> dict:
    return expanded_templates[stage.name]


def _references(value: object) -> set[str]:
    """Logical ids a value names: Ref, GetAtt, and ${X} / ${X.Arn} inside a Sub's text."""
    found: set[str] = set()
    if isinstance(value, list):
        for item in value:
            found |= _references(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key == "Ref" and isinstance(item, str):
                found.add(item)
            elif key == "Fn::GetAtt":
                found.add(item[0] if isinstance(item, list) else item.split(".")[0])
            elif key == "Fn::Sub":
                text = item[0] if isinstance(item, list) else item
                found |= set(SUB_VARIABLE.findall(text))
                if isinstance(item, list):
                    found |= _references(item[1])
            else:
                found |= _references(item)
    return found


def unqualified_invokers(template: dict) -> list[tuple[str, str]]:
    """(resource, function) for every resource that names a Lambda function itself rather
    than an alias of it: an API integration, a permission, a schedule's target or a stream's
    mapping that does invokes `$LATEST`, outside the canary and its rollback."""
    resources = template["Resources"]
    functions = {logical_id for logical_id, resource in resources.items()
                 if resource["Type"] == "AWS::Lambda::Function"}
    found = []
    for logical_id, resource in resources.items():
        if resource["Type"] in OWN_KINDS:
            continue
        for name in sorted(_references(resource.get("Properties", {})) & functions):
            found.append((logical_id, name))
    return found


def _aliases(template: dict) -> dict[str, str]:
    """Function logical id -> the logical id of its alias."""
    return {alias["Properties"]["FunctionName"]["Ref"]: logical_id
            for logical_id, alias in of_type(template, "AWS::Lambda::Alias").items()}


def _function_ids(template: dict, stage) -> dict[str, str]:
    by_name = {function["Properties"]["FunctionName"]: logical_id
               for logical_id, function in of_type(template, "AWS::Lambda::Function").items()}
    return {short: by_name[f"{stage.prefix}{short}"] for short in FUNCTIONS}


def test_every_invoker_calls_an_alias(expanded, stage):
    """Nothing invokes a function unqualified; and the invokers the check must have seen are
    there, each on an alias (so the check read the expanded template, not an empty one)."""
    assert unqualified_invokers(expanded) == []
    functions = _function_ids(expanded, stage)
    aliases = _aliases(expanded)
    assert set(functions.values()) <= set(aliases)
    resources = expanded["Resources"]
    webhook_alias = aliases[functions["webhook"]]
    (api,) = [r for r in of_type(expanded, "AWS::ApiGateway::RestApi").values()
              if r["Properties"].get("Name") == f"{stage.prefix}api"]
    uris = [method["x-amazon-apigateway-integration"]["uri"]
            for path in api["Properties"]["Body"]["paths"].values() for method in path.values()]
    assert uris and all(refers_to(uri, webhook_alias) for uri in uris)
    for short in ("reconciler", "scaler", "trainer", "image-refresh"):
        targets = [target["Arn"] for rule in of_type(expanded, "AWS::Events::Rule").values()
                   for target in rule["Properties"]["Targets"]
                   if refers_to(target["Arn"], aliases[functions[short]])]
        assert len(targets) == 1, short
    (mapping,) = of_type(expanded, "AWS::Lambda::EventSourceMapping").values()
    assert mapping["Properties"]["FunctionName"] == {"Ref": aliases[functions["scaler"]]}
    permissions = [p["Properties"]["FunctionName"]
                   for p in of_type(expanded, "AWS::Lambda::Permission").values()]
    assert {json.dumps(p) for p in permissions} == {
        json.dumps({"Ref": aliases[functions[short]]})
        for short in FUNCTIONS}
    management = [m["Properties"]["Integration"]["Uri"]
                  for m in of_type(expanded, "AWS::ApiGateway::Method").values()
                  if "Integration" in m["Properties"]]
    assert management and all(refers_to(uri, aliases[functions["api"]]) for uri in management)
    assert all(resources[a]["Properties"]["Name"] == LIVE_ALIAS for a in aliases.values())


@pytest.mark.parametrize("invoker", [
    {"Type": "AWS::Lambda::Permission", "Properties": {"FunctionName": {"Ref": "Fn"}}},
    {"Type": "AWS::Events::Rule", "Properties": {"Targets": [
        {"Arn": {"Fn::GetAtt": ["Fn", "Arn"]}, "Id": "t"}]}},
    {"Type": "AWS::Lambda::EventSourceMapping", "Properties": {"FunctionName": {"Ref": "Fn"}}},
    {"Type": "AWS::ApiGateway::RestApi", "Properties": {"Body": {"paths": {"/webhook": {"post": {
        "x-amazon-apigateway-integration": {"uri": {"Fn::Sub": "arn:${AWS::Partition}:"
                                                    "apigateway:lambda:path/functions/${Fn.Arn}"
                                                    "/invocations"}}}}}}}},
    {"Type": "AWS::Scheduler::Schedule", "Properties": {"Target": {"Arn": {"Fn::Sub": [
        "${X}", {"X": {"Fn::GetAtt": "Fn.Arn"}}]}}}},
], ids=["permission", "rule", "stream", "swagger", "scheduler"])
def test_an_unqualified_invoker_is_caught(invoker):
    """The check above fails for each kind of invoker naming the function, and passes the same
    invoker naming the alias."""
    template = {"Resources": {
        "Fn": {"Type": "AWS::Lambda::Function", "Properties": {}},
        "FnVersion": {"Type": "AWS::Lambda::Version", "Properties": {"FunctionName": {
            "Ref": "Fn"}}},
        "FnAlias": {"Type": "AWS::Lambda::Alias", "Properties": {"FunctionName": {"Ref": "Fn"}}},
        "Invoker": invoker,
    }}
    assert unqualified_invokers(template) == [("Invoker", "Fn")]
    text = json.dumps(invoker).replace('"Fn"', '"FnAlias"').replace("${Fn.Arn}", "${FnAlias}")
    text = text.replace('"Fn.Arn"', '"FnAlias"')
    template["Resources"]["Invoker"] = json.loads(text)
    assert unqualified_invokers(template) == []


def _deployment_group(template: dict, alias_id: str) -> dict:
    policy = template["Resources"][alias_id]["UpdatePolicy"]["CodeDeployLambdaAliasUpdate"]
    return template["Resources"][policy["DeploymentGroupName"]["Ref"]]["Properties"]


def _config_name(template: dict, group: dict) -> str:
    """The group's deployment configuration, as CodeDeploy will know it."""
    config = group["DeploymentConfigName"]
    if isinstance(config, dict) and "Fn::Sub" in config:  # SAM's predefined spelling
        text, variables = config["Fn::Sub"]
        return text.replace("${ConfigName}", variables["ConfigName"])
    if isinstance(config, dict) and "Ref" in config:
        custom = template["Resources"][config["Ref"]]["Properties"]
        canary = custom["TrafficRoutingConfig"]["TimeBasedCanary"]
        assert custom["ComputePlatform"] == "Lambda"
        return (f"Canary{canary['CanaryPercentage']}Percent"
                f"{canary['CanaryInterval']}Minutes")
    return config


def _alarm_names(template: dict, group: dict) -> set[str]:
    names = set()
    for alarm in group["AlarmConfiguration"]["Alarms"]:
        names.add(template["Resources"][alarm["Name"]["Ref"]]["Properties"]["AlarmName"])
    return names


def test_every_function_is_shifted_by_the_stages_canary_and_rolled_back(expanded, stage,
                                                                         pools):
    functions = _function_ids(expanded, stage)
    aliases = _aliases(expanded)
    canary = stage.lambda_canary
    expected_config = (f"CodeDeployDefault.Lambda{canary.name}" if canary.predefined
                       else canary.name)
    for short, function_id in functions.items():
        group = _deployment_group(expanded, aliases[function_id])
        config = _config_name(expanded, group)
        assert config.endswith(expected_config), (short, config)
        assert "AllAtOnce" not in config
        assert group["DeploymentStyle"] == {"DeploymentType": "BLUE_GREEN",
                                            "DeploymentOption": "WITH_TRAFFIC_CONTROL"}
        rollback = group["AutoRollbackConfiguration"]
        assert rollback["Enabled"] is True
        assert {"DEPLOYMENT_FAILURE", "DEPLOYMENT_STOP_ON_ALARM"} <= set(rollback["Events"])
        assert group["AlarmConfiguration"]["Enabled"] is True
        # The webhook's 5xx, each pool's DLQ, the reconciler failing, its own alias's errors:
        # monitoring.py's alarms themselves (one of each name), not copies.
        assert _alarm_names(expanded, group) == {
            f"{stage.prefix}WebhookErrors", f"{stage.prefix}ReconcilerFailing",
            *(f"{stage.prefix}{pool}-dlq" for pool in pools.names),
            f"{stage.prefix}{short}-{LIVE_ALIAS}-errors"}
    alarm_names = [a["Properties"]["AlarmName"]
                   for a in of_type(expanded, "AWS::CloudWatch::Alarm").values()]
    assert len(alarm_names) == len(set(alarm_names))


def test_each_alias_errors_alarm_watches_that_alias(expanded, stage):
    alarms = {a["Properties"]["AlarmName"]: a["Properties"]
              for a in of_type(expanded, "AWS::CloudWatch::Alarm").values()}
    for short in FUNCTIONS:
        alarm = alarms[f"{stage.prefix}{short}-{LIVE_ALIAS}-errors"]
        assert (alarm["Namespace"], alarm["MetricName"]) == ("AWS/Lambda", "Errors")
        dimensions = {d["Name"]: d["Value"] for d in alarm["Dimensions"]}
        assert dimensions == {"FunctionName": f"{stage.prefix}{short}",
                              "Resource": f"{stage.prefix}{short}:{LIVE_ALIAS}"}
        assert (alarm["Threshold"], alarm["ComparisonOperator"], alarm["Period"]) == (
            0, "GreaterThanThreshold", 60)


def test_the_canaries_per_stage():
    prod, dev = stage_settings("prod").lambda_canary, stage_settings("dev").lambda_canary
    assert prod.name == "Canary10Percent5Minutes" and prod.predefined
    # dev: shorter, and not all at once.
    assert dev.minutes < prod.minutes and 0 < dev.percent < 100 and not dev.predefined
    assert all(LambdaCanary(percent=p, minutes=m).predefined
               for p, m in PREDEFINED_LAMBDA_CANARIES)
    for refused in ({"percent": 100}, {"percent": 0}, {"minutes": 0}):
        with pytest.raises(ValueError, match=r"percent|minutes"):
            LambdaCanary(**refused)


def test_executor_groups_launch_the_templates_numbered_latest_version(template):
    """An explicit version number (not $Latest or $Default): a deploy that changes the
    template changes the group's version, which is what a rollout replaces hosts for."""
    groups = of_type(template, "AWS::AutoScaling::AutoScalingGroup").values()
    assert groups
    for group in groups:
        spec = group["Properties"]["MixedInstancesPolicy"]["LaunchTemplate"][
            "LaunchTemplateSpecification"]
        template_id = spec["LaunchTemplateId"]["Ref"]
        assert spec["Version"] == {"Fn::GetAtt": [template_id, "LatestVersionNumber"]}


def test_the_scaler_may_set_a_groups_launch_template_back(template):
    role_id = template["Resources"]["Scaler"]["Properties"]["Role"]["Fn::GetAtt"][0]
    statements = list(role_statements(template, role_id))

    def granting(action: str) -> list[dict]:
        return [s for s in statements if action in as_list(s["Action"])]

    groups = of_type(template, "AWS::AutoScaling::AutoScalingGroup")
    (update,) = granting("autoscaling:UpdateAutoScalingGroup")
    names = {g["Properties"]["AutoScalingGroupName"] for g in groups.values()}
    granted = json.dumps(update["Resource"])
    assert all(f"autoScalingGroupName/{name}" in granted for name in names)
    assert "*" not in as_list(update["Resource"])
    (describe,) = granting("ec2:DescribeLaunchTemplateVersions")
    assert describe["Resource"] == "*"
    (run,) = granting("ec2:RunInstances")
    launch_templates = of_type(template, "AWS::EC2::LaunchTemplate")
    assert launch_templates and all(refers_to(run["Resource"], lt) for lt in launch_templates)
    (security_group,) = of_type(template, "AWS::EC2::SecurityGroup")
    assert refers_to(run["Resource"], security_group)
    run_text = json.dumps(run["Resource"])
    for kind in ("image", "subnet", "instance", "volume", "network-interface"):
        assert f":{kind}/" in run_text, kind
    (tags,) = granting("ec2:CreateTags")
    assert tags["Condition"] == {"StringEquals": {"ec2:CreateAction": "RunInstances"}}
    # Only the executor hosts' roles, only to EC2.
    (passing,) = granting("iam:PassRole")
    assert passing["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    profiles = of_type(template, "AWS::IAM::InstanceProfile").values()
    host_roles = {p["Properties"]["Roles"][0]["Ref"] for p in profiles}
    assert host_roles and {item["Fn::GetAtt"][0] for item in passing["Resource"]} == host_roles


def test_the_scaler_reads_and_writes_only_its_rollout_items_of_the_hosts_table(template):
    role_id = template["Resources"]["Scaler"]["Properties"]["Role"]["Fn::GetAtt"][0]
    on_hosts = [s for s in role_statements(template, role_id)
                if "hoststable" in json.dumps(s["Resource"]).lower()
                and {"dynamodb:GetItem", "dynamodb:PutItem"} & set(as_list(s["Action"]))]
    assert len(on_hosts) == 1, on_hosts
    (rollout,) = on_hosts
    assert sorted(as_list(rollout["Action"])) == ["dynamodb:GetItem", "dynamodb:PutItem"]
    assert rollout["Condition"] == {"ForAllValues:StringLike": {
        "dynamodb:LeadingKeys": ["scaler#rollout#*"]}}
