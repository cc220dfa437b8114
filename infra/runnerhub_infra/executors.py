"""Executor hosts: a VPC over two or more AZs, and per pool a launch template + Auto Scaling group.

Each host runs `python -m executor` (systemd) for its pool, installed by
scripts/install-executor.sh (infra/runnerhub_infra/host_install.py writes the user data):
from the executor AMI (`ami_id`: everything installed, boot only writes the environment file
and starts the service) or, by default, on Debian 12's official AMI where user data downloads the
code bundle (an S3 asset: a code change makes a new launch template version) and installs at
boot. Instance metadata needs IMDSv2 tokens with a hop limit of 1: a runner container is one hop
further and cannot reach the host role's credentials. Runner images are pulled from this
account's ECR (the runnerhub-images stack) through docker-credential-ecr-login.
"""

from __future__ import annotations

from pathlib import Path

import aws_cdk as cdk
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3_assets as s3_assets
from constructs import Construct

from chalicelib import resources
from chalicelib.history import FORECAST_PREFIX
from chalicelib.pools import Pool, PoolConfig
from chalicelib.settings import EXECUTOR_LIFECYCLE_HEARTBEAT_S
from runnerhub_infra import host_install
from runnerhub_infra.data import Data
from runnerhub_infra.ecr import pull_statements, registry_host, scan_statements
from runnerhub_infra.pool_checks import host_slots, max_hosts
from runnerhub_infra.secrets import Secrets
from runnerhub_infra.stages import StageSettings

# The Docker data volume's device in the launch template (on Nitro it shows as an NVMe disk
# whose serial is the volume id; scripts/docker-storage.sh finds it as the one blank disk).
DOCKER_DEVICE_NAME = "/dev/sdf"
# Room for the pool's images and build cache besides the jobs' disks.
DOCKER_IMAGES_GB = 30


def docker_volume_gb(pool: Pool, slots: int) -> int:
    """Every slot's job at its full `disk_mb`, plus the images."""
    return DOCKER_IMAGES_GB + max(1, slots) * -(-pool.disk_mb // 1024)

APP_DIR = host_install.APP_DIR
# Exactly the calls the executor makes (tests/infra/test_iam_calls.py compares them with the
# calls recorded during the tests). Its pool's queue: receive, delete once served, extend the
# visibility of held messages, send re-demand, look the URL up.
# Where a host's CloudWatch agent sends the executor's log and EMF.
EXECUTOR_LOG_GROUP = "/runnerhub/{stage}/executor"
EXECUTOR_QUEUE_ACTIONS = [
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibility",
    "sqs:SendMessage",
    "sqs:GetQueueUrl",
]
# Conditional moves (UpdateItem, alone or in the claim's transaction with the host's record)
# and reads; a runner's record is put once, in one transaction with its pool's seat counter
# (PutItem: IAM checks each item of a transaction as its own action). Nothing is deleted
# (records expire by TTL).
EXECUTOR_TABLE_ACTIONS = {
    resources.JOBS_TABLE.logical_name: ["dynamodb:GetItem", "dynamodb:UpdateItem"],
    resources.RUNNERS_TABLE.logical_name: ["dynamodb:GetItem", "dynamodb:PutItem",
                                           "dynamodb:UpdateItem"],
    resources.HOSTS_TABLE.logical_name: ["dynamodb:GetItem", "dynamodb:UpdateItem"],
}
# Every ending the scaler did not choose (instance refresh, AZ rebalancing, a person, a Spot
# rebalance) waits on this hook while the daemon drains: it reads the hook and its group from
# RUNNERHUB_LIFECYCLE_HOOK / RUNNERHUB_ASG_NAME, sends a lifecycle heartbeat every
# RUNNERHUB_LIFECYCLE_HEARTBEAT_S (60 s) while jobs finish, for up to
# RUNNERHUB_LIFECYCLE_DRAIN_TIMEOUT_S (6 h), and completes the action. The hook's heartbeat
# timeout is ten daemon heartbeats: a few failed calls (throttling) do not end the hook, and a
# daemon that stopped answering releases the instance within 10 minutes (CONTINUE: terminate
# anyway). Auto Scaling keeps an instance waiting at most 100 heartbeat timeouts (here 16.7 h)
# or 48 h, whichever is smaller: above the daemon's lifecycle drain (tests/infra pins both).
LIFECYCLE_HOOK_NAME = "runnerhub-drain"
LIFECYCLE_HOOK_HEARTBEAT_TIMEOUT_S = 10 * int(EXECUTOR_LIFECYCLE_HEARTBEAT_S)
# What the daemon calls on its own group only.
LIFECYCLE_ACTIONS = [
    "autoscaling:CompleteLifecycleAction",
    "autoscaling:RecordLifecycleActionHeartbeat",
]
# The audit log: new records only (never read, changed or removed by an executor).
EXECUTOR_AUDIT_ACTIONS = ["dynamodb:PutItem"]
# A dead host's claims and runners, found by host.
EXECUTOR_INDEXES = (
    (resources.JOBS_TABLE.logical_name, "by_host"),
    (resources.RUNNERS_TABLE.logical_name, "by_host"),
)


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
        repository_names: list[str],
    ) -> None:
        super().__init__(scope, id)
        self.stage = stage
        self.data = data
        self.secrets = secrets
        self.repository_names = repository_names
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
            self, "Bundle", path=str(host_install.stage_bundle(workdir / "executor-bundle"))
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
        tables = self.data.tables
        hosts_table = self.data.tables[resources.HOSTS_TABLE.logical_name]
        statements = [
            iam.PolicyStatement(actions=EXECUTOR_QUEUE_ACTIONS, resources=[queues.queue.queue_arn]),
            iam.PolicyStatement(
                actions=["sqs:SendMessage", "sqs:GetQueueUrl"],
                resources=[queues.dead_letter_queue.queue_arn],
            ),
            *(iam.PolicyStatement(actions=actions, resources=[tables[name].table_arn])
              for name, actions in EXECUTOR_TABLE_ACTIONS.items()),
            iam.PolicyStatement(
                actions=["dynamodb:Query"],
                resources=[f"{tables[name].table_arn}/index/{index}"
                           for name, index in EXECUTOR_INDEXES],
            ),
            # The CloudWatch agent ships the executor's log and its EMF into the pool's stage
            # group (executor/host/cloudwatch-agent.json); the group itself is the stack's.
            iam.PolicyStatement(
                actions=["logs:CreateLogStream", "logs:PutLogEvents"],
                resources=[cdk.Stack.of(self).format_arn(
                    service="logs", resource="log-group",
                    resource_name=f"{EXECUTOR_LOG_GROUP.format(stage=self.stage.name)}:*",
                    arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME)],
            ),
            # The runtime monitor's violation records (executor/monitor.py): appended, one
            # conditional put on a new key; the table's own policy denies every change.
            iam.PolicyStatement(
                actions=EXECUTOR_AUDIT_ACTIONS,
                resources=[tables[resources.AUDIT_TABLE.logical_name].table_arn]),
            # Heartbeats: one item per host, read whole to find dead hosts (takeover).
            iam.PolicyStatement(actions=["dynamodb:Scan"], resources=[hosts_table.table_arn]),
            # The trainer's forecast items (warm targets follow them), not the history itself.
            iam.PolicyStatement(
                actions=["dynamodb:GetItem"],
                resources=[tables[resources.HISTORY_TABLE.logical_name].table_arn],
                conditions={"ForAllValues:StringLike": {
                    "dynamodb:LeadingKeys": [f"{FORECAST_PREFIX}*"]}}),
            *self.secrets.read_statements(self.secrets.github_app_secret),
            iam.PolicyStatement(
                actions=["s3:GetObject"],
                resources=[self.bundle.bucket.arn_for_objects(self.bundle.s3_object_key)],
            ),
        ]
        # The drain hook of its own group (a host cannot complete another pool's actions).
        statements.append(iam.PolicyStatement(
            actions=LIFECYCLE_ACTIONS, resources=[group_arn(self, self.group_name(pool))]))
        # Runner images from the runnerhub-images stack's repositories.
        statements += pull_statements(cdk.Stack.of(self), self.repository_names)
        # Their scans, read before each start (executor/image_scan.py).
        statements += scan_statements(cdk.Stack.of(self), self.repository_names)
        return iam.Role(
            self,
            f"{pool.name}-role",
            role_name=self.stage.role_name(f"executor-{pool.name}"),
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
        host = self.stage.host_settings(pool.name)
        return {
            "AWS_DEFAULT_REGION": self.stage.region,
            "RUNNERHUB_STAGE": self.stage.name,
            "RUNNERHUB_EXECUTOR_POOLS": pool.name,
            "RUNNERHUB_SLOTS": str(host_slots(pool, host)),
            "RUNNERHUB_ASG_NAME": self.group_name(pool),
            "RUNNERHUB_LIFECYCLE_HOOK": LIFECYCLE_HOOK_NAME,
            "RUNNERHUB_POOLS_FILE": f"{APP_DIR}/{self.stage.pools_relative_path}",
            "RUNNERHUB_JOBS_TABLE": self.data.table_name(resources.JOBS_TABLE),
            "RUNNERHUB_RUNNERS_TABLE": self.data.table_name(resources.RUNNERS_TABLE),
            "RUNNERHUB_HOSTS_TABLE": self.data.table_name(resources.HOSTS_TABLE),
            "RUNNERHUB_HISTORY_TABLE": self.data.table_name(resources.HISTORY_TABLE),
            "RUNNERHUB_AUDIT_TABLE": self.data.table_name(resources.AUDIT_TABLE),
            "RUNNERHUB_QUEUE_PREFIX": self.data.queue_prefix,
            "RUNNERHUB_GITHUB_APP_SECRET_ID": self.secrets.github_app_secret_name,
            # docker credHelpers (ecr-login) for this registry: scripts/install-executor.sh.
            "RUNNERHUB_ECR_REGISTRY": registry_host(cdk.Stack.of(self)),
            **self.stage.secrets.environment(),
        }

    def _user_data(self, pool: Pool) -> ec2.UserData:
        host = self.stage.host_settings(pool.name)
        environment = self._environment(pool)
        user_data = ec2.UserData.for_linux()
        # The executor AMI has everything: write the environment file, start. Otherwise install
        # onto Debian 12 at boot from the bundle (the same script as the AMI's recipe).
        bundle = None if host.ami_id else self.bundle.s3_object_url
        user_data.add_commands(
            *host_install.user_data_commands(
                environment,
                bundle_s3_uri=bundle,
                ecr_registry=environment["RUNNERHUB_ECR_REGISTRY"],
                region=self.stage.region,
            )
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
                ),
                # /var/lib/docker: xfs with project quotas, so each container's disk_mb holds
                # (`--storage-opt size`; scripts/docker-storage.sh formats it at first boot).
                ec2.BlockDevice(
                    device_name=DOCKER_DEVICE_NAME,
                    volume=ec2.BlockDeviceVolume.ebs(
                        docker_volume_gb(pool, host_slots(pool, host)),
                        encrypted=True,
                        volume_type=ec2.EbsDeviceVolumeType.GP3,
                        delete_on_termination=True,
                    ),
                ),
            ],
        )
        group = autoscaling.AutoScalingGroup(
            self,
            f"{pool.name}-asg",
            auto_scaling_group_name=self.group_name(pool),
            vpc=self.vpc,
            vpc_subnets=self.subnets,
            mixed_instances_policy=self._mix(host, launch_template),
            # Spot: launch a replacement when AWS signals a raised interruption risk; the old
            # instance then ends through the drain hook.
            capacity_rebalance=host.spot,
            # Only the scaler picks victims (idle hosts, docs/scaling.md): the group never
            # terminates a protected instance to lower its desired capacity.
            new_instances_protected_from_scale_in=True,
            # No desired capacity: the scaler owns it, and a deploy must not reset it. The
            # minimum: hosts kept up with no demand (`min_hosts`, at most the maximum:
            # pool_checks refuses more before synth).
            min_capacity=host.min_hosts,
            # Enough hosts for max_runners at the pool's slots each (pool_checks checks it).
            max_capacity=max_hosts(pool, host),
            group_metrics=[autoscaling.GroupMetrics.all()],
        )
        group.add_lifecycle_hook(
            "drain",
            lifecycle_hook_name=LIFECYCLE_HOOK_NAME,
            lifecycle_transition=autoscaling.LifecycleTransition.INSTANCE_TERMINATING,
            heartbeat_timeout=cdk.Duration.seconds(LIFECYCLE_HOOK_HEARTBEAT_TIMEOUT_S),
            default_result=autoscaling.DefaultResult.CONTINUE,
        )
        cdk.Tags.of(group).add("runnerhub:pool", pool.name)
        cdk.Tags.of(group).add("runnerhub:stage", self.stage.name)
        self.roles[pool.name] = role
        self.launch_templates[pool.name] = launch_template
        self.groups[pool.name] = group

    def group_name(self, pool: Pool) -> str:
        return f"{self.stage.prefix}{pool.name}"

    @staticmethod
    def _mix(host, launch_template: ec2.LaunchTemplate) -> autoscaling.MixedInstancesPolicy:
        """The pool's instance types; on demand only, or Spot above an on-demand base."""
        if host.spot:
            distribution = autoscaling.InstancesDistribution(
                on_demand_base_capacity=host.on_demand_base,
                on_demand_percentage_above_base_capacity=host.on_demand_percent_above_base,
                # The Spot pools least likely to be interrupted, among the types given.
                spot_allocation_strategy=autoscaling.SpotAllocationStrategy.CAPACITY_OPTIMIZED,
                on_demand_allocation_strategy=autoscaling.OnDemandAllocationStrategy.PRIORITIZED,
            )
        else:
            distribution = autoscaling.InstancesDistribution(
                on_demand_base_capacity=0,
                on_demand_percentage_above_base_capacity=100,
                # The types in the order given: the first while it has capacity.
                on_demand_allocation_strategy=autoscaling.OnDemandAllocationStrategy.PRIORITIZED,
            )
        return autoscaling.MixedInstancesPolicy(
            launch_template=launch_template,
            instances_distribution=distribution,
            launch_template_overrides=[
                autoscaling.LaunchTemplateOverrides(instance_type=ec2.InstanceType(name))
                for name in host.instance_types
            ],
        )


def group_arn(scope: Construct, name: str) -> str:
    """An Auto Scaling group's ARN by name (its id part is unknown before it exists)."""
    return cdk.Stack.of(scope).format_arn(
        service="autoscaling", resource="autoScalingGroup",
        resource_name=f"*:autoScalingGroupName/{name}",
        arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME)
