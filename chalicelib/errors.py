"""One error hierarchy. Errors that reach the API carry their HTTP status."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class RunnerHubError(Exception):
    """Base of every error RunnerHub raises on purpose."""


class ConfigurationError(RunnerHubError):
    """Settings or the pools file are invalid; raised before anything starts."""


class WebhookRejected(RunnerHubError):
    """A webhook request that is answered with a 4xx and stores nothing."""

    status_code = 400
    reason = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class SignatureRejected(WebhookRejected):
    status_code = 401
    reason = "bad_signature"


class PayloadTooLarge(WebhookRejected):
    status_code = 413
    reason = "too_large"


class InvalidPayload(WebhookRejected):
    status_code = 400
    reason = "invalid_payload"


class MissingHeader(WebhookRejected):
    status_code = 400
    reason = "missing_header"


class DependencyUnavailable(RunnerHubError):
    """DynamoDB, SQS, Secrets Manager or GitHub failed; the caller answers 5xx so GitHub can
    record the delivery as failed and it can be redelivered."""

    def __init__(self, service: str, message: str) -> None:
        super().__init__(f"{service}: {message}")
        self.service = service


def aws_error_code(exc: Exception) -> str:
    """The AWS error code of a botocore error (never its message, which may echo input)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", type(exc).__name__))
    return type(exc).__name__


@cache
def outage_errors() -> tuple[type[Exception], ...]:
    """What an AWS call raises when the service (not RunnerHub's code) failed: the service's own
    error answer (`ClientError`, when `is_outage` finds throttling or a 5xx) or the way to it
    (`ConnectionError`: endpoint, connect time-out, proxy, TLS; `HTTPClientError`: read
    time-out, connection closed). Anything else (`TypeError`, `KeyError`, botocore's
    `ParamValidationError`, a `ValidationException`, ...) is a bug and must surface as one.
    botocore is imported on first use, never at import time."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    return (ClientError, ConnectionError, HTTPClientError)


# The AWS error answers that mean the service failed or throttled, not that the request was
# wrong (botocore's own retry lists: botocore/retries/standard.py, plus DynamoDB's and SQS's
# 5xx codes). Any other ClientError (ValidationException, ResourceNotFoundException,
# AccessDeniedException, NonExistentQueue, ...) is a bug or a misconfiguration.
OUTAGE_ERROR_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "LimitExceededException", "RequestThrottled", "SlowDown",
    "TransactionInProgressException", "TransactionConflictException", "PriorRequestNotComplete",
    "RequestTimeout", "RequestTimeoutException", "InternalServerError", "InternalFailure",
    "InternalError", "ServiceUnavailable", "ServiceUnavailableException",
})


def is_outage(exc: BaseException) -> bool:
    if not isinstance(exc, outage_errors()):
        return False
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return True  # a connection or read failure: no answer at all
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return status >= 500 or response.get("Error", {}).get("Code") in OUTAGE_ERROR_CODES


@contextmanager
def outage_as(service: str) -> Iterator[None]:
    """Within the block, an outage of `service` becomes DependencyUnavailable (the caller
    answers 5xx and the work is retried); any other exception propagates unchanged."""
    try:
        yield
    except Exception as exc:
        if not is_outage(exc):
            raise
        raise DependencyUnavailable(service, aws_error_code(exc)) from exc


def validation_summary(error: ValidationError, root: str, limit: int | None = None) -> str:
    """A short, secret-free account of a pydantic error: each failing field (`root` when the
    whole document failed) and why, at most `limit` of them. Never the values given."""
    errors = error.errors(include_url=False, include_input=False)
    parts = [f"{'.'.join(str(part) for part in item['loc']) or root}: {item['msg']}"
             for item in errors[:limit]]
    more = error.error_count() - limit if limit is not None else 0
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def startup_failure(program: str, error: Exception) -> int:
    """Say on stderr why `program` (a command: the reconciler, the scaler) could not start, and
    return its exit code: 2 for invalid settings or pools (pydantic's errors by field and reason,
    never the values: a setting may be a secret's location), 1 for a dependency out of reach."""
    import sys

    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        why, code = f"invalid configuration: {validation_summary(error, 'settings')}", 2
    elif isinstance(error, DependencyUnavailable):
        why, code = f"cannot start: {error}", 1
    else:
        why, code = f"invalid configuration: {error}", 2
    print(f"{program}: {why}", file=sys.stderr)
    return code
