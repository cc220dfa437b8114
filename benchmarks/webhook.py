"""`make bench-webhook`: the whole webhook Lambda handler, app(event, context), on real payloads.

Events are built from the octokit fixture payloads (queued -> in_progress -> completed per job,
plus pings, other events and unroutable jobs), routed by tests/fixtures/pools/fixtures.toml so
that at least 90 % of them create or move a job. Prints one JSON line last:

    own_cpu_*      CPU time per call with in-memory stores behind the same service
    moto_*         wall time per call against in-process moto (mock_aws)
    import_s       cold `import app`, median of 5 fresh processes
    cold_first_response_s  import + first app(event) incl. boto3 client creation, against a
                   moto server on loopback, median of 5 fresh processes
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "tests" / "fixtures" / "octokit-webhooks" / "examples"
POOLS = ROOT / "tests" / "fixtures" / "pools" / "fixtures.toml"
SECRET = b"bench-secret"
FRESH_PROCESSES = 5


def load(name: str) -> dict:
    return json.loads((EXAMPLES / f"{name}.payload.json").read_text())


def build_events(count: int, first_job_id: int) -> tuple[list[dict], int]:
    """API Gateway events; returns them and how many should create or move a job."""
    lifecycle = [
        load("workflow_job.queued"),
        load("workflow_job.in_progress"),
        load("workflow_job.completed.success.with-organization"),
    ]
    unroutable = load("workflow_job.queued")
    unroutable["workflow_job"]["labels"] = ["windows-latest"]
    extras = [("ping", load("ping")), ("workflow_job", unroutable), ("issues", {"action": "x"})]
    events, moves, job_id = [], [], first_job_id
    while len(events) < count:
        job_id += 1
        for payload in lifecycle:
            payload = copy.deepcopy(payload)
            payload["workflow_job"]["id"] = job_id
            events.append(_event(payload, "workflow_job"))
            moves.append(True)
        if job_id % 10 == 0:  # one in ten jobs brings one event that moves nothing
            event, payload = extras[job_id // 10 % len(extras)]
            events.append(_event(payload, event))
            moves.append(False)
    return events[:count], sum(moves[:count])


def _event(payload: dict, event: str) -> dict:
    from devstack.webhook_events import api_gateway_event, delivery_body, delivery_headers

    body = delivery_body(payload)
    return api_gateway_event(body, delivery_headers(body, SECRET, event))


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def run_events(events: list[dict], clock) -> tuple[list[float], list[float], int, int]:
    """(timings by `clock`, wall-clock timings, events that moved a job, rejected)."""
    from app import app
    from devstack.webhook_events import LambdaContext

    context = LambdaContext()
    timings, walls, ok, rejected = [], [], 0, 0
    for event in events:
        started, wall_started = clock(), time.perf_counter()
        response = app(event, context)
        timings.append(clock() - started)
        walls.append(time.perf_counter() - wall_started)
        if response["statusCode"] == 200 and '"outcome"' in response["body"] and (
            '"no_change"' not in response["body"]
        ):
            ok += 1
        elif response["statusCode"] >= 400:
            rejected += 1
    return timings, walls, ok, rejected


def in_memory_service():
    from chalicelib.deliveries import InMemoryDeliveryLog
    from chalicelib.demand import InMemoryDemandQueue
    from chalicelib.jobs import InMemoryJobStore
    from chalicelib.pools import load_pools
    from chalicelib.runners import InMemoryRunnerStore
    from chalicelib.secrets import CachedSecrets
    from chalicelib.telemetry import Telemetry
    from chalicelib.webhook import WebhookService

    return WebhookService(
        pools=load_pools(POOLS),
        secrets=CachedSecrets(lambda: SECRET.decode(), 60),
        jobs=InMemoryJobStore(),
        deliveries=InMemoryDeliveryLog(),
        demand=InMemoryDemandQueue(),
        runners=InMemoryRunnerStore(),
        telemetry=Telemetry("webhook"),
        max_body_bytes=6 * 1024 * 1024,
    )


def silence_stdout():
    """Logs and EMF metrics are still formatted (that is CPU we own) but not shown."""
    from chalicelib.webhook import logger

    sink = open(os.devnull, "w")  # lives for the process
    logger.registered_handler.stream = sink
    sys.stdout = sink


def bench_own_cpu(events: list[dict]) -> tuple[list[float], list[float], int, int]:
    from chalicelib import wiring

    wiring.use(in_memory_service())
    run_events(events[:100], time.thread_time)  # warm: first-call caches, pydantic schemas
    wiring.use(in_memory_service())
    return run_events(events, time.thread_time)


def bench_moto(events: list[dict]) -> list[float]:
    from moto import mock_aws

    from chalicelib import wiring
    from tests.harness import webhook_stack

    with mock_aws(), webhook_stack(POOLS, "bench") as stack:
        stack.service._secrets = in_memory_service()._secrets
        wiring.use(stack.service)
        timings, _, _, _ = run_events(events, time.perf_counter)
    return timings


CHILD_IMPORT = "import time; t = time.perf_counter(); import app; print(time.perf_counter() - t)"
CHILD_FIRST = """
import json, sys, time
event = json.load(open(sys.argv[1]))
t = time.perf_counter()
from app import app
from devstack.webhook_events import LambdaContext
response = app(event, LambdaContext())
elapsed = time.perf_counter() - t
assert response["statusCode"] == 200, response
print(elapsed)
"""


def fresh_process_seconds(code: str, *args: str, env: dict | None = None) -> float:
    out = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, check=True, capture_output=True, text=True,
        env=env, timeout=120,
    ).stdout
    return float(out.strip().splitlines()[-1])


def bench_cold(tmp: Path) -> tuple[float, float]:
    from chalicelib import aws
    from devstack.aws_server import LocalAws
    from devstack.resources import create_queues, create_tables

    imports = [fresh_process_seconds(CHILD_IMPORT) for _ in range(FRESH_PROCESSES)]
    server = LocalAws().start()
    env = dict(os.environ, AWS_ENDPOINT_URL=server.endpoint_url,
               RUNNERHUB_WEBHOOK_SECRETS=SECRET.decode(), RUNNERHUB_POOLS_FILE=str(POOLS),
               RUNNERHUB_EMIT_METRICS="true")
    saved = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint_url
    try:
        from chalicelib.pools import load_pools

        create_tables(aws.client("dynamodb"))
        create_queues(aws.client("sqs"), load_pools(POOLS), "runnerhub-")
        firsts = []
        events, _ = build_events(FRESH_PROCESSES * 3, 900_000)
        for index in range(FRESH_PROCESSES):
            path = tmp / f"event-{index}.json"
            path.write_text(json.dumps(events[index * 3]))  # a queued: write, send, dispatch
            firsts.append(fresh_process_seconds(CHILD_FIRST, str(path), env=env))
    finally:
        server.stop()
        if saved is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
    return statistics.median(imports), statistics.median(firsts)


def main() -> None:
    parser = argparse.ArgumentParser(description="webhook Lambda handler benchmark")
    parser.add_argument("--events", type=int, default=2000)
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", RUNNERHUB_WEBHOOK_SECRETS=SECRET.decode(),
                      RUNNERHUB_POOLS_FILE=str(POOLS))
    import tempfile

    real_stdout = sys.stdout
    with tempfile.TemporaryDirectory() as tmp:
        import_s, cold_s = bench_cold(Path(tmp))
    events, routed = build_events(args.events, 1_000_000)
    silence_stdout()
    own, own_wall, moved, rejected = bench_own_cpu(events)
    if moved < 0.9 * len(events) or moved != routed:
        raise SystemExit(f"only {moved} of {len(events)} events moved a job (expected {routed})")
    moto_events, _ = build_events(min(args.events, 1500), 5_000_000)
    moto = bench_moto(moto_events)
    sys.stdout = real_stdout
    ms = 1000.0
    result = {
        "events": len(events),
        "routed": moved,
        "rejected": rejected,
        "own_cpu_p50_ms": round(percentile(own, 0.50) * ms, 3),
        "own_cpu_p99_ms": round(percentile(own, 0.99) * ms, 3),
        # The same calls by the wall clock (includes what the OS took from us).
        "own_wall_p99_ms": round(percentile(own_wall, 0.99) * ms, 3),
        "moto_p50_ms": round(percentile(moto, 0.50) * ms, 3),
        "moto_p99_ms": round(percentile(moto, 0.99) * ms, 3),
        "import_s": round(import_s, 3),
        "cold_first_response_s": round(cold_s, 3),
    }
    print(f"moto events: {len(moto)}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
