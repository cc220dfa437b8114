"""End-to-end tier: the real Docker engine (start it with `scripts/ensure-docker.sh`).

Generic fixtures for any e2e test that creates Docker objects:

- `docker_client`: a docker SDK client. Without a reachable engine the test is skipped, except
  under `CI=true`, where it fails: CI must never go green by skipping the real-engine tier.
- `e2e_labels`: a label dict unique to the test. Put it on every container and network you
  create; at teardown everything carrying it is force-removed, and the test errors if anything
  could not be removed (leaks show up where they happen).
- `tmpfs_dir`: a private (0700) directory on a tmpfs (/dev/shm, else /run), for secrets the
  host hands to containers as files (JIT configs): a tmpfs keeps them off disk, as the executor
  does in production.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

E2E_LABEL = "runnerhub.e2e-test"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session")
def docker_client():
    try:
        import docker

        client = docker.from_env(timeout=60)
        client.ping()
    except Exception as exc:  # the SDK missing, no socket, daemon down: all mean "no Docker"
        reason = f"Docker engine unavailable ({exc}); run scripts/ensure-docker.sh"
        if _in_ci():
            pytest.fail(f"CI=true: e2e tests must not be skipped. {reason}")
        pytest.skip(reason)
    yield client
    client.close()


def _remove_labelled(client, run_id: str) -> list[str]:
    """Force-remove the containers, then networks, of one test; return what is still there."""
    flt = {"label": f"{E2E_LABEL}={run_id}"}
    for container in client.containers.list(all=True, filters=flt):
        container.remove(force=True, v=True)
    for network in client.networks.list(filters=flt):
        network.remove()
    left = [f"container {c.name}" for c in client.containers.list(all=True, filters=flt)]
    left += [f"network {n.name}" for n in client.networks.list(filters=flt)]
    return left


@pytest.fixture
def e2e_labels(docker_client):
    run_id = uuid.uuid4().hex[:12]
    labels = {E2E_LABEL: run_id}
    yield labels
    left = _remove_labelled(docker_client, run_id)
    assert not left, f"could not clean up: {left}"


@pytest.fixture
def remove_labelled(docker_client):
    """The clean-up used by `e2e_labels`, for tests that check clean-up itself."""
    return lambda labels: _remove_labelled(docker_client, labels[E2E_LABEL])


def _tmpfs_mounts() -> set[str]:
    with open("/proc/mounts") as mounts:
        return {line.split()[1] for line in mounts if line.split()[2] == "tmpfs"}


@pytest.fixture
def tmpfs_dir():
    tmpfs = _tmpfs_mounts()
    base = next(
        (Path(p) for p in ("/dev/shm", "/run") if p in tmpfs and os.access(p, os.W_OK)), None
    )
    if base is None:
        pytest.fail("no writable tmpfs at /dev/shm or /run for secret files")
    path = base / f"runnerhub-e2e-{uuid.uuid4().hex[:12]}"
    path.mkdir(mode=0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def hosts(docker_client):
    """Executor hosts a test starts (tests/e2e/test_executor_resilience.py `Hosts`); whatever
    a failed test left is force-removed so the next test starts clean. A container that went
    away meanwhile (auto-removed on exit) is what was wanted."""
    import docker.errors

    from tests.e2e.test_executor_resilience import Hosts

    found = Hosts(docker_client)
    yield found
    for host_id in found.ids:
        for container in found.containers(host_id):
            try:
                docker_client.api.remove_container(container["Id"], force=True)
            except docker.errors.APIError as exc:
                # Gone (404), or its own removal already under way (409): what was wanted.
                if exc.status_code not in (404, 409):
                    raise
        shutil.rmtree(f"/dev/shm/runnerhub-{host_id}", ignore_errors=True)
