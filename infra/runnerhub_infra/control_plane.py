"""The Chalice app (webhook API + function) through Chalice's CDK construct, one role per function.

`chalice.cdk.Chalice` runs `chalice package` (SAM) at construct time and includes the template.
Chalice would otherwise make one role shared by every function, so it is told not to manage roles
(`manage_iam_role: false`, a placeholder ARN) and each function's `Role` is overridden here with a
role made for it. A function this module does not know fails the synth: every new function (the
scaler, the reconciler, ...) must declare its own role here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import aws_cdk as cdk
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from chalice.cdk import Chalice
from constructs import Construct

from chalicelib import resources
from chalicelib.history import HISTORY_STATES
from chalicelib.jobs import DEMAND_STATES
from chalicelib.pools import load_pools
from chalicelib.scaler.store import rollout_key
from runnerhub_infra.data import Data
from runnerhub_infra.executors import group_arn
from runnerhub_infra.pool_checks import host_slots
from runnerhub_infra.secrets import Secrets
from runnerhub_infra.stages import LIVE_ALIAS, REPO_ROOT, StageSettings, removal_policy

# Never deployed: every function's Role is overridden below (a leftover fails CloudFormation).
_PLACEHOLDER_ROLE = "arn:aws:iam::000000000000:role/runnerhub-role-set-by-cdk"
# The Lambda code root is the repo root: app.py, chalicelib/ (and the pools file in it).
LAMBDA_ROOT = "/var/task"
RETENTION = {
    7: logs.RetentionDays.ONE_WEEK,
    14: logs.RetentionDays.TWO_WEEKS,
    30: logs.RetentionDays.ONE_MONTH,
    90: logs.RetentionDays.THREE_MONTHS,
    180: logs.RetentionDays.SIX_MONTHS,
    365: logs.RetentionDays.ONE_YEAR,
}
# The tables the webhook and the reconciler read (the hosts table is the executors' own).
CONTROL_PLANE_TABLES = ("jobs_table", "deliveries_table", "runners_table")
# Exactly the calls each function makes (tests/infra/test_iam_calls.py compares them with the
# calls recorded during the tests). The webhook, table by table: job moves (and a read when a
# runner's demand is handed over); the delivery's conditional put, then its status; runner
# records read and marked `busy`.
WEBHOOK_TABLE_ACTIONS = {
    "jobs_table": ["dynamodb:GetItem", "dynamodb:UpdateItem"],
    "deliveries_table": ["dynamodb:PutItem", "dynamodb:UpdateItem"],
    "runners_table": ["dynamodb:GetItem", "dynamodb:UpdateItem"],
}
# The reconciler (chalicelib/reconciler/), table by table: stuck jobs by the by_state index and
# their conditional moves; delivery statuses, its lease/cursor item and redelivery marks in the
# deliveries table; runner records (read, and `busy` when GitHub says a job started).
RECONCILER_TABLE_ACTIONS = {
    "jobs_table": ["dynamodb:GetItem", "dynamodb:UpdateItem"],
    "deliveries_table": ["dynamodb:BatchGetItem", "dynamodb:UpdateItem"],
    "runners_table": ["dynamodb:GetItem", "dynamodb:UpdateItem"],
}
RECONCILER_INDEX = ("jobs_table", "by_state")
# Runs every minute. A run starts no new action after 75 % of its lease
# (chalicelib/reconciler/service.py LEASE_MARGIN_FRACTION); an action begun just before that (a
# GitHub call, 13 s at worst) and the state save (one AWS call, 55 s at worst with its retries,
# chalicelib/aws.py) must still end before Lambda's timeout kills the run, and the lease must
# outlast the timeout so that a live run is never overtaken: 0.75 x 305 + 68 <= 300 < 305
# (tests/infra/test_reconciler_function.py recomputes it from the code's own figures).
RECONCILER_TIMEOUT_S = 300
RECONCILER_LEASE_S = 305
RECONCILER_MEMORY_MB = 256
# The scaler (chalicelib/scaler/): its calls, table by table: the hosts' heartbeat records read
# whole (one item per host) and its own moves on them (retiring, back to serving) and its
# lease item; the pool's waiting jobs by the by_state index; the jobs a stuck or down host
# still holds by the jobs' by_host index (before reaping it); a retired host's runners by the
# runners' by_host index, then recorded gone (read first: the move releases the runner's seats
# with its pool's counter); a pool's seat counter (warm runners it lacks count as demand); the
# demand history its stream batches add to (conditional adds) and each pool's forecast item
# (the floor), in the history table (chalicelib/history.py).
SCALER_TABLE_ACTIONS = {
    "hosts_table": ["dynamodb:Scan", "dynamodb:UpdateItem"],
    "runners_table": ["dynamodb:GetItem", "dynamodb:UpdateItem"],
    "history_table": ["dynamodb:GetItem", "dynamodb:UpdateItem"],
}
SCALER_INDEXES = (("jobs_table", "by_state"), ("jobs_table", "by_host"),
                  ("runners_table", "by_host"))
SCALER_TABLES = ("jobs_table", "runners_table", "hosts_table", "history_table")
SCALER_ROLLOUT_ACTIONS = ["dynamodb:GetItem", "dynamodb:PutItem"]
ROLLOUT_KEY_PREFIX = rollout_key("")
# Read-only calls IAM authorises on "*" alone (no resource-level permission exists for them).
# DescribeAutoScalingInstances: whether a refused termination's instance is still in its group.
# DescribeLaunchTemplateVersions: a rollout compares each host's launch template version with
# its group's (rollouts.py grants what setting a version back takes besides).
SCALER_DESCRIBE_ACTIONS = ["autoscaling:DescribeAutoScalingGroups",
                           "autoscaling:DescribeAutoScalingInstances", "ec2:DescribeInstances",
                           "ec2:DescribeLaunchTemplateVersions"]
# On the stage's pool groups only. UpdateAutoScalingGroup: a failed rollout sets the group's
# launch template version back (its mixed-instances policy).
SCALER_GROUP_ACTIONS = [
    "autoscaling:SetDesiredCapacity",
    "autoscaling:SetInstanceProtection",
    "autoscaling:TerminateInstanceInAutoScalingGroup",
    "autoscaling:UpdateAutoScalingGroup",
]
# Lambda's event source mapping reads the jobs table's stream with the function's role (all
# four on the stream's ARN, as the DynamoDB guide's policy for a Lambda trigger).
STREAM_READ_ACTIONS = [
    "dynamodb:DescribeStream",
    "dynamodb:GetRecords",
    "dynamodb:GetShardIterator",
    "dynamodb:ListStreams",
]
# A run is a few AWS calls per pool (one call: 24 s at worst with its retries, chalicelib/aws.py
# SCALER_PROFILE, so a hung call fails well inside the timeout); the lease
# (RUNNERHUB_SCALER_LEASE_S) outlasts the timeout, so a live run is never overtaken, and a run
# killed by the timeout holds its pool at most that long.
SCALER_TIMEOUT_S = 60
SCALER_LEASE_S = 70
SCALER_MEMORY_MB = 256
SCALER_SCHEDULE = "rate(1 minute)"
# The stream's records of a second or two are one invocation (one run per pool, however many
# jobs gained demand: the debounce); a batch that fails is split and tried twice more, and
# records older than the schedule's catch-up are dropped (the schedule covers them).
STREAM_BATCHING_WINDOW_S = 1
STREAM_BATCH_SIZE = 100
STREAM_MAX_RETRIES = 2
STREAM_MAX_RECORD_AGE_S = 120


class ControlPlane(Construct):
    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        stage: StageSettings,
        data: Data,
        secrets: Secrets,
        workdir: Path,
    ) -> None:
        super().__init__(scope, id)
        self.stage = stage
        self.data = data
        self.secrets = secrets
        self.roles: dict[str, iam.Role] = {}
        # Each role's inline policy (rollouts.py adds the scaler's launch-template grants once
        # the executors exist) and each SAM function, by short name (webhook, ...).
        self.policies: dict[str, iam.PolicyDocument] = {}
        self.sam_functions: dict[str, cdk.CfnResource] = {}
        self.chalice = self._package(workdir)
        # The SAM function's logical id (from the Chalice app) -> how to configure it.
        configurers: dict[str, Callable[[cdk.CfnResource], None]] = {
            "APIHandler": self._configure_webhook,
            "Reconcile": self._configure_reconciler,
            "Scaler": self._configure_scaler,
        }
        functions = self._functions()
        unknown = sorted(set(functions) - set(configurers))
        if unknown:
            raise ValueError(
                f"Chalice functions without a role in infra/runnerhub_infra/control_plane.py: "
                f"{', '.join(unknown)}"
            )
        for logical_id, function in functions.items():
            configurers[logical_id](function)
        self.functions = functions
        self._invoke_through_aliases(workdir, functions)
        self._throttle_api()
        cdk.CfnOutput(
            cdk.Stack.of(self),
            "WebhookUrl",
            description="Payload URL of the GitHub App's webhook",
            value=cdk.Fn.sub(
                "https://${RestAPI}.execute-api.${AWS::Region}.${AWS::URLSuffix}/api/webhook"
            ),
        )

    def _package(self, workdir: Path) -> Chalice:
        stage_config = {
            "api_gateway_stage": "api",
            "api_gateway_endpoint_type": "REGIONAL",
            "lambda_memory_size": self.stage.webhook_memory_mb,
            "lambda_timeout": self.stage.webhook_timeout_s,
            "manage_iam_role": False,
            "iam_role_arn": _PLACEHOLDER_ROLE,
            "automatic_layer": False,
            "environment_variables": {
                "RUNNERHUB_STAGE": self.stage.name,
                "POWERTOOLS_METRICS_NAMESPACE": "RunnerHub",
            },
        }
        # Each run adds chalice.out/<uuid>/ (a full package); keep only this run's.
        shutil.rmtree(workdir / "chalice.out", ignore_errors=True)
        workdir.mkdir(parents=True, exist_ok=True)
        # The construct writes `chalice.out/` into the working directory and takes the Chalice
        # stage name from its scope's path: the stack's id, runnerhub-<stage>. Every setting is
        # given here (stage_config), so .chalice/config.json's stages are never read.
        # Packaging reads the region only to name API Gateway's service principal.
        with contextlib.chdir(workdir), _environ(AWS_DEFAULT_REGION=self.stage.region):
            return Chalice(
                cdk.Stack.of(self), "Chalice", source_dir=str(REPO_ROOT), stage_config=stage_config
            )

    def _functions(self) -> dict[str, cdk.CfnResource]:
        found = {}
        for child in self.chalice.sam_template.node.children:
            if (
                cdk.CfnResource.is_cfn_resource(child)
                and child.cfn_resource_type == "AWS::Serverless::Function"
            ):
                found[child.node.id] = child
        return found

    def _function_role(
        self,
        function: cdk.CfnResource,
        short_name: str,
        service_name: str,
        statements: list[iam.PolicyStatement],
        environment: dict[str, str],
    ) -> iam.Role:
        """A named function with its own log group and a role limited to `statements`."""
        function_name = f"{self.stage.prefix}{short_name}"
        # Created here (not by Lambda on first write) so it has a retention and the role can be
        # limited to it.
        log_group = logs.LogGroup(
            self,
            f"{short_name}-logs",
            log_group_name=f"/aws/lambda/{function_name}",
            retention=RETENTION[self.stage.log_retention_days],
            removal_policy=removal_policy(self.stage),
        )
        logging = iam.PolicyStatement(
            actions=["logs:CreateLogStream", "logs:PutLogEvents"],
            resources=[log_group.log_group_arn],
        )
        policy = iam.PolicyDocument(statements=[logging, *statements])
        role = iam.Role(
            self,
            f"{short_name}-role",
            role_name=self.stage.role_name(short_name),
            description=f"RunnerHub {self.stage.name}: the {short_name} function only",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            # Inline: the policy exists before the function does (no DependsOn race).
            inline_policies={"function": policy},
        )
        function.add_property_override("Role", role.role_arn)
        function.add_property_override("FunctionName", function_name)
        variables = {
            "POWERTOOLS_SERVICE_NAME": service_name,
            **self.stage.secrets.environment(),
            **environment,
        }
        for key, value in variables.items():
            function.add_property_override(f"Environment.Variables.{key}", value)
        function.add_resource_dependency(log_group.node.default_child)
        self.roles[short_name] = role
        self.policies[short_name] = policy
        self.sam_functions[short_name] = function
        return role

    def _configure_webhook(self, function: cdk.CfnResource) -> None:
        queues = [pair.queue.queue_arn for pair in self.data.queues.values()]
        statements = [
            *(iam.PolicyStatement(actions=actions, resources=[self.data.tables[name].table_arn])
              for name, actions in WEBHOOK_TABLE_ACTIONS.items()),
            iam.PolicyStatement(actions=["sqs:SendMessage", "sqs:GetQueueUrl"], resources=queues),
            *self.secrets.read_statements(self.secrets.webhook_secret),
        ]
        environment = {
            **{
                f"RUNNERHUB_{name.upper()}": self.data.tables[name].table_name
                for name in CONTROL_PLANE_TABLES
            },
            "RUNNERHUB_QUEUE_PREFIX": self.data.queue_prefix,
            "RUNNERHUB_POOLS_FILE": f"{LAMBDA_ROOT}/{self.stage.pools_relative_path}",
            "RUNNERHUB_WEBHOOK_SECRET_ID": self.secrets.webhook_secret_name,
        }
        self._function_role(function, "webhook", "runnerhub-webhook", statements, environment)

    def _configure_reconciler(self, function: cdk.CfnResource) -> None:
        tables = self.data.tables
        statements = [
            iam.PolicyStatement(actions=actions, resources=[tables[name].table_arn])
            for name, actions in RECONCILER_TABLE_ACTIONS.items()
        ]
        table, index = RECONCILER_INDEX
        statements.append(iam.PolicyStatement(
            actions=["dynamodb:Query"], resources=[f"{tables[table].table_arn}/index/{index}"]
        ))
        # Re-demand onto the demand queues; from the DLQs, only take dead-lettered demand of
        # open jobs back (receive, then delete once re-demanded), never send to them.
        queues = [pair.queue.queue_arn for pair in self.data.queues.values()]
        statements.append(iam.PolicyStatement(
            actions=["sqs:SendMessage", "sqs:GetQueueUrl"], resources=queues
        ))
        statements.append(iam.PolicyStatement(
            actions=["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueUrl"],
            resources=[pair.dead_letter_queue.queue_arn for pair in self.data.queues.values()],
        ))
        statements += self.secrets.read_statements(self.secrets.github_app_secret)
        environment = {
            **{
                f"RUNNERHUB_{name.upper()}": self.data.tables[name].table_name
                for name in CONTROL_PLANE_TABLES
            },
            "RUNNERHUB_QUEUE_PREFIX": self.data.queue_prefix,
            "RUNNERHUB_POOLS_FILE": f"{LAMBDA_ROOT}/{self.stage.pools_relative_path}",
            "RUNNERHUB_GITHUB_APP_SECRET_ID": self.secrets.github_app_secret_name,
            "RUNNERHUB_RECONCILER_LEASE_S": str(RECONCILER_LEASE_S),
        }
        function.add_property_override("Timeout", RECONCILER_TIMEOUT_S)
        function.add_property_override("MemorySize", RECONCILER_MEMORY_MB)
        self._function_role(
            function, "reconciler", "runnerhub-reconciler", statements, environment
        )

    def _configure_scaler(self, function: cdk.CfnResource) -> None:
        tables = self.data.tables
        pools = load_pools(self.stage.pools_file)
        groups = [group_arn(self, f"{self.stage.prefix}{name}") for name in pools.names]
        jobs = tables[resources.JOBS_TABLE.logical_name]
        statements = [
            *(iam.PolicyStatement(actions=actions, resources=[tables[name].table_arn])
              for name, actions in SCALER_TABLE_ACTIONS.items()),
            iam.PolicyStatement(
                actions=["dynamodb:Query"],
                resources=[f"{tables[name].table_arn}/index/{index}"
                           for name, index in SCALER_INDEXES],
            ),
            # Its rollouts' state (chalicelib/scaler/store.py): read and written whole, under
            # the pool's lease, on its own items only.
            iam.PolicyStatement(
                actions=SCALER_ROLLOUT_ACTIONS,
                resources=[tables[resources.HOSTS_TABLE.logical_name].table_arn],
                conditions={"ForAllValues:StringLike": {
                    "dynamodb:LeadingKeys": [f"{ROLLOUT_KEY_PREFIX}*"]}}),
            iam.PolicyStatement(actions=SCALER_DESCRIBE_ACTIONS, resources=["*"]),
            iam.PolicyStatement(actions=SCALER_GROUP_ACTIONS, resources=groups),
            iam.PolicyStatement(actions=STREAM_READ_ACTIONS, resources=[jobs.table_stream_arn]),
            *self.secrets.read_statements(self.secrets.github_app_secret),
        ]
        slots = {pool.name: host_slots(pool, self.stage.host_settings(pool.name))
                 for pool in pools.pools}
        environment = {
            **{f"RUNNERHUB_{name.upper()}": tables[name].table_name for name in SCALER_TABLES},
            "RUNNERHUB_POOLS_FILE": f"{LAMBDA_ROOT}/{self.stage.pools_relative_path}",
            "RUNNERHUB_GITHUB_APP_SECRET_ID": self.secrets.github_app_secret_name,
            # A pool's group is runnerhub-<stage>-<pool> (executors.py), its slots per host
            # those of its executors (RUNNERHUB_SLOTS on its hosts), given for every pool.
            "RUNNERHUB_SCALER_GROUP_PREFIX": self.stage.prefix,
            "RUNNERHUB_SCALER_POOL_SLOTS": ",".join(
                f"{name}={count}" for name, count in slots.items()),
            "RUNNERHUB_SCALER_LEASE_S": str(SCALER_LEASE_S),
            **self.stage.forecast_cap_environment(),
        }
        function.add_property_override("Timeout", SCALER_TIMEOUT_S)
        function.add_property_override("MemorySize", SCALER_MEMORY_MB)
        # Jobs that gained demand (a run), and the states the demand history counts.
        demand = sorted({state.value for state in DEMAND_STATES} | set(HISTORY_STATES))
        function.add_property_override("Events", {
            "Schedule": {"Type": "Schedule", "Properties": {"Schedule": SCALER_SCHEDULE}},
            "JobsStream": {"Type": "DynamoDB", "Properties": {
                "Stream": jobs.table_stream_arn,
                "StartingPosition": "LATEST",
                "BatchSize": STREAM_BATCH_SIZE,
                "MaximumBatchingWindowInSeconds": STREAM_BATCHING_WINDOW_S,
                "BisectBatchOnFunctionError": True,
                "MaximumRetryAttempts": STREAM_MAX_RETRIES,
                "MaximumRecordAgeInSeconds": STREAM_MAX_RECORD_AGE_S,
                # Only jobs that gained demand or add to the history invoke the scaler (the
                # handler filters too: a completed job runs no pool).
                "FilterCriteria": {"Filters": [{"Pattern": json.dumps(
                    {"dynamodb": {"NewImage": {"state": {"S": demand}}}})}]},
            }},
        })
        self._function_role(function, "scaler", "runnerhub-scaler", statements, environment)

    def _invoke_through_aliases(self, workdir: Path,
                                functions: dict[str, cdk.CfnResource]) -> None:
        """Each function publishes a version behind its `live` alias, and every invoker calls
        the alias: CodeDeploy shifts the alias (rollouts.py), so an invoker of the function
        itself would run `$LATEST`, out of the canary and of its rollback. SAM points the
        events it makes (the schedules, the stream's mapping) at the alias itself; Chalice's
        swagger integration and its API's permission name the function, so they are
        rewritten here (tests/infra/test_rollouts.py checks every invoker in the template as
        CloudFormation expands it)."""
        for function in functions.values():
            function.add_property_override("AutoPublishAlias", LIVE_ALIAS)
            # A new version whenever any property changes (an environment variable too), not
            # only the code: the alias would otherwise keep the old configuration.
            function.add_property_override("AutoPublishAliasAllProperties", True)
        found = sorted((workdir / "chalice.out").glob("*/sam.json"))
        if len(found) != 1:
            raise FileNotFoundError(f"expected one Chalice SAM template under "
                                    f"{workdir / 'chalice.out'}, found {len(found)}")
        sam = json.loads(found[0].read_text())
        for logical_id, resource in sam["Resources"].items():
            properties = resource.get("Properties", {})
            if resource["Type"] == "AWS::Serverless::Api" and "DefinitionBody" in properties:
                paths = _to_aliases(properties["DefinitionBody"]["paths"], functions)
                self.chalice.get_resource(logical_id).add_property_override(
                    "DefinitionBody.paths", paths)
            elif resource["Type"] == "AWS::Lambda::Permission":
                self.chalice.get_resource(logical_id).add_property_override(
                    "FunctionName", _to_aliases(properties["FunctionName"], functions))

    def _throttle_api(self) -> None:
        api = self.chalice.get_resource("RestAPI")
        api.add_property_override(
            "MethodSettings",
            [
                {
                    "ResourcePath": "/*",
                    "HttpMethod": "*",
                    "ThrottlingRateLimit": self.stage.api_throttle_rate,
                    "ThrottlingBurstLimit": self.stage.api_throttle_burst,
                }
            ],
        )


def _to_aliases(value: object, functions: dict[str, cdk.CfnResource]) -> object:
    """`value` with every reference to one of `functions` (Ref, GetAtt Arn, ${X.Arn} or ${X} in
    a Sub) made a reference to its alias (SAM's `<function>.Alias`: the alias's ARN)."""
    if isinstance(value, list):
        return [_to_aliases(item, functions) for item in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"Ref"} and value["Ref"] in functions:
        return {"Ref": f"{value['Ref']}.Alias"}
    if set(value) == {"Fn::GetAtt"} and value["Fn::GetAtt"][0] in functions:
        return {"Ref": f"{value['Fn::GetAtt'][0]}.Alias"}
    if set(value) == {"Fn::Sub"} and isinstance(value["Fn::Sub"], str):
        # A variable of the Sub's own, `Ref <function>.Alias`: cfn-lint does not know SAM's
        # `${<function>.Alias}` inside the text.
        text, variables = value["Fn::Sub"], {}
        for name in functions:
            variable = f"{name}LiveAlias"
            replaced = text.replace(f"${{{name}.Arn}}", f"${{{variable}}}").replace(
                f"${{{name}}}", f"${{{variable}}}")
            if replaced != text:
                text, variables[variable] = replaced, {"Ref": f"{name}.Alias"}
        return {"Fn::Sub": [text, variables]} if variables else value
    return {key: _to_aliases(item, functions) for key, item in value.items()}


def _environ(**values: str):
    return mock.patch.dict(os.environ, values)
