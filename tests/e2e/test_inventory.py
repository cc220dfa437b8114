"""The package inventory of the real runner images: scripts/build-runner-images.sh records each
pool image it has (executor/inventory.py), and `python -m executor.inventory which` answers
which images and pools carry a package, and which version."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

BUILD = ROOT / "scripts" / "build-runner-images.sh"
POOLS = ROOT / "chalicelib" / "config" / "pools.toml"
SMALL = "runnerhub/runner-linux-small:local"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "executor.inventory", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def inventory(docker_client, tmp_path_factory):
    """The images built (or found up to date) and recorded into a fresh directory."""
    directory = tmp_path_factory.mktemp("inventory")
    env = os.environ | {"RUNNERHUB_INVENTORY_DIR": str(directory)}
    built = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=900,
                           check=False, env=env)
    assert built.returncode == 0, built.stderr
    return directory


def bash_version(docker_client) -> str:
    """What dpkg in the image says, asked directly (not through the inventory)."""
    # Not `run(remove=True)`: a container that exits at once may be gone before its output is
    # read (the SDK then answers b""); wait, read, then remove.
    container = docker_client.containers.run(SMALL, ["-W", "-f=${Version}", "bash"],
                                             entrypoint="dpkg-query", network_disabled=True,
                                             detach=True)
    try:
        assert container.wait(timeout=60)["StatusCode"] == 0
        version = container.logs(stdout=True, stderr=False).decode().strip()
    finally:
        container.remove(force=True)
    assert version, "dpkg-query printed no version of bash"
    return version


def test_the_build_records_each_pool_image_by_its_id(inventory, docker_client):
    image_id = docker_client.images.get(SMALL).id
    record = json.loads((inventory / f"sha256-{image_id.removeprefix('sha256:')}.json")
                        .read_text())
    assert record["image"] == SMALL and record["digest"] == image_id
    assert record["built_at"] and record["recorded_at"]
    names = {p["name"] for p in record["dpkg"]}
    assert {"bash", "python3", "tini", "ca-certificates"} <= names
    assert record["pip_source"] in ("pip list", "importlib.metadata")
    assert len(list(inventory.glob("sha256-*.json"))) == 3  # one per pool image


def test_which_names_the_image_version_and_pool_carrying_bash(inventory, docker_client):
    version = bash_version(docker_client)
    answer = cli("which", "bash", f"=={version}", "--pools", str(POOLS), "--from",
                 str(inventory), "--json")
    assert answer.returncode == 0, answer.stderr
    carriers = {c["image"]: c for c in json.loads(answer.stdout)}
    small = carriers[SMALL]
    assert (small["kind"], small["version"]) == ("dpkg", version)
    assert small["digest"] == docker_client.images.get(SMALL).id
    assert small["pools"] == ["linux-small"]  # the pools file's pool whose image this is
    assert sorted(p for c in carriers.values() for p in c["pools"]) == [
        "gpu", "linux-large", "linux-small"]


def test_a_version_outside_the_spec_and_an_absent_package_are_not_found(inventory,
                                                                        docker_client):
    version = bash_version(docker_client)
    older = cli("which", "bash", f"<{version}", "--from", str(inventory))
    assert older.returncode == 1 and "no recorded image carries bash <" in older.stderr
    absent = cli("which", "nginx", "--pools", str(POOLS), "--from", str(inventory))
    assert absent.returncode == 1 and absent.stdout == ""
    text = cli("which", "bash", "--pools", str(POOLS), "--from", str(inventory))
    assert f"bash {version} (dpkg) in {SMALL} sha256:" in text.stdout
    assert [line.rpartition(": ")[2] for line in text.stdout.splitlines()
            if f" in {SMALL} " in line] == ["linux-small"]
