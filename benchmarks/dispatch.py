"""`make bench-dispatch`: JIT runner registrations per minute across 4 GitHub Apps, within
GitHub's documented rate limits, with zero 403/429.

The emulator enforces per App the quotas GitHub documents
(https://docs.github.com/en/rest/using-the-rest-api/rate-limits-for-the-rest-api):
- primary: 5,000 requests per hour per installation token (the standard floor);
- secondary: 900 points per minute per App, a POST (generate-jitconfig) costing 5 points.
Over a run of M <= 60 minutes, one App can register at most
min(900 / 5 per minute, 5000 / M per minute) JIT runners per minute; `limit_per_min` is that
times the number of Apps. Demand is fed at 1.1x that limit for the whole run (job records and
demand messages written as the webhook would), and one executor in register-only mode
(JIT runners are registered, no containers start) serves it with 4 Apps.

`jit_per_min` counts JIT configs the emulator (GitHub) issued during the run, from its own
record (`State.jit_issued`, also GET /_emulator/stats), not RunnerHub's tables;
`jit_per_app` splits that count by App, and `runnerhub_registered` is what RunnerHub's runners
table says it registered in the same window (they should agree).

Prints as its last line:
    {"apps": N, "minutes": .., "jit_per_min": .., "limit_per_min": .., "http_403_429": 0,
     "p95_queue_to_runner_s": .., "unserved_at_end": .., "jit_per_app": {..},
     "runnerhub_registered": ..}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from chalicelib import aws
from chalicelib import jobs as moves
from chalicelib.demand import DEMAND_SCHEMA_VERSION, DemandMessage, SqsDemandQueue, dispatch
from chalicelib.jobs import Change, DynamoJobStore
from devstack.judge import percentile
from devstack.stack import environ as _environ

ROOT = Path(__file__).resolve().parent.parent
PRIMARY_PER_HOUR = 5000
SECONDARY_POINTS_PER_MIN = 900
JIT_POINTS = 5
ORG = "runnerhub-bench"
POOLS_TOML = f"""
[[pool]]
name = "bench"
labels = ["self-hosted", "linux", "x64"]
scope = {{ owner = "{ORG}" }}
image = "runnerhub/runner-linux-small:local"
max_runners = 1000
"""


def limit_per_min(apps: int, minutes: float) -> float:
    per_app = min(SECONDARY_POINTS_PER_MIN / JIT_POINTS, PRIMARY_PER_HOUR / max(minutes, 1.0))
    return apps * per_app


def feed(env: dict, rate_per_s: float, seconds: float, stop: threading.Event,
         sent: list[int]) -> None:
    """Write job records and demand messages at `rate_per_s`, as the webhook would."""
    with _environ(env):
        jobs = DynamoJobStore(aws.client("dynamodb"), "runnerhub-jobs")
        queue = SqsDemandQueue(aws.client("sqs"), "runnerhub-")
    started = time.monotonic()
    job_id = 90_000_000_000
    while not stop.is_set() and time.monotonic() - started < seconds:
        due = int((time.monotonic() - started) * rate_per_s) + 1
        while len(sent) < due:
            job_id += 1
            now = time.time()
            moved = jobs.apply(job_id, moves.RECEIVE, now, Change(facts={
                "pool": "bench", "repository": f"{ORG}/svc", "owner": ORG,
                "labels": ["self-hosted", "linux"]}))
            dispatch(jobs, queue, DemandMessage(
                schema_version=DEMAND_SCHEMA_VERSION, job_id=job_id,
                generation=moved.generation, pool="bench", labels=("self-hosted", "linux"),
                repository=f"{ORG}/svc", owner=ORG, created_at=now), now)
            sent.append(job_id)
        stop.wait(0.02)


def main() -> None:
    from chalicelib.pools import load_pools
    from devstack.aws_server import LocalAws
    from devstack.resources import create_queues, create_tables
    from emulator import AppConfig, Emulator, EmulatorConfig, InstallationConfig
    from emulator.testing import generate_app_key

    parser = argparse.ArgumentParser(description="JIT registrations per minute benchmark")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--apps", type=int, default=4)
    parser.add_argument("--slots", type=int, default=32)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="runnerhub-bench-dispatch-"))
    pools_file = workdir / "pools.toml"
    pools_file.write_text(POOLS_TOML)
    limit = limit_per_min(args.apps, args.minutes)
    seconds = args.minutes * 60

    server = LocalAws().start()
    env = {"AWS_ENDPOINT_URL": server.endpoint_url, "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    with _environ(env):
        create_tables(aws.client("dynamodb"))
        create_queues(aws.client("sqs"), load_pools(pools_file), "runnerhub-")
    keys, apps = [], []
    for index in range(args.apps):
        private, public = generate_app_key()
        app_id = 7001 + index
        keys.append({"app_id": app_id, "private_key": private})
        apps.append(AppConfig(app_id=app_id, public_key_pem=public, installations=[
            InstallationConfig(id=8001 + index, account=ORG)]))
    secret_file = workdir / "apps.json"
    secret_file.write_text(json.dumps({"apps": keys}))
    secret_file.chmod(0o600)
    quotas = {"enforce": True, "window_s": 3600, "installation": PRIMARY_PER_HOUR,
              "app": PRIMARY_PER_HOUR, "secondary_points": SECONDARY_POINTS_PER_MIN,
              "secondary_window_s": 60, "secondary_scope": "app"}
    emulator = Emulator(EmulatorConfig(apps=apps, faults={"rate_limits": quotas})).start()
    executor_env = {
        **os.environ, **env,
        "RUNNERHUB_POOLS_FILE": str(pools_file), "RUNNERHUB_HOST_ID": "bench-dispatch",
        "RUNNERHUB_GITHUB_API_URL": emulator.base_url,
        "RUNNERHUB_SECRET_BACKEND": "file", "RUNNERHUB_GITHUB_APP_SECRET_ID": str(secret_file),
        "RUNNERHUB_SLOTS": str(args.slots),
        "RUNNERHUB_METRICS_PORT": "0", "RUNNERHUB_POLL_WAIT_S": "1", "RUNNERHUB_TICK_S": "1",
        "RUNNERHUB_JITCONFIG_DIR": str(workdir / "jit"), "RUNNERHUB_DOCKER_NETWORK": "host",
    }
    import subprocess

    log = (workdir / "executor.log").open("w")
    # Register-only: JIT runners are registered with GitHub, no containers start.
    executor = subprocess.Popen(
        [sys.executable, "-m", "devstack.test_executor", "--register-only"], cwd=ROOT,
        env=executor_env, stdout=log, stderr=subprocess.STDOUT)
    stop, sent = threading.Event(), []
    feeder = threading.Thread(target=feed, args=(env, 1.1 * limit / 60, seconds, stop, sent))
    try:
        time.sleep(3)
        issued_before = emulator.state.jit_issued()
        began = time.time()
        feeder.start()
        feeder.join(seconds + 30)
        ended = time.time()
        issued_after = emulator.state.jit_issued()
    finally:
        stop.set()
        executor.terminate()
        try:
            # Workers waiting on an App's budget finish their registration first.
            executor.wait(180)
        except subprocess.TimeoutExpired:
            executor.kill()
            executor.wait()
        with _environ(env):
            from chalicelib.dynamodb import from_item

            pages = aws.client("dynamodb").get_paginator("scan").paginate(
                TableName="runnerhub-runners")
            runners = [from_item(item) for page in pages for item in page["Items"]]
            pages = aws.client("dynamodb").get_paginator("scan").paginate(
                TableName="runnerhub-jobs")
            records = {int(i["job_id"]["N"]): from_item(i) for p in pages for i in p["Items"]}
        refused = emulator.faults_report()["injected"].get("rate_limited", 0)
        emulator.stop()
        server.stop()
    registered = [r for r in runners if r.get("reason") == "register_only"
                  and began <= r.get("gone_at", 0) <= ended]
    served = {int(r["job_id"]): r["gone_at"] for r in registered}
    # Every job demanded during the run counts: one still waiting at the end counts with the
    # time it had waited by then (demand exceeds the limit, so the backlog grows).
    waits = [served.get(job_id, ended) - record["received_at"]
             for job_id, record in records.items() if record["received_at"] <= ended]
    unserved = sum(job_id not in served for job_id, record in records.items()
                   if record["received_at"] <= ended)
    minutes = (ended - began) / 60
    # GitHub's own count: JIT configs the emulator issued between `began` and `ended`.
    per_app = {str(app): issued_after.get(app, 0) - issued_before.get(app, 0)
               for app in sorted(issued_after, key=str)}
    issued = sum(per_app.values())
    result = {
        "apps": args.apps,
        "minutes": round(minutes, 2),
        "jit_per_min": round(issued / minutes, 1),
        "limit_per_min": round(limit, 1),
        "http_403_429": refused,
        "p95_queue_to_runner_s": round(percentile(waits, 0.95) or 0.0, 2),
        "unserved_at_end": unserved,
        "jit_per_app": per_app,
        "runnerhub_registered": len(registered),
    }
    print(f"demand sent: {len(sent)}; JIT configs issued: {issued}; RunnerHub registered: "
          f"{len(registered)}; logs: {workdir}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
