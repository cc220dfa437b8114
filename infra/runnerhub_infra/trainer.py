"""The trainer Lambda (forecast/trainer.py): a function of its own (not in the Chalice package:
scikit-learn never rides the webhook's), its dependencies as one layer
(runnerhub_infra.trainer_package), a daily schedule, a role limited to its calls, and the
bucket its models go to. Its alarms are in monitoring.py.
"""

from __future__ import annotations

from pathlib import Path

import aws_cdk as cdk
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from constructs import Construct

from chalicelib import resources
from chalicelib.pools import load_pools
from runnerhub_infra import trainer_package
from runnerhub_infra.data import Data
from runnerhub_infra.pool_checks import host_slots
from runnerhub_infra.stages import LIVE_ALIAS, StageSettings, removal_policy

LAMBDA_ROOT = "/var/task"
# Daily, after midnight UTC: the day's last buckets are in; the forecast covers the next 24 h.
TRAINER_SCHEDULE = "cron(15 0 * * ? *)"
# A fit is seconds per pool (HistGradientBoosting, two models on five weeks of buckets); the
# timeout leaves room for dozens of pools. 2048 MB buys more than one vCPU.
TRAINER_TIMEOUT_S = 900
TRAINER_MEMORY_MB = 2048
# Exactly the calls it makes (tests/infra/test_iam_calls.py): the pools' history buckets by
# Query, the forecast items by PutItem; the models under models/ in its bucket.
TRAINER_TABLE_ACTIONS = ["dynamodb:Query", "dynamodb:PutItem"]
TRAINER_BUCKET_ACTIONS = ["s3:PutObject"]
# A model is named by the forecast item that uses it: a month of them is enough to look back.
MODEL_RETENTION_DAYS = 30
RETENTION = {7: logs.RetentionDays.ONE_WEEK, 14: logs.RetentionDays.TWO_WEEKS,
             30: logs.RetentionDays.ONE_MONTH, 90: logs.RetentionDays.THREE_MONTHS,
             180: logs.RetentionDays.SIX_MONTHS, 365: logs.RetentionDays.ONE_YEAR}


class Trainer(Construct):
    def __init__(self, scope: Construct, id: str, *, stage: StageSettings, data: Data,
                 workdir: Path) -> None:
        super().__init__(scope, id)
        removal = removal_policy(stage)
        self.function_name = f"{stage.prefix}trainer"
        self.bucket = s3.Bucket(
            self, "Models",
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            lifecycle_rules=[s3.LifecycleRule(
                prefix="models/", expiration=cdk.Duration.days(MODEL_RETENTION_DAYS))],
            removal_policy=removal,
        )
        history = data.tables[resources.HISTORY_TABLE.logical_name]
        log_group = logs.LogGroup(
            self, "Logs", log_group_name=f"/aws/lambda/{self.function_name}",
            retention=RETENTION[stage.log_retention_days], removal_policy=removal)
        self.role = iam.Role(
            self, "Role",
            role_name=stage.role_name("trainer"),
            description=f"RunnerHub {stage.name}: the trainer function only",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            inline_policies={"function": iam.PolicyDocument(statements=[
                iam.PolicyStatement(actions=["logs:CreateLogStream", "logs:PutLogEvents"],
                                    resources=[log_group.log_group_arn]),
                iam.PolicyStatement(actions=TRAINER_TABLE_ACTIONS,
                                    resources=[history.table_arn]),
                iam.PolicyStatement(actions=TRAINER_BUCKET_ACTIONS,
                                    resources=[self.bucket.arn_for_objects("models/*")]),
            ])},
        )
        self.layer = lambda_.LayerVersion(
            self, "Dependencies",
            code=lambda_.Code.from_asset(str(trainer_package.build_layer())),
            compatible_runtimes=[lambda_.Runtime.PYTHON_3_11],
            compatible_architectures=[lambda_.Architecture.X86_64],
            description="scikit-learn, numpy, scipy and what chalicelib needs (trainer only)",
        )
        code = trainer_package.build_code(workdir / "trainer-code")
        self.function = lambda_.Function(
            self, "Function",
            function_name=self.function_name,
            runtime=lambda_.Runtime.PYTHON_3_11,
            architecture=lambda_.Architecture.X86_64,
            handler="forecast.trainer.handler",
            code=lambda_.Code.from_asset(str(code)),
            layers=[self.layer],
            role=self.role,
            timeout=cdk.Duration.seconds(TRAINER_TIMEOUT_S),
            memory_size=TRAINER_MEMORY_MB,
            log_group=log_group,
            environment={
                "POWERTOOLS_SERVICE_NAME": "runnerhub-trainer",
                "RUNNERHUB_STAGE": stage.name,
                "RUNNERHUB_POOLS_FILE": f"{LAMBDA_ROOT}/{stage.pools_relative_path}",
                "RUNNERHUB_HISTORY_TABLE": history.table_name,
                "RUNNERHUB_MODELS_BUCKET": self.bucket.bucket_name,
                # Each pool's slots per host, as the scaler is given them: the floor is hosts.
                "RUNNERHUB_SCALER_POOL_SLOTS": ",".join(
                    f"{pool.name}={host_slots(pool, stage.host_settings(pool.name))}"
                    for pool in load_pools(stage.pools_file).pools),
                **stage.forecast_cap_environment(),
            },
        )
        # CDK adds a DependsOn on the role, which the function's GetAtt of it already enforces
        # (cfn-lint W3005).
        self.function.node.default_child.add_deletion_override("DependsOn")
        # Invoked through its `live` alias only: CodeDeploy moves the alias to a new version
        # (rollouts.py), so the schedule follows the rollout and its rollback.
        self.alias = lambda_.Alias(self, "Live", alias_name=LIVE_ALIAS,
                                   version=self.function.current_version)
        events.Rule(
            self, "Daily",
            description=f"RunnerHub {stage.name}: train the forecasts",
            schedule=events.Schedule.expression(TRAINER_SCHEDULE),
            # A failed run is not retried at once: the previous forecast stays, the alarm says.
            targets=[targets.LambdaFunction(self.alias, retry_attempts=0)],
        )
