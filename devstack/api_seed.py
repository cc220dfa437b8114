"""The management API on loopback against a moto server, with a small seeded state: one pool
(with an override), jobs in several states (one flagged), a serving idle host and a busy one,
an idle and a busy runner. Shared by tests/functional/test_api_http.py and
benchmarks/fuzz_api.py.

    api = ApiStack(workdir, key_pair).start()   # AWS_ENDPOINT_URL must name the moto server
    seed(api.dynamodb, api.names); api.token("viewer"); api.url; api.stop()
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chalicelib import aws, resources
from chalicelib import jobs as moves
from chalicelib.hosts import DynamoHostStore, Heartbeat, HostState
from chalicelib.jobs import Change, DynamoJobStore
from chalicelib.overrides import DynamoOverrideStore
from chalicelib.pools import load_pools
from chalicelib.runners import DynamoRunnerStore, RunnerState
from devstack.resources import create_queues, create_tables

POOLS_TOML = """
[[pool]]
name = "linux"
labels = ["self-hosted", "linux"]
scope = { owner = "octo-org" }
image = "runnerhub/runner-linux-small:local"
max_runners = 6
warm_runners = 1
"""
POOL = "linux"
# What seed() writes, by kind: callers (the fuzzer) steer ids towards records that exist.
JOB_IDS = (9001, 9002, 9003, *range(9100, 9105))
FLAGGED_JOB = 9003
HOST_IDS = ("host-idle", "host-busy")
RUNNER_NAMES = ("rh-idle", "rh-busy")


class ApiStack:
    """Tables and queues of their own (unique names), the API wired to them, served over HTTP.
    `key_pair`: (private key PEM, public key path) of the local tokens. `github`: builds the
    GitHub App client (None: retry and redeliver answer 503, as unconfigured)."""

    def __init__(self, workdir: Path, key_pair: tuple[bytes, Path], *,
                 github: Callable[[], Any] | None = None) -> None:
        self.workdir = workdir
        self.private_key, self.public_key = key_pair
        self.github = github
        self.server: Any = None

    def start(self) -> ApiStack:
        import api_app
        from chalicelib.api.service import build
        from chalicelib.api.settings import ApiSettings
        from devstack.api_server import serve

        unique = f"api{int(time.time() * 1000) % 10**8}"
        pools_file = self.workdir / "pools.toml"
        pools_file.write_text(POOLS_TOML)
        self.names = {spec.logical_name:
                      f"rh-{unique}-{spec.default_name.removeprefix('runnerhub-')}"
                      for spec in resources.TABLES}
        self.dynamodb = aws.client("dynamodb")
        create_tables(self.dynamodb, self.names)
        create_queues(aws.client("sqs"), load_pools(pools_file), f"rh-{unique}-")
        self.settings = ApiSettings(api_auth="local", api_jwt_public_key_file=self.public_key,
                                    pools_file=pools_file, queue_prefix=f"rh-{unique}-",
                                    **self.names)
        self.service = build(self.settings, github=self.github)
        api_app.use(self.service)
        self.server, self.url = serve()
        return self

    def token(self, role: str | None, **extra: Any) -> str:
        from chalicelib.api.tokens import mint

        return mint(self.private_key, groups=[role] if role else None, sub=f"sub-{role}",
                    username=f"{role}-user", **extra)

    def stop(self) -> None:
        import api_app

        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        api_app.use(None)


def seed(client: Any, names: dict[str, str], now: float | None = None) -> float:
    """A job through its stamps, two dispatched jobs (one flagged), five received; a serving
    idle host and a busy one; an idle and a busy runner; an override on the pool. Returns the
    time it was seeded at."""
    now = time.time() if now is None else now
    jobs = DynamoJobStore(client, names["jobs_table"])
    facts = Change(facts={"pool": POOL, "repository": "octo-org/app", "owner": "octo-org",
                          "labels": ["self-hosted", "linux"],
                          "created_at": datetime.fromtimestamp(now - 31, UTC).isoformat()})
    jobs.apply(9001, moves.RECEIVE, now - 30, facts)
    jobs.apply(9001, moves.DISPATCH, now - 29.9, generation=1)
    jobs.apply(9001, moves.CLAIM, now - 29, Change(fields={"host_id": "host-busy"}),
               generation=1)
    jobs.apply(9001, moves.START_RUNNER, now - 28, Change(fields={"started_runner": "rh-idle"}),
               generation=1, host_id="host-busy")
    jobs.apply(9001, moves.START_JOB, now - 5, Change(fields={"runner_name": "rh-busy"}))
    for job_id, flagged in ((9002, None), (FLAGGED_JOB, True)):
        jobs.apply(job_id, moves.RECEIVE, now - 30, facts)
        jobs.apply(job_id, moves.DISPATCH, now - 29, Change(fields={"flagged": flagged}),
                   generation=1)
    for job_id in range(9100, 9105):
        jobs.apply(job_id, moves.RECEIVE, now - 20 + job_id % 100, facts)
    hosts = DynamoHostStore(client, names["hosts_table"])
    for host_id, busy in (("host-idle", 0), ("host-busy", 2)):
        hosts.beat(Heartbeat(host_id=host_id, pools=(POOL,), slots_total=4, slots_busy=busy,
                             runners=busy, version="test", schema_versions=(1, 1),
                             state=HostState.SERVING, heartbeat_s=60.0, started_at=now - 100),
                   now)
    runners = DynamoRunnerStore(client, names["runners_table"])
    for name in RUNNER_NAMES:
        runners.start(name, now - 10, pool=POOL, max_runners=6, host_id="host-busy",
                      job_id=9001, generation=1)
        runners.move(name, RunnerState.IDLE, now - 9, jit_s=0.4, container_start_s=0.8)
    runners.move("rh-busy", RunnerState.BUSY, now - 5, took_job_id=9001)
    DynamoOverrideStore(client, names["runners_table"]).set(
        POOL, {"min_hosts": 0, "max_hosts": 2}, by="seed", now=now)
    return now
