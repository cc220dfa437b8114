"""The reconciler's run, on in-memory stores and a fake GitHub: what it does, and that doing it
twice, concurrently or after a crash is safe."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import pytest

from chalicelib import jobs as m
from chalicelib.github import DeliveryPage, GitHubError, ListPage, RunnerScope
from chalicelib.github.budget import RateBudget
from chalicelib.github.client import _next_cursor
from chalicelib.jobs import Change, JobRecord
from chalicelib.memory import (
    InMemoryDemandQueue,
    InMemoryJobIndex,
    InMemoryJobStore,
    InMemoryReconcilerTable,
    InMemoryRunnerStore,
)
from chalicelib.pools import PoolConfig
from chalicelib.reconciler import Reconciler, ReconcileSummary
from chalicelib.reconciler.deliveries import REREAD_DELIVERIES
from chalicelib.reconciler.policy import Policy
from chalicelib.runners import RunnerState
from chalicelib.telemetry import Telemetry

T0 = 1_700_000_000.0
ORG = "acme"
POOLS = PoolConfig.model_validate(
    {"pool": [{"name": "small", "labels": ["linux"], "scope": {"owner": ORG}, "image": "img"}]}
)
POLICY = Policy(stuck_after_s=300, dispatched_stuck_after_s=900, redeliver_every_s=600,
                delivery_pages_per_run=3, orphan_grace_s=120)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeGitHub:
    """The GitHub calls the reconciler makes, with a delivery log and call counts."""

    def __init__(self, clock: Clock, per_page: int = 2, app_id: int = 1) -> None:
        self.clock = clock
        self.per_page = per_page
        self.app_id = app_id
        self.budget = RateBudget()
        # The REST view of what is queued: repositories, their runs, the runs' jobs.
        self.repositories: list[dict] = []
        self.runs: dict[str, list[dict]] = {}
        self.run_jobs: dict[int, list[dict]] = {}
        self.list_per_page = 100
        self.log: list[dict] = []
        self.jobs: dict[int, dict] = {}
        self.runners: dict[str, list[dict]] = {}
        self.calls: Counter[str] = Counter()
        self.down: set[str] = set()
        self.redelivered: list[int] = []
        # What a redelivery does on the receiving side: its status code (and side effects).
        self.on_redeliver = lambda guid: 200

    def _call(self, name: str) -> None:
        self.calls[name] += 1
        if name in self.down:
            raise GitHubError(503, "GET", f"/{name}", "Service Unavailable")

    def deliver(self, guid: str, status: int, event: str = "workflow_job") -> int:
        delivery_id = len(self.log) + 1
        self.log.append({"id": delivery_id, "guid": guid, "event": event, "action": "queued",
                         "status_code": status, "delivered_at": iso(self.clock()),
                         "redelivery": False})
        return delivery_id

    def list_deliveries(self, cursor=None, per_page=100):
        self._call("list_deliveries")
        items = sorted(self.log, key=lambda d: -d["id"])
        if cursor:
            items = [d for d in items if d["id"] < int(cursor)]
        page = items[: self.per_page]
        more = len(items) > self.per_page
        return DeliveryPage(tuple(page), str(page[-1]["id"]) if more else None)

    def redeliver(self, delivery_id: int) -> bool:
        self._call("redeliver")
        original = next(d for d in self.log if d["id"] == delivery_id)
        self.redelivered.append(delivery_id)
        status = self.on_redeliver(original["guid"])
        self.log.append({**original, "id": len(self.log) + 1, "status_code": status,
                         "redelivery": True, "delivered_at": iso(self.clock())})
        return True

    def installation_for(self, owner, repo=None):
        self._call("installation_for")
        return 77

    def get_job(self, installation_id, repository, job_id):
        self._call("get_job")
        return self.jobs[job_id]

    def _page(self, name: str, items: list[dict], page: int) -> ListPage:
        self._call(name)
        size = self.list_per_page
        chunk = items[(page - 1) * size : page * size]
        more = page * size < len(items)
        return ListPage(tuple(chunk), len(items), page + 1 if more else None)

    def list_installation_repositories(self, installation_id, page=1, per_page=100):
        return self._page("list_repositories", self.repositories, page)

    def list_queued_runs(self, installation_id, repository, page=1, per_page=100):
        runs = [r for r in self.runs.get(repository, []) if r["status"] == "queued"]
        return self._page("list_runs", runs, page)

    def list_run_jobs(self, installation_id, repository, run_id, page=1, per_page=100):
        return self._page("list_jobs", self.run_jobs.get(run_id, []), page)

    def list_runners(self, installation_id, scope):
        self._call("list_runners")
        return list(self.runners.get(scope.path, []))

    def delete_runner(self, installation_id, scope, runner_id):
        self._call("delete_runner")
        runners = self.runners.get(scope.path, [])
        found = next((r for r in runners if r["id"] == runner_id), None)
        if found and found.get("busy_now"):
            return False  # GitHub's 422 for a runner that is running a job
        self.runners[scope.path] = [r for r in runners if r["id"] != runner_id]
        return True


class World:
    def __init__(self, per_page: int = 2, policy: Policy = POLICY) -> None:
        self.clock = Clock()
        self.github = FakeGitHub(self.clock, per_page)
        self.jobs = InMemoryJobStore()
        self.runners = InMemoryRunnerStore()
        self.demand = InMemoryDemandQueue()
        self.table = InMemoryReconcilerTable()
        self.telemetry = Telemetry("reconciler", emit=False)
        self.policy = policy

    def reconciler(self, owner: str = "r1", **overrides) -> Reconciler:
        args = dict(
            pools=POOLS, jobs=self.jobs, job_index=InMemoryJobIndex(self.jobs),
            runners=self.runners, demand=self.demand, github=self.github,
            deliveries=self.table, lease=self.table, telemetry=self.telemetry,
            policy=self.policy, lease_s=120, owner=owner, clock=self.clock,
        )
        return Reconciler(**(args | overrides))

    def job(self, job_id: int, state: str, at: float | None = None, lease_until=None
            ) -> JobRecord:
        """A job left in `state` at time `at` (default: an hour ago)."""
        at = T0 - 3600 if at is None else at
        facts = Change(facts={"pool": "small", "repository": f"{ORG}/app", "owner": ORG,
                              "labels": ["linux"], "installation_id": 77})
        self.jobs.apply(job_id, m.RECEIVE, at, facts)
        if state in ("dispatched", "claimed", "runner_started"):
            self.jobs.apply(job_id, m.DISPATCH, at, generation=1)
        if state in ("claimed", "runner_started"):
            self.jobs.apply(job_id, m.CLAIM, at, Change(fields={
                "host_id": "h1", "lease_until": lease_until if lease_until else at + 120,
            }), generation=1)
        if state == "runner_started":
            self.jobs.apply(job_id, m.START_RUNNER, at, generation=1, host_id="h1")
        return self.jobs.get(job_id)

    def processed(self, guid: str) -> int:
        """A redelivery reaches the webhook, which records the guid done."""
        self.table.statuses[guid] = "done"
        return 200


@pytest.fixture
def world():
    return World()


# --- lost webhooks ----------------------------------------------------------------------------


def test_lost_webhook_is_redelivered_once(world):
    lost = world.github.deliver("lost", 502)
    world.github.deliver("fine", 200)
    world.github.on_redeliver = world.processed
    summary = world.reconciler().run()
    assert summary.acted and summary.redelivered == 1 and summary.errors == 0
    assert world.github.redelivered == [lost]
    world.clock.now += 60
    again = world.reconciler().run()
    # The redelivery's 2xx attempt and the `done` record settle it: nothing more.
    assert again.redelivered == 0 and again.pending_deliveries == 0
    assert world.github.redelivered == [lost]
    assert world.telemetry.total("Redelivered") == 1


def test_delivery_already_processed_is_not_redelivered(world):
    world.github.deliver("slow", 0)  # GitHub timed out, RunnerHub finished the work
    world.table.statuses["slow"] = "done"
    assert world.reconciler().run().redelivered == 0
    assert world.github.redelivered == []


def test_cursor_resumes_where_the_last_run_stopped(world):
    for index in range(4):
        world.github.deliver(f"ok{index}", 200)
    world.reconciler().run()
    assert world.table.state.cursor_of(1).floor_id == max(0, 4 - REREAD_DELIVERIES)
    world.github.calls.clear()
    world.github.deliver("new-lost", 500)
    summary = world.reconciler().run()
    # The new delivery plus the re-read window of recent rows (5 rows here), not the history.
    assert world.github.calls["list_deliveries"] <= 3
    assert summary.deliveries_read == 5 and summary.redelivered == 1  # ok rows: no action


def test_unfinished_scan_resumes_before_reading_newer_deliveries():
    world = World(per_page=1, policy=Policy(delivery_pages_per_run=2))
    for index in range(5):
        world.github.deliver(f"g{index}", 500 if index == 0 else 200)
    first = world.reconciler().run()
    assert first.deliveries_read == 2 and first.redelivered == 0
    assert world.table.state.cursor_of(1).resume == "4"
    second = world.reconciler().run()
    assert second.deliveries_read == 2 and world.table.state.cursor_of(1).resume == "2"
    third = world.reconciler().run()
    # The oldest delivery (id 1, failed) is reached on the third run and redelivered.
    assert third.redelivered == 1 and world.github.redelivered == [1]
    cursor = world.table.state.cursor_of(1)
    assert cursor.floor_id == max(0, 5 - REREAD_DELIVERIES) and cursor.resume is None


def test_redelivery_that_fails_again_waits_the_interval(world):
    world.github.deliver("flaky", 502)
    world.github.on_redeliver = lambda guid: 502
    assert world.reconciler().run().redelivered == 1
    world.clock.now += 60
    waiting = world.reconciler().run()
    assert waiting.redelivered == 0 and waiting.pending_deliveries == 1
    world.clock.now += 600
    assert world.reconciler().run().redelivered == 1
    assert len(world.github.redelivered) == 2


def test_listing_deliveries_down_still_checks_jobs(world):
    world.github.down.add("list_deliveries")
    world.job(1, "received")
    world.github.jobs[1] = {"status": "queued"}
    summary = world.reconciler().run()
    assert summary.errors == 1 and summary.re_demanded == 1


# --- stuck jobs -------------------------------------------------------------------------------


def test_github_5xx_never_closes_a_job(world):
    for job_id, state in enumerate(("received", "dispatched", "claimed", "runner_started"), 1):
        world.job(job_id, state)
    world.github.down.add("get_job")
    before = {job.job_id: job for job in world.jobs.all()}
    summary = world.reconciler().run()
    assert summary.errors == 4 and summary.re_demanded == 0 and summary.moved_forward == 0
    assert {job.job_id: job for job in world.jobs.all()} == before
    assert world.demand.messages == []


def test_stuck_dispatched_job_still_queued_is_re_demanded(world):
    world.job(1, "dispatched")
    world.github.jobs[1] = {"status": "queued"}
    summary = world.reconciler().run()
    assert summary.re_demanded == 1
    job = world.jobs.get(1)
    assert job.state == "dispatched" and job.demand_generation == 2
    assert job.redemand_reason == "reconciler:stale_dispatched"
    assert [(msg.job_id, msg.generation) for msg in world.demand.messages] == [(1, 2)]


def test_live_lease_is_left_alone_and_not_asked_about(world):
    world.job(1, "claimed", at=T0 - 3600, lease_until=T0 + 60)
    world.github.jobs[1] = {"status": "queued"}
    summary = world.reconciler().run()
    assert summary.re_demanded == 0 and summary.jobs_checked == 0
    assert world.github.calls["get_job"] == 0
    assert world.jobs.get(1).demand_generation == 1


def test_expired_lease_is_re_demanded(world):
    world.job(1, "runner_started", lease_until=T0 - 3000)
    world.github.jobs[1] = {"status": "queued"}
    assert world.reconciler().run().re_demanded == 1
    job = world.jobs.get(1)
    assert job.demand_generation == 2 and job.host_id is None and job.lease_until is None


def test_completed_on_github_is_completed_here_with_its_conclusion(world):
    world.job(1, "runner_started")
    world.github.jobs[1] = {"status": "completed", "conclusion": "cancelled",
                            "runner_name": "rh-1-1-abc", "runner_id": 4,
                            "completed_at": "2023-11-14T22:00:00Z"}
    summary = world.reconciler().run()
    assert summary.moved_forward == 1 and summary.re_demanded == 0
    job = world.jobs.get(1)
    assert (job.state, job.conclusion) == ("completed", "cancelled")
    assert job.github_completed_at == "2023-11-14T22:00:00Z"


def test_in_progress_on_github_marks_our_runner_busy(world):
    world.job(1, "runner_started")
    world.runners.move("rh-1-1-abc", RunnerState.STARTING, T0 - 3600, job_id=1)
    world.github.jobs[1] = {"status": "in_progress", "runner_name": "rh-1-1-abc",
                            "runner_id": 4, "started_at": "2023-11-14T22:00:00Z"}
    assert world.reconciler().run().moved_forward == 1
    assert world.jobs.get(1).state == "in_progress"
    assert world.runners.get("rh-1-1-abc").state == "busy"


def test_recent_jobs_are_not_checked(world):
    world.job(1, "received", at=T0 - 10)
    world.reconciler().run()
    assert world.github.calls["get_job"] == 0


def test_jobs_checked_per_run_are_bounded():
    world = World(policy=Policy(jobs_per_run=2))
    for job_id in range(1, 6):
        world.job(job_id, "received")
        world.github.jobs[job_id] = {"status": "queued"}
    assert world.reconciler().run().re_demanded == 2


# --- orphan runners ---------------------------------------------------------------------------

ORG_RUNNERS = RunnerScope("org", ORG).path


def runner(runner_id: int, name: str, status: str = "offline", busy: bool = False) -> dict:
    return {"id": runner_id, "name": name, "status": status, "busy": busy}


def test_busy_runner_is_never_deleted(world):
    world.runners.move("rh-1-1-aaa", RunnerState.STARTING, T0, job_id=1)
    world.runners.move("rh-1-1-aaa", RunnerState.GONE, T0)
    world.runners.move("rh-2-1-bbb", RunnerState.STARTING, T0, job_id=2)
    world.runners.move("rh-2-1-bbb", RunnerState.GONE, T0)
    world.github.runners[ORG_RUNNERS] = [
        runner(1, "rh-1-1-aaa", "online", busy=True),  # busy in the list: not even tried
        {**runner(2, "rh-2-1-bbb", "online"), "busy_now": True},  # took a job since: 422
    ]
    summary = world.reconciler().run()
    assert summary.orphans_deleted == 0
    assert world.github.calls["delete_runner"] == 1
    assert len(world.github.runners[ORG_RUNNERS]) == 2


def test_gone_and_long_offline_runners_are_deleted(world):
    world.runners.move("rh-1-1-aaa", RunnerState.STARTING, T0, job_id=1)
    world.runners.move("rh-1-1-aaa", RunnerState.GONE, T0)
    world.runners.move("rh-2-1-bbb", RunnerState.STARTING, T0, job_id=2)
    world.github.runners[ORG_RUNNERS] = [
        runner(1, "rh-1-1-aaa", "online"), runner(2, "rh-2-1-bbb"), runner(3, "someone-else"),
    ]
    assert world.reconciler().run().orphans_deleted == 1  # gone at once; offline needs grace
    world.clock.now += 120
    assert world.reconciler().run().orphans_deleted == 1
    assert [r["name"] for r in world.github.runners[ORG_RUNNERS]] == ["someone-else"]


# --- one at a time, and safe to repeat --------------------------------------------------------


def test_two_reconcilers_one_acts(world):
    world.github.deliver("lost", 502)
    world.job(1, "received")
    world.github.jobs[1] = {"status": "queued"}
    first, second = world.reconciler("r1"), world.reconciler("r2")
    held = world.table.acquire("r1", world.clock(), 120)  # r1 is mid-run
    assert held is not None
    assert second.run() == ReconcileSummary(acted=False)
    assert world.github.redelivered == [] and world.jobs.get(1).demand_generation == 1
    summary = first.run()
    assert summary.acted and summary.redelivered == 1 and summary.re_demanded == 1


def test_lease_of_a_dead_reconciler_expires(world):
    world.table.acquire("dead", world.clock(), 120)
    assert not world.reconciler("r2").run().acted
    world.clock.now += 121
    assert world.reconciler("r2").run().acted


class Crash(BaseException):
    """The process dies: not an error the reconciler may catch."""


def test_half_way_crash_then_repeat_is_safe(world):
    for guid in ("a", "b"):
        world.github.deliver(guid, 502)
    for job_id in (1, 2):
        world.job(job_id, "received")
        world.github.jobs[job_id] = {"status": "queued"}
    real_get_job = world.github.get_job

    def dies_on_second_job(installation_id, repository, job_id):
        if world.github.calls["get_job"] == 1:
            raise Crash
        return real_get_job(installation_id, repository, job_id)

    world.github.get_job = dies_on_second_job
    with pytest.raises(Crash):
        world.reconciler("r1").run()
    # Both guids redelivered and job 1 re-demanded before the crash; the state was not saved.
    assert sorted(world.github.redelivered) == [1, 2]
    assert world.table.state.cursor_of(1).floor_id == 0
    world.github.get_job = real_get_job
    world.clock.now += 121  # the dead run's lease expires
    summary = world.reconciler("r2").run()
    assert summary.acted and summary.redelivered == 0  # within the interval: not again
    assert summary.re_demanded == 1  # job 2 only: job 1 is fresh again
    generations = {job.job_id: job.demand_generation for job in world.jobs.all()}
    assert generations == {1: 2, 2: 2}
    assert sorted((msg.job_id, msg.generation) for msg in world.demand.messages) == [(1, 2), (2, 2)]
    # both redeliveries' attempts read; the newest rows stay re-readable
    assert world.table.state.cursor_of(1).floor_id == max(0, 4 - REREAD_DELIVERIES)


def test_summary_counts_match_metrics(world):
    world.github.deliver("lost", 502)
    world.job(1, "received")
    world.github.jobs[1] = {"status": "queued"}
    summary = world.reconciler().run()
    assert (summary.redelivered, summary.re_demanded) == (1, 1)
    assert world.telemetry.total("Redelivered") == 1 and world.telemetry.total("ReDemanded") == 1
    assert set(summary.as_dict()) >= {"redelivered", "re_demanded", "moved_forward",
                                      "orphans_deleted", "errors"}


def test_next_cursor_is_read_from_the_link_header():
    link = ('<https://api.github.com/app/hook/deliveries?per_page=2&cursor=v1_123>; rel="next", '
            '<https://api.github.com/app/hook/deliveries?per_page=2>; rel="first"')
    assert _next_cursor(link) == "v1_123"
    assert _next_cursor('<https://x/app/hook/deliveries?per_page=2>; rel="prev"') is None
    assert _next_cursor(None) is None


# --- several Apps: every App's delivery log ---------------------------------------------------


def test_second_apps_failed_delivery_is_redelivered_through_that_app(world):
    second = FakeGitHub(world.clock, app_id=2)
    world.github.deliver("fine", 200)
    lost = second.deliver("lost-on-app-2", 502)
    second.on_redeliver = world.processed
    reconciler = world.reconciler(apps=[world.github, second])
    summary = reconciler.run()
    assert summary.redelivered == 1 and summary.errors == 0
    assert second.redelivered == [lost] and world.github.redelivered == []
    assert summary.deliveries_read == 2
    # Each App keeps its own cursor: the second App's log is not re-read from the start.
    state = world.table.state
    assert state.app_cursors[2].floor_id == max(0, lost - REREAD_DELIVERIES)
    second.calls.clear()
    assert world.reconciler(apps=[world.github, second]).run().redelivered == 0


def test_one_apps_log_down_still_reads_the_others(world):
    second = FakeGitHub(world.clock, app_id=2)
    world.github.down.add("list_deliveries")
    second.deliver("lost", 502)
    summary = world.reconciler(apps=[world.github, second]).run()
    assert summary.redelivered == 1 and summary.errors == 1


# --- dead-lettered demand ---------------------------------------------------------------------


def demand_of(world: World, job_id: int, generation: int = 1):
    from chalicelib.demand import DEMAND_SCHEMA_VERSION, DemandMessage

    return DemandMessage(schema_version=DEMAND_SCHEMA_VERSION, job_id=job_id,
                         generation=generation, pool="small", labels=("linux",),
                         repository=f"{ORG}/app", owner=ORG, installation_id=77, created_at=T0)


def test_dead_lettered_demand_of_a_still_queued_job_goes_back_at_once(world):
    # Dispatched a minute ago: far from the 15 minutes after which the stuck check looks.
    world.job(1, "dispatched", at=T0 - 60)
    world.demand.dead_letter("small", demand_of(world, 1))
    world.github.jobs[1] = {"status": "queued"}
    summary = world.reconciler(dead_letters=world.demand).run()
    assert summary.redriven == 1 and summary.errors == 0 and summary.re_demanded == 0
    job = world.jobs.get(1)
    assert job.state == "dispatched" and job.demand_generation == 2
    assert job.redemand_reason == "reconciler:dead_lettered"
    assert [(m.job_id, m.generation) for m in world.demand.messages] == [(1, 2)]
    assert world.demand.dead["small"] == []
    assert world.telemetry.total("DeadLetterRedriven") == 1


def test_dead_lettered_demand_of_a_job_github_started_is_dropped_not_redriven(world):
    world.job(1, "dispatched", at=T0 - 60)
    world.demand.dead_letter("small", demand_of(world, 1))
    world.github.jobs[1] = {"status": "in_progress", "runner_name": "someone"}
    summary = world.reconciler(dead_letters=world.demand).run()
    assert summary.redriven == 0 and summary.dead_letters_dropped == 1
    assert world.demand.messages == [] and world.demand.dead["small"] == []


def test_dead_lettered_demand_of_an_older_generation_is_dropped_without_asking_github(world):
    world.job(1, "dispatched", at=T0 - 60)
    world.demand.dead_letter("small", demand_of(world, 1, generation=7))
    summary = world.reconciler(dead_letters=world.demand).run()
    assert summary.dead_letters_dropped == 1 and world.github.calls["get_job"] == 0
    assert world.jobs.get(1).demand_generation == 1


def test_dead_lettered_demand_kept_while_github_cannot_say(world):
    world.job(1, "dispatched", at=T0 - 60)
    world.demand.dead_letter("small", demand_of(world, 1))
    world.github.down.add("get_job")
    summary = world.reconciler(dead_letters=world.demand).run()
    assert summary.redriven == 0 and summary.dead_letters_dropped == 0
    assert len(world.demand.dead["small"]) == 1 and world.jobs.get(1).demand_generation == 1


def test_dead_lettered_demand_of_a_live_claim_is_kept(world):
    world.job(1, "claimed", at=T0 - 60, lease_until=T0 + 60)
    world.demand.dead_letter("small", demand_of(world, 1))
    world.github.jobs[1] = {"status": "queued"}
    summary = world.reconciler(dead_letters=world.demand).run()
    assert summary.redriven == 0 and world.github.calls["get_job"] == 0
    assert len(world.demand.dead["small"]) == 1


def test_malformed_dead_letter_is_left_for_an_operator(world):
    world.demand.dead_letter("small", None)
    summary = world.reconciler(dead_letters=world.demand).run()
    assert summary.errors == 0 and len(world.demand.dead["small"]) == 1


# --- queued jobs GitHub never announced -------------------------------------------------------


def repo(name: str, pushed: float, private: bool = True) -> dict:
    return {"id": abs(hash(name)) % 10**6, "name": name, "full_name": f"{ORG}/{name}",
            "private": private, "owner": {"login": ORG}, "pushed_at": iso(pushed),
            "updated_at": iso(pushed - 10)}


def github_job(job_id: int, run_id: int, status: str = "queued", labels=("linux",)) -> dict:
    return {"id": job_id, "run_id": run_id, "run_attempt": 1, "name": "build",
            "workflow_name": "CI", "head_branch": "main",
            "html_url": f"https://github.com/{ORG}/x/actions/runs/{run_id}/job/{job_id}",
            "status": status, "conclusion": None, "labels": list(labels),
            "created_at": iso(T0 - 30), "started_at": iso(T0 - 30), "completed_at": None,
            "runner_id": None, "runner_name": None}


def queue_job(world: World, repository: dict, run_id: int, *jobs: dict) -> None:
    world.github.runs.setdefault(repository["full_name"], []).append(
        {"id": run_id, "status": "queued", "repository": repository})
    world.github.run_jobs[run_id] = list(jobs)


def intake_of(world: World):
    from chalicelib.webhook import JobIntake

    return JobIntake(jobs=world.jobs, demand=world.demand, runners=world.runners,
                     telemetry=world.telemetry, clock=world.clock)


def test_queued_job_never_announced_is_stored_and_demanded_like_a_queued_webhook(world):
    app = repo("app", T0 - 100)
    world.github.repositories = [app]
    queue_job(world, app, 900, github_job(5, 900))
    summary = world.reconciler(intake=intake_of(world)).run()
    assert summary.discovered == 1 and summary.errors == 0
    job = world.jobs.get(5)
    assert job.state == "dispatched" and job.demand_generation == 1
    assert (job.pool, job.repository, job.run_id, job.installation_id) == (
        "small", f"{ORG}/app", 900, 77)
    assert [(m.job_id, m.generation, m.pool) for m in world.demand.messages] == [(5, 1, "small")]
    assert world.telemetry.total("JobDiscovered") == 1


def test_discovered_job_already_known_is_left_to_its_record(world):
    app = repo("app", T0 - 100)
    world.github.repositories = [app]
    world.job(5, "dispatched", at=T0 - 60)
    queue_job(world, app, 900, github_job(5, 900))
    summary = world.reconciler(intake=intake_of(world)).run()
    assert summary.discovered == 0 and world.demand.messages == []
    assert world.jobs.get(5).demand_generation == 1


def test_discovered_job_for_no_pool_or_not_queued_is_not_taken_in(world):
    app = repo("app", T0 - 100)
    world.github.repositories = [app]
    queue_job(world, app, 900, github_job(5, 900, labels=("windows",)),
              github_job(6, 900, status="in_progress"))
    assert world.reconciler(intake=intake_of(world)).run().discovered == 0
    assert world.jobs.get(5) is None and world.jobs.get(6) is None


def test_discovery_pages_through_repositories_runs_and_jobs(world):
    world.github.list_per_page = 2
    repos = [repo(f"r{index}", T0 - index) for index in range(5)]
    world.github.repositories = repos
    queue_job(world, repos[3], 900, *[github_job(job_id, 900) for job_id in range(10, 15)])
    for run_id in range(901, 904):
        queue_job(world, repos[4], run_id, github_job(run_id, run_id))
    summary = world.reconciler(intake=intake_of(world)).run()
    assert summary.discovered == 8
    assert {m.job_id for m in world.demand.messages} == {10, 11, 12, 13, 14, 901, 902, 903}
    assert world.github.calls["list_repositories"] == 3


def test_most_recently_active_repositories_are_swept_first():
    # A budget of 10 calls an hour, 1 per run: one repository per run.
    world = World(policy=Policy(**{**POLICY.__dict__, "discovery_spread": 10}))
    world.github.budget.observe(200, {"x-ratelimit-limit": "100", "x-ratelimit-remaining": "99",
                                      "x-ratelimit-reset": str(int(T0) + 3600)}, "77")
    quiet, busy = repo("quiet", T0 - 86400), repo("busy", T0 - 5)
    world.github.repositories = [quiet, busy]
    order = []
    world.github.list_queued_runs = lambda inst, full, page=1, per_page=100: (
        order.append(full) or ListPage((), 0, None))
    reconciler = world.reconciler(intake=intake_of(world))
    for _ in range(3):  # the listing, then one repository a run
        reconciler.run()
        world.clock.now += 60
    assert order == [f"{ORG}/busy", f"{ORG}/quiet"]


def test_discovery_stays_within_a_tenth_of_the_hourly_limit():
    world = World()
    # GitHub says this installation may make 200 requests an hour: 20 for discovery.
    world.github.budget.observe(200, {"x-ratelimit-limit": "200", "x-ratelimit-remaining": "199",
                                      "x-ratelimit-reset": str(int(T0) + 3600)}, "77")
    world.github.repositories = [repo(f"r{index}", T0 - index) for index in range(100)]
    world.github.list_per_page = 100
    reconciler = world.reconciler(intake=intake_of(world))
    spent = []
    for _ in range(60):  # an hour of runs, one a minute
        before = sum(world.github.calls[n] for n in ("list_repositories", "list_runs",
                                                     "list_jobs"))
        reconciler.run()
        after = sum(world.github.calls[n] for n in ("list_repositories", "list_runs",
                                                    "list_jobs"))
        spent.append(after - before)
        world.clock.now += 60
    assert sum(spent) <= 20
    assert max(spent) <= 2  # spread over the hour: 20 / 12 runs, rounded up
    # The sweep goes on next hour where it stopped: every repository is reached in time.
    covered = world.table.state.discovery[ORG]
    assert len(covered.sweep) == 100 - (sum(spent) - 1)


def test_every_repository_is_covered_within_the_sweep_period():
    world = World()
    world.github.repositories = [repo(f"r{index}", T0 - index) for index in range(30)]
    seen: list[str] = []
    world.github.list_queued_runs = lambda inst, full, page=1, per_page=100: (
        seen.append(full) or ListPage((), 0, None))
    reconciler = world.reconciler(intake=intake_of(world))
    # Default budget: 10 % of 5,000 = 500 calls an hour, 42 a run: 30 repositories in one run.
    reconciler.run()
    assert sorted(seen) == sorted(r["full_name"] for r in world.github.repositories)
    assert world.table.state.discovery[ORG].last_sweep_s is not None
    world.clock.now += 60
    reconciler.run()  # a new sweep begins with a fresh listing
    assert len(seen) == 60 and world.github.calls["list_repositories"] == 2
