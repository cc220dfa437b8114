"""Webhook payloads (every kind validated against octokit's schemas), signatures, the sender's
ordering, and the workload file format."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from emulator.config import AppConfig, EmulatorConfig
from emulator.state import Scope, State
from emulator.testing import WebhookReceiver, generate_app_key, payload_validator
from emulator.webhooks import PayloadBuilder, WebhookSender
from emulator.workload import Workload, load_workload
from tests.conftest import require, shared_dir

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "tests" / "fixtures" / "emulator" / "octokit-webhooks" / "schemas"
SHARED_SCHEMAS = (
    shared_dir()
    / "fixtures"
    / "octokit-webhooks"
    / "schemas"
)
GROUP = (1, "Default", False)


@pytest.fixture(scope="module")
def validate():
    return payload_validator(SCHEMAS)


@pytest.fixture
def builder():
    return PayloadBuilder("http://127.0.0.1:9/api/v3", "http://127.0.0.1:9")


def collect_payloads(builder, owner_type="Organization", installation_id=77, **job_fields):
    """Drive one job through State and build the payload of every transition."""
    payloads = []
    state = State(
        emit=lambda action, snap: payloads.append(builder.build(action, snap)),
        runner_url="http://127.0.0.1:9",
    )
    fields = dict(
        repository="octo-org/app",
        private=True,
        labels=["self-hosted", "linux"],
        duration_s=0.0,
        planned_conclusion="success",
        installation_id=installation_id,
        app_id=5,
        owner_type=owner_type,
    )
    fields.update(job_fields)
    job = state.add_job(None, None, **fields)
    return state, job.id, payloads


def run_to_completion(state, job_id, conclusion="success"):
    _, blob = state.create_runner(
        Scope("org", "octo-org"), f"r{job_id}", ["self-hosted", "linux"], GROUP
    )
    session = state.register_jit(blob)["session"]
    state.poll(session, 0)
    state.acquire(session, job_id)
    state.complete(session, job_id, conclusion)


def test_fixture_schemas_are_an_exact_copy_of_the_shared_ones():
    # May skip on a laptop without ../shared, never under CI=true (there it fails).
    require(SHARED_SCHEMAS.is_dir(), f"the shared octokit-webhooks schemas ({SHARED_SCHEMAS})")
    copies = list(SCHEMAS.rglob("*.json"))
    assert copies, f"no schema copies under {SCHEMAS}"
    for copy in copies:
        assert copy.read_text() == (SHARED_SCHEMAS / copy.relative_to(SCHEMAS)).read_text()


@pytest.mark.parametrize("conclusion", ["success", "failure", "cancelled", "skipped"])
def test_queued_in_progress_completed_payloads_validate(builder, validate, conclusion):
    state, job_id, payloads = collect_payloads(builder)
    state.arrive(job_id)
    run_to_completion(state, job_id, conclusion)
    assert [p["action"] for p in payloads] == ["queued", "in_progress", "completed"]
    for payload in payloads:
        validate(payload)
    queued, in_progress, completed = (p["workflow_job"] for p in payloads)
    assert queued["runner_name"] is None and queued["runner_id"] is None
    assert queued["runner_group_id"] is None and queued["runner_group_name"] is None
    assert in_progress["runner_name"] == completed["runner_name"] == f"r{job_id}"
    assert in_progress["runner_group_name"] == "Default"
    assert completed["conclusion"] == conclusion
    assert completed["completed_at"] is not None


def test_payload_of_org_owned_repo_carries_organization_and_installation(builder):
    state, job_id, payloads = collect_payloads(builder)
    state.arrive(job_id)
    payload = payloads[0]
    assert payload["organization"]["login"] == "octo-org"
    assert payload["installation"]["id"] == 77 and payload["installation"]["node_id"]
    assert payload["repository"]["full_name"] == "octo-org/app"
    assert payload["repository"]["owner"]["type"] == "Organization"
    assert payload["repository"]["private"] is True
    assert payload["workflow_job"]["labels"] == ["self-hosted", "linux"]
    assert payload["workflow_job"]["url"].startswith("http://127.0.0.1:9/api/v3/repos/octo-org/")


def test_payload_of_user_owned_public_repo_has_no_organization(builder, validate):
    state, job_id, payloads = collect_payloads(
        builder, owner_type="User", repository="alice/dotfiles", private=False
    )
    state.arrive(job_id)
    validate(payloads[0])
    assert "organization" not in payloads[0]
    assert payloads[0]["repository"]["private"] is False
    assert payloads[0]["repository"]["visibility"] == "public"
    assert payloads[0]["sender"]["login"] == "alice"


def test_payload_without_installation_validates(builder, validate):
    state, job_id, payloads = collect_payloads(builder, installation_id=None)
    state.arrive(job_id)
    validate(payloads[0])
    assert "installation" not in payloads[0]


@pytest.mark.parametrize("waiting_action", ["waiting", "queued"])
def test_environment_payloads_validate_and_carry_the_deployment(builder, validate, waiting_action):
    state, job_id, payloads = collect_payloads(
        builder, environment="production", environment_wait_s=1.0, waiting_action=waiting_action
    )
    state.arrive(job_id)
    state.approve(job_id)
    run_to_completion(state, job_id)
    assert [(p["action"], p["workflow_job"]["status"]) for p in payloads] == [
        (waiting_action, "waiting"),
        ("queued", "queued"),
        ("in_progress", "in_progress"),
        ("completed", "completed"),
    ]
    for payload in payloads:
        validate(payload)
        assert payload["deployment"]["environment"] == "production"


def test_cancelled_while_waiting_and_while_queued_validate(builder, validate):
    state, waiting, payloads = collect_payloads(builder, environment_wait_s=9.0)
    state.arrive(waiting)
    state.cancel(waiting)
    queued = state.add_job(
        None,
        None,
        repository="octo-org/app",
        private=True,
        labels=["x"],
        duration_s=0,
        planned_conclusion="success",
        installation_id=77,
    ).id
    state.arrive(queued)
    state.cancel(queued)
    completed = [p for p in payloads if p["action"] == "completed"]
    assert len(completed) == 2
    for payload in payloads:
        validate(payload)
    assert all(p["workflow_job"]["conclusion"] == "cancelled" for p in completed)
    assert all(p["workflow_job"]["steps"] == [] for p in completed)


def test_lost_runner_failure_payload_validates(builder, validate):
    state, job_id, payloads = collect_payloads(builder)
    state.lost_runner_timeout_s = 0.0
    state.arrive(job_id)
    _, blob = state.create_runner(Scope("org", "octo-org"), "lost", ["self-hosted", "linux"], GROUP)
    session = state.register_jit(blob)["session"]
    state.poll(session, 0)
    state.acquire(session, job_id)
    time.sleep(0.01)
    state.reap()
    validate(payloads[-1])
    assert payloads[-1]["workflow_job"]["conclusion"] == "failure"


# -- the sender --------------------------------------------------------------------------------


def sender_for(url, secret="topsecret", **cfg):  # noqa: S107 (test secret)
    _, public = generate_app_key()
    config = EmulatorConfig(
        webhook_url=url,
        webhook_secret=secret,
        apps=[AppConfig(app_id=5, public_key_pem=public)],
        **cfg,
    )
    builder = PayloadBuilder("http://127.0.0.1:9", "http://127.0.0.1:9")
    sent = []
    sender = WebhookSender(config, builder, on_sent=lambda *a: sent.append(a))
    return sender, sent


def snapshot_for(job_id, status="queued"):
    state = State()
    job = state.add_job(
        job_id,
        None,
        repository="octo-org/app",
        private=True,
        labels=["l"],
        duration_s=0,
        planned_conclusion="success",
        installation_id=77,
        app_id=5,
    )
    snap = job.snapshot()
    snap["status"] = status
    return snap


def test_deliveries_are_signed_and_carry_githubs_headers():
    with WebhookReceiver() as receiver:
        sender, sent = sender_for(receiver.url)
        sender.start()
        try:
            sender.enqueue_job_event("queued", snapshot_for(1))
            assert sender.flush(5)
        finally:
            sender.stop()
    (got,) = receiver.received
    headers, body = got["headers"], got["body"]
    expected = hmac.new(b"topsecret", body, hashlib.sha256).hexdigest()
    assert headers["X-Hub-Signature-256"] == f"sha256={expected}"
    assert (
        headers["X-Hub-Signature"]
        == "sha1=" + hmac.new(b"topsecret", body, hashlib.sha1).hexdigest()
    )
    assert headers["X-GitHub-Event"] == "workflow_job"
    assert len(headers["X-GitHub-Delivery"]) == 36
    assert headers["X-GitHub-Hook-ID"] == "424242"
    assert headers["X-GitHub-Hook-Installation-Target-ID"] == "5"
    assert headers["X-GitHub-Hook-Installation-Target-Type"] == "integration"
    assert headers["User-Agent"].startswith("GitHub-Hookshot/")
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["workflow_job"]["id"] == 1
    (log,) = sender.deliveries()
    assert (log.status_code, log.status, log.event, log.action) == (
        200,
        "OK",
        "workflow_job",
        "queued",
    )
    assert sent[0][:3] == (1, "queued", "queued")


def test_secret_change_at_runtime_signs_with_the_new_secret():
    with WebhookReceiver() as receiver:
        sender, _ = sender_for(receiver.url)
        sender.start()
        try:
            sender.set_target(secret="rotated")
            sender.enqueue_job_event("queued", snapshot_for(1))
            assert sender.flush(5)
        finally:
            sender.stop()
    got = receiver.received[0]
    expected = hmac.new(b"rotated", got["body"], hashlib.sha256).hexdigest()
    assert got["headers"]["X-Hub-Signature-256"] == f"sha256={expected}"


def test_slow_receiver_keeps_per_job_order_and_does_not_block_enqueue():
    with WebhookReceiver(delay_s=0.05) as receiver:
        sender, _ = sender_for(receiver.url, sender_threads=4)
        sender.start()
        try:
            started = time.monotonic()
            for job_id in range(1, 5):
                for action, status in (
                    ("queued", "queued"),
                    ("in_progress", "in_progress"),
                    ("completed", "completed"),
                ):
                    sender.enqueue_job_event(action, snapshot_for(job_id, status))
            assert time.monotonic() - started < 0.5  # enqueueing never waits for HTTP
            assert sender.flush(10)
        finally:
            sender.stop()
    for job_id in range(1, 5):
        assert [a for a, _ in receiver.events(job_id)] == ["queued", "in_progress", "completed"]


def test_failed_delivery_is_recorded_not_retried():
    with WebhookReceiver(status=500) as receiver:
        sender, _ = sender_for(receiver.url)
        sender.start()
        try:
            sender.enqueue_job_event("queued", snapshot_for(1))
            assert sender.flush(5)
        finally:
            sender.stop()
    assert len(receiver.received) == 1
    (log,) = sender.deliveries()
    assert (log.status_code, log.status) == (500, "Invalid HTTP Response: 500")


def test_unreachable_receiver_is_recorded_as_failed_to_connect():
    with WebhookReceiver() as receiver:
        url = receiver.url
    sender, _ = sender_for(url)
    sender.start()
    try:
        sender.enqueue_job_event("queued", snapshot_for(1))
        assert sender.flush(5)
    finally:
        sender.stop()
    (log,) = sender.deliveries()
    assert (log.status_code, log.status) == (0, "failed to connect to host")


def test_no_secret_means_no_signature_headers():
    with WebhookReceiver() as receiver:
        sender, _ = sender_for(receiver.url, secret="")
        sender.start()
        try:
            sender.enqueue_job_event("queued", snapshot_for(1))
            assert sender.flush(5)
        finally:
            sender.stop()
    headers = receiver.received[0]["headers"]
    assert "X-Hub-Signature-256" not in headers and "X-Hub-Signature" not in headers


# -- workload format ---------------------------------------------------------------------------


def test_workload_file_with_every_field_loads(tmp_path):
    doc = {
        "name": "burst",
        "jobs": [
            {
                "id": 5,
                "run_id": 6,
                "repository": "octo-org/app",
                "private": False,
                "labels": ["self-hosted", "linux"],
                "arrival_s": 0.5,
                "duration_s": 2,
                "conclusion": "failure",
                "cancel_at_s": 1.0,
                "environment_wait_s": 0.2,
                "environment": "prod",
                "waiting_action": "queued",
                "name": "test",
                "workflow_name": "CI",
                "head_branch": "dev",
            },
            {"repository": "octo-org/app", "labels": ["gpu"]},
        ],
    }
    path = tmp_path / "w.json"
    path.write_text(json.dumps(doc))
    workload = load_workload(path)
    assert [j.id for j in workload.jobs] == [5, None]
    assert workload.jobs[1].private is True and workload.jobs[1].conclusion == "success"


@pytest.mark.parametrize(
    "job",
    [
        {"repository": "no-slash", "labels": ["x"]},
        {"repository": "o/r", "labels": []},
        {"repository": "o/r", "labels": [""]},
        {"repository": "o/r", "labels": ["x"] * 101},
        {"repository": "o/r", "labels": ["x"], "arrival_s": -1},
        {"repository": "o/r", "labels": ["x"], "arrival_s": 5, "cancel_at_s": 4},
        {"repository": "o/r", "labels": ["x"], "conclusion": "exploded"},
        {"repository": "o/r", "labels": ["x"], "unknown_field": 1},
    ],
)
def test_invalid_workload_jobs_are_rejected(job):
    with pytest.raises(ValidationError):
        Workload.model_validate({"jobs": [job]})


def test_duplicate_job_ids_are_rejected():
    job = {"id": 1, "repository": "o/r", "labels": ["x"]}
    with pytest.raises(ValidationError):
        Workload.model_validate({"jobs": [job, job]})
