"""scripts/install-executor.sh in a Debian 12 container, offline: the executor host's install
as the AMI build and the user-data fallback run it, ending with `python -m executor --check`.

Set-up (`make test` does it): `make executor-host-image` (Debian bookworm with the script's
Debian packages) and `make wheelhouse` (the executor's wheels). Inside the container: the code
bundle as the CDK app ships it (a zip), the wheelhouse, the host's Docker socket (the check pings
it and finds the runner images) and host networking, so the IMDS stand-in on loopback gives the
host id. Nothing is downloaded: apt finds every package, pip reads the wheelhouse, and the
runner images are present. No systemd in a container: --no-systemd.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import docker
import pytest

from devstack.imds import ImdsStandIn
from tests.conftest import ROOT, require

sys.path.insert(0, str(ROOT / "infra"))
from runnerhub_infra import host_install

pytestmark = pytest.mark.docker

IMAGE = "runnerhub/executor-host-test:local"
WHEELHOUSE = ROOT / ".cache" / "wheelhouse-executor"
INSTANCE_ID = "i-0abc1234def567890"
REGISTRY = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
SCRIPT = f"/tmp/bundle/{host_install.INSTALL_SCRIPT}"
BASE_ARGS = ["--bundle", "/in/bundle.zip", "--wheelhouse", "/wheelhouse",
             "--skip-cloudwatch-agent", "--no-systemd"]


def expected_image_hash() -> str:
    return subprocess.run([str(ROOT / "scripts" / "build-executor-host-image.sh"),
                           "--print-hash"], capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()


@pytest.fixture(scope="module")
def host_image(docker_client):
    try:
        labels = docker_client.images.get(IMAGE).labels or {}
    except docker.errors.ImageNotFound:
        labels = {}
    require(labels.get("runnerhub.inputs-hash") == expected_image_hash(),
            f"{IMAGE} for the current install script (make executor-host-image)")
    require((WHEELHOUSE / ".stamp").is_file(), f"{WHEELHOUSE} (make wheelhouse)")
    return IMAGE


@pytest.fixture
def bundle(tmp_path):
    """The bundle as the CDK app ships it (a zip of host_install.BUNDLE_PATHS), with a
    CloudWatch agent config in it when the checkout has none yet."""
    staged = host_install.stage_bundle(tmp_path / "bundle")
    agent_config = staged / "executor" / "host" / "cloudwatch-agent.json"
    if not agent_config.exists():
        agent_config.write_text(json.dumps({"logs": {"logs_collected": {}}}))
    shutil.make_archive(str(tmp_path / "in" / "bundle"), "zip", staged)
    return tmp_path / "in"


@pytest.fixture
def imds():
    with ImdsStandIn(INSTANCE_ID) as server:
        yield server


@pytest.fixture
def host(docker_client, host_image, bundle, imds, e2e_labels):
    """A running Debian container with the bundle unpacked at /tmp/bundle and an environment
    file at /in/executor.env; `host.sh(cmd)` runs a shell command in it."""
    (bundle / "executor.env").write_text(
        "RUNNERHUB_STAGE=e2e\n"
        "RUNNERHUB_GITHUB_APP_SECRET_ID=runnerhub/e2e/github-app\n"
        f"RUNNERHUB_IMDS_ENDPOINT={imds.endpoint}\n"
        "RUNNERHUB_EXECUTOR_POOLS=linux-small,gpu\n")
    (bundle / "bad.env").write_text("RUNNERHUB_GITHUB_APP_SECRET_ID=x\n"
                                    "RUNNERHUB_EXECUTOR_POOLS=nope\nRUNNERHUB_HOST_ID=h\n")
    container = docker_client.containers.run(
        host_image, ["sleep", "300"], detach=True, labels=e2e_labels, network_mode="host",
        # The check verifies hardened networking with the host's iptables (idempotent, as the
        # executor's start): a host's root has NET_ADMIN.
        cap_add=["NET_ADMIN"],
        volumes={str(bundle): {"bind": "/in", "mode": "ro"},
                 str(WHEELHOUSE): {"bind": "/wheelhouse", "mode": "ro"},
                 "/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"}})

    class Host:
        def sh(self, command: str) -> tuple[int, str]:
            code, output = container.exec_run(["bash", "-c", command], demux=False)
            return code, output.decode(errors="replace")

    host = Host()
    code, output = host.sh("python3 -m zipfile -e /in/bundle.zip /tmp/bundle")
    assert code == 0, output
    return host


def test_install_script_installs_offline_ends_with_the_check_and_fails_with_it(host, imds):
    started = time.monotonic()
    code, output = host.sh(" ".join(["bash", SCRIPT, *BASE_ARGS,
                                     "--env-file", "/in/executor.env"]))
    first_s = time.monotonic() - started
    assert code == 0, output
    # The check ran last, against the real engine, with the host id from IMDS.
    assert f"host id {INSTANCE_ID} from IMDS at {imds.endpoint}" in output
    assert "pools: linux-small, gpu" in output
    assert "image runnerhub/runner-gpu:local (pools gpu): present" in output
    assert "hardened networking: ok (iptables v" in output
    assert "check: ok" in output
    steps = [line for line in output.splitlines() if line.startswith("[install-executor]")]
    assert "python -m executor --check --env-file /etc/runnerhub/executor.env " \
        "--require-images" in steps[-2] and "done" in steps[-1]
    assert ("GET", "/latest/meta-data/instance-id", 200) in imds.requests
    # Only the served pools' images were looked at (pre-pull and check).
    assert "runner-linux-large" not in output

    code, files = host.sh(
        "set -e; stat -c '%a %n' /etc/runnerhub/executor.env /etc/runnerhub/docker/config.json;"
        "cat /etc/systemd/system/runnerhub-executor.service /etc/runnerhub/docker/config.json;"
        "test -s /opt/aws/amazon-cloudwatch-agent/etc/amazon-cloudwatch-agent.json;"
        "test -d /var/log/runnerhub; logrotate --debug /etc/logrotate.d/runnerhub 2>&1;"
        # verify exits 0 on directives it ignores: its output must be empty too.
        "out=$(systemd-analyze verify /etc/systemd/system/runnerhub-executor.service 2>&1);"
        "[ -z \"$out\" ] && echo unit ok || echo \"unit: $out\";"
        "cd / && /opt/runnerhub/venv/bin/python -c "
        "'import executor.check, docker; print(\"pth ok\")'")
    assert code == 0, files
    assert "600 /etc/runnerhub/executor.env" in files
    assert "ExecStart=/opt/runnerhub/venv/bin/python -m executor" in files
    assert "StandardOutput=append:/var/log/runnerhub/executor.log" in files
    assert "rotating pattern: /var/log/runnerhub/*.log" in files
    assert "unit ok" in files
    assert '{}' in files and "pth ok" in files  # no registry yet: an empty docker config

    # Again, with an ECR registry: idempotent, and docker's credHelpers now name it.
    started = time.monotonic()
    code, output = host.sh(" ".join(["bash", SCRIPT, *BASE_ARGS, "--ecr-registry", REGISTRY]))
    second_s = time.monotonic() - started
    assert code == 0, output
    code, config = host.sh("cat /etc/runnerhub/docker/config.json")
    assert json.loads(config) == {"credHelpers": {REGISTRY: "ecr-login"}}
    print(f"install: first run {first_s:.1f} s, second run {second_s:.1f} s")

    # A configuration the check rejects fails the install (in the AMI build: no image).
    code, output = host.sh(" ".join(["bash", SCRIPT, *BASE_ARGS, "--skip-pull",
                                     "--env-file", "/in/bad.env"]))
    assert code != 0
    assert "invalid configuration: unknown pools nope" in output
    assert "the executor check failed" in output


def test_install_script_refuses_bad_arguments_before_changing_anything(host):
    code, output = host.sh(f"bash {SCRIPT} --ecr-registry 'bad host;rm' --no-systemd")
    assert code != 0 and "is not a registry host name" in output
    code, output = host.sh(f"bash {SCRIPT} --bundle /in/bundle.zip --start --no-systemd")
    assert code != 0 and "--start needs systemd" in output
    code, _ = host.sh("test -e /opt/runnerhub")
    assert code != 0  # nothing was installed
