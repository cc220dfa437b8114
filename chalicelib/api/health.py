"""`/health` and `/metrics`: the API's view of its dependencies, and gauges read from the tables
(not one Lambda's counters: every container reads the same tables).

Last runs: the reconciler's lease item (`reconciler#lease` in the deliveries table) records
`saved_at` at the end of each run; the scaler's lease item of each pool (`scaler#<pool>` in
the hosts table) records `released_at`. GitHub's rate budget is kept in each process's memory
(chalicelib/github/budget.py), recorded nowhere: reported as not checked.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from chalicelib import dynamodb
from chalicelib.api import models
from chalicelib.demand import SqsDemandQueue
from chalicelib.errors import DependencyUnavailable
from chalicelib.hosts import HostStore, host_alive
from chalicelib.jobs import OPEN_STATES
from chalicelib.pools import PoolConfig
from chalicelib.reconciler.store import LEASE_KEY
from chalicelib.runners import RunnerStore
from chalicelib.scaler.store import lease_key

BUDGET_NOT_RECORDED = ("each process keeps its GitHub rate budget in memory "
                       "(chalicelib/github/budget.py); no table records it")


class Health:
    def __init__(self, *, pools: PoolConfig, dynamodb_client: Any, queue: SqsDemandQueue,
                 hosts: HostStore, runners: RunnerStore, jobs_table: str, hosts_table: str,
                 deliveries_table: str, clock: Callable[[], float] = time.time) -> None:
        self._pools = pools
        self._client = dynamodb_client
        self._queue = queue
        self._hosts = hosts
        self._runners = runners
        self._jobs_table = jobs_table
        self._hosts_table = hosts_table
        self._deliveries_table = deliveries_table
        self._clock = clock

    def shallow(self) -> models.Health:
        return models.Health(status="ok")

    def deep(self) -> models.Health:
        deps = [self._check("dynamodb", self._dynamodb), self._check("sqs", self._sqs),
                models.Dependency(name="github_budget", ok=None, detail=BUDGET_NOT_RECORDED),
                self._last_run("reconciler", self._deliveries_table, "delivery_id", LEASE_KEY,
                               "saved_at")]
        deps += [self._last_run(f"scaler:{pool}", self._hosts_table, "host_id",
                                lease_key(pool), "released_at") for pool in self._pools.names]
        bad = any(d.ok is False for d in deps if d.name in ("dynamodb", "sqs"))
        return models.Health(status="degraded" if bad else "ok", dependencies=deps)

    @staticmethod
    def _check(name: str, probe: Callable[[], str]) -> models.Dependency:
        try:
            return models.Dependency(name=name, ok=True, detail=probe())
        except DependencyUnavailable as exc:
            return models.Dependency(name=name, ok=False, detail=str(exc))

    def _dynamodb(self) -> str:
        dynamodb.get(self._client, self._jobs_table, {"job_id": {"N": "0"}})
        return f"read {self._jobs_table}"

    def _sqs(self) -> str:
        pool = self._pools.names[0]
        self._queue.url(pool)
        return f"found the queue of pool {pool}"

    def _last_run(self, name: str, table: str, key: str, value: str, stamp: str
                  ) -> models.Dependency:
        try:
            item = dynamodb.get(self._client, table, {key: {"S": value}})
        except DependencyUnavailable as exc:
            return models.Dependency(name=name, ok=None, detail=f"not read: {exc}")
        at = item.get(stamp) if item else None
        if not isinstance(at, int | float):
            return models.Dependency(name=name, ok=None, detail="no run recorded yet")
        age = self._clock() - float(at)
        return models.Dependency(name=name, ok=True, at=float(at),
                                 detail=f"last run ended {age:.0f} s ago")

    def metrics(self) -> str:
        """Prometheus text: open jobs by pool and state, hosts by state, warm runners."""
        from prometheus_client import CollectorRegistry, Gauge, generate_latest

        registry = CollectorRegistry()
        jobs = Gauge("runnerhub_jobs", "Open jobs by pool and state (from the jobs table)",
                     ["pool", "state"], registry=registry)
        for state in sorted(OPEN_STATES):
            counts: dict[str, int] = dict.fromkeys(self._pools.names, 0)
            for item in dynamodb.query(
                    self._client, TableName=self._jobs_table, IndexName="by_state",
                    KeyConditionExpression="#state = :s", ProjectionExpression="#pool",
                    ExpressionAttributeNames={"#state": "state", "#pool": "pool"},
                    ExpressionAttributeValues={":s": {"S": state.value}}):
                pool = str(item.get("pool") or "")
                if pool in counts:
                    counts[pool] += 1
            for pool, count in counts.items():
                jobs.labels(pool, state.value).set(count)
        now = self._clock()
        hosts = Gauge("runnerhub_hosts", "Hosts by state and liveness (hosts table)",
                      ["state", "alive"], registry=registry)
        slots = Gauge("runnerhub_slots", "Slots of live hosts by pool", ["pool", "kind"],
                      registry=registry)
        found: dict[tuple[str, str], int] = {}
        records = self._hosts.all()
        for record in records:
            label = (record.state.value, str(host_alive(record, now)).lower())
            found[label] = found.get(label, 0) + 1
        for (state, alive), count in found.items():
            hosts.labels(state, alive).set(count)
        warm = Gauge("runnerhub_warm_runners", "Idle warm runners by pool (seats)", ["pool"],
                     registry=registry)
        runners = Gauge("runnerhub_runners", "Runner seats in use by pool", ["pool"],
                        registry=registry)
        for pool in self._pools.names:
            live = [r for r in records if pool in r.pools and host_alive(r, now)]
            slots.labels(pool, "busy").set(sum(r.slots_busy for r in live))
            slots.labels(pool, "total").set(sum(r.slots_total for r in live))
            seats = self._runners.seats(pool)
            warm.labels(pool).set(seats.warm)
            runners.labels(pool).set(seats.runners)
        return generate_latest(registry).decode()
