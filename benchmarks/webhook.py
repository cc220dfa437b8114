"""`make bench-webhook`: the whole webhook Lambda handler, app(event, context), on real payloads.

Events are built from the octokit fixture payloads (queued -> in_progress -> completed per job,
plus pings, other events and unroutable jobs), routed by tests/fixtures/pools/fixtures.toml so
that at least 90 % of them create or move a job. Prints one JSON line last:

    own_cpu_*      CPU time per call of the deployed service (wiring.build_webhook_service: the
                   DynamoDB jobs, deliveries and runners stores and the SQS demand sender) on
                   in-memory fake boto3 clients (benchmarks/fake_aws.py), less the CPU spent
                   inside the fakes (they stand in for the network and AWS)
    own_wall_p99_ms  the same calls by the wall clock, less the wall time inside the fakes
    fake_aws_cpu_p50_ms, own_cpu_incl_fake_p99_ms  what was subtracted, and the figure with it
    fake_matches_moto  the same events with the same clock leave the same items and messages
                   in the fakes as in moto (the fakes answer as DynamoDB and SQS do)
    moto_*         wall time per call against in-process moto (mock_aws)
    import_s       cold `import app`, median of 5 fresh processes
    cold_first_response_s  import + first app(event) incl. boto3 client creation, against a
                   moto server on loopback, median of 5 fresh processes
"""

from __future__ import annotations

import argparse
import copy
import itertools
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


def run_events(events: list[dict], clock, meter=None):
    """(timings by `clock`, wall-clock timings, events that moved a job, rejected, time inside
    the fakes by `clock`).

    With a `meter` (benchmarks.fake_aws.Meter), the time spent inside the fake AWS clients is
    taken out of each timing (and reported apart): `clock` must then be time.thread_time."""
    from app import app
    from devstack.webhook_events import LambdaContext

    context = LambdaContext()
    timings, walls, fakes, ok, rejected = [], [], [], 0, 0
    for event in events:
        fake_cpu, fake_wall = (meter.cpu, meter.wall) if meter else (0.0, 0.0)
        started, wall_started = clock(), time.perf_counter()
        response = app(event, context)
        elapsed, wall = clock() - started, time.perf_counter() - wall_started
        if meter:
            fakes.append(meter.cpu - fake_cpu)
            elapsed -= meter.cpu - fake_cpu
            wall -= meter.wall - fake_wall
        timings.append(elapsed)
        walls.append(wall)
        if response["statusCode"] == 200 and '"outcome"' in response["body"] and (
            '"no_change"' not in response["body"]
        ):
            ok += 1
        elif response["statusCode"] >= 400:
            rejected += 1
    return timings, walls, ok, rejected, fakes


class FakeAws:
    """Fake DynamoDB and SQS clients for every table and pool queue, sharing one Meter."""

    def __init__(self, clock=time.monotonic) -> None:
        from benchmarks.fake_aws import FakeDynamoDB, FakeSqs, Meter
        from chalicelib.pools import load_pools
        from chalicelib.resources import TABLES, demand_queue_name
        from chalicelib.settings import WebhookSettings

        self.settings = WebhookSettings()
        names = {"jobs_table": self.settings.jobs_table,
                 "deliveries_table": self.settings.deliveries_table,
                 "runners_table": self.settings.runners_table,
                 "hosts_table": self.settings.hosts_table}
        self.meter = Meter()
        self.dynamodb = FakeDynamoDB(
            {names.get(spec.logical_name, spec.default_name): spec.partition_key[0]
             for spec in TABLES}, self.meter)
        self.sqs = FakeSqs([demand_queue_name(self.settings.queue_prefix, pool.name)
                            for pool in load_pools(self.settings.pools_file).pools],
                           self.meter, clock)

    def service(self, clock=time.time):
        """The webhook service exactly as the Lambda builds it, on these clients."""
        from chalicelib import aws, wiring

        clients = {"dynamodb": self.dynamodb, "sqs": self.sqs}
        real = aws.client
        aws.client = clients.__getitem__
        try:
            return wiring.build_webhook_service(self.settings, clock)
        finally:
            aws.client = real


def silence_stdout():
    """Logs and EMF metrics are still formatted (that is CPU we own) but not shown."""
    from chalicelib.webhook import logger

    sink = open(os.devnull, "w")  # lives for the process
    logger.registered_handler.stream = sink
    sys.stdout = sink


def bench_own_cpu(events: list[dict]):
    """(own CPU, own wall, moved, rejected, CPU inside the fakes) per event."""
    from chalicelib import wiring

    wiring.use(FakeAws().service())
    run_events(events[:100], time.thread_time)  # warm: first-call caches, pydantic schemas
    fake = FakeAws()
    wiring.use(fake.service())
    try:
        return run_events(events, time.thread_time, fake.meter)
    finally:
        wiring.use(None)


def counter_clock(start: float = 1_700_000_000.0, step: float = 0.001):
    """A deterministic clock: both runs of the equivalence check see the same times."""
    ticks = itertools.count()
    return lambda: start + next(ticks) * step


def bench_moto(events: list[dict]) -> tuple[list[float], dict]:
    """Timings against in-process moto, and what moto was left holding."""
    from moto import mock_aws

    from chalicelib import wiring
    from chalicelib.dynamodb import from_item
    from chalicelib.secrets import CachedSecrets
    from devstack.webhook_stack import webhook_stack

    with mock_aws(), webhook_stack(POOLS, "bench", clock=counter_clock()) as stack:
        stack.service._secrets = CachedSecrets(lambda: SECRET.decode(), 60)
        wiring.use(stack.service)
        timings, _, _, _, _ = run_events(events, time.perf_counter)
        held = {"jobs": stack.all_jobs(), "deliveries": [], "runners": [], "messages": {}}
        for kind, table in (("deliveries", stack.settings.deliveries_table),
                            ("runners", stack.settings.runners_table)):
            pages = stack.dynamodb.get_paginator("scan").paginate(TableName=table)
            held[kind] = [from_item(item) for page in pages for item in page["Items"]]
        for pool in stack.pools.pools:
            held["messages"][pool.name] = [
                {k: v for k, v in message.items() if k != "_group"}
                for message in stack.messages(pool.name, limit=100_000)]
    wiring.use(None)
    return timings, held


def fake_holdings(events: list[dict]) -> dict:
    """The same events through the fakes, with the same clock: what they hold afterwards."""
    from chalicelib import wiring
    from chalicelib.dynamodb import from_item
    from chalicelib.resources import demand_queue_name

    fake = FakeAws()
    wiring.use(fake.service(counter_clock()))
    run_events(events, time.perf_counter)
    wiring.use(None)
    settings = fake.settings
    held = {kind: [from_item(item) for item in fake.dynamodb.items(table)]
            for kind, table in (("jobs", settings.jobs_table),
                                ("deliveries", settings.deliveries_table),
                                ("runners", settings.runners_table))}
    from chalicelib.pools import load_pools

    held["messages"] = {
        pool.name: [json.loads(m["Body"])
                    for m in fake.sqs.sent[demand_queue_name(settings.queue_prefix, pool.name)]]
        for pool in load_pools(settings.pools_file).pools}
    return held


def same_holdings(fake: dict, moto: dict) -> list[str]:
    """Differences between what the fakes and moto hold (empty: none)."""
    keys = {"jobs": "job_id", "deliveries": "delivery_id", "runners": "runner_name"}
    differences = []
    for kind, key in keys.items():
        a = {item[key]: item for item in fake[kind]}
        b = {item[key]: item for item in moto[kind]}
        if a != b:
            odd = sorted(set(a) ^ set(b)) or [k for k in a if a[k] != b.get(k)]
            differences.append(f"{kind}: {len(a)} vs {len(b)} items, first odd {odd[:1]}")
    for pool, sent in fake["messages"].items():
        order = lambda body: (body["job_id"], body["generation"])  # noqa: E731
        if sorted(sent, key=order) != sorted(moto["messages"].get(pool, []), key=order):
            differences.append(f"messages of {pool}: {len(sent)} vs "
                               f"{len(moto['messages'].get(pool, []))}")
    return differences


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
    own, own_wall, moved, rejected, fake_cpu = bench_own_cpu(events)
    if moved < 0.9 * len(events) or moved != routed:
        raise SystemExit(f"only {moved} of {len(events)} events moved a job (expected {routed})")
    moto_events, _ = build_events(min(args.events, 1500), 5_000_000)
    held_by_fakes = fake_holdings(moto_events)  # before moto: its stack clears RUNNERHUB_*
    moto, held_by_moto = bench_moto(moto_events)
    sys.stdout = real_stdout
    differences = same_holdings(held_by_fakes, held_by_moto)
    ms = 1000.0
    result = {
        "events": len(events),
        "routed": moved,
        "rejected": rejected,
        "own_cpu_p50_ms": round(percentile(own, 0.50) * ms, 3),
        "own_cpu_p99_ms": round(percentile(own, 0.99) * ms, 3),
        # The same calls by the wall clock (includes what the OS took from us).
        "own_wall_p99_ms": round(percentile(own_wall, 0.99) * ms, 3),
        # What was taken out: the fake clients' own CPU (DynamoDB's and SQS's work).
        "fake_aws_cpu_p50_ms": round(percentile(fake_cpu, 0.50) * ms, 3),
        "own_cpu_incl_fake_p99_ms": round(
            percentile([a + b for a, b in zip(own, fake_cpu, strict=True)], 0.99) * ms, 3),
        "fake_matches_moto": not differences,
        "moto_p50_ms": round(percentile(moto, 0.50) * ms, 3),
        "moto_p99_ms": round(percentile(moto, 0.99) * ms, 3),
        "import_s": round(import_s, 3),
        "cold_first_response_s": round(cold_s, 3),
    }
    for difference in differences:
        print(f"fakes and moto differ: {difference}", file=sys.stderr)
    print(f"moto events: {len(moto)}", file=sys.stderr)
    print(json.dumps(result))
    if differences:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
