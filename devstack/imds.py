"""A stand-in for the EC2 instance metadata service (IMDSv2), for the local stack and tests.

Serves what the executor reads, with IMDSv2's token rules: `PUT /latest/api/token` with a TTL
header (1..21600 s) gives a token, every GET needs a live one (401 without), a PUT carrying
X-Forwarded-For is refused (403) as IMDS does. Paths: the instance id, and for the autoscaling
work the Auto Scaling target lifecycle state and the Spot instance action, 404 until set
(`set_target_lifecycle_state`, `set_spot_instance_action`). `delay_s` answers slowly and
`answer_next(503, ...)` answers errors first, for timeout and retry tests. Threaded
(http.server), on loopback, port 0 by default.

    python -m devstack.imds --instance-id i-0123456789abcdef0 [--port 0] [--url-file F]
"""

from __future__ import annotations

import argparse
import json
import secrets
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from executor.imds import (
    INSTANCE_ID,
    MAX_TOKEN_TTL_S,
    SPOT_INSTANCE_ACTION,
    TARGET_LIFECYCLE_STATE,
    TOKEN_HEADER,
    TOKEN_PATH,
    TOKEN_TTL_HEADER,
)

DEFAULT_INSTANCE_ID = "i-0123456789abcdef0"


class ImdsStandIn:
    """One instance's metadata. Use as a context manager, or start()/stop()."""

    def __init__(self, instance_id: str = DEFAULT_INSTANCE_ID, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, str] = {INSTANCE_ID: instance_id}
        self._tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self.delay_s = 0.0
        self._next_statuses: list[int] = []  # answer_next(): error answers to give first
        # (method, path, status) of every request, in order: what a test asserts on.
        self.requests: list[tuple[str, str, int]] = []
        self._server = ThreadingHTTPServer((host, port), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ImdsStandIn:
        # A short poll interval: stop() returns within it (tests start one per test).
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="imds-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ImdsStandIn:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- what the instance's metadata says -------------------------------------------------

    def set(self, path: str, value: str | None) -> None:
        """Serve `value` at `path`; None: 404 again."""
        with self._lock:
            if value is None:
                self._values.pop(path, None)
            else:
                self._values[path] = value

    def set_target_lifecycle_state(self, state: str | None) -> None:
        """E.g. "InService", "Terminated" (a terminating lifecycle hook holds the instance)."""
        self.set(TARGET_LIFECYCLE_STATE, state)

    def set_spot_instance_action(self, action: str | None, at: str = "") -> None:
        """A Spot interruption notice: "terminate", "stop" or "hibernate" at `at` (ISO 8601)."""
        body = None if action is None else json.dumps(
            {"action": action, "time": at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self.set(SPOT_INSTANCE_ACTION, body)

    def answer_next(self, *statuses: int) -> None:
        """Answer the next requests with these statuses (e.g. 503, 429), whatever they ask."""
        with self._lock:
            self._next_statuses.extend(statuses)

    def expire_tokens(self) -> None:
        """Every token issued so far is now rejected (401), as after their TTL."""
        with self._lock:
            self._tokens.clear()

    # --- the handler's side ------------------------------------------------------------------

    def _issue(self, ttl_s: int) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            now = time.monotonic()
            self._tokens = {t: e for t, e in self._tokens.items() if e > now}
            self._tokens[token] = now + ttl_s
        return token

    def _valid(self, token: str | None) -> bool:
        with self._lock:
            return token is not None and self._tokens.get(token, 0.0) > time.monotonic()

    def _forced_status(self) -> int | None:
        with self._lock:
            return self._next_statuses.pop(0) if self._next_statuses else None

    def _value(self, path: str) -> str | None:
        with self._lock:
            return self._values.get(path)

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))


def _handler(imds: ImdsStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_PUT(self) -> None:  # http.server's naming
            if self._delay():
                return None
            if self.path != TOKEN_PATH:
                return self._answer(HTTPStatus.NOT_FOUND)
            if self.headers.get("X-Forwarded-For"):
                return self._answer(HTTPStatus.FORBIDDEN)
            ttl = self.headers.get(TOKEN_TTL_HEADER, "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= MAX_TOKEN_TTL_S:
                return self._answer(HTTPStatus.BAD_REQUEST)
            return self._answer(HTTPStatus.OK, imds._issue(int(ttl)),
                                {TOKEN_TTL_HEADER: ttl})

        def do_GET(self) -> None:
            if self._delay():
                return None
            if not imds._valid(self.headers.get(TOKEN_HEADER)):
                return self._answer(HTTPStatus.UNAUTHORIZED)
            value = imds._value(self.path)
            if value is None:
                return self._answer(HTTPStatus.NOT_FOUND)
            return self._answer(HTTPStatus.OK, value)

        def _delay(self) -> bool:
            """Wait `delay_s`; True when a forced status was answered instead."""
            if imds.delay_s:
                time.sleep(imds.delay_s)
            status = imds._forced_status()
            if status is not None:
                self._answer(HTTPStatus(status))
                return True
            return False

        def _answer(self, status: HTTPStatus, body: str = "",
                    headers: dict[str, str] | None = None) -> None:
            imds._record(self.command, self.path, int(status))
            data = body.encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (its timeout): nothing to answer

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: tests assert on imds.requests instead

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.imds", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--instance-id", default=DEFAULT_INSTANCE_ID)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--url-file", type=Path, help="write the endpoint here once serving")
    args = parser.parse_args(argv)
    imds = ImdsStandIn(args.instance_id, args.host, args.port)
    print(imds.endpoint, flush=True)
    if args.url_file:
        args.url_file.write_text(imds.endpoint)
    try:
        imds._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        imds._server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
