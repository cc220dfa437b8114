"""The emulator's Flask app: `create_app` mounts GitHub's REST API (rest.py, rest_runners.py)
under the optional GHES prefix, the runner protocol (runner_api.py) and the control endpoints
(control.py), and adds what wraps every GitHub call: rate limits, injected faults, GitHub's
response headers and GitHub-shaped errors. Routes only translate HTTP to calls on the
Emulator's parts; the rules live in state.py, auth.py, rate_limits.py, faults.py and
webhooks.py."""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING

from flask import Flask, Response, g, request

from .control import control_blueprint
from .errors import GitHubError, NotFound
from .responses import reply
from .rest import github_blueprint
from .runner_api import runner_blueprint

if TYPE_CHECKING:
    from .server import Emulator

log = logging.getLogger(__name__)

INTERNAL_PREFIXES = ("/_emulator", "/_runner")
API_VERSION = "2022-11-28"
# Flask's own cap on a request body; GitHub answers 413 above its limits too.
MAX_BODY_BYTES = 6 * 1024 * 1024


def create_app(emu: Emulator) -> Flask:
    app = Flask("emulator")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    prefix = emu.config.api_prefix
    app.register_blueprint(github_blueprint(emu), url_prefix=prefix or None)
    for bp_factory, path in (
        (runner_blueprint, "/_runner"),
        (control_blueprint, "/_emulator"),
    ):
        # Served at the root and, for a GHES prefix, under it too, so `runner_url` may be
        # either the server root or base_url.
        app.register_blueprint(bp_factory(emu), url_prefix=path)
        if prefix:
            app.register_blueprint(
                bp_factory(emu), url_prefix=prefix + path, name=f"prefixed_{bp_factory.__name__}"
            )

    @app.errorhandler(GitHubError)
    def _github_error(exc: GitHubError):
        return reply(exc.body(), exc.status)

    @app.errorhandler(404)
    def _not_found(_exc):
        return reply(NotFound().body(), 404)

    @app.errorhandler(405)
    def _not_allowed(_exc):
        return reply(NotFound().body(), 404)

    @app.errorhandler(413)
    def _too_large(_exc):
        return reply({"message": "Payload too large", "status": "413"}, 413)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.error("unexpected error on %s %s", request.method, request.path, exc_info=True)
        return reply({"message": "Server Error", "status": "500"}, 500)

    def internal() -> bool:
        path = request.path
        return any(path.startswith(p) or path.startswith(prefix + p) for p in INTERNAL_PREFIXES)

    @app.before_request
    def _limits_and_faults():
        """GitHub paths only: count the call against the caller's quotas (refusing it when a
        limit is enforced and spent), then maybe answer it with an injected 5xx."""
        if internal():
            return None
        g.request_id = uuid.uuid4().hex[:16].upper()
        caller = emu.auth.identify(request.headers.get("Authorization"), request.remote_addr)
        path = request.path
        if prefix and path.startswith(prefix):
            path = path[len(prefix) :]
        # GitHub: calling GET /rate_limit does not count against the primary limit.
        admission = emu.rate_limits.admit(caller, request.method, counted=path != "/rate_limit")
        g.rate_headers = admission.headers
        refusal = admission.refusal
        if refusal is not None:
            emu.faults.record("rate_limited", f"rate_limited_{refusal.kind}")
            body = refusal.body()
            body["message"] = body["message"].replace("{request_id}", g.request_id)
            return reply(body, refusal.status)
        fault = emu.faults.api_fault(request.method, path)
        if fault is None:
            return None
        if fault.delay_s:
            # A call that times out at the client: the answer (and its effect) come late.
            emu.faults.record("api_timeouts")
            time.sleep(fault.delay_s)
            return None
        emu.faults.record("api_5xx", f"api_{fault.status}")
        if fault.after_effect:
            emu.faults.record("api_5xx_after_effect")
            g.fail_after = fault  # the handler runs; its answer is replaced
            return None
        return reply(fault.body(), fault.status)

    @app.after_request
    def _github_headers(resp: Response) -> Response:
        if internal():
            return resp
        fail_after = g.get("fail_after")
        if fail_after is not None:
            resp = reply(fail_after.body(), fail_after.status)
        headers = g.get("rate_headers")
        if headers is None:
            # before_request did not run (should not happen): count as before.
            caller = emu.auth.identify(request.headers.get("Authorization"), request.remote_addr)
            headers = emu.rate_limits.count(caller)
        for k, v in headers.items():
            resp.headers[k] = v
        resp.headers["X-GitHub-Media-Type"] = "github.v3; format=json"
        resp.headers["X-GitHub-Api-Version-Selected"] = API_VERSION
        resp.headers["X-GitHub-Request-Id"] = g.get("request_id") or uuid.uuid4().hex[:16].upper()
        if emu.config.is_ghes:
            resp.headers["X-GitHub-Enterprise-Version"] = emu.config.ghes_version
        return resp

    return app
