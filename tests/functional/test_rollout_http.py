"""A rollout against the moto server over HTTP (chalicelib/scaler/rollout.py through the scaler):
a real group and launch template versions, UpdateAutoScalingGroup to set a failing version back,
TerminateInstanceInAutoScalingGroup without lowering desired capacity, the rollout's item in the
hosts table, and the rollout metrics as EMF. The scaler's clients are labelled as the scaler's
(tests/infra/test_iam_calls.py compares the calls with its role)."""

from __future__ import annotations

import time

import pytest

from chalicelib import aws, resources
from chalicelib.hosts import DynamoHostStore, Heartbeat, HostState
from chalicelib.pools import load_pools
from chalicelib.runners import DynamoRunnerStore
from chalicelib.scaler.autoscaling import AwsAutoScaling
from chalicelib.scaler.rollout import RolloutPolicy
from chalicelib.scaler.service import Scaler, ScalerConfig
from chalicelib.scaler.store import (
    DynamoHeldJobs,
    DynamoRolloutStore,
    DynamoScalerLease,
    DynamoWaitingJobs,
)
from chalicelib.telemetry import Telemetry
from devstack.resources import create_tables
from tests.conftest import recording

POOLS = load_pools()
POOL = "linux-small"
GRACE_S = 60.0


@pytest.fixture
def group(aws_endpoint, unique):
    dynamodb = aws.client("dynamodb")
    names = {spec.logical_name: f"rh-{unique}-{spec.default_name.removeprefix('runnerhub-')}"
             for spec in resources.TABLES}
    create_tables(dynamodb, names)
    asg, ec2 = aws.client("autoscaling"), aws.client("ec2")
    template = f"rh-template-{unique}"
    ec2.create_launch_template(LaunchTemplateName=template, LaunchTemplateData={
        "ImageId": "ami-12c6146b", "InstanceType": "t3.micro"})
    prefix = f"rh-{unique}-"
    asg.create_auto_scaling_group(
        AutoScalingGroupName=prefix + POOL,
        LaunchTemplate={"LaunchTemplateName": template, "Version": "1"},
        MinSize=0, MaxSize=5, DesiredCapacity=2, AvailabilityZones=["us-east-1a"],
        NewInstancesProtectedFromScaleIn=True)
    return {"names": names, "prefix": prefix, "template": template, "asg": asg, "ec2": ec2,
            "name": prefix + POOL}


def instances(group) -> dict[str, str]:
    found = group["asg"].describe_auto_scaling_groups(
        AutoScalingGroupNames=[group["name"]])["AutoScalingGroups"][0]
    return {i["InstanceId"]: i["LaunchTemplate"]["Version"] for i in found["Instances"]
            if i["LifecycleState"] == "InService"}


def group_version(group) -> str:
    return group["asg"].describe_auto_scaling_groups(
        AutoScalingGroupNames=[group["name"]])["AutoScalingGroups"][0]["LaunchTemplate"][
        "Version"]


def test_a_failing_version_is_set_back_on_the_real_group_and_a_failing_rollback_stalls(group):
    dynamodb, names = aws.client("dynamodb", aws.SCALER), group["names"]
    hosts = DynamoHostStore(dynamodb, names["hosts_table"])
    rollouts = DynamoRolloutStore(dynamodb, names["hosts_table"])
    now = [time.time()]
    scaler = Scaler(
        pools={POOL: POOLS.by_name(POOL)}, hosts=hosts,
        runners=DynamoRunnerStore(dynamodb, names["runners_table"]),
        waiting=DynamoWaitingJobs(dynamodb, names["jobs_table"]),
        held=DynamoHeldJobs(dynamodb, names["jobs_table"]),
        groups=AwsAutoScaling(aws.client("autoscaling", aws.SCALER),
                              aws.client("ec2", aws.SCALER)),
        github=None, lease=DynamoScalerLease(dynamodb, names["hosts_table"]),
        config=ScalerConfig(group_prefix=group["prefix"], slots_per_host=2, idle_s=1e9,
                            boot_timeout_s=1e9, lease_s=30.0),
        clock=lambda: now[0], telemetry=Telemetry("scaler", emit=False), rollouts=rollouts,
        rollout_policy=RolloutPolicy(min_healthy_percent=50, checkpoints=(),
                                     health_grace_s=GRACE_S))

    def beat(*host_ids: str) -> None:
        for host_id in host_ids:
            hosts.beat(Heartbeat(host_id, (POOL,), 2, 0, 0, "0.1.0", (1, 1),
                                 HostState.SERVING, 10.0, now[0] - 1), now[0])

    old = sorted(instances(group))
    assert len(old) == 2 and set(instances(group).values()) == {"1"}
    beat(*old)
    group["ec2"].create_launch_template_version(
        LaunchTemplateName=group["template"], SourceVersion="1",
        LaunchTemplateData={"ImageId": "ami-12c6146c"})
    group["asg"].update_auto_scaling_group(
        AutoScalingGroupName=group["name"],
        LaunchTemplate={"LaunchTemplateName": group["template"], "Version": "2"})

    first = scaler.run(POOL)
    assert first.rollout["event"] == "started" and len(first.rollout["terminate"]) == 1
    launched = instances(group)
    assert len(launched) == 2 and sorted(launched.values()) == ["1", "2"]  # desired kept
    (broken,) = [i for i, v in launched.items() if v == "2"]
    assert rollouts.get(POOL).status == "rolling"

    # The new host never heartbeats: past the grace, the version is set back on the group.
    now[0] += GRACE_S + 1
    beat(*[i for i, v in launched.items() if v == "1"])
    back = scaler.run(POOL)
    assert back.rollout["event"] in ("rolled_back", "waiting"), back.as_dict()
    assert group_version(group) == "1"
    assert broken not in instances(group)
    stored = rollouts.get(POOL)
    assert (stored.target, stored.previous) == ("1", "2") and broken in stored.failed_hosts
    assert broken in stored.reason

    # The previous version's replacement never heartbeats either: stalled, and nothing more.
    now[0] += GRACE_S + 1
    beat(*[i for i, v in instances(group).items() if i in old])
    stalled = scaler.run(POOL)
    assert rollouts.get(POOL).status == "stalled", stalled.as_dict()
    assert group_version(group) == "1"
    emitted = {name for blob in recording("RUNNERHUB_EMF_LOG") if blob.get("service") ==
               "scaler" for name in ("RolloutStarted", "RolloutRolledBack", "RolloutStalled")
               if name in blob}
    assert emitted == {"RolloutStarted", "RolloutRolledBack", "RolloutStalled"}
