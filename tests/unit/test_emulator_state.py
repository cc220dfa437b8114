"""The emulator's assignment rule and runner life cycle, on State alone (no HTTP)."""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest

from emulator.errors import BadRequest, Conflict, NotFound, Unauthorized, Unprocessable
from emulator.state import Scope, State, decode_jit_config

DEFAULT_GROUP = (1, "Default", False)
PUBLIC_GROUP = (2, "Public", True)
ORG = Scope("org", "Octo-Org")


class Recorder:
    def __init__(self):
        self.events: list[tuple[str, int, str]] = []

    def __call__(self, action: str, snap: dict) -> None:
        self.events.append((action, snap["job_id"], snap["status"]))

    def for_job(self, job_id: int) -> list[tuple[str, str]]:
        return [(a, s) for a, j, s in self.events if j == job_id]


@pytest.fixture
def emitted():
    return Recorder()


@pytest.fixture
def state(emitted):
    return State(
        emit=emitted,
        runner_url="http://127.0.0.1:1",
        acquire_timeout_s=0.2,
        lost_runner_timeout_s=0.2,
        heartbeat_interval_s=0.05,
    )


def add_job(state, repository="octo-org/app", labels=("self-hosted", "linux"), **kw):
    fields = dict(private=True, duration_s=0.0, planned_conclusion="success")
    fields.update(kw)
    job = state.add_job(None, None, repository=repository, labels=list(labels), **fields)
    return job.id


def queued_job(state, **kw):
    job_id = add_job(state, **kw)
    state.arrive(job_id)
    return job_id


def online_runner(
    state, labels=("self-hosted", "linux"), scope=ORG, name=None, group=DEFAULT_GROUP
):
    name = name or f"r-{len(state.runners())}-{time.monotonic_ns()}"
    _, blob = state.create_runner(scope, name, list(labels), group)
    return state.register_jit(blob)["session"]


def poll_now(state, session):
    return state.poll(session, 0)


def take(state, session):
    """Poll, acquire the offered job, return its id (or None when nothing was offered)."""
    offer = poll_now(state, session)
    if offer is None:
        return None
    return state.acquire(session, offer["job_id"])["job_id"]


# -- the assignment rule ---------------------------------------------------------------------


def test_runner_labels_superset_of_job_labels_is_assigned(state):
    job_id = queued_job(state, labels=["self-hosted", "linux"])
    session = online_runner(state, labels=["self-hosted", "linux", "x64", "gpu"])
    assert take(state, session) == job_id


def test_runner_missing_one_job_label_is_not_assigned(state):
    job_id = queued_job(state, labels=["self-hosted", "linux", "gpu"])
    session = online_runner(state, labels=["self-hosted", "linux"])
    assert take(state, session) is None
    assert state.job_record(job_id)["status"] == "queued"


def test_label_match_is_case_insensitive(state):
    job_id = queued_job(state, labels=["Self-Hosted", "LINUX"])
    session = online_runner(state, labels=["self-hosted", "Linux"])
    assert take(state, session) == job_id


def test_self_hosted_is_not_required_of_the_job(state):
    job_id = queued_job(state, labels=["gpu"])
    session = online_runner(state, labels=["self-hosted", "gpu"])
    assert take(state, session) == job_id


def test_org_runner_takes_jobs_of_any_repo_in_its_org_only(state):
    other_org = queued_job(state, repository="other-org/app")
    mine = queued_job(state, repository="OCTO-org/lib")
    session = online_runner(state, scope=Scope("org", "octo-org"))
    assert take(state, session) == mine
    assert state.job_record(other_org)["status"] == "queued"


def test_repo_runner_takes_jobs_of_its_repository_only(state):
    sibling = queued_job(state, repository="octo-org/other")
    mine = queued_job(state, repository="octo-org/app")
    session = online_runner(state, scope=Scope("repo", "octo-org/App"))
    assert take(state, session) == mine
    assert state.job_record(sibling)["status"] == "queued"


def test_public_repo_job_not_given_to_org_runner_in_default_group(state):
    job_id = queued_job(state, private=False)
    assert take(state, online_runner(state)) is None
    assert take(state, online_runner(state, group=PUBLIC_GROUP)) == job_id


def test_public_repo_job_given_to_repo_runner(state):
    job_id = queued_job(state, private=False)
    assert take(state, online_runner(state, scope=Scope("repo", "octo-org/app"))) == job_id


def test_queued_job_is_offered_at_once_to_a_runner_blocked_in_poll(state):
    session = online_runner(state)
    result = {}
    poller = threading.Thread(target=lambda: result.update(offer=state.poll(session, 5)))
    poller.start()
    deadline = time.monotonic() + 2
    while not state.runners()[0]["status"] == "online" or not state._idle:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    started = time.monotonic()
    job_id = queued_job(state)
    poller.join(5)
    assert result["offer"]["job_id"] == job_id
    assert time.monotonic() - started < 0.5  # event-driven, not the poll timeout


def test_oldest_queued_job_is_offered_first(state):
    first = queued_job(state)
    queued_job(state)
    assert take(state, online_runner(state)) == first


def test_runner_started_for_one_job_may_take_another(state):
    """A warm runner takes whichever matching job is queued first, not 'its' job."""
    earlier = queued_job(state, labels=["linux"])
    queued_job(state, labels=["linux", "gpu"])
    gpu_runner = online_runner(state, labels=["linux", "gpu"])  # started for the gpu job
    assert take(state, gpu_runner) == earlier


def test_job_nobody_takes_stays_queued(state):
    job_id = queued_job(state, labels=["nobody-has-this"])
    state.reap()
    time.sleep(0.3)
    state.reap()
    assert state.job_record(job_id)["status"] == "queued"


# -- ephemeral runners and the runner protocol ---------------------------------------------


def test_ephemeral_runner_runs_one_job_then_is_deregistered(state, emitted):
    first, second = queued_job(state), queued_job(state)
    session = online_runner(state)
    assert take(state, session) == first
    assert state.complete(session, first, "success") == {"deregistered": True}
    assert state.runners() == []
    with pytest.raises(Unauthorized):
        poll_now(state, session)
    assert state.job_record(second)["status"] == "queued"
    assert emitted.for_job(first) == [
        ("queued", "queued"),
        ("in_progress", "in_progress"),
        ("completed", "completed"),
    ]


def test_non_ephemeral_runner_takes_jobs_one_after_another(state):
    first, second = queued_job(state), queued_job(state)
    out = state.register_with_token(ORG, "persistent", ["gpu"], False, DEFAULT_GROUP)
    session = out["session"]
    assert take(state, session) == first
    state.complete(session, first, "success")
    assert take(state, session) == second
    labels = {lab["name"] for lab in state.runners()[0]["labels"]}
    assert labels == {"self-hosted", "Linux", "X64", "gpu"}


def test_jit_config_registers_once(state):
    _, blob = state.create_runner(ORG, "once", ["linux"], DEFAULT_GROUP)
    state.register_jit(blob)
    with pytest.raises(Conflict):
        state.register_jit(blob)


def test_jit_config_carries_url_but_its_secret_is_only_resolvable_here(state):
    _, blob = state.create_runner(ORG, "forged", ["linux"], DEFAULT_GROUP)
    doc = decode_jit_config(blob)
    assert doc["url"] == "http://127.0.0.1:1"
    other = State(runner_url="http://x")
    with pytest.raises(NotFound):
        other.register_jit(blob)
    doc["secret"] = "guessed"
    forged = base64.b64encode(json.dumps(doc).encode()).decode()
    with pytest.raises(Unauthorized):
        state.register_jit(forged)


@pytest.mark.parametrize("blob", ["", "not base64!", "aGVsbG8=", "e30="])
def test_malformed_jit_config_is_rejected(state, blob):
    with pytest.raises(BadRequest):
        state.register_jit(blob)


def test_runner_name_must_be_unique_per_scope(state):
    state.create_runner(ORG, "dup", ["linux"], DEFAULT_GROUP)
    with pytest.raises(Conflict):
        state.create_runner(Scope("org", "octo-org"), "DUP", ["linux"], DEFAULT_GROUP)
    state.create_runner(Scope("org", "other-org"), "dup", ["linux"], DEFAULT_GROUP)


def test_busy_runner_delete_is_422_idle_runner_delete_removes_it(state):
    queued_job(state)
    busy = online_runner(state, name="busy")
    take(state, busy)
    idle = online_runner(state, name="idle")
    by_name = {r["name"]: r["id"] for r in state.runners()}
    with pytest.raises(Unprocessable):
        state.delete_runner(ORG, by_name["busy"])
    state.delete_runner(ORG, by_name["idle"])
    with pytest.raises(Unauthorized):
        poll_now(state, idle)
    with pytest.raises(NotFound):
        state.delete_runner(Scope("org", "other-org"), by_name["busy"])


def test_adding_a_label_to_a_polling_runner_lets_it_take_a_waiting_job(state):
    job_id = queued_job(state, labels=["linux", "gpu"])
    session = online_runner(state, labels=["linux"], name="grows")
    assert poll_now(state, session) is None
    runner_id = state.runners()[0]["id"]
    state.set_labels(ORG, runner_id, ["gpu"], "add")
    assert take(state, session) == job_id


def test_offer_not_acquired_in_time_goes_back_to_the_queue(state):
    job_id = queued_job(state)
    silent = online_runner(state, name="silent")
    assert poll_now(state, silent)["job_id"] == job_id
    time.sleep(0.3)
    state.reap()
    assert state.job_record(job_id)["status"] == "queued"
    with pytest.raises(Conflict):
        state.acquire(silent, job_id)
    assert take(state, online_runner(state, name="other")) == job_id


# -- cancellation, lost runners, approvals ---------------------------------------------------


def test_cancel_queued_job_sends_completed_cancelled(state, emitted):
    job_id = queued_job(state)
    state.cancel(job_id)
    rec = state.job_record(job_id)
    assert (rec["status"], rec["conclusion"], rec["runner_name"]) == (
        "completed",
        "cancelled",
        None,
    )
    assert emitted.for_job(job_id) == [("queued", "queued"), ("completed", "completed")]
    assert take(state, online_runner(state)) is None
    with pytest.raises(Conflict):
        state.cancel(job_id)


def test_cancel_offered_job_makes_acquire_fail(state):
    job_id = queued_job(state)
    session = online_runner(state)
    poll_now(state, session)
    state.cancel(job_id)
    with pytest.raises(Conflict):
        state.acquire(session, job_id)


def test_cancel_running_job_is_told_by_heartbeat_and_ends_cancelled(state, emitted):
    job_id = queued_job(state)
    session = online_runner(state)
    take(state, session)
    assert state.heartbeat(session, job_id) == {"cancelled": False}
    state.cancel(job_id)
    assert state.job_record(job_id)["status"] == "in_progress"
    assert state.heartbeat(session, job_id) == {"cancelled": True}
    state.complete(session, job_id, "success")  # the runner's word does not override it
    assert state.job_record(job_id)["conclusion"] == "cancelled"


def test_lost_runner_job_fails_after_timeout_and_runner_is_removed(state, emitted):
    job_id = queued_job(state)
    session = online_runner(state)
    take(state, session)
    state.reap()
    assert state.job_record(job_id)["status"] == "in_progress"
    time.sleep(0.3)  # lost_runner_timeout_s is 0.2
    state.reap()
    rec = state.job_record(job_id)
    assert (rec["status"], rec["conclusion"]) == ("completed", "failure")
    assert state.runners() == []
    assert emitted.for_job(job_id)[-1] == ("completed", "completed")
    with pytest.raises(Unauthorized):
        state.complete(session, job_id, "success")


def test_heartbeats_keep_a_long_job_alive(state):
    job_id = queued_job(state)
    session = online_runner(state)
    take(state, session)
    for _ in range(6):
        time.sleep(0.08)
        state.heartbeat(session, job_id)
        state.reap()
    assert state.job_record(job_id)["status"] == "in_progress"


def test_environment_approval_sends_waiting_then_a_second_queued(state, emitted):
    job_id = add_job(state, environment="prod", environment_wait_s=5.0)
    state.arrive(job_id)
    assert take(state, online_runner(state, name="early")) is None
    state.approve(job_id)
    assert emitted.for_job(job_id) == [("waiting", "waiting"), ("queued", "queued")]
    assert take(state, online_runner(state, name="late")) == job_id


def test_environment_approval_as_queued_with_status_waiting(state, emitted):
    job_id = add_job(state, environment="prod", environment_wait_s=5.0, waiting_action="queued")
    state.arrive(job_id)
    state.approve(job_id)
    assert emitted.for_job(job_id) == [("queued", "waiting"), ("queued", "queued")]


def test_queued_sent_at_is_stamped_by_the_queued_delivery_only(state):
    job_id = add_job(state, environment="prod", environment_wait_s=5.0, waiting_action="queued")
    state.arrive(job_id)
    state.mark_sent(job_id, "queued", "waiting", 1.0)
    assert state.job_record(job_id)["queued_sent_at"] is None
    state.approve(job_id)
    state.mark_sent(job_id, "queued", "queued", 2.0)
    state.mark_sent(job_id, "queued", "queued", 3.0)  # a redelivery does not move it
    assert state.job_record(job_id)["queued_sent_at"] == 2.0


def test_timestamps_are_ordered(state):
    job_id = queued_job(state)
    session = online_runner(state)
    take(state, session)
    state.complete(session, job_id, "failure")
    rec = state.job_record(job_id)
    assert rec["created_at"] <= rec["queued_at"] <= rec["taken_at"] <= rec["completed_at"]
    assert rec["conclusion"] == "failure"


def test_wait_until_completed_is_bounded(state):
    job_id = queued_job(state)
    started = time.monotonic()
    assert state.wait_until_completed([job_id], 0.1) is False
    assert time.monotonic() - started < 1.0


def test_disconnected_runner_is_never_offered_a_job_even_by_a_stale_poll(state):
    session = online_runner(state)
    stale = {}
    poller = threading.Thread(target=lambda: stale.update(result=_poll_catching(state, session)))
    poller.start()
    deadline = time.monotonic() + 2
    while not state._idle:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    state.disconnect(session)
    poller.join(2)
    assert isinstance(stale["result"], Unauthorized)
    job_id = queued_job(state)
    assert state.job_record(job_id)["status"] == "queued"
    assert state.runners()[0]["status"] == "offline"


def _poll_catching(state, session):
    try:
        return state.poll(session, 5)
    except Unauthorized as exc:
        return exc
