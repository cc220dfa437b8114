"""Where secrets live: Vault (KV v2 through hvac), AWS Secrets Manager, or a local file (demo).

Every backend reads and writes a secret as text. Secrets Manager and files keep that text as
is. A Vault KV v2 secret is a JSON object, so its text is that object as JSON: the same document
Secrets Manager would hold (`{"secrets": [...]}`, `{"app_id": N, "private_key": "<PEM>"}`).

hvac is imported only when a Vault client is built: the webhook's cold start and the other
backends never pay for it. Errors carry the backend and an error class, never a value.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from chalicelib.errors import ConfigurationError, DependencyUnavailable, aws_error_code

# "file" (local stack and benchmarks only): a `*_SECRET_ID` is a file path.
SecretBackend = Literal["secretsmanager", "vault", "file"]
VaultAuth = Literal["token", "aws-iam"]
VAULT: SecretBackend = "vault"
FILE: SecretBackend = "file"


class SecretNotFound(DependencyUnavailable):
    """The named secret does not exist (the webhook answers 503 as for any backend failure)."""


class SecretStore(Protocol):
    def read(self, name: str) -> str: ...

    def write(self, name: str, text: str) -> None: ...


class SecretBackendSettings(BaseSettings):
    """Where `RUNNERHUB_*_SECRET_ID` secrets live; shared by every deployable that reads them."""

    model_config = SettingsConfigDict(env_prefix="RUNNERHUB_", frozen=True, extra="ignore")

    secret_backend: SecretBackend = Field("secretsmanager")
    vault_addr: str | None = None
    vault_auth: VaultAuth = "token"
    vault_token: SecretStr | None = None
    vault_kv_mount: str = "secret"
    vault_namespace: str | None = None
    # CA bundle for a Vault with a private CA (default: the system's).
    vault_ca_cert: Path | None = None
    vault_timeout_s: float = Field(5.0, gt=0, le=60)
    # AWS IAM auth: the Vault role (default: Vault infers it from the IAM principal's name),
    # the auth mount, and the X-Vault-AWS-IAM-Server-ID value when Vault requires one.
    vault_aws_role: str | None = None
    vault_aws_mount: str = "aws"
    vault_aws_header: str | None = None

    @model_validator(mode="after")
    def _vault_complete(self) -> SecretBackendSettings:
        if self.secret_backend != VAULT:
            return self
        if not self.vault_addr:
            raise ValueError("RUNNERHUB_SECRET_BACKEND=vault needs RUNNERHUB_VAULT_ADDR")
        if self.vault_auth == "token" and self.vault_token is None:
            raise ValueError("RUNNERHUB_VAULT_AUTH=token needs RUNNERHUB_VAULT_TOKEN")
        return self


def secret_store(settings: SecretBackendSettings) -> SecretStore:
    """The configured backend for `*_SECRET_ID` names; clients are built here, lazily."""
    if settings.secret_backend == VAULT:
        return VaultClient(settings)
    if settings.secret_backend == FILE:
        return FileSecretStore()
    from chalicelib import aws

    return SecretsManagerClient(aws.client("secretsmanager"))


class SecretsManagerClient:
    """The Secrets Manager calls RunnerHub makes: read a secret's string, put a new version."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def read(self, secret_id: str) -> str:
        try:
            return self._client.get_secret_value(SecretId=secret_id)["SecretString"]
        except Exception as exc:
            raise _aws_error(exc) from exc

    # The name the first callers used.
    secret_string = read

    def write(self, secret_id: str, text: str) -> None:
        try:
            self._client.put_secret_value(SecretId=secret_id, SecretString=text)
            return
        except Exception as exc:
            error = _aws_error(exc)
            if not isinstance(error, SecretNotFound):
                raise error from exc
        try:
            self._client.create_secret(Name=secret_id, SecretString=text)
        except Exception as exc:
            raise _aws_error(exc) from exc


def _aws_error(exc: Exception) -> DependencyUnavailable:
    code = aws_error_code(exc)
    if code == "ResourceNotFoundException":
        return SecretNotFound("secretsmanager", "secret not found")
    return DependencyUnavailable("secretsmanager", code)


class FileSecretStore:
    """Demo only: a secret is a file's text and its name the path. Writes replace atomically."""

    def read(self, name: str) -> str:
        try:
            return Path(name).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(f"cannot read secrets file {name}: {exc.strerror}") from exc

    def write(self, name: str, text: str) -> None:
        path = Path(name)
        # Same directory, so the rename is atomic; 0600 from creation, never readable by others.
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            raise ConfigurationError(f"cannot write secrets file {name}: {exc.strerror}") from exc


class VaultClient:
    """KV v2 reads and writes as token or AWS IAM identity; hvac's errors become ours.

    An IAM login's token expires; on 403 the client logs in again once and retries.
    """

    def __init__(
        self,
        settings: SecretBackendSettings,
        *,
        hvac_client: Any = None,
        credentials: Callable[[], Any] | None = None,
    ) -> None:
        self._settings = settings
        self._client = hvac_client
        self._credentials = credentials or _aws_credentials
        self._lock = threading.Lock()
        self._logged_in = settings.vault_auth == "token"

    def read(self, path: str) -> str:
        answer = self._call(
            lambda kv: kv.read_secret_version(
                path=_path(path),
                mount_point=self._settings.vault_kv_mount,
                raise_on_deleted_version=True,
            )
        )
        return json.dumps(answer["data"]["data"])

    def write(self, path: str, text: str) -> None:
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ConfigurationError("a Vault KV secret must be a JSON object")
        self._call(
            lambda kv: kv.create_or_update_secret(
                path=_path(path), secret=data, mount_point=self._settings.vault_kv_mount
            )
        )

    def _call(self, operation: Callable[[Any], Any]) -> Any:
        import hvac.exceptions
        import requests

        for attempt in (1, 2):
            client = self._ready()
            try:
                return operation(client.secrets.kv.v2)
            except hvac.exceptions.InvalidPath as exc:
                raise SecretNotFound("vault", "secret not found") from exc
            except hvac.exceptions.Forbidden as exc:
                if attempt == 1 and self._settings.vault_auth == "aws-iam":
                    with self._lock:
                        self._logged_in = False
                    continue
                raise DependencyUnavailable("vault", "Forbidden") from exc
            except (hvac.exceptions.VaultError, requests.RequestException) as exc:
                raise DependencyUnavailable("vault", type(exc).__name__) from exc
        raise AssertionError("unreachable")

    def _ready(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._build()
            if not self._logged_in:
                self._login(self._client)
                self._logged_in = True
            return self._client

    def _build(self) -> Any:
        import hvac

        settings = self._settings
        token = settings.vault_token.get_secret_value() if settings.vault_token else ""
        # token="" rather than None: hvac would fall back to VAULT_TOKEN or ~/.vault-token.
        return hvac.Client(
            url=settings.vault_addr,
            token=token,
            namespace=settings.vault_namespace,
            verify=str(settings.vault_ca_cert) if settings.vault_ca_cert else True,
            timeout=settings.vault_timeout_s,
        )

    def _login(self, client: Any) -> None:
        import hvac.exceptions
        import requests

        credentials = self._credentials()
        try:
            client.auth.aws.iam_login(
                credentials.access_key,
                credentials.secret_key,
                credentials.token,
                header_value=self._settings.vault_aws_header,
                role=self._settings.vault_aws_role,
                use_token=True,
                mount_point=self._settings.vault_aws_mount,
            )
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise DependencyUnavailable("vault", f"AWS IAM login: {type(exc).__name__}") from exc


def _path(path: str) -> str:
    return path.strip("/")


def _aws_credentials() -> Any:
    """The process's AWS credentials (Lambda role, instance profile, env), as botocore finds
    them; hvac signs an STS GetCallerIdentity request with them for Vault to check."""
    import botocore.session

    credentials = botocore.session.get_session().get_credentials()
    if credentials is None:
        raise ConfigurationError("Vault AWS IAM auth: no AWS credentials found")
    return credentials.get_frozen_credentials()
