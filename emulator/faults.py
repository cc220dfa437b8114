"""Fault injection: lost, duplicated and reordered webhook deliveries and REST 5xx answers,
GitHub's refusal of runners below its minimum version, and the fault configuration (which also
carries the rate-limit rules of rate_limits.py).

Every decision comes from a hash of (seed, what is decided), never from a shared random stream,
so the n-th delivery of a job (or the n-th API call) meets the same fate in every run with the
same seed, whatever the thread interleaving. The injector counts what it really injected and
what the configured shares lead one to expect, so a run can prove its faults happened:
`problems()` names every kind injected less than half as often as configured.

No imports from the rest of the emulator at run time but rate_limits.py: config.py and
workload.py import the models below.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .rate_limits import RateLimitRules

if TYPE_CHECKING:
    from .rate_limits import RateLimiter

WEBHOOK_ACTIONS = ("waiting", "queued", "in_progress", "completed")
# The kinds a run reports; the first four are configured as shares and checked.
KINDS = ("dropped", "duplicated", "duplicated_new_id", "reordered", "never_sent", "api_5xx",
         "api_5xx_after_effect", "api_timeouts", "rate_limited", "runner_version_refused")
SHARE_KINDS = ("dropped", "duplicated", "duplicated_new_id", "reordered", "never_sent",
               "api_5xx", "api_5xx_after_effect", "api_timeouts")
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


_RUNNER_VERSION = re.compile(r"^v?(\d{1,6})\.(\d{1,6})\.(\d{1,6})$")


def runner_version(text: str) -> tuple[int, int, int]:
    """A runner version (2.321.0, or v2.321.0 as GitHub's releases write it) as numbers."""
    found = _RUNNER_VERSION.match(text.strip()) if isinstance(text, str) else None
    if found is None:
        raise ValueError(f"runner version {str(text)[:40]!r} is not MAJOR.MINOR.PATCH")
    return tuple(int(part) for part in found.groups())  # type: ignore[return-value]


class RunnerFaults(BaseModel):
    """GitHub's minimum runner version: a runner reporting an older version is refused when it
    opens its session (its registration is kept, as GitHub keeps it), with GitHub's 403 "Runner
    version vX is deprecated and cannot receive messages." None: every version is served.
    A runner that reports no version is served (only the stand-in speaks this protocol, and it
    always reports one)."""

    model_config = ConfigDict(extra="forbid")

    min_version: str | None = None

    @field_validator("min_version")
    @classmethod
    def _version(cls, value: str | None) -> str | None:
        if value is not None:
            runner_version(value)
            value = value.strip().lstrip("v")
        return value

    def refuses(self, version: str | None) -> bool:
        """Whether a runner of `version` is below the minimum (ValueError: not a version)."""
        if self.min_version is None or version is None:
            return False
        return runner_version(version) < runner_version(self.min_version)


class FaultsConfig(BaseModel):
    """`EmulatorConfig.faults`, a workload's `faults`, `PUT /_emulator/faults`."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    webhooks: WebhookFaults = Field(default_factory=WebhookFaults)
    api: ApiFaults = Field(default_factory=ApiFaults)
    runners: RunnerFaults = Field(default_factory=RunnerFaults)
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
