"""The `docker` profile (executor/job_engine.py): a job builds images with a Docker engine of its
own, started beside its runner on the job's network, never the host's engine; both go with the
job."""

from __future__ import annotations

import json
import secrets
import time

import pytest
from pydantic import SecretStr

from executor.containers import (
    ContainerStartFailed,
    RunnerContainers,
    RunnerSpec,
    job_network_name,
)
from executor.job_engine import ENGINE_LABEL, JobEngines, bounding_capabilities, engine_name
from tests.isolation.conftest import RUNNER_IMAGE

pytestmark = [pytest.mark.isolation, pytest.mark.docker]

# A job step: tar a one-file build context, POST it to $DOCKER_HOST's /build (the runner image
# has no docker CLI), then list that engine's images. Prints one JSON line.
BUILD_STEP = r"""
import http.client, io, json, os, tarfile
host, port = os.environ["DOCKER_HOST"].removeprefix("tcp://").rsplit(":", 1)
context = io.BytesIO()
with tarfile.open(fileobj=context, mode="w") as tar:
    for name, data in (("Dockerfile", b"FROM scratch\nCOPY hello.txt /hello.txt\n"),
                       ("hello.txt", b"built by the job\n")):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
def call(method, path, body=None, headers={}):
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(method, path, body=body, headers=headers)
    answer = conn.getresponse()
    return answer.status, answer.read().decode()
builds = []
for _ in range(2):
    status, text = call("POST", "/build?t=TAG", context.getvalue(),
                        {"Content-Type": "application/x-tar"})
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    builds.append({"status": status,
                   "id": next((l["aux"]["ID"] for l in lines if "aux" in l), None),
                   "cached": any("Using cache" in l.get("stream", "") for l in lines),
                   "errors": [l["error"] for l in lines if "error" in l]})
status, text = call("GET", "/images/json")
print(json.dumps({"builds": builds, "tags": [t for i in json.loads(text)
                                             for t in i.get("RepoTags") or []]}))
"""


# Not "host": hardened networking, each runner (and its engine) on its own `rh-job-<name>`.
HARDENED = "runnerhub-test"


def leftovers(client, runner: str) -> list[str]:
    """What of the runner's engine is still there: container, volume, network."""
    import docker

    found = []
    for kind in ("containers", "volumes", "networks"):
        try:
            getattr(client, kind).get(engine_name(runner))
            found.append(kind)
        except docker.errors.NotFound:
            pass
    return found


def spec(name: str, host: str, isolation: str = "docker") -> RunnerSpec:
    return RunnerSpec(name=name, image=RUNNER_IMAGE, pool="builds", job_id=1, generation=1,
                      host_id=host, cpus=0.5, memory_mb=256, pids_limit=256,
                      isolation=isolation)


def test_a_job_builds_with_its_own_engine_and_not_the_hosts(docker_client, engine_image,
                                                            tmp_path):
    host = f"test-{secrets.token_hex(4)}"
    name = f"rh-build-{secrets.token_hex(3)}"
    tag = f"rh-job-built-{secrets.token_hex(4)}:1"
    containers = RunnerContainers(docker_client, tmp_path / "jit", HARDENED,
                                  engines=JobEngines(docker_client, engine_image, host))
    containers.prepare(host)
    started = time.monotonic()
    containers.start(spec(name, host), SecretStr("not-a-real-jit-config"))
    start_s = time.monotonic() - started
    try:
        runner = docker_client.containers.get(name)
        env = dict(item.split("=", 1) for item in runner.attrs["Config"]["Env"])
        assert env["DOCKER_HOST"] == f"tcp://{engine_name(name)}:2375"
        engine = docker_client.containers.get(engine_name(name))
        assert engine.labels[ENGINE_LABEL] == "true" and engine.labels["runnerhub.host"] == host
        # Its job's labels, so the runtime monitor records against the job; not a runner's.
        assert (engine.labels["runnerhub.pool"], engine.labels["runnerhub.job"]) == ("builds", "1")
        assert "runnerhub.managed" not in engine.labels
        job_network = job_network_name(name)  # the runner's own network, firewalled
        assert list(engine.attrs["NetworkSettings"]["Networks"]) == [job_network]
        assert list(runner.attrs["NetworkSettings"]["Networks"]) == [job_network]
        # No host path in the engine: its data root is its own volume.
        assert [m["Type"] for m in engine.attrs["Mounts"]] == ["volume"]
        assert not engine.attrs["HostConfig"]["Privileged"]
        assert set(engine.attrs["HostConfig"]["CapAdd"]) == set(bounding_capabilities())

        # The job's step, as hardened as a runner: uid 1001, no capabilities, read-only root.
        output = docker_client.containers.run(
            RUNNER_IMAGE, ["python3", "-c", BUILD_STEP.replace("TAG", tag)],
            entrypoint=[], user="1001", network=job_network, remove=True,
            environment={"DOCKER_HOST": env["DOCKER_HOST"]}, cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"], read_only=True)
        result = json.loads(output.decode().strip().splitlines()[-1])
        first, second = result["builds"]
        assert first["status"] == second["status"] == 200, result
        assert not first["errors"] and first["id"], result
        assert not first["cached"] and second["cached"], result  # the second build is cached
        assert second["id"] == first["id"]
        assert tag in result["tags"]  # the job's engine has it ...
        assert not docker_client.images.list(name=tag)  # ... the host's engine does not
    finally:
        containers.remove(name)
    assert leftovers(docker_client, name) == []
    assert not docker_client.networks.list(names=[job_network_name(name)])
    assert start_s < 20, f"engine and runner took {start_s:.1f}s to start"


def test_an_engine_that_cannot_start_fails_the_start_and_leaves_nothing(docker_client,
                                                                       tmp_path):
    host = f"test-{secrets.token_hex(4)}"
    name = f"rh-build-{secrets.token_hex(3)}"
    containers = RunnerContainers(
        docker_client, tmp_path / "jit", HARDENED,
        engines=JobEngines(docker_client, "runnerhub/no-such-engine:local", host))
    containers.prepare(host)
    with pytest.raises(ContainerStartFailed, match=r"job engine image .* not found"):
        containers.start(spec(name, host), SecretStr("x"))
    assert leftovers(docker_client, name) == []
    assert not docker_client.containers.list(all=True, filters={"name": name})
    assert not containers.jitconfig_path(name).exists()
    assert not docker_client.networks.list(names=[job_network_name(name)])


def test_a_docker_pool_without_an_engine_never_falls_back_to_the_hosts(docker_client,
                                                                      tmp_path):
    name = f"rh-build-{secrets.token_hex(3)}"
    containers = RunnerContainers(docker_client, tmp_path / "jit", HARDENED)
    containers.prepare("test-host")
    with pytest.raises(ContainerStartFailed, match="no job engine"):
        containers.start(spec(name, "test-host"), SecretStr("x"))
    assert not docker_client.containers.list(all=True, filters={"name": name})


def test_a_restarted_daemon_removes_engines_whose_runner_is_gone(docker_client, engine_image):
    """Left by a daemon that died: a volume and a network (no container: nothing to start)."""
    host = f"test-{secrets.token_hex(4)}"
    engines = JobEngines(docker_client, engine_image, host)
    gone, kept = f"rh-gone-{secrets.token_hex(3)}", f"rh-kept-{secrets.token_hex(3)}"
    for runner in (gone, kept):
        docker_client.volumes.create(engine_name(runner), labels=engines.labels(runner))
    docker_client.networks.create(engine_name(gone), driver="bridge",
                                  labels=engines.labels(gone))
    try:
        assert engines.runners() == {gone, kept}
        assert engines.remove_leftovers(keep={kept}) == [gone]
        assert leftovers(docker_client, gone) == []
        assert leftovers(docker_client, kept) == ["volumes"]
    finally:
        engines.remove(kept)
        engines.remove(gone)


def test_without_a_job_network_the_engine_gets_a_network_of_its_own(docker_client,
                                                                   engine_image):
    """The local stack ("host": no per-job networks): the engine never joins a shared network;
    the runner, on the host's network, reaches it by address."""
    import urllib.request

    runner = f"rh-local-{secrets.token_hex(3)}"
    engines = JobEngines(docker_client, engine_image, f"test-{secrets.token_hex(4)}")
    try:
        env = engines.start(runner, "host")
        engine = docker_client.containers.get(engine_name(runner))
        assert list(engine.attrs["NetworkSettings"]["Networks"]) == [engine_name(runner)]
        address = engine.attrs["NetworkSettings"]["Networks"][engine_name(runner)]["IPAddress"]
        assert env == {"DOCKER_HOST": f"tcp://{address}:2375"}
        with urllib.request.urlopen(f"http://{address}:2375/version", timeout=10) as answer:
            assert json.loads(answer.read())["ApiVersion"]
    finally:
        engines.remove(runner)
    assert leftovers(docker_client, runner) == []
