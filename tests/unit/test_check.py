"""`python -m executor --check` (executor/check.py): every failure it names, and its exit code.
Docker is a fake of the SDK calls the check makes, iptables a fake of the CLI; the real engine
is checked in tests/e2e/test_install_script.py, the real iptables in
tests/isolation/test_check_networking.py."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys

import docker
import pytest

from executor import check
from tests.conftest import ROOT, TEST_POOLS


class FakeImages:
    def __init__(self, present: set[str]) -> None:
        self.present = present

    def get(self, name: str):
        if name not in self.present:
            raise docker.errors.ImageNotFound(f"No such image: {name}")
        return object()


class FakeDocker:
    def __init__(self, present: set[str] = frozenset(), reachable: bool = True) -> None:
        self.images = FakeImages(set(present))
        self.reachable = reachable

    def ping(self) -> bool:
        if not self.reachable:
            raise docker.errors.DockerException("Error while fetching server API version")
        return True

    def version(self) -> dict:
        return {"Version": "20.10.24"}


LOCAL_IMAGES = {"runnerhub/runner-linux-small:local", "runnerhub/runner-linux-large:local",
                "runnerhub/runner-gpu:local"}


@pytest.fixture
def env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("RUNNERHUB_")]:
        monkeypatch.delenv(key)
    values = {"GITHUB_APP_SECRET_ID": "runnerhub/test/github-app", "HOST_ID": "host-1"}
    for key, value in values.items():
        monkeypatch.setenv(f"RUNNERHUB_{key}", value)

    def set_env(**more: str) -> None:
        for key, value in more.items():
            monkeypatch.setenv(f"RUNNERHUB_{key.upper()}", value)

    return set_env


class FakeIptables:
    """The iptables CLI as the check calls it: each call recorded; `fail` maps an argument
    sequence found in a call to (exit code, stderr), or to an exception to raise."""

    def __init__(self, fail: dict | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = {tuple(key.split()): value for key, value in (fail or {}).items()}

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess:
        self.calls.append(argv)
        for part, outcome in self.fail.items():
            if any(tuple(argv[i:i + len(part)]) == part for i in range(len(argv))):
                if isinstance(outcome, Exception):
                    raise outcome
                code, stderr = outcome
                return subprocess.CompletedProcess(argv, code, "", stderr)
        if argv[1:] == ["--version"]:
            return subprocess.CompletedProcess(argv, 0, "iptables v1.8.9 (nf_tables)\n", "")
        # -C (a jump) and -L RUNNERHUB: not there yet, so the chain is made.
        absent = "-C" in argv or ("-L" in argv and "RUNNERHUB" in argv)
        return subprocess.CompletedProcess(argv, 1 if absent else 0, "",
                                           "No chain/target/match by that name." if absent
                                           else "")


def run(env_file=None, *, client=None, require_images=False,
        iptables=None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = check.run(env_file, require_images=require_images,
                     docker_factory=lambda: client or FakeDocker(LOCAL_IMAGES),
                     iptables=iptables or FakeIptables(), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_ready_host_passes_and_reports_what_it_checked(env):
    code, out, err = run()
    assert (code, err) == (0, "")
    assert "host id host-1 from RUNNERHUB_HOST_ID" in out
    assert "pools: linux-small, linux-large, gpu" in out
    assert "docker: ok (engine 20.10.24)" in out
    assert "image runnerhub/runner-gpu:local (pools gpu): present" in out
    assert out.rstrip().endswith("check: ok")


def test_settings_from_an_environment_file_the_process_environment_overrides(env, tmp_path):
    env_file = tmp_path / "executor.env"
    env_file.write_text("RUNNERHUB_EXECUTOR_POOLS=gpu\nRUNNERHUB_SLOTS=3\nAWS_DEFAULT_REGION=x\n")
    env(slots="5")
    code, out, _ = run(env_file)
    assert code == 0
    assert "5 slots" in out and "pools: gpu " in out


@pytest.mark.parametrize(
    ("settings", "message_part"),
    [
        ({"slots": "0"}, "slots"),
        ({"pools_file": "/missing.toml"}, "cannot read pools file /missing.toml"),
        ({"executor_pools": "linux-small,nope"}, "unknown pools nope"),
        ({"github_app_secret_id": "", "github_app_id": "1", "github_app_key_file": "/nope.pem"},
         "GitHub App key file /nope.pem not found"),
        ({"imds_endpoint": "http://169.254.169.254/latest"}, "imds_endpoint"),
    ],
)
def test_configuration_errors_exit_2_naming_the_setting(env, monkeypatch, settings,
                                                        message_part):
    if settings.get("github_app_secret_id") == "":
        monkeypatch.delenv("RUNNERHUB_GITHUB_APP_SECRET_ID")
        settings = {k: v for k, v in settings.items() if k != "github_app_secret_id"}
    env(**settings)
    code, out, err = run()
    assert code == check.EXIT_CONFIG
    assert "invalid configuration" in err and message_part in err, err
    assert out == ""


def test_missing_environment_file_exits_2(env, tmp_path):
    code, _, err = run(tmp_path / "absent.env")
    assert code == 2 and "environment file" in err and "not found" in err


def test_unreachable_imds_without_a_host_id_exits_2(env, monkeypatch):
    monkeypatch.delenv("RUNNERHUB_HOST_ID")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env(imds_endpoint=f"http://127.0.0.1:{port}", imds_attempts="1")
    code, _, err = run()
    assert code == 2 and "instance metadata unreachable" in err


def test_unreachable_docker_exits_1(env):
    code, out, err = run(client=FakeDocker(reachable=False))
    assert code == check.EXIT_NOT_READY
    assert "Docker engine unreachable: DockerException" in err
    assert "settings: ok" in out


def test_missing_image_is_reported_and_fails_only_when_required(env):
    client = FakeDocker(LOCAL_IMAGES - {"runnerhub/runner-gpu:local"})
    code, out, _ = run(client=client)
    assert code == 0
    assert "image runnerhub/runner-gpu:local (pools gpu): missing" in out
    assert "pulled at first use" in out
    code, _, err = run(client=client, require_images=True)
    assert code == 1 and "1 pool image(s) missing: runnerhub/runner-gpu:local" in err


def test_pools_sharing_an_image_are_reported_once(env):
    env(pools_file=str(TEST_POOLS))
    code, out, _ = run(client=FakeDocker(set()))
    images = [line for line in out.splitlines() if line.startswith("image ")]
    assert code == 0 and len(images) == 2
    assert ("image runnerhub/runner-linux-small:local (pools hosted-like, schemas): missing"
            in images)


# --- hardened networking (any RUNNERHUB_DOCKER_NETWORK but host) ------------------------------

def test_hardened_networking_ready_makes_the_chain_and_its_jumps_and_says_so(env):
    iptables = FakeIptables()
    code, out, err = run(iptables=iptables)
    assert (code, err) == (0, ""), err
    assert ("hardened networking: ok (iptables v1.8.9 (nf_tables); chain RUNNERHUB in mangle "
            "FORWARD, INPUT)") in out
    made = [call[call.index("-t") + 1:] for call in iptables.calls if "-t" in call]
    assert ["filter", "-n", "-L", "DOCKER-USER"] in made
    assert ["mangle", "-N", "RUNNERHUB"] in made
    assert ["mangle", "-I", "FORWARD", "1", "-j", "RUNNERHUB"] in made
    assert ["mangle", "-I", "INPUT", "1", "-j", "RUNNERHUB"] in made


def test_hardened_networking_without_the_iptables_cli_fails_1_naming_it(env):
    iptables = FakeIptables({"--version": FileNotFoundError(2, "No such file")})
    code, out, err = run(iptables=iptables)
    assert code == check.EXIT_NOT_READY
    assert "hardened networking cannot work on this host (RUNNERHUB_DOCKER_NETWORK=runnerhub)" \
        in err
    assert "the iptables CLI cannot run (FileNotFoundError" in err and "install iptables" in err
    assert "docker: ok" in out and "check: ok" not in out
    assert len(iptables.calls) == 1  # nothing else tried


def test_hardened_networking_without_root_says_to_run_as_root(env):
    iptables = FakeIptables({"-L DOCKER-USER": (
        4, "iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: "
           "Permission denied (you must be root)")})
    code, _, err = run(iptables=iptables)
    assert code == check.EXIT_NOT_READY
    assert "Permission denied (you must be root)" in err and "run the check as root" in err
    assert not any("-N" in call for call in iptables.calls)


def test_dockerd_without_iptables_has_no_docker_user_chain_and_fails(env):
    iptables = FakeIptables({"-L DOCKER-USER": (
        1, "iptables: No chain/target/match by that name.")})
    code, _, err = run(iptables=iptables)
    assert code == check.EXIT_NOT_READY
    assert "Docker's DOCKER-USER chain is missing: dockerd runs with iptables off" in err
    assert "nothing keeps job networks apart" in err
    assert not any("-N" in call for call in iptables.calls)


def test_a_chain_that_cannot_be_made_fails_with_iptables_own_reason(env):
    iptables = FakeIptables({"-I INPUT": (
        2, "iptables v1.8.9 (nf_tables): Couldn't load match `addrtype'")})
    code, out, err = run(iptables=iptables)
    assert code == check.EXIT_NOT_READY
    assert "the RUNNERHUB chain cannot be made: iptables -w 10 -t mangle -I INPUT 1 -j " \
        "RUNNERHUB failed (2): iptables v1.8.9 (nf_tables): Couldn't load match" in err
    assert "hardened networking: ok" not in out


def test_the_host_network_has_no_firewall_to_check(env):
    iptables = FakeIptables({"--version": AssertionError("iptables called")})
    env(docker_network="host")
    code, out, err = run(iptables=iptables)
    assert (code, err) == (0, "")
    assert "hardened networking: off (RUNNERHUB_DOCKER_NETWORK=host" in out
    assert iptables.calls == []


def test_docker_unreachable_is_reported_before_any_iptables_call(env):
    iptables = FakeIptables()
    code, _, err = run(client=FakeDocker(reachable=False), iptables=iptables)
    assert code == check.EXIT_NOT_READY and "Docker engine unreachable" in err
    assert iptables.calls == []


# --- the command line --------------------------------------------------------------------------

def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "executor", *args], env=base | env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_cli_check_without_docker_exits_1_without_a_traceback(tmp_path):
    result = cli("--check", RUNNERHUB_GITHUB_APP_SECRET_ID="x", RUNNERHUB_HOST_ID="h",
                 DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock")
    assert result.returncode == 1, result.stderr
    assert "Docker engine unreachable" in result.stderr and "Traceback" not in result.stderr


def test_cli_check_options_need_check():
    result = cli("--env-file", "/etc/runnerhub/executor.env")
    assert result.returncode == 2 and "go with --check" in result.stderr
