"""moto in server mode on loopback, with DynamoDB requests serialised.

moto's DynamoDB is not atomic under concurrent requests: two racing conditional updates both
succeed a few times in a thousand. One lock around moto's app, for DynamoDB targets only, makes
race tests test RunnerHub rather than moto. SQS long-polls never wait on it.

The same middleware plays a DynamoDB-only outage (`LocalAws.dynamodb_outage`): DynamoDB
requests are answered as AWS answers them when the service fails (500 InternalServerError) or
throttles (400 ProvisionedThroughputExceededException) while SQS goes on working. Requests
whose User-Agent carries GROUND_TRUTH_AGENT (the test harness reading the tables) pass.

    python -m devstack.aws_server --port 4566
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from typing import Any, Literal

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from devstack import moto_fixes

DYNAMODB_TARGET_PREFIX = "DynamoDB_"
GROUND_TRUTH_AGENT = "runnerhub-ground-truth"
DYNAMODB_FAILURES = {
    "unavailable": ("500 Internal Server Error", "InternalServerError",
                    "Internal server error"),
    "throttle": ("400 Bad Request", "ProvisionedThroughputExceededException",
                 "The level of configured provisioned throughput for the table was exceeded. "
                 "Consider increasing your provisioning level with the UpdateTable API."),
}


class SerialisedDynamoDB:
    """WSGI middleware: one DynamoDB request at a time; everything else passes through."""

    def __init__(self, app: Any) -> None:
        self._app = app
        self._lock = threading.Lock()
        self._failing: tuple[float, str] | None = None  # (monotonic end, mode)
        self.refused = 0
        self._refused_at: list[float] = []  # monotonic time of each refusal

    def fail(self, seconds: float, mode: Literal["unavailable", "throttle"]) -> None:
        if mode not in DYNAMODB_FAILURES:
            raise ValueError(f"mode must be one of {sorted(DYNAMODB_FAILURES)}")
        self._failing = (time.monotonic() + seconds, mode)

    def refusing_s(self, since: int = 0) -> float:
        """Seconds from the first to the last refusal after the first `since` ones."""
        times = self._refused_at[since:]
        return round(times[-1] - times[0], 1) if len(times) > 1 else 0.0

    def _failure(self, environ: dict) -> str | None:
        failing = self._failing
        if failing is None or time.monotonic() >= failing[0]:
            return None
        if GROUND_TRUTH_AGENT in environ.get("HTTP_USER_AGENT", ""):
            return None
        return failing[1]

    def __call__(self, environ: dict, start_response: Any) -> Any:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if not target.startswith(DYNAMODB_TARGET_PREFIX):
            return self._app(environ, start_response)
        mode = self._failure(environ)
        if mode is not None:
            status, code, message = DYNAMODB_FAILURES[mode]
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            self.refused += 1
            self._refused_at.append(time.monotonic())
            body = json.dumps({"__type": f"com.amazonaws.dynamodb.v20120810#{code}",
                               "message": message}).encode()
            start_response(status, [("Content-Type", "application/x-amz-json-1.0"),
                                    ("Content-Length", str(len(body)))])
            return [body]
        with self._lock:
            # Consume the body inside the lock: moto computes lazily while iterating.
            return list(self._app(environ, start_response))


class QuietHandler(WSGIRequestHandler):
    """No access log line per request: tests and benchmarks make thousands."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return


class LocalAws:
    """A moto server thread on 127.0.0.1; `endpoint_url` is what AWS_ENDPOINT_URL should be."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self._host = host
        self._port = port
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> LocalAws:
        moto_fixes.apply()
        self.dynamodb = SerialisedDynamoDB(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(
            self._host, self._port, self.dynamodb, threaded=True, request_handler=QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="moto-server", daemon=True
        )
        self._thread.start()
        return self

    def dynamodb_outage(self, seconds: float,
                        mode: Literal["unavailable", "throttle"] = "unavailable") -> None:
        """DynamoDB alone fails for `seconds` from now (returns at once); SQS works on."""
        self.dynamodb.fail(seconds, mode)

    @property
    def endpoint_url(self) -> str:
        assert self._server is not None, "start() first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4566)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    server = LocalAws(args.port, args.host).start()
    print(server.endpoint_url, flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    stopped.wait()
    server.stop()


if __name__ == "__main__":
    main()
