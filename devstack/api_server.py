"""Serve the management API (`api_app.handler`) over HTTP on loopback, as API Gateway + Lambda
would (devstack/webhook_server.py's gateway, with the API's handler). Local tokens: RS256 with
the key pair at --key (made when absent); `python -m chalicelib.api.tokens --role R --key F`.

    python -m devstack.api_server --port 0 [--url-file F] [--key F]   # prints its URL, serves
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from werkzeug.serving import make_server

from chalicelib.api.tokens import DEFAULT_KEY, ensure_key_pair
from devstack.aws_server import QuietHandler
from devstack.webhook_server import LambdaGateway


def serve(host: str = "127.0.0.1", port: int = 0):
    """A started server (in a thread) for `api_app.handler`; returns (server, url)."""
    import api_app

    server = make_server(host, port, LambdaGateway(api_app.handler), threaded=True,
                         request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    return server, f"http://{host}:{server.server_port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--url-file", help="write the URL here (stdout carries the logs)")
    parser.add_argument("--key", type=Path, default=DEFAULT_KEY,
                        help="the local token key pair's private key (made when absent)")
    args = parser.parse_args()
    # Local tokens unless told otherwise (the deployed API uses API Gateway's authorizer).
    os.environ.setdefault("RUNNERHUB_API_AUTH", "local")
    os.environ.setdefault("RUNNERHUB_API_JWT_PUBLIC_KEY_FILE", str(ensure_key_pair(args.key)))
    server, url = serve(args.host, args.port)
    if args.url_file:
        Path(args.url_file).write_text(url)
    else:
        print(url, flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    stopped.wait()
    server.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()
