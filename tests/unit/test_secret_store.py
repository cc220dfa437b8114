"""The secret backends: Secrets Manager (mock_aws), the demo file, Vault through a fake hvac
client (token and AWS IAM auth), and hvac staying out of processes that do not use Vault.

IAM auth is tested here with a fake hvac client (OpenBao ships no `aws` auth method) and in
tests/functional/test_vault_backend.py with the real hvac against a recording Vault stand-in.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from types import SimpleNamespace

import boto3
import hvac.exceptions
import pytest
import requests
from moto import mock_aws

from chalicelib.errors import ConfigurationError, DependencyUnavailable
from chalicelib.secrets.store import (
    FileSecretStore,
    SecretBackendSettings,
    SecretNotFound,
    SecretsManagerClient,
    VaultClient,
    secret_store,
)
from tests.conftest import ROOT

# --- Secrets Manager -------------------------------------------------------------------------


@pytest.fixture
def manager():
    with mock_aws():
        client = boto3.client("secretsmanager", region_name="us-east-1")
        client.create_secret(Name="runnerhub/dev/webhook-secret", SecretString="generated")
        yield SecretsManagerClient(client)


def test_secrets_manager_reads_and_puts_new_versions(manager):
    assert manager.read("runnerhub/dev/webhook-secret") == "generated"
    manager.write("runnerhub/dev/webhook-secret", '{"secrets": ["new", "generated"]}')
    assert manager.read("runnerhub/dev/webhook-secret") == '{"secrets": ["new", "generated"]}'


def test_secrets_manager_write_creates_a_missing_secret(manager):
    manager.write("runnerhub/dev/other", "value")
    assert manager.read("runnerhub/dev/other") == "value"


def test_secrets_manager_missing_secret_is_secret_not_found(manager):
    with pytest.raises(SecretNotFound) as caught:
        manager.read("runnerhub/dev/absent")
    assert isinstance(caught.value, DependencyUnavailable)  # the webhook answers 503


def test_secrets_manager_is_the_default_store():
    with mock_aws():
        store = secret_store(SecretBackendSettings(_env_file=None))
    assert isinstance(store, SecretsManagerClient)


# --- the demo file ---------------------------------------------------------------------------


def test_file_write_replaces_atomically_and_is_private(tmp_path):
    path = tmp_path / "webhook-secrets.json"
    path.write_text("old")
    store = FileSecretStore()
    store.write(str(path), '{"secrets": ["new"]}')
    assert store.read(str(path)) == '{"secrets": ["new"]}'
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_file_write_to_a_missing_directory_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigurationError, match="cannot write"):
        FileSecretStore().write(str(tmp_path / "absent" / "file"), "x")


# --- Vault through a fake hvac client ----------------------------------------------------------


class FakeKv:
    def __init__(self, data: dict | None = None) -> None:
        self.data = dict(data or {})
        self.failures: list[Exception] = []
        self.reads = 0

    def _fail(self) -> None:
        if self.failures:
            raise self.failures.pop(0)

    def read_secret_version(self, path, mount_point, raise_on_deleted_version):
        assert raise_on_deleted_version is True
        self.reads += 1
        self._fail()
        if (mount_point, path) not in self.data:
            raise hvac.exceptions.InvalidPath("no value found at secret/data/" + path)
        return {"data": {"data": self.data[(mount_point, path)], "metadata": {"version": 1}}}

    def create_or_update_secret(self, path, secret, mount_point):
        self._fail()
        self.data[(mount_point, path)] = secret


class FakeAwsAuth:
    def __init__(self) -> None:
        self.logins: list[dict] = []
        self.failures: list[Exception] = []

    def iam_login(self, access_key, secret_key, session_token=None, **options):
        if self.failures:
            raise self.failures.pop(0)
        self.logins.append({"access_key": access_key, "secret_key": secret_key,
                            "session_token": session_token, **options})


def fake_hvac(kv: FakeKv) -> SimpleNamespace:
    return SimpleNamespace(
        secrets=SimpleNamespace(kv=SimpleNamespace(v2=kv)),
        auth=SimpleNamespace(aws=FakeAwsAuth()),
    )


def vault_settings(**values) -> SecretBackendSettings:
    base = {"secret_backend": "vault", "vault_addr": "https://vault.example:8200",
            "vault_token": "hvs.fake"}
    return SecretBackendSettings(_env_file=None, **(base | values))


def test_vault_reads_a_kv_object_as_json_text():
    kv = FakeKv({("secret", "runnerhub/dev/webhook-secret"): {"secrets": ["a", "b"]}})
    client = VaultClient(vault_settings(), hvac_client=fake_hvac(kv))
    assert json.loads(client.read("/runnerhub/dev/webhook-secret/")) == {"secrets": ["a", "b"]}


def test_vault_writes_json_objects_only():
    kv = FakeKv()
    client = VaultClient(vault_settings(vault_kv_mount="kv"), hvac_client=fake_hvac(kv))
    client.write("app", '{"app_id": 7, "private_key": "PEM"}')
    assert kv.data[("kv", "app")] == {"app_id": 7, "private_key": "PEM"}
    with pytest.raises(ConfigurationError, match="JSON object"):
        client.write("webhook", "plain-secret")


@pytest.mark.parametrize(
    ("error", "expected", "message"),
    [
        (hvac.exceptions.InvalidPath("gone"), SecretNotFound, "vault: secret not found"),
        (hvac.exceptions.Forbidden("permission denied"), DependencyUnavailable,
         "vault: Forbidden"),
        (hvac.exceptions.VaultDown("sealed"), DependencyUnavailable, "vault: VaultDown"),
        (requests.ConnectionError("refused"), DependencyUnavailable, "vault: ConnectionError"),
    ],
)
def test_vault_errors_become_ours_with_a_class_name_only(error, expected, message):
    kv = FakeKv({("secret", "p"): {"secrets": ["a"]}})
    kv.failures.append(error)
    with pytest.raises(expected) as caught:
        VaultClient(vault_settings(), hvac_client=fake_hvac(kv)).read("p")
    assert str(caught.value) == message


def test_token_auth_never_logs_in():
    hvac_client = fake_hvac(FakeKv({("secret", "p"): {"secrets": ["a"]}}))
    VaultClient(vault_settings(), hvac_client=hvac_client).read("p")
    assert hvac_client.auth.aws.logins == []


# --- Vault AWS IAM auth (fake hvac client) -----------------------------------------------------

CREDENTIALS = SimpleNamespace(access_key="AKIAFAKE", secret_key="fake-secret", token="fake-st")


def iam_client(kv: FakeKv, **values):
    hvac_client = fake_hvac(kv)
    settings = vault_settings(vault_auth="aws-iam", vault_token=None, vault_aws_role="runnerhub",
                              vault_aws_header="vault.example", **values)
    return VaultClient(settings, hvac_client=hvac_client, credentials=lambda: CREDENTIALS), (
        hvac_client.auth.aws
    )


def test_iam_auth_logs_in_once_with_the_process_credentials():
    client, auth = iam_client(FakeKv({("secret", "p"): {"secrets": ["a"]}}), vault_aws_mount="aws2")
    client.read("p")
    client.read("p")
    assert auth.logins == [{
        "access_key": "AKIAFAKE", "secret_key": "fake-secret", "session_token": "fake-st",
        "header_value": "vault.example", "role": "runnerhub", "use_token": True,
        "mount_point": "aws2",
    }]


def test_iam_auth_logs_in_again_once_when_the_token_expired():
    kv = FakeKv({("secret", "p"): {"secrets": ["a"]}})
    client, auth = iam_client(kv)
    client.read("p")
    kv.failures.append(hvac.exceptions.Forbidden("permission denied"))
    assert json.loads(client.read("p")) == {"secrets": ["a"]}
    assert len(auth.logins) == 2 and kv.reads == 3


def test_iam_auth_gives_up_after_one_fresh_login():
    kv = FakeKv({("secret", "p"): {"secrets": ["a"]}})
    client, auth = iam_client(kv)
    kv.failures += [hvac.exceptions.Forbidden("denied"), hvac.exceptions.Forbidden("denied")]
    with pytest.raises(DependencyUnavailable, match="Forbidden"):
        client.read("p")
    assert len(auth.logins) == 2


def test_iam_login_failure_is_a_dependency_failure_without_credentials():
    client, auth = iam_client(FakeKv())
    auth.failures.append(hvac.exceptions.InvalidRequest("fake-secret was wrong"))
    with pytest.raises(DependencyUnavailable) as caught:
        client.read("p")
    assert str(caught.value) == "vault: AWS IAM login: InvalidRequest"


def test_iam_auth_takes_botocore_credentials_from_the_environment(monkeypatch):
    from chalicelib.secrets import store as module

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-token")
    credentials = module._aws_credentials()
    assert (credentials.access_key, credentials.secret_key, credentials.token) == (
        "AKIAENV", "env-secret", "env-token"
    )


# --- hvac only when Vault is configured ------------------------------------------------------

CHECK_IMPORTS = """
import sys
import app
from chalicelib import wiring
from chalicelib.settings import WebhookSettings
from executor.settings import ExecutorSettings
service = wiring.build_webhook_service(WebhookSettings())
print("before-read", "hvac" in sys.modules)
try:
    service._secrets.current()
except Exception as exc:
    print("read", type(exc).__name__)
print("after-read", "hvac" in sys.modules)
"""


def run_check(tmp_path, **env) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RUNNERHUB_")}
    clean.update(AWS_ENDPOINT_URL="http://127.0.0.1:9", RUNNERHUB_EMIT_METRICS="false",
                 AWS_MAX_ATTEMPTS="1", **env)
    result = subprocess.run([sys.executable, "-c", CHECK_IMPORTS], cwd=ROOT, env=clean,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("\n")


@pytest.mark.parametrize(
    "env",
    [
        {"RUNNERHUB_WEBHOOK_SECRETS": "inline"},
        {"RUNNERHUB_WEBHOOK_SECRETS_FILE": "/nonexistent/secrets"},
        {"RUNNERHUB_WEBHOOK_SECRET_ID": "runnerhub/dev/webhook-secret"},
    ],
    ids=["inline", "file", "secretsmanager"],
)
def test_hvac_is_never_imported_without_vault(tmp_path, env):
    lines = run_check(tmp_path, **env)
    assert "before-read False" in lines and "after-read False" in lines, lines


def test_hvac_is_imported_only_once_vault_is_read(tmp_path):
    """The control: the same check does see hvac when the backend is Vault."""
    lines = run_check(tmp_path, RUNNERHUB_WEBHOOK_SECRET_ID="p", RUNNERHUB_SECRET_BACKEND="vault",
                      RUNNERHUB_VAULT_ADDR="http://127.0.0.1:9", RUNNERHUB_VAULT_TOKEN="t",
                      RUNNERHUB_VAULT_TIMEOUT_S="1")
    assert lines[:3] == ["before-read False", "read DependencyUnavailable", "after-read True"]
