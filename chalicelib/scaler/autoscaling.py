"""The Auto Scaling API as the scaler uses it: one small typed client (boto3 `autoscaling`, plus
EC2 for launch times). Only the calls it makes; outages become DependencyUnavailable.

The scaler never lowers desired capacity itself: it raises it (`SetDesiredCapacity`,
`HonorCooldown=False`: a burst must not wait for a cooldown) and retires chosen hosts one by one
with `TerminateInstanceInAutoScalingGroup(ShouldDecrementDesiredCapacity=True)`. New instances
are protected from scale-in by the group (`NewInstancesProtectedFromScaleIn`, set by infra/), so
the group itself never picks a victim; `protect` covers instances launched before that was set.
Scale-in protection does not stop TerminateInstanceInAutoScalingGroup.

AWS answers `ValidationError` both for an instance no longer in a group and for one it will
not terminate (in `Standby`, or a decrement below the group's MinSize): `terminate` tells them
apart with `DescribeAutoScalingInstances`, and raises `TerminateRefused` for the second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from chalicelib.errors import RunnerHubError, aws_error_code, outage_as
from chalicelib.scaler.decision import LEAVING_LIFECYCLE, Instance

# DescribeInstances takes at most 1000 instance ids per call (and SetInstanceProtection 50).
EC2_MAX_IDS = 1000
PROTECT_MAX_IDS = 50


# Lifecycle states of an instance AWS is already terminating: a refused second call is moot.
ENDING_LIFECYCLE = frozenset(state for state in LEAVING_LIFECYCLE if state.startswith("Termin"))


class TerminateRefused(RunnerHubError):
    """The group still holds the instance and would not terminate it (ValidationError: in
    Standby, or a decrement below MinSize): the caller keeps the host."""

    def __init__(self, instance_id: str, lifecycle_state: str) -> None:
        super().__init__(f"instance {instance_id} is still in its group ({lifecycle_state}): "
                         "terminate refused")
        self.instance_id = instance_id
        self.lifecycle_state = lifecycle_state


@dataclass(frozen=True)
class Group:
    name: str
    min_size: int
    max_size: int
    desired: int
    instances: tuple[Instance, ...]
    # The launch template version the group launches (None: none pinned; chalicelib/scaler/
    # rollout.py rolls hosts onto it) and the template's id, for setting it back.
    launch_version: str | None = None
    launch_template_id: str | None = None
    mixed: bool = False  # the template is inside a MixedInstancesPolicy


def group_template(raw: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A group's launch template specification, and whether it sits in a
    MixedInstancesPolicy (infra/ makes mixed groups; the local fleet a plain one)."""
    if raw.get("LaunchTemplate"):
        return raw["LaunchTemplate"], False
    mixed = raw.get("MixedInstancesPolicy") or {}
    spec = (mixed.get("LaunchTemplate") or {}).get("LaunchTemplateSpecification") or {}
    return spec, bool(spec)


class AutoScaling(Protocol):
    def group(self, name: str) -> Group | None: ...

    def set_desired(self, name: str, desired: int) -> None: ...

    def terminate(self, instance_id: str, decrement: bool = True) -> bool:
        """Terminate, lowering desired capacity (`decrement`); False when the group no longer
        has it. TerminateRefused when the group has it and will not terminate it."""

    def protect(self, name: str, instance_ids: tuple[str, ...]) -> None: ...

    def set_version(self, group: Group, version: str) -> None:
        """Launch `version` of the group's launch template from now on (a rollback)."""


class AwsAutoScaling:
    def __init__(self, autoscaling: Any, ec2: Any) -> None:
        self._asg = autoscaling
        self._ec2 = ec2

    def group(self, name: str) -> Group | None:
        with outage_as("autoscaling"):
            found = self._asg.describe_auto_scaling_groups(
                AutoScalingGroupNames=[name])["AutoScalingGroups"]
        if not found:
            return None
        raw = found[0]
        launched = self._launch_times([i["InstanceId"] for i in raw.get("Instances", [])])
        instances = tuple(
            Instance(instance_id=i["InstanceId"], lifecycle_state=i["LifecycleState"],
                     availability_zone=i.get("AvailabilityZone", ""),
                     launched_at=launched.get(i["InstanceId"]),
                     protected=bool(i.get("ProtectedFromScaleIn")),
                     launch_version=(i.get("LaunchTemplate") or {}).get("Version"))
            for i in raw.get("Instances", []))
        template, mixed = group_template(raw)
        return Group(name=name, min_size=int(raw["MinSize"]), max_size=int(raw["MaxSize"]),
                     desired=int(raw["DesiredCapacity"]), instances=instances,
                     launch_version=template.get("Version"),
                     launch_template_id=template.get("LaunchTemplateId"), mixed=mixed)

    def _launch_times(self, ids: list[str]) -> dict[str, float]:
        times: dict[str, float] = {}
        for start in range(0, len(ids), EC2_MAX_IDS):
            with outage_as("ec2"):
                pages = self._ec2.get_paginator("describe_instances").paginate(
                    InstanceIds=ids[start:start + EC2_MAX_IDS])
                for page in pages:
                    for reservation in page["Reservations"]:
                        for instance in reservation["Instances"]:
                            times[instance["InstanceId"]] = instance["LaunchTime"].timestamp()
        return times

    def set_desired(self, name: str, desired: int) -> None:
        with outage_as("autoscaling"):
            self._asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=desired,
                                           HonorCooldown=False)

    def terminate(self, instance_id: str, decrement: bool = True) -> bool:
        with outage_as("autoscaling"):
            try:
                self._asg.terminate_instance_in_auto_scaling_group(
                    InstanceId=instance_id, ShouldDecrementDesiredCapacity=decrement)
                return True
            except self._asg.exceptions.ClientError as exc:
                if aws_error_code(exc) != "ValidationError":
                    raise
        # Gone from its group, or kept by it: only the group can tell.
        state = self.lifecycle_state(instance_id)
        if state is None:
            return False
        if state in ENDING_LIFECYCLE:
            return True  # already being terminated (another call's, or the group's own)
        raise TerminateRefused(instance_id, state)

    def lifecycle_state(self, instance_id: str) -> str | None:
        """The instance's lifecycle state in its group; None when no group has it."""
        with outage_as("autoscaling"):
            found = self._asg.describe_auto_scaling_instances(
                InstanceIds=[instance_id])["AutoScalingInstances"]
        return found[0]["LifecycleState"] if found else None

    def set_version(self, group: Group, version: str) -> None:
        spec = {"LaunchTemplateId": group.launch_template_id, "Version": version}
        # Only the template's version changes: a MixedInstancesPolicy update may name just it.
        update = ({"MixedInstancesPolicy": {"LaunchTemplate": {
            "LaunchTemplateSpecification": spec}}} if group.mixed else {"LaunchTemplate": spec})
        with outage_as("autoscaling"):
            self._asg.update_auto_scaling_group(AutoScalingGroupName=group.name, **update)

    def protect(self, name: str, instance_ids: tuple[str, ...]) -> None:
        for start in range(0, len(instance_ids), PROTECT_MAX_IDS):
            with outage_as("autoscaling"):
                self._asg.set_instance_protection(
                    AutoScalingGroupName=name,
                    InstanceIds=list(instance_ids[start:start + PROTECT_MAX_IDS]),
                    ProtectedFromScaleIn=True)
