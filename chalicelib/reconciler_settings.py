"""The reconciler's configuration: one pydantic-settings model, from RUNNERHUB_* variables.

The same variables as the webhook and the executor where they mean the same thing (tables,
queue prefix, pools file, GitHub App); the reconciler's own knobs are named so that they cannot
collide with the executor's (`reconciler_lease_s`, not `lease_s`).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from chalicelib.errors import ConfigurationError
from chalicelib.reconciler_plan import GITHUB_DELIVERY_RETENTION_S, Policy
from chalicelib.resources import DELIVERIES_TABLE, JOBS_TABLE, RUNNERS_TABLE


class ReconcilerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RUNNERHUB_", frozen=True, extra="ignore")

    stage: str = "local"
    pools_file: Path | None = None
    jobs_table: str = JOBS_TABLE.default_name
    deliveries_table: str = DELIVERIES_TABLE.default_name
    runners_table: str = RUNNERS_TABLE.default_name
    queue_prefix: str = "runnerhub-"

    github_api_url: str = "https://api.github.com"
    github_app_id: int | None = Field(None, gt=0)
    github_app_key_file: Path | None = None
    # Secrets Manager secret: {"app_id": N, "private_key": "<PEM>"} (the executor's too).
    github_app_secret_id: str | None = None

    # Longer than a run may last (the Lambda timeout): a live run is never overtaken.
    reconciler_lease_s: float = Field(120.0, ge=10, le=3600)
    stuck_after_s: float = Field(300.0, ge=30)
    dispatched_stuck_after_s: float = Field(900.0, ge=30)
    redeliver_every_s: float = Field(600.0, ge=60)
    max_redeliveries: int = Field(5, ge=1, le=50)
    delivery_lookback_s: float = Field(6 * 3600.0, ge=60, le=GITHUB_DELIVERY_RETENTION_S)
    delivery_pages_per_run: int = Field(5, ge=1, le=100)
    redeliveries_per_run: int = Field(50, ge=1, le=1000)
    jobs_per_run: int = Field(50, ge=1, le=1000)
    orphan_grace_s: float = Field(300.0, ge=0)
    emit_metrics: bool = True

    @model_validator(mode="after")
    def _credentials(self) -> ReconcilerSettings:
        if self.github_app_secret_id is None and (
            self.github_app_id is None or self.github_app_key_file is None
        ):
            raise ValueError(
                "set RUNNERHUB_GITHUB_APP_SECRET_ID, or RUNNERHUB_GITHUB_APP_ID with "
                "RUNNERHUB_GITHUB_APP_KEY_FILE"
            )
        return self

    def policy(self) -> Policy:
        return Policy(
            stuck_after_s=self.stuck_after_s,
            dispatched_stuck_after_s=self.dispatched_stuck_after_s,
            redeliver_every_s=self.redeliver_every_s,
            max_redeliveries=self.max_redeliveries,
            delivery_lookback_s=self.delivery_lookback_s,
            delivery_pages_per_run=self.delivery_pages_per_run,
            redeliveries_per_run=self.redeliveries_per_run,
            jobs_per_run=self.jobs_per_run,
            orphan_grace_s=self.orphan_grace_s,
        )


def app_credentials(settings: ReconcilerSettings, secrets_client=None) -> tuple[int, str]:
    """(App id, private key PEM) from the key file or Secrets Manager; never echoes the key."""
    if settings.github_app_secret_id:
        from chalicelib.secrets import SecretsManagerClient

        text = SecretsManagerClient(secrets_client).secret_string(settings.github_app_secret_id)
        try:
            data = json.loads(text)
            return int(data["app_id"]), str(data["private_key"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(
                'GitHub App secret must be JSON {"app_id": N, "private_key": "<PEM>"}'
            ) from exc
    key_file = settings.github_app_key_file
    try:
        return int(settings.github_app_id), key_file.read_text()
    except OSError as exc:
        raise ConfigurationError(f"cannot read GitHub App key file {key_file}") from exc
