"""The management API's settings (RUNNERHUB_* variables, like chalicelib/settings.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator

from chalicelib.resources import AUDIT_TABLE, HISTORY_TABLE
from chalicelib.scaler.settings import parse_pool_slots
from chalicelib.settings import DeploymentSettings

LOCAL_ISSUER = "runnerhub-local"
LOCAL_AUDIENCE = "runnerhub-api"


class ApiSettings(DeploymentSettings):
    # `cognito`: API Gateway's Cognito authorizer verified the token; the claims are in the
    # event's requestContext. `local`: the API verifies `Authorization: Bearer <JWT>` itself,
    # RS256 against `api_jwt_public_key_file` (the local stack's key pair, chalicelib/api/tokens).
    api_auth: Literal["cognito", "local"] = "cognito"
    api_jwt_public_key_file: Path | None = None
    api_jwt_issuer: str = LOCAL_ISSUER
    api_jwt_audience: str = LOCAL_AUDIENCE
    audit_table: str = AUDIT_TABLE.default_name
    history_table: str = HISTORY_TABLE.default_name
    # Signs the opaque page cursors (tamper -> 400). Not a secret of consequence: a cursor only
    # says where a read resumes, and every caller that has one may read the rest anyway.
    api_cursor_secret: SecretStr = SecretStr("runnerhub-api-cursor")
    # The pools' Auto Scaling groups (`<prefix><pool>`), as the scaler names them; slots per host.
    scaler_group_prefix: str = "runnerhub-"
    slots: int = Field(4, ge=1, le=256)
    scaler_pool_slots: str = ""
    # The GitHub App (retry checks the job is still queued; redelivery). Optional: without it,
    # those two actions answer 503 naming what is missing.
    github_api_url: str = "https://api.github.com"
    github_app_id: int | None = Field(None, gt=0)
    github_app_key_file: Path | None = None
    github_app_secret_id: str | None = None
    # Read routes return at most this many items a page.
    api_max_page: int = Field(200, ge=1, le=1000)
    # The dashboard's sign-in when deployed (`GET /api/v1/dashboard/config`): the user pool's
    # hosted UI (https://<prefix>.auth.<region>.amazoncognito.com), the page's app client (a
    # public client: authorization code with PKCE) and the page's URL, the client's callback.
    api_cognito_user_pool_id: str | None = None
    api_cognito_domain: str | None = Field(None, pattern=r"^https://[A-Za-z0-9.-]+$")
    api_cognito_client_id: str | None = Field(None, pattern=r"^[A-Za-z0-9]+$")
    api_dashboard_url: str | None = Field(None, pattern=r"^https?://\S+$")

    @model_validator(mode="after")
    def _local_key(self) -> ApiSettings:
        if self.api_auth == "local" and self.api_jwt_public_key_file is None:
            raise ValueError("RUNNERHUB_API_AUTH=local needs RUNNERHUB_API_JWT_PUBLIC_KEY_FILE "
                             "(python -m chalicelib.api.tokens --new-key FILE makes a pair)")
        parse_pool_slots(self.scaler_pool_slots)
        return self

    def slots_of(self, pool: str) -> int:
        return parse_pool_slots(self.scaler_pool_slots).get(pool, self.slots)

    @property
    def github_configured(self) -> bool:
        return bool(self.github_app_secret_id or (self.github_app_id
                                                  and self.github_app_key_file))
