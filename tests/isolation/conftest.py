"""Shared by the isolation tests: they need the Docker engine and root (iptables, /proc of other
users' processes, cgroups). Skipped on a laptop without them; failed when CI=true."""

from __future__ import annotations

import os

import pytest

from tests.conftest import require

RUNNER_IMAGE = "runnerhub/runner-base:local"


@pytest.fixture(scope="session")
def docker_client():
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:
        require(False, f"the Docker engine ({type(exc).__name__})")
    require(os.geteuid() == 0, "root (iptables, cgroups, /proc of containers' processes)")
    try:
        client.images.get(RUNNER_IMAGE)
    except docker.errors.ImageNotFound:
        require(False, f"the runner image {RUNNER_IMAGE} (make images)")
    yield client
    client.close()


ENGINE_IMAGE = "runnerhub/dind:local"


@pytest.fixture
def engine_image(docker_client):
    """The `docker` profile's job engine image (executor/job_engine.py)."""
    import docker

    try:
        docker_client.images.get(ENGINE_IMAGE)
    except docker.errors.ImageNotFound:
        require(False, f"the job engine image {ENGINE_IMAGE} (make dind-image)")
    return ENGINE_IMAGE


# --- A second Docker engine on a loop-mounted xfs data root (tests/isolation/test_disk.py) ---
XFS_ENGINE_RUN = "/run/runnerhub-xfs"


XFS_BRIDGE = "rh-xfs0"  # the xfs engine's own bridge (never docker0)


@pytest.fixture(scope="session")
def xfs_engine(docker_client):
    """A dockerd of the session's own: data root on a 2 GiB sparse xfs file mounted with
    `prjquota` (without it when the kernel's xfs lacks quota support: `prjquota` then says
    False), its own socket, exec root and pid file, a bridge of its own (rh-xfs0) and no
    iptables rules. Torn down with everything it made."""
    import shutil
    import signal
    import subprocess
    import tempfile
    from pathlib import Path
    from types import SimpleNamespace

    import docker

    from tests.conftest import wait_for

    for tool in ("mkfs.xfs", "dockerd", "mount", "umount"):
        require(shutil.which(tool) is not None, f"{tool} (make xfsprogs)")
    work = Path(tempfile.mkdtemp(prefix="rh-xfs-", dir="/var/tmp"))
    run = Path(XFS_ENGINE_RUN)
    image, root = work / "data.img", work / "root"
    process, mounted, client, log, bridged = None, False, None, None, False
    try:
        with open(image, "wb") as disk:
            disk.truncate(2 * 1024**3)
        subprocess.run(["mkfs.xfs", "-q", str(image)], check=True, timeout=60)
        root.mkdir()
        quota = subprocess.run(["mount", "-o", "loop,prjquota", str(image), str(root)],
                               capture_output=True, text=True, timeout=30)
        if quota.returncode != 0:
            subprocess.run(["mount", "-o", "loop", str(image), str(root)], check=True,
                           timeout=30)
        mounted = True
        run.mkdir(parents=True, exist_ok=True)
        # A bridge of its own: with `--bridge=none` dockerd deletes the host's docker0 (Docker
        # removes the default bridge it is told not to use), which the main engine needs.
        subprocess.run(["ip", "link", "add", XFS_BRIDGE, "type", "bridge"], timeout=10,
                       capture_output=True)
        bridged = True
        socket = run / "docker.sock"
        log = open(work / "dockerd.log", "wb")  # open for the daemon's whole life
        process = subprocess.Popen(
            ["dockerd", f"--data-root={root / 'docker'}", f"--exec-root={run / 'exec'}",
             f"--pidfile={run / 'docker.pid'}", f"--host=unix://{socket}",
             f"--bridge={XFS_BRIDGE}", "--iptables=false", "--ip-masq=false",
             "--ip-forward=false",
             "--storage-driver=overlay2"],
            stdout=log, stderr=subprocess.STDOUT)

        def answers() -> bool:
            nonlocal client
            assert process.poll() is None, (work / "dockerd.log").read_text()[-2000:]
            try:  # the client asks the API version as it is made: once the socket answers
                client = client or docker.DockerClient(base_url=f"unix://{socket}", timeout=60)
                return bool(client.ping())
            except docker.errors.DockerException:
                return False

        assert wait_for(answers, timeout=30, interval=0.2), "the xfs dockerd did not answer"
        yield SimpleNamespace(client=client, prjquota=quota.returncode == 0,
                              mount_error=quota.stderr.strip(), root=root)
    finally:
        if client is not None:
            client.close()
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if log is not None:
            log.close()
        if mounted:
            subprocess.run(["umount", str(root)], timeout=30)
        if bridged:
            subprocess.run(["ip", "link", "delete", XFS_BRIDGE], timeout=10,
                           capture_output=True)
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
