"""Executor hosts: VPC over two AZs, IMDSv2 with hop limit 1, encrypted disks, min 0."""

from __future__ import annotations

import json

from tests.infra.cfn import as_list, executor_roles, refers_to, role_statements
from tests.infra.cfn import resources as of_type


def test_subnets_span_two_azs(template, stage):
    zones = {
        subnet["Properties"]["AvailabilityZone"]
        for subnet in of_type(template, "AWS::EC2::Subnet").values()
    }
    assert zones == set(stage.availability_zones)
    assert len(zones) >= 2


def test_one_group_per_pool_across_azs(template, stage, pools):
    groups = of_type(template, "AWS::AutoScaling::AutoScalingGroup")
    assert len(groups) == len(pools.pools)
    subnets = of_type(template, "AWS::EC2::Subnet")
    for group in groups.values():
        props = group["Properties"]
        assert props["MinSize"] == "0"
        # The scaler owns the desired capacity; a deploy must not reset it.
        assert "DesiredCapacity" not in props
        zones = {
            subnets[ref["Ref"]]["Properties"]["AvailabilityZone"]
            for ref in props["VPCZoneIdentifier"]
        }
        assert len(zones) >= 2
        public = {
            subnets[ref["Ref"]]["Properties"].get("MapPublicIpOnLaunch", False)
            for ref in props["VPCZoneIdentifier"]
        }
        assert public == {stage.host_subnets == "public"}


def test_launch_templates_lock_metadata_and_encrypt_disks(template, pools):
    templates = of_type(template, "AWS::EC2::LaunchTemplate")
    assert len(templates) == len(pools.pools)
    for launch_template in templates.values():
        data = launch_template["Properties"]["LaunchTemplateData"]
        assert data["MetadataOptions"]["HttpTokens"] == "required"
        # One hop: a container behind the host's bridge cannot reach the instance's role.
        assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
        assert data["BlockDeviceMappings"]
        for mapping in data["BlockDeviceMappings"]:
            assert mapping["Ebs"]["Encrypted"] is True


def _user_data_text(user_data: dict) -> str:
    joined = user_data["Fn::Base64"]["Fn::Join"][1]
    return "".join(part if isinstance(part, str) else "<token>" for part in joined)


def test_user_data_runs_the_executor_for_its_pool(template, stage):
    for launch_template in of_type(template, "AWS::EC2::LaunchTemplate").values():
        data = launch_template["Properties"]["LaunchTemplateData"]
        pool = launch_template["Properties"]["LaunchTemplateName"].removeprefix(stage.prefix)
        text = _user_data_text(data["UserData"])
        assert f"RUNNERHUB_EXECUTOR_POOLS={pool}\n" in text
        assert f"RUNNERHUB_GITHUB_APP_SECRET_ID=runnerhub/{stage.name}/github-app" in text
        # No executor AMI by default: the install script installs and starts it at boot.
        assert "/tmp/runnerhub-executor/scripts/install-executor.sh" in text
        assert text.rstrip().splitlines()[-2].endswith("--start")


def test_hosts_admit_nothing_in(template):
    for group in of_type(template, "AWS::EC2::SecurityGroup").values():
        assert not group["Properties"].get("SecurityGroupIngress")
    assert not of_type(template, "AWS::EC2::SecurityGroupIngress")


def test_hosts_use_session_manager(template, pools):
    roles = executor_roles(template)
    assert set(roles) == set(pools.names)
    for role_id in roles.values():
        managed = str(template["Resources"][role_id]["Properties"]["ManagedPolicyArns"])
        assert "AmazonSSMManagedInstanceCore" in managed


# --- scale-in protection, the drain hook, Spot ----------------------------------------------


def _groups_by_pool(template) -> dict[str, dict]:
    return {next(t["Value"] for t in g["Properties"]["Tags"] if t["Key"] == "runnerhub:pool"):
            g for g in of_type(template, "AWS::AutoScaling::AutoScalingGroup").values()}


def test_only_the_scaler_chooses_victims_and_other_endings_drain(template):
    from runnerhub_infra.executors import LIFECYCLE_HOOK_NAME

    from executor.settings import LIFECYCLE_HOOK_MAX_WAIT_S, ExecutorSettings

    daemon = ExecutorSettings.model_fields
    heartbeat_s = daemon["lifecycle_heartbeat_s"].default
    lifecycle_drain_s = daemon["lifecycle_drain_timeout_s"].default
    groups = of_type(template, "AWS::AutoScaling::AutoScalingGroup")
    hooks = of_type(template, "AWS::AutoScaling::LifecycleHook").values()
    assert len(hooks) == len(groups)
    for group_id, group in groups.items():
        assert group["Properties"]["NewInstancesProtectedFromScaleIn"] is True
        (hook,) = [h["Properties"] for h in hooks
                   if h["Properties"]["AutoScalingGroupName"] == {"Ref": group_id}]
        assert hook["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
        assert hook["LifecycleHookName"] == LIFECYCLE_HOOK_NAME
        assert hook["DefaultResult"] == "CONTINUE"
        timeout = hook["HeartbeatTimeout"]
        # Several of the daemon's lifecycle heartbeats may fail before the hook ends...
        assert timeout >= 10 * heartbeat_s
        # ...and, heartbeats going on, Auto Scaling holds the instance through the longest
        # lifecycle drain (its limit: 48 h or 100 heartbeat timeouts, whichever is smaller).
        assert min(LIFECYCLE_HOOK_MAX_WAIT_S, 100 * timeout) >= lifecycle_drain_s
        assert "NotificationTargetARN" not in hook  # the daemon reads its state from IMDS


def test_hosts_know_their_group_and_hook_and_may_act_on_their_own_group_only(template, stage):
    from runnerhub_infra.executors import LIFECYCLE_ACTIONS, LIFECYCLE_HOOK_NAME

    from tests.infra.cfn import role_statements

    for pool, role_id in executor_roles(template).items():
        statements = [s for s in role_statements(template, role_id)
                      if any(a.startswith("autoscaling:") for a in s["Action"])]
        (statement,) = statements
        assert sorted(statement["Action"]) == sorted(LIFECYCLE_ACTIONS)
        (arn,) = statement["Resource"] if isinstance(statement["Resource"], list) else [
            statement["Resource"]]
        assert json.dumps(arn).endswith(f':autoScalingGroupName/{stage.prefix}{pool}"]]}}')
    for launch_template in of_type(template, "AWS::EC2::LaunchTemplate").values():
        pool = launch_template["Properties"]["LaunchTemplateName"].removeprefix(stage.prefix)
        text = _user_data_text(launch_template["Properties"]["LaunchTemplateData"]["UserData"])
        assert f"RUNNERHUB_ASG_NAME={stage.prefix}{pool}\n" in text
        assert f"RUNNERHUB_LIFECYCLE_HOOK={LIFECYCLE_HOOK_NAME}\n" in text
    assert set(_groups_by_pool(template)) == set(executor_roles(template))


def test_each_pool_launches_from_its_mix(template, stage, pools):
    for pool, group in _groups_by_pool(template).items():
        host = stage.host_settings(pool)
        props = group["Properties"]
        mix = props["MixedInstancesPolicy"]
        assert [o["InstanceType"] for o in mix["LaunchTemplate"]["Overrides"]] == list(
            host.instance_types)
        distribution = mix["InstancesDistribution"]
        assert props["CapacityRebalance"] is host.spot
        if host.spot:
            assert distribution["SpotAllocationStrategy"] == "capacity-optimized"
            assert distribution["OnDemandBaseCapacity"] == host.on_demand_base
            assert (distribution["OnDemandPercentageAboveBaseCapacity"]
                    == host.on_demand_percent_above_base)
        else:
            assert distribution["OnDemandPercentageAboveBaseCapacity"] == 100
            assert "SpotAllocationStrategy" not in distribution
    # The example stages run the Linux pools on Spot, prod with an on-demand base.
    assert stage.host_settings("linux-small").spot and not stage.host_settings("gpu").spot
    assert (stage.host_settings("linux-small").on_demand_base > 0) is stage.prod


def test_executors_may_only_append_to_the_audit_log(template, stage):
    """The runtime monitor's violation records: PutItem on the audit table, nothing else (the
    table's own policy denies every change to everyone: test_management_api.py)."""
    audit = next(rid for rid, table in of_type(template, "AWS::DynamoDB::Table").items()
                 if table["Properties"]["TableName"] == f"{stage.prefix}audit")
    for role_id in executor_roles(template).values():
        on_audit = [s for s in role_statements(template, role_id)
                    if refers_to(s["Resource"], audit)]
        assert {a for s in on_audit for a in as_list(s["Action"])} == {"dynamodb:PutItem"}
    for launch_template in of_type(template, "AWS::EC2::LaunchTemplate").values():
        text = _user_data_text(launch_template["Properties"]["LaunchTemplateData"]["UserData"])
        assert f"RUNNERHUB_AUDIT_TABLE={stage.prefix}audit\n" in text
