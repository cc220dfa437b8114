"""Demand messages: one per job and demand generation, on the pool's SQS FIFO queue.

`MessageGroupId` = job id and `MessageDeduplicationId` = `job:generation`, because GitHub can
send `queued` twice for one job under different delivery ids (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from chalicelib import jobs as moves
from chalicelib.errors import outage_as
from chalicelib.jobs import Change, JobRecord, JobStore, Transition
from chalicelib.resources import SQS_MAX_BATCH, dead_letter_queue_name, demand_queue_name

# A dead-lettered message the reconciler leaves where it is stays invisible this long, so the
# next runs read the other messages of the DLQ first (and an operator sees it again after).
DEAD_LETTER_HOLD_S = 300

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


@dataclass(frozen=True)
class DeadLetter:
    """A message read from a pool's DLQ: its demand, or None when the body is not one."""

    pool: str
    receipt: str
    message: DemandMessage | None


class DeadLetters(Protocol):
    """The pools' dead-letter queues, as the reconciler reads them."""

    def dead_letters(self, pool: str, limit: int) -> list[DeadLetter]:
        """Up to `limit` messages of the pool's DLQ, each hidden for DEAD_LETTER_HOLD_S."""

    def forget(self, letter: DeadLetter) -> None:
        """Delete a dead-lettered message (its demand was re-sent, or is no longer wanted)."""


class SqsDemandQueue:
    """The pools' demand queues; queue URLs are looked up once per pool and cached."""

    def __init__(self, client: Any, queue_prefix: str) -> None:
        self._client = client
        self._prefix = queue_prefix
        self._urls: dict[str, str] = {}

    def url(self, pool: str) -> str:
        return self._cached_url(demand_queue_name(self._prefix, pool))

    def dead_letter_url(self, pool: str) -> str:
        return self._cached_url(dead_letter_queue_name(self._prefix, pool))

    def _cached_url(self, name: str) -> str:
        url = self._urls.get(name)
        if url is None:
            with outage_as("sqs"):
                url = self._client.get_queue_url(QueueName=name)["QueueUrl"]
            self._urls[name] = url
        return url

    def dead_letters(self, pool: str, limit: int) -> list[DeadLetter]:
        url = self.dead_letter_url(pool)
        found: list[DeadLetter] = []
        while len(found) < limit:
            with outage_as("sqs"):
                answer = self._client.receive_message(
                    QueueUrl=url, MaxNumberOfMessages=min(SQS_MAX_BATCH, limit - len(found)),
                    WaitTimeSeconds=0, VisibilityTimeout=DEAD_LETTER_HOLD_S,
                )
            batch = answer.get("Messages", [])
            if not batch:
                break
            for item in batch:
                try:
                    message = DemandMessage.model_validate_json(item.get("Body") or "")
                except ValueError:
                    message = None  # malformed: left for an operator
                found.append(DeadLetter(pool, item["ReceiptHandle"], message))
        return found

    def forget(self, letter: DeadLetter) -> None:
        with outage_as("sqs"):
            self._client.delete_message(
                QueueUrl=self.dead_letter_url(letter.pool), ReceiptHandle=letter.receipt
            )

    def send(self, message: DemandMessage) -> str:
        url = self.url(message.pool)
        with outage_as("sqs"):
            answer = self._client.send_message(
                QueueUrl=url,
                MessageBody=message.model_dump_json(),
                MessageGroupId=str(message.job_id),
                MessageDeduplicationId=message.deduplication_id,
            )
        return answer["MessageId"]


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
    job: JobRecord,
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
        job.job_id,
        moves.REDEMAND,
        now,
        Change(fields={"redemand_reason": reason, **(fields or {})}),
        generation=job.demand_generation,
    )
    if not moved.applied or moved.job is None:
        return moved
    return dispatch(jobs, queue, demand_of(moved.job, now, not_before), now)


def demand_of(job: JobRecord, now: float, not_before: float | None = None) -> DemandMessage:
    """The demand message of a job record's current generation (sent again, or anew after a
    re-demand)."""
    return DemandMessage(
        schema_version=DEMAND_SCHEMA_VERSION,
        job_id=job.job_id,
        generation=job.demand_generation,
        pool=job.pool,
        labels=job.labels,
        repository=job.repository,
        owner=job.owner,
        installation_id=job.installation_id,
        created_at=now,
        not_before=not_before,
    )
