"""Fault injection: lost, duplicated and reordered webhook deliveries, REST 5xx answers and
enforced rate limits (GitHub's primary quota and a secondary points-per-minute limit).

Every decision comes from a hash of (seed, what is decided), never from a shared random stream,
so the n-th delivery of a job (or the n-th API call) meets the same fate in every run with the
same seed, whatever the thread interleaving. The injector counts what it really injected and
what the configured shares lead one to expect, so a run can prove its faults happened:
`problems()` names every kind injected less than half as often as configured.

No imports from the rest of the emulator at run time: config.py and workload.py import the
models below, auth.py the rate limiter.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from .auth import Caller
    from .config import EmulatorConfig

WEBHOOK_ACTIONS = ("waiting", "queued", "in_progress", "completed")
# The kinds a run reports; the first four are configured as shares and checked.
KINDS = ("dropped", "duplicated", "duplicated_new_id", "reordered", "never_sent", "api_5xx",
         "api_5xx_after_effect", "api_timeouts", "rate_limited")
SHARE_KINDS = ("dropped", "duplicated", "duplicated_new_id", "reordered", "never_sent",
               "api_5xx", "api_5xx_after_effect", "api_timeouts")
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
SERVER_ERROR_MESSAGES = {
    500: "Server Error",
    502: "Server Error",
    503: "Service Unavailable",
    504: "We couldn't respond to your request in time. Sorry about that. Please try resubmitting "
    "your request and contact us if the problem persists.",
}

Share = Field(0.0, ge=0.0, le=1.0)


class WebhookFaults(BaseModel):
    """Shares of original deliveries (never redeliveries) that are lost (logged as failed),
    sent twice (same delivery id), followed by a second event under a new delivery id (as
    GitHub does around environment approvals and re-runs), never sent and never logged (a
    GitHub-side incident: only the REST API shows the job), or held back until a later event
    of the same job went out. One draw per delivery decides, so they are exclusive and must
    sum to at most 1."""

    model_config = ConfigDict(extra="forbid")

    drop: float = Share
    duplicate: float = Share
    reorder: float = Share
    duplicate_new_id: float = Share
    never_sent: float = Share
    # Actions subject to drop/duplicate; None = all.
    actions: list[str] | None = None
    # Actions that may be held back. `completed` has no successor, so it is never held. A
    # held `queued` only overtakes if a runner takes the job meanwhile (a warm runner);
    # otherwise it goes out late after `reorder_max_hold_s` (counted as `delayed`).
    reorder_actions: list[str] = Field(default_factory=lambda: ["waiting", "queued", "in_progress"])
    reorder_max_hold_s: float = Field(10.0, gt=0, le=600)
    # Actions subject to duplicate_new_id and never_sent.
    new_id_actions: list[str] = Field(default_factory=lambda: ["queued"])
    never_sent_actions: list[str] = Field(default_factory=lambda: ["queued"])
    # How a lost delivery is logged: 0 = "failed to connect to host" (status_code 0), or an
    # HTTP status such as 502 = "Invalid HTTP Response: 502" (a gateway that failed).
    drop_status_code: int = 0
    # Pause between the two copies of a duplicated delivery.
    duplicate_delay_s: float = Field(0.0, ge=0, le=60)

    @field_validator("actions", "reorder_actions", "new_id_actions", "never_sent_actions")
    @classmethod
    def _known_actions(cls, actions: list[str] | None) -> list[str] | None:
        for action in actions or []:
            if action not in WEBHOOK_ACTIONS:
                raise ValueError(f"unknown workflow_job action {action!r}")
        return actions

    @model_validator(mode="after")
    def _check(self) -> WebhookFaults:
        total = (self.drop + self.duplicate + self.duplicate_new_id + self.never_sent
                 + self.reorder)
        if total > 1.0 + 1e-9:
            raise ValueError(
                "drop + duplicate + duplicate_new_id + never_sent + reorder must be at most 1")
        if self.drop_status_code != 0 and not 400 <= self.drop_status_code <= 599:
            raise ValueError("drop_status_code must be 0 or an HTTP error status (400-599)")
        return self


class ApiFaults(BaseModel):
    """A share of GitHub REST calls (not `/_runner`, not `/_emulator`) answered with 5xx."""

    model_config = ConfigDict(extra="forbid")

    error_share: float = Share
    statuses: list[int] = Field(default_factory=lambda: [502, 503], min_length=1)
    # Of the failed calls, the share that failed *after* taking effect (GitHub created the
    # runner, then the gateway timed out): a retry then meets 409, not success.
    after_effect_share: float = Share
    # A share of calls answered only after `timeout_s` (their effect happens; a client with a
    # shorter read timeout has given up by then). Drawn apart from `error_share`.
    timeout_share: float = Share
    timeout_s: float = Field(12.0, gt=0, le=120)
    # Only paths (under the GHES prefix) matching this regex (re.search); None = every path.
    path_pattern: str | None = None
    # Only these HTTP methods; None = all.
    methods: list[str] | None = None

    @field_validator("statuses")
    @classmethod
    def _server_errors(cls, statuses: list[int]) -> list[int]:
        if any(not 500 <= s <= 599 for s in statuses):
            raise ValueError("statuses must be 5xx")
        return statuses

    @field_validator("path_pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"path_pattern: {exc}") from None
        return pattern

    @field_validator("methods")
    @classmethod
    def _upper(cls, methods: list[str] | None) -> list[str] | None:
        return None if methods is None else [m.upper() for m in methods]


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


class FaultsConfig(BaseModel):
    """`EmulatorConfig.faults`, a workload's `faults`, `PUT /_emulator/faults`."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    webhooks: WebhookFaults = Field(default_factory=WebhookFaults)
    api: ApiFaults = Field(default_factory=ApiFaults)
    rate_limits: RateLimitRules = Field(default_factory=RateLimitRules)


def draw(seed: int, *parts) -> float:
    """A uniform number in [0, 1) fixed by the seed and what is being decided."""
    key = "|".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2.0**64


@dataclass(frozen=True)
class ApiFault:
    status: int  # 0: no error status; the answer is only late (`delay_s`)
    after_effect: bool
    delay_s: float = 0.0

    def body(self) -> dict:
        return {
            "message": SERVER_ERROR_MESSAGES.get(self.status, "Server Error"),
            "documentation_url": "https://docs.github.com/rest",
            "status": str(self.status),
        }


class FaultShortfall(AssertionError):
    """A configured fault was injected less than half as often as configured."""


class FaultInjector:
    """Decides faults and counts them. Thread-safe; decisions take microseconds, so the
    webhook sender may call it under its own lock."""

    def __init__(self, config: FaultsConfig | None = None, limiter: RateLimiter | None = None):
        self._lock = threading.Lock()
        self.limiter = limiter
        self.config = FaultsConfig()
        self._pattern: re.Pattern | None = None
        self.reset()
        self.configure(config or FaultsConfig())

    def configure(self, config: FaultsConfig | dict) -> FaultsConfig:
        """Replace the fault settings from now on; counts carry on (they describe the run)."""
        if isinstance(config, dict):
            config = FaultsConfig.model_validate(config)
        with self._lock:
            self.config = config
            pattern = config.api.path_pattern
            self._pattern = re.compile(pattern) if pattern else None
        if self.limiter is not None:
            self.limiter.rules = config.rate_limits
        return config

    def reset(self) -> None:
        """Forget counts and occurrence numbers (a fresh run with the same seed replays)."""
        with self._lock:
            self._injected: Counter = Counter()
            self._detail: Counter = Counter()
            self._opportunities: Counter = Counter()
            self._expected: dict[str, float] = {k: 0.0 for k in SHARE_KINDS}
            self._occurrence: Counter = Counter()
            self._api_calls = 0

    # -- decisions -------------------------------------------------------------------------

    def webhook_fault(self, job_id, action: str, status: str, can_hold: bool = True) -> str | None:
        """The fate of one original delivery: "drop", "duplicate", "duplicate_new_id",
        "never_sent", "reorder" or None.

        `can_hold` is False while another delivery of the job is held (one at a time)."""
        with self._lock:
            cfg = self.config.webhooks
            key = (job_id, action, status)
            self._occurrence[key] += 1
            u = draw(self.config.seed, "webhook", job_id, action, status, self._occurrence[key])
            self._opportunities["webhook"] += 1
            lossy = cfg.actions is None or action in cfg.actions
            holdable = can_hold and action in cfg.reorder_actions and action != "completed"
            new_id = action in cfg.new_id_actions
            unsent = action in cfg.never_sent_actions
            if lossy:
                self._expected["dropped"] += cfg.drop
                self._expected["duplicated"] += cfg.duplicate
            if new_id:
                self._expected["duplicated_new_id"] += cfg.duplicate_new_id
            if unsent:
                self._expected["never_sent"] += cfg.never_sent
            if holdable:
                self._opportunities["reorder"] += 1
                self._expected["reordered"] += cfg.reorder
            # Fixed bands of one draw: the fate of a delivery does not depend on other
            # deliveries' eligibility.
            if lossy and u < cfg.drop:
                return "drop"
            if lossy and u < cfg.drop + cfg.duplicate:
                return "duplicate"
            lo = cfg.drop + cfg.duplicate
            if new_id and lo <= u < lo + cfg.duplicate_new_id:
                return "duplicate_new_id"
            lo += cfg.duplicate_new_id
            if unsent and lo <= u < lo + cfg.never_sent:
                return "never_sent"
            lo += cfg.never_sent
            if holdable and lo <= u < lo + cfg.reorder:
                return "reorder"
            return None

    def api_fault(self, method: str, path: str) -> ApiFault | None:
        """Whether this GitHub REST call is answered with a 5xx (and whether after its
        effect), or answered only after `timeout_s` (status 0)."""
        with self._lock:
            cfg = self.config.api
            if cfg.error_share <= 0 and cfg.timeout_share <= 0:
                return None
            if cfg.methods is not None and method.upper() not in cfg.methods:
                return None
            if self._pattern is not None and not self._pattern.search(path):
                return None
            self._api_calls += 1
            n, seed = self._api_calls, self.config.seed
            self._opportunities["api"] += 1
            self._expected["api_5xx"] += cfg.error_share
            self._expected["api_5xx_after_effect"] += cfg.error_share * cfg.after_effect_share
            self._expected["api_timeouts"] += cfg.timeout_share
            if draw(seed, "api-timeout", n) < cfg.timeout_share:
                return ApiFault(0, True, delay_s=cfg.timeout_s)
            if draw(seed, "api", n) >= cfg.error_share:
                return None
            status = cfg.statuses[int(draw(seed, "api-status", n) * len(cfg.statuses))]
            after = draw(seed, "api-after", n) < cfg.after_effect_share
            return ApiFault(status, after)

    # -- counting --------------------------------------------------------------------------

    def record(self, kind: str, detail: str | None = None) -> None:
        """Count one fault really injected (`kind` in KINDS; `detail` a finer counter)."""
        with self._lock:
            if kind:
                self._injected[kind] += 1
            if detail:
                self._detail[detail] += 1

    def report(self, ratio: float = 0.5) -> dict:
        """What was injected, what the shares lead one to expect, and the shortfalls."""
        with self._lock:
            report = {
                "seed": self.config.seed,
                "config": self.config.model_dump(mode="json"),
                "injected": {k: self._injected.get(k, 0) for k in KINDS},
                "opportunities": {
                    k: self._opportunities.get(k, 0) for k in ("webhook", "reorder", "api")
                },
                "expected": {k: round(v, 3) for k, v in self._expected.items()},
                "detail": dict(sorted(self._detail.items())),
            }
        report["problems"] = problems(report, ratio)
        return report

    def check(self, ratio: float = 0.5) -> dict:
        """The report; raises FaultShortfall when a configured kind fell short."""
        report = self.report(ratio)
        if report["problems"]:
            raise FaultShortfall("; ".join(report["problems"]))
        return report


def problems(report: dict, ratio: float = 0.5) -> list[str]:
    """Each share-configured kind injected less than `ratio` x expected (share x
    opportunities). `rate_limited` has no share: it is reported, not checked."""
    out = []
    for kind in SHARE_KINDS:
        expected = report["expected"].get(kind, 0.0)
        injected = report["injected"].get(kind, 0)
        if expected > 0 and injected < ratio * expected:
            out.append(
                f"{kind}: injected {injected}, expected {expected:.1f} "
                f"(share x opportunities); below {ratio:g} x expected"
            )
    return out


# -- rate limits ----------------------------------------------------------------------------


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
