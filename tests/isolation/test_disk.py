"""A job's disk limit holds (executor/disk.py): a job disk (loop-mounted ext4 of `disk_mb`)
anywhere, and Docker's `--storage-opt size` where the engine runs overlay2 on xfs with project
quotas (a second dockerd on a loop-mounted xfs data root here)."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile

import pytest

from executor.disk import DiskLimits, JobDisks, detect
from tests.isolation.conftest import RUNNER_IMAGE

pytestmark = [pytest.mark.isolation, pytest.mark.docker]

WRITE_100_MIB = "dd if=/dev/zero of={path}/big bs=1M count=100 2>&1; echo rc=$?"
FULL = ("No space left on device", "Disk quota exceeded")


def write_100_mib(client, path: str, **options) -> str:
    """Run a job-like container (uid 1001, read-only root, no capabilities) that writes
    100 MiB under `path`; its output, ending `rc=<dd's exit status>`."""
    return client.containers.run(
        RUNNER_IMAGE, ["sh", "-c", WRITE_100_MIB.format(path=path)], entrypoint=[],
        user="1001", remove=True, network_mode="none", cap_drop=["ALL"],
        security_opt=["no-new-privileges:true"], **options).decode()


def test_a_job_disk_stops_a_write_past_its_size(docker_client, tmp_path):
    disks = JobDisks(tmp_path / "disks")
    limited = disks.create("rh-disk-test", 64)
    free = tmp_path / "free"  # the positive control: a host directory with no limit
    free.mkdir()
    os.chown(free, 1001, 1001)
    try:
        mounts = {str(limited): {"bind": "/work", "mode": "rw"},
                  str(free): {"bind": "/free", "mode": "rw"}}
        over = write_100_mib(docker_client, "/work", read_only=True, volumes=mounts)
        assert "rc=1" in over and any(error in over for error in FULL), over
        under = write_100_mib(docker_client, "/free", read_only=True, volumes=mounts)
        assert under.rstrip().endswith("rc=0"), under
        assert (free / "big").stat().st_size == 100 * 1024 * 1024
    finally:
        disks.remove("rh-disk-test")
    image, mount = disks.paths("rh-disk-test")
    assert not image.exists() and not mount.exists()
    assert disks.names() == set()
    loops = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
    assert loops.stdout.strip() == ""  # the loop device went with it


def test_a_job_disk_that_cannot_be_made_fails_clearly(tmp_path):
    from executor.disk import JobDiskFailed

    disks = JobDisks(tmp_path / "disks")
    disks.create("twice", 16)
    try:
        with pytest.raises(JobDiskFailed, match="job disk: File exists"):
            disks.create("twice", 16)
    finally:
        disks.remove("twice")
    assert disks.names() == set()


def empty_image(client, repository: str) -> str:
    """An image of one file, imported (no registry): enough to create a probe container."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        info = tarfile.TarInfo("probe")
        tar.addfile(info, io.BytesIO(b""))
    client.api.import_image_from_data(data.getvalue(), repository=repository, tag="local")
    return f"{repository}:local"


def test_the_xfs_engine_enforces_a_size_only_with_project_quotas(docker_client, xfs_engine):
    engine = xfs_engine.client
    info = engine.info()
    assert info["Driver"] == "overlay2"
    assert dict(info["DriverStatus"])["Backing Filesystem"] == "xfs"
    support = detect(engine, empty_image(engine, "runnerhub/disk-probe"))
    limits = DiskLimits(engine, "runnerhub/disk-probe:local")
    if not xfs_engine.prjquota:
        # This kernel's xfs has no quota support ("XFS: quota support not available in this
        # kernel"): the engine refuses a size, the executor says so and uses job disks.
        assert not support.enforced
        assert "pquota" in support.reason or "quota" in support.reason.lower(), support
        assert limits.storage_opt(64) is None
        return
    assert support.enforced, support
    assert limits.storage_opt(64) == {"size": "64m"}
    engine.images.load(b"".join(docker_client.images.get(RUNNER_IMAGE).save()))
    over = write_100_mib(engine, "/tmp", storage_opt=limits.storage_opt(64))
    assert "rc=1" in over and any(error in over for error in FULL), over
    under = write_100_mib(engine, "/tmp")  # the positive control: no size
    assert under.rstrip().endswith("rc=0"), under


def test_a_runner_works_on_its_job_disk_and_leaves_none(docker_client, tmp_path):
    """RunnerContainers with job disks: the work directory is the runner's disk (not a
    tmpfs); removing the runner unmounts and deletes it; a restarted daemon removes disks of
    runners it does not keep."""
    from pydantic import SecretStr

    from executor.containers import WORK_DIR, RunnerContainers, RunnerSpec

    disks = JobDisks(tmp_path / "disks")
    containers = RunnerContainers(docker_client, tmp_path / "jit", "host", job_disks=disks)
    containers.prepare("test-host")
    spec = RunnerSpec(name="rh-disk-runner", image=RUNNER_IMAGE, pool="p", job_id=1,
                      generation=1, host_id="test-host", cpus=0.5, memory_mb=256,
                      pids_limit=64, disk_mb=300)
    containers.start(spec, SecretStr("not-a-real-jit-config"))
    try:
        attrs = docker_client.api.inspect_container(spec.name)
        work = next(m for m in attrs["Mounts"] if m["Destination"] == WORK_DIR)
        assert work["Source"] == str(disks.paths(spec.name)[1]) and work["RW"]
        assert WORK_DIR not in (attrs["HostConfig"].get("Tmpfs") or {})
        free = os.statvfs(work["Source"])
        assert 250 < free.f_blocks * free.f_frsize / 2**20 <= 300  # the pool's disk_mb
    finally:
        containers.remove(spec.name)
    assert disks.names() == set() and not disks.paths(spec.name)[1].exists()
    disks.create("rh-left-behind", 16)
    assert containers.remove_stray_files(keep=set()) == ["rh-left-behind"]
    assert disks.names() == set()


def test_the_hosts_docker_storage_script_formats_once_copies_and_mounts(tmp_path):
    """executor/host/docker-storage.sh on a loop device standing in for the data volume (and
    a directory standing in for /var/lib/docker): formatted xfs once, what was there copied,
    mounted; a second run (a reboot) finds it by label and changes nothing. Project quotas
    where the kernel has them."""
    import shutil

    from tests.conftest import require

    require(shutil.which("mkfs.xfs") is not None, "mkfs.xfs (make xfsprogs)")
    script = os.path.join(os.path.dirname(__file__), "..", "..", "executor", "host",
                          "docker-storage.sh")
    image, root = tmp_path / "volume.img", tmp_path / "docker"
    with open(image, "wb") as volume:
        volume.truncate(320 * 1024**2)  # mkfs.xfs wants 300 MB at least
    device = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True,
                            text=True, check=True).stdout.strip()
    root.mkdir()
    (root / "pre-pulled").write_text("a layer the AMI had")
    env = {**os.environ, "RUNNERHUB_DOCKER_DEVICE": device, "RUNNERHUB_DOCKER_ROOT": str(root)}
    try:
        first = subprocess.run(["bash", script], env=env, capture_output=True, text=True,
                               timeout=60)
        assert first.returncode == 0, first.stderr
        assert f"formatting {device}" in first.stderr
        source = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "--mountpoint",
                                 str(root)], capture_output=True, text=True).stdout.split()
        assert source == [device, "xfs"]
        assert (root / "pre-pulled").read_text() == "a layer the AMI had"
        (root / "written-after").write_text("kept")
        second = subprocess.run(["bash", script], env=env, capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 0, second.stderr
        assert "formatting" not in second.stderr and "already on" in second.stderr
        assert (root / "written-after").read_text() == "kept"
        mounts = subprocess.run(["findmnt", "-n", "--mountpoint", str(root)],
                                capture_output=True, text=True).stdout.strip().splitlines()
        assert len(mounts) == 1
    finally:
        subprocess.run(["umount", str(root)], capture_output=True)
        subprocess.run(["losetup", "-d", device], capture_output=True)


def _build(client, files: dict[str, int]) -> str:
    """Build a `FROM scratch` image copying `files` (name -> size in MiB, zeros) with a job
    engine's API; "" when it built, else the engine's error."""
    import docker

    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        dockerfile = ("FROM scratch\n" + "".join(f"COPY {name} /{name}\n" for name in files)
                      ).encode()
        for name, data in [("Dockerfile", dockerfile)] + [
                (name, bytes(size * 2**20)) for name, size in files.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    try:
        lines = list(client.api.build(fileobj=io.BytesIO(context.getvalue()),
                                      custom_context=True, decode=True, rm=True))
    except docker.errors.APIError as exc:
        return str(exc.explanation or exc)
    return " ".join(str(line["error"]) for line in lines if "error" in line)


def test_a_job_engines_data_root_is_a_job_disk_of_the_pools_size(docker_client,
                                                                   engine_image, tmp_path):
    """With job disks on, the `docker` profile's engine keeps its images and build contexts on
    a job disk of `disk_mb` (executor/job_engine.py), not an unbounded Docker volume: a small
    build works on it, a build past it fails with "no space left"; the disk goes with the
    engine, and a restarted daemon removes one left behind."""
    import secrets

    import docker

    from executor.job_engine import DATA_ROOT, JobEngines, engine_name

    disks = JobDisks(tmp_path / "engines", 0, 0)
    engines = JobEngines(docker_client, engine_image, f"test-{secrets.token_hex(4)}",
                         disks=disks)
    runner = f"rh-disk-{secrets.token_hex(3)}"
    env = engines.start(runner, None, disk_mb=96)
    image, mount = disks.paths(engine_name(runner))
    try:
        attrs = docker_client.api.inspect_container(engine_name(runner))
        data = next(m for m in attrs["Mounts"] if m["Destination"] == DATA_ROOT)
        assert (data["Type"], data["Source"]) == ("bind", str(mount))
        assert not docker_client.volumes.list(filters={"name": engine_name(runner)})
        free = os.statvfs(mount)
        assert 80 < free.f_blocks * free.f_frsize / 2**20 <= 96  # the pool's disk_mb
        inner = docker.DockerClient(base_url=env["DOCKER_HOST"], timeout=120)
        try:
            assert _build(inner, {"small": 1}) == ""  # the engine works on its disk
            error = _build(inner, {"big": 128})
        finally:
            inner.close()
        assert "no space left on device" in error.lower(), error
    finally:
        engines.remove(runner)
    assert not image.exists() and not mount.exists() and disks.names() == set()
    disks.create(engine_name("rh-gone"), 16)  # a daemon died with this engine's disk
    assert engines.runners() == {"rh-gone"}
    assert engines.remove_leftovers(keep=set()) == ["rh-gone"]
    assert disks.names() == set()
