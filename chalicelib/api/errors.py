"""The API's errors: each carries its HTTP status and a short kind (the JSON body's `error`)."""

from __future__ import annotations


class ApiError(Exception):
    status = 500
    kind = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ApiError):
    status, kind = 400, "bad_request"


class Unauthorized(ApiError):
    status, kind = 401, "unauthorized"


class Forbidden(ApiError):
    status, kind = 403, "forbidden"

    def __init__(self, message: str, permission: str | None = None) -> None:
        super().__init__(message)
        self.permission = permission


class NotFound(ApiError):
    status, kind = 404, "not_found"


class Conflict(ApiError):
    status, kind = 409, "conflict"


class Unavailable(ApiError):
    status, kind = 503, "unavailable"
