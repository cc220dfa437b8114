"""The webhook secret(s) and GitHub App key(s): Secrets Manager, encrypted with a customer key."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from runnerhub_infra.stages import StageSettings, removal_policy


class Secrets(Construct):
    def __init__(self, scope: Construct, id: str, *, stage: StageSettings) -> None:
        super().__init__(scope, id)
        self.webhook_secret_name = stage.webhook_secret_id
        self.github_app_secret_name = stage.github_app_secret_id
        if stage.secrets.backend != "secretsmanager":
            # Vault (stage.secrets): the deployables log in with their IAM roles; no AWS secret,
            # key or grant.
            self.key = self.webhook_secret = self.github_app_secret = None
            return
        removal = removal_policy(stage)
        self.key = kms.Key(
            self,
            "Key",
            alias=f"alias/runnerhub-{stage.name}-secrets",
            description=f"RunnerHub {stage.name}: webhook secrets and GitHub App keys",
            enable_key_rotation=True,
            removal_policy=removal,
        )
        # Generated at deploy time; the operator copies it into the GitHub App's webhook
        # settings. Rotation: put {"secrets": [new, old]} (the app accepts either), then update
        # GitHub, then drop the old one.
        # Plain names (not the ARN's tokens) for the functions' RUNNERHUB_*_SECRET_ID.
        self.webhook_secret = secretsmanager.Secret(
            self,
            "WebhookSecret",
            secret_name=self.webhook_secret_name,
            description='GitHub webhook secret(s): a plain secret or JSON {"secrets": [...]}',
            encryption_key=self.key,
            generate_secret_string=secretsmanager.SecretStringGenerator(
                password_length=48, exclude_punctuation=True
            ),
            removal_policy=removal,
        )
        # The App's id and private key come from GitHub after the App is created; the operator
        # puts them with `aws secretsmanager put-secret-value` (docs/deploy.md). Until then it
        # holds random text that the executor rejects. Generated rather than a literal value so
        # a later stack update never overwrites the key the operator put.
        self.github_app_secret = secretsmanager.Secret(
            self,
            "GitHubAppSecret",
            secret_name=self.github_app_secret_name,
            description="GitHub App id(s) and private key(s) for JIT runner configs",
            encryption_key=self.key,
            generate_secret_string=secretsmanager.SecretStringGenerator(
                password_length=32, exclude_punctuation=True
            ),
            removal_policy=removal,
        )

    def read_statements(self, secret: secretsmanager.Secret | None) -> list[iam.PolicyStatement]:
        """Least privilege to read one secret: GetSecretValue, and Decrypt only via Secrets
        Manager (the key cannot be used directly). None (Vault): nothing."""
        if secret is None:
            return []
        stack = cdk.Stack.of(self)
        return [
            iam.PolicyStatement(
                actions=["secretsmanager:GetSecretValue"], resources=[secret.secret_arn]
            ),
            iam.PolicyStatement(
                actions=["kms:Decrypt"],
                resources=[self.key.key_arn],
                conditions={
                    "StringEquals": {
                        "kms:ViaService": f"secretsmanager.{stack.region}.{stack.url_suffix}"
                    }
                },
            ),
        ]
