"""Host heartbeats and liveness, and finding a host's claims by index: the same behaviour on the
in-memory stores and on DynamoDB (moto)."""

from __future__ import annotations

import pytest
from moto import mock_aws

from chalicelib import aws
from chalicelib import jobs as m
from chalicelib.hosts import (
    DEAD_AFTER_BEATS,
    DynamoClaimIndex,
    DynamoHostStore,
    Heartbeat,
    HostRecord,
    HostState,
    dead_at,
    host_alive,
)
from chalicelib.jobs import Change, DynamoJobStore
from chalicelib.memory import InMemoryClaimIndex, InMemoryHostStore, InMemoryJobStore
from chalicelib.resources import HOSTS_TABLE, JOBS_TABLE, TABLES
from devstack.resources import create_tables


def beat(host_id="h1", state=HostState.SERVING, busy=1, heartbeat_s=10.0) -> Heartbeat:
    return Heartbeat(host_id=host_id, pools=("small", "large"), slots_total=4, slots_busy=busy,
                     runners=busy, version="0.2.0", schema_versions=(1, 1), state=state,
                     heartbeat_s=heartbeat_s, started_at=50.0)


@pytest.mark.parametrize(
    ("record", "now", "alive"),
    [
        (None, 100.0, False),
        ({"state": "serving", "heartbeat_at": 100.0, "heartbeat_s": 10}, 100.0, True),
        ({"state": "draining", "heartbeat_at": 100.0, "heartbeat_s": 10}, 129.0, True),
        ({"state": "serving", "heartbeat_at": 100.0, "heartbeat_s": 10}, 130.0, True),
        ({"state": "serving", "heartbeat_at": 100.0, "heartbeat_s": 10}, 130.5, False),
        ({"state": "stopped", "heartbeat_at": 100.0, "heartbeat_s": 10}, 100.0, False),
        ({"state": "lost", "heartbeat_at": 100.0, "heartbeat_s": 10}, 100.0, False),
    ],
)
def test_a_host_is_alive_while_its_heartbeat_is_fresh_and_it_serves(record, now, alive):
    host = HostRecord(host_id="h1", **record) if record else None
    assert host_alive(host, now) is alive


def test_a_host_is_dead_after_missing_three_of_its_own_beats():
    record = HostRecord(host_id="h1", state="serving", heartbeat_at=100.0, heartbeat_s=2.0)
    assert DEAD_AFTER_BEATS == 3 and dead_at(record) == 106.0


def test_the_hosts_table_is_one_of_the_stacks_tables():
    assert HOSTS_TABLE in TABLES and HOSTS_TABLE.partition_key == ("host_id", "S")
    assert HOSTS_TABLE.ttl_attribute == "expires_at"


@pytest.fixture(params=["memory", "dynamodb"])
def stores(request):
    if request.param == "memory":
        jobs = InMemoryJobStore()
        yield InMemoryHostStore(), jobs, InMemoryClaimIndex(jobs)
        return
    with mock_aws():
        client = aws.client("dynamodb")
        create_tables(client)
        yield (DynamoHostStore(client, HOSTS_TABLE.default_name),
               DynamoJobStore(client, JOBS_TABLE.default_name),
               DynamoClaimIndex(client, JOBS_TABLE.default_name))


def test_heartbeat_carries_the_slot_figures_the_scaler_reads(stores):
    hosts, _, _ = stores
    hosts.beat(beat(busy=3), 100.0)
    record = hosts.get("h1")
    assert record.slots_total == 4 and record.slots_busy == 3 and record.slots_free == 1
    assert list(record.pools) == ["small", "large"] and record.version == "0.2.0"
    assert record.schema_versions == [1, 1] and record.state == "serving"
    assert record.heartbeat_at == 100.0 and record.expires_at > 100
    hosts.beat(beat(host_id="h2"), 101.0)
    assert sorted(r.host_id for r in hosts.all()) == ["h1", "h2"]


def test_mark_lost_only_if_the_host_did_not_beat_again(stores):
    hosts, _, _ = stores
    hosts.beat(beat(), 100.0)
    hosts.beat(beat(), 110.0)  # it came back after we looked at the 100.0 beat
    assert not hosts.mark_lost("h1", 100.0, 200.0, "h2")
    assert hosts.get("h1").state == "serving"
    assert hosts.mark_lost("h1", 110.0, 200.0, "h2")
    record = hosts.get("h1")
    assert record.state == "lost" and record.lost_by == "h2"
    assert not host_alive(record, 110.0)
    hosts.beat(beat(), 300.0)  # a replacement with the same host id serves again
    assert hosts.get("h1").state == "serving"


def test_open_claims_of_a_host_are_found_by_index(stores):
    _, jobs, claims = stores
    for job_id in (1, 2, 3, 4):
        jobs.apply(job_id, m.RECEIVE, 1.0, Change(facts={"pool": "small"}))
    for job_id, host in ((1, "h1"), (2, "h1"), (3, "h2"), (4, "h1")):
        jobs.apply(job_id, m.CLAIM, 2.0, Change(fields={"host_id": host, "lease_until": 9.0}),
                   generation=1)
    jobs.apply(2, m.START_RUNNER, 3.0, generation=1, host_id="h1")
    jobs.apply(4, m.START_JOB, 4.0)  # in progress: GitHub's, no longer a claim
    assert sorted(int(j.job_id) for j in claims.open_claims("h1")) == [1, 2]
    assert [int(j.job_id) for j in claims.open_claims("h2")] == [3]
    assert claims.open_claims("h3") == []
