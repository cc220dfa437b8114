"""POST /webhook through the whole Lambda handler, app(event, context), on mock_aws."""

from __future__ import annotations

import copy
import io
import json

import pytest
from moto import mock_aws

from devstack.webhook_events import FORM
from devstack.webhook_stack import FIXED_NOW, webhook_stack
from tests.conftest import TEST_POOLS, example, example_names


@pytest.fixture
def default_stack(unique):
    with mock_aws(), webhook_stack(None, unique, clock=lambda: FIXED_NOW) as stack:
        yield stack


@pytest.fixture
def stack(unique):
    with mock_aws(), webhook_stack(TEST_POOLS, unique, clock=lambda: FIXED_NOW) as stack:
        yield stack


def event_of(name: str) -> str:
    return "ping" if name.startswith("ping") else "workflow_job"


# --- every octokit fixture, with the default pools: nothing of ours -------------------------

@pytest.mark.parametrize("name", example_names())
def test_fixture_with_default_pools_is_not_stored(default_stack, name):
    status, body = default_stack.post(example(name), event=event_of(name))
    if name.startswith("ping"):
        assert (status, body) == (200, {"message": "pong"})
    else:
        # public repositories with GitHub-hosted labels: not routed, not stored
        assert status == 202 and body["message"] == "job not routed"
        assert body["reason"] in ("no_matching_pool", "public_repository")
    assert default_stack.all_jobs() == []
    for pool in default_stack.queues:
        assert default_stack.messages(pool) == []


# --- every octokit fixture, with a pool file that serves them: the exact record --------------

HELLO = {"pool": "hosted-like", "labels": ["ubuntu-latest"], "run_attempt": 1,
         "updated_at": FIXED_NOW}
K8S = {"pool": "k8s", "labels": ["self-hosted", "k8s"], "run_attempt": 1, "state": "waiting",
       "waiting_at": FIXED_NOW, "updated_at": FIXED_NOW}


def record(name: str) -> dict:
    """The record each fixture must leave, built from what the payload says."""
    payload = example(name)
    job = payload["workflow_job"]
    base = copy.deepcopy(K8S if "lineville" in payload["repository"]["full_name"] else HELLO)
    base.update(
        job_id=job["id"], run_id=job["run_id"], job_name=job["name"],
        workflow_name=job.get("workflow_name"), html_url=job["html_url"],
        created_at=job["created_at"], repository=payload["repository"]["full_name"],
        owner=payload["repository"]["owner"]["login"],
    )
    if "installation" in payload:
        base["installation_id"] = payload["installation"]["id"]
    if name.startswith("workflow_job.in_progress"):
        base.update(state="in_progress", in_progress_at=FIXED_NOW, runner_name=job["runner_name"],
                    runner_id=job["runner_id"], started_at=job["started_at"])
        if "wolfy1339" in base["repository"]:
            base["pool"] = "schemas"
    elif name.startswith("workflow_job.completed"):
        base.update(state="completed", completed_at=FIXED_NOW, conclusion=job["conclusion"],
                    github_completed_at=job["completed_at"], runner_name=job["runner_name"],
                    runner_id=job["runner_id"])
    elif name == "workflow_job.queued":
        base.update(state="dispatched", received_at=FIXED_NOW, dispatched_at=FIXED_NOW,
                    demand_generation=1)
    return {key: value for key, value in base.items() if value is not None}


@pytest.mark.parametrize("name", example_names())
def test_fixture_with_serving_pools_leaves_exact_record(stack, name):
    payload = example(name)
    status, body = stack.post(payload, event=event_of(name))
    if name.startswith("ping"):
        assert (status, body) == (200, {"message": "pong"})
        assert stack.all_jobs() == []
        return
    expected = record(name)
    assert status == 200, body
    assert body["job_id"] == expected["job_id"] and body["state"] == expected["state"]
    assert stack.all_jobs() == [expected]
    messages = {pool: stack.messages(pool) for pool in stack.queues}
    if name == "workflow_job.queued":
        assert messages["hosted-like"] == [
            {
                "schema_version": 1, "job_id": 289782451, "generation": 1, "pool": "hosted-like",
                "labels": ["ubuntu-latest"], "repository": "Codertocat/Hello-World",
                "owner": "Octocoders", "installation_id": payload["installation"]["id"],
                "created_at": FIXED_NOW, "not_before": None, "_group": "289782451",
            }
        ]
    else:
        assert all(found == [] for found in messages.values()), messages


# --- statuses --------------------------------------------------------------------------------

def test_body_over_limit_is_413(stack):
    big = example("workflow_job.queued")
    big["padding"] = "x" * (6 * 1024 * 1024)
    status, body = stack.post(big)
    assert status == 413 and body["error"] == "too_large"
    assert stack.all_jobs() == []


def test_configured_smaller_limit_applies(unique, monkeypatch):
    monkeypatch.setenv("RUNNERHUB_MAX_BODY_BYTES", "4096")
    with mock_aws(), webhook_stack(TEST_POOLS, unique) as stack:
        status, body = stack.post(example("workflow_job.queued"))
    assert status == 413 and "limit of 4096" in body["message"]


def test_limit_above_lambda_maximum_is_a_configuration_error(monkeypatch):
    from pydantic import ValidationError

    from chalicelib.settings import WebhookSettings

    monkeypatch.setenv("RUNNERHUB_WEBHOOK_SECRETS", "s")
    monkeypatch.setenv("RUNNERHUB_MAX_BODY_BYTES", str(7 * 1024 * 1024))
    with pytest.raises(ValidationError, match="less than or equal"):
        WebhookSettings()


@pytest.mark.parametrize(
    ("secret", "headers", "message"),
    [
        (b"wrong", None, "does not match"),
        (None, None, "missing"),
        (None, {"x-hub-signature-256": "sha1=abc"}, "malformed"),
    ],
)
def test_bad_signature_is_401_and_stores_nothing(stack, secret, headers, message):
    status, body = stack.post(example("workflow_job.queued"), secret=secret, headers=headers)
    assert status == 401 and message in body["message"]
    assert stack.all_jobs() == [] and stack.messages("hosted-like") == []


def test_missing_event_header_is_400(stack):
    status, body = stack.post(example("workflow_job.queued"), event=None)
    assert status == 400 and "X-GitHub-Event" in body["message"]


def test_missing_delivery_header_is_400(stack):
    status, body = stack.post(example("workflow_job.queued"), headers={"x-github-delivery": ""})
    assert status == 400 and "X-GitHub-Delivery" in body["message"]


def test_not_json_is_400(stack):
    status, body = stack.post(b"{not json")
    assert status == 400 and "not valid JSON" in body["message"]


def test_deeply_nested_json_is_400(stack):
    status, body = stack.post(b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "nested too deeply" in body["message"]


def test_invalid_workflow_job_payload_is_400_with_field(stack):
    payload = example("workflow_job.queued")
    del payload["workflow_job"]["labels"]
    payload["workflow_job"]["id"] = "not-a-number"
    status, body = stack.post(payload)
    assert status == 400
    assert "workflow_job.labels" in body["message"] and "workflow_job.id" in body["message"]


def test_other_event_is_202_and_counted(stack):
    status, body = stack.post({"action": "opened"}, event="issues")
    assert status == 202 and "issues ignored" in body["message"]
    assert stack.service._telemetry.counts[("WebhookIgnored", "issues")] == 1


def test_other_event_with_bad_json_is_400(stack):
    status, _ = stack.post(b"nope", event="issues")
    assert status == 400


def test_form_encoded_delivery_is_accepted(stack):
    status, body = stack.post(example("workflow_job.queued"), content_type=FORM)
    assert status == 200 and body["state"] == "dispatched"


def test_form_encoded_without_payload_field_is_400(stack):
    status, _ = stack.post(b"", content_type=FORM, headers={})
    assert status == 400


def test_unknown_conclusion_is_stored_not_rejected(stack):
    payload = example("workflow_job.completed.success.with-organization")
    payload["workflow_job"]["conclusion"] = "timed_out"
    status, _ = stack.post(payload)
    assert status == 200 and stack.job(289782451)["conclusion"] == "timed_out"


def test_unknown_action_is_accepted_without_a_move(stack):
    payload = example("workflow_job.queued")
    payload["action"] = "something_new"
    status, body = stack.post(payload)
    assert status == 200 and body["outcome"] == "action_ignored"
    assert stack.job(289782451) is None


def test_unrouted_job_is_202_with_reason_and_counted(stack):
    payload = example("workflow_job.queued")
    payload["workflow_job"]["labels"] = ["windows"]
    status, body = stack.post(payload)
    assert (status, body["reason"]) == (202, "no_matching_pool")
    assert stack.service._telemetry.counts[("JobNotRouted", "no_matching_pool")] == 1


def test_private_flag_is_what_public_refusal_reads(unique):
    payload = example("workflow_job.queued")
    payload["repository"]["owner"]["login"] = "runnerhub-demo"
    payload["workflow_job"]["labels"] = ["self-hosted", "linux"]
    with mock_aws(), webhook_stack(None, unique) as stack:
        assert stack.post(payload)[1]["reason"] == "public_repository"
        payload["repository"]["private"] = True
        status, body = stack.post(payload)
    assert (status, body["pool"]) == (200, "linux-small")


# --- dedupe and ordering ---------------------------------------------------------------------

def test_same_delivery_twice_is_processed_once(stack):
    payload = example("workflow_job.queued")
    assert stack.post(payload, delivery_id="d-1")[0] == 200
    status, body = stack.post(payload, delivery_id="d-1")
    assert status == 200 and body["message"] == "duplicate delivery"
    assert len(stack.messages("hosted-like")) == 1
    assert stack.delivery("d-1")["status"] == "done"


def test_completed_before_queued_and_queued_after_completed(stack):
    completed = example("workflow_job.completed.success.with-organization")
    assert stack.post(completed)[1]["state"] == "completed"
    status, body = stack.post(example("workflow_job.queued"))
    assert status == 200 and body["outcome"] == "no_change" and body["state"] == "completed"
    assert stack.messages("hosted-like") == []


def test_in_progress_twice_is_a_no_op(stack):
    stack.post(example("workflow_job.queued"))
    first = stack.post(example("workflow_job.in_progress"))[1]
    second = stack.post(example("workflow_job.in_progress"))[1]
    assert first["outcome"] == "in_progress" and second["outcome"] == "no_change"


def test_in_progress_for_never_seen_job_creates_it(stack):
    status, body = stack.post(example("workflow_job.in_progress"))
    assert (status, body["state"]) == (200, "in_progress")
    assert stack.messages("hosted-like") == []


def test_waiting_then_approved_queued_makes_one_demand(stack):
    assert stack.post(example("workflow_job.waiting"))[1]["state"] == "waiting"
    assert stack.post(example("workflow_job.queued.with-deployment"))[1]["outcome"] == "no_change"
    approved = example("workflow_job.queued.with-deployment")
    approved["workflow_job"]["status"] = "queued"
    assert stack.post(approved)[1]["state"] == "dispatched"
    assert [m["job_id"] for m in stack.messages("k8s")] == [12877621891]


def test_second_queued_under_new_delivery_does_not_send_twice(stack):
    stack.post(example("workflow_job.queued"))
    status, body = stack.post(example("workflow_job.queued"))
    assert (status, body["outcome"]) == (200, "no_change")
    assert len(stack.messages("hosted-like")) == 1


def test_response_and_logs_carry_no_secret(stack, monkeypatch):
    from chalicelib.webhook import logger

    stream = io.StringIO()
    monkeypatch.setattr(logger.registered_handler, "stream", stream)
    responses = [
        stack.post(example("workflow_job.queued"), secret=b"wrong"),
        stack.post(example("workflow_job.queued")),
    ]
    text = stream.getvalue()
    assert "test-webhook-secret" not in text + json.dumps(responses)
    lines = [json.loads(line) for line in text.splitlines()]
    logged = [line for line in lines if line.get("message", "").startswith("workflow_job")]
    assert logged and logged[-1]["job_id"] == 289782451 and logged[-1]["pool"] == "hosted-like"
    assert logged[-1]["delivery_id"]


# --- a bug is a 500, an outage a 503 ----------------------------------------------------------


class RaisingClient:
    """The store's real DynamoDB client, except that `update_item` raises `error`."""

    def __init__(self, real, error: Exception) -> None:
        self._real = real
        self.error = error

    def __getattr__(self, name):
        return getattr(self._real, name)

    def update_item(self, **request):
        raise self.error


def logged_lines(monkeypatch) -> io.StringIO:
    from chalicelib.webhook import logger

    stream = io.StringIO()
    monkeypatch.setattr(logger.registered_handler, "stream", stream)
    return stream


def test_code_bug_is_500_with_stack_logged_and_counted_not_dependency_unavailable(
    stack, monkeypatch
):
    from botocore.exceptions import ParamValidationError

    jobs = stack.service._jobs
    bug = ParamValidationError(report="Invalid type for parameter ExpressionAttributeValues")
    monkeypatch.setattr(jobs, "_client", RaisingClient(jobs._client, bug))
    stream = logged_lines(monkeypatch)
    status, body = stack.post(example("workflow_job.queued"), delivery_id="d-bug")
    assert (status, body) == (500, {"error": "internal_error"})
    assert "Traceback" not in json.dumps(body)
    counts = stack.service._telemetry.counts
    assert counts[("WebhookInternalError", "ParamValidationError")] == 1
    assert not any(name == "WebhookFailed" for name, _ in counts)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    failed = [line for line in lines if line.get("level") == "ERROR"]
    assert failed and "Traceback" in failed[0]["exception"]
    assert "ParamValidationError" in failed[0]["exception"]
    assert stack.delivery("d-bug")["status"] == "failed"  # GitHub may redeliver it


def test_dynamodb_throttling_is_503_dependency_unavailable(stack, monkeypatch):
    from botocore.exceptions import ClientError

    jobs = stack.service._jobs
    throttled = ClientError({"Error": {"Code": "ProvisionedThroughputExceededException",
                                       "Message": "slow down"}}, "UpdateItem")
    monkeypatch.setattr(jobs, "_client", RaisingClient(jobs._client, throttled))
    status, body = stack.post(example("workflow_job.queued"), delivery_id="d-slow")
    assert (status, body["error"]) == (503, "dependency_unavailable")
    assert stack.service._telemetry.counts[("WebhookFailed", "dynamodb")] == 1
    assert stack.service._telemetry.total("WebhookInternalError") == 0
    assert stack.delivery("d-slow")["status"] == "failed"
