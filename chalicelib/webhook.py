"""The webhook: verify, validate, de-duplicate, route, move the job, enqueue demand.

`WebhookService.handle` takes a transport-neutral request and returns a status and body; the
Chalice route in app.py only adapts to it. Every outside call goes through the stores it is
given, so the same code runs on DynamoDB/SQS, moto or in-memory fakes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs

from aws_lambda_powertools import Logger
from pydantic import ValidationError
from pydantic_core import from_json

from chalicelib import jobs as moves
from chalicelib.deliveries import DeliveryLog
from chalicelib.demand import (
    DEMAND_SCHEMA_VERSION,
    DemandMessage,
    DemandQueue,
    dispatch,
    redemand,
)
from chalicelib.errors import (
    DependencyUnavailable,
    InvalidPayload,
    MissingHeader,
    PayloadTooLarge,
    WebhookRejected,
)
from chalicelib.jobs import Change, JobState, JobStore, Transition
from chalicelib.payloads import PingEvent, WorkflowJobEvent, describe
from chalicelib.pools import PoolConfig, route, warm_target
from chalicelib.runners import RunnerState, RunnerStore, took_job
from chalicelib.signature import SIGNATURE_HEADER, verify
from chalicelib.telemetry import Telemetry

logger = Logger(service="runnerhub-webhook")

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class WebhookRequest:
    """Headers with lower-case names, and the raw body exactly as received."""

    headers: Mapping[str, str]
    body: bytes
    content_type: str = "application/json"


@dataclass(frozen=True)
class WebhookResponse:
    status: int
    body: dict[str, Any] = field(default_factory=dict)


class SecretSource(Protocol):
    """Anything with `current() -> tuple[bytes, ...]` (see chalicelib.secrets.CachedSecrets)."""

    def current(self) -> tuple[bytes, ...]: ...


class JobIntake:
    """What a `workflow_job` event does to RunnerHub's record of the job, and the demand it
    sends: the webhook's code path, also taken by the reconciler for a queued job that GitHub
    never announced (a delivery it never sent), so such a job is stored and demanded exactly as
    a `queued` webhook would have."""

    def __init__(
        self,
        *,
        jobs: JobStore,
        demand: DemandQueue,
        runners: RunnerStore,
        telemetry: Telemetry,
        clock: Callable[[], float] = time.time,
        pools: PoolConfig | None = None,
    ) -> None:
        """`pools`: for warm targets (a warm runner's replacement); None: none is made."""
        self._jobs = jobs
        self._demand = demand
        self._runners = runners
        self._telemetry = telemetry
        self._clock = clock
        self._pools = pools

    def move(self, payload: WorkflowJobEvent, pool: str, now: float) -> tuple[str, str | None]:
        """Carry out the job move the event asks for; returns (outcome, state after)."""
        job = payload.workflow_job
        facts = _facts(payload, pool)
        if payload.waits_for_approval:
            moved = self._jobs.apply(job.id, moves.WAIT, now, Change(facts=facts))
            return ("waiting" if moved.applied else "no_change"), _state(moved)
        if payload.action == "queued":
            return self._queued(payload, pool, facts, now)
        if payload.action == "in_progress":
            moved = self._jobs.apply(
                job.id,
                moves.START_JOB,
                now,
                Change(
                    facts=facts,
                    fields={
                        "runner_name": job.runner_name,
                        "runner_id": job.runner_id,
                        "started_at": job.started_at,
                    },
                ),
            )
            # Also on a redelivery whose first attempt failed after the job moved: what follows
            # the move is idempotent, so finishing it again is safe.
            if job.runner_name and (moved.applied or (
                moved.state is JobState.IN_PROGRESS
                and moved.job.runner_name == job.runner_name
            )):
                self._runner_took(job.runner_name, moved, now)
            return ("in_progress" if moved.applied else "no_change"), _state(moved)
        if payload.action == "completed":
            moved = self._jobs.apply(
                job.id,
                moves.COMPLETE,
                now,
                Change(
                    facts=facts,
                    fields={
                        "conclusion": job.conclusion or "unknown",
                        "github_completed_at": job.completed_at,
                        "runner_name": job.runner_name,
                        "runner_id": job.runner_id,
                    },
                ),
            )
            return ("completed" if moved.applied else "no_change"), _state(moved)
        return "action_ignored", None

    def _runner_took(self, runner_name: str, took: Transition, now: float) -> None:
        """Record that one of our runners took a job, and keep every demand met.

        GitHub, not RunnerHub, picks the job: runner R started for job A may take job B. Then
        A's demand is unmet. If B had a runner of its own still waiting (now spare), that runner
        is handed A's demand; otherwise A is re-demanded."""
        assert took.job is not None
        job_id = took.job.job_id
        # Only our runners have a record; for others the conditional write is a no-op.
        runner, first = took_job(self._runners, runner_name, job_id, now, release_warm=False)
        if runner is None:
            return
        if first and runner.pool and took.job.pool and runner.pool != took.job.pool:
            # GitHub gave another pool's job to this runner (its labels cover the job's):
            # counted per pool pair (`python -m chalicelib.pools check` tells operators why),
            # before anything that could fail: a redelivery does not count it again.
            self._telemetry.count("JobsTakenByOtherPool",
                                  ("pools", f"{runner.pool}>{took.job.pool}"))
        if runner.warm:
            self._runners.take_warm(runner_name, now)  # once: a retry finds it released
        spare = took.job.started_runner
        if runner.warm and spare and spare != runner_name:
            self._warm_replacement(spare, str(took.job.pool), now)
        if runner.job_id is None or runner.job_id == job_id:
            return
        wanted = self._jobs.get(runner.job_id)
        if not (
            wanted
            and wanted.state is JobState.RUNNER_STARTED
            and wanted.started_runner == runner_name
        ):
            return
        generation = wanted.demand_generation
        spare = took.job.started_runner
        if (
            spare
            and spare != runner_name
            and self._runners.reassign(spare, job_id, wanted.job_id, generation, now)
        ):
            # The spare runner's host now holds the claim and renews its lease.
            handed = self._jobs.apply(wanted.job_id, moves.HAND_OVER, now,
                                      Change(fields={"started_runner": spare,
                                                     "host_id": took.job.host_id}),
                                      generation=generation)
            if handed.applied:
                self._telemetry.count("DemandHandedOver", ("pool", wanted.pool))
                logger.info("runner %s took job %s: its spare runner %s now serves job %s",
                            runner_name, job_id, spare, wanted.job_id)
                return
        moved = redemand(self._jobs, self._demand, wanted, now, reason="runner_took_another_job")
        if moved.applied:
            self._telemetry.count("DemandSwapped", ("pool", wanted.pool))
            logger.info("runner %s took job %s instead: job %s re-demanded",
                        runner_name, job_id, wanted.job_id)

    def _warm_replacement(self, spare: str, pool_name: str, now: float) -> None:
        """A warm runner took the job while the job's own runner was up and waiting: that
        runner becomes a warm runner of its pool (the replacement; its executor sees the flag
        on its record). Refused when the pool wants none or has no warm seat free: it stays
        surplus, reaped at its idle timeout."""
        if self._pools is None or pool_name not in self._pools.names:
            return
        target = warm_target(self._pools.by_name(pool_name), now)
        if target > 0 and self._runners.make_warm(spare, pool_name, target, now):
            logger.info("runner %s is now a warm runner of %s", spare, pool_name)

    def _queued(
        self, payload: WorkflowJobEvent, pool: str, facts: dict[str, Any], now: float
    ) -> tuple[str, str | None]:
        job_id = payload.workflow_job.id
        moved = self._jobs.apply(job_id, moves.RECEIVE, now, Change(facts=facts))
        if not moved.applied and self._runner_gone(moved):
            # GitHub still has the job queued but the runner started for it is gone (DESIGN:
            # a new `queued` for a job whose runner is gone and which is not in progress).
            moved = redemand(self._jobs, self._demand, moved.job, now, reason="runner_gone")
            return ("redemanded" if moved.applied else "no_change"), _state(moved)
        if not moved.applied and not _needs_resend(moved):
            return "no_change", _state(moved)
        message = DemandMessage(
            schema_version=DEMAND_SCHEMA_VERSION,
            job_id=job_id,
            generation=moved.generation,
            pool=pool,
            labels=tuple(label.lower() for label in payload.workflow_job.labels),
            repository=payload.repository.full_name,
            owner=payload.repository.owner.login,
            installation_id=payload.installation.id if payload.installation else None,
            created_at=now,
        )
        moved = dispatch(self._jobs, self._demand, message, self._clock())
        return "dispatched", _state(moved)

    def _runner_gone(self, found: Transition) -> bool:
        if found.state is not JobState.RUNNER_STARTED or not found.job.started_runner:
            return False
        runner = self._runners.get(found.job.started_runner)
        return runner is not None and runner.state is RunnerState.GONE


class WebhookService(JobIntake):
    """The webhook: a JobIntake behind signature checks, validation and the delivery log."""

    def __init__(
        self,
        *,
        pools: PoolConfig,
        secrets: SecretSource,
        jobs: JobStore,
        deliveries: DeliveryLog,
        demand: DemandQueue,
        runners: RunnerStore,
        telemetry: Telemetry,
        max_body_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(jobs=jobs, demand=demand, runners=runners, telemetry=telemetry,
                         clock=clock, pools=pools)
        self._secrets = secrets
        self._deliveries = deliveries
        self._max_body_bytes = max_body_bytes

    def handle(self, request: WebhookRequest) -> WebhookResponse:
        response = self._answer(request)
        # Requests by answer (2xx, 4xx, 5xx): the dashboard's webhook graph and its 5xx alarm.
        self._telemetry.count("WebhookAnswered", ("status", f"{response.status // 100}xx"))
        return response

    def _answer(self, request: WebhookRequest) -> WebhookResponse:
        delivery_id = request.headers.get("x-github-delivery")
        logger.append_keys(delivery_id=delivery_id, job_id=None, pool=None)
        self._telemetry.count("WebhookReceived")
        try:
            return self._handle(request, delivery_id)
        except WebhookRejected as exc:
            self._telemetry.count("WebhookRejected", ("reason", exc.reason))
            logger.info("webhook rejected: %s", exc.message, extra={"status": exc.status_code})
            return WebhookResponse(exc.status_code, {"error": exc.reason, "message": exc.message})
        except DependencyUnavailable as exc:
            self._telemetry.count("WebhookFailed", ("service", exc.service))
            logger.warning("webhook failed, delivery left retryable: %s", exc)
            return WebhookResponse(
                503, {"error": "dependency_unavailable", "message": f"{exc.service} unavailable"}
            )
        except Exception as exc:
            # Not an outage (those are DependencyUnavailable): a bug in RunnerHub's own code. A
            # logged 500 with no stack in the answer; GitHub records the delivery as failed, so
            # the reconciler redelivers it (once the bug is fixed, it is processed).
            self._telemetry.count("WebhookInternalError", ("exception", type(exc).__name__))
            logger.exception("webhook failed on an internal error")
            return WebhookResponse(500, {"error": "internal_error"})

    def _handle(self, request: WebhookRequest, delivery_id: str | None) -> WebhookResponse:
        if len(request.body) > self._max_body_bytes:
            raise PayloadTooLarge(
                f"body of {len(request.body)} bytes exceeds the limit of {self._max_body_bytes}"
            )
        verify(request.headers.get(SIGNATURE_HEADER), request.body, self._secrets.current())
        event = request.headers.get("x-github-event")
        if not event:
            raise MissingHeader("missing X-GitHub-Event header")
        if not delivery_id:
            raise MissingHeader("missing X-GitHub-Delivery header")
        document = _json_document(request)
        if event == "ping":
            _parse(PingEvent, document)
            return WebhookResponse(200, {"message": "pong"})
        if event != "workflow_job":
            _check_json(document)
            self._telemetry.count("WebhookIgnored", ("event", event))
            return WebhookResponse(202, {"message": f"event {event} ignored"})
        payload = _parse(WorkflowJobEvent, document)
        return self._workflow_job(payload, delivery_id)

    def _workflow_job(self, payload: WorkflowJobEvent, delivery_id: str) -> WebhookResponse:
        job = payload.workflow_job
        repo = payload.repository
        logger.append_keys(job_id=job.id)
        decision = route(self._pools, job.labels, repo.owner.login, repo.name, repo.private)
        if not decision.routed:
            self._telemetry.count("JobNotRouted", ("reason", decision.reason.value))
            logger.info("job not routed: %s", decision.reason.value)
            return WebhookResponse(202, {"message": "job not routed", "reason": decision.reason})
        pool = decision.pool.name
        logger.append_keys(pool=pool)
        now = self._clock()
        if not self._deliveries.begin(delivery_id, "workflow_job", now):
            self._telemetry.count("DeliveryDuplicate")
            logger.info("duplicate delivery ignored")
            return WebhookResponse(200, {"message": "duplicate delivery", "job_id": job.id})
        try:
            outcome, state = self.move(payload, pool, now)
        except Exception as exc:
            # Retryable: a redelivery may take the delivery again. `handle` logs and answers.
            self._deliveries.fail(delivery_id, self._clock(), type(exc).__name__)
            raise
        self._deliveries.finish(delivery_id, self._clock(), outcome, job.id)
        self._telemetry.count("JobRouted", ("pool", pool))
        logger.info("workflow_job %s: %s", payload.action, outcome, extra={"state": state})
        return WebhookResponse(
            200, {"job_id": job.id, "pool": pool, "outcome": outcome, "state": state}
        )


def _needs_resend(found: Transition) -> bool:
    """A `queued` for a job already received whose demand was never confirmed sent (the earlier
    attempt failed between the write and SQS): send it again, same generation, so SQS
    de-duplicates it if it did go out."""
    job = found.job
    return job is not None and job.state is JobState.RECEIVED and job.dispatched_at is None


def _state(moved: Transition) -> str | None:
    return moved.state.value if moved.state else None


def _facts(payload: WorkflowJobEvent, pool: str) -> dict[str, Any]:
    job = payload.workflow_job
    return {
        "pool": pool,
        "repository": payload.repository.full_name,
        "owner": payload.repository.owner.login,
        "labels": [label.lower() for label in job.labels],
        "run_id": job.run_id,
        "run_attempt": job.run_attempt,
        "job_name": job.name,
        "workflow_name": job.workflow_name,
        "html_url": job.html_url,
        "created_at": job.created_at,
        "installation_id": payload.installation.id if payload.installation else None,
    }


def _json_document(request: WebhookRequest) -> bytes | str:
    """The JSON text: the body, or the `payload` field of a form-encoded body."""
    if request.content_type.split(";", 1)[0].strip().lower() != FORM_CONTENT_TYPE:
        return request.body
    try:
        fields = parse_qs(request.body.decode("utf-8"), strict_parsing=True)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidPayload("form-encoded body could not be parsed") from exc
    values = fields.get("payload")
    if not values or len(values) != 1:
        raise InvalidPayload("form-encoded body must carry exactly one payload field")
    return values[0]


def _check_json(document: bytes | str) -> None:
    try:
        from_json(document)
    except ValueError as exc:
        raise InvalidPayload(f"body is not valid JSON: {_json_reason(exc)}") from exc


def _parse(model: type, document: bytes | str) -> Any:
    try:
        return model.model_validate_json(document)
    except ValidationError as exc:
        if any(item["type"] == "json_invalid" for item in exc.errors(include_url=False)):
            raise InvalidPayload(f"body is not valid JSON: {_json_reason(exc)}") from exc
        raise InvalidPayload(f"not a valid {model.__name__} payload: {describe(exc)}") from exc


def _json_reason(exc: Exception) -> str:
    # pydantic-core's JSON parser bounds nesting depth; say so plainly.
    text = str(exc)
    if "recursion" in text.lower():
        return "nested too deeply"
    if isinstance(exc, ValidationError):
        return exc.errors(include_url=False, include_input=False)[0]["msg"]
    return text.splitlines()[0][:200]
