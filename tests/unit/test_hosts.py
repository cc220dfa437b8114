"""Host heartbeats and liveness, and finding a host's claims by index: the same behaviour on the
in-memory stores and on DynamoDB (moto)."""

from __future__ import annotations

import pytest
from moto import mock_aws

from chalicelib import aws
from chalicelib import jobs as m
from chalicelib.dynamodb import TRANSACTION_ATTEMPTS
from chalicelib.errors import DependencyUnavailable
from chalicelib.hosts import (
    DEAD_AFTER_BEATS,
    NOT_A_HOST_PREFIX,
    DynamoClaimIndex,
    DynamoHostStore,
    Heartbeat,
    HostNotServing,
    HostRecord,
    HostState,
    dead_at,
    host_alive,
)
from chalicelib.jobs import Change, DynamoJobStore
from chalicelib.memory import InMemoryClaimIndex, InMemoryHostStore, InMemoryJobStore
from chalicelib.resources import HOSTS_TABLE, JOBS_TABLE, TABLES
from devstack.resources import create_tables


def beat(host_id="h1", state=HostState.SERVING, busy=1, heartbeat_s=10.0, started_at=50.0,
         clean=None) -> Heartbeat:
    return Heartbeat(host_id=host_id, pools=("small", "large"), slots_total=4, slots_busy=busy,
                     runners=busy, version="0.2.0", schema_versions=(1, 1), state=state,
                     heartbeat_s=heartbeat_s, started_at=started_at, clean=clean)


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
        # retiring: alive while it beats (its heartbeat goes on until it is terminated)
        ({"state": "retiring", "heartbeat_at": 100.0, "heartbeat_s": 10}, 129.0, True),
        ({"state": "retiring", "heartbeat_at": 100.0, "heartbeat_s": 10}, 131.0, False),
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
    # the same daemon beating again stays lost: its work was taken over
    assert hosts.beat(beat(), 300.0) is HostState.LOST
    assert hosts.get("h1").state == "lost" and hosts.get("h1").heartbeat_at == 300.0
    # a new incarnation (a daemon restarted with the same host id) serves again
    assert hosts.beat(beat(started_at=290.0), 301.0) is HostState.SERVING
    record = hosts.get("h1")
    assert record.state == "serving" and "lost_by" not in record.as_dict()


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


# --- retiring: heartbeats never undo it; the claim transaction against the retirement -------------


def test_heartbeat_never_changes_retiring_but_updates_the_rest(stores):
    hosts, _, _ = stores
    assert hosts.beat(beat(busy=0), 100.0) is HostState.SERVING
    assert hosts.retire("h1", 101.0, fresh_after=95.0, by="scaler")
    assert hosts.beat(beat(busy=0), 110.0) is HostState.RETIRING
    assert hosts.beat(beat(busy=0, started_at=105.0), 111.0) is HostState.RETIRING  # restarted
    assert hosts.beat(beat(busy=0, state=HostState.DRAINING), 112.0) is HostState.RETIRING
    record = hosts.get("h1")
    assert record.state == "retiring" and record.heartbeat_at == 112.0
    assert host_alive(record, 112.0)
    assert hosts.unretire("h1", 113.0) and not hosts.unretire("h1", 114.0)
    assert hosts.beat(beat(busy=0), 115.0) is HostState.SERVING


def test_a_stopped_hosts_clean_flag_is_dropped_by_its_next_incarnation(stores):
    hosts, _, _ = stores
    hosts.beat(beat(state=HostState.STOPPED, clean=True), 100.0)
    assert hosts.get("h1").clean is True
    hosts.beat(beat(started_at=120.0), 121.0)
    assert hosts.get("h1").clean is None and hosts.get("h1").state == "serving"


@pytest.mark.parametrize(
    ("why", "record", "fresh_after"),
    [
        ("busy slot", {"busy": 1}, 90.0),
        ("stale heartbeat", {}, 100.5),
        ("draining", {"state": HostState.DRAINING}, 90.0),
        ("stopped", {"state": HostState.STOPPED}, 90.0),
    ],
)
def test_retire_only_from_serving_idle_and_fresh(stores, why, record, fresh_after):
    hosts, _, _ = stores
    hosts.beat(beat(busy=record.get("busy", 0), state=record.get("state", HostState.SERVING)),
               100.0)
    assert not hosts.retire("h1", 101.0, fresh_after=fresh_after, by="scaler"), why
    assert hosts.get("h1").state == record.get("state", HostState.SERVING)


def test_retire_fails_for_a_host_whose_last_claim_its_heartbeat_has_not_seen(stores):
    hosts, jobs, _ = stores
    hosts.beat(beat(busy=0), 100.0)
    jobs.apply(1, m.RECEIVE, 100.0, Change(facts={"pool": "small"}))
    # claimed after the heartbeat: the heartbeat's slots_busy = 0 may not count it yet
    assert hosts.claim("h1", jobs, 1, m.CLAIM, 100.5, Change(fields={"host_id": "h1"}),
                       generation=1).applied
    record = hosts.get("h1")
    assert record.claims == 1 and record.last_claim_at == 100.5
    assert not hosts.retire("h1", 101.0, fresh_after=90.0, by="scaler")
    hosts.beat(beat(busy=0), 102.0)  # a later heartbeat saw it (its runner already ended)
    assert hosts.retire("h1", 103.0, fresh_after=90.0, by="scaler")


def test_a_claim_by_a_retiring_host_leaves_the_job_untouched(stores):
    hosts, jobs, _ = stores
    hosts.beat(beat(busy=0), 100.0)
    jobs.apply(1, m.RECEIVE, 100.0, Change(facts={"pool": "small"}))
    assert hosts.retire("h1", 101.0, fresh_after=90.0, by="scaler")
    with pytest.raises(HostNotServing) as refused:
        hosts.claim("h1", jobs, 1, m.CLAIM, 102.0, Change(fields={"host_id": "h1"}),
                    generation=1)
    assert refused.value.state is HostState.RETIRING
    assert jobs.get(1).state == "received" and jobs.get(1).host_id is None
    assert hosts.get("h1").claims == 0


def test_a_claim_by_a_host_without_a_record_is_refused_as_unknown(stores):
    hosts, jobs, _ = stores
    jobs.apply(1, m.RECEIVE, 100.0, Change(facts={"pool": "small"}))
    with pytest.raises(HostNotServing) as refused:
        hosts.claim("h9", jobs, 1, m.CLAIM, 102.0, generation=1)
    assert refused.value.state is None and hosts.get("h9") is None


def test_a_refused_job_move_in_a_claim_returns_the_job_as_found(stores):
    hosts, jobs, _ = stores
    hosts.beat(beat(busy=0), 100.0)
    jobs.apply(1, m.RECEIVE, 100.0, Change(facts={"pool": "small"}))
    jobs.apply(1, m.CLAIM, 100.1, Change(fields={"host_id": "h2"}), generation=1)
    moved = hosts.claim("h1", jobs, 1, m.CLAIM, 100.5, Change(fields={"host_id": "h1"}),
                        generation=1)
    assert not moved.applied and moved.job.host_id == "h2"
    assert hosts.get("h1").claims == 0  # a refused claim marks nothing


def test_the_scalers_lease_item_is_not_a_host():
    with mock_aws():
        client = aws.client("dynamodb")
        create_tables(client)
        hosts = DynamoHostStore(client, HOSTS_TABLE.default_name)
        hosts.beat(beat(), 100.0)
        client.put_item(TableName=HOSTS_TABLE.default_name,
                        Item={"host_id": {"S": NOT_A_HOST_PREFIX + "small"}})
        assert [record.host_id for record in hosts.all()] == ["h1"]


# --- TransactionConflict: real DynamoDB cancels a claim a heartbeat collides with (moto never) --


class Cancelled(Exception):
    def __init__(self, reasons):
        super().__init__("Transaction cancelled")
        self.response = {"Error": {"Code": "TransactionCanceledException"},
                         "CancellationReasons": reasons}


CONFLICT = [{"Code": "None"}, {"Code": "TransactionConflict"}]


class ConflictingClient:
    """A DynamoDB client whose TransactWriteItems is first cancelled with each of `script`'s
    reasons in turn, then answers as the wrapped (moto) client does."""

    def __init__(self, client, script):
        self._client = client
        self.script = list(script)
        self.calls = 0
        self.tokens = []
        self.exceptions = type("Exceptions", (), {"TransactionCanceledException": Cancelled})

    def transact_write_items(self, **request):
        self.calls += 1
        self.tokens.append(request["ClientRequestToken"])
        if self.script:
            raise Cancelled(self.script.pop(0))
        try:
            return self._client.transact_write_items(**request)
        except self._client.exceptions.TransactionCanceledException as exc:
            raise Cancelled(exc.response["CancellationReasons"]) from exc

    def __getattr__(self, name):
        return getattr(self._client, name)


@pytest.fixture
def moto_client():
    with mock_aws():
        client = aws.client("dynamodb")
        create_tables(client)
        yield client


def serving_host_and_job(client):
    hosts = DynamoHostStore(client, HOSTS_TABLE.default_name, sleep=lambda _: None)
    jobs = DynamoJobStore(client, JOBS_TABLE.default_name)
    hosts.beat(beat(busy=0), 100.0)
    jobs.apply(1, m.RECEIVE, 100.0, Change(facts={"pool": "small"}))
    return hosts, jobs


def test_a_claim_cancelled_by_transaction_conflicts_is_tried_again_and_wins(moto_client):
    client = ConflictingClient(moto_client, [CONFLICT] * 3)
    hosts, jobs = serving_host_and_job(client)
    pauses = []
    hosts._sleep = pauses.append
    moved = hosts.claim("h1", jobs, 1, m.CLAIM, 101.0, Change(fields={"host_id": "h1"}),
                        generation=1)
    assert moved.applied and moved.job.state == "claimed" and moved.job.host_id == "h1"
    assert client.calls == 4 and len(pauses) == 3 and all(0 < p < 1 for p in pauses)
    assert len(set(client.tokens)) == 4  # a fresh idempotency token per attempt
    assert hosts.get("h1").claims == 1


def test_a_claim_conflicting_every_time_is_dependency_unavailable_not_a_crash(moto_client):
    client = ConflictingClient(moto_client, [CONFLICT] * 100)
    hosts, jobs = serving_host_and_job(client)
    with pytest.raises(DependencyUnavailable, match="TransactionConflict"):
        hosts.claim("h1", jobs, 1, m.CLAIM, 101.0, generation=1)
    assert client.calls == TRANSACTION_ATTEMPTS
    assert jobs.get(1).state == "received" and hosts.get("h1").claims == 0


def test_a_conflict_beside_a_failed_condition_is_the_refusal_not_retried(moto_client):
    found = {"job_id": {"N": "1"}, "state": {"S": "completed"}}
    client = ConflictingClient(
        moto_client, [[{"Code": "ConditionalCheckFailed", "Item": found},
                       {"Code": "TransactionConflict"}]])
    hosts, jobs = serving_host_and_job(client)
    moved = hosts.claim("h1", jobs, 1, m.CLAIM, 101.0, generation=1)
    assert not moved.applied and moved.job.state == "completed" and client.calls == 1


def test_a_throttled_claim_is_dependency_unavailable(moto_client):
    client = ConflictingClient(moto_client, [[{"Code": "None"},
                                              {"Code": "ThrottlingError"}]])
    hosts, jobs = serving_host_and_job(client)
    with pytest.raises(DependencyUnavailable, match="ThrottlingError"):
        hosts.claim("h1", jobs, 1, m.CLAIM, 101.0, generation=1)
