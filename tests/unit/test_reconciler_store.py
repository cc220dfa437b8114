"""The reconciler's DynamoDB items and queries (mock_aws): lease, state, marks, stuck jobs."""

from __future__ import annotations

import pytest
from moto import mock_aws

from chalicelib import aws
from chalicelib import jobs as m
from chalicelib.deliveries import DynamoDeliveryLog
from chalicelib.jobs import Change, DynamoJobStore, JobState
from chalicelib.reconciler.deliveries import DeliveryCursor, Mark, Pending
from chalicelib.reconciler.state import ReconcilerState
from chalicelib.reconciler.store import (
    LEASE_KEY,
    DynamoDeliveryRecords,
    DynamoJobIndex,
    DynamoLeaseStore,
)
from chalicelib.resources import DELIVERIES_TABLE, JOBS_TABLE
from devstack.resources import create_tables

NOW = 1_700_000_000.0


@pytest.fixture
def dynamodb():
    with mock_aws():
        client = aws.client("dynamodb")
        create_tables(client)
        yield client


def test_one_lease_holder_at_a_time(dynamodb):
    lease = DynamoLeaseStore(dynamodb, DELIVERIES_TABLE.default_name)
    assert lease.acquire("a", NOW, 120) == ReconcilerState()
    assert lease.acquire("b", NOW + 1, 120) is None
    assert lease.acquire("a", NOW + 2, 120) is not None  # the holder may renew
    assert lease.acquire("b", NOW + 123, 120) is not None  # expired: taken over


def test_state_is_saved_only_by_the_lease_holder(dynamodb):
    lease = DynamoLeaseStore(dynamodb, DELIVERIES_TABLE.default_name)
    state = ReconcilerState(DeliveryCursor(7, None, 0, (Pending("g", 3, NOW),)), {"rh-x": NOW})
    lease.acquire("a", NOW, 120)
    assert lease.save("a", state, NOW + 5)
    # Saving releases the lease: the next run may start at once.
    assert lease.acquire("b", NOW + 6, 120) == state
    assert not lease.save("a", ReconcilerState(), NOW + 7)  # overtaken: cannot roll back
    assert lease.acquire("c", NOW + 200, 120) == state


def test_lease_item_does_not_look_like_a_delivery(dynamodb):
    DynamoLeaseStore(dynamodb, DELIVERIES_TABLE.default_name).acquire("a", NOW, 120)
    item = dynamodb.get_item(TableName=DELIVERIES_TABLE.default_name,
                             Key={"delivery_id": {"S": LEASE_KEY}})["Item"]
    assert "status" not in item and "expires_at" not in item


def test_lookup_reads_statuses_and_marks(dynamodb):
    log = DynamoDeliveryLog(dynamodb, DELIVERIES_TABLE.default_name, 3600, 30)
    records = DynamoDeliveryRecords(dynamodb, DELIVERIES_TABLE.default_name)
    log.begin("done-guid", "workflow_job", NOW)
    log.finish("done-guid", NOW, "dispatched", 1)
    log.begin("failed-guid", "workflow_job", NOW)
    log.fail("failed-guid", NOW, "DependencyUnavailable")
    assert records.claim_redelivery("failed-guid", NOW, 600) == Mark(NOW, 1)
    guids = ["done-guid", "failed-guid", "unknown"] + [f"g{i}" for i in range(120)]
    statuses, marks = records.lookup(guids)
    assert statuses == {"done-guid": "done", "failed-guid": "failed"}
    assert marks == {"failed-guid": Mark(NOW, 1)}


def test_redelivery_claim_once_per_interval(dynamodb):
    records = DynamoDeliveryRecords(dynamodb, DELIVERIES_TABLE.default_name)
    assert records.claim_redelivery("g", NOW, 600) == Mark(NOW, 1)
    assert records.claim_redelivery("g", NOW + 599, 600) is None
    assert records.claim_redelivery("g", NOW + 600, 600) == Mark(NOW + 600, 2)


def test_a_redelivery_mark_does_not_block_the_webhook(dynamodb):
    # The mark has its own key: the redelivered webhook still begins the guid.
    records = DynamoDeliveryRecords(dynamodb, DELIVERIES_TABLE.default_name)
    records.claim_redelivery("g", NOW, 600)
    log = DynamoDeliveryLog(dynamodb, DELIVERIES_TABLE.default_name, 3600, 30)
    assert log.begin("g", "workflow_job", NOW + 1)


def test_stale_jobs_come_from_the_by_state_index(dynamodb):
    jobs = DynamoJobStore(dynamodb, JOBS_TABLE.default_name)
    index = DynamoJobIndex(dynamodb, JOBS_TABLE.default_name)
    for job_id, at in ((1, NOW - 900), (2, NOW - 600), (3, NOW - 10)):
        jobs.apply(job_id, m.RECEIVE, at, Change(facts={"pool": "p"}))
    jobs.apply(4, m.RECEIVE, NOW - 900, Change(facts={"pool": "p"}))
    jobs.apply(4, m.DISPATCH, NOW - 900, generation=1)
    stale = index.stale(JobState.RECEIVED, NOW - 300, limit=10)
    assert [job.job_id for job in stale] == [1, 2]  # oldest first, only `received`
    assert [job.job_id for job in index.stale(JobState.RECEIVED, NOW - 300, 1)] == [1]
    assert index.stale(JobState.DISPATCHED, NOW - 300, 0) == []
