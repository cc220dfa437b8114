"""Each deployable's synthesized policy against the AWS calls it really made during the session's
functional and e2e tests (recorded by chalicelib/aws.py into RUNNERHUB_AWS_CALL_LOG, set by
tests/conftest.py): nothing missing (every call is allowed on a matching resource), nothing
extra (every grant was used at least once, except the few below that the tests cannot make,
each with its reason).

pytest runs tests/ alphabetically, so e2e and functional have run when this runs in the same
session; on its own (`pytest tests/infra`) there is nothing recorded: skipped on a laptop,
failed when CI=true.

Resources are compared by kind, not by name (the tests' tables and queues have their own
names): `table:jobs_table`, `index:jobs_table/by_state`, `queue:demand`, `queue:dlq`, `secret`.
"""

from __future__ import annotations

import fnmatch

import pytest

from chalicelib import resources
from tests.conftest import recording, require
from tests.infra.cfn import as_list, executor_roles, role_statements, webhook_role

# Granted, but no call of the code the tests run can use it: (deployable, action, resource
# kind) patterns -> why.
UNEXERCISED = {
    ("webhook", "logs:*", "logs"): "the Lambda runtime ships the function's output",
    ("reconciler", "logs:*", "logs"): "the Lambda runtime ships the function's output",
    ("executor", "logs:*", "logs"): "the CloudWatch agent ships the executor's log and EMF",
    ("webhook", "secretsmanager:GetSecretValue", "secret"):
        "the tests give the webhook its secrets inline (RUNNERHUB_WEBHOOK_SECRETS); the "
        "Secrets Manager read is tested on moto in tests/unit/test_secret_store.py",
    ("reconciler", "secretsmanager:GetSecretValue", "secret"):
        "the tests give the App key as a file; the Secrets Manager read is the same "
        "SecretsManagerClient.read as the webhook's",
    ("executor", "secretsmanager:GetSecretValue", "secret"):
        "the tests give the App key as a file; the Secrets Manager read is the same "
        "SecretsManagerClient.read as the webhook's",
    ("*", "kms:Decrypt", "kms"): "Secrets Manager decrypts the secret for the caller",
    ("executor", "dynamodb:GetItem", "table:hosts_table"):
        "a returning message whose claim is another host's reads that host's heartbeat "
        "(executor/takeover.py); the e2e host-loss test takes the claims over by scan, the "
        "message path is tested in-process (tests/unit/test_executor_recovery.py)",
    ("reconciler", "dynamodb:UpdateItem", "table:runners_table"):
        "a job GitHub started while RunnerHub missed the in_progress webhook marks its runner "
        "busy; no functional or e2e test loses that webhook (tests/unit/test_reconciler.py)",
    ("executor", "sqs:SendMessage", "queue:dlq"):
        "only a malformed message goes to the DLQ (executor/queue.py dead_letter); the tests "
        "that plant one drive the daemon in-process (tests/unit/test_executor.py)",
    ("scaler", "logs:*", "logs"): "the Lambda runtime ships the function's output",
    ("scaler", "secretsmanager:GetSecretValue", "secret"):
        "the tests give the App key as a file; the Secrets Manager read is the same "
        "SecretsManagerClient.read as the webhook's",
    ("scaler", "dynamodb:*", "stream"):
        "Lambda's event source mapping reads the jobs table's stream with the function's "
        "role; the local stack's stream poller (devstack/stream_poller.py) plays it",
    ("executor", "autoscaling:*LifecycleAction*", "group"):
        "moto has no lifecycle actions: the local fleet plays the drain hook (issue 14)",
    ("executor", "s3:GetObject", "*"): "user data downloads the code bundle at boot",
    ("executor", "dynamodb:PutItem", "table:audit_table"):
        "only an isolation violation writes an audit record (executor/monitor.py); no "
        "functional or e2e job commits one: tests/isolation/test_monitor.py provokes them",
    ("executor", "ecr:*", "*"): "the Docker credential helper pulls runner images from ECR",
    ("trainer", "logs:*", "logs"): "the Lambda runtime ships the function's output",
    ("api", "logs:*", "logs"): "the Lambda runtime ships the function's output",
    ("api", "secretsmanager:GetSecretValue", "secret"):
        "the functional tests run the API without a GitHub App (retry and redeliver answer "
        "503); the Secrets Manager read is the same SecretsManagerClient.read as the webhook's",
    ("api", "sqs:SendMessage", "queue:demand"):
        "a retry re-demands only once GitHub says the job is still queued: no GitHub App in "
        "the functional API tests (the re-demand is demand.redemand, the reconciler's)",
    ("api", "dynamodb:UpdateItem", "table:jobs_table"):
        "the retried job's move (demand.redemand) follows GitHub's answer: as above",
    ("api", "autoscaling:DescribeAutoScalingGroups", "*"):
        "the local stack has no Auto Scaling groups: the API is wired without them there; "
        "the group read is the scaler's AwsAutoScaling.group, recorded for the scaler",
    ("api", "ec2:DescribeInstances", "*"): "the instances' launch times of that group read",
    ("scaler", "ec2:RunInstances", "ec2"):
        "never called: AWS checks it on the caller when a rollback sets a group's launch "
        "template version (the Auto Scaling guide, launch template permissions)",
    ("scaler", "ec2:CreateTags", "ec2"): "as ec2:RunInstances: the template's tags on launch",
    ("scaler", "iam:PassRole", "role"): "as ec2:RunInstances: the template's host role",
    ("image_refresh", "logs:*", "logs"): "the Lambda runtime ships the function's output",
    ("scaler", "ec2:DescribeLaunchTemplateVersions", "*"):
        "listed among the permissions to set a launch template on a group; the scaler reads "
        "each group's version from DescribeAutoScalingGroups",
}
DEPLOYABLES = ("webhook", "reconciler", "executor", "scaler", "trainer", "api",
               "image_refresh")
# Calls IAM authorises on "*" only (no resource-level permissions: the Service Authorization
# Reference, "Actions defined by Amazon EC2 Auto Scaling / Amazon EC2"): recorded
# with no resource, and granted on "*" alone.
UNSCOPED_ACTIONS = frozenset({
    "autoscaling:DescribeAutoScalingGroups",
    "autoscaling:DescribeAutoScalingInstances",
    "ec2:DescribeInstances",
    "ec2:DescribeLaunchTemplateVersions",
})


def _table_logical_names(template: dict) -> dict[str, str]:
    """CloudFormation logical id of each table -> its logical name (jobs_table, ...)."""
    found = {}
    for logical_id, resource in template["Resources"].items():
        if resource["Type"] == "AWS::DynamoDB::Table":
            found[logical_id] = _table_kind(resource["Properties"]["TableName"])
    return found


def _table_kind(name: str) -> str:
    for spec in resources.TABLES:
        if name.endswith(spec.default_name.removeprefix("runnerhub-")):
            return spec.logical_name
    raise AssertionError(f"table {name!r} is none of {[s.logical_name for s in resources.TABLES]}")


def _queue_kind(name: str) -> str:
    return "queue:dlq" if name.endswith("-dlq.fifo") else "queue:demand"


def granted_kinds(template: dict, value: object) -> set[str]:
    """The kinds of resource a statement's Resource names."""
    found = set()
    tables = _table_logical_names(template)
    for item in as_list(value):
        if item == "*":
            found.add("*")
            continue
        if isinstance(item, dict) and "Fn::GetAtt" in item:
            target = template["Resources"][item["Fn::GetAtt"][0]]
            kind = target["Type"]
            if kind == "AWS::DynamoDB::Table" and item["Fn::GetAtt"][1] == "StreamArn":
                found.add("stream")
            elif kind == "AWS::DynamoDB::Table":
                found.add(f"table:{tables[item['Fn::GetAtt'][0]]}")
            elif kind == "AWS::SQS::Queue":
                found.add(_queue_kind(target["Properties"]["QueueName"]))
            elif kind == "AWS::Logs::LogGroup":
                found.add("logs")
            elif kind == "AWS::KMS::Key":
                found.add("kms")
            elif kind == "AWS::IAM::Role":
                found.add("role")  # an executor host role the scaler may pass to EC2
            else:
                found.add(f"other:{kind}")
            continue
        if isinstance(item, dict) and "Ref" in item:
            kind = template["Resources"].get(item["Ref"], {}).get("Type")
            found.add("secret" if kind == "AWS::SecretsManager::Secret" else f"other:{kind}")
            continue
        if isinstance(item, dict) and "Fn::Join" in item:
            parts = item["Fn::Join"][1]
            head, tail = parts[0], parts[-1]
            if isinstance(head, dict) and "Fn::GetAtt" in head and template["Resources"][
                    head["Fn::GetAtt"][0]]["Type"] == "AWS::S3::Bucket":
                found.add("bucket")  # the trainer's models (objects under a prefix)
                continue
            if isinstance(head, dict) and "Fn::GetAtt" in head and isinstance(tail, str) \
                    and tail.startswith("/index/"):
                found.add(f"index:{tables[head['Fn::GetAtt'][0]]}/{tail.removeprefix('/index/')}")
                continue
            if _is_arn_of(parts, "autoscaling"):
                found.add("group")
            elif _is_arn_of(parts, "ecr"):
                found.add("repository")  # a runner image repository (infra ecr.py)
            elif _is_arn_of(parts, "ec2"):
                found.add("ec2")  # what an executor launch template launches (rollouts.py)
            else:
                found.add("logs" if _is_arn_of(parts, "logs") else "other:join")
            continue
        found.add("other")
    return found


def _is_arn_of(parts: list, service: str) -> bool:
    return any(isinstance(part, str) and f":{service}:" in part for part in parts)


def recorded_kind(call: dict) -> str:
    if "index" in call:
        return f"index:{_table_kind(call['table'])}/{call['index']}"
    if "table" in call:
        return f"table:{_table_kind(call['table'])}"
    if "queue" in call:
        return _queue_kind(call["queue"])
    if "secret" in call:
        return "secret"
    # An Auto Scaling group (each pool's, named by the call or by its instance), the jobs
    # table's stream (the only one).
    if "group" in call:
        return "group"
    if "stream" in call:
        return "stream"
    if "bucket" in call:  # the trainer's models bucket (the only one a deployable writes)
        return "bucket"
    if "repository" in call:  # a runner image's ECR repository (its scan findings)
        return "repository"
    return "*"


def _covers(granted: str, wanted: str) -> bool:
    if granted in ("*", wanted):
        return True
    return granted.endswith("/*") and wanted.startswith(granted[:-1])


def _grants(template: dict, role_id: str) -> set[tuple[str, str]]:
    found = set()
    for statement in role_statements(template, role_id):
        if statement.get("Effect", "Allow") != "Allow":
            continue
        for action in as_list(statement["Action"]):
            for kind in granted_kinds(template, statement.get("Resource", "*")):
                found.add((action, kind))
    return found


def _roles(template: dict) -> dict[str, list[str]]:
    def role(function: str) -> str:
        return template["Resources"][function]["Properties"]["Role"]["Fn::GetAtt"][0]

    def plain(suffix: str) -> str:
        (found,) = [logical_id for logical_id, resource in template["Resources"].items()
                    if resource["Type"] == "AWS::Lambda::Function"
                    and str(resource["Properties"].get("FunctionName", "")).endswith(suffix)]
        return found

    return {"webhook": [webhook_role(template)], "reconciler": [role("Reconcile")],
            "executor": sorted(executor_roles(template).values()), "scaler": [role("Scaler")],
            "trainer": [role(plain("-trainer"))], "api": [role(plain("-api"))],
            "image_refresh": [role(plain("-image-refresh"))]}


def _unexercised_reason(deployable: str, action: str, kind: str) -> str | None:
    for (who, pattern, where), reason in UNEXERCISED.items():
        if fnmatch.fnmatch(deployable, who) and fnmatch.fnmatch(action, pattern) \
                and (where in ("*", kind)):
            return reason
    return None


@pytest.fixture(scope="module")
def calls() -> dict[str, set[tuple[str, str]]]:
    recorded = recording("RUNNERHUB_AWS_CALL_LOG")
    require(bool(recorded), "AWS calls recorded by tests/e2e and tests/functional in this "
                            "session (run them before tests/infra)")
    found: dict[str, set[tuple[str, str]]] = {}
    for call in recorded:
        if call["deployable"] not in DEPLOYABLES:
            continue  # set-up and test code: their tables are named as the test likes
        found.setdefault(call["deployable"], set()).add((call["action"], recorded_kind(call)))
    for deployable in DEPLOYABLES:
        require(deployable in found, f"AWS calls of the {deployable} recorded in this session")
    return found


@pytest.mark.parametrize("deployable", DEPLOYABLES)
def test_every_call_made_is_allowed(template, calls, deployable):
    for role_id in _roles(template)[deployable]:
        grants = _grants(template, role_id)
        missing = sorted(
            (action, kind) for action, kind in calls[deployable]
            if not any(fnmatch.fnmatch(action, granted_action) and _covers(granted_kind, kind)
                       for granted_action, granted_kind in grants)
        )
        assert not missing, f"{deployable} ({role_id}) calls what it may not: {missing}"


@pytest.mark.parametrize("deployable", DEPLOYABLES)
def test_every_grant_is_used(template, calls, deployable):
    for role_id in _roles(template)[deployable]:
        extra = sorted(
            (action, kind) for action, kind in _grants(template, role_id)
            if not any(fnmatch.fnmatch(called, action) and _covers(kind, called_kind)
                       for called, called_kind in calls[deployable])
            and _unexercised_reason(deployable, action, kind) is None
        )
        assert not extra, f"{deployable} ({role_id}) is granted what it never calls: {extra}"


def test_recorded_resources_are_known_kinds():
    """Every recorded call names a table, index, queue or secret this module can place (a
    new kind of resource must be taught here, not silently counted as `*`)."""
    recorded = recording("RUNNERHUB_AWS_CALL_LOG")
    require(bool(recorded), "AWS calls recorded in this session")
    unplaced = {(c["deployable"], c["action"]) for c in recorded
                if c["deployable"] in DEPLOYABLES and recorded_kind(c) == "*"
                and c["action"] not in UNSCOPED_ACTIONS}
    assert not unplaced, unplaced


def test_only_unscoped_reads_are_granted_on_every_resource(template):
    """A grant on "*" is one of the reads IAM cannot scope, never a write; and those reads
    are granted on "*" alone (a resource there would refuse every call)."""
    for deployable, role_ids in _roles(template).items():
        for role_id in role_ids:
            for action, kind in _grants(template, role_id):
                if action.startswith(("logs:", "kms:", "s3:", "ecr:", "ssm:", "ec2messages:",
                                      "ssmmessages:")):
                    continue  # runtime, agent and managed-policy grants, checked elsewhere
                assert (kind == "*") == (action in UNSCOPED_ACTIONS), (deployable, action, kind)


def test_the_kinds_are_told_apart(template):
    """The mapping the comparisons rest on: a by_state index, a pool's DLQ, a table."""
    kinds = set()
    for role_ids in _roles(template).values():
        for role_id in role_ids:
            kinds |= {kind for _, kind in _grants(template, role_id)}
    assert {"table:jobs_table", "index:jobs_table/by_state", "queue:demand", "queue:dlq",
            "secret"} <= kinds
    assert recorded_kind({"table": "rh-1-jobs", "index": "by_host"}) == "index:jobs_table/by_host"
    assert recorded_kind({"queue": "rh-1-cpu-dlq.fifo"}) == "queue:dlq"
    assert {"group", "stream"} <= {kind for _, kind in _grants(template, _roles(template)[
        "scaler"][0])}
    assert recorded_kind({"group": "runnerhub-dev-gpu"}) == "group"
    assert "bucket" in {kind for _, kind in _grants(template, _roles(template)["trainer"][0])}
    assert recorded_kind({"bucket": "rh-1-models"}) == "bucket"
    assert "repository" in {kind for _, kind in _grants(
        template, next(iter(executor_roles(template).values())))}
    assert recorded_kind({"repository": "runnerhub/linux-small"}) == "repository"
    assert _covers("index:jobs_table/*", "index:jobs_table/by_host")
    assert not _covers("index:jobs_table/by_state", "index:jobs_table/by_host")
    assert not _covers("table:jobs_table", "index:jobs_table/by_state")


def test_a_transaction_is_recorded_as_one_action_per_item():
    """IAM authorises each item of TransactWriteItems on its own table (the executor's claim:
    the job's move and the host's record), and a batch per table."""
    from chalicelib.aws import calls_of

    claim = {"TransactItems": [{"Update": {"TableName": "rh-jobs", "Key": {}}},
                               {"ConditionCheck": {"TableName": "rh-hosts", "Key": {}}}]}
    assert calls_of("dynamodb", "TransactWriteItems", claim) == [
        ("dynamodb:UpdateItem", {"table": "rh-jobs"}),
        ("dynamodb:ConditionCheckItem", {"table": "rh-hosts"})]
    batch = {"RequestItems": {"rh-deliveries": {}, "rh-jobs": {}}}
    assert [table["table"] for _, table in calls_of("dynamodb", "BatchGetItem", batch)] == [
        "rh-deliveries", "rh-jobs"]
    assert calls_of("sqs", "SendMessage", {"QueueUrl": "http://x/1/rh-cpu.fifo"}) == [
        ("sqs:SendMessage", {"queue": "rh-cpu.fifo"})]
    # IAM checks these on a resource the call does not name: the instance's group, the
    # iterator's stream.
    assert calls_of("autoscaling", "TerminateInstanceInAutoScalingGroup",
                    {"InstanceId": "i-1"}) == [
        ("autoscaling:TerminateInstanceInAutoScalingGroup", {"group": ""})]
    assert calls_of("dynamodb", "GetRecords", {"ShardIterator": "x"}) == [
        ("dynamodb:GetRecords", {"stream": ""})]
    assert calls_of("autoscaling", "SetDesiredCapacity", {"AutoScalingGroupName": "g"}) == [
        ("autoscaling:SetDesiredCapacity", {"group": "g"})]
