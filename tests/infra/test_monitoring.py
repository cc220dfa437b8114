"""The dashboard and the alarms, read from the synthesized template (not from shared constants):
every RunnerHub metric a widget or an alarm names was really emitted by the code during this
session's tests (the EMF each process wrote to RUNNERHUB_EMF_LOG, tests/conftest.py): the same
namespace, name, dimension names, and dimension values where the dashboard fixes them (not the
pools' and Apps' names, which come from the stage's pools file and account). AWS's own metrics
are checked against the small table below. Every alarm notifies the stage's SNS topic."""

from __future__ import annotations

import json
import re

import pytest
from runnerhub_infra.stages import CONTEXT_KEYS, StageSettings, overrides_from_context

from tests.conftest import recording, require
from tests.infra.cfn import as_list
from tests.infra.cfn import resources as of_type

# The AWS metrics the dashboard and alarms may name, with their dimensions (AWS docs: SQS
# "Available CloudWatch metrics for Amazon SQS", Lambda "Types of metrics for Lambda
# functions", API Gateway "Amazon API Gateway dimensions and metrics" (REST: ApiName, Stage),
# EC2 Auto Scaling "Auto Scaling group metrics").
AWS_METRICS = {
    ("AWS/SQS", "ApproximateNumberOfMessagesVisible"): {"QueueName"},
    ("AWS/SQS", "ApproximateAgeOfOldestMessage"): {"QueueName"},
    ("AWS/Lambda", "Errors"): {"FunctionName"},
    ("AWS/Lambda", "Throttles"): {"FunctionName"},
    ("AWS/Lambda", "Duration"): {"FunctionName"},
    ("AWS/ApiGateway", "5XXError"): {"ApiName", "Stage"},
    ("AWS/ApiGateway", "Latency"): {"ApiName", "Stage"},
    ("AWS/AutoScaling", "GroupDesiredCapacity"): {"AutoScalingGroupName"},
    ("AWS/AutoScaling", "GroupInServiceInstances"): {"AutoScalingGroupName"},
}
# Lambda's metrics of the invocations through an alias ("Resource": <function>:<alias>): the
# rollback alarms of rollouts.py.
AWS_ALIAS_METRICS = {("AWS/Lambda", "Errors"): {"FunctionName", "Resource"}}
# Dimensions whose values come from the deployment (pool names, App ids), not from the code.
OPEN_VALUED = {"pool", "app_id"}
TOKEN = "<token>"
SEARCH = re.compile(r"SEARCH\('\{(?P<ns>[^,}]+)(?P<dims>(?:,[^,}]+)*)\}\s*"
                    r"MetricName=\"(?P<name>[^\"]+)\"")


def _render(value: object) -> str:
    """An Fn::Join'd dashboard body as text, every reference a placeholder."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "Fn::Join" in value:
        separator, parts = value["Fn::Join"]
        return separator.join(_render(part) for part in parts)
    return TOKEN


def dashboard_metrics(template: dict) -> list[tuple[str, str, dict[str, str]]]:
    """(namespace, name, dimensions) of every metric of every widget; SEARCH expressions give
    their dimension names with TOKEN values."""
    found = []
    for dashboard in of_type(template, "AWS::CloudWatch::Dashboard").values():
        body = json.loads(_render(dashboard["Properties"]["DashboardBody"]))
        for widget in body["widgets"]:
            for row in widget.get("properties", {}).get("metrics", []):
                if isinstance(row[-1], dict) and "expression" in row[-1]:
                    match = SEARCH.search(row[-1]["expression"])
                    assert match, f"an expression the test cannot read: {row[-1]}"
                    names = [n for n in match["dims"].split(",") if n]
                    found.append((match["ns"], match["name"], dict.fromkeys(names, TOKEN)))
                    continue
                fields = [item for item in row if not isinstance(item, dict)]
                namespace, name, *pairs = fields
                found.append((namespace, name, dict(zip(pairs[::2], pairs[1::2], strict=True))))
    return found


def alarm_metrics(template: dict) -> list[tuple[str, str, dict[str, str]]]:
    found = []
    for alarm in of_type(template, "AWS::CloudWatch::Alarm").values():
        props = alarm["Properties"]
        assert "MetricName" in props, f"an alarm the test cannot read: {props}"
        dimensions = {d["Name"]: d["Value"] if isinstance(d["Value"], str) else TOKEN
                      for d in props.get("Dimensions", [])}
        found.append((props["Namespace"], props["MetricName"], dimensions))
    return found


@pytest.fixture(scope="module")
def emitted() -> set[tuple[str, str, frozenset]]:
    """(namespace, name, {dimension: value}) of every metric the code emitted this session."""
    blobs = recording("RUNNERHUB_EMF_LOG")
    require(bool(blobs), "EMF recorded by tests/e2e and tests/functional in this session "
                         "(run them before tests/infra)")
    found = set()
    for blob in blobs:
        for directive in blob["_aws"]["CloudWatchMetrics"]:
            for dimension_set in directive["Dimensions"]:
                values = frozenset((name, blob[name]) for name in dimension_set)
                for metric in directive["Metrics"]:
                    found.add((directive["Namespace"], metric["Name"], values))
    return found


def _was_emitted(emitted, namespace: str, name: str, dimensions: dict[str, str]) -> bool:
    for ns, emitted_name, values in emitted:
        if (ns, emitted_name) != (namespace, name) or {k for k, _ in values} != set(dimensions):
            continue
        if all(value == TOKEN or key in OPEN_VALUED or (key, value) in values
               for key, value in dimensions.items()):
            return True
    return False


def test_every_runnerhub_metric_named_was_emitted(template, emitted):
    named = dashboard_metrics(template) + alarm_metrics(template)
    ours = [m for m in named if m[0] == "RunnerHub"]
    assert len(ours) >= 20  # the dashboard was read, not skipped
    missing = sorted({(name, tuple(sorted(dims.items()))) for ns, name, dims in ours
                      if not _was_emitted(emitted, ns, name, dims)})
    assert not missing, f"named by the dashboard or an alarm, never emitted: {missing}"


def test_every_aws_metric_named_exists_with_its_dimensions(template):
    named = dashboard_metrics(template) + alarm_metrics(template)
    theirs = [m for m in named if m[0] != "RunnerHub"]
    assert {ns for ns, _, _ in theirs} == {"AWS/SQS", "AWS/Lambda", "AWS/ApiGateway",
                                           "AWS/AutoScaling"}
    for namespace, name, dimensions in theirs:
        assert (namespace, name) in AWS_METRICS, (namespace, name)
        assert set(dimensions) in (AWS_METRICS[(namespace, name)],
                                   AWS_ALIAS_METRICS.get((namespace, name))), (
            namespace, name, dimensions)


def test_aws_dimension_values_are_this_stacks_resources(template, stage):
    functions = {f["Properties"]["FunctionName"]
                 for kind in ("AWS::Serverless::Function", "AWS::Lambda::Function")
                 for f in of_type(template, kind).values()
                 if "FunctionName" in f["Properties"]}
    (api,) = of_type(template, "AWS::Serverless::Api").values()
    management = {a["Properties"]["Name"]
                  for a in of_type(template, "AWS::ApiGateway::RestApi").values()}
    groups = {g["Properties"]["AutoScalingGroupName"]
              for g in of_type(template, "AWS::AutoScaling::AutoScalingGroup").values()}
    for _, _, dimensions in dashboard_metrics(template) + alarm_metrics(template):
        if "FunctionName" in dimensions:
            assert dimensions["FunctionName"] in functions
        if "ApiName" in dimensions:
            # The webhook's (Chalice) API, or the management API's own (management_api.py).
            assert api["Properties"]["Name"] == f"{stage.prefix}api"
            assert dimensions["ApiName"] in {api["Properties"]["Name"], *management}
        if "AutoScalingGroupName" in dimensions:
            assert dimensions["AutoScalingGroupName"] in groups | {TOKEN}


def test_the_dashboard_shows_what_an_operator_needs_per_pool(template, pools):
    named = {(ns, name) for ns, name, _ in dashboard_metrics(template)}
    for wanted in [("AWS/SQS", "ApproximateNumberOfMessagesVisible"),
                   ("AWS/SQS", "ApproximateAgeOfOldestMessage"), ("RunnerHub", "JobsOpen"),
                   ("RunnerHub", "PickupSeconds"), ("AWS/AutoScaling", "GroupDesiredCapacity"),
                   ("AWS/AutoScaling", "GroupInServiceInstances"), ("RunnerHub", "SlotsBusy"),
                   ("RunnerHub", "SlotsFree"), ("RunnerHub", "WebhookAnswered"),
                   ("AWS/ApiGateway", "5XXError"), ("AWS/Lambda", "Throttles"),
                   ("AWS/Lambda", "Duration"), ("RunnerHub", "ReconcileRuns"),
                   ("RunnerHub", "PoolDesiredHosts"), ("RunnerHub", "PoolBacklog"),
                   ("RunnerHub", "PoolFreeSlots"), ("RunnerHub", "ScalerRuns"),
                   ("RunnerHub", "ScalerRunFailed"), ("RunnerHub", "RolloutRolledBack"),
                   ("RunnerHub", "RolloutStalled"),
                   ("RunnerHub", "GitHubAppBudgetRemaining")]:
        assert wanted in named, wanted
    for per_pool in ("PickupSeconds", "PoolDesiredHosts", "PoolBacklog", "PoolFreeSlots"):
        found = [dims for _, name, dims in dashboard_metrics(template) if name == per_pool]
        assert {dims["pool"] for dims in found} == set(pools.names), per_pool
    body = json.dumps(of_type(template, "AWS::CloudWatch::Dashboard"))
    assert '\\"stat\\":\\"p50\\"' in body and '\\"stat\\":\\"p95\\"' in body


def test_alarms_cover_each_failure_and_notify_the_stage_topic(template, pools, stage):
    alarms = [a["Properties"] for a in of_type(template, "AWS::CloudWatch::Alarm").values()]
    # A function's errors through its alias roll a rollout back and page nobody (rollouts.py).
    rollback_only = [a for a in alarms
                     if any(d["Name"] == "Resource" for d in a.get("Dimensions", []))]
    assert len(rollback_only) == 6
    for alarm in rollback_only:
        assert "AlarmActions" not in alarm and "OKActions" not in alarm, alarm["AlarmName"]
        assert "docs/deploy.md" in alarm["AlarmDescription"]
    alarms = [a for a in alarms if a not in rollback_only]
    (topic_id,) = of_type(template, "AWS::SNS::Topic")
    by_metric: dict[str, list[dict]] = {}
    for alarm in alarms:
        assert alarm["AlarmActions"] == [{"Ref": topic_id}], alarm["AlarmName"]
        assert alarm["OKActions"] == [{"Ref": topic_id}], alarm["AlarmName"]
        assert "docs/operations.md" in alarm["AlarmDescription"]
        by_metric.setdefault(alarm["MetricName"], []).append(alarm)
    # A DLQ not empty, and demand too old, for each pool.
    assert len(by_metric["ApproximateNumberOfMessagesVisible"]) == len(pools.pools)
    assert all(a["Threshold"] == 0 and a["ComparisonOperator"] == "GreaterThanThreshold"
               for a in by_metric["ApproximateNumberOfMessagesVisible"])
    assert len(by_metric["ApproximateAgeOfOldestMessage"]) == len(pools.pools)
    # An App below 10 % of its budget (the least of the Apps).
    (budget,) = by_metric["GitHubAppBudgetRemaining"]
    assert (budget["Threshold"], budget["ComparisonOperator"], budget["Statistic"]) == (
        10, "LessThanThreshold", "Minimum")
    assert budget["Dimensions"] == [{"Name": "component", "Value": "executor"}]
    # Webhook 5xx; a reconciler run failing, or missing (no data is breaching).
    assert by_metric["5XXError"][0]["Namespace"] == "AWS/ApiGateway"
    assert sorted(a["Dimensions"][0]["Value"].removeprefix(stage.prefix)
                  for a in by_metric["Errors"]) == ["image-refresh", "reconciler", "scaler",
                                                    "trainer"]
    (missing,) = by_metric["ReconcileRuns"]
    assert (missing["TreatMissingData"], missing["ComparisonOperator"]) == (
        "breaching", "LessThanThreshold")
    # Scaler runs failing, or missing (no data is breaching).
    (failing,) = by_metric["ScalerRunFailed"]
    assert failing["Threshold"] == 0 and failing["ComparisonOperator"] == "GreaterThanThreshold"
    (scaler_missing,) = by_metric["ScalerRuns"]
    assert scaler_missing["TreatMissingData"] == "breaching"
    # The trainer: a pool failing, no run for two days (no data is breaching).
    (pool_failed,) = by_metric["TrainerPoolFailed"]
    assert pool_failed["Threshold"] == 0 and pool_failed["Period"] == 86400
    (trainer_missing,) = by_metric["TrainerRuns"]
    assert (trainer_missing["TreatMissingData"], trainer_missing["EvaluationPeriods"]) == (
        "breaching", 2)
    # An executor rollout rolled back (at once), or stalled for 30 minutes.
    (rolled_back,) = by_metric["RolloutRolledBack"]
    assert (rolled_back["Threshold"], rolled_back["Statistic"], rolled_back["Period"],
            rolled_back["EvaluationPeriods"]) == (0, "Sum", 300, 1)
    (stalled,) = by_metric["RolloutStalled"]
    assert (stalled["Threshold"], stalled["Statistic"]) == (0, "Maximum")
    assert stalled["Period"] * stalled["EvaluationPeriods"] == 30 * 60
    assert all(a["Dimensions"] == [{"Name": "service", "Value": "scaler"}]
               for a in (rolled_back, stalled))
    # A flagged job.
    (flagged,) = by_metric["JobsFlagged"]
    assert flagged["Threshold"] == 0 and flagged["ComparisonOperator"] == "GreaterThanThreshold"


def test_alarm_email_is_a_checked_context_setting():
    assert "alarm_email" in CONTEXT_KEYS
    context = {"alarm_email": "oncall@example.com"}
    assert overrides_from_context(context.get) == context
    assert StageSettings(name="dev", alarm_email="oncall@example.com").alarm_email
    with pytest.raises(ValueError, match="alarm_email"):
        StageSettings(name="dev", alarm_email="not an address")


def test_a_search_expression_is_read_with_its_dimensions():
    """The parser the checks above rest on: a SEARCH row and a plain row."""
    rows = {"widgets": [{"properties": {"metrics": [
        [{"expression": "SEARCH('{RunnerHub,app_id} MetricName=\"X\"', 'Minimum', 60)"}],
        ["RunnerHub", "Y", "pool", "cpu", {"stat": "p95"}],
    ]}}]}
    template = {"Resources": {"D": {"Type": "AWS::CloudWatch::Dashboard", "Properties": {
        "DashboardBody": json.dumps(rows)}}}}
    assert dashboard_metrics(template) == [("RunnerHub", "X", {"app_id": TOKEN}),
                                           ("RunnerHub", "Y", {"pool": "cpu"})]
    emitted = {("RunnerHub", "Y", frozenset({("pool", "other")})),
               ("RunnerHub", "Z", frozenset({("state", "claimed")}))}
    assert _was_emitted(emitted, "RunnerHub", "Y", {"pool": "cpu"})  # pool: open-valued
    assert not _was_emitted(emitted, "RunnerHub", "Z", {"state": "waiting"})
    assert not _was_emitted(emitted, "RunnerHub", "Y", {})


def test_host_agent_ships_the_executor_log_and_takes_its_emf():
    """executor/host/cloudwatch-agent.json: the file the unit writes goes to the stage's
    executor log group (the role may write there), and the EMF endpoint is one the executor's
    sink accepts (RUNNERHUB_EMF_ENDPOINT on the host)."""
    from runnerhub_infra.executors import EXECUTOR_LOG_GROUP

    from chalicelib.telemetry import AgentSink
    from tests.conftest import ROOT

    host = ROOT / "executor" / "host"
    config = json.loads((host / "cloudwatch-agent.json").read_text())
    (collected,) = config["logs"]["logs_collected"]["files"]["collect_list"]
    unit = (host / "runnerhub-executor.service").read_text()
    assert f"StandardOutput=append:{collected['file_path']}" in unit
    assert collected["log_group_name"] == EXECUTOR_LOG_GROUP.format(stage="@STAGE@")
    endpoint = config["logs"]["metrics_collected"]["emf"]["service_address"]
    assert AgentSink(endpoint).address == ("127.0.0.1", 25888)


def test_executor_role_may_write_only_its_stage_log_group(template, stage):
    from tests.infra.cfn import executor_roles, role_statements

    for role_id in executor_roles(template).values():
        logs = [s for s in role_statements(template, role_id)
                if any(a.startswith("logs:") for a in as_list(s["Action"]))]
        assert len(logs) == 1
        assert set(as_list(logs[0]["Action"])) == {"logs:CreateLogStream", "logs:PutLogEvents"}
        assert f"/runnerhub/{stage.name}/executor:*" in json.dumps(logs[0]["Resource"])
