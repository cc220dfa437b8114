"""REST faults over real HTTP: a configured share of GitHub calls answered 5xx (never the
runner protocol or the introspection endpoints), failures after the call took effect, and
enforced primary and secondary rate limits with their reset headers and recovery."""

from __future__ import annotations

import time

import pytest
import requests

from emulator import AppConfig, Emulator, EmulatorConfig, InstallationConfig
from emulator.testing import app_jwt, generate_app_key

APP_ID = 99
INSTALLATION = 990
ORG = "api-fault-org"
RUNNERS = f"/orgs/{ORG}/actions/runners"


@pytest.fixture(scope="module")
def keys():
    return generate_app_key()


@pytest.fixture
def emu(keys):
    config = EmulatorConfig(
        apps=[
            AppConfig(
                app_id=APP_ID,
                public_key_pem=keys[1],
                installations=[InstallationConfig(id=INSTALLATION, account=ORG)],
            )
        ]
    )
    with Emulator(config) as emulator:
        yield emulator


@pytest.fixture
def http():
    with requests.Session() as session:
        yield session


def token(emu, keys, http) -> str:
    resp = http.post(
        f"{emu.base_url}/app/installations/{INSTALLATION}/access_tokens",
        headers={"Authorization": f"Bearer {app_jwt(APP_ID, keys[0])}"},
        timeout=5,
    )
    assert resp.status_code == 201, resp.text
    return resp.json()["token"]


def call(http, emu, method, path, tok, **kwargs) -> requests.Response:
    headers = {"Authorization": f"token {tok}"}
    return http.request(method, emu.base_url + path, headers=headers, timeout=5, **kwargs)


def test_api_5xx_share_is_observed_within_tolerance(emu, keys, http):
    tok = token(emu, keys, http)  # before the faults: the setup itself must not fail
    emu.set_faults({"seed": 21, "api": {"error_share": 0.25}})
    n = 200
    answers = [call(http, emu, "GET", RUNNERS, tok) for _ in range(n)]
    failed = [r for r in answers if r.status_code >= 500]
    assert {r.status_code for r in answers} <= {200, 502, 503}
    # Binomial sd is ~6 calls: 4 sd either side.
    assert 0.25 * n - 25 <= len(failed) <= 0.25 * n + 25
    for resp in failed:
        body = resp.json()
        assert body["status"] == str(resp.status_code) and body["message"]
        assert "x-ratelimit-remaining" in resp.headers and "X-GitHub-Request-Id" in resp.headers
    report = emu.faults_report()
    assert report["injected"]["api_5xx"] == len(failed)
    assert report["opportunities"]["api"] == n
    assert report["expected"]["api_5xx"] == pytest.approx(50.0)
    assert report["problems"] == []


def test_runner_protocol_and_introspection_are_never_failed(emu, http):
    emu.set_faults({"api": {"error_share": 1.0}})
    for _ in range(30):
        assert http.get(f"{emu.root_url}/_emulator/health", timeout=5).status_code == 200
        # No session: the runner protocol's own 401, never an injected 5xx.
        assert http.post(f"{emu.root_url}/_runner/poll", json={}, timeout=5).status_code == 401
    assert emu.faults_report()["opportunities"]["api"] == 0
    assert http.get(f"{emu.base_url}/meta", timeout=5).status_code in (502, 503)


def test_a_5xx_after_the_effect_leaves_the_runner_created(emu, keys, http):
    tok = token(emu, keys, http)
    emu.set_faults(
        {"api": {"error_share": 1.0, "after_effect_share": 1.0, "path_pattern": "jitconfig$"}}
    )
    body = {"name": "half-made", "runner_group_id": 1, "labels": ["linux"]}
    first = call(http, emu, "POST", f"{RUNNERS}/generate-jitconfig", tok, json=body)
    assert first.status_code in (502, 503)
    listed = call(http, emu, "GET", f"{RUNNERS}?name=half-made", tok).json()
    assert listed["total_count"] == 1  # GitHub made it before the answer was lost
    emu.set_faults({})
    retry = call(http, emu, "POST", f"{RUNNERS}/generate-jitconfig", tok, json=body)
    assert retry.status_code == 409
    assert emu.faults_report()["injected"]["api_5xx_after_effect"] == 1


def test_a_timed_out_call_answers_late_and_still_takes_effect(emu, keys, http):
    tok = token(emu, keys, http)
    emu.set_faults({"api": {"timeout_share": 1.0, "timeout_s": 1.5,
                            "path_pattern": "jitconfig$"}})
    body = {"name": "late", "runner_group_id": 1, "labels": ["linux"]}
    with pytest.raises(requests.Timeout):
        http.post(emu.base_url + f"{RUNNERS}/generate-jitconfig", json=body, timeout=0.5,
                  headers={"Authorization": f"token {tok}"})
    emu.set_faults({})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        listed = call(http, emu, "GET", f"{RUNNERS}?name=late", tok).json()
        if listed["total_count"]:
            break
        time.sleep(0.1)
    assert listed["total_count"] == 1  # the client gave up; GitHub made the runner anyway
    report = emu.faults_report()
    assert (report["injected"]["api_timeouts"], report["injected"]["api_5xx"]) == (1, 0)


def wait_until_epoch(epoch: float, limit_s: float = 5.0) -> None:
    assert epoch - time.time() <= limit_s, "reset too far away for a test"
    while time.time() < epoch + 0.05:
        time.sleep(0.02)


@pytest.mark.parametrize("status", [403, 429])
def test_primary_limit_refuses_then_recovers_after_reset(emu, keys, http, status):
    tok = token(emu, keys, http)
    emu.set_faults(
        {"rate_limits": {"enforce": True, "installation": 5, "window_s": 1.0, "status": status}}
    )
    answers = [call(http, emu, "GET", RUNNERS, tok) for _ in range(6)]
    assert [r.status_code for r in answers] == [200] * 5 + [status]
    assert [r.headers["x-ratelimit-remaining"] for r in answers[:5]] == ["4", "3", "2", "1", "0"]
    refused = answers[5]
    assert (
        refused.json()["message"] == f"API rate limit exceeded for installation ID {INSTALLATION}."
    )
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert refused.headers["x-ratelimit-limit"] == "5"
    reset = int(refused.headers["x-ratelimit-reset"])
    # GET /rate_limit is not counted and tells the same story.
    core = call(http, emu, "GET", "/rate_limit", tok).json()["resources"]["core"]
    assert (core["remaining"], core["reset"]) == (0, reset)

    if status == 429:
        return  # recovery is the same for both statuses; wait for it once
    wait_until_epoch(reset)
    after = call(http, emu, "GET", RUNNERS, tok)
    assert after.status_code == 200 and after.headers["x-ratelimit-used"] == "1"
    report = emu.faults_report()
    assert report["injected"]["rate_limited"] == 1
    assert report["detail"]["rate_limited_primary"] == 1


def test_secondary_limit_counts_points_and_sends_retry_after(emu, keys, http):
    tok = token(emu, keys, http)
    emu.set_faults({"rate_limits": {"secondary_points": 10, "secondary_window_s": 1.0}})
    path = f"{RUNNERS}/registration-token"
    assert [call(http, emu, "POST", path, tok).status_code for _ in range(2)] == [201, 201]
    refused = call(http, emu, "POST", path, tok)
    assert refused.status_code == 403
    assert refused.json()["message"].startswith("You have exceeded a secondary rate limit")
    assert refused.headers["X-GitHub-Request-Id"] in refused.json()["message"]
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= retry_after <= 2
    time.sleep(retry_after + 0.05)
    assert call(http, emu, "POST", path, tok).status_code == 201
    assert emu.faults_report()["detail"]["rate_limited_secondary"] == 1


def test_faults_configured_and_reported_over_http(emu, http):
    url = f"{emu.root_url}/_emulator/faults"
    resp = http.put(url, json={"seed": 3, "webhooks": {"drop": 0.2}}, timeout=5)
    assert resp.status_code == 200 and resp.json()["config"]["webhooks"]["drop"] == 0.2
    assert http.put(url, json={"webhooks": {"drop": 2}}, timeout=5).status_code == 422
    report = http.get(url, timeout=5).json()
    assert set(report["injected"]) == {
        "dropped", "duplicated", "duplicated_new_id", "reordered", "never_sent", "api_5xx",
        "api_5xx_after_effect", "api_timeouts", "rate_limited", "runner_version_refused",
    }
    assert report["seed"] == 3 and report["problems"] == []
    assert http.post(f"{url}/reset", timeout=5).json()["opportunities"]["webhook"] == 0
