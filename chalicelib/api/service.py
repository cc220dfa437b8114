"""The API's parts wired from settings (once per Lambda container), or from given clients
(tests). Clients are built here, lazily: importing api_app costs no AWS client."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chalicelib.api.actions import Actions
from chalicelib.api.audit import AuditLog, DynamoAuditLog
from chalicelib.api.auth import LocalVerifier
from chalicelib.api.health import Health
from chalicelib.api.pages import Cursors
from chalicelib.api.settings import ApiSettings
from chalicelib.api.views import Views
from chalicelib.overrides import DynamoOverrideStore
from chalicelib.scaler.store import DynamoRolloutStore

# Who makes the calls (chalicelib/aws.py records them per deployable: tests/infra).
DEPLOYABLE = "api"


@dataclass
class ApiService:
    settings: ApiSettings
    views: Views
    actions: Actions
    health: Health
    audit: AuditLog
    verifier: LocalVerifier | None
    clock: Callable[[], float] = time.time


def build(settings: ApiSettings, *, dynamodb: Any = None, sqs: Any = None,
          autoscaling: Any = None, github: Callable[[], Any] | None = None,
          audit: AuditLog | None = None, clock: Callable[[], float] = time.time) -> ApiService:
    """Everything from settings; pass clients to use those instead. `autoscaling`: an
    AutoScaling (chalicelib/scaler/autoscaling.py) or None (hosts desired/min/max unknown)."""
    from chalicelib import aws
    from chalicelib.demand import SqsDemandQueue
    from chalicelib.history import DynamoHistory, ForecastReader
    from chalicelib.hosts import DynamoHostStore
    from chalicelib.jobs import DynamoJobStore
    from chalicelib.pools import load_pools
    from chalicelib.runners import DynamoRunnerStore

    dynamodb = dynamodb or aws.client("dynamodb", DEPLOYABLE)
    sqs = sqs or aws.client("sqs", DEPLOYABLE)
    pools = load_pools(settings.pools_file)
    cursors = Cursors(settings.api_cursor_secret.get_secret_value())
    hosts = DynamoHostStore(dynamodb, settings.hosts_table)
    runners = DynamoRunnerStore(dynamodb, settings.runners_table)
    overrides = DynamoOverrideStore(dynamodb, settings.runners_table)
    jobs = DynamoJobStore(dynamodb, settings.jobs_table)
    queue = SqsDemandQueue(sqs, settings.queue_prefix)
    audit = audit or DynamoAuditLog(dynamodb, settings.audit_table, cursors)
    views = Views(pools=pools, dynamodb_client=dynamodb, jobs_table=settings.jobs_table,
                  runners_table=settings.runners_table, hosts=hosts, runners=runners,
                  overrides=overrides, autoscaling=autoscaling,
                  group_prefix=settings.scaler_group_prefix, slots_of=settings.slots_of,
                  cursors=cursors, clock=clock,
                  forecasts=ForecastReader(DynamoHistory(dynamodb, settings.history_table),
                                           clock=clock),
                  rollouts=DynamoRolloutStore(dynamodb, settings.hosts_table))
    if github is None and settings.github_configured:
        github = _lazy_github(settings)
    actions = Actions(views=views, audit=audit, overrides=overrides, hosts=hosts, jobs=jobs,
                      demand=queue, dynamodb_client=dynamodb, hosts_table=settings.hosts_table,
                      runners_table=settings.runners_table, github=github, clock=clock)
    health = Health(pools=pools, dynamodb_client=dynamodb, queue=queue, hosts=hosts,
                    runners=runners, jobs_table=settings.jobs_table,
                    hosts_table=settings.hosts_table,
                    deliveries_table=settings.deliveries_table, clock=clock)
    verifier = None
    if settings.api_auth == "local":
        verifier = LocalVerifier(settings.api_jwt_public_key_file.read_text(),
                                 settings.api_jwt_issuer, settings.api_jwt_audience)
    return ApiService(settings=settings, views=views, actions=actions, health=health,
                      audit=audit, verifier=verifier, clock=clock)


def aws_autoscaling() -> Any:
    """The pools' Auto Scaling groups through the scaler's client (deployed)."""
    from chalicelib import aws
    from chalicelib.scaler.autoscaling import AwsAutoScaling

    return AwsAutoScaling(aws.client("autoscaling", DEPLOYABLE), aws.client("ec2", DEPLOYABLE))


def _lazy_github(settings: ApiSettings) -> Callable[[], Any]:
    made: list[Any] = []

    def github() -> Any:
        if not made:
            from chalicelib.github import GitHubApp
            from chalicelib.settings import GitHubAppSettings

            # The same RUNNERHUB_* variables as ApiSettings: the App's credentials, wherever
            # they live (secret backend or key file).
            app_settings = GitHubAppSettings()
            app_id, key = app_settings.app_credentials()[0]
            made.append(GitHubApp(app_id, key, settings.github_api_url))
        return made[0]

    return github
