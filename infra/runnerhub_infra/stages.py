"""Stage settings: account-independent defaults for `dev` and `prod`, plus CDK context overrides.

Everything here is known without an AWS account, so `make synth` works offline; the only lookup
(an existing VPC by id) happens when `vpc_id` is given, and it then needs `account` too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from aws_cdk import RemovalPolicy
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parents[2]
# The Lambda package and the executor bundle both carry chalicelib/, so a pools file deployed
# with them must live there; the app finds it at the same relative path.
POOLS_DIR = REPO_ROOT / "chalicelib" / "config"
DEFAULT_REGION = "us-east-1"
# Amazon Linux 2023 (x86_64): public SSM parameter, resolved by CloudFormation at deploy time.
AL2023_AMI_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"


class HostSettings(BaseModel):
    """Executor hosts of one pool (one launch template + Auto Scaling group per pool)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    instance_type: str = "m6i.large"
    # Exactly one image source: an AMI id (e.g. the Packer-built executor AMI) or an SSM parameter.
    ami_id: str | None = Field(default=None, pattern=r"^ami-[0-9a-f]{8,17}$")
    ami_ssm_parameter: str | None = AL2023_AMI_PARAMETER
    root_device_name: str = "/dev/xvda"  # Amazon Linux's; check yours for another AMI
    volume_gb: int = Field(default=50, ge=8, le=16384)
    # None: the pool's max_runners (at least one runner per host); the scaler sets desired.
    max_hosts: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_image(self) -> HostSettings:
        if (self.ami_id is None) == (self.ami_ssm_parameter is None):
            raise ValueError("set exactly one of ami_id, ami_ssm_parameter")
        return self


class StageSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,19}$")
    prod: bool = False
    account: str | None = Field(default=None, pattern=r"^\d{12}$")
    region: str = DEFAULT_REGION
    # Explicit AZs keep synth free of account lookups; default: <region>a, <region>b.
    availability_zones: tuple[str, ...] = ()
    # An existing VPC (looked up: needs account). None: the stack creates one.
    vpc_id: str | None = Field(default=None, pattern=r"^vpc-[0-9a-f]{8,17}$")
    # "public": hosts get public IPs (no NAT cost; their security group admits nothing in);
    # "private": hosts behind NAT (`nat_gateways` of them when the stack makes the VPC).
    host_subnets: Literal["public", "private"] = "public"
    nat_gateways: int = Field(default=0, ge=0)
    pools_file: Path = POOLS_DIR / "pools.toml"
    api_throttle_rate: float = Field(default=50.0, gt=0)
    api_throttle_burst: int = Field(default=100, ge=1)
    webhook_memory_mb: int = Field(default=512, ge=128, le=10240)
    # Below the app's delivery lease (30 s), so a live attempt is never taken over.
    webhook_timeout_s: int = Field(default=25, ge=1, lt=30)
    log_retention_days: Literal[7, 14, 30, 90, 180, 365] = 30
    hosts: HostSettings = HostSettings()
    # Per-pool overrides of `hosts`, by pool name.
    pool_hosts: dict[str, HostSettings] = Field(default_factory=dict)

    @field_validator("pools_file")
    @classmethod
    def _pools_inside_package(cls, value: Path) -> Path:
        path = value if value.is_absolute() else REPO_ROOT / value
        path = path.resolve()
        if not path.is_relative_to(POOLS_DIR):
            raise ValueError(f"pools file {path} must be under {POOLS_DIR} to be deployed")
        return path

    @model_validator(mode="before")
    @classmethod
    def _default_zones(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("availability_zones"):
            region = data.get("region") or DEFAULT_REGION
            data = {**data, "availability_zones": (f"{region}a", f"{region}b")}
        return data

    @model_validator(mode="after")
    def _check(self) -> StageSettings:
        if len(self.availability_zones) < 2:
            raise ValueError("give at least two availability zones")
        if any(not az.startswith(self.region) for az in self.availability_zones):
            raise ValueError(f"availability zones must be in {self.region}")
        if self.host_subnets == "private" and not self.vpc_id and self.nat_gateways < 1:
            raise ValueError("private host subnets in a new VPC need nat_gateways >= 1")
        if self.vpc_id and not self.account:
            raise ValueError("vpc_id needs account: an existing VPC is looked up")
        return self

    @property
    def prefix(self) -> str:
        """Name prefix of every named resource of the stage."""
        return f"runnerhub-{self.name}-"

    @property
    def stack_name(self) -> str:
        return f"runnerhub-{self.name}"

    @property
    def pools_relative_path(self) -> str:
        """The pools file's path relative to the repo root (= the Lambda and bundle root)."""
        return self.pools_file.relative_to(REPO_ROOT).as_posix()

    def host_settings(self, pool: str) -> HostSettings:
        return self.pool_hosts.get(pool, self.hosts)


def removal_policy(stage: StageSettings) -> RemovalPolicy:
    """Prod keeps data, keys, secrets and logs when the stack goes; dev cleans up."""
    return RemovalPolicy.RETAIN if stage.prod else RemovalPolicy.DESTROY


DEFAULT_STAGES: dict[str, dict[str, Any]] = {
    "dev": {"name": "dev"},
    "prod": {
        "name": "prod",
        "prod": True,
        "host_subnets": "private",
        "nat_gateways": 2,
        "log_retention_days": 365,
        "api_throttle_rate": 200.0,
        "api_throttle_burst": 400,
    },
}

# CDK context keys (`cdk synth -c region=eu-west-1 ...`) that override every selected stage.
CONTEXT_KEYS = (
    "account",
    "region",
    "availability_zones",
    "vpc_id",
    "host_subnets",
    "nat_gateways",
    "pools_file",
)


def stage_settings(name: str, overrides: dict[str, Any] | None = None) -> StageSettings:
    if name not in DEFAULT_STAGES:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(DEFAULT_STAGES)}")
    return StageSettings.model_validate({**DEFAULT_STAGES[name], **(overrides or {})})


def overrides_from_context(get: Any) -> dict[str, Any]:
    """Read overrides with `get(key)` (e.g. `app.node.try_get_context`); lists may be CSV."""
    overrides: dict[str, Any] = {}
    for key in CONTEXT_KEYS:
        value = get(key)
        if value in (None, ""):
            continue
        if key == "availability_zones" and isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        overrides[key] = value
    return overrides
