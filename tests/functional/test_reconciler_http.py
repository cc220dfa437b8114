"""The reconciler over real HTTP: DynamoDB and SQS on the moto server, GitHub as the emulator,
the webhook app behind a loopback gateway. A lost webhook is redelivered and recorded; a stuck
job is re-demanded; an orphan runner is deleted."""

from __future__ import annotations

import json
import threading
import time

import pytest
from werkzeug.serving import make_server

from chalicelib import aws
from chalicelib.demand import SqsDemandQueue
from chalicelib.github import GitHubApp, RunnerScope
from chalicelib.jobs import DynamoJobStore
from chalicelib.pools import load_pools
from chalicelib.reconciler import Reconciler
from chalicelib.reconciler_plan import Policy
from chalicelib.reconciler_store import DynamoDeliveryRecords, DynamoJobIndex, DynamoLeaseStore
from chalicelib.runners import DynamoRunnerStore, RunnerState
from chalicelib.telemetry import Telemetry
from devstack.aws_server import QuietHandler
from devstack.webhook_server import LambdaGateway
from emulator import AppConfig, Emulator, EmulatorConfig, InstallationConfig
from emulator.testing import WebhookReceiver, generate_app_key
from tests.harness import SECRET, webhook_stack

APP_ID = 4711
ORG = "octo-org"
INSTALLATION = 1000
LABELS = ["self-hosted", "linux"]
POOLS_TOML = f"""
[[pool]]
name = "linux"
labels = ["self-hosted", "linux", "x64"]
scope = {{ owner = "{ORG}" }}
image = "runnerhub/runner-linux-small:local"
"""


@pytest.fixture(scope="module")
def app_key():
    return generate_app_key()


@pytest.fixture
def stack(aws_endpoint, unique, tmp_path):
    pools_file = tmp_path / "pools.toml"
    pools_file.write_text(POOLS_TOML)
    with webhook_stack(pools_file, unique) as stack:
        stack.pools_file = pools_file
        yield stack


@pytest.fixture
def gateway(stack):
    """The Chalice app over HTTP, serving the stack's webhook service."""
    server = make_server("127.0.0.1", 0, LambdaGateway(), threaded=True,
                         request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/webhook"
    server.shutdown()
    server.server_close()


@pytest.fixture
def broken_endpoint():
    """Where webhooks go while "lost": answers 502, as a failing load balancer would."""
    with WebhookReceiver(status=502) as receiver:
        yield receiver.url


@pytest.fixture
def emulator(app_key, gateway):
    config = EmulatorConfig(
        apps=[AppConfig(app_id=APP_ID, public_key_pem=app_key[1],
                        installations=[InstallationConfig(id=INSTALLATION, account=ORG)])],
        webhook_url=gateway,
        webhook_secret=SECRET.decode(),
    )
    with Emulator(config) as emu:
        yield emu


class Clock:
    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def __call__(self) -> float:
        return time.time() + self.offset


def make_reconciler(stack, emulator, app_key, clock) -> Reconciler:
    dynamodb = aws.client("dynamodb")
    settings = stack.settings
    return Reconciler(
        pools=load_pools(stack.pools_file),
        jobs=DynamoJobStore(dynamodb, settings.jobs_table),
        job_index=DynamoJobIndex(dynamodb, settings.jobs_table),
        runners=DynamoRunnerStore(dynamodb, settings.runners_table),
        demand=SqsDemandQueue(aws.client("sqs"), settings.queue_prefix),
        github=GitHubApp(APP_ID, app_key[0], emulator.base_url),
        deliveries=DynamoDeliveryRecords(dynamodb, settings.deliveries_table),
        lease=DynamoLeaseStore(dynamodb, settings.deliveries_table),
        telemetry=Telemetry("reconciler", emit=False),
        policy=Policy(),
        clock=clock,
    )


def take_messages(stack, pool: str) -> list[dict]:
    """Receive and delete what is on a pool's queue now."""
    answer = stack.sqs.receive_message(QueueUrl=stack.queues[pool], MaxNumberOfMessages=10,
                                       WaitTimeSeconds=0)
    messages = answer.get("Messages", [])
    for message in messages:
        stack.sqs.delete_message(QueueUrl=stack.queues[pool],
                                 ReceiptHandle=message["ReceiptHandle"])
    return [json.loads(message["Body"]) for message in messages]


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_lost_webhook_is_redelivered_and_the_job_recorded(stack, gateway, emulator,
                                                          broken_endpoint, app_key):
    emulator.set_webhook(url=broken_endpoint)
    job_id = emulator.add_job(repository=f"{ORG}/app", labels=LABELS)
    assert emulator.sender.flush(10)
    (lost,) = emulator.deliveries()
    assert lost["status_code"] == 502 and stack.job(job_id) is None

    emulator.set_webhook(url=gateway)  # the outage is over
    reconciler = make_reconciler(stack, emulator, app_key, Clock())
    summary = reconciler.run()
    assert summary.acted and summary.redelivered == 1 and summary.errors == 0
    assert emulator.sender.flush(10)
    assert wait_for(lambda: stack.job(job_id) is not None)
    job = stack.job(job_id)
    assert job["state"] == "dispatched" and job["demand_generation"] == 1
    assert [m["job_id"] for m in stack.messages("linux")] == [job_id]
    redelivery = emulator.deliveries()[-1]
    assert redelivery["guid"] == lost["guid"] and redelivery["redelivery"]
    assert redelivery["status_code"] == 200

    again = reconciler.run()  # reads only the redelivery's attempt: settled
    assert again.redelivered == 0 and again.pending_deliveries == 0 and again.errors == 0
    assert len(emulator.deliveries()) == 2


def test_stuck_job_still_queued_is_re_demanded(stack, emulator, app_key):
    job_id = emulator.add_job(repository=f"{ORG}/app", labels=LABELS)
    assert emulator.sender.flush(10)
    assert wait_for(lambda: (stack.job(job_id) or {}).get("state") == "dispatched")
    # The demand is lost: taken off the queue, never served (a FIFO group stays blocked while
    # a message of it is in flight, so this one is deleted).
    assert [m["generation"] for m in take_messages(stack, "linux")] == [1]

    # Twenty minutes on: nobody claimed the demand, and GitHub still has the job queued.
    later = make_reconciler(stack, emulator, app_key, Clock(offset=1200))
    summary = later.run()
    assert summary.re_demanded == 1 and summary.jobs_checked == 1 and summary.errors == 0
    job = stack.job(job_id)
    assert job["state"] == "dispatched" and job["demand_generation"] == 2
    assert job["redemand_reason"] == "reconciler:stale_dispatched"
    assert [(m["job_id"], m["generation"]) for m in take_messages(stack, "linux")] == [
        (job_id, 2)
    ]


def test_orphan_runner_is_deleted_from_github(stack, emulator, app_key):
    github = GitHubApp(APP_ID, app_key[0], emulator.base_url)
    scope = RunnerScope("org", ORG)
    jit = github.generate_jitconfig(INSTALLATION, scope, "rh-1-1-abcdef", LABELS, 1)
    kept = github.generate_jitconfig(INSTALLATION, scope, "rh-2-1-fedcba", LABELS, 1)
    runners = DynamoRunnerStore(aws.client("dynamodb"), stack.settings.runners_table)
    for name in ("rh-1-1-abcdef", "rh-2-1-fedcba"):
        runners.move(name, RunnerState.STARTING, time.time(), job_id=1, generation=1)
    runners.move("rh-1-1-abcdef", RunnerState.GONE, time.time(), reason="exited")

    # First run: the gone runner goes at once; the other, offline, is only remembered.
    summary = make_reconciler(stack, emulator, app_key, Clock()).run()
    assert summary.orphans_deleted == 1
    names = {runner["name"] for runner in emulator.runners()}
    assert jit.name not in names and kept.name in names


def test_command_runs_once_from_settings(stack, emulator, app_key, tmp_path, monkeypatch,
                                         capsys):
    from chalicelib.reconciler import main

    key_file = tmp_path / "app.pem"
    key_file.write_text(app_key[0])
    monkeypatch.setenv("RUNNERHUB_GITHUB_API_URL", emulator.base_url)
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_ID", str(APP_ID))
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_KEY_FILE", str(key_file))
    monkeypatch.setenv("RUNNERHUB_EMIT_METRICS", "false")
    assert main([]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["acted"] and summary["errors"] == 0 and summary["redelivered"] == 0
