"""What every step of a reconciler run shares: the logger, the errors a step survives, the
tally of what the run did and its summary."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from aws_lambda_powertools import Logger

from chalicelib.errors import DependencyUnavailable
from chalicelib.github import GitHubError
from chalicelib.telemetry import Telemetry

logger = Logger(service="runnerhub-reconciler")

# Outside errors a step survives (counted and logged); anything else is a bug: logged with its
# stack, counted, and the next step still runs.
EXPECTED_ERRORS = (GitHubError, DependencyUnavailable)


@dataclass(frozen=True)
class ReconcileSummary:
    """What one run did. `acted` is False when another reconciler held the lease."""

    acted: bool
    redelivered: int = 0
    re_demanded: int = 0
    moved_forward: int = 0
    orphans_deleted: int = 0
    errors: int = 0
    deliveries_read: int = 0
    pending_deliveries: int = 0
    jobs_checked: int = 0
    abandoned: int = 0
    redriven: int = 0
    dead_letters_dropped: int = 0
    discovered: int = 0
    discovery_calls: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def run_metrics(self) -> dict[str, int]:
        """What the run did, as metrics sent once per run (zeros included, so the dashboard
        and the missing-run alarm always have data): ReconcileRuns, RunRedelivered, ..."""
        found = {"ReconcileRuns": 1}
        for field, metric in Tally.METRICS.items():
            if field != "discovery_calls":
                found[f"Run{metric}"] = getattr(self, field)
        return found


class Tally:
    """Counts of one run, mirrored to metrics as they happen."""

    METRICS = {
        "redelivered": "Redelivered",
        "re_demanded": "ReDemanded",
        "moved_forward": "MovedForward",
        "orphans_deleted": "OrphansDeleted",
        "errors": "ReconcileErrors",
        "abandoned": "RedeliveryAbandoned",
        "redriven": "DeadLetterRedriven",
        "dead_letters_dropped": "DeadLetterDropped",
        "discovered": "JobDiscovered",
        "discovery_calls": "DiscoveryCalls",
    }

    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry
        self.counts: dict[str, int] = {}

    def add(self, name: str, amount: int = 1, dimension: tuple[str, str] | None = None) -> None:
        self.counts[name] = self.counts.get(name, 0) + amount
        metric = self.METRICS.get(name)
        if metric:
            for _ in range(amount):
                self._telemetry.count(metric, dimension)

    def set(self, name: str, value: int) -> None:
        self.counts[name] = value

