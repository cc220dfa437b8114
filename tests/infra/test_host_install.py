"""infra/runnerhub_infra/host_install.py: the user data and the Image Builder component both run
scripts/install-executor.sh; the shell they produce is valid and quotes what it is given."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from runnerhub_infra import host_install

from chalicelib.settings import EXECUTOR_DRAIN_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[2]
ENVIRONMENT = {
    "AWS_DEFAULT_REGION": "eu-west-1",
    "RUNNERHUB_STAGE": "dev",
    "RUNNERHUB_POOLS_FILE": "/opt/runnerhub/app/chalicelib/config/pools.production.toml",
    "RUNNERHUB_GITHUB_APP_SECRET_ID": "runnerhub/dev/github-app",
    "RUNNERHUB_JOBS_TABLE": "${Token[TOKEN.123]}",  # a CDK token passes through untouched
    "RUNNERHUB_ODD": "it's $HOME and `x` with spaces",
}
BUNDLE_URI = "s3://cdk-hnb659fds-assets-123456789012-eu-west-1/" + "a" * 64 + ".zip"
REGISTRY = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"


def bash_syntax_ok(lines: list[str]) -> None:
    result = subprocess.run(["bash", "-n"], input="\n".join(lines) + "\n", text=True,
                            capture_output=True, timeout=10)
    assert result.returncode == 0, result.stderr


def install_line(lines: list[str]) -> str:
    (line,) = [line for line in lines if host_install.INSTALL_SCRIPT in line]
    return line


def test_component_document_is_yaml_with_build_and_validate_phases():
    text = host_install.component_yaml(BUNDLE_URI, ENVIRONMENT, ecr_registry=REGISTRY)
    document = yaml.safe_load(text)
    assert document["schemaVersion"] == 1.0
    assert [phase["name"] for phase in document["phases"]] == ["build", "validate"]
    build, validate = (phase["steps"] for phase in document["phases"])
    download, install = build
    assert download["action"] == "S3Download"
    assert download["inputs"] == [{"source": BUNDLE_URI, "destination": host_install.BUNDLE_ZIP}]
    assert install["action"] == "ExecuteBash"
    commands = install["inputs"]["commands"]
    assert install_line(commands) == (
        f"bash {host_install.BUNDLE_DIR}/{host_install.INSTALL_SCRIPT} --bundle "
        f"{host_install.BUNDLE_ZIP} --ecr-registry {REGISTRY}")
    bash_syntax_ok(commands)
    (check,) = validate
    assert check["action"] == "ExecuteBash"
    assert check["inputs"]["commands"][-1] == (
        "/opt/runnerhub/venv/bin/python -m executor --check --require-images")
    # A CDK token must stay on one line to resolve.
    assert "${Token[TOKEN.123]}" in text


def test_component_without_pre_pull_skips_it_and_does_not_require_images():
    document = host_install.component_document(BUNDLE_URI, ENVIRONMENT, pre_pull=False)
    install = document["phases"][0]["steps"][1]["inputs"]["commands"]
    assert install_line(install).endswith("--skip-pull")
    check = document["phases"][1]["steps"][0]["inputs"]["commands"][-1]
    assert check == host_install.CHECK_COMMAND


def test_check_environment_is_exported_exactly_as_given():
    document = host_install.component_document(BUNDLE_URI, ENVIRONMENT)
    exports = [c for c in document["phases"][1]["steps"][0]["inputs"]["commands"]
               if c.startswith("export ")]
    result = subprocess.run(["bash", "-c", "\n".join([*exports, "env -0"])], text=True,
                            capture_output=True, timeout=10, env={"PATH": os.environ["PATH"]})
    seen = dict(item.split("=", 1) for item in result.stdout.split("\0") if "=" in item)
    assert {key: seen[key] for key in ENVIRONMENT} == ENVIRONMENT


def test_fallback_user_data_runs_the_same_script_with_start(tmp_path):
    lines = host_install.user_data_commands(ENVIRONMENT, bundle_s3_uri=BUNDLE_URI,
                                            ecr_registry=REGISTRY, region="eu-west-1")
    bash_syntax_ok(lines)
    assert install_line(lines) == (
        f"bash {host_install.BUNDLE_DIR}/{host_install.INSTALL_SCRIPT} --bundle "
        f"{host_install.BUNDLE_ZIP} --ecr-registry {REGISTRY} --start")
    download = next(line for line in lines if line.startswith("aws s3 cp"))
    assert BUNDLE_URI in download and "--region eu-west-1" in download
    assert lines.index(download) < lines.index(install_line(lines))


def test_ami_user_data_only_writes_the_environment_and_starts_the_service():
    lines = host_install.user_data_commands(ENVIRONMENT)
    bash_syntax_ok(lines)
    text = "\n".join(lines)
    assert host_install.INSTALL_SCRIPT not in text and "aws s3" not in text
    assert lines[-1] == "systemctl start runnerhub-executor.service"


def test_environment_file_is_written_verbatim_and_private(tmp_path):
    lines = host_install.write_env_file_commands(ENVIRONMENT)
    script = "\n".join(lines).replace("/etc/runnerhub", str(tmp_path / "etc"))
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], check=True, timeout=10)
    env_file = tmp_path / "etc" / "executor.env"
    assert env_file.read_text() == "".join(f"{k}={v}\n" for k, v in ENVIRONMENT.items())
    assert env_file.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"RUNNERHUB_X": "a\nRUNNERHUB_EVIL=1"}, "line break"),
        ({"RUNNERHUB_X": "a\nRUNNERHUB_ENV"}, "line break"),  # would end the here-document
        ({"BAD-NAME": "x"}, "not valid"),
    ],
)
def test_environment_that_could_inject_lines_is_refused(environment, message):
    with pytest.raises(ValueError, match=message):
        host_install.user_data_commands(environment)
    with pytest.raises(ValueError, match=message):
        host_install.component_document(BUNDLE_URI, environment)


def test_registry_must_be_a_host_name_unless_cdk_tokens_make_it_at_deploy():
    with pytest.raises(ValueError, match="not a host name"):
        host_install.user_data_commands({}, bundle_s3_uri=BUNDLE_URI, ecr_registry="x; rm -rf /")
    tokens = "${Token[AWS.AccountId.8]}.dkr.ecr.${Token[AWS.Region.12]}.${Token[AWS.URLSuffix.3]}"
    lines = host_install.user_data_commands({}, bundle_s3_uri=BUNDLE_URI, ecr_registry=tokens)
    assert f"--ecr-registry '{tokens}'" in install_line(lines)


def test_bundle_paths_match_the_install_script(tmp_path):
    script = ROOT / host_install.INSTALL_SCRIPT
    printed = subprocess.run(["bash", str(script), "--print-bundle-paths"], text=True,
                             capture_output=True, check=True, timeout=10).stdout.split()
    assert tuple(printed) == host_install.BUNDLE_PATHS
    staged = host_install.stage_bundle(tmp_path / "bundle")
    assert (staged / host_install.INSTALL_SCRIPT).is_file()
    assert (staged / "executor" / "host" / "runnerhub-executor.service").is_file()
    assert not list(staged.rglob("__pycache__"))


def test_unit_file_matches_the_install_layout_and_the_drain_timeout():
    unit = host_install.UNIT_FILE.read_text()
    assert f"ExecStart={host_install.VENV_DIR}/bin/python -m executor\n" in unit
    assert f"EnvironmentFile={host_install.ENV_FILE}\n" in unit
    assert f"ConditionPathExists={host_install.ENV_FILE}\n" in unit
    assert f"WorkingDirectory={host_install.APP_DIR}\n" in unit
    # systemd waits for the drain, plus a minute, before SIGKILL.
    assert f"TimeoutStopSec={int(EXECUTOR_DRAIN_TIMEOUT_S) + 60}\n" in unit
    assert "StandardOutput=append:/var/log/runnerhub/executor.log" in unit
    # A clean exit (drained: a lifecycle hook or Spot notice ends the instance) is not
    # restarted; a crash is.
    restarts = [line for line in unit.splitlines() if line.startswith("Restart=")]
    assert restarts == ["Restart=on-failure"]


def test_build_instance_user_data_installs_the_ssm_agent():
    lines = host_install.build_instance_user_data("arm64")
    bash_syntax_ok(lines)
    assert "debian_arm64/amazon-ssm-agent.deb" in "\n".join(lines)
    with pytest.raises(ValueError):
        host_install.build_instance_user_data("riscv64")
