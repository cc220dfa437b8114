"""The whole system on one machine: moto server, the webhook app over HTTP, the GitHub emulator
and executor daemons, wired together. Used by `make demo`, the e2e tests and the benchmarks.

Processes: the moto server and the emulator run in this process (tests read their state); the
webhook app and each executor run as child processes, with their logs in `workdir`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

from chalicelib import aws
from chalicelib.pools import PoolConfig, load_pools
from chalicelib.resources import TABLES
from devstack.aws_server import LocalAws
from devstack.resources import create_queues, create_tables

ROOT = Path(__file__).resolve().parent.parent
APP_ID = 424_001
WEBHOOK_SECRET = "local-webhook-secret"  # noqa: S105 - the local stack's own, not a real secret


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class LocalStack:
    pools_file: Path | None
    workdir: Path
    lost_runner_timeout_s: float = 30.0
    emulator_options: dict = field(default_factory=dict)
    # Route every child's AWS traffic through a TCP proxy that can cut it (chaos tests).
    outage_proxy: bool = False
    # Several webhook processes, as several Lambda containers answer one URL; the emulator
    # spreads its deliveries over them.
    webhook_processes: int = 1
    # The management API (devstack/api_server.py) beside the webhook, with local tokens signed
    # by a key pair made for this stack: `api_url` (the dashboard: <api_url>/api/v1/dashboard)
    # and `token(role)`.
    api_server: bool = True
    children: list[Child] = field(default_factory=list)

    def start(self) -> LocalStack:
        from emulator import AppConfig, Emulator, EmulatorConfig, InstallationConfig
        from emulator.config import RunnerGroupConfig
        from emulator.testing import generate_app_key

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pools: PoolConfig = load_pools(self.pools_file)
        self.aws = LocalAws().start()
        # moto keeps its state per process, shared by every server in it: names unique to this
        # stack keep two stacks in one test session (or a leftover) from seeing each other.
        self.prefix = f"rh-{uuid.uuid4().hex[:6]}-"
        self.tables = {spec.logical_name: self.prefix + spec.default_name.removeprefix(
            "runnerhub-") for spec in TABLES}
        self.env = {
            "AWS_ENDPOINT_URL": self.aws.endpoint_url,
            "AWS_ACCESS_KEY_ID": "local",
            "AWS_SECRET_ACCESS_KEY": "local",
            "AWS_DEFAULT_REGION": "us-east-1",
            "RUNNERHUB_WEBHOOK_SECRETS": WEBHOOK_SECRET,
            "RUNNERHUB_QUEUE_PREFIX": self.prefix,
            **{f"RUNNERHUB_{name.upper()}": table for name, table in self.tables.items()},
        }
        if self.pools_file:
            self.env["RUNNERHUB_POOLS_FILE"] = str(self.pools_file)
        # Ground-truth reads and set-up go straight to moto, even during an injected outage.
        self.direct_env = dict(self.env)
        self.aws_proxy = None
        if self.outage_proxy:
            from devstack.outage_proxy import OutageProxy

            self.aws_proxy = OutageProxy(self.aws.endpoint_url).start()
            self.env["AWS_ENDPOINT_URL"] = self.aws_proxy.endpoint_url
        with environ(self.direct_env):
            create_tables(aws.client("dynamodb"), self.tables)
            self.queue_urls = create_queues(aws.client("sqs"), self.pools, self.prefix)
        self.webhooks = [self._start_webhook(n) for n in range(self.webhook_processes)]
        self.webhook = self.webhooks[0][0]
        self.webhook_urls = [url for _, url in self.webhooks]
        self.webhook_url = self.webhook_urls[0]

        private_key, public_key = generate_app_key()
        self.app_key_file = self.workdir / "github-app.pem"
        self.app_key_file.write_text(private_key)
        self.app_key_file.chmod(0o600)
        installations = []
        for index, owner in enumerate(sorted({p.scope.owner for p in self.pools.pools})):
            groups = {1: False}
            for pool in self.pools.pools:
                if pool.scope.owner == owner:
                    groups[pool.runner_group_id] = (
                        groups.get(pool.runner_group_id, False) or pool.allow_public_repos
                    )
            installations.append(InstallationConfig(
                id=1000 + index, account=owner,
                runner_groups=[
                    RunnerGroupConfig(id=gid, name="Default" if gid == 1 else f"group-{gid}",
                                      allows_public_repositories=public)
                    for gid, public in sorted(groups.items())
                ],
            ))
        self.emulator = Emulator(EmulatorConfig(
            apps=[AppConfig(app_id=APP_ID, public_key_pem=public_key,
                            installations=installations)],
            webhook_urls=self.webhook_urls,
            webhook_secret=WEBHOOK_SECRET,
            lost_runner_timeout_s=self.lost_runner_timeout_s,
            **self.emulator_options,
        )).start()
        if self.api_server:
            self._start_api()
        return self

    def _start_api(self) -> None:
        """Started, not waited for: `api_url` waits (the e2e tests that never call the API
        don't pay for its start-up)."""
        from chalicelib.api.tokens import ensure_key_pair

        self.api_key_file = self.workdir / "api-jwt.pem"
        public = ensure_key_pair(self.api_key_file)
        self._api_url_file = self.workdir / "api.url"
        self._api_url_file.unlink(missing_ok=True)
        self._api_url: str | None = None
        self.api = self._spawn("api", [
            sys.executable, "-m", "devstack.api_server", "--url-file", str(self._api_url_file),
            "--key", str(self.api_key_file)], env={
            # A stage other than `local`: the API reads the pools' Auto Scaling groups (the
            # local fleet's, in moto, named as the fleet names them).
            **self.env, "RUNNERHUB_DEPLOYABLE": "api", "RUNNERHUB_STAGE": "devstack",
            "RUNNERHUB_SCALER_GROUP_PREFIX": self.prefix,
            "RUNNERHUB_API_AUTH": "local", "RUNNERHUB_API_JWT_PUBLIC_KEY_FILE": str(public),
            "RUNNERHUB_GITHUB_API_URL": self.emulator.base_url,
            "RUNNERHUB_GITHUB_APP_ID": str(APP_ID),
            "RUNNERHUB_GITHUB_APP_KEY_FILE": str(self.app_key_file)})

    @property
    def api_url(self) -> str:
        """The management API's root URL (http://127.0.0.1:PORT), once it serves."""
        if not self.api_server:
            raise RuntimeError("this stack was started with api_server=False")
        if self._api_url is None:
            if not self.wait_for(lambda: self._api_url_file.exists() or not self.api.alive(),
                                 30, 0.05) or not self._api_url_file.exists():
                raise RuntimeError(f"API server did not start:\n{self.api.log()}")
            self._api_url = self._api_url_file.read_text().strip()
        return self._api_url

    def token(self, role: str | None, ttl_s: float = 3600, username: str | None = None) -> str:
        """A local token for the API: `role` admin, operator or viewer (None: in no group)."""
        from chalicelib.api.tokens import mint

        return mint(self.api_key_file.read_bytes(), groups=[role] if role else [],
                    username=username or role or "nobody", ttl_s=ttl_s)

    def dashboard_url(self, role: str = "admin") -> str:
        """The page, signed in as `role` by a token in the URL's fragment (never sent)."""
        return f"{self.api_url}/api/v1/dashboard#token={self.token(role)}"

    def _start_webhook(self, number: int) -> tuple[Child, str]:
        name = "webhook" if number == 0 else f"webhook-{number}"
        url_file = self.workdir / f"{name}.url"
        url_file.unlink(missing_ok=True)
        child = self._spawn(
            name, [sys.executable, "-m", "devstack.webhook_server", "--url-file", str(url_file)],
            env={**self.env, "RUNNERHUB_DEPLOYABLE": "webhook"})
        if not self.wait_for(lambda: url_file.exists() or not child.alive(), 30, 0.05) \
                or not url_file.exists():
            raise RuntimeError(f"webhook server did not start:\n{child.log()}")
        return child, url_file.read_text().strip() + "/webhook"

    def executor_env(self, host_id: str, **overrides: str) -> dict[str, str]:
        env = dict(self.env)
        env.update({
            "RUNNERHUB_HOST_ID": host_id,
            "RUNNERHUB_GITHUB_API_URL": self.emulator.base_url,
            "RUNNERHUB_GITHUB_APP_ID": str(APP_ID),
            "RUNNERHUB_GITHUB_APP_KEY_FILE": str(self.app_key_file),
            "RUNNERHUB_DOCKER_NETWORK": "host",
            "RUNNERHUB_JITCONFIG_DIR": f"/dev/shm/runnerhub-{host_id}",
            "RUNNERHUB_METRICS_PORT": "0",
            "RUNNERHUB_POLL_WAIT_S": "2",
            "RUNNERHUB_TICK_S": "0.5",
            "RUNNERHUB_DEPLOYABLE": "executor",
            # No IMDS on this machine (a daemon would poll 169.254.169.254 for lifecycle and
            # Spot notices); the fleet or a test points it at devstack/imds.py.
            "RUNNERHUB_IMDS_ENDPOINT": "",
        })
        env.update(overrides)
        return env

    def start_executor(self, host_id: str | None = None, **overrides: str) -> Child:
        host_id = host_id or f"host-{uuid.uuid4().hex[:6]}"
        child = self._spawn(f"executor-{host_id}", [sys.executable, "-m", "executor"],
                            env=self.executor_env(host_id, **overrides))
        child.host_id = host_id  # type: ignore[attr-defined]
        return child

    def start_reconciler(self, every_s: float, **overrides: str) -> Child:
        """The reconciler as a loop (`python -m chalicelib.reconciler --every S`); each run
        prints its summary as one JSON line in its log."""
        env = {
            **self.env,
            "RUNNERHUB_GITHUB_API_URL": self.emulator.base_url,
            "RUNNERHUB_GITHUB_APP_ID": str(APP_ID),
            "RUNNERHUB_GITHUB_APP_KEY_FILE": str(self.app_key_file),
            "RUNNERHUB_EMIT_METRICS": "false",
            "RUNNERHUB_DEPLOYABLE": "reconciler",
            **overrides,
        }
        return self._spawn("reconciler", [sys.executable, "-m", "chalicelib.reconciler",
                                          "--every", str(every_s)], env=env)

    def stop_child(self, child: Child, timeout_s: float = 60.0) -> int | None:
        if child.alive():
            child.process.send_signal(signal.SIGTERM)
            try:
                child.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                child.process.send_signal(signal.SIGTERM)  # second: stop runners now
                try:
                    child.process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
        return child.process.returncode

    def stop(self) -> None:
        for child in reversed(self.children):
            self.stop_child(child)
        with contextlib.suppress(Exception):
            self.emulator.stop()
        if self.aws_proxy is not None:
            self.aws_proxy.stop()
        self.aws.stop()

    def _spawn(self, name: str, command: list[str], env: dict | None = None) -> Child:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("w") as log:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen(
                command, cwd=ROOT, env={**os.environ, **(env or self.env)},
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    # --- reading the outcome ---

    def wait_for(self, predicate, timeout_s: float, interval_s: float = 0.25) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(interval_s)
        return predicate()

    def records(self) -> dict[int, dict]:
        from chalicelib.dynamodb import from_item

        with environ(self.direct_env):
            client = _ground_truth_dynamodb()
            pages = client.get_paginator("scan").paginate(TableName=self.tables["jobs_table"])
            return {int(item["job_id"]): item
                    for page in pages for item in map(from_item, page["Items"])}

    def runner_records(self) -> dict[str, dict]:
        """Runner records (the pools' seat counters, in the same table, left out)."""
        from chalicelib.dynamodb import from_item
        from chalicelib.runners import SEATS_PREFIX

        with environ(self.direct_env):
            client = _ground_truth_dynamodb()
            pages = client.get_paginator("scan").paginate(TableName=self.tables["runners_table"])
            return {item["runner_name"]: item
                    for page in pages for item in map(from_item, page["Items"])
                    if not item["runner_name"].startswith(SEATS_PREFIX)}

    def put_forecast(self, item) -> None:
        """Write a trainer's forecast item (chalicelib.history.ForecastItem), as the trainer
        Lambda does: what the scaler's floor and the executors' warm targets read."""
        from chalicelib.history import DynamoHistory

        with environ(self.direct_env):
            DynamoHistory(_ground_truth_dynamodb(), self.tables["history_table"]).put_forecast(
                item)

    def seats(self, pool: str) -> dict:
        """The pool's seat counters as stored (`runners`, `warm`)."""
        from chalicelib.dynamodb import from_item
        from chalicelib.runners import seats_key

        with environ(self.direct_env):
            item = _ground_truth_dynamodb().get_item(
                TableName=self.tables["runners_table"],
                Key={"runner_name": {"S": seats_key(pool)}}, ConsistentRead=True).get("Item")
        found = from_item(item) if item else {}
        return {"runners": int(found.get("runners", 0)), "warm": int(found.get("warm", 0))}


def _ground_truth_dynamodb():
    """A DynamoDB client that an injected DynamoDB outage lets through: the harness reads
    what RunnerHub wrote, it is not RunnerHub."""
    import boto3
    from botocore.config import Config

    from devstack.aws_server import GROUND_TRUTH_AGENT

    return boto3.session.Session().client(
        "dynamodb", config=Config(user_agent_extra=GROUND_TRUTH_AGENT,
                                  retries={"mode": "standard", "max_attempts": 5}))


def environ(values: dict[str, str]):
    """Set environment variables for a block (boto3 reads AWS_ENDPOINT_URL from there)."""
    return mock.patch.dict(os.environ, values)
