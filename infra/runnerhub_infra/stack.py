"""One stack per stage: data, secrets, control plane, executor hosts."""

from __future__ import annotations

from pathlib import Path

import aws_cdk as cdk
from constructs import Construct

from chalicelib.pools import PoolConfig, load_pools
from runnerhub_infra.control_plane import ControlPlane
from runnerhub_infra.data import Data
from runnerhub_infra.executors import Executors
from runnerhub_infra.monitoring import Monitoring
from runnerhub_infra.secrets import Secrets
from runnerhub_infra.stages import StageSettings


class RunnerHubStack(cdk.Stack):
    def __init__(
        self,
        scope: Construct,
        *,
        stage: StageSettings,
        workdir: Path,
        pools: PoolConfig | None = None,
    ) -> None:
        # The construct id is the stage name: Chalice's construct takes its stage from it.
        super().__init__(
            scope,
            stage.name,
            stack_name=stage.stack_name,
            description=f"RunnerHub ({stage.name}): ephemeral GitHub Actions runners",
            env=cdk.Environment(account=stage.account, region=stage.region),
            termination_protection=stage.prod,
        )
        self.stage = stage
        # The same file the app reads (deployed inside chalicelib/), so queues match routing.
        self.pools = pools or load_pools(stage.pools_file)
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
        self.executors = Executors(
            self,
            "Executors",
            stage=stage,
            pools=self.pools,
            data=self.data,
            secrets=self.secrets,
            workdir=workdir,
        )
        self.monitoring = Monitoring(self, "Monitoring", data=self.data)
        cdk.Tags.of(self).add("runnerhub:stage", stage.name)
        cdk.CfnOutput(
            self,
            "WebhookSecretName",
            value=self.secrets.webhook_secret_name,
            description="Secrets Manager secret holding the GitHub webhook secret(s)",
        )
        cdk.CfnOutput(
            self,
            "GitHubAppSecretName",
            value=self.secrets.github_app_secret_name,
            description="Secrets Manager secret to put the GitHub App id and private key in",
        )
