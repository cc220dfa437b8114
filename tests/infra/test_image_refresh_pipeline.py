"""The runner image refresh pipeline as synthesized (infra/runnerhub_infra/image_refresh.py):
in runnerhub-images, one CodeBuild project per runner image repository (privileged, its
runner-image/ source, a role that may push to that repository only) and one daily schedule that
starts every project and the executor AMI pipeline; in each stage, the refresh function
(chalicelib/image_refresh.py) behind its `live` alias, invoked by ECR's completed scans of that
stage's repositories, with a role limited to the handler's calls. The build script itself runs
here against stand-ins of curl, aws and docker; the Dockerfile's ARG/ENV against real Docker."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import aws_cdk as cdk
import pytest
import yaml
from runnerhub_infra.data import AUDIT_IMMUTABLE_ACTIONS
from runnerhub_infra.image_refresh import (
    BUILD_SCRIPT,
    DEFAULT_DOCKERFILE,
    EVENTBRIDGE_MAX_TARGETS,
    REFRESH_SCHEDULE,
    RELEASES_URL,
    RUNNER_IMAGE_DIR,
    RunnerImageBuilds,
    dockerfile_for,
)
from runnerhub_infra.pool_checks import image_repositories
from runnerhub_infra.stages import LIVE_ALIAS, REPO_ROOT

from chalicelib import image_refresh, resources
from chalicelib.image_refresh import SEVERITIES
from tests.conftest import require
from tests.infra.cfn import as_list, refers_to, role_statements
from tests.infra.cfn import resources as of_type

# Written here, not imported: what a build may do to ECR (push, and look its tag up).
PUSH = {"ecr:BatchCheckLayerAvailability", "ecr:CompleteLayerUpload", "ecr:DescribeImages",
        "ecr:InitiateLayerUpload", "ecr:PutImage", "ecr:UploadLayerPart"}


# --- runnerhub-images: the builds and the schedule ---


def _repositories(images: dict) -> dict[str, str]:
    """Repository name -> logical id."""
    return {r["Properties"]["RepositoryName"]: logical_id
            for logical_id, r in of_type(images, "AWS::ECR::Repository").items()}


def _projects(images: dict) -> dict[str, tuple[str, dict]]:
    """Repository name -> (logical id, properties) of its build."""
    found = {}
    for logical_id, project in of_type(images, "AWS::CodeBuild::Project").items():
        props = project["Properties"]
        env = {v["Name"]: v["Value"] for v in props["Environment"]["EnvironmentVariables"]}
        found[env["REPOSITORY_NAME"]] = (logical_id, props)
    return found


def test_one_privileged_build_per_repository_of_runner_image(synthesized):
    images = synthesized.images
    repositories = _repositories(images)
    projects = _projects(images)
    assert sorted(projects) == sorted(repositories) and projects
    (pipeline_id,) = of_type(images, "AWS::ImageBuilder::ImagePipeline")
    for name, (_, props) in projects.items():
        environment = props["Environment"]
        # `docker build` needs the daemon: privileged mode, CodeBuild's standard image.
        assert environment["PrivilegedMode"] is True
        assert environment["Image"].startswith("aws/codebuild/standard:")
        env = {v["Name"]: v["Value"] for v in environment["EnvironmentVariables"]}
        assert refers_to(env["REPOSITORY_URI"], repositories[name])
        assert (RUNNER_IMAGE_DIR / env["DOCKERFILE"]).is_file()
        assert env["RELEASES_URL"] == RELEASES_URL
        assert props["ConcurrentBuildLimit"] == 1
        # The source: the S3 asset of runner-image/ (the Dockerfile's build context).
        assert props["Source"]["Type"] == "S3"
        spec = yaml.safe_load(props["Source"]["BuildSpec"])
        assert spec["env"]["shell"] == "bash"
        assert spec["phases"]["build"]["commands"] == [BUILD_SCRIPT]
        # Its own log group, with a retention.
        group = props["LogsConfig"]["CloudWatchLogs"]["GroupName"]["Ref"]
        assert images["Resources"][group]["Properties"]["RetentionInDays"] > 0
    sources = {json.dumps(p["Source"]["Location"]) for _, p in projects.values()}
    assert len(sources) == 1
    assert pipeline_id


def test_a_build_may_push_to_its_own_repository_only(synthesized):
    images = synthesized.images
    repositories = _repositories(images)
    for name, (_, props) in _projects(images).items():
        role_id = props["ServiceRole"]["Fn::GetAtt"][0]
        statements = list(role_statements(images, role_id))
        # Inline only: CDK's grants (default log group, report groups, the whole asset
        # bucket) were kept off.
        assert not [p for p in of_type(images, "AWS::IAM::Policy").values()
                    if any(refers_to(r, role_id) for r in p["Properties"]["Roles"])]
        by_action = {a: s for s in statements for a in as_list(s["Action"])}
        assert set(by_action) == PUSH | {
            "ecr:GetAuthorizationToken", "logs:CreateLogStream", "logs:PutLogEvents",
            "s3:GetObject", "s3:GetObjectVersion", "s3:GetBucketAcl", "s3:GetBucketLocation"}
        assert by_action["ecr:GetAuthorizationToken"]["Resource"] == "*"
        for action in PUSH:
            (arn,) = as_list(by_action[action]["Resource"])
            assert json.dumps(arn).endswith(f':repository/{name}"]]}}'), (name, arn)
        others = [other for other in repositories if other != name]
        assert not any(f"repository/{other}\"" in json.dumps(statements) for other in others)
        group = props["LogsConfig"]["CloudWatchLogs"]["GroupName"]["Ref"]
        assert by_action["logs:PutLogEvents"]["Resource"] == {"Fn::GetAtt": [group, "Arn"]}
        assert all(s.get("Effect", "Allow") == "Allow" for s in statements)


def test_one_daily_schedule_starts_every_build_and_the_ami_pipeline(synthesized):
    images = synthesized.images
    projects = {logical_id for logical_id, _ in _projects(images).values()}
    (pipeline_id,) = of_type(images, "AWS::ImageBuilder::ImagePipeline")
    rules = [r["Properties"] for r in of_type(images, "AWS::Events::Rule").values()]
    assert rules and all(r["ScheduleExpression"] == REFRESH_SCHEDULE for r in rules)
    assert all(len(r["Targets"]) <= EVENTBRIDGE_MAX_TARGETS for r in rules)
    started = [t for r in rules for t in r["Targets"]]
    assert {t["Arn"]["Fn::GetAtt"][0] for t in started} == projects | {pipeline_id}
    assert len(started) == len(projects) + 1
    roles = {t["RoleArn"]["Fn::GetAtt"][0] for t in started}
    (role_id,) = roles
    statements = list(role_statements(images, role_id))
    granted = {a: s["Resource"] for s in statements for a in as_list(s["Action"])}
    assert set(granted) == {"codebuild:StartBuild", "imagebuilder:StartImagePipelineExecution"}
    assert {r["Fn::GetAtt"][0] for r in as_list(granted["codebuild:StartBuild"])} == projects
    assert granted["imagebuilder:StartImagePipelineExecution"] == {
        "Fn::GetAtt": [pipeline_id, "Arn"]}
    trust = images["Resources"][role_id]["Properties"]["AssumeRolePolicyDocument"]
    assert trust["Statement"][0]["Principal"] == {"Service": "events.amazonaws.com"}


def test_more_repositories_than_a_rule_takes_share_the_schedule_over_rules():
    """Edge case: EventBridge's 5 targets per rule. Seven repositories and the pipeline: two
    rules at the same time, every target once."""
    app = cdk.App()
    stack = cdk.Stack(app, "images", env=cdk.Environment(account="123456789012",
                                                          region="us-east-1"))
    repositories = {f"runnerhub/r{n}": cdk.aws_ecr.Repository(stack, f"r{n}",
                                                              repository_name=f"runnerhub/r{n}")
                    for n in range(7)}
    pipeline = "arn:aws:imagebuilder:us-east-1:123456789012:image-pipeline/runnerhub-executor"
    RunnerImageBuilds(stack, "Builds", repositories=repositories, pipeline_arn=pipeline)
    template = cdk.assertions.Template.from_stack(stack).to_json()
    rules = [r["Properties"] for r in of_type(template, "AWS::Events::Rule").values()]
    assert [len(r["Targets"]) for r in rules] == [5, 3]
    assert {r["ScheduleExpression"] for r in rules} == {REFRESH_SCHEDULE}
    arns = [json.dumps(t["Arn"]) for r in rules for t in r["Targets"]]
    assert len(set(arns)) == 8 and json.dumps(pipeline) in arns
    with pytest.raises(ValueError, match="no runner image repositories"):
        RunnerImageBuilds(stack, "None", repositories={}, pipeline_arn=pipeline)


def test_a_repository_builds_its_own_dockerfile_when_it_has_one(tmp_path):
    (tmp_path / DEFAULT_DOCKERFILE).write_text("FROM scratch\n")
    (tmp_path / "Dockerfile.runner-gpu").write_text("FROM scratch\n")
    assert dockerfile_for("runnerhub/runner-gpu", tmp_path) == "Dockerfile.runner-gpu"
    assert dockerfile_for("runnerhub/runner-linux-small", tmp_path) == DEFAULT_DOCKERFILE


# --- the build script, run ---

FAKE = """#!/bin/bash
# Records its arguments, then answers as its scenario says.
printf '%s %s\\n' "$(basename "$0")" "$*" >> "$CALLS"
case "$(basename "$0") $1 ${2:-}" in
  "curl "*) [ -n "${GITHUB_FAILS:-}" ] && exit 22; printf '%s' "$GITHUB_ANSWER" ;;
  "aws ecr describe-images") [ -n "${ECR_ANSWER:-}" ] || exit 0
     echo "$ECR_ANSWER" >&2; exit 254 ;;
  "aws ecr get-login-password") echo token ;;
  "docker login"*) cat > /dev/null ;;
esac
"""
URI = "123456789012.dkr.ecr.us-east-1.amazonaws.com/runnerhub/runner-linux-small"


def run_build(tmp_path: Path, **scenario: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    require(shutil.which("bash") is not None and shutil.which("python3") is not None,
            "bash and python3 (the build's shell and its JSON reader)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("curl", "aws", "docker"):
        (bin_dir / name).write_text(FAKE)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"
    calls.write_text("")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls),
           "REPOSITORY_NAME": "runnerhub/runner-linux-small", "REPOSITORY_URI": URI,
           "DOCKERFILE": DEFAULT_DOCKERFILE, "RELEASES_URL": RELEASES_URL, **scenario}
    done = subprocess.run(["bash", "-c", BUILD_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=30, cwd=tmp_path)
    return done, calls.read_text().splitlines()


NOT_FOUND = ("An error occurred (ImageNotFoundException) when calling the DescribeImages "
             "operation: The image with imageId {imageTag:'2.330.0'} does not exist")


def test_build_of_a_new_release_builds_with_its_version_and_pushes_its_tag(tmp_path):
    done, calls = run_build(tmp_path, GITHUB_ANSWER='{"tag_name": "v2.330.0"}',
                            ECR_ANSWER=NOT_FOUND)
    assert done.returncode == 0, done.stderr
    assert calls[1] == ("aws ecr describe-images --repository-name runnerhub/runner-linux-small"
                        " --image-ids imageTag=2.330.0")
    assert f"docker login --username AWS --password-stdin {URI.split('/')[0]}" in calls
    assert (f"docker build --pull --build-arg RUNNER_VERSION=2.330.0 -f {DEFAULT_DOCKERFILE}"
            f" -t {URI}:2.330.0 .") in calls
    assert calls[-1] == f"docker push {URI}:2.330.0"


def test_build_of_a_release_already_pushed_builds_nothing(tmp_path):
    done, calls = run_build(tmp_path, GITHUB_ANSWER='{"tag_name": "v2.330.0"}')
    assert done.returncode == 0, done.stderr
    assert "exists (tags are immutable): nothing to build" in done.stdout
    assert not [c for c in calls if c.startswith("docker")]


@pytest.mark.parametrize("answer", ['{"tag_name": "latest"}', '{"message": "Not Found"}',
                                    "<html>rate limited</html>", '{"tag_name": "v2.330"}'])
def test_build_refuses_an_answer_without_a_runner_version(tmp_path, answer):
    done, calls = run_build(tmp_path, GITHUB_ANSWER=answer)
    assert done.returncode == 1
    assert "no runner version in the answer of" in done.stderr
    assert [c.split()[0] for c in calls] == ["curl"]


def test_build_stops_when_github_is_unreachable(tmp_path):
    done, calls = run_build(tmp_path, GITHUB_FAILS="1")
    assert done.returncode != 0
    assert [c.split()[0] for c in calls] == ["curl"]


def test_build_stops_when_ecr_cannot_say_whether_the_tag_exists(tmp_path):
    """Edge case: an ECR error that is not "not found" (a missing grant) must not build."""
    done, calls = run_build(tmp_path, GITHUB_ANSWER='{"tag_name": "v2.330.0"}',
                            ECR_ANSWER="An error occurred (AccessDeniedException)")
    assert done.returncode == 1
    assert "cannot tell whether runnerhub/runner-linux-small:2.330.0 exists" in done.stderr
    assert not [c for c in calls if c.startswith("docker")]


def test_build_script_passes_shellcheck(tmp_path):
    require(shutil.which("shellcheck") is not None, "shellcheck (Debian)")
    script = tmp_path / "build.sh"
    script.write_text(BUILD_SCRIPT)
    done = subprocess.run(["shellcheck", "-s", "bash", str(script)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout


def test_the_production_dockerfile_keeps_the_version_in_the_image(tmp_path):
    """The ARG given to the build reaches the image's environment (RUNNER_VERSION, which a
    runner reports): built for real from the Dockerfile's own lines up to its ENV, from a local
    base (the real base is on ghcr.io)."""
    require(shutil.which("docker") is not None, "docker")
    base = "runnerhub/runner-base:local"
    found = subprocess.run(["docker", "image", "inspect", base], capture_output=True,
                           timeout=30)
    require(found.returncode == 0, f"{base} (scripts/build-runner-images.sh)")
    lines = (RUNNER_IMAGE_DIR / DEFAULT_DOCKERFILE).read_text().splitlines()
    end = next(n for n, line in enumerate(lines) if line.startswith("ENV RUNNER_VERSION"))
    head = [f"FROM {base}" if line.startswith("FROM ") else line for line in lines[:end + 1]]
    (tmp_path / "Dockerfile").write_text("\n".join(head) + "\n")
    tag = f"runnerhub/test-runner-version:{uuid.uuid4().hex[:12]}"
    try:
        built = subprocess.run(
            ["docker", "build", "-q", "--build-arg", "RUNNER_VERSION=2.330.0", "-t", tag,
             str(tmp_path)], capture_output=True, text=True, timeout=120,
            env={**os.environ, "DOCKER_BUILDKIT": "0"})
        assert built.returncode == 0, built.stderr
        env = subprocess.run(["docker", "image", "inspect", "-f", "{{json .Config.Env}}", tag],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        assert "RUNNER_VERSION=2.330.0" in json.loads(env)
    finally:
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True, timeout=60)


# --- each stage: the refresh function ---


def _function(template: dict, stage) -> tuple[str, dict]:
    (found,) = [(logical_id, f["Properties"])
                for logical_id, f in of_type(template, "AWS::Lambda::Function").items()
                if f["Properties"].get("FunctionName") == f"{stage.prefix}image-refresh"]
    return found


def _table_id(template: dict, spec: resources.TableSpec) -> str:
    (found,) = [logical_id for logical_id, t in of_type(template, "AWS::DynamoDB::Table").items()
                if t["Properties"]["TableName"].endswith(
                    spec.default_name.removeprefix("runnerhub-"))]
    return found


def test_the_refresh_function_runs_the_handler_from_the_api_package(template, stage):
    _, props = _function(template, stage)
    module, _, name = props["Handler"].rpartition(".")
    assert module == "chalicelib.image_refresh" and callable(getattr(image_refresh, name))
    # The management API's code asset (the Chalice package: chalicelib/ and the requirements).
    (api,) = [f["Properties"] for f in of_type(template, "AWS::Lambda::Function").values()
              if f["Properties"].get("FunctionName") == f"{stage.prefix}api"]
    assert props["Code"] == api["Code"]
    env = props["Environment"]["Variables"]
    assert refers_to(env["RUNNERHUB_RUNNERS_TABLE"], _table_id(template, resources.RUNNERS_TABLE))
    assert refers_to(env["RUNNERHUB_AUDIT_TABLE"], _table_id(template, resources.AUDIT_TABLE))
    pools_file = env["RUNNERHUB_POOLS_FILE"].removeprefix("/var/task/")
    assert (REPO_ROOT / pools_file).resolve() == stage.pools_file
    assert env["RUNNERHUB_IMAGE_MAX_SEVERITY"] in SEVERITIES
    # Every variable the handler reads is set.
    read = set(re.findall(r"RUNNERHUB_[A-Z_]+", inspect.getsource(image_refresh.lambda_handler)))
    assert read and read <= set(env)


def test_the_refresh_role_allows_the_handlers_calls_only(template, stage, pools):
    _, props = _function(template, stage)
    role_id = props["Role"]["Fn::GetAtt"][0]
    statements = list(role_statements(template, role_id))
    runners = _table_id(template, resources.RUNNERS_TABLE)
    audit = _table_id(template, resources.AUDIT_TABLE)
    allowed = [s for s in statements if s.get("Effect", "Allow") == "Allow"]
    by_resource = {}
    for statement in allowed:
        by_resource.setdefault(json.dumps(statement["Resource"]), set()).update(
            as_list(statement["Action"]))
    (dynamo_runners,) = [s for s in allowed if refers_to(s["Resource"], runners)]
    # Proposal and overrides items only: never a job's runner record.
    assert set(as_list(dynamo_runners["Action"])) == {
        "dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"}
    assert dynamo_runners["Condition"] == {"ForAllValues:StringLike": {
        "dynamodb:LeadingKeys": ["proposal#*", "overrides#*"]}}
    (dynamo_audit,) = [s for s in allowed if refers_to(s["Resource"], audit)]
    assert as_list(dynamo_audit["Action"]) == ["dynamodb:PutItem"]
    (deny,) = [s for s in statements if s.get("Effect") == "Deny"]
    assert set(as_list(deny["Action"])) == set(AUDIT_IMMUTABLE_ACTIONS)
    (ecr,) = [s for s in allowed if any(a.startswith("ecr:") for a in as_list(s["Action"]))]
    assert as_list(ecr["Action"]) == ["ecr:DescribeImages"]
    text = json.dumps(ecr["Resource"])
    assert len(as_list(ecr["Resource"])) == len(image_repositories(pools))
    assert all(f":repository/{name}\"" in text for name in image_repositories(pools))
    (log,) = [s for s in allowed if any(a.startswith("logs:") for a in as_list(s["Action"]))]
    group = log["Resource"]["Fn::GetAtt"][0]
    assert template["Resources"][group]["Properties"]["LogGroupName"] == (
        f"/aws/lambda/{stage.prefix}image-refresh")
    assert template["Resources"][group]["Properties"]["RetentionInDays"] == (
        stage.log_retention_days)
    assert len(allowed) == 4


def test_completed_scans_of_the_stages_repositories_invoke_the_live_alias(template, stage,
                                                                           pools):
    function_id, _ = _function(template, stage)
    (alias_id,) = [logical_id for logical_id, a in of_type(template, "AWS::Lambda::Alias").items()
                   if a["Properties"]["FunctionName"] == {"Ref": function_id}]
    assert template["Resources"][alias_id]["Properties"]["Name"] == LIVE_ALIAS
    rules = [r["Properties"] for r in of_type(template, "AWS::Events::Rule").values()
             if any(refers_to(t["Arn"], alias_id) for t in r["Properties"]["Targets"])]
    (rule,) = rules
    assert rule["EventPattern"] == {
        "source": ["aws.ecr"], "detail-type": ["ECR Image Scan"],
        "detail": {"scan-status": ["COMPLETE"],
                   "repository-name": sorted(image_repositories(pools))}}
    (permission,) = [p["Properties"] for p in of_type(template, "AWS::Lambda::Permission").values()
                     if p["Properties"]["FunctionName"] == {"Ref": alias_id}]
    assert permission["Principal"] == "events.amazonaws.com"


def test_the_scan_event_the_rule_matches_is_one_the_handler_reads():
    """The rule's fields (detail-type, scan-status, repository-name) are the ones the handler
    parses: AWS's sample event, as the rule would pass it."""
    event = {"version": "0", "id": "85fc3613-e913-7fc4-a80c-a3753e4aa9ae",
             "detail-type": "ECR Image Scan", "source": "aws.ecr", "account": "123456789012",
             "time": "2019-10-29T02:36:48Z", "region": "us-east-1", "resources": [
                 "arn:aws:ecr:us-east-1:123456789012:repository/runnerhub/runner-linux-small"],
             "detail": {"scan-status": "COMPLETE",
                        "repository-name": "runnerhub/runner-linux-small",
                        "finding-severity-counts": {"CRITICAL": 10, "MEDIUM": 9},
                        "image-digest": "sha256:" + "7" * 64, "image-tags": ["2.330.0"]}}
    registry, repository, digest, scan, account = image_refresh.scan_of_event(event)
    assert digest == "sha256:" + "7" * 64
    assert (registry, repository, account) == (
        "123456789012.dkr.ecr.us-east-1.amazonaws.com", "runnerhub/runner-linux-small",
        "123456789012")
    assert scan.status == "COMPLETE" and scan.worst() == "CRITICAL"


def test_approving_a_proposal_may_delete_proposal_items_only(template, stage):
    """The management API removes the approved proposal (chalicelib/api/actions.py): a delete
    on the runners table, of `proposal#` items alone, never a runner or an overrides item."""
    (api,) = [f["Properties"] for f in of_type(template, "AWS::Lambda::Function").values()
              if f["Properties"].get("FunctionName") == f"{stage.prefix}api"]
    statements = list(role_statements(template, api["Role"]["Fn::GetAtt"][0]))
    (delete,) = [s for s in statements if "dynamodb:DeleteItem" in as_list(s["Action"])
                 and s.get("Effect", "Allow") == "Allow"]
    assert as_list(delete["Action"]) == ["dynamodb:DeleteItem"]
    assert refers_to(delete["Resource"], _table_id(template, resources.RUNNERS_TABLE))
    assert delete["Condition"] == {"ForAllValues:StringLike": {
        "dynamodb:LeadingKeys": ["proposal#*"]}}
