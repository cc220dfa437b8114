"""Receiving demand: one poller per pool (it never receives more messages than free slots) and
the messages this host holds while it serves them: held from receipt, their visibility extended
by the monitor, every one still held returned to the queue at shutdown."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aws_lambda_powertools import Logger

from chalicelib.errors import DependencyUnavailable
from chalicelib.resources import DEMAND_MAX_RECEIVES
from executor.context import Context
from executor.messages import Delay
from executor.queue import Received
from executor.redemand import backoff_s
from executor.serve import apply
from executor.slots import Slots

logger = Logger(service="runnerhub-executor")

# A message received when another pool's poller just took the last slot is held this long for
# a slot before it is returned to the queue (see `Intake.wait_for_slot`).
SLOT_WAIT_S = 5.0


@dataclass
class Held:
    """A message this host holds while it starts a runner for it."""

    received: Received
    extended_at: float


class Intake:
    def __init__(self, ctx: Context, slots: Slots, serve: Callable[[Received], None]) -> None:
        self._ctx = ctx
        self._slots = slots
        self.serve = serve  # runs on a serving thread; forgets the message when done
        self.held: dict[str, Held] = {}
        self._lock = threading.Lock()
        self._workers = ThreadPoolExecutor(ctx.settings.slots, thread_name_prefix="serve")

    def start(self) -> list[threading.Thread]:
        pollers = [threading.Thread(target=self.poll, args=(name,), name=f"poll-{name}",
                                    daemon=True) for name in self._ctx.pools]
        for thread in pollers:
            thread.start()
        return pollers

    def poll(self, pool: str) -> None:
        ctx, settings = self._ctx, self._ctx.settings
        failures = 0
        while not ctx.stopping.is_set():
            if not ctx.receiving.wait(timeout=1.0):
                continue  # retiring (or lost): this host receives nothing
            free = self._slots.wait_free(timeout_s=1.0)
            if not free:
                continue
            try:
                # No more than the pool's free runner seats (`max_runners` across its hosts):
                # a message received beyond them would wait here holding a slot. The seat
                # itself is taken, conditionally, when the runner starts (`Launcher._seat`).
                # Messages of the pool this host holds have no seat yet (or just took one).
                with self._lock:
                    waiting = sum(1 for item in self.held.values()
                                  if item.received.pool == pool)
                room = ctx.pools[pool].max_runners - ctx.runners.seats(pool).runners - waiting
                if room <= 0:
                    ctx.stopping.wait(1.0)
                    continue
                batch = ctx.consumer.receive(pool, min(free, settings.receive_batch, room),
                                             settings.poll_wait_s, settings.visibility_s)
                failures = 0
            except DependencyUnavailable as exc:
                failures += 1
                logger.warning("receive failed: %s", exc, extra={"pool": pool})
                ctx.stopping.wait(backoff_s(failures + 1, 0.5, 30.0))
                continue
            now = ctx.clock()
            with self._lock:  # held from now on: the monitor extends their visibility
                self.held.update((r.receipt, Held(r, now)) for r in batch)
            for received in batch:
                self._hand_on(received)

    def _hand_on(self, received: Received) -> None:
        """To a serving thread with a slot, or (stopping, no slot) back to the queue now."""
        if self._ctx.stopping.is_set():
            self._give_up(received)  # received after SIGTERM: another host takes it
            return
        if not self._slots.try_take(received.receipt) and not self.wait_for_slot(received):
            self._give_up(received)
            return
        try:
            self._workers.submit(self.serve, received)
        except RuntimeError:  # shutting down: the worker pool takes nothing more
            self._slots.free(received.receipt, {"pool": received.pool})
            self._give_up(received)

    def _give_up(self, received: Received) -> None:
        self.forget(received.receipt)
        apply(self._ctx.consumer, received, Delay(0), quiet=True)

    def wait_for_slot(self, received: Received) -> bool:
        """Another pool's poller took the slot meanwhile. Returning the message at once would
        count a receive each time (the queue dead-letters a message after DEMAND_MAX_RECEIVES)
        and two pollers can bounce one message several times a second; so hold it (the monitor
        extends its visibility) until a slot frees, for a while, or for as long as it takes when
        one more receive would send it to the DLQ."""
        self._ctx.metrics.rejected.labels(received.pool, "no_free_slot").inc()
        near_dlq = received.receive_count >= DEMAND_MAX_RECEIVES - 1
        return self._slots.take(received.receipt, None if near_dlq else SLOT_WAIT_S,
                                self._ctx.stopping)

    def forget(self, receipt: str) -> None:
        with self._lock:
            self.held.pop(receipt, None)

    def extend(self, now: float) -> None:
        """Keep holding: each held message's visibility is extended every third of it."""
        visibility_s = self._ctx.settings.visibility_s
        with self._lock:
            held = list(self.held.values())
        for item in held:
            if now - item.extended_at >= visibility_s / 3:
                item.extended_at = now
                try:
                    self._ctx.consumer.set_visibility(item.received, visibility_s)
                except DependencyUnavailable as exc:
                    logger.warning("could not extend a held message (%s); it reappears after "
                                   "its timeout", exc, extra={"pool": item.received.pool})

    def close(self) -> None:
        """Serving threads take nothing more (those serving finish)."""
        self._workers.shutdown(wait=False)

    def return_all(self) -> bool:
        """Every message still held, visible again now; False when one could not be."""
        with self._lock:
            held = list(self.held.values())
        ok = True
        for item in held:
            try:
                apply(self._ctx.consumer, item.received, Delay(0))
            except DependencyUnavailable as exc:
                ok = False
                logger.error("could not return a held message (%s); it reappears after its "
                             "visibility timeout", exc, extra={"pool": item.received.pool})
        return ok
