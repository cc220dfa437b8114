"""One runner container the way the executor starts it, against the real Docker engine and the
GitHub emulator: the JIT config arrives as a read-only file, the stand-in runner takes one job,
`docker inspect` shows no secret, and clean-up leaves nothing."""

from __future__ import annotations

import base64
import json
import time

import pytest

from chalicelib.github import GitHubApp, RunnerScope
from emulator import AppConfig, Emulator, EmulatorConfig, InstallationConfig
from emulator.testing import generate_app_key
from executor.containers import RunnerContainers, RunnerSpec
from tests.conftest import wait_for

pytestmark = pytest.mark.docker
IMAGE = "runnerhub/runner-linux-small:local"


@pytest.fixture
def github():
    private, public = generate_app_key()
    app = AppConfig(app_id=7, public_key_pem=public,
                    installations=[InstallationConfig(id=70, account="acme")])
    with Emulator(EmulatorConfig(apps=[app])) as emu:
        yield emu, GitHubApp(7, private, emu.base_url)


def test_runner_container_takes_one_job_and_leaves_nothing(docker_client, github, tmpfs_dir):
    emu, client = github
    host = f"test-{time.time_ns()}"
    containers = RunnerContainers(docker_client, tmpfs_dir / "jit", "host")
    containers.prepare()
    jit = client.generate_jitconfig(70, RunnerScope("org", "acme"), "rh-1-1-abc",
                                    ["self-hosted", "linux"], 1)
    secret = jit.encoded_jit_config.get_secret_value()
    spec = RunnerSpec(name="rh-1-1-abc", image=IMAGE, pool="linux-small", job_id=1,
                      generation=1, host_id=host, cpus=0.5, memory_mb=256, pids_limit=256)
    job_id = emu.add_job(repository="acme/app", labels=["self-hosted", "linux"],
                         duration_s=0.5)
    container_id = containers.start(spec, jit.encoded_jit_config)
    try:
        container = docker_client.containers.get(container_id)
        inspected = json.dumps(container.attrs)
        decoded = base64.b64decode(secret).decode()
        for form in (secret, decoded, json.dumps(secret)[1:-1]):
            assert form not in inspected
        # The runner's own directory, read-only (its file is deleted once read).
        mount = next(m for m in container.attrs["Mounts"] if m["Destination"] == "/run/runnerhub")
        assert mount["RW"] is False
        assert wait_for(lambda: not containers.jitconfig_path(spec.name).exists(), 10)
        assert container.attrs["HostConfig"]["NanoCpus"] == 500_000_000
        assert container.attrs["HostConfig"]["Memory"] == 256 * 1024 * 1024
        assert container.attrs["HostConfig"]["PidsLimit"] == 256
        assert container.labels["runnerhub.host"] == host

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and emu.job(job_id)["status"] != "completed":
            time.sleep(0.2)
        assert emu.job(job_id)["status"] == "completed"
        assert emu.job(job_id)["runner_name"] == "rh-1-1-abc"
        container.wait(timeout=30)
        container.reload()
        assert container.attrs["State"]["ExitCode"] == 0
        logs = container.logs().decode()
        assert secret not in logs and decoded not in logs
        (found,) = containers.managed(host)
        assert found.finished and found.exit_code == 0
    finally:
        containers.remove(spec.name)
    assert containers.managed(host) == []
    assert not containers.jitconfig_path(spec.name).exists()
    assert [r for r in emu.runners() if r["name"] == "rh-1-1-abc"] == []  # ephemeral: gone
