"""The dashboard page (chalicelib/api/dashboard.html: one static file, plain JS, no build step)
and what it needs before anyone signs in: how to sign in (`config`) and the page's headers.

The page's inline script and style are allowed by their SHA-256 in the Content-Security-Policy
(no 'unsafe-inline'), so nothing injected into the page runs; it may talk only to this API
('self') and, deployed, to the hosted UI's token endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from chalicelib.api.settings import ApiSettings

PAGE = Path(__file__).with_name("dashboard.html")
_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


class DashboardConfig(BaseModel):
    """How the page signs in: `local` (a pasted token or `#token=` in the URL) or `cognito`
    (the hosted UI, authorization code with PKCE). `problem`: cognito without its settings."""

    model_config = ConfigDict(extra="forbid")

    auth: Literal["local", "cognito"]
    domain: str | None = Field(None, description="the hosted UI's base URL")
    client_id: str | None = None
    redirect_uri: str | None = Field(None, description="the page's URL (the client's callback)")
    problem: str | None = None


def config(settings: ApiSettings) -> DashboardConfig:
    if settings.api_auth == "local":
        return DashboardConfig(auth="local")
    missing = [name for name, value in (("RUNNERHUB_API_COGNITO_DOMAIN",
                                         settings.api_cognito_domain),
                                        ("RUNNERHUB_API_COGNITO_CLIENT_ID",
                                         settings.api_cognito_client_id)) if not value]
    return DashboardConfig(
        auth="cognito", domain=settings.api_cognito_domain,
        client_id=settings.api_cognito_client_id, redirect_uri=settings.api_dashboard_url,
        problem=f"sign-in is not configured: {', '.join(missing)} unset" if missing else None)


@cache
def page() -> str:
    return PAGE.read_text(encoding="utf-8")


def _hashes(kind: str) -> str:
    return " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
        for found, body in _INLINE.findall(page()) if found == kind)


def headers(settings: ApiSettings) -> dict[str, str]:
    """The page's response headers: a strict CSP, no caching (the page changes with a
    deployment), no referrer (nothing of the URL leaves the page)."""
    connect = "'self'" + (f" {settings.api_cognito_domain}"
                          if settings.api_auth == "cognito" and settings.api_cognito_domain
                          else "")
    policy = (f"default-src 'none'; script-src {_hashes('script')}; "
              f"style-src {_hashes('style')}; connect-src {connect}; img-src data:; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": policy, "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}
