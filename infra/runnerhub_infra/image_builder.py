"""The executor AMI: an EC2 Image Builder pipeline in the runnerhub-images stack.

Parent image: Debian 12's official AMI (the SSM public parameter, resolved at deploy time), the
base the user-data fallback installs onto too. One component runs scripts/install-executor.sh
from the code bundle (infra/runnerhub_infra/host_install.py writes the document): Docker, the
daemon in its virtualenv, the systemd unit, the CloudWatch agent, the runner images pre-pulled
from this account's ECR; its validate phase runs `python -m executor --check`. The pipeline runs
daily, started by the runner images' refresh schedule (image_refresh.py: Debian's updates and
the executor's code), and when started by hand (`aws imagebuilder
start-image-pipeline-execution`, docs/deploy.md): a new AMI reaches hosts only through a stage's
`ami_id`, which an operator sets.

Image Builder components and recipes are immutable per name + version, and CloudFormation
replaces them on any change: their version carries a hash of what they contain, so a changed
bundle or document makes a new version instead of a name clash.
"""

from __future__ import annotations

import hashlib

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_imagebuilder as imagebuilder
from aws_cdk import aws_s3_assets as s3_assets
from constructs import Construct

from runnerhub_infra import host_install
from runnerhub_infra.ecr import pull_statements, registry_host
from runnerhub_infra.stages import DEBIAN12_AMI_PARAMETER

PIPELINE_NAME = "runnerhub-executor"
BUILD_INSTANCE_TYPES = ["m6i.large"]
ROOT_DEVICE = "/dev/xvda"
AMI_VOLUME_GB = 30


def content_version(*parts: str) -> str:
    """A semantic version that changes with the content (1.0.<24 bits of its hash>)."""
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    return f"1.0.{int(digest[:6], 16)}"


class ExecutorImagePipeline(Construct):
    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        bundle: s3_assets.Asset,
        repository_names: list[str],
        check_environment: dict[str, str],
    ) -> None:
        super().__init__(scope, id)
        stack = cdk.Stack.of(self)
        # The build instance: Session Manager (Image Builder drives it through SSM), Image
        # Builder's own calls, the bundle, and pulls from the runner repositories.
        self.role = iam.Role(
            self,
            "BuildRole",
            role_name=f"{PIPELINE_NAME}-build",
            description="RunnerHub: the Image Builder instance that builds the executor AMI",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            managed_policies=[
                iam.ManagedPolicy.from_aws_managed_policy_name("AmazonSSMManagedInstanceCore"),
                iam.ManagedPolicy.from_aws_managed_policy_name(
                    "EC2InstanceProfileForImageBuilder"
                ),
            ],
            inline_policies={
                "build": iam.PolicyDocument(
                    statements=[
                        iam.PolicyStatement(
                            actions=["s3:GetObject"],
                            resources=[bundle.bucket.arn_for_objects(bundle.s3_object_key)],
                        ),
                        *pull_statements(stack, repository_names),
                    ]
                )
            },
        )
        profile = iam.CfnInstanceProfile(
            self, "BuildProfile", roles=[self.role.role_name],
            instance_profile_name=f"{PIPELINE_NAME}-build",
        )
        document = host_install.component_yaml(
            bundle.s3_object_url,
            check_environment,
            ecr_registry=registry_host(stack),
        )
        self.component = imagebuilder.CfnComponent(
            self,
            "Component",
            name=PIPELINE_NAME,
            platform="Linux",
            version=content_version(document, bundle.asset_hash),
            description="Install the RunnerHub executor (scripts/install-executor.sh)",
            data=document,
            supported_os_versions=["Debian 12"],
        )
        parent = ec2.MachineImage.from_ssm_parameter(
            DEBIAN12_AMI_PARAMETER, os=ec2.OperatingSystemType.LINUX
        ).get_image(self).image_id
        user_data = "\n".join(host_install.build_instance_user_data()) + "\n"
        self.recipe = imagebuilder.CfnImageRecipe(
            self,
            "Recipe",
            name=PIPELINE_NAME,
            version=content_version(document, bundle.asset_hash, user_data),
            parent_image=parent,
            components=[
                imagebuilder.CfnImageRecipe.ComponentConfigurationProperty(
                    component_arn=self.component.attr_arn
                )
            ],
            block_device_mappings=[
                imagebuilder.CfnImageRecipe.InstanceBlockDeviceMappingProperty(
                    device_name=ROOT_DEVICE,
                    ebs=imagebuilder.CfnImageRecipe.EbsInstanceBlockDeviceSpecificationProperty(
                        volume_size=AMI_VOLUME_GB,
                        volume_type="gp3",
                        encrypted=True,
                        delete_on_termination=True,
                    ),
                )
            ],
            additional_instance_configuration=(
                imagebuilder.CfnImageRecipe.AdditionalInstanceConfigurationProperty(
                    user_data_override=cdk.Fn.base64(user_data)
                )
            ),
            working_directory="/tmp",
        )
        self.infrastructure = imagebuilder.CfnInfrastructureConfiguration(
            self,
            "Infrastructure",
            name=PIPELINE_NAME,
            instance_profile_name=profile.ref,
            instance_types=BUILD_INSTANCE_TYPES,
            terminate_instance_on_failure=True,
            # IMDSv2 on the build instance too, as on the hosts.
            instance_metadata_options=(
                imagebuilder.CfnInfrastructureConfiguration.InstanceMetadataOptionsProperty(
                    http_tokens="required", http_put_response_hop_limit=1
                )
            ),
        )
        self.distribution = imagebuilder.CfnDistributionConfiguration(
            self,
            "Distribution",
            name=PIPELINE_NAME,
            distributions=[
                imagebuilder.CfnDistributionConfiguration.DistributionProperty(
                    region=stack.region,
                    ami_distribution_configuration={
                        "Name": "runnerhub-executor-{{ imagebuilder:buildDate }}",
                        "Description": "RunnerHub executor host (Debian 12)",
                        "AmiTags": {"runnerhub:component": "executor"},
                    },
                )
            ],
        )
        self.pipeline = imagebuilder.CfnImagePipeline(
            self,
            "Pipeline",
            name=PIPELINE_NAME,
            description="RunnerHub executor AMI; run it after pushing new runner images",
            image_recipe_arn=self.recipe.attr_arn,
            infrastructure_configuration_arn=self.infrastructure.attr_arn,
            distribution_configuration_arn=self.distribution.attr_arn,
            status="ENABLED",
            image_tests_configuration=imagebuilder.CfnImagePipeline.ImageTestsConfigurationProperty(
                image_tests_enabled=True, timeout_minutes=60
            ),
        )
        cdk.CfnOutput(
            stack,
            "ExecutorImagePipelineArn",
            value=self.pipeline.attr_arn,
            description="aws imagebuilder start-image-pipeline-execution --image-pipeline-arn",
        )

