"""The management API (api_app.py, docs/api.md): its own function, role, log group, REST API and
throttle beside the webhook's, so the webhook keeps its import time, its role and its throttle;
a Cognito user pool whose groups are the API's roles, its hosted UI for the dashboard page.

- Code: the Chalice package (app.py, chalicelib/ and the requirements, built for Lambda by
  control_plane.py) plus api_app.py, as one zip: the same dependencies as every function.
- Role `runnerhub-<stage>-api`: exactly the calls chalicelib/api/ makes (tests/infra/
  test_iam_calls.py compares them with the calls the functional tests record), and an explicit
  deny of every call that could change or remove an audit record. The audit table itself also
  denies those calls to every principal (data.py), which covers every other role unchanged.
- Log group: the audit records are also JSON lines in the function's log (chalicelib/api/
  audit.py, logger `runnerhub.audit`), for a SIEM to subscribe to: kept 400 days (13 months),
  as long as the table keeps them, whatever the stage's log retention.
- REST API `runnerhub-<stage>-management`: `/api/v1/{proxy+}` behind the Cognito authorizer;
  the routes the API's own table marks public (chalicelib/api/permissions.py: `/health`
  shallow, the OpenAPI document, the dashboard page when it is served) have methods of their
  own without it (API Gateway prefers a path over the greedy proxy).
- An optional custom domain (stage settings `api_domain_name`, `api_certificate_arn`): the
  management API at its root (its resource paths already start with /api/v1, and a REST
  proxy event's `path` carries the base path: the app's routes match either way), the webhook
  API under `webhook/`. Without one, both APIs' own URLs are stack outputs.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import aws_cdk as cdk
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_certificatemanager as acm
from aws_cdk import aws_cognito as cognito
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from chalicelib import resources
from chalicelib.api.permissions import PREFIX, PUBLIC, ROUTES, Role
from chalicelib.history import FORECAST_PREFIX
from chalicelib.image_refresh import PROPOSAL_PREFIX
from chalicelib.pools import load_pools
from chalicelib.reconciler.store import LEASE_KEY
from runnerhub_infra.data import AUDIT_IMMUTABLE_ACTIONS, Data
from runnerhub_infra.pool_checks import host_slots
from runnerhub_infra.secrets import Secrets
from runnerhub_infra.stages import LIVE_ALIAS, REPO_ROOT, StageSettings, removal_policy

LAMBDA_ROOT = "/var/task"
HANDLER = "api_app.handler"
API_MODULE = REPO_ROOT / "api_app.py"
# The REST API's stage: its execute-api URL is https://<id>.execute-api.<region>.<suffix>/
# management/api/v1/...
API_STAGE = "management"
# The page the hosted UI returns to after sign-in (served by api_app.py, public: it loads
# without a token, then signs in).
DASHBOARD_PATH = f"{PREFIX}/dashboard"
# The webhook API's base path on the custom domain: https://<domain>/webhook/webhook.
WEBHOOK_BASE_PATH = "webhook"
# API Gateway gives up on an integration after 29 s; the function stops first.
API_TIMEOUT_S = 29
API_MEMORY_MB = 512
# The audit records' JSON lines live as long as the records (resources.AUDIT_TTL_S: 400 days).
AUDIT_LOG_RETENTION = logs.RetentionDays.THIRTEEN_MONTHS
# Exactly the calls chalicelib/api/ makes, table by table: views read jobs (one, a page by
# Scan, or by the by_state index), runners and hosts (scans and single reads), each pool's
# forecast item (history table, below); actions stamp a drain or retire request on a host or
# runner record, write a pool's overrides item (runners table), move a retried job
# (re-demand); health reads the scaler's lease items (hosts table).
API_TABLE_ACTIONS = {
    "jobs_table": ["dynamodb:GetItem", "dynamodb:Scan", "dynamodb:UpdateItem"],
    "runners_table": ["dynamodb:GetItem", "dynamodb:Scan", "dynamodb:UpdateItem"],
    "hosts_table": ["dynamodb:GetItem", "dynamodb:Scan", "dynamodb:UpdateItem"],
}
API_INDEXES = (("jobs_table", "by_state"),)
# Approving a pool's image proposal (chalicelib/api/actions.py) removes its item: a delete of
# the runners table's proposal items only (image_refresh.py writes them).
PROPOSAL_ITEMS = (f"{PROPOSAL_PREFIX}*",)
# The audit log: new records (a conditional put on a new key) and pages of them; nothing else.
AUDIT_ACTIONS = ["dynamodb:PutItem", "dynamodb:Query"]
# The deliveries table holds the webhook's dedupe log: the API reads one item of it, the
# reconciler's lease (when its last run ended: /health), and nothing else.
DELIVERIES_ITEMS = (LEASE_KEY,)
# The pools' groups (limits, desired, instances' launch times): reads IAM authorises on "*".
API_DESCRIBE_ACTIONS = ["autoscaling:DescribeAutoScalingGroups", "ec2:DescribeInstances"]


def api_code(workdir: Path, package: Path | None = None) -> Path:
    """The function's zip: the Chalice package with api_app.py added (built by control_plane.py
    into `workdir/chalice.out/<id>/deployment.zip`, one per synth)."""
    if package is None:
        found = sorted((workdir / "chalice.out").glob("*/deployment.zip"))
        if len(found) != 1:
            raise FileNotFoundError(
                f"expected one Chalice package under {workdir / 'chalice.out'}, found "
                f"{len(found)}: build the control plane (ControlPlane) first")
        package = found[0]
    target = workdir / "api-code.zip"
    shutil.copyfile(package, target)
    with zipfile.ZipFile(target, "a", zipfile.ZIP_DEFLATED) as code:
        if "api_app.py" in code.namelist():
            raise ValueError(f"{package} already carries api_app.py")
        code.write(API_MODULE, "api_app.py")
    return target


def public_routes() -> list[tuple[str, str]]:
    """(method, path) of the routes the API serves without a token, from its own table; the
    dashboard page is one of them once api_app.py serves it."""
    return sorted(route for route, need in ROUTES.items() if need == PUBLIC)


class ManagementApi(Construct):
    def __init__(self, scope: Construct, id: str, *, stage: StageSettings, data: Data,
                 secrets: Secrets, code: Path, webhook_api: cdk.CfnResource | None = None,
                 webhook_stage: str = "api") -> None:
        """`code`: the function's zip (api_code). `webhook_api`: the webhook's REST API (the
        Chalice app's `RestAPI`), mapped under the custom domain when the stage has one."""
        super().__init__(scope, id)
        self.stage = stage
        self.data = data
        removal = removal_policy(stage)
        self.function_name = f"{stage.prefix}api"
        self.api_name = f"{stage.prefix}management"
        self.log_group = logs.LogGroup(
            self, "Logs", log_group_name=f"/aws/lambda/{self.function_name}",
            retention=AUDIT_LOG_RETENTION, removal_policy=removal)
        self.user_pool, self.groups = self._user_pool(removal)
        self.api = self._rest_api()
        self.domain = self._domain(webhook_api, webhook_stage)
        self.base_url = (f"https://{stage.api_domain_name}" if self.domain else cdk.Fn.sub(
            "https://${Api}.execute-api.${AWS::Region}.${AWS::URLSuffix}/" + API_STAGE,
            {"Api": self.api.rest_api_id}))
        self.hosted_ui, self.client = self._sign_in()
        self.role = self._role(secrets)
        self.function = self._function(code, secrets)
        # Every route invokes the `live` alias, which CodeDeploy moves (rollouts.py).
        self.alias = lambda_.Alias(self, "Live", alias_name=LIVE_ALIAS,
                                   version=self.function.current_version)
        self._routes()
        self._outputs(webhook_api is not None)

    # --- who may sign in ---

    def _user_pool(self, removal: cdk.RemovalPolicy
                   ) -> tuple[cognito.UserPool, dict[str, cognito.CfnUserPoolGroup]]:
        pool = cognito.UserPool(
            self, "Users",
            user_pool_name=f"{self.stage.prefix}users",
            # Operators are added by an administrator (docs/deploy.md), never by themselves.
            self_sign_up_enabled=False,
            sign_in_aliases=cognito.SignInAliases(username=True, email=True),
            auto_verify=cognito.AutoVerifiedAttrs(email=True),
            password_policy=cognito.PasswordPolicy(min_length=12),
            mfa=cognito.Mfa.OPTIONAL,
            mfa_second_factor=cognito.MfaSecondFactor(otp=True, sms=False),
            account_recovery=cognito.AccountRecovery.EMAIL_ONLY,
            deletion_protection=self.stage.prod,
            removal_policy=removal,
        )
        # Groups are the API's roles (chalicelib/api/permissions.py): the token's
        # `cognito:groups`. Precedence: the most powerful role first.
        groups = {
            role.value: cognito.CfnUserPoolGroup(
                self, f"group-{role.value}", user_pool_id=pool.user_pool_id,
                group_name=role.value, precedence=rank,
                description=f"RunnerHub {self.stage.name}: the {role.value} role of the "
                            "management API")
            for rank, role in enumerate(Role)
        }
        return pool, groups

    def _sign_in(self) -> tuple[cognito.UserPoolDomain, cognito.UserPoolClient]:
        prefix = self.stage.auth_domain_prefix or cdk.Fn.join(
            "-", ["runnerhub", self.stage.name, cdk.Aws.ACCOUNT_ID])
        domain = self.user_pool.add_domain(
            "HostedUi", cognito_domain=cognito.CognitoDomainOptions(domain_prefix=prefix))
        page = self._url(DASHBOARD_PATH)
        client = self.user_pool.add_client(
            "Dashboard",
            user_pool_client_name=f"{self.stage.prefix}dashboard",
            # A page in a browser: a public client (no secret), the authorization-code flow
            # (with PKCE, the page's part) through the hosted UI.
            generate_secret=False,
            o_auth=cognito.OAuthSettings(
                flows=cognito.OAuthFlows(authorization_code_grant=True),
                scopes=[cognito.OAuthScope.OPENID, cognito.OAuthScope.EMAIL,
                        cognito.OAuthScope.PROFILE],
                callback_urls=[page], logout_urls=[page]),
            supported_identity_providers=[
                cognito.UserPoolClientIdentityProvider.COGNITO],
            auth_flows=cognito.AuthFlow(user_srp=True),
            prevent_user_existence_errors=True,
            id_token_validity=cdk.Duration.hours(1),
            access_token_validity=cdk.Duration.hours(1),
            refresh_token_validity=cdk.Duration.hours(12),
        )
        return domain, client

    # --- the function ---

    def _role(self, secrets: Secrets) -> iam.Role:
        tables = self.data.tables
        audit = tables[resources.AUDIT_TABLE.logical_name]
        deliveries = tables[resources.DELIVERIES_TABLE.logical_name]
        statements = [
            iam.PolicyStatement(actions=["logs:CreateLogStream", "logs:PutLogEvents"],
                                resources=[self.log_group.log_group_arn]),
            *(iam.PolicyStatement(actions=actions, resources=[tables[name].table_arn])
              for name, actions in API_TABLE_ACTIONS.items()),
            iam.PolicyStatement(actions=["dynamodb:Query"], resources=[
                f"{tables[name].table_arn}/index/{index}" for name, index in API_INDEXES]),
            iam.PolicyStatement(
                actions=["dynamodb:DeleteItem"],
                resources=[tables[resources.RUNNERS_TABLE.logical_name].table_arn],
                conditions={"ForAllValues:StringLike": {
                    "dynamodb:LeadingKeys": list(PROPOSAL_ITEMS)}}),
            iam.PolicyStatement(actions=AUDIT_ACTIONS, resources=[audit.table_arn]),
            # Append-only, whatever else is ever granted: no record changed or removed.
            iam.PolicyStatement(effect=iam.Effect.DENY, actions=AUDIT_IMMUTABLE_ACTIONS,
                                resources=[audit.table_arn, f"{audit.table_arn}/index/*"]),
            iam.PolicyStatement(
                actions=["dynamodb:GetItem"], resources=[deliveries.table_arn],
                conditions={"ForAllValues:StringEquals": {
                    "dynamodb:LeadingKeys": list(DELIVERIES_ITEMS)}}),
            # A pool's warm target now (the file's or its forecast's): the forecast items of
            # the history table alone, never its demand buckets.
            iam.PolicyStatement(
                actions=["dynamodb:GetItem"],
                resources=[tables[resources.HISTORY_TABLE.logical_name].table_arn],
                conditions={"ForAllValues:StringLike": {
                    "dynamodb:LeadingKeys": [f"{FORECAST_PREFIX}*"]}}),
            # Health finds a pool's queue; a retried job's demand goes onto it. Never the DLQs.
            iam.PolicyStatement(actions=["sqs:GetQueueUrl", "sqs:SendMessage"],
                                resources=[pair.queue.queue_arn
                                           for pair in self.data.queues.values()]),
            iam.PolicyStatement(actions=API_DESCRIBE_ACTIONS, resources=["*"]),
            # Retry asks GitHub whether the job is still queued; redelivery is GitHub's.
            *secrets.read_statements(secrets.github_app_secret),
        ]
        return iam.Role(
            self, "Role",
            role_name=self.stage.role_name("api"),
            description=f"RunnerHub {self.stage.name}: the management API function only",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            inline_policies={"function": iam.PolicyDocument(statements=statements)},
        )

    def _function(self, code: Path, secrets: Secrets) -> lambda_.Function:
        stage = self.stage
        tables = self.data.tables
        pools = load_pools(stage.pools_file)
        names = ("jobs_table", "runners_table", "hosts_table", "deliveries_table",
                 "audit_table", "history_table")
        function = lambda_.Function(
            self, "Function",
            function_name=self.function_name,
            description=f"RunnerHub {stage.name}: the management API (api_app.py)",
            runtime=lambda_.Runtime.PYTHON_3_11,
            architecture=lambda_.Architecture.X86_64,
            handler=HANDLER,
            code=lambda_.Code.from_asset(str(code)),
            role=self.role,
            timeout=cdk.Duration.seconds(API_TIMEOUT_S),
            memory_size=API_MEMORY_MB,
            log_group=self.log_group,
            environment={
                "POWERTOOLS_SERVICE_NAME": "runnerhub-api",
                "POWERTOOLS_METRICS_NAMESPACE": "RunnerHub",
                "RUNNERHUB_STAGE": stage.name,
                "RUNNERHUB_API_AUTH": "cognito",
                **{f"RUNNERHUB_{name.upper()}": tables[name].table_name for name in names},
                "RUNNERHUB_QUEUE_PREFIX": self.data.queue_prefix,
                "RUNNERHUB_POOLS_FILE": f"{LAMBDA_ROOT}/{stage.pools_relative_path}",
                "RUNNERHUB_GITHUB_APP_SECRET_ID": secrets.github_app_secret_name,
                # The pools' groups and slots, as the scaler is given them (control_plane.py).
                "RUNNERHUB_SCALER_GROUP_PREFIX": stage.prefix,
                "RUNNERHUB_SCALER_POOL_SLOTS": ",".join(
                    f"{pool.name}={host_slots(pool, stage.host_settings(pool.name))}"
                    for pool in pools.pools),
                # What the page needs to sign in with the hosted UI.
                "RUNNERHUB_API_COGNITO_USER_POOL_ID": self.user_pool.user_pool_id,
                "RUNNERHUB_API_COGNITO_CLIENT_ID": self.client.user_pool_client_id,
                "RUNNERHUB_API_COGNITO_DOMAIN": self.hosted_ui.base_url(),
                "RUNNERHUB_API_DASHBOARD_URL": self._url(DASHBOARD_PATH),
                **stage.secrets.environment(),
            },
        )
        # CDK adds a DependsOn on the role, which the function's GetAtt of it already enforces
        # (cfn-lint W3005).
        function.node.default_child.add_deletion_override("DependsOn")
        return function

    # --- the REST API ---

    def _rest_api(self) -> apigw.RestApi:
        stage = self.stage
        return apigw.RestApi(
            self, "Api",
            rest_api_name=self.api_name,
            description=f"RunnerHub {stage.name}: the management API (/api/v1)",
            endpoint_types=[apigw.EndpointType.REGIONAL],
            cloud_watch_role=False,
            # Its own throttle: a busy dashboard never eats the webhook's (control_plane.py).
            deploy_options=apigw.StageOptions(
                stage_name=API_STAGE,
                throttling_rate_limit=stage.management_api_throttle_rate,
                throttling_burst_limit=stage.management_api_throttle_burst),
        )

    def _routes(self) -> None:
        integration = apigw.LambdaIntegration(self.alias, proxy=True, allow_test_invoke=False)
        authorizer = apigw.CognitoUserPoolsAuthorizer(
            self, "Authorizer", authorizer_name=f"{self.stage.prefix}users",
            cognito_user_pools=[self.user_pool],
            identity_source="method.request.header.Authorization",
            results_cache_ttl=cdk.Duration.minutes(5))
        self.api.root.resource_for_path(PREFIX).add_resource("{proxy+}").add_method(
            "ANY", integration, authorizer=authorizer,
            authorization_type=apigw.AuthorizationType.COGNITO)
        for method, path in public_routes():
            self.api.root.resource_for_path(path).add_method(
                method, integration, authorization_type=apigw.AuthorizationType.NONE)

    def _domain(self, webhook_api: cdk.CfnResource | None, webhook_stage: str
                ) -> apigw.DomainName | None:
        stage = self.stage
        if not stage.api_domain_name:
            return None
        domain = apigw.DomainName(
            self, "Domain", domain_name=stage.api_domain_name,
            certificate=acm.Certificate.from_certificate_arn(
                self, "Certificate", stage.api_certificate_arn),
            endpoint_type=apigw.EndpointType.REGIONAL,
            security_policy=apigw.SecurityPolicy.TLS_1_2)
        # The root: the app's routes are the URL's paths (https://<domain>/api/v1/...).
        domain.add_base_path_mapping(self.api, stage=self.api.deployment_stage)
        if webhook_api is not None:
            mapping = apigw.CfnBasePathMapping(
                self, "WebhookMapping", domain_name=domain.domain_name,
                rest_api_id=webhook_api.ref, stage=webhook_stage, base_path=WEBHOOK_BASE_PATH)
            # SAM names the stage it makes <Api logical id><stage>Stage: it must exist first.
            mapping.add_override("DependsOn", [f"{webhook_api.node.id}{webhook_stage}Stage"])
        return domain

    def _url(self, path: str) -> str:
        return cdk.Fn.join("", [self.base_url, path])

    def _outputs(self, with_webhook: bool) -> None:
        stack = cdk.Stack.of(self)
        cdk.CfnOutput(stack, "ManagementApiUrl", value=self._url(PREFIX),
                      description="The management API (docs/api.md)")
        cdk.CfnOutput(stack, "DashboardUrl", value=self._url(DASHBOARD_PATH),
                      description="The dashboard page (sign in with the hosted UI)")
        cdk.CfnOutput(stack, "UserPoolId", value=self.user_pool.user_pool_id,
                      description="Cognito user pool: add operators to a group (docs/deploy.md)")
        cdk.CfnOutput(stack, "DashboardClientId", value=self.client.user_pool_client_id,
                      description="The dashboard's app client (authorization-code flow)")
        cdk.CfnOutput(stack, "HostedUiUrl", value=self.hosted_ui.base_url(),
                      description="Cognito hosted UI (sign-in)")
        if self.domain is not None:
            cdk.CfnOutput(stack, "ApiDomainTarget",
                          value=self.domain.domain_name_alias_domain_name,
                          description=f"Point {self.stage.api_domain_name} (CNAME or alias) "
                                      "here")
            if with_webhook:
                cdk.CfnOutput(stack, "WebhookDomainUrl",
                              value=f"https://{self.stage.api_domain_name}/"
                                    f"{WEBHOOK_BASE_PATH}/webhook",
                              description="Payload URL of the GitHub App's webhook, on the "
                                          "custom domain")

