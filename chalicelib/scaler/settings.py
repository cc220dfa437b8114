"""The scaler's configuration: one pydantic-settings model, from RUNNERHUB_* variables.

The same variables as the executor and the reconciler where they mean the same thing (tables,
pools file, GitHub App, `slots`: runner slots per host); the scaler's own knobs are prefixed
`scaler_`. A pool's Auto Scaling group is `<scaler_group_prefix><pool>`; its MinSize and MaxSize
(set by infra/) are the pool's minimum and maximum hosts.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from chalicelib.history import FORECAST_LEAD_S
from chalicelib.resources import HISTORY_TABLE
from chalicelib.scaler.rollout import RolloutPolicy
from chalicelib.scaler.service import ScalerConfig
from chalicelib.settings import GitHubAppSettings


class ScalerSettings(GitHubAppSettings):
    scaler_group_prefix: str = Field("runnerhub-", max_length=200)
    # Comma-separated pools this scaler drives (default: every pool in the pools file).
    scaler_pools: str = ""
    # Runner slots per host: the executors' RUNNERHUB_SLOTS.
    slots: int = Field(4, ge=1, le=256)
    # A host idle this long (no busy slot, no claim) may be retired.
    scaler_idle_s: float = Field(300.0, ge=0)
    # An instance with no heartbeat this long after launch no longer counts as booting (it is
    # stuck: reaped); a host silent this long since its last heartbeat is reaped too.
    scaler_boot_timeout_s: float = Field(600.0, gt=0)
    # Free slots to keep on top of the demand (warm capacity).
    scaler_warm_slots: int = Field(0, ge=0)
    # Longer than a run may last (the Lambda's timeout, 60 s in infra/): a live run is never
    # overtaken. A run killed by the timeout holds its pool until the lease ends.
    scaler_lease_s: float = Field(70.0, ge=5, le=900)
    # Slots per host of the pools whose hosts differ from `slots`: "gpu=1,linux-large=8".
    scaler_pool_slots: str = ""
    # EMF metrics to stdout (Lambda); off for a local run that has no use for them.
    emit_metrics: bool = True
    # Demand history (written from the jobs table's stream) and the trainer's forecast
    # (chalicelib/history.py): the forecast floor is the trainer's `floor_hosts`
    # `scaler_forecast_lead_s` ahead (a host's boot and its daemon's start), at most
    # `scaler_forecast_hourly_cap` / `scaler_host_hourly_cost` hosts when a cap is set
    # (0: none), never above the pool's maximum (the decision caps it).
    history_table: str = HISTORY_TABLE.default_name
    scaler_forecast: bool = True
    scaler_forecast_lead_s: float = Field(FORECAST_LEAD_S, ge=0, le=3600)
    scaler_forecast_hourly_cap: float = Field(0.0, ge=0)
    scaler_host_hourly_cost: float = Field(0.0, ge=0)
    # Rollouts onto the group's launch template version (chalicelib/scaler/rollout.py):
    # hosts that must stay in service (percent of desired), the shares of new hosts at which
    # to pause, for how long, and what makes a new host failed.
    scaler_rollouts: bool = True
    rollout_min_healthy_percent: int = Field(90, ge=0, le=100)
    rollout_checkpoints: str = "50"
    rollout_checkpoint_delay_s: float = Field(300.0, ge=0)
    rollout_health_grace_s: float = Field(600.0, gt=0)
    rollout_max_start_failures: int = Field(3, ge=1)
    rollout_max_failed_hosts: int = Field(1, ge=1)

    @field_validator("rollout_checkpoints")
    @classmethod
    def _checkpoints(cls, value: str) -> str:
        parse_checkpoints(value)
        return value

    def rollout_policy(self) -> RolloutPolicy:
        return RolloutPolicy(
            min_healthy_percent=self.rollout_min_healthy_percent,
            checkpoints=parse_checkpoints(self.rollout_checkpoints),
            checkpoint_delay_s=self.rollout_checkpoint_delay_s,
            health_grace_s=self.rollout_health_grace_s,
            max_start_failures=self.rollout_max_start_failures,
            max_failed_hosts=self.rollout_max_failed_hosts)

    @model_validator(mode="after")
    def _cost_cap_has_a_price(self) -> ScalerSettings:
        if self.scaler_forecast_hourly_cap > 0 and self.scaler_host_hourly_cost <= 0:
            raise ValueError("RUNNERHUB_SCALER_FORECAST_HOURLY_CAP needs "
                             "RUNNERHUB_SCALER_HOST_HOURLY_COST (a host's price per hour)")
        return self

    @field_validator("scaler_pool_slots")
    @classmethod
    def _pool_slots(cls, value: str) -> str:
        parse_pool_slots(value)
        return value

    def pool_slots(self) -> dict[str, int]:
        return parse_pool_slots(self.scaler_pool_slots)

    @field_validator("scaler_pools")
    @classmethod
    def _strip(cls, value: str) -> str:
        return ",".join(name.strip() for name in value.split(",") if name.strip())

    def config(self) -> ScalerConfig:
        return ScalerConfig(group_prefix=self.scaler_group_prefix, slots_per_host=self.slots,
                            idle_s=self.scaler_idle_s, boot_timeout_s=self.scaler_boot_timeout_s,
                            lease_s=self.scaler_lease_s, warm_slots=self.scaler_warm_slots,
                            pool_slots=self.pool_slots())


def parse_pool_slots(value: str) -> dict[str, int]:
    """`pool=slots` pairs, comma-separated; a clear ValueError for anything else."""
    found: dict[str, int] = {}
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        pool, sep, slots = part.partition("=")
        pool = pool.strip()
        if not sep or not pool or not slots.strip().isdigit() or not 1 <= int(slots) <= 256:
            raise ValueError(f"scaler_pool_slots: {part!r} is not pool=slots (slots 1-256)")
        if pool in found:
            raise ValueError(f"scaler_pool_slots: pool {pool} given twice")
        found[pool] = int(slots)
    return found


def parse_checkpoints(value: str) -> tuple[int, ...]:
    """"25,50" -> (25, 50): percents within 1..100, ascending; "" -> none."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not all(p.isdigit() and 1 <= int(p) <= 100 for p in parts):
        raise ValueError(f"rollout checkpoints must be percents 1..100, comma-separated: "
                         f"{value!r}")
    return tuple(sorted({int(p) for p in parts}))
