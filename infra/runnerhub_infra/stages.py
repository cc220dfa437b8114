"""Stage settings: account-independent defaults for `dev` and `prod`, plus CDK context overrides.

Everything here is known without an AWS account, so `make synth` works offline; the only lookup
(an existing VPC by id) happens when `vpc_id` is given, and it then needs `account` too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from aws_cdk import RemovalPolicy
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parents[2]
# The Lambda package and the executor bundle both carry chalicelib/, so a pools file deployed
# with them must live there; the app finds it at the same relative path.
POOLS_DIR = REPO_ROOT / "chalicelib" / "config"
# Deployed stages default to the production example (images by digest from ECR, a real scope);
# the demo file (pools.toml) is refused by runnerhub_infra.pool_checks.
PRODUCTION_POOLS_FILE = POOLS_DIR / "pools.production.example.toml"
DEFAULT_REGION = "us-east-1"
# Debian 12 (x86_64), the official AMI: public SSM parameter, resolved at deploy time. The same
# base as the Image Builder recipe, so the user-data fallback installs onto what the AMI starts
# from (and what scripts/install-executor.sh is tested on).
DEBIAN12_AMI_PARAMETER = "/aws/service/debian/release/bookworm/latest/amd64"
# GitHub waits 10 s for a webhook answer, then records the delivery as failed
# (docs.github.com, "Handling failed webhook deliveries"); API Gateway and a cold start come on
# top of the function's own time, so the function stops well before.
GITHUB_WEBHOOK_TIMEOUT_S = 10
WEBHOOK_TIMEOUT_S = 8


class HostSettings(BaseModel):
    """Executor hosts of one pool (one launch template + Auto Scaling group per pool).

    The group launches from a mixed-instances policy: `instance_types` (the first is the launch
    template's own, and the preferred on-demand type), on demand only by default, or with `spot`
    Spot capacity above `on_demand_base` on-demand hosts, `on_demand_percent_above_base` of the
    rest on demand. `instance_type` (one type) is the older spelling of a one-type list."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Checked against the pool's runner size x slots (runnerhub_infra.pool_checks.INSTANCE_TYPES).
    instance_types: tuple[str, ...] = ("m6i.xlarge",)
    # Runners per host (RUNNERHUB_SLOTS on the host). None: as many of the pool's runners as fit
    # the SMALLEST type of the mix (pool_checks.host_slots), since any host may be that type.
    slots: int | None = Field(default=None, ge=1, le=256)
    spot: bool = False
    # With spot: hosts always on demand (the first ones the group launches), then this share
    # of the hosts above them on demand, the rest Spot.
    on_demand_base: int = Field(default=0, ge=0)
    on_demand_percent_above_base: int = Field(default=0, ge=0, le=100)
    # Exactly one image source: the executor AMI (built by the Image Builder pipeline of the
    # runnerhub-images stack: Docker, the daemon and the runner images already there) or an SSM
    # parameter of a base AMI, onto which user data installs everything at boot (slower).
    ami_id: str | None = Field(default=None, pattern=r"^ami-[0-9a-f]{8,17}$")
    ami_ssm_parameter: str | None = DEBIAN12_AMI_PARAMETER
    root_device_name: str = "/dev/xvda"  # Debian's AMIs (and the executor AMI built from them)
    volume_gb: int = Field(default=50, ge=8, le=16384)
    # None: enough hosts for the pool's max_runners, ceil(max_runners / slots).
    max_hosts: int | None = Field(default=None, ge=1)
    # The group's MinSize: hosts kept up with no demand (warm). At most the group's maximum
    # (checked here against max_hosts, and by pool_checks against the derived maximum).
    min_hosts: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _one_type_spelling(cls, data: Any) -> Any:
        if isinstance(data, dict) and "instance_type" in data:
            if "instance_types" in data:
                raise ValueError("set instance_type (one type) or instance_types, not both")
            one = data["instance_type"]
            data = {key: value for key, value in data.items() if key != "instance_type"}
            data["instance_types"] = (one,)
        return data

    @model_validator(mode="before")
    @classmethod
    def _ami_id_replaces_parameter(cls, data: Any) -> Any:
        # Giving ami_id (e.g. `-c ami_id=ami-...`) means "not the default base image".
        if isinstance(data, dict) and data.get("ami_id") and "ami_ssm_parameter" not in data:
            data = {**data, "ami_ssm_parameter": None}
        return data

    @model_validator(mode="after")
    def _min_within_max(self) -> HostSettings:
        if self.max_hosts is not None and self.min_hosts > self.max_hosts:
            raise ValueError(f"min_hosts {self.min_hosts} is above max_hosts {self.max_hosts}")
        return self

    @model_validator(mode="after")
    def _one_image(self) -> HostSettings:
        if (self.ami_id is None) == (self.ami_ssm_parameter is None):
            raise ValueError("set exactly one of ami_id, ami_ssm_parameter")
        return self

    @model_validator(mode="after")
    def _mix(self) -> HostSettings:
        if not self.instance_types:
            raise ValueError("instance_types: give at least one instance type")
        twice = sorted({t for t in self.instance_types if self.instance_types.count(t) > 1})
        if twice:
            raise ValueError(f"instance_types: {', '.join(twice)} listed more than once")
        if not self.spot and (self.on_demand_base or self.on_demand_percent_above_base):
            raise ValueError("on_demand_base and on_demand_percent_above_base apply with "
                             "spot = true only (without Spot every host is on demand)")
        return self

    @property
    def instance_type(self) -> str:
        """The launch template's type: the first of the mix."""
        return self.instance_types[0]

    def hosts_for(self, max_runners: int, slots: int) -> int:
        """The group's maximum: `max_hosts`, else enough hosts of `slots` for max_runners."""
        return self.max_hosts or math.ceil(max_runners / slots)


# Every RunnerHub function is invoked through this alias only; CodeDeploy moves it from one
# version to the next (rollouts.py).
LIVE_ALIAS = "live"
# CodeDeploy's predefined Lambda canaries (CodeDeployDefault.Lambda<name>, "Deployment
# configurations on an AWS Lambda compute platform"): any other percent and interval is a custom
# configuration the stack creates (rollouts.py).
PREDEFINED_LAMBDA_CANARIES = frozenset({(10, 5), (10, 10), (10, 15), (10, 30)})
# CodeDeploy's limit on a time-based canary's interval.
MAX_CANARY_MINUTES = 2880


class LambdaCanary(BaseModel):
    """How a new version of a function takes its traffic (rollouts.py): `percent` of the
    invocations through its `live` alias for `minutes`, then all of them, unless an alarm goes
    off first (then CodeDeploy moves the alias back). Never all at once: 1 to 99 %."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    percent: int = Field(default=10, ge=1, le=99)
    minutes: int = Field(default=5, ge=1, le=MAX_CANARY_MINUTES)

    @property
    def name(self) -> str:
        """CodeDeploy's own spelling (Canary10Percent5Minutes)."""
        return f"Canary{self.percent}Percent{self.minutes}Minutes"

    @property
    def predefined(self) -> bool:
        return (self.percent, self.minutes) in PREDEFINED_LAMBDA_CANARIES


class SecretSettings(BaseModel):
    """Where the deployables read their secrets (docs/secrets.md): Secrets Manager (the stack
    creates both secrets) or Vault with AWS IAM auth (each deployable logs in as its own role,
    `runnerhub-<stage>-<deployable>`; no token is ever put in an environment variable)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["secretsmanager", "vault"] = "secretsmanager"
    vault_addr: str | None = Field(default=None, pattern=r"^https?://")
    vault_aws_mount: str = "aws"
    # None: Vault infers the role from the IAM role's name (runnerhub-<stage>-<deployable>).
    vault_aws_role: str | None = None
    vault_aws_header: str | None = None
    vault_kv_mount: str = "secret"
    vault_namespace: str | None = None
    # KV v2 paths (under vault_kv_mount); default runnerhub/<stage>/webhook-secret, .../github-app.
    webhook_secret_path: str | None = None
    github_app_secret_path: str | None = None

    @model_validator(mode="after")
    def _vault_complete(self) -> SecretSettings:
        if self.backend == "vault" and not self.vault_addr:
            raise ValueError("secrets.backend vault needs secrets.vault_addr")
        return self

    def environment(self) -> dict[str, str]:
        """The RUNNERHUB_SECRET_BACKEND / RUNNERHUB_VAULT_* variables of every deployable."""
        if self.backend != "vault":
            return {"RUNNERHUB_SECRET_BACKEND": "secretsmanager"}
        variables = {
            "RUNNERHUB_SECRET_BACKEND": "vault",
            "RUNNERHUB_VAULT_ADDR": self.vault_addr,
            "RUNNERHUB_VAULT_AUTH": "aws-iam",
            "RUNNERHUB_VAULT_AWS_MOUNT": self.vault_aws_mount,
            "RUNNERHUB_VAULT_KV_MOUNT": self.vault_kv_mount,
            "RUNNERHUB_VAULT_AWS_ROLE": self.vault_aws_role,
            "RUNNERHUB_VAULT_AWS_HEADER": self.vault_aws_header,
            "RUNNERHUB_VAULT_NAMESPACE": self.vault_namespace,
        }
        return {key: value for key, value in variables.items() if value}


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
    pools_file: Path = PRODUCTION_POOLS_FILE
    api_throttle_rate: float = Field(default=50.0, gt=0)
    api_throttle_burst: int = Field(default=100, ge=1)
    # The management API's own throttle (management_api.py), apart from the webhook's above.
    management_api_throttle_rate: float = Field(default=20.0, gt=0)
    management_api_throttle_burst: int = Field(default=40, ge=1)
    # An optional custom domain for both APIs (a REGIONAL ACM certificate in `region`): the
    # management API at its root, the webhook under /webhook. None: their own URLs.
    api_domain_name: str | None = Field(
        default=None, max_length=253,
        pattern=r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
    api_certificate_arn: str | None = Field(
        default=None, pattern=r"^arn:aws[a-z-]*:acm:[a-z0-9-]+:\d{12}:certificate/[0-9a-f-]+$")
    # The Cognito hosted UI's domain prefix (unique in the region; Cognito refuses one with
    # "aws", "amazon" or "cognito" in it). None: runnerhub-<stage>-<account id>.
    auth_domain_prefix: str | None = Field(
        default=None, pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
    webhook_memory_mb: int = Field(default=512, ge=128, le=10240)
    # Below GitHub's 10 s (an answer after it is a failed delivery anyway) and so below the
    # app's delivery lease (30 s): a live attempt is never taken over.
    webhook_timeout_s: int = Field(default=WEBHOOK_TIMEOUT_S, ge=1, lt=GITHUB_WEBHOOK_TIMEOUT_S)
    log_retention_days: Literal[7, 14, 30, 90, 180, 365] = 30
    hosts: HostSettings = HostSettings()
    # Per-pool overrides of `hosts`, by pool name.
    pool_hosts: dict[str, HostSettings] = Field(default_factory=dict)
    secrets: SecretSettings = SecretSettings()
    # The predictive floor's optional hourly cost cap, per pool: at most cap / host cost hosts
    # (the scaler's lookup and the trainer's plan, so its warm runners too: docs/scaling.md).
    # 0: no cap. A cap needs the host's hourly price (on demand, the pool's instance type).
    forecast_hourly_cap: float = Field(default=0.0, ge=0)
    host_hourly_cost: float = Field(default=0.0, ge=0)
    # Subscribed (e-mail, confirmed by its owner) to the stage's alarm topic; None: none.
    alarm_email: str | None = Field(default=None, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
    # Every function's rollout (rollouts.py): a canary, never all at once.
    lambda_canary: LambdaCanary = LambdaCanary()

    @field_validator("pools_file")
    @classmethod
    def _pools_inside_package(cls, value: Path) -> Path:
        path = value if value.is_absolute() else REPO_ROOT / value
        path = path.resolve()
        if not path.is_relative_to(POOLS_DIR):
            raise ValueError(f"pools file {path} must be under {POOLS_DIR} to be deployed")
        return path

    @field_validator("auth_domain_prefix")
    @classmethod
    def _prefix_allowed(cls, value: str | None) -> str | None:
        reserved = [word for word in ("aws", "amazon", "cognito") if value and word in value]
        if reserved:
            raise ValueError(f"Cognito refuses a domain prefix containing {reserved[0]!r}")
        return value

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
        if self.forecast_hourly_cap > 0 and self.host_hourly_cost <= 0:
            raise ValueError("forecast_hourly_cap needs host_hourly_cost (the price of a host "
                             "an hour) to count the hosts it pays for")
        if (self.api_domain_name is None) != (self.api_certificate_arn is None):
            raise ValueError("api_domain_name and api_certificate_arn go together (a custom "
                             "domain needs its certificate)")
        return self

    def forecast_cap_environment(self) -> dict[str, str]:
        """The cost cap's variables for the scaler and the trainer (the same names)."""
        if not self.forecast_hourly_cap:
            return {}
        return {"RUNNERHUB_SCALER_FORECAST_HOURLY_CAP": str(self.forecast_hourly_cap),
                "RUNNERHUB_SCALER_HOST_HOURLY_COST": str(self.host_hourly_cost)}

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

    def role_name(self, deployable: str) -> str:
        """Stable IAM role names (runnerhub-<stage>-webhook, -reconciler, -executor-<pool>):
        a Vault AWS-auth role binds to the ARN, which a generated name would change."""
        return f"{self.prefix}{deployable}"

    @property
    def webhook_secret_id(self) -> str:
        return self.secrets.webhook_secret_path or f"runnerhub/{self.name}/webhook-secret"

    @property
    def github_app_secret_id(self) -> str:
        return self.secrets.github_app_secret_path or f"runnerhub/{self.name}/github-app"


def removal_policy(stage: StageSettings) -> RemovalPolicy:
    """Prod keeps data, keys, secrets and logs when the stack goes; dev cleans up."""
    return RemovalPolicy.RETAIN if stage.prod else RemovalPolicy.DESTROY


# Hosts of the production example's pools (pools.production.example.toml), checked at synth
# against the runner sizes; slots are what fits the smallest type of each mix: linux-small
# 4 x 1 vCPU/3 GiB on 4 vCPU/16 GiB types; linux-large 4 x 2 vCPU/7 GiB on 8 vCPU/32 GiB types;
# gpu 1 x 4 vCPU/14 GiB/1 GPU on g5.xlarge (4 vCPU, 16 GiB, one A10G), on demand. The Linux
# pools run on Spot across three types of one size (capacity-optimized), prod keeping one
# on-demand host and a quarter of the rest on demand. Keyed by pool name: with pools of other
# names, edit these (synth refuses settings for a pool the pools file lacks).
GENERAL_TYPES = ("m6i.xlarge", "m7i.xlarge", "m6a.xlarge")
LARGE_TYPES = ("m6i.2xlarge", "m7i.2xlarge", "m6a.2xlarge")
EXAMPLE_HOSTS: dict[str, Any] = {"instance_types": GENERAL_TYPES, "spot": True}
EXAMPLE_POOL_HOSTS: dict[str, dict[str, Any]] = {
    "linux-large": {"instance_types": LARGE_TYPES, "spot": True, "volume_gb": 100},
    "gpu": {"instance_type": "g5.xlarge", "volume_gb": 200},
}
PROD_ON_DEMAND = {"on_demand_base": 1, "on_demand_percent_above_base": 25}

DEFAULT_STAGES: dict[str, dict[str, Any]] = {
    # dev caps its predictive floor at $2 an hour a pool: 10 m6i.xlarge hosts on demand
    # (us-east-1, $0.192 an hour).
    # dev's canary: half the invocations for 3 minutes. Its traffic is a few test workflows
    # and the once-a-minute reconciler and scaler runs: at 10 % a broken version would most
    # likely get no invocation at all before it took everything; at 50 % each scheduled
    # function runs it about 1.5 times out of 3. Three minutes leave the alias's Errors alarm
    # (1-minute periods, metrics a minute late) two periods to go off: a shorter wait than
    # prod's, since nobody's jobs depend on dev.
    "dev": {"name": "dev", "hosts": EXAMPLE_HOSTS, "pool_hosts": EXAMPLE_POOL_HOSTS,
            "forecast_hourly_cap": 2.0, "host_hourly_cost": 0.192,
            "lambda_canary": {"percent": 50, "minutes": 3}},
    "prod": {
        "name": "prod",
        "hosts": {**EXAMPLE_HOSTS, **PROD_ON_DEMAND},
        "pool_hosts": {**EXAMPLE_POOL_HOSTS,
                       "linux-large": {**EXAMPLE_POOL_HOSTS["linux-large"], **PROD_ON_DEMAND}},
        "prod": True,
        "host_subnets": "private",
        "nat_gateways": 2,
        "log_retention_days": 365,
        "api_throttle_rate": 200.0,
        "api_throttle_burst": 400,
        # CodeDeploy's Canary10Percent5Minutes: a tenth of GitHub's deliveries try the new
        # webhook for 5 minutes (enough traffic for its alarms to speak), the rest stay safe.
        "lambda_canary": {"percent": 10, "minutes": 5},
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
    "ami_id",
    "secret_backend",
    "vault_addr",
    "alarm_email",
    "api_domain_name",
    "api_certificate_arn",
    "auth_domain_prefix",
)


def stage_settings(name: str, overrides: dict[str, Any] | None = None) -> StageSettings:
    if name not in DEFAULT_STAGES:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(DEFAULT_STAGES)}")
    overrides = dict(overrides or {})
    ami_id = overrides.pop("ami_id", None)
    data = {**DEFAULT_STAGES[name], **overrides}
    if ami_id:
        # The executor AMI (`-c ami_id=ami-...`) for every pool's hosts: the base settings and
        # each per-pool override.
        data["hosts"] = {**data.get("hosts", {}), "ami_id": ami_id, "ami_ssm_parameter": None}
        data["pool_hosts"] = {
            pool: {**host, "ami_id": ami_id, "ami_ssm_parameter": None}
            for pool, host in data.get("pool_hosts", {}).items()
        }
    return StageSettings.model_validate(data)


def overrides_from_context(get: Any) -> dict[str, Any]:
    """Read overrides with `get(key)` (e.g. `app.node.try_get_context`); lists may be CSV."""
    overrides: dict[str, Any] = {}
    for key in CONTEXT_KEYS:
        value = get(key)
        if value in (None, ""):
            continue
        if key == "availability_zones" and isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        if key in ("secret_backend", "vault_addr"):
            secrets = overrides.setdefault("secrets", {})
            secrets["backend" if key == "secret_backend" else key] = value
        else:
            overrides[key] = value
    return overrides
