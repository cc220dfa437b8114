"""Safe rollouts (issue 19): every RunnerHub function reaches its new code by a CodeDeploy canary
that the stage's alarms roll back; the scaler may set an executor group's launch template back.

- Functions: each is invoked only through its `live` alias (stages.LIVE_ALIAS). The Chalice
  (SAM) functions (webhook, reconciler, scaler) publish their versions with SAM's
  `AutoPublishAlias` (control_plane.py rewires Chalice's API integration and permission to the
  alias) and deploy with SAM's `DeploymentPreference`; the CDK functions (trainer, management
  API, image refresh) have a `lambda.Alias` (trainer.py, management_api.py, image_refresh.py)
  and a `LambdaDeploymentGroup` here.
  The stage's canary (stages.LambdaCanary: CodeDeploy's own Canary10Percent5Minutes, or a
  custom configuration made here) shifts the alias; one alarm in ALARM during the shift moves
  it back (auto-rollback on a failed deployment and on an alarm).
- Rollback alarms of every deployment group: the webhook's 5xx (API Gateway), each pool's DLQ
  not empty and the reconciler failing (monitoring.py's own alarms, passed in), and the
  function's own Errors through its alias (made here: `Resource` = `<function>:live`), which a
  broken canary trips within a minute or two. These last ones notify nobody: they count every
  error through the alias, and the paging alarms (monitoring.py) already say when errors last.
- Executors: the scaler replaces hosts whose launch template version differs from their
  group's (chalicelib/scaler/) and, when a rollout fails, sets the group's version back
  (UpdateAutoScalingGroup, in control_plane.py's group grants). AWS then checks, as the caller,
  that it may launch what the template describes: RunInstances on the template, its image,
  subnets, security group and the interfaces, volumes and instance it creates, tags on them,
  and passing the pool's host role to EC2 (the Auto Scaling guide, "Launch template support":
  the permissions to use a launch template). Granted here, on this stage's executors only.
"""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_codedeploy as codedeploy
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from constructs import Construct

from runnerhub_infra.control_plane import ControlPlane
from runnerhub_infra.executors import Executors
from runnerhub_infra.image_refresh import REFRESH_FUNCTION, ImageRefreshFunction
from runnerhub_infra.management_api import ManagementApi
from runnerhub_infra.monitoring import Monitoring
from runnerhub_infra.stages import LIVE_ALIAS, StageSettings
from runnerhub_infra.trainer import Trainer

# CodeDeploy takes at most 10 alarms per deployment group (CodeDeploy quotas, "Deployment
# groups": "Maximum number of alarms that can be added to a deployment group").
CODEDEPLOY_MAX_ALARMS = 10
# Monitoring's alarms every deployment group rolls back on (besides each pool's DLQ alarm).
SHARED_ROLLBACK_ALARMS = ("WebhookErrors", "ReconcilerFailing")
# The Errors through the alias: one minute with an error is enough to roll a canary back.
ALIAS_ERRORS_PERIOD = cdk.Duration.minutes(1)
# Managed policy of a CodeDeploy role for Lambda deployments without hooks in S3 (invoke is for
# lifecycle hooks only; none here).
CODEDEPLOY_POLICY = "service-role/AWSCodeDeployRoleForLambdaLimited"
# What AWS checks when a launch template (version) is set on a group: RunInstances on these
# kinds of resource it will create, named by kind (their ids are not known before).
LAUNCH_CREATED = ("instance", "volume", "network-interface")
LAUNCH_ACTIONS = ["ec2:RunInstances"]
TAG_ACTIONS = ["ec2:CreateTags"]


class Rollouts(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        stage: StageSettings,
        control_plane: ControlPlane,
        executors: Executors,
        trainer: Trainer,
        management_api: ManagementApi,
        monitoring: Monitoring,
        image_refresh: ImageRefreshFunction | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        self.stage = stage
        self.prefix = stage.prefix
        shared = [monitoring.alarms[name] for name in SHARED_ROLLBACK_ALARMS]
        shared += [monitoring.dead_letter_alarms[pool]
                   for pool in sorted(monitoring.dead_letter_alarms)]
        if len(shared) + 1 > CODEDEPLOY_MAX_ALARMS:
            raise ValueError(
                f"{len(shared) + 1} rollback alarms per function ({len(shared) - 2} pools' DLQ "
                f"alarms among them): CodeDeploy takes at most {CODEDEPLOY_MAX_ALARMS} per "
                "deployment group (infra/runnerhub_infra/rollouts.py)")
        self.role = iam.Role(
            self, "Role",
            role_name=stage.role_name("codedeploy"),
            description=f"RunnerHub {stage.name}: CodeDeploy shifting the functions' aliases",
            assumed_by=iam.ServicePrincipal("codedeploy.amazonaws.com"),
        )
        self.config = self._config()
        self.alias_alarms: dict[str, cloudwatch.Alarm] = {}
        self.rollback_alarms: dict[str, list[cloudwatch.Alarm]] = {}
        for short_name, function in sorted(control_plane.sam_functions.items()):
            alarms = [*shared, self._alias_errors(short_name)]
            self.rollback_alarms[short_name] = alarms
            function.add_property_override("DeploymentPreference", {
                "Type": self.config.deployment_config_name if not stage.lambda_canary.predefined
                else stage.lambda_canary.name,
                "Alarms": [alarm.alarm_name for alarm in alarms],
                "Role": self.role.role_arn,
            })
        # SAM makes its own application for its functions; the CDK ones share this one.
        self.application = codedeploy.LambdaApplication(
            self, "Application", application_name=f"{self.prefix}functions")
        self.groups: dict[str, codedeploy.LambdaDeploymentGroup] = {}
        cdk_functions = [("trainer", trainer.alias), ("api", management_api.alias)]
        if image_refresh is not None:
            cdk_functions.append((REFRESH_FUNCTION, image_refresh.alias))
        for short_name, alias in cdk_functions:
            self._group(short_name, alias, shared)
        self._scaler_may_roll_back(control_plane, executors)

    def _config(self) -> codedeploy.ILambdaDeploymentConfig:
        canary = self.stage.lambda_canary
        if canary.predefined:
            return codedeploy.LambdaDeploymentConfig.from_lambda_deployment_config_name(
                self, "Canary", f"CodeDeployDefault.Lambda{canary.name}")
        return codedeploy.LambdaDeploymentConfig(
            self, "Canary",
            deployment_config_name=f"{self.prefix}{canary.name}",
            traffic_routing=codedeploy.TimeBasedCanaryTrafficRouting(
                interval=cdk.Duration.minutes(canary.minutes), percentage=canary.percent),
        )

    def _alias_errors(self, short_name: str) -> cloudwatch.Alarm:
        function_name = f"{self.prefix}{short_name}"
        alarm = cloudwatch.Alarm(
            self, f"{short_name}-alias-errors",
            alarm_name=f"{self.prefix}{short_name}-{LIVE_ALIAS}-errors",
            alarm_description=(
                f"The {short_name} function failed through its {LIVE_ALIAS} alias: rolls a "
                "rollout in progress back, pages nobody (docs/deploy.md, Safe rollouts)"),
            metric=cloudwatch.Metric(
                namespace="AWS/Lambda", metric_name="Errors",
                dimensions_map={"FunctionName": function_name,
                                "Resource": f"{function_name}:{LIVE_ALIAS}"},
                statistic="Sum", period=ALIAS_ERRORS_PERIOD),
            threshold=0, evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        self.alias_alarms[short_name] = alarm
        return alarm

    def _group(self, short_name: str, alias: lambda_.Alias,
               shared: list[cloudwatch.Alarm]) -> None:
        alarms = [*shared, self._alias_errors(short_name)]
        self.rollback_alarms[short_name] = alarms
        self.groups[short_name] = codedeploy.LambdaDeploymentGroup(
            self, f"{short_name}-deployment",
            application=self.application,
            deployment_group_name=f"{self.prefix}{short_name}",
            alias=alias,
            deployment_config=self.config,
            alarms=alarms,
            role=self.role,
            auto_rollback=codedeploy.AutoRollbackConfig(
                failed_deployment=True, stopped_deployment=True, deployment_in_alarm=True),
        )

    def _scaler_may_roll_back(self, control_plane: ControlPlane, executors: Executors) -> None:
        stack = cdk.Stack.of(self)

        def ec2(resource: str, name: str, account: str | None = None) -> str:
            return stack.format_arn(service="ec2", resource=resource, resource_name=name,
                                    account=account)

        subnets = executors.vpc.select_subnets(
            subnet_type=executors.subnets.subnet_type).subnet_ids
        launched = [
            *(ec2("launch-template", template.launch_template_id)
              for _, template in sorted(executors.launch_templates.items())),
            # The AMI: Debian's (another account's) or the executor AMI, by parameter or id.
            ec2("image", "*", account=""),
            *(ec2("subnet", subnet) for subnet in subnets),
            ec2("security-group", executors.security_group.security_group_id),
            *(ec2(kind, "*") for kind in LAUNCH_CREATED),
        ]
        control_plane.policies["scaler"].add_statements(
            iam.PolicyStatement(actions=LAUNCH_ACTIONS, resources=launched),
            iam.PolicyStatement(
                actions=TAG_ACTIONS, resources=[ec2(kind, "*") for kind in LAUNCH_CREATED],
                conditions={"StringEquals": {"ec2:CreateAction": "RunInstances"}}),
            iam.PolicyStatement(
                actions=["iam:PassRole"],
                resources=[role.role_arn for _, role in sorted(executors.roles.items())],
                conditions={"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}),
        )
