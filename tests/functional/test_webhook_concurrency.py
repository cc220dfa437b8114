"""Races and failures against the moto server over HTTP: dedupe, claims, SQS outages."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from chalicelib import jobs as m
from chalicelib.demand import SqsDemandQueue
from chalicelib.jobs import Change, DynamoJobStore, JobState
from chalicelib.webhook import WebhookService
from devstack.webhook_stack import webhook_stack
from tests.conftest import TEST_POOLS, example

QUEUED = example("workflow_job.queued")
JOB_ID = QUEUED["workflow_job"]["id"]


@pytest.fixture
def stack(aws_endpoint, unique):
    with webhook_stack(TEST_POOLS, unique) as stack:
        yield stack


def is_duplicate(body: dict) -> bool:
    """The webhook's answer to a delivery id it has taken already (chalicelib/webhook.py)."""
    return body.get("message") == "duplicate delivery" and "outcome" not in body


def is_processed(body: dict) -> bool:
    """Its answer to a delivery it took and carried out: the job's outcome and state."""
    return "outcome" in body and body.get("job_id") == JOB_ID and "message" not in body


def test_one_delivery_ten_times_concurrently_makes_one_job_one_message(stack):
    barrier = threading.Barrier(10)

    def send(_):
        barrier.wait()
        return stack.handle(QUEUED, delivery_id="same")

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(send, range(10)))
    # Both answers are 200 (GitHub must not redeliver either), so tell them apart by body:
    # exactly one attempt took the delivery and dispatched the job; the nine others were
    # answered as duplicates and did nothing.
    assert [status for status, _ in results] == [200] * 10, results
    processed = [body for _, body in results if is_processed(body)]
    duplicates = [body for _, body in results if is_duplicate(body)]
    assert len(processed) == 1, results
    assert len(duplicates) == 9, results
    assert processed[0]["outcome"] == "dispatched" and processed[0]["state"] == "dispatched"
    assert [job["job_id"] for job in stack.all_jobs()] == [JOB_ID]
    assert stack.delivery("same")["status"] == "done"
    assert len(stack.messages("hosted-like")) == 1


def test_two_deliveries_of_queued_concurrently_make_one_job_one_message(stack):
    barrier = threading.Barrier(2)

    def send(delivery_id):
        barrier.wait()
        return stack.handle(QUEUED, delivery_id=delivery_id)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(send, ["first", "second"]))
    # Two delivery ids: neither is a duplicate delivery, both are carried out; the job moves
    # once (one dispatch, or a second send of the same generation that SQS de-duplicates).
    assert [status for status, _ in results] == [200, 200]
    assert all(is_processed(body) for _, body in results), results
    outcomes = sorted(body["outcome"] for _, body in results)
    assert outcomes in (["dispatched", "no_change"], ["dispatched", "dispatched"]), results
    assert len(stack.all_jobs()) == 1 and stack.job(JOB_ID)["demand_generation"] == 1
    assert len(stack.messages("hosted-like")) == 1


def claim_round(store, job_id, claim):
    store.apply(job_id, m.RECEIVE, 1.0, Change(facts={"pool": "p"}))
    barrier = threading.Barrier(2)

    def contender(host):
        barrier.wait()
        return claim(store, job_id, host)

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(contender, ["host-a", "host-b"]))


def conditional_claim(store, job_id, host):
    return store.apply(job_id, m.CLAIM, 2.0, Change(fields={"host_id": host}), generation=1).applied


def read_then_write_claim(store, job_id, host):
    """The bug the conditional write prevents: check the state, then write unconditionally."""
    job = store.get(job_id)
    if job.state not in ("received", "dispatched"):
        return False
    store._client.update_item(
        TableName=store._table, Key={"job_id": {"N": str(job_id)}},
        UpdateExpression="SET #s = :c, host_id = :h",
        ExpressionAttributeNames={"#s": "state"},
        ExpressionAttributeValues={":c": {"S": "claimed"}, ":h": {"S": host}},
    )
    return True


ROUNDS = 200


def test_two_claimers_racing_exactly_one_wins_every_time(stack):
    store = DynamoJobStore(stack.dynamodb, stack.settings.jobs_table)
    for round_ in range(ROUNDS):
        wins = claim_round(store, 10_000 + round_, conditional_claim)
        assert sorted(wins) == [False, True], f"round {round_}: {wins}"
        job = store.get(10_000 + round_)
        assert job.state == JobState.CLAIMED and job.host_id in ("host-a", "host-b")


def test_read_then_write_claim_is_caught_double_winning(stack):
    """The race test can catch a bug: the same harness fails a read-then-write claim."""
    store = DynamoJobStore(stack.dynamodb, stack.settings.jobs_table)
    doubles = sum(
        all(claim_round(store, 20_000 + round_, read_then_write_claim)) for round_ in range(ROUNDS)
    )
    assert doubles > 0, "a read-then-write claim never double-won: the race test has no teeth"


def test_sqs_down_after_job_written_is_5xx_then_redelivery_makes_one_message(stack):
    broken = WebhookService(
        pools=stack.pools, secrets=stack.service._secrets, jobs=stack.service._jobs,
        deliveries=stack.service._deliveries,
        demand=SqsDemandQueue(_unreachable("sqs"), stack.prefix),
        runners=stack.service._runners,
        telemetry=stack.service._telemetry, max_body_bytes=stack.settings.max_body_bytes,
    )
    status, body = stack.handle(QUEUED, delivery_id="outage", service=broken)
    assert status == 503 and body["error"] == "dependency_unavailable"
    job = stack.job(JOB_ID)
    assert job["state"] == "received" and "dispatched_at" not in job
    assert stack.delivery("outage")["status"] == "failed"
    # GitHub (or the reconciler) redelivers the same delivery once SQS is back
    status, body = stack.handle(QUEUED, delivery_id="outage")
    assert (status, body["state"]) == (200, "dispatched")
    assert len(stack.all_jobs()) == 1 and len(stack.messages("hosted-like")) == 1


def test_dynamodb_down_is_5xx_and_stores_nothing(stack):
    from chalicelib.deliveries import DynamoDeliveryLog

    dead_dynamodb = _unreachable("dynamodb")
    broken = WebhookService(
        pools=stack.pools, secrets=stack.service._secrets,
        jobs=DynamoJobStore(dead_dynamodb, stack.settings.jobs_table),
        deliveries=DynamoDeliveryLog(dead_dynamodb, stack.settings.deliveries_table, 3600, 30),
        demand=stack.service._demand, runners=stack.service._runners,
        telemetry=stack.service._telemetry,
        max_body_bytes=stack.settings.max_body_bytes,
    )
    status, _ = stack.handle(QUEUED, delivery_id="ddb-outage", service=broken)
    assert status == 503
    assert stack.all_jobs() == [] and stack.messages("hosted-like") == []
    assert stack.handle(QUEUED, delivery_id="ddb-outage")[0] == 200


def _unreachable(service):
    import boto3
    from botocore.config import Config

    # A loopback port nothing listens on: connection refused at once, like an endpoint outage.
    return boto3.client(
        service, endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
