"""A client-side budget per GitHub App, so RunnerHub slows down before GitHub answers 403/429.

GitHub's documented REST limits
(https://docs.github.com/en/rest/using-the-rest-api/rate-limits-for-the-rest-api):
- primary: requests per hour per installation token (5,000, up to 12,500 for large
  organisations; 15,000 on Enterprise Cloud), reported in `x-ratelimit-limit/-remaining/-reset`;
- secondary: at most 100 concurrent requests, and at most 900 points per minute for REST
  endpoints, where GET/HEAD/OPTIONS cost 1 point and POST/PATCH/PUT/DELETE cost 5.

The budget paces requests under both: it spends the secondary points within a sliding minute,
spreads the primary quota's last `primary_reserve` evenly until its reset, caps concurrency, and
after a 403/429 waits for `retry-after` (or the reset) before the next request.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

SECONDARY_POINTS_PER_MINUTE = 900
MAX_CONCURRENT_REQUESTS = 100
WRITE_METHODS = frozenset({"POST", "PATCH", "PUT", "DELETE"})
WRITE_POINTS = 5
READ_POINTS = 1
# Without `retry-after`, GitHub's docs say to wait at least a minute after a secondary limit.
SECONDARY_BACKOFF_S = 60.0


def points(method: str) -> int:
    return WRITE_POINTS if method.upper() in WRITE_METHODS else READ_POINTS


@dataclass(frozen=True)
class BudgetLimits:
    secondary_points_per_minute: int = SECONDARY_POINTS_PER_MINUTE
    max_concurrent: int = MAX_CONCURRENT_REQUESTS
    # Below this share of the primary quota left, spread what is left until the reset.
    primary_reserve: float = 0.1
    # GitHub counts the minute on its side; a second more on ours absorbs clock skew and
    # transit, so our window never ends before GitHub's does.
    window_s: float = 61.0


@dataclass(frozen=True)
class Headroom:
    """What is left of each limit, as shares of it (1.0 = untouched)."""

    primary: float
    secondary: float
    blocked_for_s: float

    @property
    def share(self) -> float:
        return 0.0 if self.blocked_for_s > 0 else min(self.primary, self.secondary)


@dataclass(frozen=True)
class PrimaryQuota:
    """One authentication's hourly quota as GitHub last reported it (less what was spent
    since), and the seconds until its window resets."""

    limit: int
    remaining: int
    reset_in_s: float


class RateBudget:
    def __init__(
        self,
        limits: BudgetLimits | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.limits = limits or BudgetLimits()
        self._clock = clock
        self._wall = wall
        self._sleep = sleep
        self._cond = threading.Condition()
        self._spent: deque[tuple[float, int]] = deque()  # (monotonic time, points)
        self._spent_points = 0
        self._in_flight = 0
        self._blocked_until = 0.0
        self._next_primary_at = 0.0
        # Primary quota per authentication (installation id, or "app" for the JWT).
        self._primary: dict[str, tuple[int, int, float]] = {}  # key -> (limit, remaining, reset)
        self.waited_s = 0.0
        self.limited = 0  # 403/429 answers seen

    # --- before and after each request ---

    def acquire(self, method: str, key: str = "app") -> None:
        """Block until a request of `method` fits every limit, then count it in flight."""
        cost = points(method)
        with self._cond:
            while True:
                wait = self._wait_s(cost, key)
                if wait <= 0:
                    break
                self.waited_s += wait
                if self._sleep is time.sleep:
                    self._cond.wait(timeout=wait)
                else:
                    self._sleep_unlocked(wait)
            now = self._clock()
            self._spent.append((now, cost))
            self._spent_points += cost
            self._in_flight += 1
            self._primary_spend(key, now)

    def release(self) -> None:
        with self._cond:
            self._in_flight = max(0, self._in_flight - 1)
            self._cond.notify_all()

    def observe(self, status: int, headers: Mapping[str, str], key: str = "app") -> bool:
        """Learn from an answer; True when it was a rate-limit refusal (retry after waiting)."""
        now, wall = self._clock(), self._wall()
        with self._cond:
            limit = _int(headers.get("x-ratelimit-limit"))
            remaining = _int(headers.get("x-ratelimit-remaining"))
            reset = _int(headers.get("x-ratelimit-reset"))
            if limit and remaining is not None and reset:
                self._primary[key] = (limit, remaining, now + max(0.0, reset - wall))
            limited = status == 429 or (status == 403 and (
                remaining == 0 or "retry-after" in headers))
            if not limited:
                return False
            self.limited += 1
            retry_after = _int(headers.get("retry-after"))
            if retry_after is not None:
                until = now + retry_after
            elif remaining == 0 and reset:
                until = now + max(0.0, reset - wall) + 1.0
            else:
                until = now + SECONDARY_BACKOFF_S
            self._blocked_until = max(self._blocked_until, until)
            self._cond.notify_all()
            return True

    def primary_quota(self, key: str = "app") -> PrimaryQuota | None:
        """GitHub's last word on `key`'s hourly quota, or None before any answer."""
        with self._cond:
            quota = self._primary.get(key)
            if quota is None:
                return None
            limit, remaining, reset = quota
            return PrimaryQuota(limit, remaining, max(0.0, reset - self._clock()))

    def primary_limit(self, key: str = "app") -> int | None:
        """The hourly request limit GitHub last reported (`x-ratelimit-limit`) for `key`."""
        with self._cond:
            quota = self._primary.get(key)
            return quota[0] if quota else None

    def headroom(self) -> Headroom:
        with self._cond:
            now = self._clock()
            self._expire(now)
            secondary = 1.0 - self._spent_points / self.limits.secondary_points_per_minute
            primary = min(
                (remaining / limit for limit, remaining, reset in self._primary.values()
                 if reset > now and limit),
                default=1.0,
            )
            return Headroom(max(0.0, primary), max(0.0, secondary),
                            max(0.0, self._blocked_until - now))

    # --- internals (under the condition's lock) ---

    def _wait_s(self, cost: int, key: str) -> float:
        now = self._clock()
        self._expire(now)
        waits = [self._blocked_until - now, self._next_primary_at - now]
        if self._in_flight >= self.limits.max_concurrent:
            waits.append(0.05)
        if self._spent_points + cost > self.limits.secondary_points_per_minute and self._spent:
            # The oldest spend leaves the window first.
            waits.append(self._spent[0][0] + self.limits.window_s - now)
        quota = self._primary.get(key)
        if quota:
            _, remaining, reset = quota
            if remaining <= 0 and reset > now:
                waits.append(reset - now)
        return max(waits)

    def _primary_spend(self, key: str, now: float) -> None:
        quota = self._primary.get(key)
        if not quota:
            return
        limit, remaining, reset = quota
        remaining = max(0, remaining - 1)
        self._primary[key] = (limit, remaining, reset)
        if reset > now and remaining < self.limits.primary_reserve * limit:
            # Spread the rest of the hour's quota evenly instead of spending it at once.
            self._next_primary_at = now + (reset - now) / max(1, remaining)

    def _expire(self, now: float) -> None:
        while self._spent and self._spent[0][0] <= now - self.limits.window_s:
            self._spent_points -= self._spent.popleft()[1]

    def _sleep_unlocked(self, seconds: float) -> None:
        # An injected sleep (tests): release the lock while "sleeping".
        self._cond.release()
        try:
            self._sleep(seconds)
        finally:
            self._cond.acquire()


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except ValueError:
        return None
