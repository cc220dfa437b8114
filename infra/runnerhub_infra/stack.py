"""The app's stacks: `runnerhub-images` (per account and region: the runner images' ECR
repositories and the executor AMI pipeline), then one `runnerhub-<stage>` per stage (data,
secrets, control plane, executor hosts). Each stack's construct id is its stack name, which is
what `cdk deploy <selector>` matches (CDK v2 selects by construct path, not by stack name)."""

from __future__ import annotations

from pathlib import Path

import aws_cdk as cdk
from constructs import Construct

from chalicelib.pools import PoolConfig, load_pools
from runnerhub_infra import host_install
from runnerhub_infra.control_plane import ControlPlane
from runnerhub_infra.data import Data
from runnerhub_infra.ecr import RunnerRepositories, registry_host
from runnerhub_infra.executors import APP_DIR, Executors
from runnerhub_infra.image_builder import ExecutorImagePipeline
from runnerhub_infra.image_refresh import ImageRefreshFunction, RunnerImageBuilds
from runnerhub_infra.management_api import ManagementApi, api_code
from runnerhub_infra.monitoring import Monitoring
from runnerhub_infra.pool_checks import (
    image_repositories,
    registry_accounts,
    require_deployable,
)
from runnerhub_infra.rollouts import Rollouts
from runnerhub_infra.secrets import Secrets
from runnerhub_infra.stages import StageSettings
from runnerhub_infra.trainer import Trainer

IMAGES_STACK = "runnerhub-images"


class RunnerHubImagesStack(cdk.Stack):
    """Shared by the stages of one account and region: deploy it first (docs/deploy.md)."""

    def __init__(
        self,
        scope: Construct,
        *,
        stages: list[StageSettings],
        workdir: Path,
    ) -> None:
        first = stages[0]
        super().__init__(
            scope,
            IMAGES_STACK,
            stack_name=IMAGES_STACK,
            description="RunnerHub: runner image repositories (ECR) and the executor AMI pipeline",
            env=cdk.Environment(account=first.account, region=first.region),
        )
        # Every stage's pools file: synthesizing one stage never drops another's repository.
        self.repository_names = sorted(
            {name for stage in stages for name in image_repositories(load_pools(stage.pools_file))}
        )
        self.repositories = RunnerRepositories(
            self, "Repositories", repository_names=self.repository_names
        )
        self.bundle = cdk.aws_s3_assets.Asset(
            self, "Bundle", path=str(host_install.stage_bundle(workdir / "images-bundle"))
        )
        # What `python -m executor --check` needs at build time; the first stage's pools file
        # names the images baked in (other stages' hosts pull theirs at first use).
        check_environment = {
            "RUNNERHUB_STAGE": first.name,
            "RUNNERHUB_POOLS_FILE": f"{APP_DIR}/{first.pools_relative_path}",
            "RUNNERHUB_GITHUB_APP_SECRET_ID": first.github_app_secret_id,
            "RUNNERHUB_ECR_REGISTRY": registry_host(self),
            **first.secrets.environment(),
        }
        self.pipeline = ExecutorImagePipeline(
            self,
            "ExecutorImage",
            bundle=self.bundle,
            repository_names=self.repository_names,
            check_environment=check_environment,
        )
        # Daily: each runner image rebuilt on the newest actions/runner release (pushed, so
        # scanned, when new) and the executor AMI rebuilt, by one schedule.
        self.image_builds = RunnerImageBuilds(
            self,
            "RunnerImageBuilds",
            repositories=self.repositories.repositories,
            pipeline_arn=self.pipeline.pipeline.attr_arn,
        )


class RunnerHubStack(cdk.Stack):
    def __init__(
        self,
        scope: Construct,
        *,
        stage: StageSettings,
        workdir: Path,
        pools: PoolConfig | None = None,
    ) -> None:
        # The construct id is the stack name (`cdk deploy runnerhub-dev`); Chalice's construct
        # takes its stage name from it (control_plane.py).
        super().__init__(
            scope,
            stage.stack_name,
            stack_name=stage.stack_name,
            description=f"RunnerHub ({stage.name}): ephemeral GitHub Actions runners",
            env=cdk.Environment(account=stage.account, region=stage.region),
            termination_protection=stage.prod,
        )
        self.stage = stage
        # The same file the app reads (deployed inside chalicelib/), so queues match routing.
        self.pools = pools or load_pools(stage.pools_file)
        # Digests from this account's ECR, a real scope, sizes that fit: before anything else.
        require_deployable(self.pools, stage)
        self.repository_names = image_repositories(self.pools)
        self._assert_registry_account()
        workdir = workdir / stage.name
        self.data = Data(self, "Data", stage=stage, pools=self.pools)
        self.secrets = Secrets(self, "Secrets", stage=stage)
        self.control_plane = ControlPlane(
            self,
            "ControlPlane",
            stage=stage,
            data=self.data,
            secrets=self.secrets,
            workdir=workdir,
        )
        # The management API: its own function, role, REST API and throttle (the webhook's
        # are untouched), the same package as the Chalice app's plus api_app.py.
        code = api_code(workdir)
        self.management_api = ManagementApi(
            self,
            "ManagementApi",
            stage=stage,
            data=self.data,
            secrets=self.secrets,
            code=code,
            webhook_api=self.control_plane.chalice.get_resource("RestAPI"),
        )
        self.executors = Executors(
            self,
            "Executors",
            stage=stage,
            pools=self.pools,
            data=self.data,
            secrets=self.secrets,
            workdir=workdir,
            repository_names=self.repository_names,
        )
        # The forecast's trainer: its own function and layer (scikit-learn), daily.
        self.trainer = Trainer(self, "Trainer", stage=stage, data=self.data, workdir=workdir)
        # A scanned runner image of this stage's pools becomes a proposal (or is applied):
        # the management API's code, its own function and role.
        self.image_refresh = ImageRefreshFunction(
            self, "ImageRefresh", stage=stage, data=self.data, code=code,
            repository_names=self.repository_names)
        self.monitoring = Monitoring(self, "Monitoring", stage=stage, data=self.data,
                                     control_plane=self.control_plane, executors=self.executors,
                                     trainer=self.trainer,
                                     management_api=self.management_api,
                                     image_refresh=self.image_refresh)
        # Every function behind its `live` alias, deployed by a canary these alarms roll back;
        # the scaler's grants to set an executor group's launch template back.
        self.rollouts = Rollouts(self, "Rollouts", stage=stage,
                                 control_plane=self.control_plane, executors=self.executors,
                                 trainer=self.trainer, management_api=self.management_api,
                                 image_refresh=self.image_refresh,
                                 monitoring=self.monitoring)
        cdk.Tags.of(self).add("runnerhub:stage", stage.name)
        cdk.CfnOutput(
            self,
            "WebhookSecretName",
            value=stage.webhook_secret_id,
            description=f"{stage.secrets.backend}: the GitHub webhook secret(s)",
        )
        cdk.CfnOutput(
            self,
            "GitHubAppSecretName",
            value=stage.github_app_secret_id,
            description=f"{stage.secrets.backend}: where to put the GitHub App id and private key",
        )

    def _assert_registry_account(self) -> None:
        """The pools file names images in one account's ECR; without `account` in the stage
        synthesis cannot compare, so CloudFormation does, before creating anything."""
        accounts = sorted(registry_accounts(self.pools))
        if len(accounts) > 1:
            raise ValueError(
                f"pools file {self.stage.pools_file} names images in several accounts' ECR: "
                f"{', '.join(accounts)}; hosts pull from their own account's"
            )
        (account,) = accounts
        cdk.CfnRule(
            self,
            "ImagesInThisAccount",
            assertions=[
                cdk.CfnRuleAssertion(
                    assert_=cdk.Fn.condition_equals(cdk.Aws.ACCOUNT_ID, account),
                    assert_description=(
                        f"The pools file ({self.stage.pools_relative_path}) names images in the "
                        f"ECR of account {account}: deploy to that account, or put your "
                        "account's digests in the pools file (docs/deploy.md)"
                    ),
                )
            ],
        )
