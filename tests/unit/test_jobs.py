"""The job state machine, run identically on the in-memory store and DynamoDB (moto)."""

from __future__ import annotations

import pytest

from chalicelib import jobs as m
from chalicelib.jobs import Change, JobState, stage_latencies

JOB = 4242
FACTS = Change(facts={"pool": "small", "repository": "acme/app", "labels": ["linux"]})




def receive(store, now=1.0):
    return store.apply(JOB, m.RECEIVE, now, FACTS)


def test_receive_creates_job_with_generation_one(store):
    moved = receive(store)
    assert moved.applied and moved.state is JobState.RECEIVED and moved.generation == 1
    assert moved.job.pool == "small" and list(moved.job.labels) == ["linux"]
    assert moved.job.received_at == 1.0


def test_second_receive_is_a_no_op_that_returns_the_record(store):
    receive(store)
    again = receive(store, now=2.0)
    assert not again.applied
    assert again.state is JobState.RECEIVED and again.job.received_at == 1.0


def test_waiting_then_receive_starts_demand(store):
    assert store.apply(JOB, m.WAIT, 1.0, FACTS).state is JobState.WAITING
    moved = receive(store, now=2.0)
    assert moved.applied and moved.generation == 1 and moved.job.waiting_at == 1.0


def test_waiting_after_receive_is_refused(store):
    receive(store)
    assert not store.apply(JOB, m.WAIT, 2.0, FACTS).applied


def test_dispatch_needs_matching_generation(store):
    receive(store)
    assert not store.apply(JOB, m.DISPATCH, 2.0, generation=2).applied
    moved = store.apply(JOB, m.DISPATCH, 2.0, generation=1)
    assert moved.applied and moved.state is JobState.DISPATCHED and moved.job.dispatched_at == 2


def test_claim_from_received_or_dispatched_once(store):
    receive(store)
    first = store.apply(JOB, m.CLAIM, 2.0, Change(fields={"host_id": "h1"}), generation=1)
    second = store.apply(JOB, m.CLAIM, 2.0, Change(fields={"host_id": "h2"}), generation=1)
    assert first.applied and not second.applied
    assert store.get(JOB).host_id == "h1"


def test_note_dispatched_keeps_claimed_state(store):
    receive(store)
    store.apply(JOB, m.CLAIM, 2.0, Change(fields={"host_id": "h1"}), generation=1)
    assert not store.apply(JOB, m.DISPATCH, 3.0, generation=1).applied
    noted = store.apply(JOB, m.NOTE_DISPATCHED, 3.0, generation=1)
    assert noted.applied and noted.state is JobState.CLAIMED and noted.job.dispatched_at == 3


def test_runner_started_only_by_the_claiming_host(store):
    receive(store)
    store.apply(JOB, m.CLAIM, 2.0, Change(fields={"host_id": "h1"}), generation=1)
    assert not store.apply(JOB, m.START_RUNNER, 3.0, generation=1, host_id="h2").applied
    assert store.apply(JOB, m.START_RUNNER, 3.0, generation=1, host_id="h1").applied


def test_in_progress_from_any_earlier_state_and_only_once(store):
    receive(store)
    change = Change(fields={"runner_name": "r1", "runner_id": 7})
    assert store.apply(JOB, m.START_JOB, 2.0, change).applied
    assert not store.apply(JOB, m.START_JOB, 3.0, change).applied
    assert store.get(JOB).in_progress_at == 2.0


def test_in_progress_for_unknown_job_creates_record(store):
    moved = store.apply(JOB, m.START_JOB, 1.0, FACTS)
    assert moved.applied and moved.state is JobState.IN_PROGRESS and "demand_generation" not in (
        moved.job
    )


def test_completed_before_queued_then_queued_cannot_resurrect(store):
    done = store.apply(JOB, m.COMPLETE, 1.0, Change(facts=FACTS.facts,
                                                    fields={"conclusion": "cancelled"}))
    assert done.applied and done.state is JobState.COMPLETED
    late = receive(store, now=2.0)
    assert not late.applied and late.state is JobState.COMPLETED
    assert not store.apply(JOB, m.START_JOB, 3.0).applied
    assert not store.apply(JOB, m.COMPLETE, 4.0, Change(fields={"conclusion": "x"})).applied
    assert store.get(JOB).conclusion == "cancelled"


def test_unknown_conclusion_is_stored(store):
    receive(store)
    store.apply(JOB, m.COMPLETE, 2.0, Change(fields={"conclusion": "startup_failure"}))
    assert store.get(JOB).conclusion == "startup_failure"


def test_redemand_bumps_generation_and_clears_claim(store):
    receive(store)
    store.apply(JOB, m.CLAIM, 2.0, Change(fields={"host_id": "h1", "lease_until": 9.0}),
                generation=1)
    assert not store.apply(JOB, m.REDEMAND, 3.0, generation=2).applied
    moved = store.apply(JOB, m.REDEMAND, 3.0, generation=1)
    assert moved.applied and moved.state is JobState.RECEIVED and moved.generation == 2
    assert "host_id" not in moved.job and "claimed_at" not in moved.job
    # the old generation's demand can no longer be claimed
    assert not store.apply(JOB, m.CLAIM, 4.0, generation=1).applied
    assert store.apply(JOB, m.CLAIM, 4.0, generation=2).applied


def test_redemand_refused_once_in_progress(store):
    receive(store)
    store.apply(JOB, m.START_JOB, 2.0)
    assert not store.apply(JOB, m.REDEMAND, 3.0, generation=1).applied


def test_facts_first_writer_wins(store):
    receive(store)
    store.apply(JOB, m.COMPLETE, 2.0, Change(facts={"pool": "other"}))
    assert store.get(JOB).pool == "small"


def test_get_unknown_job_is_none(store):
    assert store.get(999) is None


def test_stage_latencies_between_stamps():
    job = {"received_at": 1.0, "dispatched_at": 1.25, "claimed_at": 1.5, "in_progress_at": 3.0}
    assert stage_latencies(job) == {
        "received_to_dispatched": 0.25,
        "dispatched_to_claimed": 0.25,
        "claimed_to_in_progress": 1.5,
    }


def test_moves_needing_generation_refuse_to_run_without_it():
    with pytest.raises(ValueError, match="generation"):
        m.build_update(m.CLAIM, 1.0, m.NO_CHANGE, None, None)


# --- outages versus bugs ----------------------------------------------------------------------


class FailingClient:
    """A DynamoDB client whose every call raises `error` (the condition class as botocore's)."""

    class exceptions:
        class ConditionalCheckFailedException(Exception):
            pass

    def __init__(self, error: Exception) -> None:
        self.error = error

    def update_item(self, **request):
        raise self.error

    put_item = get_item = update_item


def client_error(code: str, status: int = 400):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "UpdateItem")


def outages():
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    url = "http://127.0.0.1:1"
    return [
        client_error("ProvisionedThroughputExceededException"),
        client_error("ThrottlingException"),
        client_error("InternalServerError", 500),
        client_error("SomethingNew", 503),  # any 5xx is the service's failure
        EndpointConnectionError(endpoint_url=url),
        ConnectTimeoutError(endpoint_url=url),
        ReadTimeoutError(endpoint_url=url),
        ConnectionClosedError(endpoint_url=url),
    ]


def bugs():
    from botocore.exceptions import ParamValidationError

    return [TypeError("unsupported operand"), KeyError("Attributes"),
            ParamValidationError(report="Invalid type for parameter Key"),
            # DynamoDB refusing a malformed request, or the wrong table or role: not outages.
            client_error("ValidationException"), client_error("ResourceNotFoundException"),
            client_error("AccessDeniedException")]


@pytest.mark.parametrize("error", outages(), ids=lambda e: type(e).__name__)
def test_dynamodb_outage_is_dependency_unavailable(error):
    from chalicelib.errors import DependencyUnavailable

    store = m.DynamoJobStore(FailingClient(error), "jobs")
    with pytest.raises(DependencyUnavailable, match="dynamodb"):
        store.apply(JOB, m.RECEIVE, 1.0, FACTS)
    with pytest.raises(DependencyUnavailable):
        store.get(JOB)


@pytest.mark.parametrize("error", bugs(), ids=lambda e: type(e).__name__)
def test_code_bug_in_a_store_call_is_not_reported_as_an_outage(error):
    store = m.DynamoJobStore(FailingClient(error), "jobs")
    with pytest.raises(type(error)):
        store.apply(JOB, m.RECEIVE, 1.0, FACTS)
    with pytest.raises(type(error)):
        store.get(JOB)


@pytest.mark.parametrize("error", bugs(), ids=lambda e: type(e).__name__)
def test_conditional_write_helper_lets_a_bug_propagate(error):
    from chalicelib.dynamodb import conditional

    with pytest.raises(type(error)):
        conditional(FailingClient(error).update_item, TableName="t")


def test_conditional_write_helper_condition_failed_is_none_and_outage_is_503():
    from chalicelib.dynamodb import conditional
    from chalicelib.errors import DependencyUnavailable

    failed = FailingClient.exceptions.ConditionalCheckFailedException()
    assert conditional(FailingClient(failed).put_item, TableName="t") is None
    with pytest.raises(DependencyUnavailable):
        conditional(FailingClient(client_error("ThrottlingException")).put_item, TableName="t")
