"""`python -m executor --check`: can this host serve? Asks neither AWS nor GitHub.

Validates the settings (as the daemon reads them, optionally from its systemd environment
file), the pools file and that every pool this host serves is in it, the GitHub App key file
when one is named, the host id (RUNNERHUB_HOST_ID, IMDS, or the hostname), the Docker
engine: it answers a ping, and which of the served pools' images it already holds; and, when
the Docker network is not `host`, that hardened networking can work here: the iptables CLI
runs, Docker's DOCKER-USER chain exists (dockerd has iptables on: its isolation between
bridges is what keeps jobs apart) and the RUNNERHUB chain can be made (`Firewall.ensure_chain`,
idempotent: what the daemon does at its start).

Exit codes: 0 ready; 1 the host is not (Docker unreachable, hardened networking impossible;
with --require-images, an image missing); 2 bad configuration (the message says which
setting). The install script ends with it, the executor AMI's validate phase runs it,
operators run it on a host (docs/executor-host.md).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from chalicelib.errors import ConfigurationError
from executor.containers import HOST_NETWORK
from executor.firewall import CHAIN, LOCK_WAIT_S, PARENTS, TABLE, Firewall, FirewallError
from executor.firewall import Runner as IptablesRunner
from executor.firewall import _run as run_iptables  # the runner the daemon's Firewall uses

EXIT_OK, EXIT_NOT_READY, EXIT_CONFIG = 0, 1, 2
DOCKER_TIMEOUT_S = 10


@dataclass(frozen=True)
class ImageStatus:
    image: str
    pools: tuple[str, ...]
    present: bool
    detail: str = ""


def _docker_from_env():
    import docker

    return docker.from_env(timeout=DOCKER_TIMEOUT_S)


def image_status(client, images: dict[str, list[str]]) -> list[ImageStatus]:
    """Whether the engine holds each image (a tag or a digest), by a local lookup: no pull."""
    import docker

    statuses = []
    for image, pools in images.items():
        try:
            client.images.get(image)
            statuses.append(ImageStatus(image, tuple(pools), True))
        except docker.errors.ImageNotFound:
            statuses.append(ImageStatus(image, tuple(pools), False))
        except docker.errors.APIError as exc:  # e.g. an invalid reference
            statuses.append(ImageStatus(image, tuple(pools), False,
                                        str(exc.explanation or exc)[:200]))
    return statuses


def hardened_networking(run: IptablesRunner = run_iptables, binary: str = "iptables") -> str:
    """What hardened networking stands on, checked in order; the iptables version. Raises
    FirewallError naming the first thing missing: the iptables CLI, the permission to use it,
    Docker's DOCKER-USER chain, or the RUNNERHUB chain and its jumps."""
    try:
        version = run([binary, "--version"])
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FirewallError(f"the iptables CLI cannot run ({type(exc).__name__}: {exc}): "
                            "install iptables, the package Docker uses") from exc
    if version.returncode != 0:
        raise FirewallError(f"`{binary} --version` failed ({version.returncode}): "
                            f"{(version.stderr or version.stdout).strip()[:200]}")
    listed = run([binary, "-w", str(LOCK_WAIT_S), "-t", "filter", "-n", "-L", "DOCKER-USER"])
    if listed.returncode != 0:
        reason = (listed.stderr or listed.stdout).strip()
        if "denied" in reason or "root" in reason:
            raise FirewallError(f"iptables refused ({reason[:200]}): run the check as root, "
                                "as the executor runs")
        raise FirewallError(
            "Docker's DOCKER-USER chain is missing: dockerd runs with iptables off "
            '("iptables": false in daemon.json or --iptables=false), so nothing keeps job '
            f"networks apart ({reason[:200] or 'no such chain'})")
    try:
        Firewall(binary, run).ensure_chain()
    except FirewallError as exc:
        raise FirewallError(f"the {CHAIN} chain cannot be made: {exc}") from exc
    return version.stdout.strip() or binary


def run(
    env_file: Path | None = None,
    *,
    require_images: bool = False,
    docker_factory: Callable[[], object] = _docker_from_env,
    iptables: IptablesRunner = run_iptables,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    from executor import settings as executor_settings

    out, err = out or sys.stdout, err or sys.stderr
    try:
        settings = executor_settings.read_settings(env_file)
        pools = executor_settings.served_pools(settings)
        if settings.github_app_key_file and not settings.github_app_key_file.is_file():
            raise ConfigurationError(
                f"GitHub App key file {settings.github_app_key_file} not found")
        host_id, source = executor_settings.resolve_host_id(settings)
    except ConfigurationError as exc:
        print(f"runnerhub executor check: invalid configuration: {exc}", file=err)
        return EXIT_CONFIG
    print(f"settings: ok (stage {settings.stage}, host id {host_id} from {source}, "
          f"{settings.slots} slots)", file=out)
    print(f"pools: {', '.join(p.name for p in pools)} "
          f"(file {settings.pools_file or 'built-in default'})", file=out)

    try:
        client = docker_factory()
        client.ping()
        version = client.version().get("Version", "?")
    except Exception as exc:  # noqa: BLE001 - DockerException, requests errors: say which
        print(f"runnerhub executor check: Docker engine unreachable: {type(exc).__name__}: "
              f"{exc}"[:400], file=err)
        return EXIT_NOT_READY
    print(f"docker: ok (engine {version})", file=out)
    if settings.docker_network == HOST_NETWORK:
        print(f"hardened networking: off (RUNNERHUB_DOCKER_NETWORK={HOST_NETWORK}: no per-job "
              "networks, no firewall)", file=out)
    else:
        try:
            iptables_version = hardened_networking(iptables)
        except FirewallError as exc:
            print(f"runnerhub executor check: hardened networking cannot work on this host "
                  f"(RUNNERHUB_DOCKER_NETWORK={settings.docker_network}): {exc}"[:600],
                  file=err)
            return EXIT_NOT_READY
        print(f"hardened networking: ok ({iptables_version}; chain {CHAIN} in {TABLE} "
              f"{', '.join(PARENTS)})", file=out)
    try:  # a warning, never a failure: job disks hold the limit without it (docs/security.md)
        from executor.disk import detect

        support = detect(client, pools[0].image) if pools else None
    except Exception as exc:  # noqa: BLE001 - an engine too old or a fake: say so, go on
        print(f"disk limits: unknown ({type(exc).__name__})", file=out)
    else:
        if support is not None:
            print(f"disk limits: {'enforced' if support.enforced else 'WARNING: not enforced'}"
                  f" by Docker ({support.reason}); job disks "
                  f"{'on' if settings.job_disks else 'off'}", file=out)

    images: dict[str, list[str]] = {}
    for pool in pools:
        images.setdefault(pool.image, []).append(pool.name)
    statuses = image_status(client, images)
    for status in statuses:
        state = "present" if status.present else "missing"
        detail = f": {status.detail}" if status.detail else ""
        print(f"image {status.image} (pools {', '.join(status.pools)}): {state}{detail}",
              file=out)
    missing = [s.image for s in statuses if not s.present]
    if missing and require_images:
        print(f"runnerhub executor check: {len(missing)} pool image(s) missing: "
              f"{', '.join(missing)}", file=err)
        return EXIT_NOT_READY
    print("check: ok" + (" (missing images are pulled at first use)" if missing else ""),
          file=out)
    return EXIT_OK
