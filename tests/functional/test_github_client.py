"""chalicelib.github.GitHubApp over real HTTP against the emulator: github.com-style and GitHub
Enterprise Server (`/api/v3`) base URLs, and the rate-limit budget under enforced quotas."""

from __future__ import annotations

import time

import pytest

from chalicelib.github import GitHubApp, GitHubError, RunnerScope
from chalicelib.github.budget import BudgetLimits, RateBudget
from emulator import AppConfig, Emulator, EmulatorConfig, InstallationConfig
from emulator.testing import generate_app_key

APP_ID, INSTALLATION = 11, 110
ORG = RunnerScope("org", "acme")


def emulator(private_key_public, **options) -> Emulator:
    _, public = private_key_public
    app = AppConfig(app_id=APP_ID, public_key_pem=public,
                    installations=[InstallationConfig(id=INSTALLATION, account="acme")])
    return Emulator(EmulatorConfig(apps=[app], **options))


@pytest.fixture(scope="module")
def keys():
    return generate_app_key()


@pytest.mark.parametrize("prefix", ["", "/api/v3"])
def test_runner_lifecycle_on_github_and_enterprise_server(keys, prefix):
    with emulator(keys, api_prefix=prefix) as emu:
        assert emu.base_url.endswith(prefix)
        client = GitHubApp(APP_ID, keys[0], emu.base_url)
        assert client.installation_for("acme") == INSTALLATION
        jit = client.generate_jitconfig(INSTALLATION, ORG, "rh-1-1-x", ["self-hosted", "x"], 1)
        assert jit.name == "rh-1-1-x" and jit.encoded_jit_config.get_secret_value()
        assert jit.encoded_jit_config.get_secret_value() not in repr(jit)
        assert [r["name"] for r in client.list_runners(INSTALLATION, ORG)] == ["rh-1-1-x"]
        assert client.get_runner(INSTALLATION, ORG, jit.runner_id)["status"] == "offline"
        with pytest.raises(GitHubError) as duplicate:
            client.generate_jitconfig(INSTALLATION, ORG, "rh-1-1-x", ["self-hosted"], 1)
        assert duplicate.value.status == 409
        assert client.delete_runner(INSTALLATION, ORG, jit.runner_id) is True
        assert client.get_runner(INSTALLATION, ORG, jit.runner_id) is None
        job_id = emu.add_job(repository="acme/app", labels=["self-hosted"])
        assert client.get_job(INSTALLATION, "acme/app", job_id)["status"] == "queued"


def test_wrong_key_is_a_401(keys):
    other, _ = generate_app_key()
    with emulator(keys) as emu:
        with pytest.raises(GitHubError) as refused:
            GitHubApp(APP_ID, other, emu.base_url).installation_token(INSTALLATION)
    assert refused.value.status == 401


def test_budget_keeps_within_an_enforced_secondary_limit(keys):
    """20 points per 2 s at the emulator; the client's budget says the same: no 403/429."""
    quotas = {"enforce": True, "secondary_points": 20, "secondary_window_s": 2,
              "secondary_scope": "app"}
    with emulator(keys, faults={"rate_limits": quotas}) as emu:
        budget = RateBudget(BudgetLimits(secondary_points_per_minute=20, window_s=2.2))
        client = GitHubApp(APP_ID, keys[0], emu.base_url, budget=budget)
        started = time.monotonic()
        for index in range(8):  # 8 POSTs = 40 points: needs at least one more window
            client.generate_jitconfig(INSTALLATION, ORG, f"rh-{index}", ["self-hosted"], 1)
        elapsed = time.monotonic() - started
        refused = emu.faults_report()["injected"].get("rate_limited", 0)
    assert refused == 0 and budget.limited == 0
    assert elapsed >= 2.0 and budget.waited_s > 0


def test_a_rate_limit_refusal_waits_for_the_reset_and_retries(keys):
    """A budget that does not know the limit meets GitHub's 403, waits for retry-after and
    succeeds."""
    quotas = {"enforce": True, "secondary_points": 10, "secondary_window_s": 1,
              "secondary_scope": "app"}
    with emulator(keys, faults={"rate_limits": quotas}) as emu:
        client = GitHubApp(APP_ID, keys[0], emu.base_url)
        for index in range(3):  # the third POST goes over 10 points
            client.generate_jitconfig(INSTALLATION, ORG, f"rh-{index}", ["self-hosted"], 1)
        refused = emu.faults_report()["injected"].get("rate_limited", 0)
    assert refused >= 1 and client.budget.limited == refused
    assert len(emu.runners()) == 3


def test_rerun_job_is_refused_while_the_run_runs_then_queues_a_new_attempt(keys):
    with emulator(keys) as emu:
        client = GitHubApp(APP_ID, keys[0], emu.base_url)
        job_id = emu.add_job(repository="acme/app", labels=["nobody"])
        with pytest.raises(GitHubError) as running:
            client.rerun_job(INSTALLATION, "acme/app", job_id)
        assert running.value.status == 403
        emu.cancel_job(job_id)
        client.rerun_job(INSTALLATION, "acme/app", job_id)
        (new,) = [j for j in emu.jobs() if j.get("rerun_of") == job_id]
        assert new["status"] == "queued" and new["run_attempt"] == 2
