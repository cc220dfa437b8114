"""The Chalice app (webhook API + function) through Chalice's CDK construct, one role per function.

`chalice.cdk.Chalice` runs `chalice package` (SAM) at construct time and includes the template.
Chalice would otherwise make one role shared by every function, so it is told not to manage roles
(`manage_iam_role: false`, a placeholder ARN) and each function's `Role` is overridden here with a
role made for it. A function this module does not know fails the synth: every new function (the
scaler, the reconciler, ...) must declare its own role here.
"""

from __future__ import annotations

import contextlib
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

from runnerhub_infra.data import Data
from runnerhub_infra.secrets import Secrets
from runnerhub_infra.stages import REPO_ROOT, StageSettings, removal_policy

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
WEBHOOK_TABLE_ACTIONS = [
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:DeleteItem",
]
# The reconciler (chalicelib/reconciler/), table by table: stuck jobs by the by_state index and
# their conditional moves; delivery statuses, its lease/cursor item and redelivery marks in the
# deliveries table; runner records (read, and `busy` when GitHub says a job started).
RECONCILER_TABLE_ACTIONS = {
    "jobs_table": ["dynamodb:GetItem", "dynamodb:UpdateItem"],
    "deliveries_table": ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:UpdateItem"],
    "runners_table": ["dynamodb:GetItem", "dynamodb:UpdateItem"],
}
RECONCILER_INDEX = ("jobs_table", "by_state")
# Runs every minute; the lease (RUNNERHUB_RECONCILER_LEASE_S, 120 s) outlasts the timeout, so a
# live run is never overtaken.
RECONCILER_TIMEOUT_S = 60
RECONCILER_MEMORY_MB = 256


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
        self.chalice = self._package(workdir)
        # The SAM function's logical id (from the Chalice app) -> how to configure it.
        configurers: dict[str, Callable[[cdk.CfnResource], None]] = {
            "APIHandler": self._configure_webhook,
            "Reconcile": self._configure_reconciler,
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
        # stage from its scope's path: the stack's id is the stage name, so scope = the stack.
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
        role = iam.Role(
            self,
            f"{short_name}-role",
            description=f"RunnerHub {self.stage.name}: the {short_name} function only",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            # Inline: the policy exists before the function does (no DependsOn race).
            inline_policies={
                "function": iam.PolicyDocument(statements=[logging, *statements]),
            },
        )
        function.add_property_override("Role", role.role_arn)
        function.add_property_override("FunctionName", function_name)
        variables = {"POWERTOOLS_SERVICE_NAME": service_name, **environment}
        for key, value in variables.items():
            function.add_property_override(f"Environment.Variables.{key}", value)
        function.add_resource_dependency(log_group.node.default_child)
        self.roles[short_name] = role
        return role

    def _configure_webhook(self, function: cdk.CfnResource) -> None:
        tables = [self.data.tables[name].table_arn for name in CONTROL_PLANE_TABLES]
        queues = [pair.queue.queue_arn for pair in self.data.queues.values()]
        statements = [
            iam.PolicyStatement(actions=WEBHOOK_TABLE_ACTIONS, resources=tables),
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
        }
        function.add_property_override("Timeout", RECONCILER_TIMEOUT_S)
        function.add_property_override("MemorySize", RECONCILER_MEMORY_MB)
        self._function_role(
            function, "reconciler", "runnerhub-reconciler", statements, environment
        )

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


def _environ(**values: str):
    return mock.patch.dict(os.environ, values)
