"""Demand messages: one per job and demand generation, on the pool's SQS FIFO queue.

`MessageGroupId` = job id and `MessageDeduplicationId` = `job:generation`, because GitHub can
send `queued` twice for one job under different delivery ids (DESIGN.md).
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from chalicelib import jobs as moves
from chalicelib.errors import DependencyUnavailable, aws_error_code
from chalicelib.jobs import Change, JobStore, Transition
from chalicelib.resources import demand_queue_name

# An executor accepts this version and the one before it; a newer one is made visible again
# for an upgraded executor to take (rolling upgrades: executors first).
DEMAND_SCHEMA_VERSION = 1
OLDEST_ACCEPTED_SCHEMA_VERSION = max(1, DEMAND_SCHEMA_VERSION - 1)


class DemandMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: int = Field(ge=1)
    job_id: int = Field(gt=0)
    generation: int = Field(ge=1)
    pool: str = Field(min_length=1)
    labels: tuple[str, ...]
    repository: str = Field(min_length=3)
    owner: str = Field(min_length=1)
    installation_id: int | None = None
    created_at: float
    # A re-demand after failed starts is not taken before this time (backoff); FIFO queues
    # have no per-message delay.
    not_before: float | None = None

    @property
    def deduplication_id(self) -> str:
        return f"{self.job_id}:{self.generation}"


class DemandQueue(Protocol):
    def send(self, message: DemandMessage) -> str: ...


class SqsDemandQueue:
    """The pools' demand queues; queue URLs are looked up once per pool and cached."""

    def __init__(self, client: Any, queue_prefix: str) -> None:
        self._client = client
        self._prefix = queue_prefix
        self._urls: dict[str, str] = {}

    def url(self, pool: str) -> str:
        url = self._urls.get(pool)
        if url is None:
            try:
                url = self._client.get_queue_url(QueueName=demand_queue_name(self._prefix, pool))[
                    "QueueUrl"
                ]
            except Exception as exc:
                raise DependencyUnavailable("sqs", aws_error_code(exc)) from exc
            self._urls[pool] = url
        return url

    def send(self, message: DemandMessage) -> str:
        url = self.url(message.pool)
        try:
            answer = self._client.send_message(
                QueueUrl=url,
                MessageBody=message.model_dump_json(),
                MessageGroupId=str(message.job_id),
                MessageDeduplicationId=message.deduplication_id,
            )
        except Exception as exc:
            raise DependencyUnavailable("sqs", aws_error_code(exc)) from exc
        return answer["MessageId"]


class InMemoryDemandQueue:
    """FIFO de-duplication by id, as SQS does within its 5-minute window."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self.messages: list[DemandMessage] = []

    def send(self, message: DemandMessage) -> str:
        with self._lock:
            if message.deduplication_id not in self._seen:
                self._seen.add(message.deduplication_id)
                self.messages.append(message)
            return message.deduplication_id


def dispatch(jobs: JobStore, queue: DemandQueue, message: DemandMessage, now: float) -> Transition:
    """Send a generation's demand, then record it: `dispatched`, or, when an executor already
    claimed it, only the `dispatched_at` stamp."""
    queue.send(message)
    moved = jobs.apply(message.job_id, moves.DISPATCH, now, generation=message.generation)
    if not moved.applied:
        moved = jobs.apply(
            message.job_id, moves.NOTE_DISPATCHED, now, generation=message.generation
        )
    return moved


def redemand(
    jobs: JobStore,
    queue: DemandQueue,
    job: dict[str, Any],
    now: float,
    *,
    reason: str,
    not_before: float | None = None,
    fields: dict[str, Any] | None = None,
) -> Transition:
    """Move a job back to `received` with the next generation and send that demand.

    Only for a job GitHub still has queued. Conditional on the generation it was given, so two
    actors re-demanding the same job make one new generation."""
    moved = jobs.apply(
        int(job["job_id"]),
        moves.REDEMAND,
        now,
        Change(fields={"redemand_reason": reason, **(fields or {})}),
        generation=int(job["demand_generation"]),
    )
    if not moved.applied:
        return moved
    new = moved.job
    message = DemandMessage(
        schema_version=DEMAND_SCHEMA_VERSION,
        job_id=int(new["job_id"]),
        generation=int(new["demand_generation"]),
        pool=new["pool"],
        labels=tuple(new.get("labels", ())),
        repository=new["repository"],
        owner=new["owner"],
        installation_id=new.get("installation_id"),
        created_at=now,
        not_before=not_before,
    )
    return dispatch(jobs, queue, message, now)
