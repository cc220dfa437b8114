"""The stand-in runner's start-up model and the emulator's ground truth for warm runners:
each runner's life (created, registered, listening, its job, removed) and each job's warm hit."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from pydantic import ValidationError

from emulator import Emulator, EmulatorConfig
from emulator.__main__ import build_config, parse_args
from emulator.config import MAX_RUNNER_STARTUP_S
from emulator.standin_runner import decode_jit
from emulator.state import Scope, decode_jit_config
from emulator.testing import InProcessRunner
from tests.conftest import wait_for

STANDIN = Path(__file__).resolve().parents[2] / "emulator" / "standin_runner.py"
ORG = Scope("org", "octo-org")
GROUP = (1, "Default", False)
LABELS = ["self-hosted", "linux"]


@pytest.fixture
def emu():
    with Emulator(EmulatorConfig(acquire_timeout_s=2.0, lost_runner_timeout_s=2.0)) as emulator:
        yield emulator


def new_blob(emu: Emulator, name: str) -> str:
    _, blob = emu.state.create_runner(ORG, name, LABELS, GROUP)
    return blob


def record_of(emu: Emulator, name: str) -> dict:
    return next(r for r in emu.runner_records() if r["name"] == name)


def spawn_standin(tmp_path: Path, blob: str, *extra: str) -> subprocess.Popen:
    path = tmp_path / f"jit-{time.monotonic_ns()}"
    path.write_text(blob)
    return subprocess.Popen(
        [sys.executable, str(STANDIN), "--jitconfig-file", str(path), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def reencode(blob: str, **changes) -> str:
    """The same JIT config with fields changed (None removes one), as another emulator
    version might have written it."""
    doc = json.loads(base64.b64decode(blob))
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return base64.b64encode(json.dumps(doc).encode()).decode()


# -- the start-up in the JIT config -----------------------------------------------------------


def test_jit_config_carries_the_startup_in_force_when_it_was_issued():
    with Emulator(EmulatorConfig(runner_startup_s=0.5)) as emu:
        first = new_blob(emu, "first")
        assert emu.set_runner_startup(1.25) == 1.25
        second = new_blob(emu, "second")
        assert decode_jit_config(first)["startup_s"] == 0.5
        assert decode_jit_config(second)["startup_s"] == 1.25
        assert decode_jit(second) == (emu.runner_url, 1.25)
        # A runner keeps the start-up of its own config.
        assert record_of(emu, "first")["startup_s"] == 0.5
        assert record_of(emu, "second")["startup_s"] == 1.25


def test_default_startup_is_zero_so_tests_stay_fast(emu):
    assert emu.runner_startup_s == 0.0
    assert decode_jit_config(new_blob(emu, "r"))["startup_s"] == 0.0


def test_old_blob_without_startup_field_registers_at_once(emu):
    blob = reencode(new_blob(emu, "old"), startup_s=None)
    assert "startup_s" not in json.loads(base64.b64decode(blob))
    assert decode_jit(blob) == (emu.runner_url, 0.0)
    runner = InProcessRunner(blob, idle_timeout=0.1).start()
    # start() returns registered when there is no start-up to sleep through.
    assert record_of(emu, "old")["registered_at"] is not None
    assert runner.join(5), "the in-process runner did not end after its idle timeout"
    assert runner.error is None


@pytest.mark.parametrize("bad", [-1, "5", True, float("nan"), MAX_RUNNER_STARTUP_S + 1, [1]])
def test_standin_rejects_a_blob_with_a_bad_startup(emu, bad):
    blob = reencode(new_blob(emu, "bad"), startup_s=bad)
    with pytest.raises(ValueError, match="not a valid encoded JIT config"):
        decode_jit(blob)


def test_standin_process_exits_2_on_a_bad_startup(emu, tmp_path):
    proc = spawn_standin(tmp_path, reencode(new_blob(emu, "bad"), startup_s=-3))
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 2
    assert "standin-runner: error: the JIT config is not a valid encoded JIT config" in err
    assert record_of(emu, "bad")["registered_at"] is None


# -- the stand-in waits ------------------------------------------------------------------------


def test_standin_process_sleeps_through_its_startup_before_registering(emu, tmp_path):
    emu.set_runner_startup(0.5)
    proc = spawn_standin(tmp_path, new_blob(emu, "slow"), "--idle-timeout", "0.2")
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "starting up for 0.5s" in out
    rec = record_of(emu, "slow")
    assert rec["registered_at"] - rec["created_at"] >= 0.5, rec
    assert rec["listening_at"] - rec["created_at"] >= 0.5, rec
    assert rec["listening_at"] >= rec["registered_at"]
    # Idle timeout: it disconnected, but GitHub keeps it listed until it is deleted.
    assert rec["disconnected_at"] is not None and rec["deleted_at"] is None


def test_in_process_runner_sleeps_through_its_startup_in_its_thread(emu):
    emu.set_runner_startup(0.3)
    t0 = time.monotonic()
    runner = InProcessRunner(new_blob(emu, "inproc"), idle_timeout=0.1).start()
    assert time.monotonic() - t0 < 0.3, "start() must not block through the start-up"
    assert runner.join(5) and runner.error is None
    rec = record_of(emu, "inproc")
    assert rec["listening_at"] - rec["created_at"] >= 0.3, rec


def test_sigterm_during_startup_exits_0_without_registering(emu, tmp_path):
    emu.set_runner_startup(30.0)
    proc = spawn_standin(tmp_path, new_blob(emu, "term"))
    try:
        line = proc.stdout.readline()  # bounded: the stand-in prints it before sleeping
        assert "starting up for 30s" in line, line
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, err
    assert "terminated during start-up: not registered" in out
    rec = record_of(emu, "term")
    assert rec["registered_at"] is None and rec["listening_at"] is None, rec
    assert emu.runners()[0]["registered"] is False


# -- setting the start-up ------------------------------------------------------------------------


def test_control_endpoint_sets_the_startup(emu):
    url = f"{emu.root_url}/_emulator/runner-startup"
    resp = requests.post(url, json={"seconds": 2.5}, timeout=5)
    assert resp.status_code == 200 and resp.json() == {"seconds": 2.5}
    assert requests.get(url, timeout=5).json() == {"seconds": 2.5}
    assert decode_jit_config(new_blob(emu, "r"))["startup_s"] == 2.5


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"seconds": -0.1}, "between 0 and 600"),
        ({"seconds": 601}, "between 0 and 600"),
        ({"seconds": "3"}, "must be a number"),
        ({"seconds": True}, "must be a number"),
        ({"seconds": None}, "must be a number"),
        ({}, '"seconds"'),
    ],
)
def test_control_endpoint_answers_400_with_the_reason(emu, body, reason):
    emu.set_runner_startup(1.0)
    url = f"{emu.root_url}/_emulator/runner-startup"
    resp = requests.post(url, json=body, timeout=5)
    assert resp.status_code == 400, resp.text
    assert reason in resp.json()["message"]
    assert emu.runner_startup_s == 1.0  # unchanged


@pytest.mark.parametrize("raw", ["NaN?", '{"seconds": NaN}', '{"seconds": Infinity}', "[5]"])
def test_control_endpoint_answers_400_to_a_body_that_is_not_a_json_object_of_a_number(emu, raw):
    resp = requests.post(f"{emu.root_url}/_emulator/runner-startup", data=raw, timeout=5)
    assert resp.status_code == 400, resp.text
    assert emu.runner_startup_s == 0.0


def test_in_process_setter_and_config_reject_bad_values(emu):
    with pytest.raises(ValueError, match="between 0 and 600"):
        emu.set_runner_startup(-1)
    with pytest.raises(ValueError, match="must be a number"):
        emu.set_runner_startup("1")
    with pytest.raises(ValidationError, match="between 0 and 600"):
        EmulatorConfig(runner_startup_s=float("inf"))
    assert emu.runner_startup_s == 0.0


def test_command_line_flag_sets_the_startup():
    assert build_config(parse_args(["--runner-startup-s", "5"])).runner_startup_s == 5.0
    assert build_config(parse_args([])).runner_startup_s == 0.0
    with pytest.raises(SystemExit) as exc:
        parse_args(["--runner-startup-s", "-2"])
    assert exc.value.code == 2


# -- runner records ----------------------------------------------------------------------------


def test_runner_records_survive_removal(emu):
    blob_done = new_blob(emu, "done")
    new_blob(emu, "deleted")
    runner = InProcessRunner(blob_done, idle_timeout=5).start()
    job_id = emu.add_job(repository="octo-org/app", labels=LABELS, duration_s=0)
    assert runner.join(5) and runner.error is None
    deleted_id = record_of(emu, "deleted")["runner_id"]
    emu.state.delete_runner(ORG, deleted_id)

    assert emu.runners() == []  # GitHub lists neither any more
    done, deleted = record_of(emu, "done"), record_of(emu, "deleted")
    assert done["job_id"] == job_id and done["removed_by"] == "job_done"
    assert done["taken_at"] == emu.job(job_id)["taken_at"]
    assert done["created_at"] <= done["registered_at"] <= done["listening_at"] <= done["taken_at"]
    assert done["taken_at"] <= done["deleted_at"]
    assert done["labels"] == LABELS and done["scope"] == {"kind": "org", "name": "octo-org"}
    assert deleted["removed_by"] == "delete" and deleted["deleted_at"] is not None
    assert deleted["registered_at"] is None and deleted["job_id"] is None
    # Over HTTP, the same list.
    resp = requests.get(f"{emu.root_url}/_emulator/runner-records", timeout=5)
    assert resp.json() == {"runners": emu.runner_records()}


def test_lost_runner_record_says_so():
    with Emulator(EmulatorConfig(lost_runner_timeout_s=0.3, acquire_timeout_s=1.0)) as emu:
        runner = InProcessRunner(new_blob(emu, "silent"), heartbeat=False).start()
        emu.add_job(repository="octo-org/app", labels=LABELS, duration_s=30)
        assert runner.join(5)
        assert wait_for(lambda: record_of(emu, "silent")["deleted_at"] is not None, 5)
        assert record_of(emu, "silent")["removed_by"] == "lost_runner_timeout"


# -- warm hits -------------------------------------------------------------------------------


def test_job_taken_by_a_runner_listening_before_queued_was_sent_is_a_warm_hit(emu):
    runner = InProcessRunner(new_blob(emu, "warm"), idle_timeout=10).start()
    assert wait_for(lambda: record_of(emu, "warm")["listening_at"] is not None, 5)
    job_id = emu.add_job(repository="octo-org/app", labels=LABELS, duration_s=0)
    assert runner.join(5) and runner.error is None
    assert wait_for(lambda: emu.job(job_id)["queued_sent_at"] is not None, 5)
    job, rec = emu.job(job_id), record_of(emu, "warm")
    assert job["runner_listening_at"] == rec["listening_at"]
    assert job["runner_registered_at"] == rec["registered_at"]
    assert job["runner_listening_at"] < job["queued_sent_at"]
    assert job["warm_hit"] is True


def test_job_whose_runner_registered_after_queued_was_sent_is_no_warm_hit(emu):
    job_id = emu.add_job(repository="octo-org/app", labels=LABELS, duration_s=0)
    assert wait_for(lambda: emu.job(job_id)["queued_sent_at"] is not None, 5)
    untaken = emu.job(job_id)
    assert untaken["runner_registered_at"] is None and untaken["runner_listening_at"] is None
    assert untaken["warm_hit"] is None
    runner = InProcessRunner(new_blob(emu, "cold"), idle_timeout=10).start()
    assert runner.join(5) and runner.error is None
    job = emu.job(job_id)
    assert job["runner_registered_at"] > job["queued_sent_at"]
    assert job["runner_listening_at"] >= job["runner_registered_at"]
    assert job["warm_hit"] is False
