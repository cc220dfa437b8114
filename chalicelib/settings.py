"""The webhook Lambda's configuration: one pydantic-settings model, from RUNNERHUB_* variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from chalicelib.resources import DELIVERIES_TABLE, JOBS_TABLE, RUNNERS_TABLE
from chalicelib.secret_store import SecretBackendSettings

# Lambda's synchronous request payload limit: https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html
LAMBDA_MAX_REQUEST_BYTES = 6 * 1024 * 1024
# GitHub keeps deliveries for 3 days (redeliverable); keep our record a little longer.
DELIVERY_RECORD_TTL_S = 7 * 24 * 3600


# The base adds RUNNERHUB_SECRET_BACKEND and RUNNERHUB_VAULT_* (docs/secrets.md).
class WebhookSettings(SecretBackendSettings):
    model_config = SettingsConfigDict(env_prefix="RUNNERHUB_", frozen=True, extra="ignore")

    stage: str = "local"
    pools_file: Path | None = None
    jobs_table: str = JOBS_TABLE.default_name
    deliveries_table: str = DELIVERIES_TABLE.default_name
    runners_table: str = RUNNERS_TABLE.default_name
    queue_prefix: str = "runnerhub-"
    max_body_bytes: int = Field(LAMBDA_MAX_REQUEST_BYTES, ge=1024, le=LAMBDA_MAX_REQUEST_BYTES)
    # Webhook secrets: exactly one source. Text is a secret, a JSON list or {"secrets": [...]}.
    webhook_secrets: SecretStr | None = None
    webhook_secrets_file: Path | None = None
    # A name in RUNNERHUB_SECRET_BACKEND: Secrets Manager id, or Vault KV v2 path.
    webhook_secret_id: str | None = None
    secret_cache_ttl_s: float = Field(60.0, ge=0, le=3600)
    delivery_ttl_s: int = Field(DELIVERY_RECORD_TTL_S, ge=3600)
    # Longer than the Lambda timeout, so a live attempt is never taken over.
    delivery_lease_s: int = Field(30, ge=1, le=900)
    emit_metrics: bool = True

    @model_validator(mode="after")
    def _one_secret_source(self) -> WebhookSettings:
        sources = [self.webhook_secrets, self.webhook_secrets_file, self.webhook_secret_id]
        if sum(source is not None for source in sources) != 1:
            raise ValueError(
                "set exactly one of RUNNERHUB_WEBHOOK_SECRETS, RUNNERHUB_WEBHOOK_SECRETS_FILE, "
                "RUNNERHUB_WEBHOOK_SECRET_ID"
            )
        return self
