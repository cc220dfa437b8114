"""The audit log: who did what, to which target, from where, with what outcome, and when.

Append-only. Each record is one DynamoDB PutItem conditioned on `attribute_not_exists(pk)` on a
new key (partition `day#YYYY-MM-DD` in UTC, sort key `<iso time>#<uuid>`), so a write can never
replace a record (the API's role is also denied Update/Delete: infra/). Records expire by TTL
`expires_at` after AUDIT_TTL_S (>= 400 days). Each record is also logged as one JSON line on
the `runnerhub.audit` logger (CloudWatch Logs, for a SIEM), before the put: a record whose put
failed is still in the logs.

Reading: newest first, a page at a time, day partition by day partition backwards.
"""

from __future__ import annotations

import json
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from aws_lambda_powertools import Logger
from pydantic import BaseModel, ConfigDict, Field

from chalicelib import dynamodb
from chalicelib.api.pages import BadCursor, Cursors
from chalicelib.dynamodb import from_item, to_item
from chalicelib.resources import AUDIT_TTL_S

# Its own logger (a standard logger named `runnerhub.audit`, JSON lines): a SIEM subscribes to
# these lines alone.
audit_logger = Logger(service="runnerhub.audit")
# A page looks back at most this many day partitions (empty days cost one Query each); the
# cursor then resumes from the next older day.
DAYS_PER_PAGE = 14
RETENTION_DAYS = AUDIT_TTL_S // 86400

Outcome = Literal["ok", "denied", "error"]


class AuditRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    at: str = Field(description="ISO 8601 time (UTC) of the action")
    id: str = Field(description="unique id of the record")
    sub: str | None = Field(None, description="the caller's subject (None: no valid token)")
    username: str | None = None
    role: str | None = Field(None, description="the caller's most powerful role")
    action: str = Field(description="what was attempted, e.g. `drain_host`")
    target: str | None = Field(None, description="what it was done to, e.g. `host:i-0abc`")
    source_ip: str | None = None
    user_agent: str | None = None
    outcome: Outcome
    reason: str | None = Field(None, description="why it was denied or failed, or what it did")
    change: dict[str, int | str | bool | None] | None = Field(
        None, description="for a change: each field's old and new value (`<field>_before`, "
                          "`<field>_after`)")


def new_record(*, now: float, action: str, outcome: Outcome, **fields: Any) -> AuditRecord:
    at = datetime.fromtimestamp(now, UTC).isoformat(timespec="microseconds")
    return AuditRecord(at=at, id=uuid.uuid4().hex, action=action, outcome=outcome, **fields)


def key_of(record: AuditRecord) -> tuple[str, str]:
    return f"day#{record.at[:10]}", f"{record.at}#{record.id}"


class AuditLog(Protocol):
    def append(self, record: AuditRecord) -> None:
        """Log it, then put it under a new key (refused, never replaced, if the key exists)."""

    def page(self, limit: int, cursor: str | None, now: float
             ) -> tuple[list[AuditRecord], str | None]:
        """Newest first; the next page's cursor or None. BadCursor for a foreign cursor."""


class AlreadyRecorded(Exception):
    """A put found its key taken: the log is append-only, nothing was replaced."""


def log_line(record: AuditRecord) -> None:
    audit_logger.info("audit", extra=record.model_dump(mode="json"))


SCOPE = "audit"


def _days_back(start: str, count: int) -> list[str]:
    day = datetime.fromisoformat(start).date()
    return [(day - timedelta(days=n)).isoformat() for n in range(count)]


def _first_day(cursor_data: Any, now: float) -> tuple[str, str | None]:
    """(day to read, sort key to resume after, or None) from a cursor's payload."""
    if cursor_data is None:
        return datetime.fromtimestamp(now, UTC).date().isoformat(), None
    if (not isinstance(cursor_data, dict) or not isinstance(cursor_data.get("day"), str)
            or not isinstance(cursor_data.get("after"), str | None)):
        raise BadCursor("cursor is not an audit cursor")
    try:
        datetime.fromisoformat(cursor_data["day"])
    except ValueError as exc:
        raise BadCursor("cursor is not an audit cursor") from exc
    return cursor_data["day"], cursor_data.get("after")


class DynamoAuditLog:
    def __init__(self, client: Any, table: str, cursors: Cursors) -> None:
        self._client = client
        self._table = table
        self._cursors = cursors

    def append(self, record: AuditRecord) -> None:
        log_line(record)
        pk, sk = key_of(record)
        item = record.model_dump(mode="json", exclude_none=True, exclude={"change"})
        if record.change is not None:
            # As JSON text: a change's old value may be null, which the item codec has no
            # type for.
            item["change"] = json.dumps(record.change, sort_keys=True)
        item |= {"pk": pk, "sk": sk,
                 "expires_at": int(datetime.fromisoformat(record.at).timestamp()) + AUDIT_TTL_S}
        applied, _ = dynamodb.attempt(self._client.put_item, TableName=self._table,
                                      Item=to_item(item),
                                      ConditionExpression="attribute_not_exists(pk)")
        if not applied:
            raise AlreadyRecorded(f"audit record {pk}/{sk} exists")

    def page(self, limit: int, cursor: str | None, now: float
             ) -> tuple[list[AuditRecord], str | None]:
        day, after = _first_day(self._cursors.decode(SCOPE, cursor) if cursor else None, now)
        oldest = (datetime.fromtimestamp(now, UTC).date()
                  - timedelta(days=RETENTION_DAYS)).isoformat()
        found: list[AuditRecord] = []
        for current in _days_back(day, DAYS_PER_PAGE):
            if current < oldest:
                return found, None
            while True:
                request: dict[str, Any] = {
                    "TableName": self._table, "KeyConditionExpression": "pk = :pk",
                    "ExpressionAttributeValues": {":pk": {"S": f"day#{current}"}},
                    "ScanIndexForward": False, "Limit": limit - len(found),
                }
                if after:
                    request["ExclusiveStartKey"] = {"pk": {"S": f"day#{current}"},
                                                    "sk": {"S": after}}
                with dynamodb.unavailable():
                    answer = self._client.query(**request)
                for item in answer.get("Items", []):
                    found.append(_record(from_item(item)))
                last = answer.get("LastEvaluatedKey")
                if len(found) >= limit:
                    if last:
                        return found, self._cursors.encode(
                            SCOPE, {"day": current, "after": last["sk"]["S"]})
                    return found, self._next_day_cursor(current, oldest)
                if not last:
                    break
                after = last["sk"]["S"]
            after = None
        return found, self._next_day_cursor(_days_back(day, DAYS_PER_PAGE + 1)[-1], oldest,
                                            inclusive=True)

    def _next_day_cursor(self, day: str, oldest: str, inclusive: bool = False) -> str | None:
        target = day if inclusive else _days_back(day, 2)[-1]
        if target < oldest:
            return None
        return self._cursors.encode(SCOPE, {"day": target, "after": None})


def _record(item: dict[str, Any]) -> AuditRecord:
    fields = {k: v for k, v in item.items() if k in AuditRecord.model_fields}
    if isinstance(fields.get("change"), str):
        fields["change"] = json.loads(fields["change"])
    return AuditRecord.model_validate(fields)


class MemoryAuditLog:
    """The same rules in memory (tests): a taken key is refused, newest first."""

    def __init__(self, cursors: Cursors | None = None) -> None:
        self.items: dict[tuple[str, str], AuditRecord] = {}
        self._lock = threading.Lock()
        self._cursors = cursors or Cursors("memory")

    def append(self, record: AuditRecord) -> None:
        log_line(record)
        key = key_of(record)
        with self._lock:
            if key in self.items:
                raise AlreadyRecorded(f"audit record {key} exists")
            self.items[key] = record

    def page(self, limit: int, cursor: str | None, now: float
             ) -> tuple[list[AuditRecord], str | None]:
        start = self._cursors.decode(SCOPE, cursor) if cursor else None
        if start is not None and not isinstance(start, int):
            raise BadCursor("cursor is not an audit cursor")
        ordered = [self.items[k] for k in sorted(self.items, reverse=True)]
        offset = start or 0
        chunk = ordered[offset:offset + limit]
        more = offset + limit < len(ordered)
        return chunk, self._cursors.encode(SCOPE, offset + limit) if more else None
