"""Request and response models: they validate the API's input and output, and the OpenAPI
document is generated from them (no free-form bodies: every field typed)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from chalicelib.api.audit import AuditRecord
from chalicelib.overrides import IMAGE_PATTERN, MAX_IMAGE_LENGTH, image_error


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(Model):
    status: int = Field(description="the HTTP status")
    error: str = Field(description="short machine-readable kind: unauthorized, forbidden, ...")
    message: str = Field(description="what went wrong, for a person")
    permission: str | None = Field(None, description="403: the permission the caller lacks")


class Me(Model):
    sub: str
    username: str
    role: str | None = Field(description="the most powerful role; None: in no RunnerHub group")
    roles: list[str]
    permissions: list[str]


# --- health and metrics ---


class Dependency(Model):
    name: str
    ok: bool | None = Field(description="None: not checked (see detail)")
    detail: str | None = None
    at: float | None = Field(None, description="epoch seconds of the last recorded run")


class Health(Model):
    status: Literal["ok", "degraded"]
    dependencies: list[Dependency] | None = Field(
        None, description="each dependency, for a caller with a viewer token or better")


# --- pools ---


class Limited(Model):
    value: int | None
    reason: str | None = Field(None, description="why value is None")


class PoolLive(Model):
    backlog: int = Field(description="jobs waiting in demand states (received, dispatched)")
    waiting_for_runner: int = Field(description="demanded or claimed, no runner took it yet")
    oldest_demand_age_s: float | None
    hosts_desired: Limited
    hosts_in_service: Limited
    hosts_min: Limited
    hosts_max: Limited
    slots_busy: int
    slots_free: int
    warm_runners: int = Field(description="idle warm runners (the pool's warm seats in use)")
    runners: int = Field(description="runner seats in use (any runner not gone)")


class Overrides(Model):
    warm_runners: int | None = None
    min_hosts: int | None = None
    max_hosts: int | None = None
    image: str | None = Field(None, description="the runners' image; None: the pools file's")
    version: int = 0
    changed_by: str | None = None
    changed_at: float | None = None


class Effective(Model):
    warm_runners: int = Field(description="warm target now: the override, else the schedule's")
    min_hosts: int | None = Field(description="None: the Auto Scaling group's own")
    max_hosts: int | None = Field(description="None: the Auto Scaling group's own")
    image: str = Field(description="the image every new runner starts with: the override, "
                                   "else the pools file's")


class Rollout(Model):
    """The pool's executor rollout (chalicelib/scaler/rollout.py), from the group and the
    scaler's record of it."""

    group_version: str | None = Field(
        description="the launch template version the group launches (None: not pinned, or "
                    "no group)")
    hosts_by_version: dict[str, int] = Field(
        description="instances in the group by the version they were launched with")
    status: str | None = Field(
        None, description="rolling, rolling_back, done or stalled; None: never rolled")
    target: str | None = None
    previous: str | None = Field(None, description="the version a rollback returns to")
    started_at: float | None = None
    checkpoint_until: float | None = None
    reason: str | None = Field(None, description="why it rolled back or stalled")
    failed_hosts: list[str] = []


class PoolView(Model):
    name: str
    labels: list[str]
    owner: str
    repositories: list[str]
    image: str
    max_runners: int
    warm_runners_configured: int = Field(description="the pools file's warm target now")
    slots_per_host: int
    overrides: Overrides
    effective: Effective
    live: PoolLive
    rollout: Rollout | None = Field(
        None, description="None when the pool's group is unknown (no Auto Scaling client)")


class PoolList(Model):
    pools: list[PoolView]


class WarmChange(Model):
    warm_runners: int | None = Field(
        ge=0, description="the warm target; null removes the override (the pools file's)")


class HostsChange(Model):
    min_hosts: int | None = Field(ge=0, description="null removes the override")
    max_hosts: int | None = Field(ge=0, description="null removes the override")


class ImageChange(Model):
    image: str | None = Field(
        max_length=MAX_IMAGE_LENGTH, json_schema_extra={"pattern": IMAGE_PATTERN},
        description="the runners' image, a full reference: repo@sha256:<64 hex> (preferred) or "
                    "repo:tag; null removes the override (the pools file's image)")

    @field_validator("image")
    @classmethod
    def _reference(cls, value: str | None) -> str | None:
        if value is not None and (error := image_error(value)):
            raise ValueError(error)
        return value


class ScanSummary(Model):
    counts: dict[str, int] = Field(description="findings by severity (CRITICAL, HIGH, ...)")
    status: str = Field(description="ECR's scan status (COMPLETE, ...)")


class ImageProposal(Model):
    pool: str
    image: str = Field(description="the proposed image, digest-pinned")
    repository: str
    digest: str
    runner_version: str
    found_at: float = Field(description="epoch seconds the refresh proposed it")
    scan: ScanSummary
    current_image: str = Field(description="the pool's effective image when proposed")


class ApproveProposal(Model):
    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$",
                        description="the digest approved: must still be the pool's proposal's "
                                    "(409 otherwise), so a newer proposal is never approved "
                                    "unseen")


# --- jobs ---


class JobSummary(Model):
    job_id: int
    state: str
    pool: str | None = None
    repository: str | None = None
    labels: list[str] = []
    demand_generation: int = 0
    conclusion: str | None = None
    flagged: bool = False
    start_failures: int = 0
    runner_name: str | None = None
    started_runner: str | None = None
    host_id: str | None = None
    job_name: str | None = None
    workflow_name: str | None = None
    html_url: str | None = None
    created_at: str | None = Field(None, description="GitHub's creation time (ISO 8601)")
    received_at: float | None = None
    updated_at: float


class JobPage(Model):
    jobs: list[JobSummary]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page")


class TimelineEvent(Model):
    stamp: str = Field(description="which stamp: received_at, dispatched_at, ...")
    at: float = Field(description="epoch seconds")


class StageTime(Model):
    stage: str
    seconds: float | None
    reason: str | None = Field(None, description="why seconds is None")


class RunnerView(Model):
    runner_name: str
    state: str
    pool: str | None = None
    host_id: str | None = None
    job_id: int | None = None
    took_job_id: int | None = None
    warm: bool = False
    starting_at: float | None = None
    idle_at: float | None = None
    busy_at: float | None = None
    gone_at: float | None = None
    jit_s: float | None = None
    container_start_s: float | None = None
    retire_requested_at: float | None = None


class HostView(Model):
    host_id: str
    state: str
    alive: bool
    pools: list[str]
    slots_total: int
    slots_busy: int
    heartbeat_at: float
    heartbeat_age_s: float
    version: str | None = None
    drain_requested_at: float | None = None


class JobDetail(Model):
    job: JobSummary
    timeline: list[TimelineEvent]
    stages: list[StageTime]
    runner: RunnerView | None = Field(description="the runner GitHub gave the job to, if known")
    host: HostView | None = Field(description="the host of that runner (or of the claim)")


class RunnerPage(Model):
    runners: list[RunnerView]
    next_cursor: str | None


class HostList(Model):
    hosts: list[HostView]


class AuditPage(Model):
    records: list[AuditRecord]
    next_cursor: str | None


# --- analytics ---


class StageStats(Model):
    stage: str
    p50_s: float | None
    p95_s: float | None
    samples: int
    reason: str | None = Field(None, description="why there is no figure, or what it measures")


class CrossPool(Model):
    runner_pool: str
    jobs: int


class Analytics(Model):
    pool: str
    window_s: float
    jobs: int = Field(description="the pool's jobs updated in the window (sampled)")
    truncated: bool = Field(description="more jobs than the analytics read; figures sampled")
    stages: list[StageStats]
    pickup: StageStats = Field(description="GitHub's created_at -> the job started")
    bottleneck: str | None = Field(description="the stage with the largest p95 (before the job)")
    utilisation: float | None = Field(description="busy / total slots of live hosts, now")
    utilisation_reason: str | None = None
    job_seconds: float = Field(description="seconds jobs ran in the window")
    idle_warm_runner_s: float | None
    idle_warm_reason: str | None = None
    cross_pool: list[CrossPool] = Field(description="jobs of this pool run by other pools' "
                                                    "runners")


# --- actions ---


class ActionResult(Model):
    action: str
    target: str
    outcome: str = Field(description="what was done, e.g. retiring, drain_requested")
    detail: str | None = None


class OverridesResult(Model):
    pool: str
    overrides: Overrides
    effective: Effective
