"""boto3 clients, built lazily (never at import: moto must be active first, and the cold start
pays for boto3 only when a request needs it). boto3 honours AWS_ENDPOINT_URL, so the same code
talks to moto, LocalStack or AWS."""

from __future__ import annotations

from functools import cache
from typing import Any


@cache
def _config() -> Any:
    from botocore.config import Config

    # botocore's standard retry mode: bounded, jittered retries of throttling and 5xx.
    return Config(
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=2,
        read_timeout=10,
    )


def client(service: str) -> Any:
    import boto3

    return boto3.session.Session().client(service, config=_config())
