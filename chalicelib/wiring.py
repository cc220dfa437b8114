"""Builds the webhook service from settings, once per Lambda container, on first use."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from chalicelib import aws
from chalicelib.deliveries import DynamoDeliveryLog
from chalicelib.demand import SqsDemandQueue
from chalicelib.jobs import DynamoJobStore
from chalicelib.pools import load_pools
from chalicelib.runners import DynamoRunnerStore
from chalicelib.secrets import CachedSecrets, webhook_secret_loader
from chalicelib.settings import WebhookSettings
from chalicelib.telemetry import Telemetry
from chalicelib.webhook import WebhookService

_lock = threading.Lock()
_service: WebhookService | None = None
_telemetry: Telemetry | None = None


def build_webhook_service(
    settings: WebhookSettings, clock: Callable[[], float] = time.time
) -> WebhookService:
    dynamodb = aws.client("dynamodb", aws.WEBHOOK)
    return WebhookService(
        pools=load_pools(settings.pools_file),
        secrets=CachedSecrets(webhook_secret_loader(settings), settings.secret_cache_ttl_s),
        jobs=DynamoJobStore(dynamodb, settings.jobs_table),
        deliveries=DynamoDeliveryLog(
            dynamodb, settings.deliveries_table, settings.delivery_ttl_s, settings.delivery_lease_s
        ),
        demand=SqsDemandQueue(aws.client("sqs", aws.WEBHOOK), settings.queue_prefix),
        runners=DynamoRunnerStore(dynamodb, settings.runners_table),
        telemetry=telemetry(settings.emit_metrics),
        max_body_bytes=settings.max_body_bytes,
        clock=clock,
    )


def telemetry(emit: bool = True) -> Telemetry:
    global _telemetry
    if _telemetry is None:
        _telemetry = Telemetry("webhook", emit=emit)
    return _telemetry


def webhook_service() -> WebhookService:
    global _service
    if _service is None:
        with _lock:
            if _service is None:
                _service = build_webhook_service(WebhookSettings())
    return _service


def use(service: WebhookService | None) -> None:
    """Replace (or with None, forget) the service: tests and benchmarks wire their own."""
    global _service, _telemetry
    _service = service
    if service is None:
        _telemetry = None


# --- the reconciler (scheduled Lambda `reconcile`, and `python -m chalicelib.reconciler`) ---

_reconciler = None


def build_reconciler(settings, clock: Callable[[], float] = time.time):
    """The reconciler from ReconcilerSettings. Imported here, not at the top: the webhook's cold
    start does not pay for it."""
    from chalicelib.github import GitHubApp
    from chalicelib.reconciler.service import Reconciler
    from chalicelib.reconciler.store import (
        DynamoDeliveryRecords,
        DynamoJobIndex,
        DynamoLeaseStore,
    )
    from chalicelib.webhook import JobIntake

    dynamodb = aws.client("dynamodb", aws.RECONCILER)
    # Every App's webhook deliveries (each App has its own webhook and delivery log); the first
    # App asks about jobs and runners and sweeps for jobs GitHub never announced.
    apps = [GitHubApp(app_id, key, settings.github_api_url)
            for app_id, key in settings.app_credentials()]
    jobs = DynamoJobStore(dynamodb, settings.jobs_table)
    runners = DynamoRunnerStore(dynamodb, settings.runners_table)
    demand = SqsDemandQueue(aws.client("sqs", aws.RECONCILER), settings.queue_prefix)
    telemetry = Telemetry("reconciler", emit=settings.emit_metrics)
    pools = load_pools(settings.pools_file)
    return Reconciler(
        pools=pools,
        jobs=jobs,
        job_index=DynamoJobIndex(dynamodb, settings.jobs_table),
        runners=runners,
        demand=demand,
        github=apps[0],
        deliveries=DynamoDeliveryRecords(dynamodb, settings.deliveries_table),
        lease=DynamoLeaseStore(dynamodb, settings.deliveries_table),
        telemetry=telemetry,
        policy=settings.policy(),
        lease_s=settings.reconciler_lease_s,
        clock=clock,
        apps=apps,
        dead_letters=demand,
        intake=JobIntake(jobs=jobs, demand=demand, runners=runners, telemetry=telemetry,
                         clock=clock, pools=pools) if settings.discovery else None,
    )


def reconciler():
    """The Lambda container's reconciler, built on first use (its App token is reused)."""
    global _reconciler
    if _reconciler is None:
        from chalicelib.reconciler.settings import ReconcilerSettings

        with _lock:
            if _reconciler is None:
                _reconciler = build_reconciler(ReconcilerSettings())
    return _reconciler
