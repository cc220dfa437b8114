"""executor/disk.py's engine check and executor/job_engine.py's capability set, with fakes:
the branches this machine's engine (overlay2 on ext4, a kernel without xfs quotas) never takes.
The real engines: tests/isolation/test_disk.py and test_docker_profile.py."""

from __future__ import annotations

import docker.errors
import pytest

from executor.disk import DiskLimits, detect
from executor.job_engine import DOCKER_CAPABILITIES, bounding_capabilities


class Engine:
    def __init__(self, driver="overlay2", backing="xfs", refuse=None):
        self.driver, self.backing, self.refuse = driver, backing, refuse
        self.created, self.removed = [], []
        self.containers = self

    def info(self):
        return {"Driver": self.driver, "DriverStatus": [["Backing Filesystem", self.backing]]}

    def create(self, image, command, storage_opt, labels):
        if self.refuse:
            raise self.refuse
        self.created.append(storage_opt)
        engine = self

        class Probe:
            def remove(self, force):
                engine.removed.append(force)

        return Probe()


@pytest.mark.parametrize(("engine", "reason"), [
    (Engine(driver="devicemapper"), "storage driver devicemapper, not overlay2"),
    (Engine(backing="extfs"), "overlay2 on extfs, not xfs"),
    (Engine(refuse=docker.errors.APIError("x", explanation="--storage-opt is supported only "
                                          "for overlay over xfs with 'pquota' mount option")),
     "storage-opt size refused: --storage-opt is supported only for overlay over xfs"),
    (Engine(refuse=docker.errors.ImageNotFound("gone")), "probe image img not found"),
])
def test_an_engine_that_cannot_enforce_a_size_says_why(engine, reason):
    support = detect(engine, "img")
    assert not support.enforced
    assert support.reason.startswith(reason)
    assert DiskLimits(engine, "img").storage_opt(1024) is None


def test_overlay2_on_xfs_accepting_a_size_is_enforced_once_and_the_probe_removed():
    engine, seen = Engine(), []
    limits = DiskLimits(engine, "img", observe=seen.append)
    assert limits.storage_opt(20480) == {"size": "20480m"}
    assert limits.storage_opt(512) == {"size": "512m"}
    assert engine.created == [{"size": "64m"}] and engine.removed == [True]  # one probe
    assert [s.enforced for s in seen] == [True]


def test_the_engine_gets_the_capabilities_of_the_bounding_set(tmp_path):
    status = tmp_path / "status"
    # Every bit but 24 (CAP_SYS_RESOURCE), and bits past AUDIT_READ (37) Docker 20.10 refuses.
    status.write_text("Name:\tx\nCapBnd:\t000001fffeffffff\n")
    caps = bounding_capabilities(str(status))
    assert "SYS_RESOURCE" not in caps and "SYS_ADMIN" in caps and "NET_ADMIN" in caps
    assert len(caps) == len(DOCKER_CAPABILITIES) - 1
    assert bounding_capabilities(str(tmp_path / "missing")) == DOCKER_CAPABILITIES
