"""Serve the Chalice app over HTTP on loopback, as API Gateway + Lambda would.

Each request becomes an API Gateway proxy event for `app(event, context)`. Calls are serialised,
as in one Lambda container (Chalice keeps the current request on the app object, so concurrent
calls in one process would see each other's requests). Bodies over 10 MB (API Gateway's own
limit) are refused before the app sees them; the app enforces its configured limit itself.

    python -m devstack.webhook_server --port 0 [--url-file F]  # prints its URL, serves
"""

from __future__ import annotations

import argparse
import base64
import signal
import sys
import threading
import uuid
from pathlib import Path

from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from devstack.aws_server import QuietHandler

API_GATEWAY_MAX_BODY = 10 * 1024 * 1024


class LambdaGateway:
    """`handler(event, context)`: the Lambda entry point served (default: the Chalice app;
    devstack/api_server.py serves the management API's)."""

    def __init__(self, handler=None) -> None:
        from devstack.webhook_events import LambdaContext

        if handler is None:
            from app import app as handler
        self._app = handler
        self._context = LambdaContext()
        self._lock = threading.Lock()

    def __call__(self, environ: dict, start_response) -> list[bytes]:
        request = Request(environ)
        if (request.content_length or 0) > API_GATEWAY_MAX_BODY:
            response = Response('{"message":"Request Too Long"}', 413,
                                content_type="application/json")
            return response(environ, start_response)
        body = request.get_data()
        headers = {name.lower(): value for name, value in request.headers.items()}
        event = {
            "resource": request.path,
            "path": request.path,
            "httpMethod": request.method,
            "headers": headers,
            "multiValueHeaders": {k: [v] for k, v in headers.items()},
            "queryStringParameters": dict(request.args) or None,
            "multiValueQueryStringParameters": {k: request.args.getlist(k)
                                                for k in request.args} or None,
            "pathParameters": None,
            "stageVariables": None,
            "requestContext": {
                "resourcePath": request.path, "httpMethod": request.method,
                "path": request.path, "stage": "api", "requestId": str(uuid.uuid4()),
                "identity": {"sourceIp": request.remote_addr},
            },
            "body": base64.b64encode(body).decode() if body else None,
            "isBase64Encoded": bool(body),
        }
        with self._lock:
            answer = self._app(event, self._context)
        payload = answer.get("body") or ""
        data = base64.b64decode(payload) if answer.get("isBase64Encoded") else payload.encode()
        response = Response(data, answer["statusCode"], headers=_headers(answer))
        return response(environ, start_response)


def _headers(answer: dict) -> list[tuple[str, str]]:
    """API Gateway's merge of a proxy answer's `headers` and `multiValueHeaders` (powertools
    answers in the latter): a name in both keeps only the multi-value list."""
    multi = {name: list(values) for name, values in (answer.get("multiValueHeaders") or {}).items()}
    taken = {name.lower() for name in multi}
    merged = [(name, value) for name, value in (answer.get("headers") or {}).items()
              if name.lower() not in taken]
    return merged + [(name, value) for name, values in multi.items() for value in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--url-file", help="write the URL here (stdout carries the logs)")
    args = parser.parse_args()
    server = make_server(args.host, args.port, LambdaGateway(), threaded=True,
                         request_handler=QuietHandler)
    url = f"http://{args.host}:{server.server_port}"
    if args.url_file:
        Path(args.url_file).write_text(url)
    else:
        print(url, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()
    sys.exit(0)


if __name__ == "__main__":
    main()
