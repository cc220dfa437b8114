"""The reconciler's configuration: one pydantic-settings model, from RUNNERHUB_* variables.

The same variables as the webhook and the executor where they mean the same thing (tables,
queue prefix, pools file, GitHub App); the reconciler's own knobs are named so that they cannot
collide with the executor's (`reconciler_lease_s`, not `lease_s`).
"""

from __future__ import annotations

from pydantic import Field

from chalicelib.reconciler.policy import (
    DISCOVERY_SHARE,
    DISCOVERY_SPREAD,
    GITHUB_DELIVERY_RETENTION_S,
    Policy,
)
from chalicelib.settings import GitHubAppSettings


class ReconcilerSettings(GitHubAppSettings):
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
    dead_letters_per_run: int = Field(50, ge=0, le=1000)
    # Sweep the installations' repositories for queued jobs GitHub never announced, within this
    # share of each installation's hourly REST limit (docs/operations.md, "Reconciler").
    discovery: bool = True
    discovery_share: float = Field(DISCOVERY_SHARE, gt=0, le=DISCOVERY_SHARE)
    discovery_spread: int = Field(DISCOVERY_SPREAD, ge=1, le=60)
    emit_metrics: bool = True

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
            dead_letters_per_run=self.dead_letters_per_run,
            discovery_share=self.discovery_share,
            discovery_spread=self.discovery_spread,
        )
