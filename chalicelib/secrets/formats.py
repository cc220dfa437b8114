"""Secret formats, the webhook's secret source, and the one short-TTL cache.

Webhook secrets are a list (several during a rotation's overlap), read once and cached briefly.
Sources: a backend by id (AWS Secrets Manager or Vault, `chalicelib.secrets.store`), a file
(demo), or an environment variable (local). A secret's text is either the secret itself or
JSON: a list, or `{"secrets": [...]}` (other keys, such as a rotation's progress, are ignored).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from chalicelib.errors import ConfigurationError, DependencyUnavailable
from chalicelib.secrets.store import FileSecretStore, secret_store

if TYPE_CHECKING:
    from chalicelib.settings import WebhookSettings

def parse_secret_list(text: str) -> tuple[bytes, ...]:
    """Secret text -> the secrets it holds. Raises ConfigurationError without echoing values."""
    text = text.strip()
    if text[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigurationError("webhook secret list is not valid JSON") from exc
        if isinstance(data, dict):
            data = data.get("secrets")
        if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
            raise ConfigurationError('webhook secret JSON must be a list or {"secrets": [...]}')
        values = [item for item in data if item]
    else:
        values = [text] if text else []
    if not values:
        raise ConfigurationError("no webhook secret configured")
    return tuple(value.encode() for value in values)


def parse_app_secrets(text: str) -> list[tuple[int, str]]:
    """One App or several: `{"app_id", "private_key"}`, a list of them, or `{"apps": [...]}`."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigurationError("GitHub App secret is not JSON") from exc
    if isinstance(data, dict) and "apps" in data:
        data = data["apps"]
    items = data if isinstance(data, list) else [data]
    if not items:
        raise ConfigurationError("GitHub App secret lists no App")
    return [parse_app_secret(json.dumps(item)) for item in items]


def parse_app_secret(text: str) -> tuple[int, str]:
    """GitHub App secret text `{"app_id": N, "private_key": "<PEM>"}` -> (App id, key PEM)."""
    try:
        data = json.loads(text)
        return int(data["app_id"]), str(data["private_key"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(
            'GitHub App secret must be JSON {"app_id": N, "private_key": "<PEM>"}'
        ) from exc


class CachedSecrets:
    """Calls `load` at most once per `ttl_s`; a failed refresh keeps serving the last value."""

    def __init__(
        self,
        load: Callable[[], str],
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._value: tuple[bytes, ...] | None = None
        self._loaded_at = 0.0

    def current(self) -> tuple[bytes, ...]:
        now = self._clock()
        if self._value is not None and now - self._loaded_at < self._ttl_s:
            return self._value
        with self._lock:
            if self._value is not None and now - self._loaded_at < self._ttl_s:
                return self._value
            try:
                self._value = parse_secret_list(self._load())
            except DependencyUnavailable:
                if self._value is None:
                    raise
            self._loaded_at = now
            return self._value


def file_loader(path: Path) -> Callable[[], str]:
    store = FileSecretStore()
    return lambda: store.read(str(path))


def webhook_secret_loader(settings: WebhookSettings) -> Callable[[], str]:
    """The configured webhook secret source as a `load()` for CachedSecrets."""
    if settings.webhook_secret_id:
        store = secret_store(settings)
        secret_id = settings.webhook_secret_id
        return lambda: store.read(secret_id)
    if settings.webhook_secrets_file:
        return file_loader(settings.webhook_secrets_file)
    value = settings.webhook_secrets.get_secret_value()
    return lambda: value
