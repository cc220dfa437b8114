"""Signed GitHub deliveries and the API Gateway events that carry them, for tests and benchmarks."""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import urlencode

from chalicelib.signature import sign

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"


def delivery_body(payload: dict | bytes | str, content_type: str = JSON) -> bytes:
    text = payload if isinstance(payload, str | bytes) else json.dumps(payload)
    if isinstance(text, bytes):
        text = text.decode()
    if content_type == FORM:
        return urlencode({"payload": text}).encode()
    return text.encode()


def delivery_headers(
    body: bytes,
    secret: bytes | None,
    event: str | None = "workflow_job",
    delivery_id: str | None = None,
    content_type: str = JSON,
) -> dict[str, str]:
    """GitHub's headers for one delivery (lower-case names, as API Gateway passes them on)."""
    headers = {
        "content-type": content_type,
        "user-agent": "GitHub-Hookshot/runnerhub-test",
        "x-github-delivery": delivery_id or str(uuid.uuid4()),
        "x-github-hook-id": "1",
    }
    if event is not None:
        headers["x-github-event"] = event
    if secret is not None:
        headers["x-hub-signature-256"] = sign(secret, body)
    return headers


def api_gateway_event(body: bytes, headers: dict[str, str], path: str = "/webhook") -> dict:
    """An API Gateway REST proxy event, as the webhook Lambda receives it."""
    return {
        "resource": path,
        "path": path,
        "httpMethod": "POST",
        "headers": headers,
        "multiValueHeaders": {name: [value] for name, value in headers.items()},
        "queryStringParameters": None,
        "multiValueQueryStringParameters": None,
        "pathParameters": None,
        "stageVariables": None,
        "requestContext": {
            "resourcePath": path,
            "httpMethod": "POST",
            "path": f"/api{path}",
            "stage": "api",
            "identity": {"sourceIp": "140.82.115.1"},
            "requestId": str(uuid.uuid4()),
        },
        "body": body.decode(),
        "isBase64Encoded": False,
    }


class LambdaContext:
    """The attributes powertools and Chalice read from a Lambda context."""

    function_name = "runnerhub-webhook"
    memory_limit_in_mb = 512
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:runnerhub-webhook"
    aws_request_id = "local"

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 25_000


def response_json(response: dict[str, Any]) -> dict[str, Any]:
    return json.loads(response["body"]) if response.get("body") else {}
