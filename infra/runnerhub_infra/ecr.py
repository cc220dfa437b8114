"""The runner images' ECR repositories (one per image the pools files name) and the pull grant.

Repositories live in the account-level runnerhub-images stack, shared by the stages of that
account and region: an image is pushed once and promoted by digest from dev to prod. Each one:
scan on push, immutable tags, and a lifecycle policy that only ever expires untagged images.
Pools files name digests of tagged pushes (docs/deploy.md: `docker push` of a tag, then the
digest ECR printed); an immutable tag can never move off that digest, so the image stays tagged
and no rule can expire it. Untagged images (a build pushed without a tag, or left behind by a
failed push) go after UNTAGGED_EXPIRY_DAYS. Repositories are retained when the stack goes: a
deployed pools file may still name their images.
"""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from constructs import Construct

UNTAGGED_EXPIRY_DAYS = 14
# What a host (and the Image Builder instance pre-pulling) calls through
# docker-credential-ecr-login to pull: the token (account-wide, no resource) and the layers.
ECR_PULL_ACTIONS = [
    "ecr:BatchCheckLayerAvailability",
    "ecr:BatchGetImage",
    "ecr:GetDownloadUrlForLayer",
]
# What the executor reads before starting a runner (executor/image_scan.py): its image's scan.
# By digest, the repository's own resource: no DescribeImages (pools files name digests).
ECR_SCAN_ACTIONS = ["ecr:DescribeImageScanFindings"]
# Each runner image's package inventory (executor/inventory.py), one object per image id.
INVENTORY_PREFIX = "inventory/"


class RunnerRepositories(Construct):
    def __init__(self, scope: Construct, id: str, *, repository_names: list[str]) -> None:
        super().__init__(scope, id)
        if not repository_names:
            raise ValueError("no runner image repositories: the pools files name no ECR image")
        self.repositories: dict[str, ecr.Repository] = {}
        stack = cdk.Stack.of(self)
        for name in repository_names:
            repository = ecr.Repository(
                self,
                name.replace("/", "-"),
                repository_name=name,
                image_scan_on_push=True,
                image_tag_mutability=ecr.TagMutability.IMMUTABLE,
                lifecycle_rules=[
                    ecr.LifecycleRule(
                        description=(
                            f"untagged images after {UNTAGGED_EXPIRY_DAYS} days; tagged images "
                            "(every digest a pools file names) are kept"
                        ),
                        tag_status=ecr.TagStatus.UNTAGGED,
                        max_image_age=cdk.Duration.days(UNTAGGED_EXPIRY_DAYS),
                    )
                ],
                removal_policy=cdk.RemovalPolicy.RETAIN,
            )
            self.repositories[name] = repository
            cdk.CfnOutput(
                stack,
                f"Repository{''.join(part.title() for part in name.replace('/', '-').split('-'))}",
                value=repository.repository_uri,
                description=f"ECR repository URI of {name} (docker tag/push here)",
            )
        # Package inventories (dpkg, pip) of the images, written where they are pushed
        # (`python -m executor.inventory record IMAGE --out s3://BUCKET/inventory/`): beside the
        # repositories, per account like them, so an image promoted by digest from dev to prod
        # keeps its one inventory. Not an ECR label (that would change the image's digest) nor
        # an OCI referrer (no client for those on hosts or in CI).
        self.inventory_bucket = s3.Bucket(
            self,
            "Inventory",
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            removal_policy=cdk.RemovalPolicy.RETAIN,
        )
        cdk.CfnOutput(stack, "InventoryBucket", value=self.inventory_bucket.bucket_name,
                      description="runner image package inventories (executor/inventory.py)")


def registry_host(stack: cdk.Stack) -> str:
    """The stack's own ECR registry, `<account>.dkr.ecr.<region>.<url suffix>` (tokens)."""
    return f"{stack.account}.dkr.ecr.{stack.region}.{stack.url_suffix}"


def repository_arn(stack: cdk.Stack, name: str) -> str:
    # By name, not by a cross-stack reference: the stage stacks never block an update of the
    # images stack (CloudFormation exports would).
    return stack.format_arn(service="ecr", resource="repository", resource_name=name)


def pull_statements(stack: cdk.Stack, repository_names: list[str]) -> list[iam.PolicyStatement]:
    """Pull from exactly these repositories; the token call takes no resource."""
    return [
        iam.PolicyStatement(actions=["ecr:GetAuthorizationToken"], resources=["*"]),
        iam.PolicyStatement(
            actions=ECR_PULL_ACTIONS,
            resources=[repository_arn(stack, name) for name in repository_names],
        ),
    ]


def scan_statements(stack: cdk.Stack, repository_names: list[str]) -> list[iam.PolicyStatement]:
    """Read the scan findings of images in exactly these repositories."""
    return [iam.PolicyStatement(
        actions=ECR_SCAN_ACTIONS,
        resources=[repository_arn(stack, name) for name in repository_names],
    )]
