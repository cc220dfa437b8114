"""Prometheus metrics of the executor, served on /metrics (prometheus_client)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class ExecutorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("runnerhub_demand_received", "Demand messages received",
                                ["pool"], registry=r)
        self.rejected = Counter("runnerhub_messages_rejected",
                                "Messages rejected (malformed: to the DLQ; too_new: delayed)",
                                ["pool", "reason"], registry=r)
        self.dropped = Counter("runnerhub_demand_dropped",
                               "Demand dropped without starting a runner", ["pool", "reason"],
                               registry=r)
        self.started = Counter("runnerhub_runners_started", "Runner containers started",
                               ["pool"], registry=r)
        self.start_failures = Counter("runnerhub_runner_start_failures",
                                      "Failed runner starts (re-demanded)", ["pool", "stage"],
                                      registry=r)
        self.flagged = Counter("runnerhub_jobs_flagged",
                               "Jobs past the failed-start limit (alarm)", ["pool"], registry=r)
        self.reaped = Counter("runnerhub_runners_reaped", "Surplus idle runners stopped",
                              ["pool"], registry=r)
        self.exited = Counter("runnerhub_runners_exited", "Runner containers that exited",
                              ["pool", "outcome"], registry=r)
        self.errors = Counter("runnerhub_executor_errors", "Unexpected errors, by where",
                              ["where"], registry=r)
        self.slots_total = Gauge("runnerhub_slots_total", "Runner slots on this host",
                                 registry=r)
        self.slots_busy = Gauge("runnerhub_slots_busy", "Slots held by demand or runners",
                                registry=r)
        self.start_seconds = Histogram(
            "runnerhub_runner_start_seconds", "Claim to runner container started", ["pool"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=r,
        )

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, addr="127.0.0.1", registry=self.registry)

    def value(self, name: str, **labels: str) -> float:
        found = self.registry.get_sample_value(name, labels)
        return found or 0.0
