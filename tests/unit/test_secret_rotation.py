"""Webhook secret rotation: the pure step table, and the Rotator on in-memory fakes (a store,
GitHub's hook config, a clock whose sleep advances it): resumable, idempotent, silent."""

from __future__ import annotations

import json
import logging

import pytest

from chalicelib.errors import DependencyUnavailable
from chalicelib.github import GitHubError
from chalicelib.secrets import rotation as r
from chalicelib.secrets.rotation import Action, Rotation, Rotator, next_action

NAME = "runnerhub/dev/webhook-secret"
OLD, NEW = "old-secret-value", "new-secret-value"
PROPAGATION, OVERLAP = 10.0, 60.0


class Store:
    def __init__(self, text: str) -> None:
        self.texts = {NAME: text}
        self.writes: list[dict] = []

    def read(self, name: str) -> str:
        return self.texts[name]

    def write(self, name: str, text: str) -> None:
        self.texts[name] = text
        self.writes.append(json.loads(text))

    def document(self) -> dict:
        return json.loads(self.texts[NAME])


class GitHub:
    def __init__(self) -> None:
        self.secrets: list[str] = []
        self.failures: list[Exception] = []

    def update_hook_config(self, secret: str) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.secrets.append(secret)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def world():
    store, github, clock = Store(OLD), GitHub(), Clock()
    fresh = iter([NEW, "another-new-value"])
    rotator = Rotator(store, NAME, github, propagation_s=PROPAGATION, overlap_s=OVERLAP,
                      clock=clock, sleep=clock.sleep, new_secret=lambda: next(fresh))
    return store, github, clock, rotator


# --- the step table --------------------------------------------------------------------------

IDLE = Rotation((OLD,))
STAGED = Rotation((NEW, OLD), "staged", staged_at=100.0)
UPDATED = Rotation((NEW, OLD), "github_updated", staged_at=100.0, github_updated_at=120.0)


@pytest.mark.parametrize(
    ("state", "now", "start", "expected"),
    [
        (IDLE, 0.0, True, Action("stage")),
        (IDLE, 0.0, False, Action("done")),
        (STAGED, 105.0, True, Action("wait", 110.0)),
        (STAGED, 110.0, False, Action("update_github")),
        (UPDATED, 150.0, True, Action("wait", 180.0)),
        (UPDATED, 180.0, False, Action("retire")),
    ],
)
def test_next_action(state, now, start, expected):
    assert next_action(state, now, PROPAGATION, OVERLAP, start) == expected


def test_document_round_trip_keeps_progress_beside_the_secrets():
    assert Rotation.parse(UPDATED.render()) == UPDATED
    assert json.loads(Rotation((NEW,)).render()) == {"secrets": [NEW]}
    assert Rotation.parse(OLD) == Rotation((OLD,))
    assert Rotation.parse(json.dumps([NEW, OLD])) == Rotation((NEW, OLD))


def test_state_repr_shows_no_secret():
    assert NEW not in repr(UPDATED) and OLD not in repr(UPDATED)


@pytest.mark.parametrize("progress", [{"step": "half-done"}, {"step": "staged"}])
def test_unknown_or_inconsistent_progress_is_refused(progress):
    # a "staged" document with a single secret has lost its old secret: do not guess
    with pytest.raises(r.ConfigurationError):
        Rotation.parse(json.dumps({"secrets": [NEW], "rotation": progress}))


# --- the whole rotation ----------------------------------------------------------------------


def test_rotation_stages_waits_updates_github_overlaps_and_retires(world, caplog):
    store, github, clock, rotator = world
    start = clock.now
    with caplog.at_level(logging.INFO, logger="runnerhub.rotation"):
        assert rotator.run(start=True) == r.EXIT_DONE
    assert [w["secrets"] for w in store.writes] == [[NEW, OLD], [NEW, OLD], [NEW]]
    assert [w.get("rotation", {}).get("step") for w in store.writes] == [
        "staged", "github_updated", None
    ]
    assert store.writes[1]["rotation"]["github_updated_at"] == start + PROPAGATION
    assert github.secrets == [NEW]
    assert clock.slept == [PROPAGATION, OVERLAP]
    messages = [record.getMessage() for record in caplog.records]
    assert any("step 1/3" in m for m in messages) and any("step 3/3" in m for m in messages)
    assert not any(secret in m for m in messages for secret in (OLD, NEW))


def test_github_failure_is_resumed_without_a_second_new_secret(world):
    store, github, _, rotator = world
    github.failures.append(GitHubError(502, "PATCH", "/app/hook/config", "Bad Gateway"))
    with pytest.raises(GitHubError):
        rotator.run(start=True)
    assert store.document()["rotation"]["step"] == "staged"
    assert rotator.run(start=True) == r.EXIT_DONE  # `rotate` again resumes; no new secret
    assert github.secrets == [NEW] and store.document() == {"secrets": [NEW]}


def test_crash_after_github_switched_repeats_the_harmless_update(world):
    store, github, _, rotator = world
    write, calls = store.write, []

    def flaky_write(name, text):  # the stage write lands, the next one (github_updated) fails
        calls.append(name)
        if len(calls) == 2:
            raise DependencyUnavailable("vault", "VaultDown")
        write(name, text)

    store.write = flaky_write
    with pytest.raises(DependencyUnavailable):
        rotator.run(start=True)
    assert store.document()["rotation"]["step"] == "staged"
    assert rotator.run(start=False) == r.EXIT_DONE
    assert github.secrets == [NEW, NEW] and store.document() == {"secrets": [NEW]}


def test_no_wait_stops_at_a_wait_and_resume_finishes_later(world):
    store, github, clock, rotator = world
    assert rotator.run(start=True, wait=False) == r.EXIT_WAITING
    assert store.document()["rotation"]["step"] == "staged" and github.secrets == []
    assert rotator.run(start=False, wait=False) == r.EXIT_WAITING  # nothing due yet
    assert len(store.writes) == 1
    clock.now += PROPAGATION
    assert rotator.run(start=False, wait=False) == r.EXIT_WAITING  # now in the overlap
    assert github.secrets == [NEW]
    clock.now += OVERLAP
    assert rotator.run(start=False, wait=False) == r.EXIT_DONE
    assert store.document() == {"secrets": [NEW]} and clock.slept == []


def test_resume_without_a_rotation_in_progress_changes_nothing(world):
    store, github, _, rotator = world
    assert rotator.run(start=False) == r.EXIT_DONE
    assert store.writes == [] and github.secrets == []


def test_a_manual_overlap_is_retired_with_the_rotation(world):
    store, _, _, rotator = world
    store.texts[NAME] = json.dumps({"secrets": ["older-a", "older-b"]})
    assert rotator.run(start=True) == r.EXIT_DONE
    assert store.writes[0]["secrets"] == [NEW, "older-a", "older-b"]
    assert store.document() == {"secrets": [NEW]}


# --- the command -----------------------------------------------------------------------------


def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("RUNNERHUB_"):
            monkeypatch.delenv(key)


def test_inline_secrets_cannot_be_rotated(monkeypatch, caplog):
    clean_env(monkeypatch)
    monkeypatch.setenv("RUNNERHUB_WEBHOOK_SECRETS", OLD)
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_SECRET_ID", "runnerhub/dev/github-app")
    assert r.main(["rotate"]) == r.EXIT_CONFIG
    assert "cannot be written" in caplog.text and OLD not in caplog.text


def test_status_prints_progress_and_no_value(monkeypatch, tmp_path, capsys):
    clean_env(monkeypatch)
    secrets_file = tmp_path / "webhook-secrets.json"
    secrets_file.write_text(STAGED.render())
    key_file = tmp_path / "app.pem"
    key_file.write_text("not used by status")
    monkeypatch.setenv("RUNNERHUB_WEBHOOK_SECRETS_FILE", str(secrets_file))
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_ID", "1")
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_KEY_FILE", str(key_file))
    assert r.main(["status"]) == r.EXIT_DONE
    out = capsys.readouterr().out
    assert json.loads(out) == {"step": "staged", "secrets": 2, "staged_at": 100.0,
                               "github_updated_at": None}
    assert NEW not in out and OLD not in out


def test_propagation_defaults_to_the_cache_ttl_plus_a_margin():
    settings = r.RotationSettings(_env_file=None, webhook_secret_id="w",
                                  github_app_secret_id="a", secret_cache_ttl_s=30)
    assert settings.propagation_s == 30 + r.PROPAGATION_MARGIN_S
