"""The dashboard page's sign-in configuration and headers (chalicelib/api/dashboard.py); the
page itself runs in a real browser in tests/e2e/test_dashboard_browser.py."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from pydantic import ValidationError

from chalicelib.api import dashboard
from chalicelib.api.settings import ApiSettings

DOMAIN = "https://runnerhub-prod-123.auth.eu-west-1.amazoncognito.com"


def cognito(**fields) -> ApiSettings:
    return ApiSettings(api_auth="cognito", **fields)


def test_local_sign_in_is_a_token_and_nothing_else(tmp_path):
    key = tmp_path / "key.pub"
    key.write_text("unused")
    found = dashboard.config(ApiSettings(api_auth="local", api_jwt_public_key_file=key))
    assert found.model_dump(exclude_none=True) == {"auth": "local"}


def test_cognito_sign_in_names_the_hosted_ui_client_and_callback():
    found = dashboard.config(cognito(
        api_cognito_domain=DOMAIN, api_cognito_client_id="3n4b5urk1ft4fl3mg5e62d9ado",
        api_dashboard_url="https://api.example.com/api/v1/dashboard"))
    assert found.model_dump() == {
        "auth": "cognito", "domain": DOMAIN, "client_id": "3n4b5urk1ft4fl3mg5e62d9ado",
        "redirect_uri": "https://api.example.com/api/v1/dashboard", "problem": None}


def test_cognito_without_its_settings_says_which_are_missing():
    found = dashboard.config(cognito(api_cognito_domain=DOMAIN))
    assert found.problem == "sign-in is not configured: RUNNERHUB_API_COGNITO_CLIENT_ID unset"


@pytest.mark.parametrize("field, value", [
    ("api_cognito_domain", "http://plain.example.com"),       # the code exchange needs TLS
    ("api_cognito_domain", "https://x.example.com/path?q=1"),  # a base URL, nothing after it
    ("api_cognito_client_id", "id with spaces"),
    ("api_dashboard_url", "javascript:alert(1)"),
])
def test_a_malformed_sign_in_setting_is_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        cognito(**{field: value})


def test_the_csp_allows_exactly_the_pages_inline_script_and_style():
    policy = dashboard.headers(cognito(api_cognito_domain=DOMAIN))["Content-Security-Policy"]
    page = dashboard.page()
    for kind in ("script", "style"):
        (body,) = re.findall(rf"<{kind}>(.*?)</{kind}>", page, re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"{kind}-src 'sha256-{digest}';" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert f"connect-src 'self' {DOMAIN};" in policy  # the token exchange, nothing else


def test_every_control_the_browser_test_uses_has_a_stable_testid():
    page = dashboard.page()
    for testid in ("me-role", "me-username", "token-input", "token-submit", "cognito-signin",
                   "audit-section", "pickup-histogram", "pools", "jobs", "hosts", "runners"):
        assert f'data-testid="{testid}"' in page, testid
    for prefix in ("job-state-", "drain-", "retire-", "retry-", "warm-set-", "stage-"):
        assert f'"{prefix}' in page or f"`{prefix}" in page, prefix
