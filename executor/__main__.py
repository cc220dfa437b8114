"""`python -m executor`: the executor daemon.

Exit codes (systemd-friendly): 0 stopped on SIGTERM/SIGINT holding nothing (every message
deleted or visible again, every runner gone), 1 failed to start or stopped leaving something
behind (see the log), 2 bad configuration (nothing was started). The first SIGTERM drains, a
second one stops the runners now (docs/operations.md).

`python -m executor --check [--env-file FILE] [--require-images]` checks the host instead
(executor/check.py; docs/executor-host.md): settings, pools file, host id, Docker engine.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from chalicelib.errors import ConfigurationError, DependencyUnavailable

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def build(settings, pools, launcher=None):
    """Wire the daemon from settings: one typed client per outside service. `launcher`: a test
    or benchmark harness's own (devstack/test_executor.py); None: the production one."""
    import docker

    from chalicelib import aws
    from chalicelib.api.audit import DynamoAuditLog
    from chalicelib.api.pages import Cursors
    from chalicelib.demand import SqsDemandQueue
    from chalicelib.github import GitHubApp, GitHubApps
    from chalicelib.history import DynamoHistory, ForecastReader
    from chalicelib.hosts import DynamoClaimIndex, DynamoHostStore
    from chalicelib.jobs import DynamoJobStore
    from chalicelib.overrides import DynamoOverrideStore, OverridesReader
    from chalicelib.runners import DynamoRunnerStore
    from chalicelib.warm_targets import WarmTargets
    from executor import lifecycle, monitor
    from executor.containers import RunnerContainers
    from executor.daemon import Executor, logger
    from executor.disk import DiskLimits, JobDisks
    from executor.job_engine import JobEngines
    from executor.launch import Launcher
    from executor.metrics import ExecutorMetrics, publish_app_budget
    from executor.queue import DemandConsumer

    dynamodb, sqs = aws.client("dynamodb", aws.EXECUTOR), aws.client("sqs", aws.EXECUTOR)
    docker_client = docker.from_env()
    # The runtime monitor only appends to the audit log: its cursor key (for reading pages,
    # which the executor never does) is a placeholder.
    audit = (DynamoAuditLog(dynamodb, settings.audit_table, Cursors(settings.host_id))
             if settings.audit_table else monitor.LogOnlyAudit())
    metrics = ExecutorMetrics()
    apps = GitHubApps((GitHubApp(app_id, key, settings.github_api_url)
                       for app_id, key in settings.app_credentials()),
                      observer=lambda headroom: publish_app_budget(metrics, headroom))
    metrics.serve(settings.metrics_port)
    forecasts = ForecastReader(
        DynamoHistory(dynamodb, settings.history_table),
        refresh_s=settings.warm_forecast_refresh_s,
        on_error=lambda pool, exc: logger.warning(
            "forecast not read (warm target from the pools file, or as last read): %s", exc,
            extra={"pool": pool})) if settings.warm_forecast else None
    return Executor(
        settings,
        pools,
        jobs=DynamoJobStore(dynamodb, settings.jobs_table),
        runners=DynamoRunnerStore(dynamodb, settings.runners_table),
        hosts=DynamoHostStore(dynamodb, settings.hosts_table),
        claims=DynamoClaimIndex(dynamodb, settings.jobs_table),
        consumer=DemandConsumer(sqs, settings.queue_prefix, tuple(p.name for p in pools)),
        demand=SqsDemandQueue(sqs, settings.queue_prefix),
        github=apps,
        containers=RunnerContainers(
            docker_client,
            settings.jitconfig_dir,
            settings.docker_network,
            settings.runner_uid,
            settings.no_new_privileges,
            deployment=settings.deployment,
            # Engines' data roots: job disks of their own (root-owned), beside the runners'.
            engines=JobEngines(docker_client, settings.job_engine_image, settings.host_id,
                               disks=JobDisks(settings.job_disk_dir / "engines", 0, 0)
                               if settings.job_disks else None),
            disk_limits=DiskLimits(docker_client, pools[0].image, observe=lambda support: (
                metrics.disk_limit_enforced.set(int(support.enforced)))) if pools else None,
            job_disks=JobDisks(settings.job_disk_dir, settings.runner_uid, settings.runner_uid)
            if settings.job_disks else None,
        ),
        metrics=metrics,
        launcher=launcher or Launcher,
        lifecycle=lifecycle.factory(settings),
        monitor=monitor.factory(settings, docker_client, audit),
        warm_targets=WarmTargets(forecasts, overrides=OverridesReader(
            DynamoOverrideStore(dynamodb, settings.runners_table),
            on_error=lambda pool, exc: logger.warning(
                "overrides not read (as last read, or none): %s", exc, extra={"pool": pool}))),
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m executor",
                                     description="RunnerHub executor daemon")
    parser.add_argument("--check", action="store_true",
                        help="check settings, pools file, host id and Docker, then exit")
    parser.add_argument("--env-file", type=Path,
                        help="with --check: read settings from this systemd environment file too")
    parser.add_argument("--require-images", action="store_true",
                        help="with --check: a served pool's image missing locally fails it")
    args = parser.parse_args(argv)
    if (args.env_file or args.require_images) and not args.check:
        parser.error("--env-file and --require-images go with --check")
    return args


def main(launcher=None, argv: list[str] | None = None) -> int:
    from executor import settings as executor_settings

    args = parse_args(argv or [])
    if args.check:
        from executor import check

        return check.run(args.env_file, require_images=args.require_images)

    try:
        settings, pools = executor_settings.load()
    except ConfigurationError as exc:
        print(f"runnerhub executor: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        daemon = build(settings, pools, launcher)
    except ConfigurationError as exc:
        print(f"runnerhub executor: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except DependencyUnavailable as exc:
        print(f"runnerhub executor: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - e.g. Docker not reachable: say so, exit 1
        print(f"runnerhub executor: cannot start: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    return EXIT_OK if daemon.run() else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main(argv=sys.argv[1:]))
