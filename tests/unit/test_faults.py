"""Fault decisions (seeded, reproducible), the injected-faults report and its shortfall check,
the fault configuration models, and the enforced rate limiter with a fake clock."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from emulator import EmulatorConfig, Workload
from emulator.auth import Caller, RateLimits
from emulator.config import AppConfig, InstallationConfig
from emulator.faults import FaultInjector, FaultsConfig, FaultShortfall, draw, problems
from emulator.rate_limits import RateLimiter, RateLimitRules

N = 20_000


def injector(**webhooks) -> FaultInjector:
    return FaultInjector(FaultsConfig(seed=7, webhooks=webhooks))


def fates(inj: FaultInjector, n: int = N, action: str = "queued") -> list[str | None]:
    return [inj.webhook_fault(job_id, action, "queued") for job_id in range(n)]


# -- decisions -------------------------------------------------------------------------------


def test_draw_is_fixed_by_seed_and_key():
    assert draw(1, "webhook", 5) == draw(1, "webhook", 5)
    assert draw(1, "webhook", 5) != draw(2, "webhook", 5)
    assert all(0.0 <= draw(3, "x", i) < 1.0 for i in range(1000))


def test_same_seed_same_fates_whatever_the_order():
    a = injector(drop=0.2, duplicate=0.1, reorder=0.1)
    b = injector(drop=0.2, duplicate=0.1, reorder=0.1)
    forward = {j: a.webhook_fault(j, "queued", "queued") for j in range(500)}
    # Another interleaving of jobs: each job's delivery still meets the same fate.
    backward = {j: b.webhook_fault(j, "queued", "queued") for j in reversed(range(500))}
    assert forward == backward
    other = FaultInjector(FaultsConfig(seed=8, webhooks={"drop": 0.2}))
    assert forward != {j: other.webhook_fault(j, "queued", "queued") for j in range(500)}


def test_webhook_shares_are_met_and_exclusive():
    got = fates(injector(drop=0.1, duplicate=0.05, reorder=0.2))
    for fate, share in (("drop", 0.1), ("duplicate", 0.05), ("reorder", 0.2)):
        assert got.count(fate) / N == pytest.approx(share, abs=0.01), fate
    assert got.count(None) / N == pytest.approx(0.65, abs=0.015)


def test_repeated_events_of_one_job_are_decided_apart():
    inj = injector(drop=0.5)
    # A job's second `queued` (another delivery id on GitHub) is its own opportunity.
    first = [inj.webhook_fault(j, "queued", "queued") for j in range(200)]
    second = [inj.webhook_fault(j, "queued", "queued") for j in range(200)]
    assert first != second


def test_actions_limit_drop_and_duplicate():
    inj = injector(drop=1.0, actions=["queued"])
    assert inj.webhook_fault(1, "queued", "queued") == "drop"
    assert inj.webhook_fault(1, "in_progress", "in_progress") is None
    report = inj.report()
    assert report["opportunities"]["webhook"] == 2
    assert report["expected"]["dropped"] == 1.0


def test_reorder_needs_a_holdable_action_and_a_free_slot():
    inj = injector(reorder=1.0, reorder_actions=["in_progress"])
    assert inj.webhook_fault(1, "in_progress", "in_progress") == "reorder"
    assert inj.webhook_fault(2, "in_progress", "in_progress", can_hold=False) is None
    assert inj.webhook_fault(3, "queued", "queued") is None
    assert inj.webhook_fault(4, "completed", "completed") is None
    report = inj.report()
    assert report["opportunities"]["reorder"] == 1
    assert report["expected"]["reordered"] == 1.0
    with pytest.raises(ValidationError):
        FaultsConfig(webhooks={"reorder_actions": ["nonsense"]})


def test_api_fault_share_statuses_and_filters():
    inj = FaultInjector(
        FaultsConfig(
            seed=3, api={"error_share": 0.3, "statuses": [502, 503, 504], "after_effect_share": 0.5}
        )
    )
    faults = [inj.api_fault("GET", "/orgs/o/actions/runners") for _ in range(N)]
    failed = [f for f in faults if f is not None]
    assert len(failed) / N == pytest.approx(0.3, abs=0.01)
    assert {f.status for f in failed} == {502, 503, 504}
    assert sum(f.after_effect for f in failed) / len(failed) == pytest.approx(0.5, abs=0.03)
    assert failed[0].body()["status"] == str(failed[0].status)
    assert inj.report()["opportunities"]["api"] == N

    only = FaultInjector(
        FaultsConfig(
            api={"error_share": 1.0, "path_pattern": "generate-jitconfig$", "methods": ["post"]}
        )
    )
    assert only.api_fault("POST", "/orgs/o/actions/runners/generate-jitconfig") is not None
    assert only.api_fault("GET", "/orgs/o/actions/runners/generate-jitconfig") is None
    assert only.api_fault("POST", "/app/installations/1/access_tokens") is None
    assert FaultInjector().api_fault("GET", "/app") is None  # off by default


def test_reset_replays_the_same_decisions():
    inj = injector(drop=0.3)
    first = fates(inj, 300)
    inj.reset()
    assert fates(inj, 300) == first
    assert inj.report()["opportunities"]["webhook"] == 300


# -- report and check ------------------------------------------------------------------------


def test_report_counts_and_flags_shortfalls():
    inj = injector(drop=0.5, duplicate=0.2)
    decided = fates(inj, 100)
    for fate in decided:
        if fate == "drop":
            inj.record("dropped")
    report = inj.report()
    assert report["seed"] == 7
    assert report["injected"]["dropped"] == decided.count("drop")
    assert report["expected"]["dropped"] == pytest.approx(50.0)
    assert report["expected"]["duplicated"] == pytest.approx(20.0)
    # Duplicates were decided but none was really sent: the check names them.
    assert len(report["problems"]) == 1 and report["problems"][0].startswith("duplicated")
    with pytest.raises(FaultShortfall, match="duplicated"):
        inj.check()
    for _ in range(10):
        inj.record("duplicated")
    assert inj.check()["problems"] == []


def test_problems_ignores_unconfigured_kinds_and_rate_limits():
    report = {"injected": {"rate_limited": 0}, "expected": {"dropped": 0.0, "api_5xx": 0.0}}
    assert problems(report) == []
    assert problems({"injected": {"api_5xx": 4}, "expected": {"api_5xx": 10.0}})
    assert not problems({"injected": {"api_5xx": 5}, "expected": {"api_5xx": 10.0}})


# -- configuration ---------------------------------------------------------------------------


def test_fault_config_validation():
    with pytest.raises(ValidationError):
        FaultsConfig(webhooks={"drop": 0.6, "duplicate": 0.5})
    with pytest.raises(ValidationError):
        FaultsConfig(webhooks={"drop": 1.5})
    with pytest.raises(ValidationError):
        FaultsConfig(api={"statuses": [404]})
    with pytest.raises(ValidationError):
        FaultsConfig(api={"path_pattern": "("})
    with pytest.raises(ValidationError):
        FaultsConfig(webhooks={"drop_status_code": 200})
    with pytest.raises(ValidationError):
        FaultsConfig(surprise=1)


def test_faults_in_emulator_config_and_workload_json():
    config = EmulatorConfig.model_validate({"faults": {"seed": 9, "webhooks": {"drop": 0.1}}})
    assert config.faults.seed == 9 and config.faults.webhooks.drop == 0.1
    assert EmulatorConfig().faults == FaultsConfig()
    workload = Workload.model_validate(
        {
            "name": "lossy",
            "faults": {"rate_limits": {"enforce": True, "per_app": {"12": {"installation": 50}}}},
            "jobs": [{"repository": "o/r", "labels": ["x"]}],
        }
    )
    assert workload.faults.rate_limits.per_app[12].installation == 50
    assert Workload.model_validate({"jobs": []}).faults is None


# -- rate limits -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


APP = AppConfig.model_construct(app_id=12, slug="a", installations=[])


def installation(inst_id: int = 120, app: AppConfig = APP) -> Caller:
    return Caller(
        "installation", f"inst:{inst_id}", app, InstallationConfig(id=inst_id, account="octo")
    )


def test_primary_limit_refuses_when_spent_and_recovers_after_reset():
    clock = FakeClock()
    limiter = RateLimiter(
        EmulatorConfig(),
        clock=clock,
        rules=RateLimitRules(enforce=True, installation=3, window_s=10, status=429),
    )
    caller = installation()
    answers = [limiter.admit(caller, "GET") for _ in range(4)]
    assert [a.refusal is None for a in answers] == [True, True, True, False]
    refused = answers[3]
    assert refused.refusal.status == 429 and refused.refusal.kind == "primary"
    assert "installation ID 120" in refused.refusal.message
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert refused.headers["x-ratelimit-used"] == "3"  # refusals are not counted
    assert int(refused.headers["x-ratelimit-reset"]) == pytest.approx(clock.now + 10, abs=1)
    assert "retry-after" not in refused.headers  # GitHub: wait for x-ratelimit-reset
    clock.now += 10
    again = limiter.admit(caller, "GET")
    assert again.refusal is None and again.headers["x-ratelimit-used"] == "1"


def test_not_enforced_counts_past_the_limit():
    limiter = RateLimiter(EmulatorConfig(), clock=FakeClock(), rules=RateLimitRules(installation=2))
    answers = [limiter.admit(installation(), "GET") for _ in range(3)]
    assert all(a.refusal is None for a in answers)
    assert answers[-1].headers["x-ratelimit-remaining"] == "0"


def test_uncounted_calls_are_never_refused():
    limiter = RateLimiter(
        EmulatorConfig(), clock=FakeClock(), rules=RateLimitRules(enforce=True, installation=1)
    )
    assert limiter.admit(installation(), "GET").refusal is None
    assert limiter.admit(installation(), "GET").refusal is not None
    status = limiter.admit(installation(), "GET", counted=False)
    assert status.refusal is None and status.headers["x-ratelimit-used"] == "1"
    assert limiter.status(installation())["remaining"] == 0


def test_quotas_per_app_and_per_installation():
    rules = RateLimitRules(
        enforce=True,
        installation=100,
        per_app={12: {"installation": 5, "app": 7}},
        per_installation={121: 9},
        unauthenticated=2,
    )
    limiter = RateLimiter(EmulatorConfig(), clock=FakeClock(), rules=rules)
    assert limiter.limit_for(installation(120)) == 5
    assert limiter.limit_for(installation(121)) == 9
    other_app = AppConfig.model_construct(app_id=13, slug="b", installations=[])
    assert limiter.limit_for(installation(130, other_app)) == 100
    assert limiter.limit_for(Caller("app", "app:12", APP)) == 7
    assert limiter.limit_for(Caller("app", "app:13", other_app)) == 5000  # EmulatorConfig
    assert limiter.limit_for(Caller("anonymous", "ip:127.0.0.1")) == 2


def test_secondary_limit_costs_points_and_slides():
    clock = FakeClock()
    limiter = RateLimiter(
        EmulatorConfig(),
        clock=clock,
        rules=RateLimitRules(secondary_points=12, secondary_window_s=60),
    )
    caller = installation()
    assert limiter.admit(caller, "POST").refusal is None  # 5
    clock.now += 10
    assert limiter.admit(caller, "POST").refusal is None  # 10
    assert limiter.admit(caller, "GET").refusal is None  # 11
    refused = limiter.admit(caller, "POST")
    assert refused.refusal.kind == "secondary" and refused.refusal.status == 403
    assert "secondary rate limit" in refused.refusal.message
    # The first POST leaves the window 60 s after it was made, 50 s from now.
    assert refused.headers["retry-after"] == "50"
    assert limiter.admit(caller, "GET").refusal is None  # 12: reads still fit
    clock.now += 50
    assert limiter.admit(caller, "POST").refusal is None


def test_secondary_limit_per_app_shares_one_budget():
    rules = RateLimitRules(secondary_scope="app", per_app={12: {"secondary_points": 10}})
    limiter = RateLimiter(EmulatorConfig(), clock=FakeClock(), rules=rules)
    assert limiter.admit(installation(120), "POST").refusal is None
    assert limiter.admit(installation(121), "POST").refusal is None
    assert limiter.admit(Caller("app", "app:12", APP), "POST").refusal is not None
    # Another App has no secondary limit configured.
    other = AppConfig.model_construct(app_id=13, slug="b", installations=[])
    assert all(limiter.admit(installation(130, other), "POST").refusal is None for _ in range(5))


def test_injector_configure_updates_the_limiter_rules():
    limiter = RateLimiter(EmulatorConfig(), clock=FakeClock())
    inj = FaultInjector(limiter=limiter)
    assert limiter.rules.enforce is False
    inj.configure({"rate_limits": {"enforce": True, "installation": 1}})
    assert limiter.rules.enforce is True and limiter.limit_for(installation()) == 1


def test_old_name_still_counts_in_hourly_windows():
    clock = FakeClock()
    limits = RateLimits(EmulatorConfig(), clock=clock)
    assert limits.count(Caller("installation", "inst:1"))["x-ratelimit-used"] == "1"
    assert int(limits.count(Caller("installation", "inst:1"))["x-ratelimit-reset"]) == (
        pytest.approx(clock.now + 3600, abs=1)
    )
