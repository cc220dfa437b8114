"""How an executor host gets installed, for the CDK constructs: the launch template's user data
and the EC2 Image Builder component. Every path runs the same `scripts/install-executor.sh`
(docs/executor-host.md):

- executor AMI: the Image Builder component's build phase runs the script (no environment file,
  the service only enabled); its validate phase runs `python -m executor --check`. At boot the
  user data only writes the environment file and starts the service.
- fallback (a plain Debian 12 AMI): the user data writes the environment file, downloads the
  bundle, and runs the script with `--start`.

Pure Python (no aws_cdk): values may be CDK tokens (strings), which pass through untouched.
"""

from __future__ import annotations

import re
import shlex
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = "scripts/install-executor.sh"
APP_DIR = "/opt/runnerhub/app"
VENV_DIR = "/opt/runnerhub/venv"
ENV_FILE = "/etc/runnerhub/executor.env"
SERVICE = "runnerhub-executor"
UNIT_FILE = REPO_ROOT / "executor" / "host" / f"{SERVICE}.service"
# What a host runs, shipped as one S3 asset; the install script takes the same paths from a
# directory bundle (`install-executor.sh --print-bundle-paths`).
BUNDLE_PATHS = (
    "executor",
    "chalicelib",
    "requirements.txt",
    "requirements-executor.txt",
    "constraints.txt",
    INSTALL_SCRIPT,
)
BUNDLE_ZIP = "/tmp/runnerhub-executor.zip"
BUNDLE_DIR = "/tmp/runnerhub-executor"
CHECK_COMMAND = f"{VENV_DIR}/bin/python -m executor --check"
# Debian's AMIs have no SSM agent, and Image Builder drives its build instance through it:
# the recipe's user data override installs it (build_instance_user_data).
SSM_AGENT_URL = (
    "https://s3.amazonaws.com/ec2-downloads-windows/SSMAgent/latest/debian_{arch}/"
    "amazon-ssm-agent.deb"
)
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REGISTRY = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]+)?")


def stage_bundle(target: Path, root: Path = REPO_ROOT) -> Path:
    """Copy what a host runs into `target` (replaced), without caches, for a stable asset hash."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for relative in BUNDLE_PATHS:
        source = root / relative
        if source.is_dir():
            shutil.copytree(source, target / relative, ignore=ignore, dirs_exist_ok=True)
        elif source.is_file():
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / relative)
        else:
            raise FileNotFoundError(f"bundle path {relative} missing under {root}")
    return target


def env_file_text(environment: Mapping[str, str]) -> str:
    """A systemd EnvironmentFile: KEY=VALUE lines. A value with a newline could inject lines
    (or end the here-document that writes it): refused."""
    lines = []
    for key, value in environment.items():
        if not _ENV_KEY.fullmatch(key):
            raise ValueError(f"environment variable name {key!r} is not valid")
        if "\n" in str(value) or "\r" in str(value):
            raise ValueError(f"environment variable {key} has a line break")
        lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"


def _exports(environment: Mapping[str, str]) -> list[str]:
    env_file_text(environment)  # the same validation
    return [f"export {key}={shlex.quote(str(value))}" for key, value in environment.items()]


def _registry_args(ecr_registry: str) -> list[str]:
    if not ecr_registry:
        return []
    # With CDK tokens in it ("${Token[...]}": account, region) the value is only known at
    # deploy time; the install script checks it again then.
    if "${Token[" not in ecr_registry and not _REGISTRY.fullmatch(ecr_registry):
        raise ValueError(f"ECR registry {ecr_registry!r} is not a host name")
    return ["--ecr-registry", shlex.quote(ecr_registry)]


def write_env_file_commands(environment: Mapping[str, str]) -> list[str]:
    """Shell commands writing ENV_FILE (mode 0600) from `environment`."""
    return [
        "install -d -m 0755 /etc/runnerhub",
        f"(umask 077 && cat > {ENV_FILE} <<'RUNNERHUB_ENV'\n"
        f"{env_file_text(environment)}RUNNERHUB_ENV\n)",
    ]


def user_data_commands(
    environment: Mapping[str, str],
    *,
    bundle_s3_uri: str | None = None,
    ecr_registry: str = "",
    region: str | None = None,
) -> list[str]:
    """The launch template's user data (bash lines, for `ec2.UserData.add_commands`).

    bundle_s3_uri None: the host boots from the executor AMI, where everything is installed:
    write the environment file, start the service. Otherwise the fallback on a plain Debian 12
    AMI: the environment file, the AWS CLI (Debian's AMI has none) to download the bundle, then
    the install script with --start (the full install, a few minutes at boot)."""
    commands = ["set -euo pipefail", *write_env_file_commands(environment)]
    if bundle_s3_uri is None:
        return [*commands, "systemctl daemon-reload", f"systemctl start {SERVICE}.service"]
    region_arg = f" --region {shlex.quote(region)}" if region else ""
    return [
        *commands,
        "command -v aws >/dev/null || { apt-get update -qq && "
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends awscli; }",
        f"aws s3 cp{region_arg} --only-show-errors {shlex.quote(bundle_s3_uri)} {BUNDLE_ZIP}",
        f"rm -rf {BUNDLE_DIR} && python3 -m zipfile -e {BUNDLE_ZIP} {BUNDLE_DIR}",
        " ".join(["bash", f"{BUNDLE_DIR}/{INSTALL_SCRIPT}", "--bundle", BUNDLE_ZIP,
                  *_registry_args(ecr_registry), "--start"]),
        f"rm -rf {BUNDLE_DIR} {BUNDLE_ZIP}",
    ]


def build_instance_user_data(arch: str = "amd64") -> list[str]:
    """The Image Builder recipe's user data override for a Debian base image: the SSM agent,
    through which Image Builder runs the component (Debian's AMIs ship none)."""
    if arch not in ("amd64", "arm64"):
        raise ValueError(f"no SSM agent package for {arch}")
    return [
        "#!/bin/bash",
        "set -euo pipefail",
        f"curl -fsSL --retry 3 -o /tmp/amazon-ssm-agent.deb {SSM_AGENT_URL.format(arch=arch)}",
        "dpkg -i /tmp/amazon-ssm-agent.deb",
        "rm -f /tmp/amazon-ssm-agent.deb",
        "systemctl enable --now amazon-ssm-agent",
    ]


def component_document(
    bundle_s3_uri: str,
    check_environment: Mapping[str, str],
    *,
    ecr_registry: str = "",
    pre_pull: bool = True,
    name: str = "runnerhub-executor",
) -> dict[str, Any]:
    """The EC2 Image Builder (AWSTOE) component: build = download the bundle and run the install
    script (no environment file: the AMI serves every pool; boot adds it), validate =
    `python -m executor --check`. `check_environment`: the RUNNERHUB_* settings the check needs
    at build time (stage, pools file, the App's secret id, ...), exported, never written to
    the image. With `pre_pull` the runner images are baked in and the check requires them."""
    exports = _exports(check_environment)
    script = ["bash", f"{BUNDLE_DIR}/{INSTALL_SCRIPT}", "--bundle", BUNDLE_ZIP,
              *_registry_args(ecr_registry)]
    check = CHECK_COMMAND
    if not pre_pull:
        script.append("--skip-pull")
    else:
        check += " --require-images"
    return {
        "name": name,
        "description": "RunnerHub executor host: Docker, the daemon, its unit, the CloudWatch "
                       "agent and the runner images (scripts/install-executor.sh)",
        "schemaVersion": 1.0,
        "phases": [
            {
                "name": "build",
                "steps": [
                    {
                        "name": "DownloadBundle",
                        "action": "S3Download",
                        "inputs": [{"source": bundle_s3_uri, "destination": BUNDLE_ZIP}],
                    },
                    {
                        "name": "Install",
                        "action": "ExecuteBash",
                        "inputs": {"commands": [
                            "set -euo pipefail",
                            *exports,
                            f"rm -rf {BUNDLE_DIR}",
                            f"python3 -m zipfile -e {BUNDLE_ZIP} {BUNDLE_DIR}",
                            " ".join(script),
                            f"rm -rf {BUNDLE_DIR} {BUNDLE_ZIP}",
                        ]},
                    },
                ],
            },
            {
                "name": "validate",
                "steps": [
                    {
                        "name": "Check",
                        "action": "ExecuteBash",
                        "inputs": {"commands": ["set -euo pipefail", *exports, check]},
                    },
                ],
            },
        ],
    }


def component_yaml(*args: Any, **kwargs: Any) -> str:
    """component_document() as the YAML text Image Builder takes (`CfnComponent.data`). No line
    folding: a folded CDK token would no longer resolve."""
    return yaml.safe_dump(component_document(*args, **kwargs), sort_keys=False,
                          width=1_000_000, default_flow_style=False)
