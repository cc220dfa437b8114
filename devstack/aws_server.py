"""moto in server mode on loopback, with DynamoDB requests serialised.

moto's DynamoDB is not atomic under concurrent requests: two racing conditional updates both
succeed a few times in a thousand. One lock around moto's app, for DynamoDB targets only, makes
race tests test RunnerHub rather than moto. SQS long-polls never wait on it.

    python -m devstack.aws_server --port 4566
"""

from __future__ import annotations

import argparse
import signal
import threading
from typing import Any

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

DYNAMODB_TARGET_PREFIX = "DynamoDB_"


class SerialisedDynamoDB:
    """WSGI middleware: one DynamoDB request at a time; everything else passes through."""

    def __init__(self, app: Any) -> None:
        self._app = app
        self._lock = threading.Lock()

    def __call__(self, environ: dict, start_response: Any) -> Any:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if not target.startswith(DYNAMODB_TARGET_PREFIX):
            return self._app(environ, start_response)
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
        app = SerialisedDynamoDB(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(
            self._host, self._port, app, threaded=True, request_handler=QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="moto-server", daemon=True
        )
        self._thread.start()
        return self

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
