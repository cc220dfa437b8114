"""The API's reads: pools (configuration and live state), jobs, runners, hosts, analytics.

Reads go through small stores over the low-level DynamoDB client (`TableReader`), paginated
with signed cursors (`pages.Cursors`). Jobs filtered by state use the jobs table's `by_state`
index (newest update first, time window on `updated_at`); without a state, a filtered Scan.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chalicelib import dynamodb
from chalicelib.api import models, stats
from chalicelib.api.errors import NotFound
from chalicelib.api.pages import BadCursor, Cursors
from chalicelib.dynamodb import from_item
from chalicelib.history import ForecastReader
from chalicelib.hosts import HostRecord, HostStore, host_alive
from chalicelib.image_refresh import PROPOSAL_PREFIX
from chalicelib.jobs import DEMAND_STATES, WAITING_FOR_RUNNER, JobState
from chalicelib.overrides import OverrideStore, effective
from chalicelib.pools import Pool, PoolConfig, warm_target
from chalicelib.resources import OVERRIDES_PREFIX
from chalicelib.runners import SEATS_PREFIX, RunnerStore
from chalicelib.scaler.autoscaling import AutoScaling
from chalicelib.scaler.store import RolloutStore
from chalicelib.warm_targets import WarmTargets

# One page read makes at most this many DynamoDB calls (a filter may leave pages empty); the
# cursor then resumes where they stopped.
MAX_CALLS_PER_PAGE = 10
# Analytics read at most this many jobs of a window (then `truncated`).
ANALYTICS_MAX_JOBS = 5000
IN_SERVICE = "InService"
NOT_RUNNERS = (SEATS_PREFIX, OVERRIDES_PREFIX, PROPOSAL_PREFIX)


@dataclass(frozen=True)
class JobFilter:
    state: JobState | None = None
    pool: str | None = None
    repository: str | None = None
    since: float | None = None
    until: float | None = None

    def scope(self) -> str:
        return (f"jobs|{self.state or ''}|{self.pool or ''}|{self.repository or ''}|"
                f"{self.since or ''}|{self.until or ''}")


class TableReader:
    """Paged Query/Scan with a filter, resuming from a signed cursor."""

    def __init__(self, client: Any, cursors: Cursors) -> None:
        self._client = client
        self._cursors = cursors

    def page(self, operation: str, request: dict[str, Any], scope: str, limit: int,
             cursor: str | None, keep: Callable[[dict], bool] = lambda _: True
             ) -> tuple[list[dict[str, Any]], str | None]:
        start = self._cursors.decode(scope, cursor) if cursor else None
        if start is not None and not _is_key(start):
            raise BadCursor("cursor is not a key of this table")
        call = getattr(self._client, operation)
        found: list[dict[str, Any]] = []
        for _ in range(MAX_CALLS_PER_PAGE):
            args = dict(request, Limit=limit - len(found))
            if start:
                args["ExclusiveStartKey"] = start
            with dynamodb.unavailable():
                answer = call(**args)
            found += [item for item in map(from_item, answer.get("Items", [])) if keep(item)]
            start = answer.get("LastEvaluatedKey")
            if not start or len(found) >= limit:
                break
        return found, (self._cursors.encode(scope, start) if start else None)


def _is_key(value: Any) -> bool:
    """A DynamoDB key as the client writes it: {name: {"S"|"N": text}}."""
    return (isinstance(value, dict) and 0 < len(value) <= 4 and all(
        isinstance(v, dict) and len(v) == 1 and next(iter(v)) in ("S", "N")
        and isinstance(next(iter(v.values())), str) for v in value.values()))


def job_summary(item: dict[str, Any]) -> models.JobSummary:
    fields = {name: item.get(name) for name in models.JobSummary.model_fields
              if item.get(name) is not None}
    fields["labels"] = list(item.get("labels") or [])
    fields["flagged"] = bool(item.get("flagged"))
    fields.setdefault("updated_at", 0.0)
    if not isinstance(fields.get("created_at"), str | None):
        fields["created_at"] = str(fields["created_at"])
    return models.JobSummary.model_validate(fields)


def runner_view(item: dict[str, Any]) -> models.RunnerView:
    fields = {name: item.get(name) for name in models.RunnerView.model_fields
              if item.get(name) is not None}
    fields["warm"] = bool(item.get("warm"))
    return models.RunnerView.model_validate(fields)


def host_view(record: HostRecord, now: float) -> models.HostView:
    extra = record.model_extra or {}
    return models.HostView(
        host_id=record.host_id, state=record.state.value, alive=host_alive(record, now),
        pools=list(record.pools), slots_total=record.slots_total, slots_busy=record.slots_busy,
        heartbeat_at=record.heartbeat_at, heartbeat_age_s=round(now - record.heartbeat_at, 3),
        version=extra.get("version"), drain_requested_at=record.drain_requested_at)


class Views:
    def __init__(self, *, pools: PoolConfig, dynamodb_client: Any, jobs_table: str,
                 runners_table: str, hosts: HostStore, runners: RunnerStore,
                 overrides: OverrideStore, autoscaling: AutoScaling | None, group_prefix: str,
                 slots_of: Callable[[str], int], cursors: Cursors,
                 clock: Callable[[], float] = time.time,
                 forecasts: ForecastReader | None = None,
                 rollouts: RolloutStore | None = None) -> None:
        self.pools = pools
        self._client = dynamodb_client
        self._jobs_table = jobs_table
        self._runners_table = runners_table
        self._hosts = hosts
        self._runners = runners
        self._overrides = overrides
        self._autoscaling = autoscaling
        self._group_prefix = group_prefix
        self._slots_of = slots_of
        self._reader = TableReader(dynamodb_client, cursors)
        self._clock = clock
        # The trainer's warm runners now, for the effective warm target (chalicelib/warm_targets).
        self._warm = WarmTargets(forecasts)
        self._rollouts = rollouts

    def slots_of(self, pool: str) -> int:
        return self._slots_of(pool)

    def pool(self, name: str) -> Pool:
        try:
            return self.pools.by_name(name)
        except KeyError:
            raise NotFound(f"no pool {name!r}") from None

    # --- pools ---

    def pool_views(self) -> models.PoolList:
        hosts = self._hosts.all()
        waiting = self._waiting_jobs()
        return models.PoolList(pools=[self._pool_view(p, hosts, waiting) for p in self.pools.pools])

    def pool_view(self, name: str) -> models.PoolView:
        pool = self.pool(name)
        return self._pool_view(pool, self._hosts.all(), self._waiting_jobs())

    def group_limits(self, pool: str) -> tuple[int | None, int | None, str | None]:
        """(MinSize, MaxSize, why unknown) of the pool's Auto Scaling group."""
        group, reason = self._group(pool)
        return (group.min_size, group.max_size, None) if group else (None, None, reason)

    def _group(self, pool: str):
        if self._autoscaling is None:
            return None, "no Auto Scaling client configured (local stack without groups)"
        name = f"{self._group_prefix}{pool}"
        group = self._autoscaling.group(name)
        if group is None:
            return None, f"no Auto Scaling group {name}"
        return group, None

    def _rollout(self, pool: str, group: Any) -> models.Rollout | None:
        if group is None:
            return None
        by_version: dict[str, int] = {}
        for instance in group.instances:
            key = instance.launch_version or "unknown"
            by_version[key] = by_version.get(key, 0) + 1
        state = self._rollouts.get(pool) if self._rollouts is not None else None
        found = {} if state is None else {
            "status": state.status, "target": state.target, "previous": state.previous,
            "started_at": state.started_at, "checkpoint_until": state.checkpoint_until or None,
            "reason": state.reason or None, "failed_hosts": list(state.failed_hosts)}
        return models.Rollout(group_version=group.launch_version,
                              hosts_by_version=dict(sorted(by_version.items())), **found)

    def _waiting_jobs(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for state in sorted(WAITING_FOR_RUNNER):
            found += dynamodb.query(
                self._client, TableName=self._jobs_table, IndexName="by_state",
                KeyConditionExpression="#state = :s",
                ExpressionAttributeNames={"#state": "state"},
                ExpressionAttributeValues={":s": {"S": state.value}})
        return found

    def _pool_view(self, pool: Pool, hosts: list[HostRecord], waiting: list[dict[str, Any]]
                   ) -> models.PoolView:
        now = self._clock()
        mine = [job for job in waiting if job.get("pool") == pool.name]
        demand = [job for job in mine if job.get("state") in {s.value for s in DEMAND_STATES}]
        stamps = [float(job["received_at"]) for job in demand
                  if isinstance(job.get("received_at"), int | float)]
        live_hosts = [h for h in hosts if pool.name in h.pools and host_alive(h, now)]
        group, reason = self._group(pool.name)
        seats = self._runners.seats(pool.name)
        overrides = self._overrides.get(pool.name)
        eff = effective(pool, overrides, now, group.min_size if group else None,
                        group.max_size if group else None,
                        forecast_warm=self._warm.forecast(pool, now))

        def limited(value: int | None) -> models.Limited:
            return models.Limited(value=value, reason=None if value is not None else reason)

        in_service = (sum(1 for i in group.instances if i.lifecycle_state == IN_SERVICE)
                      if group else None)
        return models.PoolView(
            name=pool.name, labels=list(pool.labels), owner=pool.scope.owner,
            repositories=list(pool.scope.repositories), image=pool.image,
            max_runners=pool.max_runners, warm_runners_configured=warm_target(pool, now),
            slots_per_host=self._slots_of(pool.name),
            overrides=models.Overrides(**vars(overrides)),
            effective=models.Effective(**vars(eff)),
            live=models.PoolLive(
                backlog=len(demand), waiting_for_runner=len(mine),
                oldest_demand_age_s=round(now - min(stamps), 3) if stamps else None,
                hosts_desired=limited(group.desired if group else None),
                hosts_in_service=limited(in_service),
                hosts_min=limited(group.min_size if group else None),
                hosts_max=limited(group.max_size if group else None),
                slots_busy=sum(h.slots_busy for h in live_hosts),
                slots_free=sum(max(0, h.slots_total - h.slots_busy) for h in live_hosts),
                warm_runners=seats.warm, runners=seats.runners,
            ),
            rollout=self._rollout(pool.name, group))

    # --- jobs ---

    def jobs(self, where: JobFilter, limit: int, cursor: str | None) -> models.JobPage:
        names: dict[str, str] = {}
        values: dict[str, Any] = {}
        filters = []
        if where.pool:
            names["#pool"], values[":pool"] = "pool", {"S": where.pool}
            filters.append("#pool = :pool")
        if where.repository:
            names["#repo"], values[":repo"] = "repository", {"S": where.repository}
            filters.append("#repo = :repo")
        window = []
        if where.since is not None:
            values[":since"] = {"N": repr(float(where.since))}
            window.append("#updated >= :since")
        if where.until is not None:
            values[":until"] = {"N": repr(float(where.until))}
            window.append("#updated <= :until")
        if window:
            names["#updated"] = "updated_at"
        if where.state is not None:
            names["#state"] = "state"
            values[":state"] = {"S": where.state.value}
            key = " AND ".join(["#state = :state", *(
                ["#updated BETWEEN :since AND :until"] if len(window) == 2 else window)])
            request = {"TableName": self._jobs_table, "IndexName": "by_state",
                       "KeyConditionExpression": key, "ScanIndexForward": False}
            operation = "query"
        else:
            filters += window
            request = {"TableName": self._jobs_table, "ConsistentRead": True}
            operation = "scan"
        if filters:
            request["FilterExpression"] = " AND ".join(filters)
        if names:
            request["ExpressionAttributeNames"] = names
        if values:
            request["ExpressionAttributeValues"] = values
        items, next_cursor = self._reader.page(operation, request, where.scope(), limit, cursor)
        return models.JobPage(jobs=[job_summary(i) for i in items], next_cursor=next_cursor)

    def job(self, job_id: int) -> models.JobDetail:
        item = dynamodb.get(self._client, self._jobs_table, {"job_id": {"N": str(job_id)}})
        if item is None:
            raise NotFound(f"no job {job_id}")
        name = item.get("runner_name") or item.get("started_runner")
        runner = self._runners.get(str(name)) if name else None
        runner_item = runner.model_dump(mode="json") if runner else None
        host_id = (runner.host_id if runner else None) or item.get("host_id")
        host = self._hosts.get(str(host_id)) if host_id else None
        per_stage = stats.job_stages(item, runner_item)
        return models.JobDetail(
            job=job_summary(item),
            timeline=[models.TimelineEvent(stamp=s, at=t) for s, t in stats.timeline(item)],
            stages=[models.StageTime(stage=s, seconds=v,
                                     reason=None if v is not None else stats.why_missing(s))
                    for s, v in per_stage.items()],
            runner=runner_view(runner_item) if runner_item else None,
            host=host_view(host, self._clock()) if host else None)

    # --- runners and hosts ---

    def runners(self, pool: str | None, state: str | None, limit: int, cursor: str | None
                ) -> models.RunnerPage:
        names = {"#name": "runner_name"}
        values: dict[str, Any] = {}
        filters = []
        for index, prefix in enumerate(NOT_RUNNERS):
            values[f":p{index}"] = {"S": prefix}
            filters.append(f"NOT begins_with(#name, :p{index})")
        if pool:
            names["#pool"], values[":pool"] = "pool", {"S": pool}
            filters.append("#pool = :pool")
        if state:
            names["#state"], values[":state"] = "state", {"S": state}
            filters.append("#state = :state")
        request = {"TableName": self._runners_table, "FilterExpression": " AND ".join(filters),
                   "ExpressionAttributeNames": names, "ExpressionAttributeValues": values}
        items, next_cursor = self._reader.page("scan", request, f"runners|{pool}|{state}",
                                               limit, cursor)
        return models.RunnerPage(runners=[runner_view(i) for i in items],
                                 next_cursor=next_cursor)

    def hosts(self) -> models.HostList:
        now = self._clock()
        return models.HostList(hosts=[host_view(h, now) for h in
                                      sorted(self._hosts.all(), key=lambda h: h.host_id)])

    # --- analytics ---

    def analytics(self, pool_name: str, window_s: float) -> models.Analytics:
        pool = self.pool(pool_name)
        now = self._clock()
        since = now - window_s
        jobs: list[dict[str, Any]] = []
        truncated = False
        for state in JobState:
            found = self._reader.page(
                "query", {"TableName": self._jobs_table, "IndexName": "by_state",
                          "KeyConditionExpression": "#state = :s AND #u >= :since",
                          "FilterExpression": "#pool = :pool",
                          "ExpressionAttributeNames": {"#state": "state", "#u": "updated_at",
                                                       "#pool": "pool"},
                          "ExpressionAttributeValues": {
                              ":s": {"S": state.value}, ":since": {"N": repr(since)},
                              ":pool": {"S": pool.name}},
                          "ScanIndexForward": False},
                "analytics", ANALYTICS_MAX_JOBS - len(jobs), None)
            jobs += found[0]
            truncated = truncated or found[1] is not None
            if len(jobs) >= ANALYTICS_MAX_JOBS:
                truncated = True
                break
        runners = self._all_runners()
        by_name = {str(r.get("runner_name")): r for r in runners}
        per_job = [stats.job_stages(job, by_name.get(str(job.get("runner_name")
                                                         or job.get("started_runner"))))
                   for job in jobs]
        figures = stats.stage_figures(per_job)
        pickups = [p for p in (stats.pickup_s(job) for job in jobs) if p is not None]
        hosts = [h for h in self._hosts.all() if pool.name in h.pools and host_alive(h, now)]
        total = sum(h.slots_total for h in hosts)
        job_seconds = 0.0
        for job in jobs:
            start, end = stats.epoch(job.get("in_progress_at")), stats.epoch(
                job.get("completed_at")) or now
            if start is not None:
                job_seconds += max(0.0, min(end, now) - max(start, since))
        return models.Analytics(
            pool=pool.name, window_s=window_s, jobs=len(jobs), truncated=truncated,
            stages=[models.StageStats(
                stage=f.stage, p50_s=_round(f.p50), p95_s=_round(f.p95), samples=f.samples,
                reason=(stats.why_missing(f.stage) if not f.samples
                        else stats.STAGE_NOTES.get(f.stage))) for f in figures],
            pickup=models.StageStats(
                stage="pickup", p50_s=_round(stats.percentile(pickups, 50)),
                p95_s=_round(stats.percentile(pickups, 95)), samples=len(pickups),
                reason=None if pickups else "no job in the window started"),
            bottleneck=stats.bottleneck(figures),
            utilisation=round(sum(h.slots_busy for h in hosts) / total, 4) if total else None,
            utilisation_reason=None if total else "no live host serves the pool",
            job_seconds=round(job_seconds, 3),
            idle_warm_runner_s=stats.idle_warm_seconds(runners, pool.name, since, now),
            idle_warm_reason="from runner records kept a week after they end (TTL)",
            cross_pool=[models.CrossPool(runner_pool=p, jobs=n)
                        for p, n in sorted(stats.cross_pool(jobs, by_name).items())])

    def _all_runners(self) -> list[dict[str, Any]]:
        return [item for item in dynamodb.scan(self._client, self._runners_table)
                if not str(item.get("runner_name", "")).startswith(NOT_RUNNERS)]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
