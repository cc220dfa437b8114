"""Webhook secrets: a list (several during a rotation's overlap), read once and cached briefly.

Sources: AWS Secrets Manager by id (deployed), an environment variable or a file (local). A
secret's text is either the secret itself or JSON: a list, or `{"secrets": [...]}`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chalicelib.errors import ConfigurationError, DependencyUnavailable, aws_error_code


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


class SecretsManagerClient:
    """The one Secrets Manager call RunnerHub makes."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def secret_string(self, secret_id: str) -> str:
        try:
            return self._client.get_secret_value(SecretId=secret_id)["SecretString"]
        except Exception as exc:
            raise DependencyUnavailable("secretsmanager", aws_error_code(exc)) from exc


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
    def load() -> str:
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read webhook secrets file {path}: {exc.strerror}"
            ) from exc
    return load
