"""The runner images (scripts/build-runner-images.sh) on the real Docker engine.

Containers are started as the executor starts them: docker SDK, JIT config bind-mounted
read-only from a file on a host tmpfs, resource limits, labels, a non-root user and a network of
the test's own. To see what the container sees without depending on the emulator, a probe
script is bind-mounted over the stand-in runner: the image's real entry point (tini ->
entrypoint.sh) then runs the probe exactly as it would run the runner.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
import tomllib
from pathlib import Path

import pytest
from docker.types import Mount

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "scripts" / "build-runner-images.sh"
POOLS_FILE = REPO / "chalicelib" / "config" / "pools.toml"
BASE_IMAGE = "runnerhub/runner-base:local"
JIT_PATH = "/run/runnerhub/jitconfig"
RUNNER_PATH = "/opt/runnerhub/standin_runner.py"
RUNNER_UID = 1001
EX_CONFIG = 78

# Runs inside the container in place of the stand-in runner; reports as one JSON line and never
# prints the secret itself.
PROBE = r"""
import errno, hashlib, json, os, sys
path = sys.argv[sys.argv.index("--jitconfig-file") + 1]
data = open(path, "rb").read()
try:
    open(path, "ab").close()
    write_error = None
except OSError as exc:
    write_error = errno.errorcode[exc.errno]
leaks = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    for name in ("cmdline", "environ"):
        try:
            if data.strip() in open(f"/proc/{pid}/{name}", "rb").read():
                leaks.append(f"{pid}/{name}")
        except OSError:
            pass
opts = [line.split()[5] for line in open("/proc/self/mountinfo") if line.split()[4] == path]
print("PROBE " + json.dumps({
    "argv": sys.argv[1:], "uid": os.getuid(), "cwd": os.getcwd(),
    "sha256": hashlib.sha256(data).hexdigest(), "write_error": write_error,
    "mount_options": opts, "leaks": leaks, "pool": os.environ.get("RUNNERHUB_IMAGE_POOL"),
}))
"""


def _pools(path: Path) -> dict[str, str]:
    with path.open("rb") as f:
        return {p["name"]: p["image"] for p in tomllib.load(f)["pool"]}


def _build(*args: str) -> None:
    result = subprocess.run(
        [str(BUILD), *args], capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, f"{BUILD.name} failed:\n{result.stderr}"


@pytest.fixture(scope="session")
def runner_images(docker_client):
    """Build (or find up to date: well under a second) the base and pool images."""
    if os.environ.get("RUNNERHUB_SKIP_IMAGE_BUILD") != "1":
        _build()
    return _pools(POOLS_FILE)


def _secret() -> tuple[str, list[str]]:
    """A JIT-config-like secret (base64 JSON) and the forms it must never appear in."""
    token = secrets.token_urlsafe(32)
    value = base64.b64encode(json.dumps({".runner": token, ".credentials": token}).encode())
    value = value.decode()
    return value, [value, token, base64.b64encode(value.encode()).decode()]


def _write_secret(directory: Path, value: str) -> Path:
    # As the executor does: a file on a tmpfs, owned by the runner's uid. Mode 0600 (not 0400)
    # so that only the read-only bind mount stops the container from writing it.
    path = directory / "jitconfig"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    if os.geteuid() == 0:
        os.chown(path, RUNNER_UID, RUNNER_UID)
    else:
        path.chmod(0o644)
    return path


def _run(client, image, labels, *, mounts, network=None, environment=None):
    return client.containers.run(
        image,
        detach=True,
        mounts=mounts,
        network=network,
        environment=environment,
        labels={**labels, "runnerhub.pool": "e2e"},
        mem_limit="256m",
        nano_cpus=500_000_000,
        pids_limit=64,
        user=f"{RUNNER_UID}:{RUNNER_UID}",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
    )


def _finish(container) -> tuple[int, str]:
    status = container.wait(timeout=60)["StatusCode"]
    return status, container.logs().decode(errors="replace")


def test_base_and_pool_images_identify_themselves(docker_client, runner_images, e2e_labels):
    base = docker_client.images.get(BASE_IMAGE).attrs["Config"]
    assert base["User"] == "runner"
    assert base["WorkingDir"] == "/home/runner/_work"
    assert base["Entrypoint"][-1] == "/opt/runnerhub/entrypoint.sh"
    assert len(base["Labels"]["runnerhub.inputs-hash"]) == 64
    assert runner_images.keys() >= {"linux-small", "linux-large", "gpu"}
    for pool, image in runner_images.items():
        config = docker_client.images.get(image).attrs["Config"]
        assert config["Labels"]["runnerhub.pool"] == pool
        assert f"RUNNERHUB_IMAGE_POOL={pool}" in config["Env"]
        out = docker_client.containers.run(
            image, entrypoint=["cat", "/etc/runnerhub-pool"], labels=e2e_labels, remove=True
        )
        assert out.decode().strip() == pool


@pytest.mark.parametrize("jit_path", [JIT_PATH, "/run/secrets/jit"], ids=["default", "env-path"])
def test_runner_sees_read_only_jitconfig_and_secret_stays_hidden(
    docker_client, runner_images, e2e_labels, tmpfs_dir, tmp_path, jit_path
):
    value, forms = _secret()
    secret_file = _write_secret(tmpfs_dir, value)
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    probe.chmod(0o644)
    network = docker_client.networks.create(
        f"rh-e2e-{e2e_labels['runnerhub.e2e-test']}", internal=True, labels=e2e_labels
    )
    env = None if jit_path == JIT_PATH else {"RUNNERHUB_JITCONFIG_FILE": jit_path}
    container = _run(
        docker_client,
        runner_images["linux-small"],
        e2e_labels,
        network=network.name,
        environment=env,
        mounts=[
            Mount(jit_path, str(secret_file), type="bind", read_only=True),
            Mount(RUNNER_PATH, str(probe), type="bind", read_only=True),
        ],
    )
    status, logs = _finish(container)
    assert status == 0, logs
    report = json.loads(logs.split("PROBE ", 1)[1])
    assert report["argv"] == ["--jitconfig-file", jit_path]
    assert report["uid"] == RUNNER_UID
    assert report["cwd"] == "/home/runner/_work"
    assert report["pool"] == "linux-small"
    assert report["sha256"] == hashlib.sha256(value.encode()).hexdigest()
    # Root made the file writable by its owner (uid 1001): only the read-only mount refuses.
    assert report["write_error"] in ({"EROFS"} if os.geteuid() == 0 else {"EROFS", "EACCES"})
    assert "ro" in report["mount_options"][0].split(",")
    assert report["leaks"] == [], "the JIT config is in a process's argv or environment"
    container.reload()
    inspect = json.dumps(container.attrs) + json.dumps(network.attrs)
    for form in forms:
        assert form not in inspect, "the JIT config shows in docker inspect"
        assert form not in logs, "the JIT config shows in the container log"
    assert secret_file.read_text() == value, "the container changed the host file"


def test_entrypoint_refuses_to_start_without_jitconfig(docker_client, runner_images, e2e_labels):
    container = _run(docker_client, runner_images["linux-small"], e2e_labels, mounts=[])
    status, logs = _finish(container)
    assert status == EX_CONFIG
    assert f"JIT config file {JIT_PATH} is missing" in logs


def test_entrypoint_refuses_unreadable_jitconfig(
    docker_client, runner_images, e2e_labels, tmpfs_dir
):
    if os.geteuid() != 0:
        pytest.skip("needs root to make a file the runner user cannot read")
    secret_file = _write_secret(tmpfs_dir, "x")
    os.chown(secret_file, 0, 0)  # 0600 root: not readable by uid 1001
    container = _run(
        docker_client,
        runner_images["linux-small"],
        e2e_labels,
        mounts=[Mount(JIT_PATH, str(secret_file), type="bind", read_only=True)],
    )
    status, logs = _finish(container)
    assert status == EX_CONFIG
    assert "is not readable by uid 1001" in logs


def test_cleanup_leaves_no_container_or_network(
    docker_client, runner_images, e2e_labels, remove_labelled
):
    network = docker_client.networks.create(
        f"rh-e2e-{e2e_labels['runnerhub.e2e-test']}", internal=True, labels=e2e_labels
    )
    container = _run(
        docker_client, runner_images["gpu"], e2e_labels, mounts=[], network=network.name
    )
    container.wait(timeout=60)
    assert remove_labelled(e2e_labels) == []
    flt = {"label": f"runnerhub.e2e-test={e2e_labels['runnerhub.e2e-test']}"}
    assert docker_client.containers.list(all=True, filters=flt) == []
    assert docker_client.networks.list(filters=flt) == []


def test_build_derives_images_for_another_pools_file(docker_client, runner_images, tmp_path):
    pools = tmp_path / "pools.toml"
    image = "runnerhub/runner-e2e-extra:test"
    pools.write_text(
        '[[pool]]\nname = "e2e-extra"\nlabels = ["linux"]\nscope = { owner = "o" }\n'
        f'image = "{image}"\n'
        '[[pool]]\nname = "prod"\nlabels = ["linux"]\nscope = { owner = "o" }\n'
        'image = "ghcr.io/actions/actions-runner:latest"\n'
    )
    try:
        _build("--pools", str(pools))
        config = docker_client.images.get(image).attrs["Config"]
        assert config["Labels"]["runnerhub.pool"] == "e2e-extra"
        assert "RUNNERHUB_IMAGE_POOL=e2e-extra" in config["Env"]
        # Registry images are pulled in production, never built (nor pulled) here.
        assert not docker_client.images.list(name="ghcr.io/actions/actions-runner")
    finally:
        docker_client.images.remove(image, force=True)
