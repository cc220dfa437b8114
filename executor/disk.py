"""A job's disk limit (the pool's `disk_mb`), two ways.

1. Docker's `--storage-opt size=`: a per-container quota on the writable layer. It needs the
   overlay2 driver on xfs mounted with project quotas (`prjquota`), as the AMI sets up
   (scripts/install-executor.sh). `DiskLimits` finds out once per engine whether it holds
   (driver, backing filesystem, and a probe container created with a size) and otherwise says
   so once: a log line, the `runnerhub_disk_limit_enforced` gauge, `--check`.
2. A job disk: a sparse file of `disk_mb` formatted ext4 and loop-mounted on the host, bound
   into the container as its writable work directory. It needs no quota support (some kernels
   build xfs without it: "XFS: quota support not available in this kernel"), only loop devices
   and root; with a read-only root filesystem the work directory is where a job writes, so the
   limit holds whatever the engine's storage.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aws_lambda_powertools import Logger

from chalicelib.errors import RunnerHubError

logger = Logger(service="runnerhub-executor")

PROBE_SIZE = "64m"
DISK_SUFFIX = ".disk"
MOUNT_SUFFIX = ".mnt"


@dataclass(frozen=True)
class DiskLimitSupport:
    enforced: bool
    reason: str  # why not, or how it holds


def detect(client: Any, probe_image: str) -> DiskLimitSupport:
    """Whether this engine enforces `--storage-opt size`: overlay2 on xfs, and a container
    created with a size is accepted (the mount may lack `prjquota`, or the kernel quota
    support). The probe is created, never started, and removed."""
    import docker.errors

    try:
        info = client.info()
    except docker.errors.DockerException as exc:
        return DiskLimitSupport(False, f"docker info failed: {exc}")
    driver = info.get("Driver", "")
    backing = dict(info.get("DriverStatus") or []).get("Backing Filesystem", "")
    if driver != "overlay2":
        return DiskLimitSupport(False, f"storage driver {driver or '?'}, not overlay2")
    if backing != "xfs":
        return DiskLimitSupport(False, f"overlay2 on {backing or '?'}, not xfs")
    try:
        probe = client.containers.create(probe_image, ["true"],
                                         storage_opt={"size": PROBE_SIZE},
                                         labels={"runnerhub.probe": "disk"})
    except docker.errors.ImageNotFound:
        return DiskLimitSupport(False, f"probe image {probe_image} not found")
    except docker.errors.APIError as exc:
        # "--storage-opt is supported only for overlay over xfs with 'pquota' mount option"
        return DiskLimitSupport(False, f"storage-opt size refused: {exc.explanation or exc}")
    with contextlib.suppress(docker.errors.DockerException):
        probe.remove(force=True)
    return DiskLimitSupport(True, "overlay2 on xfs with project quotas")


class DiskLimits:
    """`detect` once per daemon (the engine's storage does not change under it); the
    `storage_opt` a container of `disk_mb` gets: None when the engine cannot enforce it."""

    def __init__(self, client: Any, probe_image: str,
                 observe: Callable[[DiskLimitSupport], object] = lambda support: None) -> None:
        self._client = client
        self._probe_image = probe_image
        self._observe = observe  # the daemon's gauge (runnerhub_disk_limit_enforced)
        self._support: DiskLimitSupport | None = None
        self._lock = threading.Lock()

    @property
    def support(self) -> DiskLimitSupport:
        with self._lock:
            if self._support is None:
                self._support = detect(self._client, self._probe_image)
                self._observe(self._support)
                if self._support.enforced:
                    logger.info("disk limits enforced: %s", self._support.reason)
                else:
                    logger.warning("disk limits NOT enforced by the Docker engine on this "
                                   "host: %s", self._support.reason)
            return self._support

    def storage_opt(self, disk_mb: int) -> dict[str, str] | None:
        return {"size": f"{disk_mb}m"} if self.support.enforced else None


class JobDiskFailed(RunnerHubError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JobDisks:
    """Per-runner loop-mounted ext4 disks under `root` (root only: mkfs, mount)."""

    def __init__(self, root: Path, uid: int = 1001, gid: int = 1001,
                 timeout_s: float = 60.0) -> None:
        self._root = root
        self._uid, self._gid = uid, gid
        self._timeout_s = timeout_s

    def paths(self, name: str) -> tuple[Path, Path]:
        return self._root / f"{name}{DISK_SUFFIX}", self._root / f"{name}{MOUNT_SUFFIX}"

    def _run(self, *args: str) -> None:
        try:
            subprocess.run(args, check=True, capture_output=True, text=True,
                           timeout=self._timeout_s)
        except FileNotFoundError as exc:
            raise JobDiskFailed(f"job disk: {args[0]} not installed") from exc
        except subprocess.TimeoutExpired as exc:
            raise JobDiskFailed(f"job disk: {args[0]} timed out") from exc
        except subprocess.CalledProcessError as exc:
            raise JobDiskFailed(f"job disk: {args[0]}: {exc.stderr.strip()}"[:300]) from exc

    def create(self, name: str, size_mb: int) -> Path:
        """A `size_mb` disk for runner `name`, mounted nosuid,nodev and owned by the runner's
        uid; its mount point. The file is sparse: it takes only what the job writes."""
        image, mount = self.paths(name)
        self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            disk = open(image, "xb")  # exclusive: never reuse (and so remove) another's disk
        except OSError as exc:
            raise JobDiskFailed(f"job disk: {exc.strerror or exc}") from exc
        with disk:
            disk.truncate(size_mb * 1024 * 1024)
        try:
            mount.mkdir(mode=0o755)
            # -m 0: no blocks reserved for root (the job's uid gets all of them); lazy init
            # keeps mkfs of a 20 GiB disk under a second.
            self._run("mkfs.ext4", "-q", "-F", "-m", "0", "-E",
                      f"root_owner={self._uid}:{self._gid},lazy_itable_init=1,"
                      "lazy_journal_init=1", str(image))
            self._run("mount", "-o", "loop,nosuid,nodev", str(image), str(mount))
        except (OSError, JobDiskFailed) as exc:
            self.remove(name)
            if isinstance(exc, JobDiskFailed):
                raise
            raise JobDiskFailed(f"job disk: {exc.strerror or exc}") from exc
        return mount

    def remove(self, name: str) -> None:
        """Unmount and delete runner `name`'s disk. Idempotent."""
        image, mount = self.paths(name)
        if os.path.ismount(mount):
            # Lazy: a container being removed may still hold it for a moment; the loop
            # device is freed once the last user lets go (autoclear).
            with contextlib.suppress(JobDiskFailed):
                self._run("umount", "--lazy", str(mount))
        with contextlib.suppress(OSError):
            mount.rmdir()
        with contextlib.suppress(FileNotFoundError):
            image.unlink()

    def names(self) -> set[str]:
        if not self._root.is_dir():
            return set()
        return {path.name.removesuffix(DISK_SUFFIX)
                for path in self._root.glob(f"*{DISK_SUFFIX}")}
