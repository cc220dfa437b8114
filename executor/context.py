"""What every part of the daemon shares: its settings, the pools it serves, one typed client per
outside service, its metrics, the clock and the stop signal. `Executor` builds it once."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from chalicelib.demand import DemandQueue
from chalicelib.github import GitHubApp
from chalicelib.hosts import ClaimIndex, HostStore
from chalicelib.jobs import JobStore
from chalicelib.pools import Pool
from chalicelib.runners import RunnerStore
from chalicelib.warm_targets import WarmTargets
from executor.containers import RunnerContainers
from executor.metrics import ExecutorMetrics
from executor.queue import DemandConsumer
from executor.settings import ExecutorSettings


@dataclass(frozen=True)
class Context:
    settings: ExecutorSettings
    pools: Mapping[str, Pool]
    jobs: JobStore
    runners: RunnerStore
    hosts: HostStore
    claims: ClaimIndex
    consumer: DemandConsumer
    demand: DemandQueue
    github: GitHubApp
    containers: RunnerContainers
    metrics: ExecutorMetrics
    clock: Callable[[], float]
    # Set by the first SIGTERM: receive nothing more, start nothing more.
    stopping: threading.Event = field(default_factory=threading.Event)
    # Set while the host's record says `serving`: cleared when the scaler retires the host (or
    # it was declared lost), so pollers receive nothing; set again if the retirement is undone.
    receiving: threading.Event = field(default_factory=lambda: _set(threading.Event()))
    # Writes the host's heartbeat now (`Executor._beat`): a claim refused because the host has
    # no record yet (its first heartbeat failed) writes one and tries again.
    beat: Callable[[], object] = lambda: None
    # Each pool's warm target now: the pools file's, or the trainer's forecast's when larger.
    warm_targets: WarmTargets = field(default_factory=WarmTargets)

    @property
    def host_id(self) -> str:
        return self.settings.host_id


def _set(event: threading.Event) -> threading.Event:
    event.set()
    return event
