"""How an instance's end reaches the daemon: the Auto Scaling target lifecycle state and the Spot
interruption notice, both read from IMDS (executor/imds.py) by one thread every
`lifecycle_poll_s`.

- Target lifecycle state `Terminated` (instance refresh, AZ rebalancing, capacity rebalancing, a
  person, or the scaler's own retirement): a terminating lifecycle hook holds the instance in
  `Terminating:Wait`. The daemon drains as on a first SIGTERM (`Executor.drain`) but lets
  running jobs finish for up to `lifecycle_drain_timeout_s` (a SIGTERM's `drain_timeout_s`,
  10 minutes, would cut every longer job short on each instance refresh), pushes the
  hook's timeout back with RecordLifecycleActionHeartbeat every `lifecycle_heartbeat_s` while
  runners remain, and once drained completes the action (CompleteLifecycleAction, CONTINUE) for
  its instance (the host id is the instance id). With no hook configured
  (`RUNNERHUB_LIFECYCLE_HOOK` empty, the local fleet: moto has neither call) it makes no Auto
  Scaling call: whoever holds the instance watches the daemon exit.
- Spot interruption notice (`spot/instance-action`, two minutes ahead): stop receiving at once;
  running jobs get until `spot_stop_before_s` before the notice's time, then their runners are
  stopped (the runner reports its shutdown, so GitHub fails the job at once instead of after its
  lost-runner timeout) and each job is noted as lost to the interruption (`jobs.NOTE_SPOT_LOST`,
  a metric). A pool with `rerun_on_spot_interruption` has each such job re-run once through
  GitHub's API: `jobs.MARK_SPOT_RERUN` is a conditional write made once per job, so however
  often it is tried (a restarted daemon, a second notice), GitHub is asked once. GitHub re-runs
  only a job whose whole workflow run has completed (403 before): the daemon tries again until
  the notice's time and records `spot_rerun` = requested | refused | failed_<status>.

Auto Scaling and IMDS failures are logged and counted, never fatal: the daemon drains anyway,
and a hook never completed ends by its own timeout.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from aws_lambda_powertools import Logger
from prometheus_client import CollectorRegistry, Counter

from chalicelib import jobs as moves
from chalicelib.errors import DependencyUnavailable, outage_as
from chalicelib.github import GitHubError
from chalicelib.jobs import Change, JobRecord
from chalicelib.pools import Pool
from chalicelib.runners import RunnerState
from executor.imds import Imds, ImdsUnavailable, SpotNotice

if TYPE_CHECKING:
    from executor.context import Context
    from executor.registry import LocalRunner
    from executor.settings import ExecutorSettings

logger = Logger(service="runnerhub-executor")

TERMINATED = "Terminated"
LOST_TO_SPOT = "spot_interruption"
CONTINUE = "CONTINUE"
# GitHub refuses a re-run while the job's workflow run still runs (403); try again this often,
# until the notice's time but for at least RERUN_MIN_WAIT_S (the runner's report of its
# shutdown has to reach GitHub first), and at most RERUN_MAX_ATTEMPTS times.
RERUN_RETRY_S = 3.0
RERUN_MIN_WAIT_S = 15.0
RERUN_MAX_ATTEMPTS = 60
RERUN_RETRY_STATUSES = (403, 409)
# An unreachable IMDS is logged at most this often (every poll counts in the metric).
IMDS_WARN_EVERY_S = 60.0


class LifecycleActions(Protocol):
    """The terminating lifecycle hook's two calls, for this instance."""

    def heartbeat(self, instance_id: str) -> None: ...

    def complete(self, instance_id: str) -> None: ...


class AwsLifecycleActions:
    """RecordLifecycleActionHeartbeat and CompleteLifecycleAction (CONTINUE) of one hook,
    through a boto3 `autoscaling` client. The group is `group_name`, or looked up once from
    the instance id (DescribeAutoScalingInstances). Outages become DependencyUnavailable; an
    answer such as "no active lifecycle action" is botocore's ClientError."""

    def __init__(self, autoscaling: Any, hook_name: str, group_name: str = "") -> None:
        if not hook_name:
            raise ValueError("a lifecycle hook name is required")
        self._asg = autoscaling
        self.hook_name = hook_name
        self._group = group_name

    def group(self, instance_id: str) -> str:
        if not self._group:
            with outage_as("autoscaling"):
                found = self._asg.describe_auto_scaling_instances(
                    InstanceIds=[instance_id])["AutoScalingInstances"]
            if not found:
                raise LookupError(f"instance {instance_id} is in no Auto Scaling group")
            self._group = found[0]["AutoScalingGroupName"]
        return self._group

    def heartbeat(self, instance_id: str) -> None:
        group = self.group(instance_id)
        with outage_as("autoscaling"):
            self._asg.record_lifecycle_action_heartbeat(
                LifecycleHookName=self.hook_name, AutoScalingGroupName=group,
                InstanceId=instance_id)

    def complete(self, instance_id: str) -> None:
        group = self.group(instance_id)
        with outage_as("autoscaling"):
            self._asg.complete_lifecycle_action(
                LifecycleHookName=self.hook_name, AutoScalingGroupName=group,
                InstanceId=instance_id, LifecycleActionResult=CONTINUE)


class LifecycleMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.terminations = Counter(
            "runnerhub_lifecycle_terminations",
            "Target lifecycle state Terminated seen (the host drains)", registry=r)
        self.actions = Counter(
            "runnerhub_lifecycle_actions",
            "Auto Scaling lifecycle calls (heartbeat, complete) by outcome (ok, failed)",
            ["call", "outcome"], registry=r)
        self.imds_failures = Counter(
            "runnerhub_imds_poll_failures", "IMDS polls for lifecycle or Spot that failed",
            registry=r)
        self.spot_interruptions = Counter(
            "runnerhub_spot_interruptions", "Spot interruption notices seen", registry=r)
        self.jobs_lost = Counter(
            "runnerhub_spot_jobs_lost",
            "Jobs whose runner a Spot interruption stopped", ["pool"], registry=r)
        self.reruns = Counter(
            "runnerhub_spot_reruns",
            "Re-runs of jobs lost to Spot, by outcome (requested, refused, already, "
            "failed_<status>)", ["pool", "outcome"], registry=r)


@dataclass(frozen=True)
class Lost:
    """A job a Spot interruption took from this host's runner."""

    job_id: int
    runner: str
    pool: Pool
    job: JobRecord | None  # RunnerHub's record (None: a job RunnerHub has no record of)


def factory(settings: ExecutorSettings) -> Callable[..., Lifecycle] | None:
    """How `Executor` builds its Lifecycle from the settings; None with IMDS disabled."""
    if not settings.imds_endpoint:
        return None
    imds = Imds(settings.imds_endpoint, timeout_s=settings.imds_timeout_s,
                attempts=settings.imds_attempts)
    actions = None
    if settings.lifecycle_hook_name:
        from chalicelib import aws

        actions = AwsLifecycleActions(aws.client("autoscaling", aws.EXECUTOR),
                                      settings.lifecycle_hook_name, settings.asg_name)
    return partial(Lifecycle, imds=imds, actions=actions)


class Lifecycle:
    """One daemon's watch on its instance's end (see the module docstring).

    `drain(until, why)`: the daemon's `Executor.drain` (until: epoch seconds by which running
    jobs must be done). `busy()`: runners remain. `pause(s)`: waits
    between re-run attempts (the daemon's, cut short by a second SIGTERM)."""

    def __init__(self, ctx: Context, *, imds: Imds, actions: LifecycleActions | None,
                 drain: Callable[[float | None, str], None], busy: Callable[[], bool],
                 pause: Callable[[float], None] = time.sleep) -> None:
        self._ctx = ctx
        self._settings = ctx.settings
        self._imds = imds
        self._actions = actions
        self._drain = drain
        self._busy = busy
        self._pause = pause
        self.metrics = LifecycleMetrics(ctx.metrics.registry)
        self.terminating = False  # the target lifecycle state is Terminated
        self.notice: SpotNotice | None = None
        self.spot_at: float | None = None  # when the Spot notice says the instance ends
        self.completed = False
        self._last_heartbeat = -math.inf
        self._imds_warned_at = -math.inf
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def host_id(self) -> str:
        return self._ctx.host_id

    # --- the watch ---

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="lifecycle", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._done.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._settings.imds_timeout_s * 6 + 5)
        self._imds.close()

    def _watch(self) -> None:
        while not self._done.is_set():
            self.poll_safely()
            self._done.wait(self._settings.lifecycle_poll_s)

    def poll_safely(self) -> None:
        """`poll`, never raising: the watch's every look, and the daemon's one before it
        receives anything."""
        try:
            self.poll()
        except Exception:
            self._ctx.metrics.errors.labels("lifecycle").inc()
            logger.exception("lifecycle poll failed", extra={"host_id": self.host_id})

    def poll(self) -> None:
        """One look at IMDS; acts on what is new; sends the hook's heartbeat when due."""
        now = self._ctx.clock()
        try:
            state = None if self.terminating else self._imds.target_lifecycle_state()
            notice = None if self.notice else self._imds.spot_notice()
        except ImdsUnavailable as exc:
            self.metrics.imds_failures.inc()
            if now - self._imds_warned_at >= IMDS_WARN_EVERY_S:
                self._imds_warned_at = now
                logger.warning("IMDS unreadable; lifecycle and Spot notices unseen: %s", exc,
                               extra={"host_id": self.host_id})
            state, notice = None, None
        if state == TERMINATED:
            self._on_terminated(now)
        if notice is not None:
            self._on_spot(notice, now)
        if self.terminating:
            self._heartbeat_if_due(now)

    def _on_terminated(self, now: float) -> None:
        self.terminating = True
        self.metrics.terminations.inc()
        drain_s = self._settings.lifecycle_drain_timeout_s
        logger.warning("target lifecycle state is Terminated: draining (up to %.0fs), then "
                       "completing the lifecycle action", drain_s,
                       extra={"host_id": self.host_id, "hook": self._hook_name})
        self._drain(now + drain_s, "lifecycle_terminated")

    def _on_spot(self, notice: SpotNotice, now: float) -> None:
        self.notice = notice
        self.spot_at = notice.at if notice.at is not None else now
        self.metrics.spot_interruptions.inc()
        until = max(now, self.spot_at - self._settings.spot_stop_before_s)
        logger.warning("Spot interruption notice (%s in %.0fs): receiving nothing; runners "
                       "still running in %.0fs are stopped", notice.action, self.spot_at - now,
                       until - now, extra={"host_id": self.host_id, "notice": notice.raw})
        self._drain(until, "spot_interruption")

    @property
    def _hook_name(self) -> str | None:
        return getattr(self._actions, "hook_name", None)

    def _heartbeat_if_due(self, now: float) -> None:
        if (self._actions is None or self.completed or not self._busy()
                or now - self._last_heartbeat < self._settings.lifecycle_heartbeat_s):
            return
        self._last_heartbeat = now
        self._call("heartbeat", self._actions.heartbeat)

    def _call(self, name: str, call: Callable[[str], None]) -> bool:
        try:
            call(self.host_id)
        except Exception as exc:  # noqa: BLE001 - never fatal: the hook times out by itself
            self.metrics.actions.labels(name, "failed").inc()
            logger.warning("lifecycle %s failed: %s: %s", name, type(exc).__name__, exc,
                           extra={"host_id": self.host_id, "hook": self._hook_name})
            return False
        self.metrics.actions.labels(name, "ok").inc()
        logger.info("lifecycle %s sent", name, extra={"host_id": self.host_id,
                                                      "hook": self._hook_name})
        return True

    def finish(self) -> None:
        """Drained: complete the lifecycle action when the instance is held by the hook."""
        if not self.terminating or self.completed:
            return
        if self._actions is None:
            logger.info("drained; no lifecycle hook configured (RUNNERHUB_LIFECYCLE_HOOK): "
                        "the instance's end waits on this exit", extra={"host_id": self.host_id})
            return
        self.completed = self._call("complete", self._actions.complete)

    # --- Spot: the jobs it takes ---

    def record_spot_losses(self, runners: list[LocalRunner]) -> list[Lost]:
        """Before the runners are stopped: each one running a job (its record `busy`, the job
        GitHub gave it) has that job noted as lost to the interruption."""
        now = self._ctx.clock()
        lost = []
        for local in runners:
            try:
                record = self._ctx.runners.get(local.name)
                if record is None or record.state is not RunnerState.BUSY \
                        or record.took_job_id is None:
                    continue  # no job: its demand is given back when it is retired
                job_id = record.took_job_id
                moved = self._ctx.jobs.apply(job_id, moves.NOTE_SPOT_LOST, now, Change(
                    fields={"lost_to": LOST_TO_SPOT, "lost_runner": local.name,
                            "lost_host": self.host_id}))
            except Exception:
                self._ctx.metrics.errors.labels("spot_loss").inc()
                logger.exception("could not record a Spot loss", extra=local.log)
                continue
            self.metrics.jobs_lost.labels(local.pool.name).inc()
            logger.warning("job lost to a Spot interruption", extra=local.log | {
                "lost_job_id": job_id, "rerun": local.pool.rerun_on_spot_interruption})
            lost.append(Lost(job_id, local.name, local.pool, moved.job))
        return lost

    def rerun_lost(self, lost: list[Lost]) -> dict[int, str]:
        """Once the runners are stopped: re-run each lost job of an opted-in pool, once. The
        outcome per job (also written on its record as `spot_rerun`)."""
        now = self._ctx.clock()
        pending: list[Lost] = []
        outcomes: dict[int, str] = {}
        for item in lost:
            if not item.pool.rerun_on_spot_interruption:
                continue
            job = item.job
            if job is None or not job.repository or job.installation_id is None:
                outcomes[item.job_id] = self._rerun_done(item, "failed_no_record")
                continue
            try:
                marked = self._ctx.jobs.apply(item.job_id, moves.MARK_SPOT_RERUN, now)
            except DependencyUnavailable as exc:
                # Unmarked, it is not re-run: at most once, never twice.
                logger.warning("could not mark the re-run: %s", exc,
                               extra={"job_id": item.job_id, "pool": item.pool.name})
                outcomes[item.job_id] = self._rerun_done(item, "failed_store", write=False)
                continue
            if not marked.applied:
                outcomes[item.job_id] = self._rerun_done(item, "already", write=False)
                continue
            pending.append(item)
        wait_s = max(RERUN_MIN_WAIT_S, (self.spot_at or now) - now)
        attempts = min(RERUN_MAX_ATTEMPTS, int(wait_s / RERUN_RETRY_S) + 1)
        for attempt in range(attempts):
            for item in list(pending):
                outcome = self._try_rerun(item, last=attempt == attempts - 1)
                if outcome is not None:
                    pending.remove(item)
                    outcomes[item.job_id] = self._rerun_done(item, outcome)
            if not pending:
                break
            self._pause(RERUN_RETRY_S)
        for item in pending:
            outcomes[item.job_id] = self._rerun_done(item, "refused")
        return outcomes

    def _try_rerun(self, item: Lost, last: bool) -> str | None:
        """`requested`, `failed_<status>`, or None: try again (GitHub still runs the run)."""
        job = item.job
        assert job is not None and job.repository and job.installation_id is not None
        try:
            self._ctx.github.rerun_job(job.installation_id, job.repository, item.job_id)
        except GitHubError as exc:
            if exc.status in RERUN_RETRY_STATUSES or exc.status == 0 or exc.status >= 500:
                if last:
                    logger.warning("re-run refused until the end: %s", exc,
                                   extra={"job_id": item.job_id, "pool": item.pool.name})
                return None
            logger.warning("re-run failed: %s", exc,
                           extra={"job_id": item.job_id, "pool": item.pool.name})
            return f"failed_{exc.status}"
        except Exception as exc:  # noqa: BLE001 - e.g. the token could not be had: retry
            logger.warning("re-run not sent: %s: %s", type(exc).__name__, exc,
                           extra={"job_id": item.job_id, "pool": item.pool.name})
            return None
        return "requested"

    def _rerun_done(self, item: Lost, outcome: str, write: bool = True) -> str:
        self.metrics.reruns.labels(item.pool.name, outcome).inc()
        logger.info("Spot re-run: %s", outcome, extra={"job_id": item.job_id,
                                                       "pool": item.pool.name})
        if write:
            try:
                self._ctx.jobs.apply(item.job_id, moves.NOTE_SPOT_LOST, self._ctx.clock(),
                                     Change(fields={"spot_rerun": outcome}))
            except Exception as exc:  # noqa: BLE001 - the metric and the log keep it
                logger.warning("could not record the re-run outcome: %s", exc,
                               extra={"job_id": item.job_id})
        return outcome
