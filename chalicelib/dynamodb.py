"""DynamoDB plumbing every store shares: the attribute codec, the typed record a decoded item
becomes, the conditional write, paged reads, and AWS failures turned into DependencyUnavailable.

Stores use the low-level client (no resource layer). An outage (`errors.outage_errors`) becomes
`DependencyUnavailable("dynamodb", code)`; anything else (a bug) propagates as it is.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict

from chalicelib.errors import DependencyUnavailable, outage_as

SERVICE = "dynamodb"
# A transaction cancelled because another request touched one of its items at the same moment
# (real DynamoDB only: moto serialises). Tried again this many times in all, a few ms apart.
# https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/transaction-apis.html
TRANSACTION_CONFLICT = "TransactionConflict"
CONDITION_FAILED = "ConditionalCheckFailed"
TRANSACTION_ATTEMPTS = 5
TRANSACTION_RETRY_S = 0.02


def unavailable():
    """Within the block, a DynamoDB outage becomes DependencyUnavailable."""
    return outage_as(SERVICE)


# --- attribute codec ----------------------------------------------------------------------------


def _number(value: float) -> Decimal:
    # DynamoDB numbers are decimals; millisecond resolution is plenty for stage latencies.
    return Decimal(str(round(value, 3)))


def to_attribute(value: Any) -> dict[str, Any]:
    """Python value -> DynamoDB AttributeValue (the few types RunnerHub's records hold)."""
    if isinstance(value, bool):
        return {"BOOL": value}
    if isinstance(value, int):
        return {"N": str(value)}
    if isinstance(value, float):
        return {"N": str(_number(value))}
    if isinstance(value, Decimal):
        return {"N": str(value)}
    if isinstance(value, str):
        return {"S": value}
    if isinstance(value, list | tuple):
        return {"L": [to_attribute(item) for item in value]}
    if isinstance(value, dict):
        return {"M": {key: to_attribute(item) for key, item in value.items()}}
    raise TypeError(f"unsupported attribute type {type(value).__name__}")


def from_attribute(value: dict[str, Any]) -> Any:
    (kind, raw), = value.items()
    if kind == "S":
        return raw
    if kind == "N":
        number = Decimal(raw)
        return int(number) if number == number.to_integral_value() else float(number)
    if kind == "BOOL":
        return raw
    if kind == "L":
        return [from_attribute(item) for item in raw]
    if kind == "M":
        return {key: from_attribute(item) for key, item in raw.items()}
    if kind == "NULL":
        return None
    raise TypeError(f"unsupported DynamoDB type {kind}")


def from_item(item: Mapping[str, Any]) -> dict[str, Any]:
    return {key: from_attribute(value) for key, value in item.items()}


def to_item(record: Mapping[str, Any]) -> dict[str, Any]:
    return {key: to_attribute(value) for key, value in record.items()}


class Record(BaseModel):
    """A decoded item, typed: the base of `JobRecord`, `RunnerRecord` and `HostRecord`.

    A store builds the record where it reads the item (`model_validate` of `from_item`'s dict;
    the in-memory stores from their dicts alike), and the code reads attributes from there on:
    `job.state` is a `JobState`, never a string from a dict. The fields the code reads are
    declared; the rest of the item (stamps, GitHub's facts) is kept as extra fields."""

    model_config = ConfigDict(frozen=True, extra="allow")

    def as_dict(self) -> dict[str, Any]:
        """The item as stored, in plain values (for JSON output, tables and logs)."""
        return self.model_dump(mode="json", exclude_unset=True)


# --- writes -------------------------------------------------------------------------------------


def attempt(call: Any, **request: Any) -> tuple[bool, dict[str, Any]]:
    """One conditional write (`client.put_item`, `client.update_item`, ...): (True, its answer),
    or (False, the refusal's answer: `Item` holds the record as found when the request asked for
    `ReturnValuesOnConditionCheckFailure`). An outage is DependencyUnavailable; anything else
    (a bug) propagates."""
    with unavailable():
        try:
            return True, call(**request)
        except call.__self__.exceptions.ConditionalCheckFailedException as exc:
            return False, getattr(exc, "response", None) or {}


def conditional(call: Any, **request: Any) -> dict | None:
    """One conditional write: its answer, or None when its condition failed (see `attempt`)."""
    applied, answer = attempt(call, **request)
    return answer if applied else None


def transact(client: Any, items: Sequence[dict[str, Any]], *,
             sleep: Callable[[float], None] = time.sleep,
             attempts: int = TRANSACTION_ATTEMPTS) -> list[dict[str, Any]] | None:
    """One TransactWriteItems: None when it committed, else its cancellation reasons, one per
    item in order (`Code`: `ConditionalCheckFailed` or `None`; `Item`: the item as found, when
    the item asked for `ReturnValuesOnConditionCheckFailure`).

    A cancellation only by `TransactionConflict` (another write touched one of the items at that
    moment, e.g. a host's heartbeat beside its claim) is not an outage: it is tried again, with a
    fresh idempotency token, up to `attempts` times in all, then it is
    DependencyUnavailable("dynamodb", "TransactionConflict"). An outage is DependencyUnavailable.
    """
    for attempt in range(attempts):
        with unavailable():
            try:
                # The token makes botocore's own retries of this attempt idempotent.
                client.transact_write_items(TransactItems=list(items),
                                            ClientRequestToken=uuid.uuid4().hex)
                return None
            except client.exceptions.TransactionCanceledException as exc:
                reasons = list((getattr(exc, "response", None) or {})
                               .get("CancellationReasons") or [])
        codes = {reason.get("Code") for reason in reasons}
        if TRANSACTION_CONFLICT not in codes or CONDITION_FAILED in codes:
            return reasons or [{"Code": "Unknown"}]
        if attempt + 1 < attempts:
            sleep(TRANSACTION_RETRY_S * (attempt + 1) * (0.5 + random.random()))
    raise DependencyUnavailable(SERVICE, TRANSACTION_CONFLICT)


def write(call: Any, **request: Any) -> dict[str, Any]:
    """One unconditional write (or a write whose refusal is a bug)."""
    with unavailable():
        return call(**request)


# --- reads --------------------------------------------------------------------------------------


def get(client: Any, table: str, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The record under `key` (strongly consistent), or None."""
    with unavailable():
        item = client.get_item(TableName=table, Key=dict(key), ConsistentRead=True).get("Item")
    return from_item(item) if item else None


def query(client: Any, **request: Any) -> list[dict[str, Any]]:
    """Every record a Query finds, page after page."""
    with unavailable():
        pages = client.get_paginator("query").paginate(**request)
        return [from_item(item) for page in pages for item in page["Items"]]


def scan(client: Any, table: str) -> list[dict[str, Any]]:
    """Every record of a (small) table, strongly consistent."""
    with unavailable():
        pages = client.get_paginator("scan").paginate(TableName=table, ConsistentRead=True)
        return [from_item(item) for page in pages for item in page["Items"]]
