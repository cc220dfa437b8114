"""`python -m executor`: the executor daemon.

Exit codes (systemd-friendly): 0 stopped on SIGTERM/SIGINT holding nothing (every message
deleted or visible again, every runner gone), 1 failed to start or stopped leaving something
behind (see the log), 2 bad configuration (nothing was started). The first SIGTERM drains, a
second one stops the runners now (docs/operations.md).
"""

from __future__ import annotations

import signal
import sys

from chalicelib.errors import ConfigurationError, DependencyUnavailable

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def build(settings, pools, launcher=None):
    """Wire the daemon from settings: one typed client per outside service. `launcher`: a test
    or benchmark harness's own (devstack/test_executor.py); None: the production one."""
    import docker

    from chalicelib import aws
    from chalicelib.demand import SqsDemandQueue
    from chalicelib.github import GitHubApp, GitHubApps
    from chalicelib.hosts import DynamoClaimIndex, DynamoHostStore
    from chalicelib.jobs import DynamoJobStore
    from chalicelib.runners import DynamoRunnerStore
    from executor.containers import RunnerContainers
    from executor.daemon import Executor
    from executor.launch import Launcher
    from executor.metrics import ExecutorMetrics, publish_app_budget
    from executor.queue import DemandConsumer

    dynamodb, sqs = aws.client("dynamodb"), aws.client("sqs")
    metrics = ExecutorMetrics()
    apps = GitHubApps((GitHubApp(app_id, key, settings.github_api_url)
                       for app_id, key in settings.app_credentials()),
                      observer=lambda headroom: publish_app_budget(metrics, headroom))
    metrics.serve(settings.metrics_port)
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
            docker.from_env(),
            settings.jitconfig_dir,
            settings.docker_network,
            settings.runner_uid,
            settings.no_new_privileges,
            deployment=settings.deployment,
        ),
        metrics=metrics,
        launcher=launcher or Launcher,
    )


def main(launcher=None) -> int:
    from executor import settings as executor_settings

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
    sys.exit(main())
