"""Errors that carry GitHub's HTTP status and JSON body, raised anywhere and rendered by api.py."""

from __future__ import annotations

DOCS = "https://docs.github.com/rest"


class GitHubError(Exception):
    """An answer GitHub would give: status code plus `{"message", "documentation_url"}`."""

    status = 500
    default_message = "Server Error"

    def __init__(self, message: str | None = None, documentation_url: str = DOCS, **extra):
        self.message = message or self.default_message
        self.documentation_url = documentation_url
        self.extra = extra
        super().__init__(self.message)

    def body(self) -> dict:
        body = {"message": self.message, "documentation_url": self.documentation_url}
        body.update(self.extra)
        # GitHub has added the status as a string to error bodies since 2023.
        body["status"] = str(self.status)
        return body


class BadRequest(GitHubError):
    status = 400
    default_message = "Problems parsing JSON"


class Unauthorized(GitHubError):
    status = 401
    default_message = "Bad credentials"


class Forbidden(GitHubError):
    status = 403
    default_message = "Resource not accessible by integration"


class NotFound(GitHubError):
    status = 404
    default_message = "Not Found"


class Conflict(GitHubError):
    status = 409
    default_message = "Conflict"


class Gone(GitHubError):
    status = 410
    default_message = "Gone"


class Unprocessable(GitHubError):
    status = 422
    default_message = "Validation Failed"
