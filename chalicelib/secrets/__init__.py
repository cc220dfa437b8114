"""Secrets: where they live (`store`: Secrets Manager, Vault, a file), what their text holds
and the webhook's short-TTL cache (`formats`), and the webhook secret's rotation (`rotation`,
the command `python -m chalicelib.rotation`)."""

from chalicelib.secrets.formats import (
    CachedSecrets,
    file_loader,
    parse_app_secret,
    parse_app_secrets,
    parse_secret_list,
    webhook_secret_loader,
)
from chalicelib.secrets.store import (
    FileSecretStore,
    SecretBackendSettings,
    SecretNotFound,
    SecretsManagerClient,
    SecretStore,
    VaultClient,
    secret_store,
)

__all__ = [
    "CachedSecrets",
    "FileSecretStore",
    "SecretBackendSettings",
    "SecretNotFound",
    "SecretStore",
    "SecretsManagerClient",
    "VaultClient",
    "file_loader",
    "parse_app_secret",
    "parse_app_secrets",
    "parse_secret_list",
    "secret_store",
    "webhook_secret_loader",
]
