"""Webhook secret rotation with an overlap: no delivery is refused while GitHub switches.

    python -m chalicelib.rotation rotate [--no-wait]   # start (or resume) and finish a rotation
    python -m chalicelib.rotation resume [--no-wait]   # only continue one in progress
    python -m chalicelib.rotation status               # where it stands (never any value)

Steps, each recorded in the webhook secret document itself so any run can resume:
1. stage: write `{"secrets": [new, old...], "rotation": {...}}`; the webhook accepts both.
2. wait `propagation_s` (longer than the webhook's secret cache TTL), so every webhook
   container has the new secret before GitHub signs with it.
3. update GitHub: `PATCH /app/hook/config` with the new secret (App JWT); repeating is harmless.
4. wait `overlap_s`: deliveries signed with the old secret (in flight, retried) still pass.
5. retire: write `{"secrets": [new]}`.

A crash between a write and the next leaves a state the next run continues from. Run one
rotation at a time: the backends offer no compare-and-set here. No secret value is ever
printed or logged; logs say which step ran and how many secrets are accepted.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

from aws_lambda_powertools import Logger
from pydantic import Field, ValidationError, model_validator
from pydantic_settings import SettingsConfigDict

from chalicelib.errors import ConfigurationError, RunnerHubError, validation_summary
from chalicelib.secrets.formats import parse_app_secret, parse_secret_list
from chalicelib.secrets.store import (
    FileSecretStore,
    SecretBackendSettings,
    SecretStore,
    secret_store,
)
from chalicelib.settings import require_app_credentials

# A command's log goes to stderr: stdout is for `status`.
logger = Logger(service="runnerhub.rotation", stream=sys.stderr)

EXIT_DONE, EXIT_FAILED, EXIT_CONFIG, EXIT_WAITING = 0, 1, 2, 3
# GitHub's webhook secret has no documented length limit; 32 random bytes as hex, like
# `openssl rand -hex 32` in GitHub's own guidance.
NEW_SECRET_BYTES = 32
# Added to the cache TTL: clock skew and a slow backend read.
PROPAGATION_MARGIN_S = 5.0

Step = Literal["idle", "staged", "github_updated"]


class HookConfig(Protocol):
    def update_hook_config(self, secret: str) -> None: ...


class RotationSettings(SecretBackendSettings):
    model_config = SettingsConfigDict(env_prefix="RUNNERHUB_", frozen=True, extra="ignore")

    # The webhook secret, as the webhook reads it (an inline RUNNERHUB_WEBHOOK_SECRETS cannot
    # be written, so it cannot be rotated here).
    webhook_secret_id: str | None = None
    webhook_secrets_file: Path | None = None
    # The App whose webhook config is updated, as the executor reads it.
    github_api_url: str = "https://api.github.com"
    github_app_secret_id: str | None = None
    github_app_id: int | None = Field(None, gt=0)
    github_app_key_file: Path | None = None
    # The webhook's cache TTL: the new secret must reach every container before GitHub uses it.
    secret_cache_ttl_s: float = Field(60.0, ge=0, le=3600)
    rotation_propagation_s: float | None = Field(None, ge=0)
    # How long the old secret stays accepted after GitHub switched to the new one.
    rotation_overlap_s: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _sources(self) -> RotationSettings:
        if (self.webhook_secret_id is None) == (self.webhook_secrets_file is None):
            raise ValueError(
                "set one of RUNNERHUB_WEBHOOK_SECRET_ID, RUNNERHUB_WEBHOOK_SECRETS_FILE (an "
                "inline RUNNERHUB_WEBHOOK_SECRETS cannot be written, so not rotated)"
            )
        require_app_credentials(self)
        return self

    @property
    def propagation_s(self) -> float:
        if self.rotation_propagation_s is not None:
            return self.rotation_propagation_s
        return self.secret_cache_ttl_s + PROPAGATION_MARGIN_S


# --- the state, as stored in the webhook secret document ------------------------------------


@dataclass(frozen=True)
class Rotation:
    """The secret document: `secrets[0]` is the newest; `step` says what was done last."""

    secrets: tuple[str, ...]
    step: Step = "idle"
    staged_at: float | None = None
    github_updated_at: float | None = None

    def __repr__(self) -> str:  # never show values, even in a traceback
        return f"Rotation(step={self.step!r}, secrets={len(self.secrets)})"

    @classmethod
    def parse(cls, text: str) -> Rotation:
        values = tuple(value.decode() for value in parse_secret_list(text))
        try:
            progress = json.loads(text).get("rotation") or {}
        except (ValueError, AttributeError):
            progress = {}
        step = progress.get("step", "idle")
        if step not in ("idle", "staged", "github_updated") or (
            step != "idle" and len(values) < 2
        ):
            raise ConfigurationError(f"webhook secret holds an unknown rotation step {step!r}")
        return cls(values, step, progress.get("staged_at"), progress.get("github_updated_at"))

    def render(self) -> str:
        document: dict = {"secrets": list(self.secrets)}
        if self.step != "idle":
            document["rotation"] = {
                "step": self.step,
                "staged_at": self.staged_at,
                "github_updated_at": self.github_updated_at,
            }
        return json.dumps(document)


@dataclass(frozen=True)
class Action:
    kind: Literal["stage", "wait", "update_github", "retire", "done"]
    until: float = 0.0


def next_action(state: Rotation, now: float, propagation_s: float, overlap_s: float,
                start: bool) -> Action:
    """What to do next (pure): the whole procedure is this table."""
    if state.step == "idle":
        return Action("stage") if start else Action("done")
    if state.step == "staged":
        ready = (state.staged_at or 0.0) + propagation_s
        return Action("wait", ready) if now < ready else Action("update_github")
    ready = (state.github_updated_at or 0.0) + overlap_s
    return Action("wait", ready) if now < ready else Action("retire")


def stage(state: Rotation, new_secret: str, now: float) -> Rotation:
    return Rotation((new_secret, *state.secrets), "staged", staged_at=now)


def retire(state: Rotation) -> Rotation:
    return Rotation(state.secrets[:1])


# --- acting -----------------------------------------------------------------------------------


class Rotator:
    """Carries a rotation out against one secret store and one GitHub App."""

    def __init__(
        self,
        store: SecretStore,
        name: str,
        github: HookConfig,
        *,
        propagation_s: float,
        overlap_s: float,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        new_secret: Callable[[], str] = lambda: secrets.token_hex(NEW_SECRET_BYTES),
    ) -> None:
        self._store = store
        self._name = name
        self._github = github
        self._propagation_s = propagation_s
        self._overlap_s = overlap_s
        self._clock = clock
        self._sleep = sleep
        self._new_secret = new_secret

    def status(self) -> Rotation:
        return Rotation.parse(self._store.read(self._name))

    def run(self, start: bool, wait: bool = True) -> int:
        """Do every step that is due; EXIT_DONE at the end, EXIT_WAITING if told not to wait."""
        state = self.status()
        if state.step != "idle":
            logger.info("resuming the rotation in progress (last step done: %s)", state.step)
        while True:
            now = self._clock()
            action = next_action(state, now, self._propagation_s, self._overlap_s, start)
            if action.kind == "done":
                logger.info("no rotation in progress; %d secret(s) accepted",
                            len(state.secrets))
                return EXIT_DONE
            if action.kind == "wait":
                left = action.until - now
                what = ("webhook caches to load the new secret" if state.step == "staged"
                        else "the overlap, old secret still accepted")
                if not wait:
                    logger.info("waiting %.0f s for %s: run `resume` after that", left, what)
                    return EXIT_WAITING
                logger.info("waiting %.1f s for %s", left, what)
                self._sleep(left)
                continue
            if action.kind == "stage":
                state = stage(state, self._new_secret(), now)
                self._store.write(self._name, state.render())
                logger.info("step 1/3 staged a new webhook secret: %d secret(s) accepted",
                            len(state.secrets))
            elif action.kind == "update_github":
                self._github.update_hook_config(state.secrets[0])
                state = replace(state, step="github_updated", github_updated_at=self._clock())
                self._store.write(self._name, state.render())
                logger.info("step 2/3 GitHub signs with the new secret (PATCH /app/hook/config);"
                            " old one accepted for %.0f s more", self._overlap_s)
            else:
                retired = len(state.secrets) - 1
                state = retire(state)
                self._store.write(self._name, state.render())
                logger.info("step 3/3 retired %d old secret(s): rotation complete", retired)
                return EXIT_DONE


def build(settings: RotationSettings) -> Rotator:
    from chalicelib.github import GitHubApp

    store: SecretStore
    if settings.webhook_secret_id:
        store, name = secret_store(settings), settings.webhook_secret_id
    else:
        store, name = FileSecretStore(), str(settings.webhook_secrets_file)
    if settings.github_app_secret_id:
        source = store if settings.webhook_secret_id else secret_store(settings)
        app_id, key = parse_app_secret(source.read(settings.github_app_secret_id))
    else:
        app_id, key = settings.github_app_id, settings.github_app_key_file.read_text()
    return Rotator(
        store, name, GitHubApp(app_id, key, settings.github_api_url),
        propagation_s=settings.propagation_s, overlap_s=settings.rotation_overlap_s,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chalicelib.rotation", description="Rotate the GitHub webhook secret."
    )
    parser.add_argument("command", choices=("rotate", "resume", "status"))
    parser.add_argument("--no-wait", action="store_true",
                        help="do the steps that are due, then exit 3 if a wait remains")
    args = parser.parse_args(argv)
    try:
        rotator = build(RotationSettings())
        if args.command == "status":
            state = rotator.status()
            print(json.dumps({"step": state.step, "secrets": len(state.secrets),
                              "staged_at": state.staged_at,
                              "github_updated_at": state.github_updated_at}))
            return EXIT_DONE
        return rotator.run(start=args.command == "rotate", wait=not args.no_wait)
    except ValidationError as exc:
        logger.error("invalid configuration: %s", validation_summary(exc, "settings"))
        return EXIT_CONFIG
    except ConfigurationError as exc:
        logger.error("invalid configuration: %s", exc)
        return EXIT_CONFIG
    except RunnerHubError as exc:
        # GitHubError and backend errors carry no secret; the step can be resumed.
        logger.error("failed, run `resume` to continue: %s", exc)
        return EXIT_FAILED


if __name__ == "__main__":  # python -m chalicelib.secrets.rotation (or chalicelib.rotation)
    sys.exit(main())
