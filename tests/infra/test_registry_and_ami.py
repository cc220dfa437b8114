"""runnerhub-images (ECR repositories, the executor AMI pipeline) and what hosts get from it:
pull permissions, the registry for docker's credential helper, slots, Debian, stable names."""

from __future__ import annotations

import json
import math

import yaml
from runnerhub_infra.ecr import ECR_PULL_ACTIONS, UNTAGGED_EXPIRY_DAYS
from runnerhub_infra.pool_checks import host_slots, image_repositories
from runnerhub_infra.stages import DEBIAN12_AMI_PARAMETER, stage_settings

from tests.infra.cfn import as_list, executor_roles, role_statements
from tests.infra.cfn import resources as of_type


def test_one_repository_per_image_scanned_immutable_retained(synthesized, pools):
    repositories = {
        r["Properties"]["RepositoryName"]: r
        for r in of_type(synthesized.images, "AWS::ECR::Repository").values()
    }
    assert sorted(repositories) == image_repositories(pools)
    for repository in repositories.values():
        props = repository["Properties"]
        assert props["ImageScanningConfiguration"] == {"ScanOnPush": True}
        assert props["ImageTagMutability"] == "IMMUTABLE"
        # A pools file may still name its images when the stack goes.
        assert repository["DeletionPolicy"] == "Retain"
        (rule,) = json.loads(props["LifecyclePolicy"]["LifecyclePolicyText"])["rules"]
        # Only untagged images ever expire: every digest a pools file names is a tagged push.
        assert rule["selection"]["tagStatus"] == "untagged"
        assert rule["selection"]["countNumber"] == UNTAGGED_EXPIRY_DAYS
        assert rule["action"] == {"type": "expire"}
    outputs = [o for name, o in synthesized.images["Outputs"].items() if name.startswith("Repo")]
    assert len(outputs) == len(repositories)


def test_hosts_pull_only_from_the_runner_repositories(template, pools):
    for role_id in executor_roles(template).values():
        statements = list(role_statements(template, role_id))
        token = [s for s in statements if "ecr:GetAuthorizationToken" in as_list(s["Action"])]
        assert [s["Resource"] for s in token] == ["*"]
        assert set(as_list(token[0]["Action"])) == {"ecr:GetAuthorizationToken"}
        (pull,) = [s for s in statements if "ecr:BatchGetImage" in as_list(s["Action"])]
        assert sorted(as_list(pull["Action"])) == sorted(ECR_PULL_ACTIONS)
        text = json.dumps(pull["Resource"])
        for name in image_repositories(pools):
            assert f":repository/{name}" in text
        assert len(as_list(pull["Resource"])) == len(image_repositories(pools))


def _user_data(launch_template: dict) -> str:
    joined = launch_template["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]
    parts = joined["Fn::Join"][1]
    return "".join(part if isinstance(part, str) else json.dumps(part) for part in parts)


def test_hosts_get_registry_slots_and_debian(template, stage, pools):
    parameters = json.dumps(template.get("Parameters", {}))
    assert DEBIAN12_AMI_PARAMETER in parameters
    assert "al2023" not in parameters
    for launch_template in of_type(template, "AWS::EC2::LaunchTemplate").values():
        pool = launch_template["Properties"]["LaunchTemplateName"].removeprefix(stage.prefix)
        host = stage.host_settings(pool)
        text = _user_data(launch_template)
        assert f"RUNNERHUB_SLOTS={host_slots(pools.by_name(pool), host)}\n" in text
        assert 'RUNNERHUB_ECR_REGISTRY={"Ref": "AWS::AccountId"}.dkr.ecr.' in text
        assert "install-executor.sh" in text and "--ecr-registry" in text
        assert "dnf" not in text
        data = launch_template["Properties"]["LaunchTemplateData"]
        assert data["BlockDeviceMappings"][0]["DeviceName"] == "/dev/xvda"
        assert data["InstanceType"] == host.instance_type
    groups = of_type(template, "AWS::AutoScaling::AutoScalingGroup").values()
    by_pool = {
        next(t["Value"] for t in g["Properties"]["Tags"] if t["Key"] == "runnerhub:pool"): g
        for g in groups
    }
    for pool in pools.pools:
        slots = host_slots(pool, stage.host_settings(pool.name))
        assert by_pool[pool.name]["Properties"]["MaxSize"] == str(
            math.ceil(pool.max_runners / slots)
        )


def test_executor_ami_id_boots_without_installing():
    # With the AMI, user data only writes the environment and starts the service.
    stage = stage_settings("dev", {"ami_id": "ami-0123456789abcdef0"})
    assert stage.hosts.ami_id == "ami-0123456789abcdef0"
    assert all(host.ami_id == stage.hosts.ami_id for host in stage.pool_hosts.values())
    assert all(host.ami_ssm_parameter is None for host in stage.pool_hosts.values())


def test_stable_role_names(template, stage, pools):
    names = {
        role["Properties"].get("RoleName")
        for role in of_type(template, "AWS::IAM::Role").values()
    }
    assert {f"{stage.prefix}webhook", f"{stage.prefix}reconciler"} <= names
    assert {f"{stage.prefix}executor-{pool}" for pool in pools.names} <= names


def test_stage_refuses_to_deploy_to_another_account_than_its_images(template):
    (assertion,) = template["Rules"]["ImagesInThisAccount"]["Assertions"]
    assert assertion["Assert"] == {
        "Fn::Equals": [{"Ref": "AWS::AccountId"}, "123456789012"]
    }


def test_image_pipeline_builds_from_debian_with_the_install_script(synthesized):
    images = synthesized.images
    (recipe,) = of_type(images, "AWS::ImageBuilder::ImageRecipe").values()
    parent = recipe["Properties"]["ParentImage"]["Ref"]
    assert images["Parameters"][parent]["Default"] == DEBIAN12_AMI_PARAMETER
    assert recipe["Properties"]["BlockDeviceMappings"][0]["DeviceName"] == "/dev/xvda"
    (component,) = of_type(images, "AWS::ImageBuilder::Component").values()
    data = component["Properties"]["Data"]
    text = data if isinstance(data, str) else json.dumps(data)
    assert "install-executor.sh" in text and "executor --check" in text
    if isinstance(data, str):
        phases = {phase["name"] for phase in yaml.safe_load(data)["phases"]}
        assert phases == {"build", "validate"}
    (infrastructure,) = of_type(images, "AWS::ImageBuilder::InfrastructureConfiguration").values()
    profile_id = infrastructure["Properties"]["InstanceProfileName"]["Ref"]
    role_id = images["Resources"][profile_id]["Properties"]["Roles"][0]["Ref"]
    role = images["Resources"][role_id]["Properties"]
    managed = json.dumps(role["ManagedPolicyArns"])
    assert "AmazonSSMManagedInstanceCore" in managed
    assert "EC2InstanceProfileForImageBuilder" in managed
    granted = {a for s in role_statements(images, role_id) for a in as_list(s["Action"])}
    assert {"s3:GetObject", "ecr:GetAuthorizationToken", "ecr:BatchGetImage"} <= granted
    (pipeline,) = of_type(images, "AWS::ImageBuilder::ImagePipeline").values()
    assert "Schedule" not in pipeline["Properties"]  # started by hand (docs/deploy.md)
    assert of_type(images, "AWS::ImageBuilder::DistributionConfiguration")
