"""IMDSv2 client (executor/imds.py) and the host id, against the stand-in (devstack/imds.py)
over real HTTP on loopback."""

from __future__ import annotations

import json
import socket
import time

import pytest
import requests

from chalicelib.errors import ConfigurationError
from devstack.imds import DEFAULT_INSTANCE_ID, ImdsStandIn
from executor import settings as executor_settings
from executor.imds import (
    INSTANCE_ID,
    SPOT_INSTANCE_ACTION,
    TARGET_LIFECYCLE_STATE,
    TOKEN_PATH,
    TOKEN_TTL_HEADER,
    Imds,
    ImdsUnavailable,
)


@pytest.fixture
def imds():
    with ImdsStandIn() as server:
        yield server


@pytest.fixture
def env(monkeypatch):
    """A clean RUNNERHUB_* environment with the App configured; returns a setter."""
    import os

    for key in [k for k in os.environ if k.startswith("RUNNERHUB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_SECRET_ID", "runnerhub/test/github-app")

    def set_env(**values: str) -> None:
        for key, value in values.items():
            monkeypatch.setenv(f"RUNNERHUB_{key.upper()}", value)

    return set_env


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_instance_id_read_with_a_session_token(imds):
    with Imds(imds.endpoint) as client:
        assert client.instance_id() == DEFAULT_INSTANCE_ID
    assert imds.requests == [("PUT", TOKEN_PATH, 200), ("GET", INSTANCE_ID, 200)]


def test_standin_refuses_reads_without_a_token(imds):
    answer = requests.get(imds.endpoint + INSTANCE_ID, timeout=5)
    assert answer.status_code == 401
    bad = requests.get(imds.endpoint + INSTANCE_ID, headers={"X-aws-ec2-metadata-token": "x"},
                       timeout=5)
    assert bad.status_code == 401


def test_standin_refuses_a_token_request_without_ttl_or_forwarded(imds):
    assert requests.put(imds.endpoint + TOKEN_PATH, timeout=5).status_code == 400
    assert requests.put(imds.endpoint + TOKEN_PATH, headers={TOKEN_TTL_HEADER: "21601"},
                        timeout=5).status_code == 400
    forwarded = requests.put(imds.endpoint + TOKEN_PATH, timeout=5, headers={
        TOKEN_TTL_HEADER: "60", "X-Forwarded-For": "10.0.0.9"})
    assert forwarded.status_code == 403


def test_token_is_reused_until_near_its_ttl(imds):
    now = [1000.0]
    with Imds(imds.endpoint, token_ttl_s=300, clock=lambda: now[0]) as client:
        client.instance_id()
        client.instance_id()
        now[0] += 300 - 61  # still a minute of life left: reused
        client.instance_id()
        now[0] += 2  # under a minute left: renewed first
        client.instance_id()
    puts = [r for r in imds.requests if r[0] == "PUT"]
    assert len(puts) == 2 and len(imds.requests) == 6


def test_rejected_token_is_renewed_once(imds):
    with Imds(imds.endpoint) as client:
        client.instance_id()
        imds.expire_tokens()
        assert client.instance_id() == DEFAULT_INSTANCE_ID
    assert [r[2] for r in imds.requests] == [200, 200, 401, 200, 200]


def test_lifecycle_state_and_spot_notice_are_none_until_set(imds):
    with Imds(imds.endpoint) as client:
        assert client.get(TARGET_LIFECYCLE_STATE) is None
        assert client.get(SPOT_INSTANCE_ACTION) is None
        imds.set_target_lifecycle_state("Terminated")
        imds.set_spot_instance_action("terminate", "2030-01-01T00:00:00Z")
        assert client.get(TARGET_LIFECYCLE_STATE) == "Terminated"
        assert json.loads(client.get(SPOT_INSTANCE_ACTION)) == {
            "action": "terminate", "time": "2030-01-01T00:00:00Z"}
        imds.set_target_lifecycle_state(None)
        assert client.get(TARGET_LIFECYCLE_STATE) is None


def test_server_errors_are_retried_within_the_attempts(imds):
    imds.answer_next(503, 500)
    with Imds(imds.endpoint, attempts=3) as client:
        assert client.instance_id() == DEFAULT_INSTANCE_ID
    imds.answer_next(503, 503, 503)
    with Imds(imds.endpoint, attempts=3) as client, pytest.raises(ImdsUnavailable, match="503"):
        client.instance_id()


def test_an_answer_that_is_not_an_instance_id_is_refused(imds):
    imds.set(INSTANCE_ID, "<html>captive portal</html>")
    with Imds(imds.endpoint) as client, pytest.raises(ImdsUnavailable, match="not an instance"):
        client.instance_id()


# --- the host id -------------------------------------------------------------------------------

def test_explicit_host_id_wins_and_imds_is_not_asked(imds, env):
    env(host_id="host-7", imds_endpoint=imds.endpoint)
    settings, _pools = executor_settings.load()
    assert settings.host_id == "host-7"
    assert imds.requests == []


def test_host_id_is_the_instance_id_from_imds(imds, env):
    env(imds_endpoint=imds.endpoint)
    settings, _pools = executor_settings.load()
    assert settings.host_id == DEFAULT_INSTANCE_ID
    assert executor_settings.resolve_host_id(settings) == (
        DEFAULT_INSTANCE_ID, "RUNNERHUB_HOST_ID")  # resolved: now explicit


def test_host_id_is_the_hostname_when_imds_is_disabled(env):
    env(imds_endpoint="")
    settings, _pools = executor_settings.load()
    assert settings.host_id == socket.gethostname()[:64]


def test_slow_imds_is_a_configuration_error_within_the_bound(imds, env):
    imds.delay_s = 1.0
    env(imds_endpoint=imds.endpoint, imds_timeout_s="0.2", imds_attempts="2")
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match="RUNNERHUB_HOST_ID") as caught:
        executor_settings.load()
    assert time.monotonic() - started < 2.0
    assert "Timeout" in str(caught.value)


def test_unreachable_imds_is_a_configuration_error(env):
    env(imds_endpoint=f"http://127.0.0.1:{closed_port()}", imds_attempts="2")
    with pytest.raises(ConfigurationError, match="instance metadata unreachable"):
        executor_settings.load()


@pytest.mark.parametrize("endpoint", ["ftp://169.254.169.254", "http://169.254.169.254/latest",
                                      "169.254.169.254", "http://"])
def test_imds_endpoint_must_be_a_plain_http_url(env, endpoint):
    env(imds_endpoint=endpoint)
    with pytest.raises(ConfigurationError, match="imds_endpoint"):
        executor_settings.read_settings()
