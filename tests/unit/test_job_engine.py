"""The `docker` profile's engine (executor/job_engine.py), its pure parts: the labels it
carries and where its data root is. The real engines: tests/isolation/test_docker_profile.py,
test_monitor.py and test_disk.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from executor.containers import RunnerSpec
from executor.job_engine import ENGINE_LABEL, JobEngines


def _spec() -> RunnerSpec:
    return RunnerSpec(name="r1", image="i", pool="builds", job_id=42, generation=3,
                      host_id="h", cpus=1, memory_mb=512, pids_limit=64, deployment="dev/x",
                      isolation="docker")


def test_an_engine_carries_its_jobs_labels_but_is_never_a_runner():
    engines = JobEngines(None, "dind", "h", capabilities=("SYS_ADMIN", "NET_ADMIN"))
    labels = engines.labels("r1", _spec().labels | {"other.label": "x"})
    assert labels == {ENGINE_LABEL: "true", "runnerhub.host": "h", "runnerhub.runner": "r1",
                      "runnerhub.pool": "builds", "runnerhub.job": "42",
                      "runnerhub.generation": "3", "runnerhub.deployment": "dev/x"}
    assert engines.labels("r1") == {ENGINE_LABEL: "true", "runnerhub.host": "h",
                                     "runnerhub.runner": "r1"}
    assert engines.capabilities == frozenset({"SYS_ADMIN", "NET_ADMIN"})


class _Disks:
    def __init__(self) -> None:
        self.made: list[tuple[str, int]] = []

    def create(self, name: str, size_mb: int) -> Path:
        self.made.append((name, size_mb))
        return Path("/var/lib/runnerhub/disks/engines") / f"{name}.mnt"


def test_the_data_root_is_a_job_disk_of_disk_mb_with_job_disks_else_a_volume():
    volumes = []
    client = SimpleNamespace(volumes=SimpleNamespace(
        create=lambda name, labels: volumes.append(name) or SimpleNamespace(name=name)))
    disks = _Disks()
    with_disks = JobEngines(client, "dind", "h", capabilities=("SYS_ADMIN",), disks=disks)
    assert with_disks._data_root("rh-engine-r1", {}, 2048) == \
        "/var/lib/runnerhub/disks/engines/rh-engine-r1.mnt"
    assert disks.made == [("rh-engine-r1", 2048)] and volumes == []
    without = JobEngines(client, "dind", "h", capabilities=("SYS_ADMIN",))
    assert without._data_root("rh-engine-r2", {}, 2048) == "rh-engine-r2"
    assert volumes == ["rh-engine-r2"]
