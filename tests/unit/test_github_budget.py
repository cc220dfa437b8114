"""The client-side GitHub budget (fake clocks: no test waits) and the App pool."""

from __future__ import annotations

import json

import pytest

from chalicelib.github import GitHubApps
from chalicelib.github.budget import BudgetLimits, RateBudget, points


class FakeTime:
    def __init__(self):
        self.now = 1000.0
        self.slept = []

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(round(seconds, 3))
        self.now += seconds


def budget(fake, **limits):
    return RateBudget(BudgetLimits(**limits), clock=fake.clock, wall=fake.clock,
                      sleep=fake.sleep)


def spend(rate: RateBudget, method: str, key: str = "1"):
    rate.acquire(method, key)
    rate.release()


def test_writes_cost_five_points_reads_one():
    assert (points("POST"), points("delete"), points("GET")) == (5, 5, 1)


def test_secondary_points_are_paced_within_the_minute():
    fake = FakeTime()
    rate = budget(fake, secondary_points_per_minute=20)
    for _ in range(4):
        spend(rate, "POST")  # 20 points: the minute's budget
    assert fake.slept == []
    spend(rate, "POST")  # waits for the first spend to leave the window
    assert fake.slept == [61.0]
    assert rate.headroom().secondary == pytest.approx(0.75)  # the first four left the window


def test_primary_quota_is_spread_when_nearly_spent():
    fake = FakeTime()
    rate = budget(fake, primary_reserve=0.5)
    rate.observe(200, {"x-ratelimit-limit": "100", "x-ratelimit-remaining": "10",
                       "x-ratelimit-reset": str(int(fake.now + 100))}, "1")
    spend(rate, "GET")  # 9 left for 100 s: one every ~11 s
    spend(rate, "GET")
    assert fake.slept and fake.slept[0] == pytest.approx(100 / 9, rel=0.01)


def test_exhausted_primary_waits_for_the_reset():
    fake = FakeTime()
    rate = budget(fake)
    refused = rate.observe(403, {"x-ratelimit-limit": "100", "x-ratelimit-remaining": "0",
                                 "x-ratelimit-reset": str(int(fake.now + 30))}, "1")
    assert refused
    spend(rate, "GET")
    assert sum(fake.slept) >= 30


def test_retry_after_is_honoured():
    fake = FakeTime()
    rate = budget(fake)
    assert rate.observe(429, {"retry-after": "7"})
    spend(rate, "POST")
    assert fake.slept == [7.0] and rate.limited == 1


def test_a_plain_403_is_not_a_rate_limit():
    fake = FakeTime()
    rate = budget(fake)
    assert not rate.observe(403, {"x-ratelimit-remaining": "4000"})
    spend(rate, "GET")
    assert fake.slept == []


def test_concurrency_is_capped():
    fake = FakeTime()
    rate = budget(fake, max_concurrent=1)
    rate.acquire("GET")
    assert rate._wait_s(1, "app") > 0  # a second request must wait while one is in flight
    rate.release()
    assert rate._wait_s(1, "app") <= 0


class StubApp:
    def __init__(self, app_id, fake):
        self.app_id = app_id
        self.budget = budget(fake, secondary_points_per_minute=10)


def test_apps_are_used_in_turn_and_one_near_its_limit_is_skipped():
    fake = FakeTime()
    apps = GitHubApps([StubApp(1, fake), StubApp(2, fake), StubApp(3, fake)])
    assert [apps.pick().app_id for _ in range(3)] == [1, 2, 3]
    spend(apps.by_id(2).budget, "POST", "app")
    spend(apps.by_id(2).budget, "POST", "app")  # 10 of 10 points: App 2 is at its limit
    picked = [apps.pick().app_id for _ in range(6)]
    assert 2 not in picked and set(picked) == {1, 3}


def test_all_apps_near_their_limit_picks_the_one_with_most_left():
    fake = FakeTime()
    apps = GitHubApps([StubApp(1, fake), StubApp(2, fake)])
    for _ in range(2):
        spend(apps.by_id(1).budget, "POST", "app")
    spend(apps.by_id(2).budget, "POST", "app")
    spend(apps.by_id(2).budget, "GET", "app")
    spend(apps.by_id(2).budget, "GET", "app")
    spend(apps.by_id(2).budget, "GET", "app")
    spend(apps.by_id(2).budget, "GET", "app")  # App 2: 9 of 10 points, App 1: 10 of 10
    assert apps.pick().app_id == 2


def test_budget_observer_hears_every_apps_headroom_at_most_every_30s():
    fake = FakeTime()
    heard = []
    apps = GitHubApps([StubApp(1, fake), StubApp(2, fake)], observer=heard.append,
                      clock=fake.clock)
    apps.pick()
    apps.pick()
    assert len(heard) == 1 and set(heard[0]) == {1, 2}
    fake.now += 31
    apps.pick()
    assert len(heard) == 2


def test_least_budget_is_published_as_a_metric(capsys):
    from chalicelib.github.budget import Headroom
    from executor.metrics import ExecutorMetrics, publish_app_budget

    metrics = ExecutorMetrics()
    publish_app_budget(metrics, {1: Headroom(0.5, 0.9, 0.0), 2: Headroom(1.0, 0.05, 0.0)})
    assert metrics.value("runnerhub_github_app_budget_remaining_ratio", app_id="2") == 0.05
    emf = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert emf["GitHubAppBudgetRemaining"] in (5.0, [5.0])
