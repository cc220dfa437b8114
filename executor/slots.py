"""Runner slots on this host: how many runners (and messages about to become runners) it holds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from aws_lambda_powertools import Logger

logger = Logger(service="runnerhub-executor")


class Slots:
    """Runner slots on this host: taken when a message is received, held until its container
    exits. Pollers only wait for free slots; they never hold slots through a long poll, so an
    empty pool's queue can't starve a busy one.

    Each slot has one holder: the message's receipt handle, then (`hand_over`) the name of the
    runner started for it. A slot is released once, by its holder; releasing for anything that
    holds none is refused (`release` returns False; `free` logs and counts it), never clamped,
    so a double release can't let the host over-commit."""

    def __init__(self, total: int, on_unheld: Callable[[], None] = lambda: None) -> None:
        self.total = total
        self._holders: set[str] = set()
        self._cond = threading.Condition()
        self._on_unheld = on_unheld

    def _take(self, holder: str) -> None:
        if holder in self._holders:
            raise ValueError(f"{holder} already holds a slot")
        self._holders.add(holder)

    def wait_free(self, timeout_s: float) -> int:
        with self._cond:
            self._cond.wait_for(lambda: len(self._holders) < self.total, timeout=timeout_s)
            return max(0, self.total - len(self._holders))

    def try_take(self, holder: str) -> bool:
        with self._cond:
            if len(self._holders) >= self.total:
                return False
            self._take(holder)
            return True

    def take(self, holder: str, timeout_s: float | None, cancel: threading.Event) -> bool:
        """Wait for a free slot and take it; False after `timeout_s` (None: no limit) or once
        `cancel` is set."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while len(self._holders) >= self.total:
                if cancel.is_set():
                    return False
                left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if left <= 0:
                    return False
                self._cond.wait(left)
            self._take(holder)
            return True

    def force_take(self, holder: str) -> None:
        """An adopted runner holds a slot even if it overfills the host (slots were lowered)."""
        with self._cond:
            self._take(holder)

    def hand_over(self, holder: str, to: str) -> bool:
        """`to` (a runner) now holds the slot `holder` (its message) held. False when `holder`
        held none: `to` then takes one anyway (a running container always holds a slot)."""
        with self._cond:
            held = holder in self._holders
            self._holders.discard(holder)
            self._take(to)
        if not held:
            self._on_unheld()
            logger.error("message of runner %s held no slot; the runner takes one", to,
                         extra={"runner": to})
        return held

    def holds(self, holder: str) -> bool:
        with self._cond:
            return holder in self._holders

    def release(self, holder: str) -> bool:
        """Free the slot `holder` holds; False (nothing changes) when it holds none."""
        with self._cond:
            if holder not in self._holders:
                return False
            self._holders.remove(holder)
            self._cond.notify_all()
            return True

    def free(self, holder: str, log: dict | None = None) -> None:
        """`release`, where holding none is a bug: logged and counted, nothing freed."""
        if not self.release(holder):
            self._on_unheld()
            logger.error("slot released for %s, which holds none: a bug; nothing freed",
                         holder, extra=log or {})

    @property
    def used(self) -> int:
        return len(self._holders)
