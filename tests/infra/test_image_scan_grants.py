"""Image scanning and the package inventory in the synthesized stacks: every runner repository
scans on push, each executor role reads the scan findings of its stage's repositories and of
nothing else, and the images stack keeps a private bucket for the inventories."""

from __future__ import annotations

import json

from runnerhub_infra.ecr import ECR_SCAN_ACTIONS
from runnerhub_infra.pool_checks import image_repositories

from tests.infra.cfn import as_list, executor_roles, role_statements
from tests.infra.cfn import resources as of_type


def test_every_runner_repository_scans_on_push(synthesized):
    repositories = of_type(synthesized.images, "AWS::ECR::Repository").values()
    assert repositories
    for repository in repositories:
        assert repository["Properties"]["ImageScanningConfiguration"] == {"ScanOnPush": True}


def test_executors_read_scan_findings_of_their_repositories_only(template, pools):
    wanted = image_repositories(pools)
    for role_id in executor_roles(template).values():
        statements = [s for s in role_statements(template, role_id)
                      if "ecr:DescribeImageScanFindings" in as_list(s["Action"])]
        (scan,) = statements
        assert sorted(as_list(scan["Action"])) == sorted(ECR_SCAN_ACTIONS)
        resources = as_list(scan["Resource"])
        assert "*" not in resources and len(resources) == len(wanted)
        text = json.dumps(resources)
        for name in wanted:
            assert f":repository/{name}" in text
        # Nothing broader slipped in: no ecr:* or ecr:Describe* elsewhere in the role.
        for statement in role_statements(template, role_id):
            for action in as_list(statement["Action"]):
                assert action not in ("ecr:*", "ecr:Describe*", "*")


def test_the_images_stack_keeps_a_private_retained_inventory_bucket(synthesized):
    (bucket,) = of_type(synthesized.images, "AWS::S3::Bucket").values()
    props = bucket["Properties"]
    assert bucket["DeletionPolicy"] == "Retain"
    assert props["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True}
    assert "InventoryBucket" in synthesized.images["Outputs"]
    (policy,) = of_type(synthesized.images, "AWS::S3::BucketPolicy").values()
    denies = [s for s in policy["Properties"]["PolicyDocument"]["Statement"]
              if s["Effect"] == "Deny"]
    assert any(s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}} for s in denies)
