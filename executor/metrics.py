"""Metrics of the executor: Prometheus on /metrics (prometheus_client), and the few the
dashboard and alarms read as CloudWatch EMF (`emf`: to the CloudWatch agent's endpoint on a
host, see chalicelib/telemetry.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from chalicelib.telemetry import PERCENT, SECONDS, Telemetry

# Slots are reported once a minute per host: a one-minute Sum over hosts is the pool's total.
SLOTS_REPORT_EVERY_S = 60.0


class ExecutorMetrics:
    def __init__(self, emf: Telemetry | None = None) -> None:
        self.emf = emf if emf is not None else Telemetry("executor", autoflush=True)
        self._slots_reported_at = float("-inf")
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("runnerhub_demand_received", "Demand messages received",
                                ["pool"], registry=r)
        self.rejected = Counter("runnerhub_messages_rejected",
                                "Messages rejected (malformed: to the DLQ; too_new: delayed; "
                                "no_free_slot, host_not_serving: handed back)",
                                ["pool", "reason"], registry=r)
        self.dropped = Counter("runnerhub_demand_dropped",
                               "Demand dropped without starting a runner", ["pool", "reason"],
                               registry=r)
        self.claim_retries = Counter(
            "runnerhub_claim_retries",
            "Claims tried again because the jobs store was unavailable (message held)",
            ["pool"], registry=r)
        self.started = Counter("runnerhub_runners_started", "Runner containers started",
                               ["pool"], registry=r)
        self.start_failures = Counter("runnerhub_runner_start_failures",
                                      "Failed runner starts (re-demanded)", ["pool", "stage"],
                                      registry=r)
        self.flagged = Counter("runnerhub_jobs_flagged",
                               "Jobs past the failed-start limit (alarm)", ["pool"], registry=r)
        self.reaped = Counter("runnerhub_runners_reaped", "Surplus idle runners stopped",
                              ["pool"], registry=r)
        self.retire_requests = Counter(
            "runnerhub_runner_retire_requests", "Idle runners retired at an operator's request",
            ["pool"], registry=r)
        self.drain_requests = Counter(
            "runnerhub_host_drain_requests", "Drains an operator requested for this host",
            registry=r)
        self.exited = Counter("runnerhub_runners_exited", "Runner containers that exited",
                              ["pool", "outcome"], registry=r)
        self.errors = Counter("runnerhub_executor_errors", "Unexpected errors, by where",
                              ["where"], registry=r)
        # Exposed as runnerhub_isolation_violations_total (executor/monitor.py).
        self.violations = Counter(
            "runnerhub_isolation_violations",
            "What a job's container did that it should not (privilege_gained, mounted, exec, "
            "blocked_address, outlived_job), once per container, kind and detail",
            ["pool", "kind"], registry=r)
        self.takeovers = Counter("runnerhub_claims_taken_over",
                                 "Expired claims of dead hosts taken over (via: message, scan)",
                                 ["pool", "via"], registry=r)
        self.redemanded = Counter("runnerhub_executor_redemands",
                                  "Jobs re-demanded by this executor (GitHub still had them "
                                  "queued), by why", ["pool", "why"], registry=r)
        self.redemand_failures = Counter(
            "runnerhub_redemand_failures",
            "Re-demands of runners that left before a job, tried again later, by cause "
            "(github: GitHub could not be asked; aws: the write or the send failed)",
            ["pool", "cause"], registry=r)
        self.released = Counter("runnerhub_claims_released",
                                "Unstarted claims handed back while draining", ["pool"],
                                registry=r)
        self.adoption = Counter("runnerhub_containers_found_at_start",
                                "Containers of a previous daemon on this host, by outcome "
                                "(adopted, discarded, exited)", ["outcome"], registry=r)
        self.hosts_lost = Counter("runnerhub_hosts_marked_lost",
                                  "Dead hosts whose claims and runners were all recovered",
                                  registry=r)
        self.slot_releases_unheld = Counter(
            "runnerhub_slot_releases_unheld",
            "Slot releases for a message or runner that held no slot (a bug; nothing is freed)",
            registry=r)
        self.heartbeat_failures = Counter("runnerhub_heartbeat_failures",
                                          "Heartbeat writes that failed", registry=r)
        self.seat_waits = Counter(
            "runnerhub_seat_waits", "Claims that waited for a runner seat (pool at max_runners)",
            ["pool"], registry=r)
        self.warm_started = Counter("runnerhub_warm_runners_started",
                                    "Warm runners started by the keeper", ["pool"], registry=r)
        self.warm_from_spare = Counter(
            "runnerhub_warm_runners_from_spare",
            "Runners whose job another runner took, kept as warm runners", ["pool"], registry=r)
        self.warm_retired = Counter("runnerhub_warm_runners_retired",
                                    "Warm runners retired idle past their pool's limit",
                                    ["pool"], registry=r)
        self.warm_failures = Counter(
            "runnerhub_warm_runner_failures",
            "Warm runners that failed to start or left without a job (backoff)", ["pool"],
            registry=r)
        # GitHub refused a runner for its version (executor/runner_version.py): the pool's
        # image is below GitHub's minimum; alarm RunnerVersionTooOld reads the EMF twin.
        self.version_rejected = Counter(
            "runnerhub_runner_version_rejected",
            "Runners GitHub refused as below its minimum version (their jobs re-demanded)",
            ["pool"], registry=r)
        self.warm_target = Gauge("runnerhub_warm_target", "The pool's warm runners wanted now",
                                 ["pool"], registry=r)
        self.slots_total = Gauge("runnerhub_slots_total", "Runner slots on this host",
                                 registry=r)
        self.slots_busy = Gauge("runnerhub_slots_busy", "Slots held by demand or runners",
                                registry=r)
        # executor/disk.py: 0 until the first start finds the engine enforcing --storage-opt.
        self.disk_limit_enforced = Gauge(
            "runnerhub_disk_limit_enforced",
            "1 when the Docker engine enforces a container's disk_mb (overlay2 on xfs with "
            "project quotas), else 0", registry=r)
        self.app_budget = Gauge("runnerhub_github_app_budget_remaining_ratio",
                                "Share of the tighter GitHub rate limit left, per App",
                                ["app_id"], registry=r)
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

    def runner_started(self, pool: str, claimed_s: float, pickup_s: float) -> None:
        """A runner container is up: claim -> started (Prometheus), and the pickup the
        dashboard shows per pool, demand created (the webhook) -> container started (EMF)."""
        self.started.labels(pool).inc()
        self.start_seconds.labels(pool).observe(claimed_s)
        self.emf.measure("PickupSeconds", max(pickup_s, 0.0), SECONDS, {"pool": pool})

    def runner_version_rejected(self, pool: str) -> None:
        """Per pool (the dashboard) and for the executor as a whole (the alarm's metric)."""
        self.version_rejected.labels(pool).inc()
        self.emf.measure("RunnerVersionRejected", 1, "Count", {"pool": pool})
        self.emf.measure("RunnerVersionRejected", 1, "Count", {"component": "executor"})

    def report_slots(self, pools: tuple[str, ...], total: int, busy: int, now: float) -> None:
        """Busy and free slots, once a minute (EMF, per pool; a host of several pools, as in
        the local stack, counts its slots in each)."""
        self.slots_busy.set(busy)
        if now - self._slots_reported_at < SLOTS_REPORT_EVERY_S:
            return
        self._slots_reported_at = now
        for pool in pools:
            self.emf.measure("SlotsBusy", busy, "Count", {"pool": pool})
            self.emf.measure("SlotsFree", max(total - busy, 0), "Count", {"pool": pool})


def publish_app_budget(metrics: ExecutorMetrics, headroom: dict) -> None:
    """Each App's remaining budget: a Prometheus gauge and an EMF metric per App (`app_id`),
    and the least of them (`component`=executor), which infra/ alarms on below 10 %."""
    for app_id, room in headroom.items():
        metrics.app_budget.labels(str(app_id)).set(room.share)
        metrics.emf.measure("GitHubAppBudgetRemaining", round(room.share * 100, 1), PERCENT,
                            {"app_id": str(app_id)})
    least = min((room.share for room in headroom.values()), default=1.0)
    metrics.emf.measure("GitHubAppBudgetRemaining", round(least * 100, 1), PERCENT,
                        {"component": "executor"})


# Failed-start stages the host itself is to blame for (Docker, the runner container), not
# GitHub, an image refused by its scan, a seat or a runner version GitHub refused: the
# heartbeat's `start_failures`, which a rollout reads as a new executor version failing.
HOST_FAILURE_STAGES = frozenset({"docker", "runner", "warm_docker"})


def counter_total(counter: Counter, label: str | None = None,
                  values: frozenset[str] | None = None) -> int:
    """A counter's value summed over its labels, or over those whose `label` is in `values`
    (the heartbeat's starts and start failures)."""
    return int(sum(sample.value for metric in counter.collect() for sample in metric.samples
                   if sample.name.endswith("_total")
                   and (label is None or sample.labels.get(label) in (values or ()))))
