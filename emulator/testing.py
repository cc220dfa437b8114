"""Helpers for tests that drive the emulator: App keys and JWTs, a webhook receiver that
records what it got, and an in-process stand-in runner."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from . import standin_runner


def generate_app_key() -> tuple[str, str]:
    """A fresh RSA key pair for a test App: (private PEM, public PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


def app_jwt(
    app_id: int | str, private_pem: str, *, iat: float | None = None, exp: float | None = None
) -> str:
    """An App JWT as GitHub's docs build it: iat back-dated 60 s, exp 9 minutes ahead."""
    now = time.time()
    iat = int(now - 60) if iat is None else int(iat)
    exp = int(now + 540) if exp is None else int(exp)
    return jwt.encode({"iat": iat, "exp": exp, "iss": str(app_id)}, private_pem, algorithm="RS256")


class _Server(ThreadingHTTPServer):
    # socketserver's backlog of 5 drops SYNs when the emulator's 8 sender threads connect at
    # once, and each dropped SYN costs a 1 s retransmission.
    request_queue_size = 128


class WebhookReceiver:
    """A loopback HTTP server that records each delivery: headers, raw body, arrival time."""

    def __init__(self, status: int = 200, delay_s: float = 0.0):
        self.status = status
        self.delay_s = delay_s
        self.received: list[dict] = []
        self._cv = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                with receiver._cv:
                    receiver.received.append(
                        {"headers": dict(self.headers), "body": body, "at": time.time()}
                    )
                    receiver._cv.notify_all()
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}/webhook"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def payloads(self) -> list[dict]:
        with self._cv:
            return [json.loads(r["body"]) for r in self.received]

    def events(self, job_id: int | None = None) -> list[tuple[str, str]]:
        """(action, workflow_job.status) in arrival order, optionally for one job."""
        return [
            (p["action"], p["workflow_job"]["status"])
            for p in self.payloads()
            if job_id is None or p["workflow_job"]["id"] == job_id
        ]

    def wait_for(self, predicate, timeout: float = 5.0) -> bool:
        """Wait until `predicate(list of payloads)` is true."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                if predicate([json.loads(r["body"]) for r in self.received]):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)


class InProcessRunner:
    """The stand-in runner's logic in a thread: register, take one job, report, end.

    With no start-up in its JIT config, `start()` returns registered; with one, the thread
    sleeps through it and registers after (`start()` returns at once)."""

    def __init__(self, blob: str, idle_timeout: float | None = 10.0, heartbeat: bool = True):
        self.blob = blob
        url, self.startup_s = standin_runner.decode_jit(blob)
        self.runner = standin_runner.Runner(url, idle_timeout, log=lambda m: None)
        self.heartbeat = heartbeat
        self.job: dict | None = None
        self.conclusion: str | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def start(self) -> InProcessRunner:
        if not self.startup_s:
            self.runner.register(self.blob)
        self._thread.start()
        return self

    def _main(self) -> None:
        try:
            if self.startup_s:
                self.runner.start_up(self.startup_s)
                self.runner.register(self.blob)
            self.job = self.runner.next_job()
            if self.job is None:
                return
            if not self.heartbeat:
                return  # a runner that died right after acquiring: silence from here on
            self.conclusion = self.runner.run(self.job)
            self.runner.complete(self.job, self.conclusion)
        except BaseException as exc:  # noqa: BLE001 (reported to the test via .error)
            self.error = exc

    def join(self, timeout: float = 10.0) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


def payload_validator(schemas_dir):
    """A function that validates a `workflow_job` payload against octokit's schema for its
    action, resolving the schemas' `common/*.json` references through a registry."""
    from pathlib import Path

    from jsonschema import Draft7Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT7

    root = Path(schemas_dir)
    resources = []
    for path in sorted(root.glob("*.json")) + sorted(root.glob("common/*.json")):
        schema = json.loads(path.read_text())
        resources.append((schema["$id"], Resource.from_contents(schema, DRAFT7)))
    registry = Registry().with_resources(resources)

    def validate(payload: dict) -> None:
        schema = registry.contents(f"workflow_job${payload['action']}")
        Draft7Validator(schema, registry=registry).validate(payload)

    return validate
