"""Secret hygiene over a whole end-to-end run: no App key, webhook secret, installation token or
JIT config appears in the logs, metrics, DynamoDB items, SQS bodies or `docker inspect` output,
in plain, JSON-escaped or base64 form, nor any line of the PEM key."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.request

import pytest

import emulator.state as emulator_state
from chalicelib import aws
from chalicelib.dynamodb import from_item
from devstack.stack import WEBHOOK_SECRET, LocalStack
from devstack.stack import environ as _environ
from tests.conftest import FIXTURES

pytestmark = [pytest.mark.docker, pytest.mark.slow]
POOLS = FIXTURES / "pools" / "e2e.toml"


def forms(secret: str) -> set[str]:
    """The ways a secret could leak: as is, JSON-escaped, base64 (and its decoded blob)."""
    found = {secret, json.dumps(secret)[1:-1], base64.b64encode(secret.encode()).decode()}
    try:
        found.add(base64.b64decode(secret, validate=True).decode())
    except ValueError:
        pass
    return {form for form in found if len(form) >= 12}


@pytest.fixture
def jit_configs(monkeypatch):
    """Every JIT config the emulator hands out (it keeps only a hash itself)."""
    issued: list[str] = []
    original = emulator_state._encode_jit_config

    def record(*args, **kwargs):
        blob = original(*args, **kwargs)
        issued.append(blob)
        return blob

    monkeypatch.setattr(emulator_state, "_encode_jit_config", record)
    return issued


def test_no_secret_appears_anywhere_in_a_whole_run(docker_client, tmp_path, jit_configs):
    stack = LocalStack(POOLS, tmp_path).start()
    inspected: dict[str, str] = {}
    stop = threading.Event()
    try:
        jobs = [{"repository": "runnerhub-e2e/svc-1", "labels": ["self-hosted", pool],
                 "arrival_s": 0.2 * index, "duration_s": 1.0}
                for index, pool in enumerate(["alpha", "beta", "alpha", "beta", "alpha"])]
        job_ids = stack.emulator.load_workload({"jobs": jobs})
        stack.emulator.run_workload()
        # Phase 1, no executor yet: the demand messages wait on the queues; read their bodies.
        assert stack.wait_for(lambda: len(stack.records()) == len(jobs), 90), \
            [child.log()[-1500:] for child in stack.children]
        bodies = []
        with _environ(stack.direct_env):
            sqs = aws.client("sqs")
            for url in stack.queue_urls.values():
                answer = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                             VisibilityTimeout=0, WaitTimeSeconds=0)
                bodies += [message["Body"] for message in answer.get("Messages", [])]
        assert len(bodies) == len(jobs)

        # Phase 2: an executor runs the jobs; inspect each runner container while it lives.
        executor = stack.start_executor(RUNNERHUB_METRICS_PORT="19464")

        def watch():
            while not stop.is_set():
                for container in docker_client.containers.list(
                        filters={"label": f"runnerhub.host={executor.host_id}"}):
                    inspected.setdefault(container.name, json.dumps(container.attrs))
                stop.wait(0.1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        assert stack.wait_for(lambda: all(stack.emulator.job(i)["status"] == "completed"
                                          for i in job_ids), 90)
        assert stack.wait_for(lambda: all(r.get("state") == "completed"
                                          for r in stack.records().values()), 30)
        metrics = urllib.request.urlopen("http://127.0.0.1:19464/metrics", timeout=5).read()
        stop.set()
        watcher.join(5)
        time.sleep(1.0)
        items = []
        with _environ(stack.direct_env):
            dynamodb = aws.client("dynamodb")
            for table in stack.tables.values():
                for page in dynamodb.get_paginator("scan").paginate(TableName=table):
                    items += [from_item(item) for item in page["Items"]]
        tokens = list(stack.emulator.auth._tokens)
        assert stack.stop_child(executor) == 0
    finally:
        stop.set()
        stack.stop()

    logs = {child.name: child.log() for child in stack.children}
    # First: the evidence is real (non-empty logs naming the run's jobs), so "no secret in it"
    # means something.
    assert logs["webhook"] and logs[f"executor-{executor.host_id}"]
    for job_id in job_ids:
        assert str(job_id) in logs["webhook"] and str(job_id) in logs[
            f"executor-{executor.host_id}"]
    assert len(inspected) >= len(jobs) and len(jit_configs) >= len(jobs) and tokens
    assert b"runnerhub_runners_started" in metrics

    key = stack.app_key_file.read_text()
    secrets = {"webhook secret": [WEBHOOK_SECRET], "App private key": [key],
               "installation tokens": tokens, "JIT configs": jit_configs}
    pem_lines = [line for line in key.splitlines() if len(line) >= 16 and "-----" not in line]
    places = {
        **{f"log {name}": text for name, text in logs.items()},
        "metrics": metrics.decode(),
        "DynamoDB items": json.dumps(items, default=str),
        "SQS bodies": json.dumps(bodies),
        **{f"docker inspect {name}": text for name, text in inspected.items()},
    }
    leaks = []
    for kind, values in secrets.items():
        for value in values:
            for form in forms(value):
                leaks += [f"{kind} in {place}" for place, text in places.items() if form in text]
    for line in pem_lines:
        leaks += [f"PEM line in {place}" for place, text in places.items() if line in text]
    print(f"checked {len(places)} places for {sum(map(len, secrets.values()))} secrets")
    assert not leaks, sorted(set(leaks))
