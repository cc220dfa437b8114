"""The reconciler's decisions, each rule by name (pure functions, no servers)."""

from __future__ import annotations

from chalicelib.github import RunnerScope
from chalicelib.jobs import JobRecord
from chalicelib.pools import PoolConfig
from chalicelib.reconciler.deliveries import (
    REREAD_DELIVERIES,
    Attempt,
    DeliveryCursor,
    Mark,
    Pending,
    advance_cursor,
    candidate_guids,
    plan_deliveries,
    read_page,
)
from chalicelib.reconciler.orphans import RUNNER_PREFIX, ListedRunner, plan_orphans, runner_scopes
from chalicelib.reconciler.policy import GITHUB_DELIVERY_RETENTION_S, Policy
from chalicelib.reconciler.state import ReconcilerState
from chalicelib.reconciler.stuck import Act, classify_stuck, unserved_reason
from chalicelib.runners import RunnerRecord

NOW = 1_700_000_000.0
POLICY = Policy(stuck_after_s=300, dispatched_stuck_after_s=900, redeliver_every_s=600,
                max_redeliveries=3, redeliveries_per_run=10, max_pending=100, orphan_grace_s=300)


def attempt(id, guid, status=502, event="workflow_job", at=NOW - 60):
    return Attempt(id=id, guid=guid, event=event, status_code=status, delivered_at=at)


# --- lost webhooks ----------------------------------------------------------------------------


def test_failed_delivery_never_processed_is_redelivered():
    plan = plan_deliveries([attempt(10, "g1")], [], {}, {}, NOW, POLICY)
    assert [(r.guid, r.delivery_id, r.attempt) for r in plan.redeliver] == [("g1", 10, 1)]
    assert [p.guid for p in plan.pending] == ["g1"]


def test_delivery_already_processed_is_not_redelivered():
    # GitHub timed out waiting, but RunnerHub finished the work: nothing lost.
    plan = plan_deliveries([attempt(10, "g1", status=0)], [], {"g1": "done"}, {}, NOW, POLICY)
    assert plan.redeliver == () and plan.pending == () and plan.settled == ("g1",)


def test_failed_record_is_redelivered_even_after_a_2xx_attempt():
    # A redelivery answered "duplicate" while the first attempt was still in flight; that
    # attempt then failed: only a `done` record settles the guid.
    attempts = [attempt(10, "g1"), attempt(11, "g1", status=200)]
    plan = plan_deliveries(attempts, [], {"g1": "failed"}, {}, NOW, POLICY)
    assert [r.guid for r in plan.redeliver] == ["g1"]


def test_2xx_without_any_record_settles_the_guid():
    # RunnerHub answers a job for no pool with 202 and stores nothing.
    pending = [Pending("g1", 10, NOW - 900)]
    plan = plan_deliveries([attempt(12, "g1", status=202)], pending, {}, {}, NOW, POLICY)
    assert plan.settled == ("g1",) and plan.redeliver == () and plan.pending == ()


def test_successful_deliveries_are_not_candidates():
    attempts = [attempt(10, "g1", status=200), attempt(11, "g2", status=204)]
    assert candidate_guids(attempts, []) == []
    assert plan_deliveries(attempts, [], {}, {}, NOW, POLICY).redeliver == ()


def test_only_workflow_job_events_matter():
    attempts = [attempt(10, "p", event="ping"), attempt(11, "i", event="installation")]
    assert candidate_guids(attempts, []) == []
    assert plan_deliveries(attempts, [], {}, {}, NOW, POLICY).pending == ()


def test_each_guid_is_redelivered_at_most_once_per_interval():
    marks = {"g1": Mark(last_at=NOW - 120, attempts=1)}
    plan = plan_deliveries([attempt(12, "g1")], [], {}, marks, NOW, POLICY)
    assert plan.redeliver == () and plan.deferred == 1
    assert [p.guid for p in plan.pending] == ["g1"]  # kept for a later run
    later = plan_deliveries([], plan.pending, {}, marks, NOW + 600, POLICY)
    assert [(r.guid, r.attempt) for r in later.redeliver] == [("g1", 2)]


def test_gives_up_after_max_redeliveries():
    marks = {"g1": Mark(last_at=NOW - 3600, attempts=3)}
    plan = plan_deliveries([attempt(12, "g1")], [], {}, marks, NOW, POLICY)
    assert plan.redeliver == () and plan.pending == ()
    assert [(a.pending.guid, a.reason) for a in plan.abandoned] == [
        ("g1", "too_many_redeliveries")]


def test_gives_up_when_github_no_longer_keeps_the_delivery():
    old = [Pending("g1", 3, NOW - GITHUB_DELIVERY_RETENTION_S - 1)]
    plan = plan_deliveries([], old, {}, {}, NOW, POLICY)
    assert [a.reason for a in plan.abandoned] == ["older_than_github_keeps"]


def test_redeliveries_beyond_the_run_budget_wait_for_the_next_run():
    policy = Policy(redeliveries_per_run=2)
    attempts = [attempt(i, f"g{i}", at=NOW - 100 + i) for i in range(5)]
    plan = plan_deliveries(attempts, [], {}, {}, NOW, policy)
    assert [r.guid for r in plan.redeliver] == ["g0", "g1"]  # oldest first
    assert len(plan.pending) == 5 and plan.deferred == 3


def test_pending_is_bounded_keeping_the_newest():
    policy = Policy(max_pending=2, redeliveries_per_run=10)
    attempts = [attempt(i, f"g{i}", at=NOW - 100 + i) for i in range(4)]
    plan = plan_deliveries(attempts, [], {}, {}, NOW, policy)
    assert [p.guid for p in plan.pending] == ["g2", "g3"]
    assert {a.pending.guid for a in plan.abandoned} == {"g0", "g1"}
    assert {r.guid for r in plan.redeliver} == {"g2", "g3"}


def test_the_newest_failed_attempt_is_redelivered_and_first_seen_kept():
    pending = [Pending("g1", 10, NOW - 900)]
    plan = plan_deliveries([attempt(14, "g1", at=NOW - 30)], pending, {}, {}, NOW, POLICY)
    assert plan.pending == (Pending("g1", 14, NOW - 900),)


def test_processing_record_is_not_processed():
    plan = plan_deliveries([attempt(10, "g1")], [], {"g1": "processing"}, {}, NOW, POLICY)
    assert [r.guid for r in plan.redeliver] == ["g1"]


def test_attempt_from_github_summary():
    row = {"id": 7, "guid": "abc", "delivered_at": "2023-11-14T22:13:20Z", "redelivery": True,
           "status": "Invalid HTTP Response: 503", "status_code": 503, "event": "workflow_job",
           "action": "queued"}
    parsed = Attempt.from_github(row)
    assert parsed == Attempt(7, "abc", "workflow_job", 503, 1_700_000_000.0, "queued", True)
    assert not parsed.ok and Attempt.from_github({**row, "status_code": 200}).ok


# --- the cursor -------------------------------------------------------------------------------


def test_read_page_keeps_only_what_is_above_the_floor():
    page = [attempt(12, "c"), attempt(11, "b"), attempt(10, "a")]
    verdict = read_page(page, floor_id=10, oldest=0)
    assert [a.id for a in verdict.fresh] == [12, 11] and verdict.reached_end


def test_read_page_stops_at_the_lookback_limit():
    page = [attempt(12, "c", at=NOW), attempt(11, "b", at=NOW - 7200)]
    verdict = read_page(page, floor_id=0, oldest=NOW - 3600)
    assert [a.id for a in verdict.fresh] == [12] and verdict.reached_end


def test_read_page_not_done_while_everything_is_new():
    verdict = read_page([attempt(12, "c"), attempt(11, "b")], floor_id=5, oldest=0)
    assert not verdict.reached_end


def test_finished_scan_raises_the_floor_to_its_top():
    cursor = advance_cursor(DeliveryCursor(floor_id=10), 420, True, None, [])
    assert cursor == DeliveryCursor(floor_id=420 - REREAD_DELIVERIES)


def test_finished_scan_keeps_the_newest_rows_re_readable():
    """A delivery queued before the scan but logged after it has an id below the scan's top."""
    cursor = advance_cursor(DeliveryCursor(floor_id=10), 42, True, None, [])
    assert cursor.floor_id == 10
    late = read_page([attempt(40, "late")], floor_id=cursor.floor_id, oldest=0)
    assert [a.guid for a in late.fresh] == ["late"]


def test_unfinished_scan_keeps_the_floor_and_resumes():
    cursor = advance_cursor(DeliveryCursor(floor_id=10), 42, False, "30", [])
    assert cursor == DeliveryCursor(floor_id=10, resume="30", resume_top=42)
    done = advance_cursor(cursor, cursor.resume_top, True, None, [])
    assert done.floor_id == max(10, 42 - REREAD_DELIVERIES) and done.resume is None


def test_state_round_trips_and_a_corrupt_one_starts_afresh():
    state = ReconcilerState(
        DeliveryCursor(9, "5", 12, (Pending("g", 4, NOW),)), {"rh-1-1-abc": NOW - 5}
    )
    assert ReconcilerState.from_json(state.to_json()) == state
    assert ReconcilerState.from_json("{not json") == ReconcilerState()
    assert ReconcilerState.from_json(None) == ReconcilerState()


# --- stuck jobs -------------------------------------------------------------------------------


def job(state="dispatched", updated=NOW - 1000, **fields):
    return JobRecord(**{"job_id": 5, "state": state, "updated_at": updated,
                        "demand_generation": 2, "pool": "p", "repository": "o/r", **fields})


QUEUED = {"status": "queued", "conclusion": None}


def test_still_queued_on_github_is_re_demanded():
    action = classify_stuck(job(), QUEUED, NOW, POLICY)
    assert (action.act, action.generation, action.reason) == (Act.REDEMAND, 2, "stale_dispatched")


def test_github_error_never_closes_a_job():
    for state in ("received", "dispatched", "claimed", "runner_started"):
        action = classify_stuck(job(state), None, NOW, POLICY)
        assert (action.act, action.reason) == (Act.LEAVE, "github_unavailable")


def test_live_lease_is_left_alone():
    leased = job("claimed", host_id="h1", lease_until=NOW + 30)
    assert unserved_reason(leased, NOW, POLICY) is None
    action = classify_stuck(leased, QUEUED, NOW, POLICY)
    assert (action.act, action.reason) == (Act.LEAVE, "lease_live")


def test_expired_lease_counts_as_unserved_and_is_re_demanded():
    for state in ("claimed", "runner_started"):
        expired = job(state, host_id="h1", lease_until=NOW - 1)
        assert unserved_reason(expired, NOW, POLICY) == "lease_expired"
        assert classify_stuck(expired, QUEUED, NOW, POLICY).act is Act.REDEMAND


def test_claimed_without_a_lease_counts_as_unserved():
    assert unserved_reason(job("claimed"), NOW, POLICY) == "lease_expired"


def test_completed_on_github_completes_here_with_its_conclusion():
    github = {"status": "completed", "conclusion": "timed_out", "runner_name": "rh-5-2-aa",
              "runner_id": 9, "completed_at": "2023-11-14T22:13:20Z"}
    action = classify_stuck(job("runner_started", lease_until=NOW - 5), github, NOW, POLICY)
    assert action.act is Act.COMPLETE
    assert action.fields == {"conclusion": "timed_out", "runner_name": "rh-5-2-aa",
                             "runner_id": 9, "github_completed_at": "2023-11-14T22:13:20Z"}


def test_completed_without_a_conclusion_is_recorded_unknown():
    action = classify_stuck(job(), {"status": "completed", "conclusion": None}, NOW, POLICY)
    assert action.fields["conclusion"] == "unknown"


def test_in_progress_on_github_moves_the_job_forward():
    github = {"status": "in_progress", "runner_name": "other", "runner_id": 3,
              "started_at": "2023-11-14T22:13:20Z"}
    action = classify_stuck(job("received"), github, NOW, POLICY)
    assert action.act is Act.START_JOB and action.fields["runner_name"] == "other"


def test_waiting_or_unknown_github_status_is_left_alone():
    for status in ("waiting", "pending", "requested", None):
        action = classify_stuck(job(), {"status": status}, NOW, POLICY)
        assert action.act is Act.LEAVE


def test_recent_job_is_not_stuck():
    assert unserved_reason(job("received", updated=NOW - 10), NOW, POLICY) is None
    assert classify_stuck(job("received", updated=NOW - 10), QUEUED, NOW, POLICY).act is Act.LEAVE


def test_dispatched_job_waits_longer_than_the_others():
    # Its demand may be waiting for capacity on the queue.
    assert unserved_reason(job("dispatched", updated=NOW - 600), NOW, POLICY) is None
    assert unserved_reason(job("received", updated=NOW - 600), NOW, POLICY) == "stale_received"


def test_open_or_closed_states_are_never_stuck():
    for state in ("waiting", "in_progress", "completed"):
        assert unserved_reason(job(state), NOW, POLICY) is None


# --- orphan runners ---------------------------------------------------------------------------

ORG = RunnerScope("org", "acme")


def listed(name="rh-5-1-abc", status="offline", busy=False, runner_id=1):
    return ListedRunner(ORG, 7, runner_id, name, status, busy)


def record(state, name="rh-5-1-abc"):
    return RunnerRecord(runner_name=name, state=state)


def test_busy_runner_is_never_deleted():
    plan = plan_orphans([listed(busy=True)], {"rh-5-1-abc": record("gone")},
                        {"rh-5-1-abc": NOW - 9999}, NOW, POLICY)
    assert plan.delete == () and plan.busy_kept == 1


def test_runner_whose_record_is_gone_is_deleted_at_once():
    plan = plan_orphans([listed(status="online")], {"rh-5-1-abc": record("gone")}, {}, NOW,
                        POLICY)
    assert [(d.runner.name, d.reason) for d in plan.delete] == [("rh-5-1-abc", "record_gone")]


def test_offline_runner_is_deleted_only_after_the_grace():
    records = {"rh-5-1-abc": record("starting")}
    first = plan_orphans([listed()], records, {}, NOW, POLICY)
    assert first.delete == () and first.offline_since == {"rh-5-1-abc": NOW}
    later = plan_orphans([listed()], records, first.offline_since, NOW + 300, POLICY)
    assert [d.reason for d in later.delete] == ["offline"] and later.offline_since == {}


def test_runner_back_online_is_forgotten():
    records = {"rh-5-1-abc": record("idle")}
    plan = plan_orphans([listed(status="online")], records, {"rh-5-1-abc": NOW - 100}, NOW,
                        POLICY)
    assert plan.delete == () and plan.offline_since == {}


def test_runners_not_ours_are_never_touched():
    # Not named by RunnerHub, or named so but without a record (another stage's, say).
    plan = plan_orphans(
        [listed(name="build-box-1"), listed(name="rh-9-1-fff", runner_id=2)],
        {"build-box-1": record("gone", "build-box-1")}, {"rh-9-1-fff": NOW - 9999}, NOW, POLICY,
    )
    assert plan.delete == () and plan.offline_since == {}


def test_runner_prefix_matches_the_executors_names():
    from executor.launch import runner_name

    assert runner_name(5, 1).startswith(RUNNER_PREFIX)


def test_runner_scopes_list_each_org_once_and_listed_repositories():
    pools = PoolConfig.model_validate({"pool": [
        {"name": "a", "labels": ["x"], "scope": {"owner": "Acme"}, "image": "i"},
        {"name": "b", "labels": ["y"], "scope": {"owner": "acme"}, "image": "i"},
        {"name": "c", "labels": ["z"], "scope": {"owner": "bob", "repositories": ["dots"]},
         "image": "i", "runner_scope": "repo"},
        {"name": "d", "labels": ["w"], "scope": {"owner": "carol"}, "image": "i",
         "runner_scope": "repo"},
    ]})
    assert runner_scopes(pools) == (RunnerScope("org", "acme"), RunnerScope("repo", "bob", "dots"))


# --- several Apps, dead letters, discovery ----------------------------------------------------


def test_state_keeps_each_apps_cursor_and_the_discovery_sweep():
    from chalicelib.reconciler.discovery import DiscoveryState

    state = ReconcilerState(
        DeliveryCursor(9), {}, {2: DeliveryCursor(40, "33", 50, (Pending("h", 30, NOW),))},
        {"acme": DiscoveryState(("acme/a", "acme/b"), NOW - 60, 3000.0, ((NOW - 30, 4),))},
    )
    assert ReconcilerState.from_json(state.to_json()) == state
    assert state.cursor_of(2).floor_id == 40 and state.cursor_of(3) == DeliveryCursor()
    assert state.cursor_of(2, first=True).floor_id == 40  # its own, wherever it is listed
    assert state.cursor_of(3, first=True).floor_id == 9  # the cursor written before


def test_reordering_the_apps_moves_no_cursor():
    state = ReconcilerState().with_cursor(1, DeliveryCursor(10)).with_cursor(2, DeliveryCursor(50))
    assert state.cursor_of(2, first=True).floor_id == 50
    assert state.cursor_of(1).floor_id == 10
    assert ReconcilerState.from_json(state.to_json()) == state


def test_state_written_before_several_apps_reads_as_the_first_apps_cursor():
    old = '{"v":1,"floor_id":7,"resume":null,"resume_top":0,"pending":[],"offline_since":{}}'
    state = ReconcilerState.from_json(old)
    assert state.deliveries.floor_id == 7 and state.app_cursors == {} and state.discovery == {}
    assert state.cursor_of(5, first=True).floor_id == 7 and state.cursor_of(6) == DeliveryCursor()
    migrated = state.with_cursor(5, DeliveryCursor(8))
    assert migrated.deliveries == DeliveryCursor() and migrated.cursor_of(6, first=True) == (
        DeliveryCursor())


def test_dead_letter_of_a_queued_job_is_redriven_on_its_generation():
    from chalicelib.reconciler.dead_letters import DeadAct, classify_dead_letter

    job = JobRecord(job_id=1, state="dispatched", demand_generation=3, updated_at=NOW)
    action = classify_dead_letter({"job_id": 1, "generation": 3}, job, {"status": "queued"}, NOW)
    assert (action.act, action.generation) == (DeadAct.REDRIVE, 3)


def test_dead_letter_rules_without_github():
    from chalicelib.reconciler.dead_letters import DeadAct, settle_dead_letter

    message = {"job_id": 1, "generation": 1}
    job = {"job_id": 1, "state": "dispatched", "demand_generation": 1}

    def settle(message, **record):
        return settle_dead_letter(message, JobRecord(**{**job, **record}), NOW)

    assert settle(message) is None  # GitHub must be asked
    assert settle(None).act is DeadAct.KEEP
    assert settle_dead_letter(message, None, NOW).act is DeadAct.KEEP
    assert settle(message, state="completed").act is DeadAct.DROP
    assert settle(message, state="in_progress").act is DeadAct.DROP
    assert settle(message, demand_generation=2).reason == "superseded"
    live = {"state": "claimed", "lease_until": NOW + 30}
    assert settle(message, **live).reason == "lease_live"
    assert settle(message, **{**live, "lease_until": NOW - 1}) is None


def test_dead_letter_is_kept_when_github_cannot_say_or_the_job_waits():
    from chalicelib.reconciler.dead_letters import DeadAct, classify_dead_letter

    job = JobRecord(job_id=1, state="received", demand_generation=1)
    message = {"job_id": 1, "generation": 1}
    assert classify_dead_letter(message, job, None, NOW).act is DeadAct.KEEP
    assert classify_dead_letter(message, job, {"status": "waiting"}, NOW).act is DeadAct.KEEP
    assert classify_dead_letter(message, job, {"status": "completed"}, NOW).act is DeadAct.DROP


def test_sweep_order_is_most_recently_pushed_or_updated_first_without_archived():
    from chalicelib.reconciler.discovery import sweep_order

    repos = [
        {"full_name": "o/old", "pushed_at": "2023-01-01T00:00:00Z"},
        {"full_name": "o/updated", "pushed_at": "2023-01-01T00:00:00Z",
         "updated_at": "2023-06-01T00:00:00Z"},
        {"full_name": "o/pushed", "pushed_at": "2023-05-01T00:00:00Z"},
        {"full_name": "o/archived", "pushed_at": "2023-12-01T00:00:00Z", "archived": True},
        {"full_name": "o/never", "pushed_at": None},
    ]
    assert sweep_order(repos) == ("o/updated", "o/pushed", "o/old", "o/never")


def test_discovery_budget_is_a_tenth_of_the_reported_limit_spread_over_the_hour():
    from chalicelib.reconciler.discovery import DiscoveryState, discovery_budget

    fresh = discovery_budget(DiscoveryState(), 5000, NOW)
    assert (fresh.hourly, fresh.this_run, fresh.whole) == (500, 42, 500)
    unknown = discovery_budget(DiscoveryState(), None, NOW)
    assert unknown.hourly == 500  # GitHub's documented minimum until a limit is seen
    spent = DiscoveryState(spent=((NOW - 3000, 480), (NOW - 4000, 500)))
    nearly = discovery_budget(spent, 5000, NOW)
    assert (nearly.used, nearly.this_run, nearly.whole) == (480, 20, 20)
    assert discovery_budget(spent, 5000, NOW + 700).used == 0  # older than an hour: forgotten
    assert DiscoveryState(spent=((NOW - 4000, 9),)).spend(NOW, 3).spent == ((NOW, 3),)


def test_discovered_job_is_taken_in_only_when_queued_routed_and_unknown():
    from chalicelib.reconciler.discovery import classify_discovered

    pools = PoolConfig.model_validate(
        {"pool": [{"name": "small", "labels": ["linux"], "scope": {"owner": "acme"},
                   "image": "img"}]})
    repository = {"name": "app", "private": True, "owner": {"login": "acme"}}
    job = {"id": 5, "status": "queued", "labels": ["Linux"]}
    assert classify_discovered(job, repository, pools, False).reason == "unannounced"
    assert classify_discovered(job, repository, pools, False).pool == "small"
    assert classify_discovered(job, repository, pools, True).reason == "known"
    assert classify_discovered({**job, "status": "in_progress"}, repository, pools,
                               False).reason == "not_queued"
    public = {**repository, "private": False}
    assert classify_discovered(job, public, pools, False).reason == "public_repository"
