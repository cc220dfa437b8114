"""Executor hosts: VPC over two AZs, IMDSv2 with hop limit 1, encrypted disks, min 0."""

from __future__ import annotations

from tests.infra.cfn import executor_roles
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
        assert "ExecStart=/opt/runnerhub/venv/bin/python -m executor" in text
        assert f"RUNNERHUB_EXECUTOR_POOLS={pool}\n" in text
        assert f"RUNNERHUB_GITHUB_APP_SECRET_ID=runnerhub/{stage.name}/github-app" in text
        assert "systemctl enable --now runnerhub-executor" in text


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
