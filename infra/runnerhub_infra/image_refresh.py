"""Runner images that stay current (issue 19): the daily rebuild in the images stack, and each
stage's image refresh function that turns a scanned push into a proposal (docs/runner-images.md,
"The image refresh pipeline").

- `RunnerImageBuilds` (runnerhub-images): one CodeBuild project per runner image repository.
  A build (BUILD_SCRIPT, inline in its buildspec) asks GitHub for the newest `actions/runner`
  release, stops when the repository already has that version's tag (tags are immutable: the
  image of that release was built and scanned before), else builds runner-image/ with
  `--build-arg RUNNER_VERSION=<version>` and pushes `:<version>`; ECR scans it on push. Its
  source is an S3 asset of runner-image/; its role may push to its own repository and write its
  own log group, nothing else. One daily EventBridge schedule (REFRESH_SCHEDULE) starts every
  project and the executor AMI pipeline (an Image Builder pipeline is an EventBridge target;
  CDK has no class for it, so `ImagePipelineTarget` binds it with the schedule's role).
- `ImageRefreshFunction` (runnerhub-<stage>): chalicelib/image_refresh.py's `lambda_handler`
  from the management API's code asset, its own role (exactly the calls the handler makes,
  tests/infra/test_iam_calls.py) and log group; an EventBridge rule on ECR's "ECR Image Scan"
  events (scan COMPLETE, this stage's pools' repositories) invokes its `live` alias, which
  CodeDeploy moves like every other function's (rollouts.py). Its alarm is in monitoring.py.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import aws_cdk as cdk
import jsii
from aws_cdk import aws_codebuild as codebuild
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3_assets as s3_assets
from constructs import Construct

from chalicelib import resources
from chalicelib.image_refresh import DEFAULT_MAX_SEVERITY, PROPOSAL_PREFIX
from runnerhub_infra.data import AUDIT_IMMUTABLE_ACTIONS, Data
from runnerhub_infra.ecr import repository_arn
from runnerhub_infra.stages import LIVE_ALIAS, REPO_ROOT, StageSettings, removal_policy
from runnerhub_infra.trainer import LAMBDA_ROOT, RETENTION

RUNNER_IMAGE_DIR = REPO_ROOT / "runner-image"
# The production runner image (GitHub's runner plus RunnerHub's entry point). A repository
# whose image needs more (CUDA for a GPU pool) gets runner-image/Dockerfile.<repository's last
# path part>, e.g. Dockerfile.runner-gpu, when that file exists.
DEFAULT_DOCKERFILE = "Dockerfile.actions-runner"
# Daily at 04:00 UTC: actions/runner releases land during the US working day; the AMI build
# (about half an hour) and the scans are done before Europe's morning.
REFRESH_SCHEDULE = "cron(0 4 * * ? *)"
RELEASES_URL = "https://api.github.com/repos/actions/runner/releases/latest"
# EventBridge takes at most 5 targets per rule ("Event bus targets": "You can define up to
# five targets for each rule"): more repositories share the schedule over several rules.
EVENTBRIDGE_MAX_TARGETS = 5
# CodeBuild's standard Linux image (Ubuntu, Docker, the AWS CLI, python3, curl); privileged:
# `docker build` needs the daemon.
BUILD_IMAGE = codebuild.LinuxBuildImage.STANDARD_7_0
BUILD_TIMEOUT = cdk.Duration.minutes(60)
BUILD_LOG_RETENTION = logs.RetentionDays.THREE_MONTHS
# What `docker push` calls (the registry's token has no resource) and the skip check
# (DescribeImages of the version's tag), on the build's own repository.
ECR_PUSH_ACTIONS = [
    "ecr:BatchCheckLayerAvailability",
    "ecr:CompleteLayerUpload",
    "ecr:DescribeImages",
    "ecr:InitiateLayerUpload",
    "ecr:PutImage",
    "ecr:UploadLayerPart",
]
# CodeBuild reads an S3 source with these (the CodeBuild guide's service role policy).
SOURCE_OBJECT_ACTIONS = ["s3:GetObject", "s3:GetObjectVersion"]
SOURCE_BUCKET_ACTIONS = ["s3:GetBucketAcl", "s3:GetBucketLocation"]

# One build: bash, `set -euo pipefail`. Inputs (environment): REPOSITORY_NAME, REPOSITORY_URI,
# DOCKERFILE, RELEASES_URL. Exit 0 without building when the version's tag exists; a clear
# one-line error (exit 1) when GitHub's answer has no version or ECR cannot be asked.
BUILD_SCRIPT = textwrap.dedent(r"""
    set -euo pipefail
    say() { echo "runner image refresh: $*"; }
    answer=$(curl -fsSL --retry 3 --max-time 30 \
      -H 'Accept: application/vnd.github+json' "$RELEASES_URL")
    read_tag='import json, sys; print(json.load(sys.stdin).get("tag_name") or "")'
    version=$(printf '%s' "$answer" | python3 -c "$read_tag" 2>/dev/null || true)
    version=${version#v}
    if ! [[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
      say "no runner version in the answer of $RELEASES_URL (tag_name '$version')" >&2
      exit 1
    fi
    image="$REPOSITORY_URI:$version"
    if found=$(aws ecr describe-images --repository-name "$REPOSITORY_NAME" \
        --image-ids "imageTag=$version" 2>&1); then
      say "$REPOSITORY_NAME:$version exists (tags are immutable): nothing to build"
      exit 0
    elif [[ $found != *ImageNotFoundException* ]]; then
      say "cannot tell whether $REPOSITORY_NAME:$version exists: $found" >&2
      exit 1
    fi
    say "building $image from $DOCKERFILE"
    aws ecr get-login-password \
      | docker login --username AWS --password-stdin "${REPOSITORY_URI%%/*}"
    docker build --pull --build-arg "RUNNER_VERSION=$version" -f "$DOCKERFILE" -t "$image" .
    docker push "$image"
    say "pushed $image (ECR scans it on push)"
    """).strip() + "\n"

# The refresh function.
REFRESH_FUNCTION = "image-refresh"  # runnerhub-<stage>-image-refresh, role of the same name
REFRESH_HANDLER = "chalicelib.image_refresh.lambda_handler"
REFRESH_TIMEOUT_S = 60  # a few DynamoDB and ECR calls per pool of the repository
REFRESH_MEMORY_MB = 256
# Exactly the calls the handler makes (chalicelib/image_refresh.py; recorded under the label
# image_refresh by tests/functional/test_image_refresh_http.py): on the runners table, a pool's
# overrides item (read; written when it applies) and its proposal item (read, put), and
# nothing else of that table; the audit log, new records only.
REFRESH_RUNNERS_ACTIONS = ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"]
REFRESH_RUNNERS_ITEMS = (f"{PROPOSAL_PREFIX}*", f"{resources.OVERRIDES_PREFIX}*")
REFRESH_AUDIT_ACTIONS = ["dynamodb:PutItem"]
# The image's tags (its runner version), by digest.
REFRESH_ECR_ACTIONS = ["ecr:DescribeImages"]
SCAN_DETAIL_TYPE = "ECR Image Scan"


def dockerfile_for(repository: str, image_dir: Path = RUNNER_IMAGE_DIR) -> str:
    """The Dockerfile a repository's image is built from (relative to runner-image/)."""
    own = f"Dockerfile.{repository.rsplit('/', 1)[-1]}"
    return own if (image_dir / own).is_file() else DEFAULT_DOCKERFILE


def buildspec() -> dict:
    return {
        "version": "0.2",
        "env": {"shell": "bash"},
        "phases": {"build": {"commands": [BUILD_SCRIPT]}},
    }


@jsii.implements(events.IRuleTarget)
class ImagePipelineTarget:
    """An EC2 Image Builder pipeline as an EventBridge target: EventBridge starts an execution
    of it (StartImagePipelineExecution) as `role`."""

    def __init__(self, pipeline_arn: str, role: iam.IRole) -> None:
        self._arn = pipeline_arn
        self._role = role

    def bind(self, _rule: events.IRule, _id: str | None = None) -> events.RuleTargetConfig:
        return events.RuleTargetConfig(arn=self._arn, role=self._role)


class RunnerImageBuilds(Construct):
    def __init__(self, scope: Construct, id: str, *, repositories: dict[str, ecr.IRepository],
                 pipeline_arn: str,
                 image_dir: Path = RUNNER_IMAGE_DIR) -> None:
        """`repositories`: name -> ecr.Repository (ecr.RunnerRepositories.repositories);
        `pipeline_arn`: the executor AMI pipeline's."""
        super().__init__(scope, id)
        if not repositories:
            raise ValueError("no runner image repositories to rebuild")
        self.source = s3_assets.Asset(self, "Source", path=str(image_dir))
        self.projects: dict[str, codebuild.Project] = {}
        self.roles: dict[str, iam.Role] = {}
        for name, repository in sorted(repositories.items()):
            self._project(name, repository, image_dir)
        # The schedule's role: start these builds and that pipeline, nothing else. Roles here
        # go unnamed: IAM names are account-wide and this stack is per account and region.
        self.schedule_role = iam.Role(
            self, "ScheduleRole",
            description="RunnerHub: the daily schedule starting the runner image builds and "
                        "the executor AMI pipeline",
            assumed_by=iam.ServicePrincipal("events.amazonaws.com"),
            inline_policies={"start": iam.PolicyDocument(statements=[
                iam.PolicyStatement(actions=["codebuild:StartBuild"], resources=[
                    project.project_arn for _, project in sorted(self.projects.items())]),
                iam.PolicyStatement(actions=["imagebuilder:StartImagePipelineExecution"],
                                    resources=[pipeline_arn]),
            ])},
        ).without_policy_updates()  # CDK's targets would add StartBuild again, per project
        every = [targets.CodeBuildProject(project, event_role=self.schedule_role,
                                          retry_attempts=2)
                 for _, project in sorted(self.projects.items())]
        every.append(ImagePipelineTarget(pipeline_arn, self.schedule_role))
        self.rules: list[events.Rule] = []
        for start in range(0, len(every), EVENTBRIDGE_MAX_TARGETS):
            number = start // EVENTBRIDGE_MAX_TARGETS
            self.rules.append(events.Rule(
                self, "Daily" if number == 0 else f"Daily{number + 1}",
                description="RunnerHub: rebuild the runner images on the newest actions/runner "
                            "release, and the executor AMI",
                schedule=events.Schedule.expression(REFRESH_SCHEDULE),
                targets=every[start:start + EVENTBRIDGE_MAX_TARGETS],
            ))

    def _project(self, name: str, repository: ecr.IRepository, image_dir: Path) -> None:
        stack = cdk.Stack.of(self)
        # runnerhub/runner-gpu -> runnerhub-runner-gpu (CodeBuild names take no / or .).
        slug = re.sub(r"[^A-Za-z0-9_-]", "-", name)
        project_name = slug if slug.startswith("runnerhub-") else f"runnerhub-{slug}"
        log_group = logs.LogGroup(
            self, f"{slug}-logs", log_group_name=f"/aws/codebuild/{project_name}",
            retention=BUILD_LOG_RETENTION, removal_policy=cdk.RemovalPolicy.DESTROY)
        role = iam.Role(
            self, f"{slug}-role",
            description=f"RunnerHub: the build of {name} (push to that repository only)",
            assumed_by=iam.ServicePrincipal("codebuild.amazonaws.com"),
            inline_policies={"build": iam.PolicyDocument(statements=[
                iam.PolicyStatement(actions=["logs:CreateLogStream", "logs:PutLogEvents"],
                                    resources=[log_group.log_group_arn]),
                iam.PolicyStatement(actions=SOURCE_OBJECT_ACTIONS, resources=[
                    self.source.bucket.arn_for_objects(self.source.s3_object_key)]),
                iam.PolicyStatement(actions=SOURCE_BUCKET_ACTIONS,
                                    resources=[self.source.bucket.bucket_arn]),
                iam.PolicyStatement(actions=["ecr:GetAuthorizationToken"], resources=["*"]),
                iam.PolicyStatement(actions=ECR_PUSH_ACTIONS,
                                    resources=[repository_arn(stack, name)]),
            ])},
        )
        self.roles[name] = role
        self.projects[name] = codebuild.Project(
            self, f"{slug}-build",
            project_name=project_name,
            description=f"RunnerHub: {name} on the newest actions/runner release",
            source=codebuild.Source.s3(bucket=self.source.bucket,
                                       path=self.source.s3_object_key),
            build_spec=codebuild.BuildSpec.from_object_to_yaml(buildspec()),
            environment=codebuild.BuildEnvironment(
                build_image=BUILD_IMAGE, compute_type=codebuild.ComputeType.SMALL,
                privileged=True),
            environment_variables={
                key: codebuild.BuildEnvironmentVariable(value=value) for key, value in {
                    "REPOSITORY_NAME": name,
                    "REPOSITORY_URI": repository.repository_uri,
                    "DOCKERFILE": dockerfile_for(name, image_dir),
                    "RELEASES_URL": RELEASES_URL,
                }.items()},
            # Exactly the grants above: CDK's own would add the default log group and
            # report groups.
            role=role.without_policy_updates(),
            logging=codebuild.LoggingOptions(cloud_watch=codebuild.CloudWatchLoggingOptions(
                log_group=log_group)),
            timeout=BUILD_TIMEOUT,
            # One build per repository at a time: two would race for the same immutable tag.
            concurrent_build_limit=1,
        )


class ImageRefreshFunction(Construct):
    def __init__(self, scope: Construct, id: str, *, stage: StageSettings, data: Data,
                 code: Path, repository_names: list[str]) -> None:
        """`code`: the management API's zip (management_api.api_code: the Chalice package,
        chalicelib/ with it); `repository_names`: this stage's pools' ECR repositories."""
        super().__init__(scope, id)
        if not repository_names:
            raise ValueError("no runner image repositories: the pools file names no ECR image")
        stack = cdk.Stack.of(self)
        self.function_name = f"{stage.prefix}{REFRESH_FUNCTION}"
        tables = data.tables
        runners = tables[resources.RUNNERS_TABLE.logical_name]
        audit = tables[resources.AUDIT_TABLE.logical_name]
        self.log_group = logs.LogGroup(
            self, "Logs", log_group_name=f"/aws/lambda/{self.function_name}",
            retention=RETENTION[stage.log_retention_days], removal_policy=removal_policy(stage))
        self.role = iam.Role(
            self, "Role",
            role_name=stage.role_name(REFRESH_FUNCTION),
            description=f"RunnerHub {stage.name}: the image refresh function only",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            inline_policies={"function": iam.PolicyDocument(statements=[
                iam.PolicyStatement(actions=["logs:CreateLogStream", "logs:PutLogEvents"],
                                    resources=[self.log_group.log_group_arn]),
                iam.PolicyStatement(
                    actions=REFRESH_RUNNERS_ACTIONS, resources=[runners.table_arn],
                    conditions={"ForAllValues:StringLike": {
                        "dynamodb:LeadingKeys": list(REFRESH_RUNNERS_ITEMS)}}),
                iam.PolicyStatement(actions=REFRESH_AUDIT_ACTIONS, resources=[audit.table_arn]),
                # Append-only, whatever else is ever granted (as the management API's).
                iam.PolicyStatement(effect=iam.Effect.DENY, actions=AUDIT_IMMUTABLE_ACTIONS,
                                    resources=[audit.table_arn, f"{audit.table_arn}/index/*"]),
                iam.PolicyStatement(actions=REFRESH_ECR_ACTIONS, resources=[
                    repository_arn(stack, name) for name in repository_names]),
            ])},
        )
        self.function = lambda_.Function(
            self, "Function",
            function_name=self.function_name,
            description=f"RunnerHub {stage.name}: a scanned runner image becomes a proposal "
                        "(chalicelib/image_refresh.py)",
            runtime=lambda_.Runtime.PYTHON_3_11,
            architecture=lambda_.Architecture.X86_64,
            handler=REFRESH_HANDLER,
            code=lambda_.Code.from_asset(str(code)),
            role=self.role,
            timeout=cdk.Duration.seconds(REFRESH_TIMEOUT_S),
            memory_size=REFRESH_MEMORY_MB,
            log_group=self.log_group,
            environment={
                "POWERTOOLS_SERVICE_NAME": "runnerhub-image-refresh",
                "RUNNERHUB_STAGE": stage.name,
                "RUNNERHUB_RUNNERS_TABLE": runners.table_name,
                "RUNNERHUB_AUDIT_TABLE": audit.table_name,
                "RUNNERHUB_POOLS_FILE": f"{LAMBDA_ROOT}/{stage.pools_relative_path}",
                "RUNNERHUB_IMAGE_MAX_SEVERITY": DEFAULT_MAX_SEVERITY,
            },
        )
        # CDK adds a DependsOn on the role, which the function's GetAtt of it already enforces
        # (cfn-lint W3005).
        self.function.node.default_child.add_deletion_override("DependsOn")
        # Invoked through its `live` alias only (rollouts.py moves it).
        self.alias = lambda_.Alias(self, "Live", alias_name=LIVE_ALIAS,
                                   version=self.function.current_version)
        self.rule = events.Rule(
            self, "ScanComplete",
            description=f"RunnerHub {stage.name}: a runner image's scan is complete",
            event_pattern=events.EventPattern(
                source=["aws.ecr"], detail_type=[SCAN_DETAIL_TYPE],
                detail={"scan-status": ["COMPLETE"],
                        "repository-name": sorted(repository_names)}),
            targets=[targets.LambdaFunction(self.alias)],
        )
