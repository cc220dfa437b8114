"""Configuration from RUNNERHUB_* variables: the bases every deployable shares, and the webhook
Lambda's model (the executor's and the reconciler's build on the same bases)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from chalicelib.errors import ConfigurationError
from chalicelib.resources import DELIVERIES_TABLE, HOSTS_TABLE, JOBS_TABLE, RUNNERS_TABLE
from chalicelib.secrets.store import SecretBackendSettings, SecretStore

# Lambda's synchronous request payload limit: https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html
LAMBDA_MAX_REQUEST_BYTES = 6 * 1024 * 1024
# GitHub keeps deliveries for 3 days (redeliverable); keep our record a little longer.
DELIVERY_RECORD_TTL_S = 7 * 24 * 3600
# The executor's SIGTERM drain: running jobs get this long to finish (executor/settings.py);
# the CDK app gives systemd a minute more before SIGKILL (infra/runnerhub_infra/executors.py).
EXECUTOR_DRAIN_TIMEOUT_S = 600.0
# The drain the instance's end asks for (target lifecycle state `Terminated`: instance refresh,
# AZ rebalancing) and how often the daemon pushes the terminating hook's timeout back meanwhile
# (executor/settings.py); the hook's heartbeat timeout is derived from them
# (infra/runnerhub_infra/executors.py).
EXECUTOR_LIFECYCLE_DRAIN_TIMEOUT_S = 6 * 3600.0
EXECUTOR_LIFECYCLE_HEARTBEAT_S = 60.0


def require_app_credentials(settings: object) -> None:
    """A GitHub App's credentials are configured: a secret id, or an App id with a key file.
    For the after-validators of every settings model that acts as the App."""
    if getattr(settings, "github_app_secret_id", None) is None and (
        getattr(settings, "github_app_id", None) is None
        or getattr(settings, "github_app_key_file", None) is None
    ):
        raise ValueError(
            "set RUNNERHUB_GITHUB_APP_SECRET_ID, or RUNNERHUB_GITHUB_APP_ID with "
            "RUNNERHUB_GITHUB_APP_KEY_FILE"
        )


class DeploymentSettings(SecretBackendSettings):
    """What every deployable reads alike: its stage, the pools file, the tables and queues
    (names set by the CDK stack), and where its secrets live (the base: docs/secrets.md)."""

    model_config = SettingsConfigDict(env_prefix="RUNNERHUB_", frozen=True, extra="ignore")

    stage: str = "local"
    pools_file: Path | None = None
    jobs_table: str = JOBS_TABLE.default_name
    deliveries_table: str = DELIVERIES_TABLE.default_name
    runners_table: str = RUNNERS_TABLE.default_name
    hosts_table: str = HOSTS_TABLE.default_name
    queue_prefix: str = "runnerhub-"


class GitHubAppSettings(DeploymentSettings):
    """The GitHub App(s) the executor and the reconciler act as."""

    github_api_url: str = "https://api.github.com"
    github_app_id: int | None = Field(None, gt=0)
    github_app_key_file: Path | None = None
    # {"app_id": N, "private_key": "<PEM>"} (or a list of them: several Apps) in the secret
    # backend (a Secrets Manager id, a Vault KV v2 path, or a file path for the local stack).
    github_app_secret_id: str | None = None

    @model_validator(mode="after")
    def _app_credentials_source(self) -> GitHubAppSettings:
        require_app_credentials(self)
        return self

    def app_credentials(self, store: SecretStore | None = None) -> list[tuple[int, str]]:
        """[(App id, private key PEM), ...]; ConfigurationError without echoing the key."""
        if self.github_app_secret_id:
            from chalicelib.secrets import parse_app_secrets, secret_store

            store = store or secret_store(self)
            return parse_app_secrets(store.read(self.github_app_secret_id))
        try:
            return [(int(self.github_app_id), self.github_app_key_file.read_text())]
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read GitHub App key file {self.github_app_key_file}"
            ) from exc


class WebhookSettings(DeploymentSettings):
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
