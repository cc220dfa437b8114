"""Secret formats, the webhook's secret source selection, and the one short-TTL cache."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from chalicelib.errors import ConfigurationError, DependencyUnavailable
from chalicelib.secrets import (
    CachedSecrets,
    parse_app_secret,
    parse_secret_list,
    webhook_secret_loader,
)
from chalicelib.settings import WebhookSettings

# --- formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", (b"plain",)),
        ("  plain\n", (b"plain",)),
        ('["new", "old"]', (b"new", b"old")),
        ('{"secrets": ["new", "old"]}', (b"new", b"old")),
        ('{"secrets": ["new", ""]}', (b"new",)),
        # a rotation's progress rides along in the same document and is ignored here
        ('{"secrets": ["new", "old"], "rotation": {"step": "staged"}}', (b"new", b"old")),
    ],
)
def test_secret_list_formats(text, expected):
    assert parse_secret_list(text) == expected


@pytest.mark.parametrize(
    "text", ["", "   ", "[]", '{"secrets": []}', '{"other": ["x"]}', "[1]", "{not json"]
)
def test_unusable_secret_list_is_a_configuration_error(text):
    with pytest.raises(ConfigurationError):
        parse_secret_list(text)


def test_invalid_json_error_does_not_echo_the_text():
    with pytest.raises(ConfigurationError) as caught:
        parse_secret_list('["s3cr3t-value"')
    assert "s3cr3t" not in str(caught.value)


def test_app_secret_format():
    assert parse_app_secret('{"app_id": "42", "private_key": "PEM"}') == (42, "PEM")


@pytest.mark.parametrize("text", ["PEM", '{"app_id": 1}', '{"private_key": "PEM"}', "[]"])
def test_bad_app_secret_names_the_format_not_the_value(text):
    with pytest.raises(ConfigurationError, match="app_id") as caught:
        parse_app_secret(text)
    assert "PEM" not in str(caught.value).replace("<PEM>", "")


# --- the cache -------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cache_loads_once_per_ttl():
    clock, loads = Clock(), []
    cache = CachedSecrets(lambda: loads.append(1) or f"v{len(loads)}", ttl_s=2, clock=clock)
    assert cache.current() == (b"v1",)
    clock.now += 1.9
    assert cache.current() == (b"v1",) and len(loads) == 1
    clock.now += 0.1
    assert cache.current() == (b"v2",) and len(loads) == 2


def test_cache_keeps_last_value_when_a_refresh_fails():
    clock, answers = Clock(), ["v1"]

    def load():
        if not answers:
            raise DependencyUnavailable("vault", "VaultDown")
        return answers.pop()

    cache = CachedSecrets(load, ttl_s=1, clock=clock)
    assert cache.current() == (b"v1",)
    clock.now += 5
    assert cache.current() == (b"v1",)


def test_cache_without_any_value_raises_the_backend_failure():
    def load():
        raise DependencyUnavailable("secretsmanager", "ThrottlingException")

    with pytest.raises(DependencyUnavailable):
        CachedSecrets(load, ttl_s=1).current()


# --- the webhook's source --------------------------------------------------------------------


def settings(**values) -> WebhookSettings:
    return WebhookSettings(_env_file=None, **values)


def test_inline_secrets_source():
    assert webhook_secret_loader(settings(webhook_secrets='["a", "b"]'))() == '["a", "b"]'


def test_file_source_rereads_the_file(tmp_path):
    path = tmp_path / "secrets.json"
    path.write_text('{"secrets": ["one"]}')
    load = webhook_secret_loader(settings(webhook_secrets_file=path))
    assert parse_secret_list(load()) == (b"one",)
    path.write_text('{"secrets": ["two", "one"]}')
    assert parse_secret_list(load()) == (b"two", b"one")


def test_missing_file_is_a_configuration_error(tmp_path):
    load = webhook_secret_loader(settings(webhook_secrets_file=tmp_path / "absent"))
    with pytest.raises(ConfigurationError, match="cannot read"):
        load()


def test_exactly_one_webhook_secret_source():
    with pytest.raises(ValidationError):
        settings()
    with pytest.raises(ValidationError):
        settings(webhook_secrets="a", webhook_secret_id="runnerhub/dev/webhook-secret")


def test_vault_backend_needs_an_address_and_for_token_auth_a_token():
    with pytest.raises(ValidationError, match="RUNNERHUB_VAULT_ADDR"):
        settings(webhook_secret_id="p", secret_backend="vault")
    with pytest.raises(ValidationError, match="RUNNERHUB_VAULT_TOKEN"):
        settings(webhook_secret_id="p", secret_backend="vault", vault_addr="http://127.0.0.1:1")
    iam = settings(webhook_secret_id="p", secret_backend="vault",
                   vault_addr="http://127.0.0.1:1", vault_auth="aws-iam")
    assert iam.vault_token is None and iam.vault_aws_mount == "aws"


def test_vault_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("RUNNERHUB_WEBHOOK_SECRET_ID", "runnerhub/dev/webhook-secret")
    monkeypatch.setenv("RUNNERHUB_SECRET_BACKEND", "vault")
    monkeypatch.setenv("RUNNERHUB_VAULT_ADDR", "https://vault.internal:8200")
    monkeypatch.setenv("RUNNERHUB_VAULT_TOKEN", "hvs.token-value")
    loaded = WebhookSettings()
    assert loaded.secret_backend == "vault" and loaded.vault_kv_mount == "secret"
    assert "token-value" not in repr(loaded)


def test_secrets_manager_is_the_default_backend_for_ids():
    assert settings(webhook_secret_id="runnerhub/dev/webhook-secret").secret_backend == (
        "secretsmanager"
    )
