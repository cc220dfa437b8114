"""The reconciler's thresholds and per-run budgets, and the limits of GitHub they respect."""

from __future__ import annotations

from dataclasses import dataclass

from chalicelib.jobs import JobState

# GitHub keeps webhook deliveries (and lets an App redeliver them) for 3 days.
# https://docs.github.com/en/webhooks/testing-and-troubleshooting-webhooks/redelivering-webhooks
GITHUB_DELIVERY_RETENTION_S = 3 * 24 * 3600
# Discovery may spend this share of an installation's hourly REST limit, spread over this many
# runs an hour.
DISCOVERY_SHARE = 0.1
DISCOVERY_SPREAD = 12


@dataclass(frozen=True)
class Policy:
    """The reconciler's thresholds and per-run budgets (from ReconcilerSettings)."""

    # A job with no progress this long in received/claimed/runner_started is checked on GitHub.
    stuck_after_s: float = 300.0
    # A dispatched job's demand may simply be waiting for capacity on its queue: wait longer,
    # since a re-demand sends the job to the back of the line.
    dispatched_stuck_after_s: float = 900.0
    redeliver_every_s: float = 600.0
    max_redeliveries: int = 5
    # How far back the first run (or a run after a long outage) looks at deliveries.
    delivery_lookback_s: float = 6 * 3600.0
    delivery_pages_per_run: int = 5
    redeliveries_per_run: int = 50
    jobs_per_run: int = 50
    # A runner of ours seen offline on GitHub this long (across runs) is deleted.
    orphan_grace_s: float = 300.0
    # Bounds of what the state item remembers (DynamoDB items are at most 400 KB).
    max_pending: int = 500
    max_offline_tracked: int = 2000
    # Dead-lettered demand messages looked at per run (over all pools).
    dead_letters_per_run: int = 50
    # Discovery of queued jobs GitHub never announced: at most this share of an installation's
    # hourly REST limit (`x-ratelimit-limit`) in any hour, and at most 1/`discovery_spread` of
    # that share in one run (so the hour's share is spread over the hour's runs).
    discovery_share: float = DISCOVERY_SHARE
    discovery_spread: int = DISCOVERY_SPREAD

    def stuck_after(self, state: JobState) -> float:
        if state is JobState.DISPATCHED:
            return self.dispatched_stuck_after_s
        return self.stuck_after_s


DEFAULT_POLICY = Policy()
