"""Serving one demand message: it becomes exactly one disposition (ack, delay, dead-letter,
recycle), applied in one place (`apply`); a serving thread that fails makes the message visible
again after a backoff, and always forgets the message and frees a slot no runner took over."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from aws_lambda_powertools import Logger

from chalicelib.errors import DependencyUnavailable
from chalicelib.resources import DEMAND_MAX_RECEIVES
from executor.context import Context
from executor.messages import (
    Accepted,
    Ack,
    DeadLetter,
    Delay,
    Disposition,
    Malformed,
    Recycle,
    TooNew,
    classify,
)
from executor.queue import DemandConsumer, Received
from executor.slots import Slots

if TYPE_CHECKING:
    from executor.launch import Launcher
    from executor.takeover import Takeover

logger = Logger(service="runnerhub-executor")


def apply(consumer: DemandConsumer, received: Received, disposition: Disposition,
          quiet: bool = False) -> bool:
    """Carry out a disposition; True when a runner now holds the message's slot. `quiet`: the
    queue failing is logged (the message reappears after its visibility timeout), not raised."""
    try:
        if isinstance(disposition, Ack):
            consumer.delete(received)
        elif isinstance(disposition, Delay):
            consumer.set_visibility(received, math.ceil(disposition.seconds))
        elif isinstance(disposition, DeadLetter):
            consumer.dead_letter(received, disposition.reason)
        else:
            assert isinstance(disposition, Recycle)
            consumer.recycle(received)
    except DependencyUnavailable as exc:
        if not quiet:
            raise
        logger.warning("could not requeue message (%s); it reappears after its timeout", exc,
                       extra={"pool": received.pool})
    return isinstance(disposition, Ack) and disposition.runner is not None


class Server:
    def __init__(self, ctx: Context, slots: Slots, launcher: Launcher, takeover: Takeover,
                 forget: Callable[[str], None]) -> None:
        self._ctx = ctx
        self._slots = slots
        self._launcher = launcher
        self._takeover = takeover
        self._forget = forget

    def serve(self, received: Received) -> None:
        """A serving thread's whole work for one message."""
        try:
            self.handle(received)
        except Exception:
            self._ctx.metrics.errors.labels("serve").inc()
            logger.exception("serving a demand message failed", extra={"pool": received.pool})
            apply(self._ctx.consumer, received, Delay(self._ctx.settings.start_backoff_s),
                  quiet=True)
        finally:
            self._forget(received.receipt)
            # Its slot, unless a runner took it over (`Launcher.launch`): that one releases it
            # when its container exits, even if a write after the start failed.
            self._slots.release(received.receipt)

    def handle(self, received: Received) -> bool:
        """Decide and apply; True when a runner now holds the slot."""
        return apply(self._ctx.consumer, received, self.decide(received))

    def decide(self, received: Received) -> Disposition:
        ctx = self._ctx
        pool = ctx.pools[received.pool]
        ctx.metrics.received.labels(pool.name).inc()
        verdict = classify(received.body, pool.name)
        if isinstance(verdict, Malformed):
            ctx.metrics.rejected.labels(pool.name, "malformed").inc()
            logger.warning("malformed demand message to the DLQ: %s", verdict.reason,
                           extra={"pool": pool.name, "message_id": received.message_id})
            return DeadLetter(verdict.reason)
        if isinstance(verdict, TooNew):
            ctx.metrics.rejected.labels(pool.name, "too_new").inc()
            logger.info("demand schema %s is newer than this executor; left for an upgraded one",
                        verdict.version, extra={"pool": pool.name})
            if received.receive_count >= DEMAND_MAX_RECEIVES - 1:
                # One more receive would dead-letter a good message: put a fresh copy back.
                return Recycle()
            return Delay(ctx.settings.newer_schema_delay_s)
        assert isinstance(verdict, Accepted)
        message = verdict.message
        log = {"pool": pool.name, "job_id": message.job_id, "generation": message.generation,
               "schema_version": message.schema_version}
        if ctx.stopping.is_set():
            return Delay(0)  # another host takes it now
        now = ctx.clock()
        if message.not_before and message.not_before > now:
            return Delay(message.not_before - now)
        claim = self._launcher.claim(message, log)
        if claim is None and ctx.stopping.is_set():
            return Delay(0)  # stopping: another host takes it now
        if claim is None:
            # This host may not claim (retiring, lost: `Launcher.not_serving`). Made visible
            # again, the refusal would count a receive that says nothing about the message and
            # could send it to the DLQ: a fresh copy instead, for another host at once.
            ctx.metrics.rejected.labels(pool.name, "host_not_serving").inc()
            return Recycle()
        if claim.applied:
            return self._launcher.launch(pool, message, claim.job, received, log)
        return self._takeover.on_refused(pool, message, claim.job, received, log)
