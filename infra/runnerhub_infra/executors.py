"""Executor hosts: a VPC over two or more AZs, and per pool a launch template + Auto Scaling group.

Each host runs `python -m executor` (systemd) for its pool. The code comes as an S3 asset (a
bundle of executor/, chalicelib/ and the requirements), so a code change makes a new launch
template version. Instance metadata needs IMDSv2 tokens with a hop limit of 1: a runner container
is one hop further and cannot reach the host role's credentials.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import aws_cdk as cdk
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3_assets as s3_assets
from constructs import Construct

from chalicelib import resources
from chalicelib.pools import Pool, PoolConfig
from chalicelib.settings import EXECUTOR_DRAIN_TIMEOUT_S
from runnerhub_infra.data import Data
from runnerhub_infra.secrets import Secrets
from runnerhub_infra.stages import REPO_ROOT, StageSettings

APP_DIR = "/opt/runnerhub/app"
VENV_DIR = "/opt/runnerhub/venv"
ENV_FILE = "/etc/runnerhub/executor.env"
SERVICE = "runnerhub-executor"
# The executor's default drain timeout; systemd waits a minute longer before SIGKILL.
DRAIN_TIMEOUT_S = int(EXECUTOR_DRAIN_TIMEOUT_S)
BUNDLE_PATHS = (
    "executor",
    "chalicelib",
    "requirements.txt",
    "requirements-executor.txt",
    "constraints.txt",
)
EXECUTOR_QUEUE_ACTIONS = [
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibility",
    "sqs:SendMessage",
    "sqs:GetQueueUrl",
    "sqs:GetQueueAttributes",
]
EXECUTOR_TABLE_ACTIONS = [
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:DeleteItem",
    "dynamodb:Query",
]


def stage_bundle(target: Path) -> Path:
    """Copy what a host runs into `target` (replaced), without caches, for a stable asset hash."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for relative in BUNDLE_PATHS:
        source = REPO_ROOT / relative
        if source.is_dir():
            shutil.copytree(source, target / relative, ignore=ignore, dirs_exist_ok=True)
        elif source.is_file():
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / relative)
    return target


class Executors(Construct):
    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        stage: StageSettings,
        pools: PoolConfig,
        data: Data,
        secrets: Secrets,
        workdir: Path,
    ) -> None:
        super().__init__(scope, id)
        self.stage = stage
        self.data = data
        self.secrets = secrets
        unknown = sorted(set(stage.pool_hosts) - set(pools.names))
        if unknown:
            raise ValueError(f"pool_hosts for pools not in the pools file: {', '.join(unknown)}")
        self.vpc = self._vpc()
        self.subnets = ec2.SubnetSelection(
            subnet_type=ec2.SubnetType.PUBLIC
            if stage.host_subnets == "public"
            else ec2.SubnetType.PRIVATE_WITH_EGRESS
        )
        self.security_group = ec2.SecurityGroup(
            self,
            "HostSecurityGroup",
            vpc=self.vpc,
            description="RunnerHub executor hosts: nothing in (Session Manager), all out",
            allow_all_outbound=True,
        )
        self.bundle = s3_assets.Asset(
            self, "Bundle", path=str(stage_bundle(workdir / "executor-bundle"))
        )
        self.roles: dict[str, iam.Role] = {}
        self.launch_templates: dict[str, ec2.LaunchTemplate] = {}
        self.groups: dict[str, autoscaling.AutoScalingGroup] = {}
        for pool in pools.pools:
            self._pool_hosts(pool)

    def _vpc(self) -> ec2.IVpc:
        if self.stage.vpc_id:
            return ec2.Vpc.from_lookup(self, "Vpc", vpc_id=self.stage.vpc_id)
        subnets = [
            ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=22)
        ]
        if self.stage.nat_gateways:
            subnets.append(
                ec2.SubnetConfiguration(
                    name="hosts", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS, cidr_mask=20
                )
            )
        vpc = ec2.Vpc(
            self,
            "Vpc",
            ip_addresses=ec2.IpAddresses.cidr("10.80.0.0/16"),
            # Explicit AZs: no account lookup at synth, and the same subnets in every synth.
            availability_zones=list(self.stage.availability_zones),
            nat_gateways=self.stage.nat_gateways,
            subnet_configuration=subnets,
            # Free gateway endpoints: DynamoDB and S3 (the code bundle) traffic skips the NAT.
            gateway_endpoints={
                "S3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3),
                "DynamoDB": ec2.GatewayVpcEndpointOptions(
                    service=ec2.GatewayVpcEndpointAwsService.DYNAMODB
                ),
            },
        )
        # cfn-lint W3010 warns on hardcoded AZs; they are deliberate (see above).
        for subnet in vpc.public_subnets + vpc.private_subnets:
            subnet.node.default_child.add_metadata(
                "cfn-lint", {"config": {"ignore_checks": ["W3010"]}}
            )
        return vpc

    def _role(self, pool: Pool) -> iam.Role:
        queues = self.data.queues[pool.name]
        tables = [
            self.data.tables[spec.logical_name]
            for spec in (resources.JOBS_TABLE, resources.RUNNERS_TABLE, resources.HOSTS_TABLE)
        ]
        hosts_table = self.data.tables[resources.HOSTS_TABLE.logical_name]
        statements = [
            iam.PolicyStatement(actions=EXECUTOR_QUEUE_ACTIONS, resources=[queues.queue.queue_arn]),
            iam.PolicyStatement(
                actions=["sqs:SendMessage", "sqs:GetQueueUrl"],
                resources=[queues.dead_letter_queue.queue_arn],
            ),
            iam.PolicyStatement(
                actions=EXECUTOR_TABLE_ACTIONS,
                resources=[
                    arn
                    for table in tables
                    for arn in (table.table_arn, f"{table.table_arn}/index/*")
                ],
            ),
            # Heartbeats: one item per host, read whole to find dead hosts (takeover).
            iam.PolicyStatement(actions=["dynamodb:Scan"], resources=[hosts_table.table_arn]),
            *self.secrets.read_statements(self.secrets.github_app_secret),
            iam.PolicyStatement(
                actions=["s3:GetObject"],
                resources=[self.bundle.bucket.arn_for_objects(self.bundle.s3_object_key)],
            ),
        ]
        return iam.Role(
            self,
            f"{pool.name}-role",
            description=f"RunnerHub {self.stage.name}: executor hosts of pool {pool.name}",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            managed_policies=[
                # Session Manager instead of SSH: no inbound port, no key pairs.
                iam.ManagedPolicy.from_aws_managed_policy_name("AmazonSSMManagedInstanceCore")
            ],
            inline_policies={"executor": iam.PolicyDocument(statements=statements)},
        )

    def _image(self, pool: Pool) -> ec2.IMachineImage:
        host = self.stage.host_settings(pool.name)
        if host.ami_id:
            return ec2.MachineImage.generic_linux({self.stage.region: host.ami_id})
        return ec2.MachineImage.from_ssm_parameter(
            host.ami_ssm_parameter, os=ec2.OperatingSystemType.LINUX
        )

    def _environment(self, pool: Pool) -> dict[str, str]:
        return {
            "AWS_DEFAULT_REGION": self.stage.region,
            "RUNNERHUB_STAGE": self.stage.name,
            "RUNNERHUB_EXECUTOR_POOLS": pool.name,
            "RUNNERHUB_POOLS_FILE": f"{APP_DIR}/{self.stage.pools_relative_path}",
            "RUNNERHUB_JOBS_TABLE": self.data.table_name(resources.JOBS_TABLE),
            "RUNNERHUB_RUNNERS_TABLE": self.data.table_name(resources.RUNNERS_TABLE),
            "RUNNERHUB_HOSTS_TABLE": self.data.table_name(resources.HOSTS_TABLE),
            "RUNNERHUB_QUEUE_PREFIX": self.data.queue_prefix,
            "RUNNERHUB_GITHUB_APP_SECRET_ID": self.secrets.github_app_secret_name,
        }

    def _user_data(self, pool: Pool) -> ec2.UserData:
        user_data = ec2.UserData.for_linux()
        bundle_zip = "/tmp/runnerhub-executor.zip"
        env_lines = "\n".join(f"{key}={value}" for key, value in self._environment(pool).items())
        user_data.add_commands(
            "set -euo pipefail",
            # A prebuilt executor AMI (Packer) has these already; Amazon Linux 2023 has not.
            "command -v docker >/dev/null || dnf install -y docker",
            "command -v python3.11 >/dev/null || dnf install -y python3.11 python3.11-pip",
            "systemctl enable --now docker",
        )
        user_data.add_s3_download_command(
            bucket=self.bundle.bucket, bucket_key=self.bundle.s3_object_key, local_file=bundle_zip
        )
        user_data.add_commands(
            f"rm -rf {APP_DIR} && mkdir -p {APP_DIR} /etc/runnerhub",
            f"python3.11 -m zipfile -e {bundle_zip} {APP_DIR}",
            f"test -x {VENV_DIR}/bin/python || python3.11 -m venv {VENV_DIR}",
            # Pinned, transitive pins included: hosts run what the tests ran.
            f"{VENV_DIR}/bin/pip install --quiet -c {APP_DIR}/constraints.txt"
            f" -r {APP_DIR}/requirements-executor.txt",
            f"cat > {ENV_FILE} <<'EOF'\n{env_lines}\nEOF",
            f"cat > /etc/systemd/system/{SERVICE}.service <<'EOF'\n{_unit(pool)}EOF",
            "systemctl daemon-reload",
            f"systemctl enable --now {SERVICE}",
        )
        return user_data

    def _pool_hosts(self, pool: Pool) -> None:
        host = self.stage.host_settings(pool.name)
        role = self._role(pool)
        launch_template = ec2.LaunchTemplate(
            self,
            f"{pool.name}-lt",
            launch_template_name=f"{self.stage.prefix}{pool.name}",
            instance_type=ec2.InstanceType(host.instance_type),
            machine_image=self._image(pool),
            role=role,
            security_group=self.security_group,
            user_data=self._user_data(pool),
            http_endpoint=True,
            http_tokens=ec2.LaunchTemplateHttpTokens.REQUIRED,
            http_put_response_hop_limit=1,
            associate_public_ip_address=self.stage.host_subnets == "public",
            block_devices=[
                ec2.BlockDevice(
                    device_name=host.root_device_name,
                    volume=ec2.BlockDeviceVolume.ebs(
                        host.volume_gb,
                        encrypted=True,
                        volume_type=ec2.EbsDeviceVolumeType.GP3,
                        delete_on_termination=True,
                    ),
                )
            ],
        )
        group = autoscaling.AutoScalingGroup(
            self,
            f"{pool.name}-asg",
            auto_scaling_group_name=f"{self.stage.prefix}{pool.name}",
            vpc=self.vpc,
            vpc_subnets=self.subnets,
            launch_template=launch_template,
            # No desired capacity: the scaler owns it, and a deploy must not reset it.
            min_capacity=0,
            max_capacity=host.max_hosts or pool.max_runners,
            group_metrics=[autoscaling.GroupMetrics.all()],
        )
        cdk.Tags.of(group).add("runnerhub:pool", pool.name)
        cdk.Tags.of(group).add("runnerhub:stage", self.stage.name)
        self.roles[pool.name] = role
        self.launch_templates[pool.name] = launch_template
        self.groups[pool.name] = group


def _unit(pool: Pool) -> str:
    return f"""[Unit]
Description=RunnerHub executor (pool {pool.name})
Wants=network-online.target
After=network-online.target docker.service
Requires=docker.service

[Service]
EnvironmentFile={ENV_FILE}
WorkingDirectory={APP_DIR}
ExecStart={VENV_DIR}/bin/python -m executor
Restart=always
RestartSec=5
# `systemctl stop` sends SIGTERM: the executor drains (RUNNERHUB_DRAIN_TIMEOUT_S, 600 s) and
# exits 0; give it that long before SIGKILL (docs/operations.md).
TimeoutStopSec={DRAIN_TIMEOUT_S + 60}

[Install]
WantedBy=multi-user.target
"""
