"""Workloads, the stand-in runner as a real process, and the emulator CLI as a separate
process: what later functional tests and benchmarks build on."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from emulator import AppConfig, Emulator, EmulatorConfig, InstallationConfig
from emulator.testing import (
    InProcessRunner,
    WebhookReceiver,
    app_jwt,
    generate_app_key,
    payload_validator,
)
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
STANDIN = ROOT / "emulator" / "standin_runner.py"
SCHEMAS = ROOT / "tests" / "fixtures" / "emulator" / "octokit-webhooks" / "schemas"
APP_ID = 77
ORG = "octo-org"


@pytest.fixture(scope="module")
def keys():
    return generate_app_key()


@pytest.fixture(scope="module")
def validate():
    return payload_validator(SCHEMAS)


def app_config(keys) -> AppConfig:
    return AppConfig(
        app_id=APP_ID,
        public_key_pem=keys[1],
        installations=[InstallationConfig(id=700, account=ORG)],
    )


@pytest.fixture
def receiver():
    with WebhookReceiver() as rx:
        yield rx


@pytest.fixture
def emu(keys, receiver):
    config = EmulatorConfig(
        apps=[app_config(keys)],
        webhook_url=receiver.url,
        webhook_secret="s",
        lost_runner_timeout_s=0.6,
        acquire_timeout_s=1.0,
    )
    with Emulator(config) as emulator:
        yield emulator


def installation_token(base_url, keys) -> str:
    resp = requests.post(
        f"{base_url}/app/installations/700/access_tokens",
        timeout=5,
        headers={"Authorization": f"Bearer {app_jwt(APP_ID, keys[0])}"},
    )
    resp.raise_for_status()
    return resp.json()["token"]


def new_jit(base_url, token, name, labels=("self-hosted", "linux")) -> str:
    resp = requests.post(
        f"{base_url}/orgs/{ORG}/actions/runners/generate-jitconfig",
        timeout=5,
        headers={"Authorization": f"token {token}"},
        json={"name": name, "runner_group_id": 1, "labels": list(labels)},
    )
    assert resp.status_code == 201, resp.text
    return resp.json()["encoded_jit_config"]


def spawn_standin(tmp_path, blob, *extra) -> subprocess.Popen:
    path = tmp_path / f"jit-{time.monotonic_ns()}"
    path.write_text(blob)
    return subprocess.Popen(
        [sys.executable, str(STANDIN), "--jitconfig-file", str(path), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def runner_status(emu, name) -> str | None:
    return next((r["status"] for r in emu.runners() if r["name"] == name), None)


def wait_status(emu, job_id, status, timeout=5.0):
    deadline = time.monotonic() + timeout
    while emu.job(job_id)["status"] != status:
        assert time.monotonic() < deadline, emu.job(job_id)
        time.sleep(0.01)


# -- the stand-in runner process ---------------------------------------------------------------


def test_standin_runner_process_runs_one_job_and_exits_0(emu, keys, tmp_path, receiver, validate):
    token = installation_token(emu.base_url, keys)
    blob = new_jit(emu.base_url, token, "proc-1")
    proc = spawn_standin(tmp_path, blob, "--idle-timeout", "10")
    job_id = emu.add_job(
        repository=f"{ORG}/app", labels=["Linux"], duration_s=0.3, conclusion="failure"
    )
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert blob not in out + err  # never print the JIT config
    job = emu.job(job_id)
    assert (job["status"], job["conclusion"], job["runner_name"]) == (
        "completed",
        "failure",
        "proc-1",
    )
    assert job["completed_at"] - job["taken_at"] >= 0.3
    assert emu.sender.flush(5)
    assert receiver.events(job_id) == [
        ("queued", "queued"),
        ("in_progress", "in_progress"),
        ("completed", "completed"),
    ]
    for payload in receiver.payloads():
        validate(payload)
    # ephemeral: deregistered after its one job
    listed = requests.get(
        f"{emu.base_url}/orgs/{ORG}/actions/runners",
        timeout=5,
        headers={"Authorization": f"token {token}"},
    ).json()
    assert listed["total_count"] == 0


def test_standin_runner_rejects_used_and_bad_jit_configs(emu, keys, tmp_path):
    token = installation_token(emu.base_url, keys)
    blob = new_jit(emu.base_url, token, "once")
    first = spawn_standin(tmp_path, blob, "--idle-timeout", "0.2")
    assert first.wait(10) == 0
    second = spawn_standin(tmp_path, blob, "--idle-timeout", "0.2")
    _, err = second.communicate(timeout=10)
    assert second.returncode == 2
    assert "registration refused" in err and blob not in err
    garbage = spawn_standin(tmp_path, "bm90IGEgY29uZmln")
    _, err = garbage.communicate(timeout=10)
    assert garbage.returncode == 2 and "not a valid encoded JIT config" in err


def test_standin_runner_exits_cleanly_on_sigterm_while_idle(emu, keys, tmp_path):
    token = installation_token(emu.base_url, keys)
    proc = spawn_standin(tmp_path, new_jit(emu.base_url, token, "term"))
    deadline = time.monotonic() + 5
    while not any(r["status"] == "online" for r in emu.runners()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    # It told the emulator it left: listed offline at once (a runner that just vanished stays
    # online for runner_offline_after_s, 60 s), and out of the set a new job is offered to.
    assert wait_for(lambda: runner_status(emu, "term") == "offline", timeout=5), emu.runners()
    # A new job is offered synchronously when it arrives; an offer would show the runner online.
    job_id = emu.add_job(repository=f"{ORG}/app", labels=["linux"])
    assert runner_status(emu, "term") == "offline", emu.runners()
    assert emu.job(job_id)["status"] == "queued"
    # and the next runner takes it
    other = InProcessRunner(new_jit(emu.base_url, token, "after-term"), idle_timeout=5).start()
    assert other.join(5) and other.error is None
    assert other.job is not None and other.job["job_id"] == job_id
    assert emu.job(job_id)["runner_name"] == "after-term"


def test_standin_runner_sigterm_while_running_reports_cancelled(emu, keys, tmp_path):
    token = installation_token(emu.base_url, keys)
    proc = spawn_standin(tmp_path, new_jit(emu.base_url, token, "term-busy"))
    job_id = emu.add_job(repository=f"{ORG}/app", labels=["linux"], duration_s=30)
    wait_status(emu, job_id, "in_progress")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert emu.job(job_id)["conclusion"] == "cancelled"


# -- assignment as GitHub does it --------------------------------------------------------------


def test_runner_started_for_one_job_takes_another_matching_job(emu, keys):
    token = installation_token(emu.base_url, keys)
    plain = emu.add_job(repository=f"{ORG}/app", labels=["linux"], duration_s=0)
    wanted = emu.add_job(repository=f"{ORG}/app", labels=["linux", "gpu"], duration_s=0)
    # started "for" the gpu job, but the plain job was queued first and it matches too
    runner = InProcessRunner(new_jit(emu.base_url, token, "gpu-1", ["linux", "gpu"])).start()
    assert runner.join(5)
    assert runner.job["job_id"] == plain
    assert emu.job(wanted)["status"] == "queued"


def test_cancel_running_job_stops_its_runner(emu, keys, receiver, validate):
    token = installation_token(emu.base_url, keys)
    runner = InProcessRunner(new_jit(emu.base_url, token, "to-cancel")).start()
    job_id = emu.add_job(repository=f"{ORG}/app", labels=["linux"], duration_s=30)
    wait_status(emu, job_id, "in_progress")
    started = time.monotonic()
    resp = requests.post(f"{emu.root_url}/_emulator/jobs/{job_id}/cancel", timeout=5)
    assert resp.status_code == 200
    assert runner.join(5)
    assert time.monotonic() - started < 2  # told by the next heartbeat, not after 30 s
    assert runner.conclusion == "cancelled"
    assert emu.job(job_id)["conclusion"] == "cancelled"
    assert emu.sender.flush(5)
    completed = receiver.payloads()[-1]
    validate(completed)
    assert completed["workflow_job"]["conclusion"] == "cancelled"
    assert completed["workflow_job"]["runner_name"] == "to-cancel"


def test_lost_runner_job_fails_and_runner_is_removed(emu, keys, receiver):
    token = installation_token(emu.base_url, keys)
    runner = InProcessRunner(new_jit(emu.base_url, token, "dies"), heartbeat=False).start()
    job_id = emu.add_job(repository=f"{ORG}/app", labels=["linux"], duration_s=30)
    assert runner.join(5) and runner.job["job_id"] == job_id  # acquired, then silence
    wait_status(emu, job_id, "completed", timeout=3)  # lost_runner_timeout_s = 0.6
    job = emu.job(job_id)
    assert job["conclusion"] == "failure"
    assert emu.runners() == []
    assert emu.sender.flush(5)
    assert receiver.events(job_id)[-1] == ("completed", "completed")


def test_environment_approval_sequence_over_webhooks(emu, keys, receiver, validate):
    token = installation_token(emu.base_url, keys)
    emu.load_workload(
        {
            "jobs": [
                {
                    "repository": f"{ORG}/app",
                    "labels": ["linux"],
                    "duration_s": 0,
                    "environment_wait_s": 0.3,
                    "environment": "prod",
                }
            ]
        }
    )
    runner = InProcessRunner(new_jit(emu.base_url, token, "env")).start()
    emu.run_workload()
    assert emu.wait_until_done(5)
    (job,) = emu.jobs()
    assert job["taken_at"] - job["created_at"] >= 0.3  # not before the approval
    assert runner.join(5)
    events = receiver.events(job["job_id"])
    assert events == [
        ("waiting", "waiting"),
        ("queued", "queued"),
        ("in_progress", "in_progress"),
        ("completed", "completed"),
    ]
    guids = {r["headers"]["X-GitHub-Delivery"] for r in receiver.received}
    assert len(guids) == 4  # separate deliveries
    for payload in receiver.payloads():
        validate(payload)


def test_workload_timing_ground_truth(emu, keys):
    token = installation_token(emu.base_url, keys)
    emu.load_workload(
        {
            "jobs": [
                {
                    "id": 1,
                    "repository": f"{ORG}/app",
                    "labels": ["linux"],
                    "arrival_s": 0.0,
                    "duration_s": 0.05,
                },
                {
                    "id": 2,
                    "repository": f"{ORG}/app",
                    "labels": ["linux"],
                    "arrival_s": 0.4,
                    "duration_s": 0.05,
                },
                {
                    "id": 3,
                    "repository": f"{ORG}/app",
                    "labels": ["linux", "special"],
                    "arrival_s": 0.2,
                    "cancel_at_s": 0.25,
                },
                {
                    "id": 4,
                    "repository": f"{ORG}/app",
                    "labels": ["nobody-has-it"],
                    "arrival_s": 0.0,
                },
            ]
        }
    )
    runners = [
        InProcessRunner(new_jit(emu.base_url, token, f"t{i}"), idle_timeout=3).start()
        for i in range(2)
    ]
    t0 = time.time()
    emu.run_workload()
    assert all(r.join(5) for r in runners)
    assert emu.wait_until_done(1) is False  # job 4 stays queued: no silent expiry
    jobs = {j["job_id"]: j for j in emu.jobs()}
    assert jobs[4]["status"] == "queued" and jobs[4]["queued_sent_at"] is not None
    assert (jobs[3]["conclusion"], jobs[3]["runner_name"]) == ("cancelled", None)
    assert jobs[3]["completed_at"] - t0 == pytest.approx(0.25, abs=0.15)
    for job_id, arrival in ((1, 0.0), (2, 0.4)):
        job = jobs[job_id]
        assert job["conclusion"] == "success"
        assert job["created_at"] - t0 == pytest.approx(arrival, abs=0.15)
        assert job["queued_sent_at"] >= job["created_at"]
        assert 0 <= job["taken_at"] - job["queued_at"] < 0.5  # event-driven pickup
    status = emu.workload_status()
    assert status["by_status"] == {"completed": 3, "queued": 1}


def test_slow_webhook_receiver_does_not_delay_assignment(keys):
    with WebhookReceiver(delay_s=0.5) as slow:
        config = EmulatorConfig(apps=[app_config(keys)], webhook_url=slow.url)
        with Emulator(config) as emu:
            token = installation_token(emu.base_url, keys)
            runner = InProcessRunner(new_jit(emu.base_url, token, "fast")).start()
            started = time.monotonic()
            job_id = emu.add_job(repository=f"{ORG}/app", labels=["linux"], duration_s=0)
            assert runner.join(5)
            assert emu.job(job_id)["taken_at"] is not None
            assert time.monotonic() - started < 0.45  # before even the queued delivery ended
            assert emu.sender.flush(5)
            assert [a for a, _ in slow.events(job_id)] == ["queued", "in_progress", "completed"]


# -- the CLI as a separate process -------------------------------------------------------------


def test_cli_serves_until_sigterm_and_exposes_ground_truth(keys, tmp_path, receiver):
    key_file = tmp_path / "app.pem"
    key_file.write_text(keys[1])
    apps = {
        "apps": [
            {
                "app_id": APP_ID,
                "public_key_file": "app.pem",
                "installations": [{"id": 700, "account": ORG}],
            }
        ]
    }
    (tmp_path / "apps.json").write_text(json.dumps(apps))
    workload = {"jobs": [{"repository": f"{ORG}/app", "labels": ["linux"], "duration_s": 0}]}
    (tmp_path / "workload.json").write_text(json.dumps(workload))
    (tmp_path / "secret").write_text("from-file\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emulator",
            "--port",
            "0",
            "--api-prefix",
            "/api/v3",
            "--webhook-url",
            receiver.url,
            "--webhook-secret-file",
            str(tmp_path / "secret"),
            "--apps-file",
            str(tmp_path / "apps.json"),
            "--workload",
            str(tmp_path / "workload.json"),
            "--lost-runner-timeout",
            "2",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/api/v3")
        token = installation_token(base_url, keys)
        runner = InProcessRunner(new_jit(base_url, token, "cli-runner")).start()
        assert runner.join(10) and runner.conclusion == "success"
        deadline = time.monotonic() + 5
        while True:
            jobs = requests.get(f"{base_url}/_emulator/jobs", timeout=5).json()["jobs"]
            if jobs[0]["status"] == "completed":
                break
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert jobs[0]["runner_name"] == "cli-runner"
        assert receiver.wait_for(lambda ps: len(ps) == 3, 5)
        got = receiver.received[0]
        signature = hmac.new(b"from-file", got["body"], hashlib.sha256).hexdigest()
        assert got["headers"]["X-Hub-Signature-256"] == f"sha256={signature}"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "from-file" not in out + err


def test_cli_exit_when_done_and_deferred_start(tmp_path, receiver):
    workload = {
        "jobs": [
            {"repository": f"{ORG}/app", "labels": ["linux"], "arrival_s": 0.1, "cancel_at_s": 0.2}
        ]
    }
    (tmp_path / "workload.json").write_text(json.dumps(workload))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emulator",
            "--webhook-url",
            receiver.url,
            "--no-start",
            "--exit-when-done",
            "--workload",
            str(tmp_path / "workload.json"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        base_url = proc.stdout.readline().strip()
        status = requests.get(f"{base_url}/_emulator/workload", timeout=5).json()
        assert (status["started"], status["by_status"]) == (False, {"pending": 1})
        assert requests.post(f"{base_url}/_emulator/workload/start", timeout=5).ok
        assert proc.wait(10) == 0  # exits by itself once the job is done
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=5)
    # no App configured: the delivery goes out without an installation
    assert [p["action"] for p in receiver.payloads()] == ["queued", "completed"]
    assert "installation" not in receiver.payloads()[0]
