"""The rotation command on the demo's file backend against the GitHub emulator over HTTP:
`--no-wait` stops at the overlap, `resume` finishes, a refused App JWT is resumable."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest

from chalicelib.secrets import rotation as r

OLD = "old-demo-secret-51c2"
APP_ID = 424_777


@pytest.fixture
def demo(tmp_path, monkeypatch):
    from emulator import AppConfig, Emulator, EmulatorConfig, InstallationConfig
    from emulator.testing import generate_app_key

    private_key, public_key = generate_app_key()
    emulator = Emulator(EmulatorConfig(
        apps=[AppConfig(app_id=APP_ID, public_key_pem=public_key,
                        installations=[InstallationConfig(id=10, account="octo-org")])],
        webhook_secret=OLD,
    )).start()
    secrets_file, key_file = tmp_path / "webhook-secrets", tmp_path / "app.pem"
    secrets_file.write_text(OLD + "\n")  # a plain secret, as first configured
    key_file.write_text(private_key)
    for key in list(os.environ):
        if key.startswith("RUNNERHUB_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("RUNNERHUB_WEBHOOK_SECRETS_FILE", str(secrets_file))
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_ID", str(APP_ID))
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_KEY_FILE", str(key_file))
    monkeypatch.setenv("RUNNERHUB_GITHUB_API_URL", emulator.base_url)
    monkeypatch.setenv("RUNNERHUB_ROTATION_PROPAGATION_S", "0")
    monkeypatch.setenv("RUNNERHUB_ROTATION_OVERLAP_S", "600")
    yield emulator, secrets_file, key_file
    emulator.stop()


def document(path) -> dict:
    return json.loads(path.read_text())


def test_no_wait_then_resume_on_the_file_backend(demo, monkeypatch, caplog, capsys):
    emulator, secrets_file, _ = demo
    caplog.set_level(logging.INFO, logger="runnerhub.rotation")
    assert r.main(["rotate", "--no-wait"]) == r.EXIT_WAITING
    staged = document(secrets_file)
    assert staged["rotation"]["step"] == "github_updated" and staged["secrets"][1] == OLD
    new = staged["secrets"][0]
    assert emulator.sender.secret == new
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600

    assert r.main(["status"]) == r.EXIT_DONE
    assert json.loads(capsys.readouterr().out)["step"] == "github_updated"
    assert r.main(["resume", "--no-wait"]) == r.EXIT_WAITING  # still in the overlap

    monkeypatch.setenv("RUNNERHUB_ROTATION_OVERLAP_S", "0")
    assert r.main(["resume", "--no-wait"]) == r.EXIT_DONE
    assert document(secrets_file) == {"secrets": [new]}
    assert r.main(["resume"]) == r.EXIT_DONE  # nothing in progress: nothing changes
    assert document(secrets_file) == {"secrets": [new]}
    logged = caplog.text + capsys.readouterr().out
    assert OLD not in logged and new not in logged


def test_github_refusing_the_app_jwt_leaves_a_resumable_rotation(demo, monkeypatch, caplog):
    from emulator.testing import generate_app_key

    emulator, secrets_file, key_file = demo
    good_key = key_file.read_text()
    key_file.write_text(generate_app_key()[0])  # not the App's key: 401 from GitHub
    assert r.main(["rotate", "--no-wait"]) == r.EXIT_FAILED
    assert "401" in caplog.text and "resume" in caplog.text
    assert document(secrets_file)["rotation"]["step"] == "staged"
    assert emulator.sender.secret == OLD

    key_file.write_text(good_key)
    monkeypatch.setenv("RUNNERHUB_ROTATION_OVERLAP_S", "0")
    assert r.main(["resume"]) == r.EXIT_DONE
    [new] = document(secrets_file)["secrets"]
    assert emulator.sender.secret == new != OLD
    assert new not in caplog.text and OLD not in caplog.text
