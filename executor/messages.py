"""Classify an SQS demand message: accept, reject as malformed, or leave for a newer executor;
and what becomes of a message once served (its `Disposition`, applied by `executor.serve`).

Pure: no I/O. An executor accepts the current schema version and the one before it; a newer
version is made visible again after a delay, so a rolling upgrade (executors first) never sends
good messages to the DLQ.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError
from pydantic_core import from_json

from chalicelib.demand import DEMAND_SCHEMA_VERSION, OLDEST_ACCEPTED_SCHEMA_VERSION, DemandMessage
from chalicelib.jobs import CLAIM_STATES, TAKEN_STATES, JobRecord
from chalicelib.payloads import describe


@dataclass(frozen=True)
class Accepted:
    message: DemandMessage


@dataclass(frozen=True)
class Malformed:
    reason: str


@dataclass(frozen=True)
class TooNew:
    version: int


Classified = Accepted | Malformed | TooNew


@dataclass(frozen=True)
class Ack:
    """Delete the message: its demand is met (`runner` now holds its slot), it was a duplicate,
    or its failed start was re-demanded already."""

    runner: str | None = None


@dataclass(frozen=True)
class Delay:
    """Make the message visible again after `seconds`; 0: at once, for another host."""

    seconds: float


@dataclass(frozen=True)
class DeadLetter:
    """To the pool's DLQ with the reason: this message can never be served."""

    reason: str


@dataclass(frozen=True)
class Recycle:
    """Send a fresh copy and delete this one: its receive count starts over."""


Disposition = Ack | Delay | DeadLetter | Recycle


def classify(body: str, pool: str) -> Classified:
    try:
        data = from_json(body)
    except ValueError:
        return Malformed("body is not JSON")
    if not isinstance(data, dict):
        return Malformed("body is not a JSON object")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        return Malformed("schema_version missing or not an integer")
    if version > DEMAND_SCHEMA_VERSION:
        return TooNew(version)
    if version < OLDEST_ACCEPTED_SCHEMA_VERSION:
        return Malformed(f"schema_version {version} is older than this executor accepts")
    try:
        message = DemandMessage.model_validate(data)
    except ValidationError as exc:
        return Malformed(describe(exc))
    if message.pool != pool:
        return Malformed(f"message for pool {message.pool} on the queue of pool {pool}")
    return Accepted(message)


def drop_reason(job: JobRecord | None, generation: int) -> str:
    """Why a claim was refused, from the job record found. Pure."""
    if job is None:
        return "unknown_job"
    if job.state in TAKEN_STATES:
        return f"job_{job.state.value}"
    if job.demand_generation != generation:
        return "stale_generation"
    if job.state in CLAIM_STATES:
        return "claimed_already"
    return f"job_{job.state.value}"
