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
from chalicelib.reconciler.policy import Policy
from chalicelib.reconciler.store import DynamoDeliveryRecords, DynamoJobIndex, DynamoLeaseStore
from chalicelib.runners import DynamoRunnerStore, RunnerState
from chalicelib.telemetry import Telemetry
from devstack.aws_server import QuietHandler
from devstack.webhook_server import LambdaGateway
from devstack.webhook_stack import SECRET, webhook_stack
from emulator import AppConfig, Emulator, EmulatorConfig, InstallationConfig
from emulator.testing import WebhookReceiver, generate_app_key
from tests.conftest import wait_for

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


def make_reconciler(stack, emulator, app_key, clock, **extra) -> Reconciler:
    # The reconciler's own stores, wired as the Lambda wires them: its calls are recorded as
    # the reconciler's (tests/infra/test_iam_calls.py).
    dynamodb = aws.client("dynamodb", aws.RECONCILER)
    settings = stack.settings
    return Reconciler(
        pools=load_pools(stack.pools_file),
        jobs=DynamoJobStore(dynamodb, settings.jobs_table),
        job_index=DynamoJobIndex(dynamodb, settings.jobs_table),
        runners=DynamoRunnerStore(dynamodb, settings.runners_table),
        demand=SqsDemandQueue(aws.client("sqs", aws.RECONCILER), settings.queue_prefix),
        github=GitHubApp(APP_ID, app_key[0], emulator.base_url),
        deliveries=DynamoDeliveryRecords(dynamodb, settings.deliveries_table),
        lease=DynamoLeaseStore(dynamodb, settings.deliveries_table),
        telemetry=Telemetry("reconciler", emit=False),
        policy=Policy(),
        clock=clock,
        **extra,
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
    assert wait_for(lambda: stack.job(job_id) is not None, timeout=10)
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
    assert wait_for(lambda: (stack.job(job_id) or {}).get("state") == "dispatched", timeout=10)
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
    from chalicelib.reconciler.__main__ import main

    key_file = tmp_path / "app.pem"
    key_file.write_text(app_key[0])
    monkeypatch.setenv("RUNNERHUB_GITHUB_API_URL", emulator.base_url)
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_ID", str(APP_ID))
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_KEY_FILE", str(key_file))
    monkeypatch.setenv("RUNNERHUB_EMIT_METRICS", "false")
    assert main([]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["acted"] and summary["errors"] == 0 and summary["redelivered"] == 0


# --- several Apps ----------------------------------------------------------------------------

APP_2 = 4712
INSTALLATION_2 = 2000


@pytest.fixture
def two_apps(app_key, gateway):
    """App 1 sees only `octo-org/app`; App 2 the whole organisation: a job in another
    repository is announced to App 2's webhook only, and logged in App 2's delivery log."""
    second_key = generate_app_key()
    config = EmulatorConfig(
        apps=[
            AppConfig(app_id=APP_ID, public_key_pem=app_key[1],
                      installations=[InstallationConfig(id=INSTALLATION, account=ORG,
                                                        repositories=["app"])]),
            AppConfig(app_id=APP_2, public_key_pem=second_key[1],
                      installations=[InstallationConfig(id=INSTALLATION_2, account=ORG)]),
        ],
        webhook_url=gateway,
        webhook_secret=SECRET.decode(),
    )
    with Emulator(config) as emu:
        yield emu, second_key


def test_lost_webhook_of_the_second_app_is_redelivered(stack, gateway, two_apps, app_key,
                                                       broken_endpoint, tmp_path, monkeypatch):
    from chalicelib import wiring
    from chalicelib.reconciler.settings import ReconcilerSettings

    emulator, second_key = two_apps
    emulator.set_webhook(url=broken_endpoint)
    job_id = emulator.add_job(repository=f"{ORG}/second", labels=LABELS)
    assert emulator.sender.flush(10)
    (lost,) = emulator.deliveries()
    assert lost["status_code"] == 502 and lost["installation_id"] == INSTALLATION_2
    emulator.set_webhook(url=gateway)

    secret = tmp_path / "apps.json"
    secret.write_text(json.dumps([{"app_id": APP_ID, "private_key": app_key[0]},
                                  {"app_id": APP_2, "private_key": second_key[0]}]))
    monkeypatch.setenv("RUNNERHUB_SECRET_BACKEND", "file")
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_SECRET_ID", str(secret))
    monkeypatch.setenv("RUNNERHUB_GITHUB_API_URL", emulator.base_url)
    monkeypatch.setenv("RUNNERHUB_EMIT_METRICS", "false")
    monkeypatch.setenv("RUNNERHUB_DISCOVERY", "false")  # only the delivery log may find it
    reconciler = wiring.build_reconciler(ReconcilerSettings())
    summary = reconciler.run()
    assert summary.redelivered == 1 and summary.errors == 0
    assert emulator.sender.flush(10)
    assert wait_for(lambda: (stack.job(job_id) or {}).get("state") == "dispatched", timeout=10)
    redelivery = emulator.deliveries()[-1]
    assert redelivery["guid"] == lost["guid"] and redelivery["status_code"] == 200


# --- dead-lettered demand --------------------------------------------------------------------


def dead_letter(stack, pool: str) -> list[dict]:
    """Receive the pool's message until SQS moves it to the DLQ (its receive count exceeds
    the redrive policy's maximum), as an executor failing its claims would."""
    from chalicelib.resources import DEMAND_MAX_RECEIVES, dead_letter_queue_name

    for _ in range(DEMAND_MAX_RECEIVES + 1):
        stack.sqs.receive_message(QueueUrl=stack.queues[pool], MaxNumberOfMessages=10,
                                  WaitTimeSeconds=0, VisibilityTimeout=0)
    dlq = stack.sqs.get_queue_url(
        QueueName=dead_letter_queue_name(stack.settings.queue_prefix, pool))["QueueUrl"]
    answer = stack.sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                       VisibilityTimeout=0)
    return [json.loads(message["Body"]) for message in answer.get("Messages", [])]


def test_dead_lettered_demand_of_a_queued_job_goes_back_to_its_queue_at_once(stack, emulator,
                                                                             app_key):
    job_id = emulator.add_job(repository=f"{ORG}/app", labels=LABELS)
    assert emulator.sender.flush(10)
    assert wait_for(lambda: (stack.job(job_id) or {}).get("state") == "dispatched", timeout=10)
    assert [(m["job_id"], m["generation"]) for m in dead_letter(stack, "linux")] == [(job_id, 1)]
    assert take_messages(stack, "linux") == []

    # A minute later, not the 15 minutes after which a dispatched job counts as stuck.
    demand = SqsDemandQueue(aws.client("sqs", aws.RECONCILER), stack.settings.queue_prefix)
    reconciler = make_reconciler(stack, emulator, app_key, Clock(offset=60), dead_letters=demand)
    summary = reconciler.run()
    assert summary.redriven == 1 and summary.re_demanded == 0 and summary.errors == 0
    job = stack.job(job_id)
    assert job["demand_generation"] == 2 and job["redemand_reason"] == "reconciler:dead_lettered"
    assert [(m["job_id"], m["generation"]) for m in take_messages(stack, "linux")] == [
        (job_id, 2)
    ]
    assert demand.dead_letters("linux", 10) == []  # the DLQ message is gone


# --- queued jobs GitHub never announced --------------------------------------------------------


def test_github_client_pages_through_repositories_runs_and_jobs(stack, emulator, app_key):
    github = GitHubApp(APP_ID, app_key[0], emulator.base_url)
    for name in ("a", "b", "c"):
        emulator.add_job(repository=f"{ORG}/{name}", labels=LABELS, run_id=500)
    for _ in range(2):
        emulator.add_job(repository=f"{ORG}/a", labels=LABELS, run_id=501)
    names, page = [], 1
    while page:
        listed = github.list_installation_repositories(INSTALLATION, page, per_page=2)
        names += [repo["full_name"] for repo in listed.items]
        assert listed.total_count == 3
        page = listed.next_page
    assert names == [f"{ORG}/a", f"{ORG}/b", f"{ORG}/c"]
    runs = github.list_queued_runs(INSTALLATION, f"{ORG}/a", per_page=1)
    assert runs.total_count == 2 and runs.next_page == 2 and len(runs.items) == 1
    jobs = github.list_run_jobs(INSTALLATION, f"{ORG}/a", 501, per_page=1)
    assert jobs.total_count == 2 and jobs.next_page == 2
    assert jobs.items[0]["status"] == "queued" and jobs.items[0]["run_id"] == 501


def test_job_whose_queued_webhook_was_never_sent_is_found_and_demanded(stack, emulator,
                                                                       app_key):
    from chalicelib.webhook import JobIntake

    emulator.set_webhook(url="")  # GitHub sends (and logs) nothing: a webhook incident
    never_sent = [emulator.add_job(repository=f"{ORG}/app", labels=LABELS, run_id=900),
                  emulator.add_job(repository=f"{ORG}/app", labels=LABELS, run_id=900),
                  emulator.add_job(repository=f"{ORG}/lib", labels=LABELS)]
    not_ours = emulator.add_job(repository=f"{ORG}/lib", labels=["windows"])
    assert emulator.sender.flush(10)
    assert emulator.deliveries() == []

    dynamodb, sqs = aws.client("dynamodb"), aws.client("sqs")
    settings = stack.settings
    jobs = DynamoJobStore(dynamodb, settings.jobs_table)
    demand = SqsDemandQueue(sqs, settings.queue_prefix)
    runners = DynamoRunnerStore(dynamodb, settings.runners_table)
    telemetry = Telemetry("reconciler", emit=False)
    intake = JobIntake(jobs=jobs, demand=demand, runners=runners, telemetry=telemetry)
    reconciler = make_reconciler(stack, emulator, app_key, Clock(), intake=intake)
    summary = reconciler.run()
    assert summary.discovered == 3 and summary.errors == 0
    # One repositories page, one runs page per repository, one jobs page per queued run.
    assert summary.discovery_calls == 1 + 2 + 3
    for job_id in never_sent:
        job = stack.job(job_id)
        assert job["state"] == "dispatched" and job["demand_generation"] == 1
        assert job["installation_id"] == INSTALLATION and job["pool"] == "linux"
    assert stack.job(not_ours) is None
    assert sorted(m["job_id"] for m in take_messages(stack, "linux")) == sorted(never_sent)

    again = reconciler.run()  # the sweep is done; the next lists again and knows them all
    assert again.discovered == 0 and take_messages(stack, "linux") == []
