"""GitHub's rate limits: the primary quota per identity (GitHub's fixed windows behind the
`x-ratelimit-*` headers, counted always, refused only when enforced) and the secondary
points-per-minute limit (a sliding window), with the rules that configure them.

No imports from the rest of the emulator at run time: faults.py holds the rules in its
`FaultsConfig`, server.py builds the limiter, auth.py keeps its old name `RateLimits`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from .auth import Caller
    from .config import EmulatorConfig

# GitHub's documented secondary-limit costs: reads 1 point, writes 5.
DEFAULT_POINT_COSTS = {
    "GET": 1,
    "HEAD": 1,
    "OPTIONS": 1,
    "POST": 5,
    "PATCH": 5,
    "PUT": 5,
    "DELETE": 5,
}
RATE_LIMIT_DOC = "https://docs.github.com/rest/using-the-rest-api/rate-limits-for-the-rest-api"


class AppQuota(BaseModel):
    """One App's quotas; unset fields fall back to the global rules."""

    model_config = ConfigDict(extra="forbid")

    installation: int | None = Field(None, gt=0)
    app: int | None = Field(None, gt=0)
    secondary_points: int | None = Field(None, gt=0)


class RateLimitRules(BaseModel):
    """GitHub's limits. The primary quota is always counted (`x-ratelimit-*`), refused only
    with `enforce`; the secondary limit exists only when `secondary_points` is set (for an
    App: in `per_app`). GitHub's documented values: 5000 requests/hour per installation (up to
    12500 as repositories and users grow, 15000 on Enterprise Cloud), 900 points per minute."""

    model_config = ConfigDict(extra="forbid")

    enforce: bool = False
    window_s: float = Field(3600.0, gt=0)
    status: Literal[403, 429] = 403
    # Unset: EmulatorConfig.rate_limit_installation / _app / _unauthenticated.
    installation: int | None = Field(None, gt=0)
    app: int | None = Field(None, gt=0)
    unauthenticated: int | None = Field(None, gt=0)
    per_app: dict[int, AppQuota] = Field(default_factory=dict)
    per_installation: dict[int, int] = Field(default_factory=dict)
    secondary_points: int | None = Field(None, gt=0)
    secondary_window_s: float = Field(60.0, gt=0)
    secondary_status: Literal[403, 429] = 403
    # "caller": each installation token, App JWT or IP apart; "app": an App and all its
    # installations share one budget.
    secondary_scope: Literal["caller", "app"] = "caller"
    point_costs: dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_POINT_COSTS))


@dataclass
class _Window:
    start: float
    used: int = 0


@dataclass
class Refusal:
    kind: str  # "primary" or "secondary"
    status: int
    message: str

    def body(self) -> dict:
        anchor = "primary" if self.kind == "primary" else "secondary"
        return {
            "message": self.message,
            "documentation_url": f"{RATE_LIMIT_DOC}#about-{anchor}-rate-limits",
            "status": str(self.status),
        }


@dataclass
class Admission:
    headers: dict[str, str]
    refusal: Refusal | None = None


@dataclass
class RateLimiter:
    """Per-identity primary windows (GitHub's fixed windows, starting at the first call) and a
    sliding secondary window of points. `count()` only counts (the emulator's behaviour when
    nothing is enforced); `admit()` counts and, per the rules, refuses."""

    config: EmulatorConfig
    clock: Callable[[], float] = time.time
    rules: RateLimitRules | None = None
    _primary: dict[str, _Window] = field(default_factory=dict)
    _secondary: dict[str, deque] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.rules is None:
            faults = getattr(self.config, "faults", None)
            self.rules = faults.rate_limits if faults is not None else RateLimitRules()

    def limit_for(self, caller: Caller) -> int:
        rules = self.rules
        app_id = caller.app.app_id if caller.app is not None else None
        quota = rules.per_app.get(app_id) if app_id is not None else None
        if caller.kind == "installation":
            inst_id = caller.installation.id if caller.installation is not None else None
            if inst_id in rules.per_installation:
                return rules.per_installation[inst_id]
            if quota is not None and quota.installation is not None:
                return quota.installation
            return rules.installation or self.config.rate_limit_installation
        if caller.kind == "app":
            if quota is not None and quota.app is not None:
                return quota.app
            return rules.app or self.config.rate_limit_app
        return rules.unauthenticated or self.config.rate_limit_unauthenticated

    def count(self, caller: Caller) -> dict[str, str]:
        with self._lock:
            window = self._window(caller.key, self.clock())
            window.used += 1
            return self._headers(caller, window)

    def status(self, caller: Caller) -> dict:
        """The caller's primary quota without counting (GET /rate_limit)."""
        with self._lock:
            window = self._window(caller.key, self.clock())
            limit = self.limit_for(caller)
            return {
                "limit": limit,
                "used": window.used,
                "remaining": max(0, limit - window.used),
                "reset": math.ceil(window.start + self.rules.window_s),
                "resource": "core",
            }

    def admit(self, caller: Caller, method: str, counted: bool = True) -> Admission:
        """Count one call, or refuse it (not counted) when a limit is exhausted."""
        rules = self.rules
        now = self.clock()
        with self._lock:
            window = self._window(caller.key, now)
            if not counted:
                return Admission(self._headers(caller, window))
            limit = self.limit_for(caller)
            if rules.enforce and window.used >= limit:
                refusal = Refusal("primary", rules.status, _primary_message(caller))
                return Admission(self._headers(caller, window), refusal)
            budget = self._secondary_budget(caller)
            if budget is not None:
                cost = rules.point_costs.get(method.upper(), 1)
                key = self._secondary_key(caller)
                spent = self._secondary.setdefault(key, deque())
                while spent and spent[0][0] <= now - rules.secondary_window_s:
                    spent.popleft()
                total = sum(points for _, points in spent)
                # One call is always let through into an empty window, however costly.
                if spent and total + cost > budget:
                    headers = self._headers(caller, window)
                    headers["retry-after"] = str(self._retry_after(spent, total, cost, budget, now))
                    message = (
                        "You have exceeded a secondary rate limit. Please wait a few minutes "
                        "before you try again. If you reach out to GitHub Support for help, "
                        "please include the request ID {request_id}."
                    )
                    return Admission(headers, Refusal("secondary", rules.secondary_status, message))
                spent.append((now, cost))
            window.used += 1
            return Admission(self._headers(caller, window))

    def _secondary_budget(self, caller: Caller) -> int | None:
        rules = self.rules
        if caller.app is not None:
            quota = rules.per_app.get(caller.app.app_id)
            if quota is not None and quota.secondary_points is not None:
                return quota.secondary_points
        return rules.secondary_points

    def _secondary_key(self, caller: Caller) -> str:
        if self.rules.secondary_scope == "app" and caller.app is not None:
            return f"app:{caller.app.app_id}"
        return caller.key

    def _retry_after(self, spent: deque, total: int, cost: int, budget: int, now: float) -> int:
        # Seconds until enough points leave the sliding window for this call to fit.
        window_s = self.rules.secondary_window_s
        freed = 0
        for at, points in spent:
            freed += points
            if total - freed + cost <= budget or freed == total:
                return max(1, math.ceil(at + window_s - now))
        return max(1, math.ceil(window_s))

    def _window(self, key: str, now: float) -> _Window:
        window = self._primary.get(key)
        if window is None or now >= window.start + self.rules.window_s:
            window = self._primary[key] = _Window(start=now)
        return window

    def _headers(self, caller: Caller, window: _Window) -> dict[str, str]:
        limit = self.limit_for(caller)
        return {
            "x-ratelimit-limit": str(limit),
            "x-ratelimit-remaining": str(max(0, limit - window.used)),
            "x-ratelimit-reset": str(math.ceil(window.start + self.rules.window_s)),
            "x-ratelimit-used": str(window.used),
            "x-ratelimit-resource": "core",
        }


def _primary_message(caller: Caller) -> str:
    if caller.kind == "installation" and caller.installation is not None:
        return f"API rate limit exceeded for installation ID {caller.installation.id}."
    if caller.kind == "app" and caller.app is not None:
        return f"API rate limit exceeded for app ID {caller.app.app_id}."
    ip = caller.key.removeprefix("ip:")
    return (
        f"API rate limit exceeded for {ip}. (But here's the good news: Authenticated requests "
        "get a higher rate limit. Check out the documentation for more details.)"
    )
