"""App JWT checks, installation tokens and rate-limit counting, as GitHub does them."""

from __future__ import annotations

import time

import jwt
import pytest

from emulator.auth import (
    MSG_BAD_JWT,
    MSG_EXPIRED,
    MSG_IAT,
    MSG_REQUIRES_AUTH,
    MSG_TOO_FAR,
    Auth,
    Caller,
    RateLimits,
)
from emulator.config import AppConfig, EmulatorConfig, InstallationConfig
from emulator.errors import NotFound, Unauthorized, Unprocessable
from emulator.testing import app_jwt, generate_app_key

APP_ID = 31


@pytest.fixture(scope="module")
def keys():
    return generate_app_key()


@pytest.fixture(scope="module")
def other_keys():
    return generate_app_key()


class FakeClock:
    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def auth(keys, clock):
    app = AppConfig(
        app_id=APP_ID,
        client_id="Iv1.abc",
        public_key_pem=keys[1],
        installations=[
            InstallationConfig(id=100, account="octo-org"),
            InstallationConfig(
                id=101, account="alice", account_type="User", repositories=["dotfiles"]
            ),
        ],
    )
    return Auth(EmulatorConfig(apps=[app]), clock=clock)


def message(excinfo) -> str:
    return excinfo.value.message


def test_valid_app_jwt_names_its_app(auth, keys):
    assert auth.verify_app_jwt(app_jwt(APP_ID, keys[0])).app_id == APP_ID


def test_app_jwt_with_client_id_as_issuer(auth, keys):
    assert auth.verify_app_jwt(app_jwt("Iv1.abc", keys[0])).app_id == APP_ID


def test_expired_app_jwt_is_401_with_githubs_message(auth, keys):
    now = time.time()
    with pytest.raises(Unauthorized) as exc:
        auth.verify_app_jwt(app_jwt(APP_ID, keys[0], iat=now - 700, exp=now - 100))
    assert message(exc) == MSG_EXPIRED


def test_app_jwt_living_longer_than_10_minutes_is_401(auth, keys):
    now = time.time()
    with pytest.raises(Unauthorized) as exc:
        auth.verify_app_jwt(app_jwt(APP_ID, keys[0], iat=now, exp=now + 660))
    assert message(exc) == MSG_TOO_FAR


def test_app_jwt_of_exactly_10_minutes_is_accepted(auth, keys):
    now = time.time()
    auth.verify_app_jwt(app_jwt(APP_ID, keys[0], iat=now - 60, exp=now + 540))
    auth.verify_app_jwt(app_jwt(APP_ID, keys[0], iat=now, exp=now + 600))


def test_app_jwt_issued_in_the_future_is_401(auth, keys):
    now = time.time()
    with pytest.raises(Unauthorized) as exc:
        auth.verify_app_jwt(app_jwt(APP_ID, keys[0], iat=now + 300, exp=now + 500))
    assert message(exc) == MSG_IAT


def test_app_jwt_signed_with_another_key_is_401(auth, other_keys):
    with pytest.raises(Unauthorized) as exc:
        auth.verify_app_jwt(app_jwt(APP_ID, other_keys[0]))
    assert message(exc) == MSG_BAD_JWT


def test_app_jwt_of_unknown_app_is_401(auth, keys):
    with pytest.raises(Unauthorized) as exc:
        auth.verify_app_jwt(app_jwt(999, keys[0]))
    assert message(exc) == MSG_BAD_JWT


@pytest.mark.parametrize("alg", ["HS256", "none"])
def test_app_jwt_not_rs256_is_401(auth, alg):
    now = int(time.time())
    claims = {"iat": now - 60, "exp": now + 500, "iss": str(APP_ID)}
    token = jwt.encode(claims, "k" * 32 if alg == "HS256" else None, algorithm=alg)
    with pytest.raises(Unauthorized):
        auth.verify_app_jwt(token)


def test_garbage_credential_is_401(auth):
    with pytest.raises(Unauthorized) as exc:
        auth.verify_app_jwt("not.a.jwt")
    assert message(exc) == MSG_BAD_JWT


def test_missing_authorization_requires_authentication(auth):
    with pytest.raises(Unauthorized) as exc:
        auth.require_app(None)
    assert message(exc) == MSG_REQUIRES_AUTH
    with pytest.raises(Unauthorized):
        auth.require_installation("Basic dXNlcjpwYXNz")


def test_installation_token_is_ghs_and_expires_in_one_hour(auth, clock):
    app = auth.apps[APP_ID]
    token = auth.issue_installation_token(app, auth.installation_for_app(app, 100), None)
    assert token.token.startswith("ghs_") and len(token.token) == 40
    assert token.expires_at == pytest.approx(clock.now + 3600)
    for scheme in ("Bearer", "token"):
        caller = auth.require_installation(f"{scheme} {token.token}")
        assert caller.installation.id == 100
    clock.now += 3601
    with pytest.raises(Unauthorized) as exc:
        auth.require_installation(f"token {token.token}")
    assert message(exc) == "Bad credentials"


def test_unknown_installation_token_is_bad_credentials(auth):
    with pytest.raises(Unauthorized) as exc:
        auth.require_installation("token ghs_" + "x" * 36)
    assert message(exc) == "Bad credentials"


def test_installation_of_another_app_is_404(auth, other_keys):
    stranger = AppConfig(app_id=32, public_key_pem=other_keys[1])
    with pytest.raises(NotFound):
        auth.installation_for_app(stranger, 100)


def test_token_narrowed_to_repositories_outside_installation_is_422(auth):
    app = auth.apps[APP_ID]
    user_inst = auth.installation_for_app(app, 101)
    token = auth.issue_installation_token(app, user_inst, ["dotfiles"])
    assert token.repositories == frozenset({"alice/dotfiles"})
    with pytest.raises(Unprocessable):
        auth.issue_installation_token(app, user_inst, ["secret-repo"])


def test_installation_token_on_app_endpoint_is_401(auth):
    app = auth.apps[APP_ID]
    token = auth.issue_installation_token(app, auth.installation_for_app(app, 100), None)
    with pytest.raises(Unauthorized):
        auth.require_app(f"Bearer {token.token}")


def test_registration_token_expires_after_an_hour(auth, clock):
    token = auth.issue_registration_token("registration", ("org", "octo-org"))
    assert len(token.token) == 29
    assert auth.check_registration_token(token.token) == token
    remove = auth.issue_registration_token("remove", ("org", "octo-org"))
    assert auth.check_registration_token(remove.token) is None
    clock.now += 3601
    assert auth.check_registration_token(token.token) is None


def test_rate_limits_count_per_identity_in_hourly_windows(clock):
    limits = RateLimits(EmulatorConfig(), clock=clock)
    inst = Caller("installation", "inst:1")
    for _ in range(3):
        headers = limits.count(inst)
    assert headers["x-ratelimit-used"] == "3"
    assert headers["x-ratelimit-remaining"] == "4997"
    assert headers["x-ratelimit-limit"] == "5000"
    assert headers["x-ratelimit-resource"] == "core"
    assert int(headers["x-ratelimit-reset"]) == pytest.approx(clock.now + 3600, abs=1)
    anon = limits.count(Caller("anonymous", "ip:127.0.0.1"))
    assert (anon["x-ratelimit-limit"], anon["x-ratelimit-used"]) == ("60", "1")
    clock.now += 3600
    assert limits.count(inst)["x-ratelimit-used"] == "1"


def test_identify_tells_installation_app_and_anonymous_apart(auth, keys):
    app = auth.apps[APP_ID]
    token = auth.issue_installation_token(app, auth.installation_for_app(app, 100), None)
    assert auth.identify(f"token {token.token}", "1.2.3.4").key == "inst:100"
    assert auth.identify(f"Bearer {app_jwt(APP_ID, keys[0])}", "1.2.3.4").key == f"app:{APP_ID}"
    assert auth.identify("Bearer nonsense", "1.2.3.4").key == "ip:1.2.3.4"
