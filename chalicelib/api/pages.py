"""Opaque page cursors: where a paginated read resumes, signed so a tampered or foreign cursor
is refused (400) rather than read from. The payload is JSON (a DynamoDB key, a day...), tied to
the read's own filters (`scope`), so a cursor of one query is refused by another."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from chalicelib.api.errors import BadRequest


class BadCursor(BadRequest):
    """400: the cursor was not made by this API for this query."""


class Cursors:
    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(secret.encode()).digest()

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:16]

    def encode(self, scope: str, payload: Any) -> str:
        body = json.dumps({"s": scope, "p": payload}, separators=(",", ":"),
                          sort_keys=True).encode()
        return base64.urlsafe_b64encode(self._mac(body) + body).decode().rstrip("=")

    def decode(self, scope: str, cursor: str) -> Any:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        except (ValueError, TypeError) as exc:
            raise BadCursor("cursor is not one this API made") from exc
        mac, body = raw[:16], raw[16:]
        if len(raw) <= 16 or not hmac.compare_digest(mac, self._mac(body)):
            raise BadCursor("cursor is not one this API made (tampered or truncated)")
        data = json.loads(body)
        if data.get("s") != scope:
            raise BadCursor("cursor belongs to another query (its filters differ)")
        return data.get("p")
