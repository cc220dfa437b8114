"""The Vault backend against a real OpenBao dev server (token auth), and AWS IAM auth through
the real hvac against a recording Vault stand-in (OpenBao ships no `aws` auth method)."""

from __future__ import annotations

import base64
import json
import threading

import pytest
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from chalicelib.errors import DependencyUnavailable
from chalicelib.secrets import CachedSecrets, webhook_secret_loader
from chalicelib.secrets.store import SecretBackendSettings, SecretNotFound, VaultClient
from chalicelib.settings import WebhookSettings
from devstack.aws_server import QuietHandler
from executor.settings import ExecutorSettings


def token_settings(vault, **values) -> dict:
    return {"secret_backend": "vault", "vault_addr": vault.address,
            "vault_token": vault.token, **values}


@pytest.fixture
def client(vault_server):
    return VaultClient(SecretBackendSettings(_env_file=None, **token_settings(vault_server)))


def test_write_then_read_latest_version(client, vault_server, unique):
    path = f"runnerhub/{unique}/webhook-secret"
    client.write(path, '{"secrets": ["one"]}')
    client.write(path, '{"secrets": ["two", "one"]}')
    assert json.loads(client.read(path)) == {"secrets": ["two", "one"]}
    assert vault_server.get(path) == {"secrets": ["two", "one"]}


def test_missing_and_deleted_secrets_are_not_found(client, vault_server, unique):
    with pytest.raises(SecretNotFound):
        client.read(f"runnerhub/{unique}/absent")
    path = f"runnerhub/{unique}/deleted"
    client.write(path, '{"secrets": ["one"]}')
    vault_server._request("DELETE", f"/v1/secret/data/{path}")  # soft-delete the latest version
    with pytest.raises(SecretNotFound):
        client.read(path)


def test_wrong_token_is_forbidden_and_says_nothing_of_the_token(vault_server, unique):
    settings = token_settings(vault_server, vault_token="not-the-token")
    client = VaultClient(SecretBackendSettings(_env_file=None, **settings))
    with pytest.raises(DependencyUnavailable) as caught:
        client.read(f"runnerhub/{unique}/webhook-secret")
    assert str(caught.value) == "vault: Forbidden"


def test_unreachable_vault_is_a_dependency_failure():
    settings = {"secret_backend": "vault", "vault_addr": "http://127.0.0.1:9",
                "vault_token": "t", "vault_timeout_s": 1}
    with pytest.raises(DependencyUnavailable, match=r"^vault: ConnectionError$"):
        VaultClient(SecretBackendSettings(_env_file=None, **settings)).read("p")


def test_webhook_source_reads_vault_and_sees_a_new_version(vault_server, unique):
    path = f"runnerhub/{unique}/webhook-secret"
    vault_server.put(path, {"secrets": ["first"]})
    settings = WebhookSettings(_env_file=None, webhook_secret_id=path,
                               **token_settings(vault_server))
    cache = CachedSecrets(webhook_secret_loader(settings), ttl_s=0)
    assert cache.current() == (b"first",)
    vault_server.put(path, {"secrets": ["second", "first"]})
    assert cache.current() == (b"second", b"first")


def test_executor_reads_the_app_credentials_from_vault(vault_server, unique):
    path = f"runnerhub/{unique}/github-app"
    vault_server.put(path, {"app_id": 424001, "private_key": "-----BEGIN KEY-----"})
    settings = ExecutorSettings(_env_file=None, github_app_secret_id=path,
                                **token_settings(vault_server))
    assert settings.app_credentials() == [(424001, "-----BEGIN KEY-----")]


# --- AWS IAM auth: the real hvac, a Vault stand-in that records what Vault would check --------


class IamVault:
    """Answers `auth/<mount>/login` and KV v2 reads; expires its token on demand."""

    def __init__(self) -> None:
        self.logins: list[dict] = []
        self.token = ""
        self.server = make_server("127.0.0.1", 0, self, threaded=True,
                                  request_handler=QuietHandler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.address = f"http://127.0.0.1:{self.server.server_port}"

    def __call__(self, environ, start_response):
        request = Request(environ)
        if request.path == "/v1/auth/aws-test/login" and request.method in ("POST", "PUT"):
            self.logins.append(json.loads(request.get_data()))
            self.token = f"s.iam-{len(self.logins)}"
            body = {"auth": {"client_token": self.token, "lease_duration": 60}}
            return Response(json.dumps(body), 200, content_type="application/json")(
                environ, start_response)
        if request.headers.get("X-Vault-Token") != self.token or not self.token:
            return Response('{"errors":["permission denied"]}', 403,
                            content_type="application/json")(environ, start_response)
        body = {"data": {"data": {"secrets": ["from-iam"]}, "metadata": {"version": 1}}}
        return Response(json.dumps(body), 200, content_type="application/json")(
            environ, start_response)


@pytest.fixture
def iam_vault():
    vault = IamVault()
    yield vault
    vault.server.shutdown()


def test_iam_login_signs_sts_get_caller_identity_with_the_process_credentials(
    iam_vault, monkeypatch
):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "example-session")
    settings = SecretBackendSettings(
        _env_file=None, secret_backend="vault", vault_addr=iam_vault.address,
        vault_auth="aws-iam", vault_aws_role="runnerhub-webhook", vault_aws_mount="aws-test",
        vault_aws_header="vault.example.com",
    )
    client = VaultClient(settings)
    assert json.loads(client.read("runnerhub/dev/webhook-secret")) == {"secrets": ["from-iam"]}

    [login] = iam_vault.logins
    assert login["role"] == "runnerhub-webhook"
    assert login["iam_http_request_method"] == "POST"
    assert base64.b64decode(login["iam_request_url"]) == b"https://sts.amazonaws.com/"
    assert base64.b64decode(login["iam_request_body"]) == (
        b"Action=GetCallerIdentity&Version=2011-06-15"
    )
    headers = json.loads(base64.b64decode(login["iam_request_headers"]))
    authorization = headers["Authorization"][0]
    assert authorization.startswith("AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE/")
    assert "/us-east-1/sts/aws4_request" in authorization
    # the server id header is signed, so Vault can refuse a request replayed elsewhere
    assert headers["X-Vault-AWS-IAM-Server-ID"] == ["vault.example.com"]
    assert "x-vault-aws-iam-server-id" in authorization
    assert headers["X-Amz-Security-Token"] == ["example-session"]
    assert "example-secret" not in json.dumps(login)

    iam_vault.token = "s.expired-by-vault"  # the login token expired: log in again, once
    assert json.loads(client.read("runnerhub/dev/webhook-secret")) == {"secrets": ["from-iam"]}
    assert len(iam_vault.logins) == 2
