"""The scaler as a Lambda handler (`handle(event, context)`) and its wiring from settings.

Events:
- a schedule (EventBridge `Scheduled Event`): every pool, to catch whatever a stream missed;
- a DynamoDB stream batch of the jobs table: one run per pool whose jobs gained demand in the
  batch (a job's new image in `received` or `dispatched`), however many records name it: the
  debounce. The stream needs NEW_IMAGE (or NEW_AND_OLD_IMAGES); locally, a poller of the
  stream (`GetRecords` on moto) passes its records here alike. The batch's jobs (their last
  image each) go to the run: the `by_state` index the run reads is eventually consistent and
  may not list them yet (`seen_of`);
- `{"pools": [...]}`: those pools (an operator, a test).
A stream batch also feeds the demand history (chalicelib/history.py: arrivals from `received`
images, runner-seconds from `completed` ones), after its runs: off the webhook's path.
Anything else is refused with a ValueError saying what was expected.

A pool whose run was asked for once more after its last round (`again_pending`) runs once
more at the end of the invocation while the Lambda has time for it (`SECOND_PASS_MIN_S`);
otherwise the request stays on its lease for the next invocation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from chalicelib.errors import DependencyUnavailable
from chalicelib.history import events_of
from chalicelib.jobs import DEMAND_STATES, JobRecord, JobState
from chalicelib.scaler.service import PoolRun, Scaler, logger

_lock = threading.Lock()
_scaler: Scaler | None = None
DEMAND_STATE_VALUES = frozenset(state.value for state in DEMAND_STATES)
# The second pass (a pool asked again after its last round) starts only with this much of the
# Lambda's time left: a run is a few calls, each 24 s at worst (aws.SCALER_PROFILE).
SECOND_PASS_MIN_S = 30.0


def build(settings: Any, clock: Callable[[], float] = time.time) -> Scaler:
    """The scaler from ScalerSettings: one typed client per outside service."""
    from chalicelib import aws
    from chalicelib.errors import ConfigurationError
    from chalicelib.github import GitHubApp, GitHubApps
    from chalicelib.history import DynamoHistory, ForecastFloor, ForecastReader, cost_cap_hosts
    from chalicelib.hosts import DynamoHostStore
    from chalicelib.overrides import DynamoOverrideStore, OverridesReader
    from chalicelib.pools import load_pools
    from chalicelib.runners import DynamoRunnerStore
    from chalicelib.scaler.autoscaling import AwsAutoScaling
    from chalicelib.scaler.store import (
        DynamoHeldJobs,
        DynamoRolloutStore,
        DynamoScalerLease,
        DynamoWaitingJobs,
    )
    from chalicelib.telemetry import Telemetry
    from chalicelib.warm_targets import WarmTargets

    config = load_pools(settings.pools_file)
    names = settings.scaler_pools.split(",") if settings.scaler_pools else list(config.names)
    unknown = sorted(set(names) - set(config.names))
    if unknown:
        raise ConfigurationError(f"unknown pools {', '.join(unknown)} (file has {config.names})")
    unknown = sorted(set(settings.pool_slots()) - set(config.names))
    if unknown:
        raise ConfigurationError(f"RUNNERHUB_SCALER_POOL_SLOTS names unknown pools "
                                 f"{', '.join(unknown)} (file has {config.names})")
    dynamodb = aws.client("dynamodb", aws.SCALER)
    github = GitHubApps(GitHubApp(app_id, key, settings.github_api_url)
                        for app_id, key in settings.app_credentials())
    scaler_config = settings.config()
    history = DynamoHistory(dynamodb, settings.history_table)
    forecasts = ForecastReader(
        history, clock=clock,
        on_error=lambda pool, exc: logger.warning(
            "forecast not read (the floor and warm target stay as last read): %s", exc,
            extra={"pool": pool})) if settings.scaler_forecast else None
    overrides = OverridesReader(
        DynamoOverrideStore(dynamodb, settings.runners_table), clock=clock,
        on_error=lambda pool, exc: logger.warning(
            "overrides not read (as last read, or none): %s", exc, extra={"pool": pool}))
    floor = ForecastFloor(
        forecasts, lead_s=settings.scaler_forecast_lead_s,
        max_hosts=cost_cap_hosts(settings.scaler_forecast_hourly_cap,
                                 settings.scaler_host_hourly_cost)) if forecasts else None
    return Scaler(
        pools={name: config.by_name(name) for name in names},
        hosts=DynamoHostStore(dynamodb, settings.hosts_table),
        runners=DynamoRunnerStore(dynamodb, settings.runners_table),
        waiting=DynamoWaitingJobs(dynamodb, settings.jobs_table),
        held=DynamoHeldJobs(dynamodb, settings.jobs_table),
        groups=AwsAutoScaling(aws.client("autoscaling", aws.SCALER),
                              aws.client("ec2", aws.SCALER)),
        github=github,
        lease=DynamoScalerLease(dynamodb, settings.hosts_table),
        config=scaler_config,
        clock=clock,
        forecast=floor,
        telemetry=Telemetry("scaler", emit=settings.emit_metrics),
        history=history,
        warm_targets=WarmTargets(forecasts, overrides=overrides),
        overrides=overrides,
        rollouts=(DynamoRolloutStore(dynamodb, settings.hosts_table)
                  if settings.scaler_rollouts else None),
        rollout_policy=settings.rollout_policy(),
    )


def scaler() -> Scaler:
    """The Lambda container's scaler, built on first use (its App token is reused)."""
    global _scaler
    if _scaler is None:
        from chalicelib.scaler.settings import ScalerSettings

        with _lock:
            if _scaler is None:
                _scaler = build(ScalerSettings())
    return _scaler


def use(instance: Scaler | None) -> None:
    """Replace (or with None, forget) the scaler: tests wire their own."""
    global _scaler
    _scaler = instance


def pools_of(event: Mapping[str, Any], known: Iterable[str]) -> tuple[str, ...]:
    """The pools an event asks to scale, each once, in the pools' order. Pure."""
    known = tuple(known)
    if not isinstance(event, Mapping):
        raise ValueError(f"a scaler event is a JSON object, not {type(event).__name__}")
    if "Records" in event:
        wanted = set()
        for record in event["Records"] or ():
            if record.get("eventSource") != "aws:dynamodb":
                raise ValueError(f"not a DynamoDB stream record: {record.get('eventSource')!r}")
            image = (record.get("dynamodb") or {}).get("NewImage") or {}
            state = (image.get("state") or {}).get("S")
            pool = (image.get("pool") or {}).get("S")
            if state in DEMAND_STATE_VALUES and pool:
                wanted.add(pool)
        return tuple(pool for pool in known if pool in wanted)
    if "pools" in event:
        asked = event["pools"]
        if not isinstance(asked, list) or not all(isinstance(p, str) for p in asked):
            raise ValueError('"pools" must be a list of pool names')
        unknown = sorted(set(asked) - set(known))
        if unknown:
            raise ValueError(f"unknown pools {unknown} (pools: {list(known)})")
        return tuple(pool for pool in known if pool in asked)
    if event.get("detail-type") == "Scheduled Event" or event.get("source") == "aws.events":
        return known
    raise ValueError("unrecognised scaler event: expected a schedule (EventBridge), a DynamoDB "
                     f"stream batch (Records) or {{\"pools\": [...]}}, got keys {sorted(event)}")


def seen_of(event: Mapping[str, Any]) -> dict[str, tuple[JobRecord, ...]]:
    """A stream batch's jobs by pool (an event `pools_of` accepted): each job's last new image
    in the batch (job id, state, pool, claimant). Pure. A record whose image is not a job (no
    job id, an unknown state) is logged and left out: the run reads the index anyway."""
    last: dict[int, JobRecord] = {}
    for record in event.get("Records") or ():
        image = (record.get("dynamodb") or {}).get("NewImage") or {}
        if not image:
            continue
        raw_id = (image.get("job_id") or {}).get("N")
        state = (image.get("state") or {}).get("S")
        pool = (image.get("pool") or {}).get("S")
        host = (image.get("host_id") or {}).get("S")
        try:
            job = JobRecord(job_id=int(raw_id), state=JobState(state), pool=pool, host_id=host)
        except (TypeError, ValueError) as exc:
            logger.warning("stream image is not a job: %s", type(exc).__name__,
                           extra={"job_id": raw_id, "state": state})
            continue
        if pool:
            last[job.job_id] = job  # in a shard's order: the last image wins
    found: dict[str, list[JobRecord]] = {}
    for job in last.values():
        found.setdefault(str(job.pool), []).append(job)
    return {pool: tuple(jobs) for pool, jobs in found.items()}


def run_pools(instance: Scaler, pools: Iterable[str],
              seen: Mapping[str, tuple[JobRecord, ...]] | None = None,
              time_left_s: Callable[[], float] | None = None) -> dict[str, Any]:
    """One run per pool; a pool whose run failed (AWS unreachable) does not stop the others.
    Then once more each pool asked again after its last round, while `time_left_s()` (the
    Lambda's remaining time; None: no limit) leaves SECOND_PASS_MIN_S."""
    seen = seen or {}
    runs: list[dict[str, Any]] = []
    errors = 0

    def one(pool: str) -> PoolRun:
        nonlocal errors
        try:
            result = instance.run(pool, seen_jobs=seen.get(pool, ()))
        except DependencyUnavailable as exc:
            logger.warning("scaler run failed: %s", exc, extra={"pool": pool})
            result = PoolRun(pool, errors=[str(exc)])
            instance.emit_run(result)
        errors += len(result.errors)
        runs.append(result.as_dict())
        return result

    pending = [pool for pool in pools if one(pool).again_pending]
    for pool in pending:
        if time_left_s is not None and time_left_s() < SECOND_PASS_MIN_S:
            logger.info("no time for a second pass: left for the next run",
                        extra={"pool": pool})
            break
        one(pool)
    return {"runs": runs, "errors": errors}


def handle(event: Mapping[str, Any], context: Any = None) -> dict[str, Any]:
    """Lambda handler: the pools the event names, one run each (see the module docstring)."""
    instance = scaler()
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    result = run_pools(instance, pools_of(event, instance.pools), seen_of(event),
                       time_left_s=(lambda: remaining() / 1000) if remaining else None)
    events, unusable = events_of(event)
    if events or unusable:
        result["history"] = instance.record_history(events, unusable)
    return result
