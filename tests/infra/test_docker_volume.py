"""Executor hosts get a second encrypted gp3 volume for /var/lib/docker (xfs with project
quotas: scripts/docker-storage.sh), sized for every slot's job disk plus the images."""

from __future__ import annotations

from runnerhub_infra.executors import DOCKER_DEVICE_NAME, DOCKER_IMAGES_GB, docker_volume_gb
from runnerhub_infra.pool_checks import host_slots

from tests.infra.cfn import resources as of_type


def test_each_launch_template_has_a_docker_volume_sized_for_its_slots(template, stage, pools):
    by_name = {lt["Properties"]["LaunchTemplateName"]: lt
               for lt in of_type(template, "AWS::EC2::LaunchTemplate").values()}
    for pool in pools.pools:
        host = stage.host_settings(pool.name)
        launch_template = next(lt for name, lt in by_name.items()
                               if name.endswith(pool.name))
        mappings = {m["DeviceName"]: m["Ebs"]
                    for m in launch_template["Properties"]["LaunchTemplateData"][
                        "BlockDeviceMappings"]}
        assert set(mappings) == {host.root_device_name, DOCKER_DEVICE_NAME}
        docker = mappings[DOCKER_DEVICE_NAME]
        assert docker["VolumeType"] == "gp3"
        assert docker["Encrypted"] is True
        assert docker["DeleteOnTermination"] is True
        slots = host_slots(pool, host)
        assert docker["VolumeSize"] == docker_volume_gb(pool, slots)
        assert docker["VolumeSize"] >= DOCKER_IMAGES_GB + slots * pool.disk_mb / 1024


def test_the_docker_volume_size_rounds_each_job_disk_up():
    from chalicelib.pools import Pool

    pool = Pool.model_validate({"name": "p", "labels": ["self-hosted"], "image": "i",
                                "disk_mb": 1500, "scope": {"owner": "acme"}})
    assert docker_volume_gb(pool, 4) == DOCKER_IMAGES_GB + 4 * 2
    assert docker_volume_gb(pool, 0) == DOCKER_IMAGES_GB + 2  # a type that fits no runner
