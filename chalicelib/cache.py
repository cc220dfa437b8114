"""Reads of slowly changing items (a pool's forecast, its overrides), cached per key.

A reader calls `get(key)` on every tick or run; the store is read at most once per
`refresh_s` per key. A read that fails keeps the last value read (or None: the caller's
default) and is reported through `on_error`: such an item never stops the caller's work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerKey(Generic[T]):
    def __init__(self, fetch: Callable[[str], T | None], *, refresh_s: float,
                 clock: Callable[[], float] | None = None,
                 on_error: Callable[[str, Exception], None] | None = None) -> None:
        self._fetch = fetch
        self._refresh_s = refresh_s
        self.clock = clock or time.time
        self._on_error = on_error
        self._read: dict[str, tuple[float, T | None]] = {}

    def get(self, key: str) -> T | None:
        now = self.clock()
        cached = self._read.get(key)
        if cached is None or now - cached[0] >= self._refresh_s:
            try:
                cached = (now, self._fetch(key))
            except Exception as exc:  # noqa: BLE001 - reported; the caller's default holds
                # An outage, an item this code cannot read, a table or permission missing (a
                # misconfigured deploy): reported, and the caller runs without it.
                if self._on_error is not None:
                    self._on_error(key, exc)
                # Tried again at the next refresh; meanwhile the last one read, if any.
                cached = (now, cached[1] if cached else None)
            self._read[key] = cached
        return cached[1]
