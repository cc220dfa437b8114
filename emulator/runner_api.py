"""The runner protocol (`/_runner/*`): what the stand-in runner speaks to register (JIT config
or registration token), long-poll for a job, acquire it, heartbeat, complete and disconnect.
The rules live in state.py; these routes only translate HTTP."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Blueprint, Response, request

from .errors import BadRequest, Unauthorized, Unprocessable
from .faults import runner_version
from .responses import read_body, reply
from .state import Scope

if TYPE_CHECKING:
    from .server import Emulator


def runner_blueprint(emu: Emulator) -> Blueprint:
    bp = Blueprint("runner", __name__)
    state = emu.state

    def session() -> str:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value:
            raise Unauthorized("runner session required")
        return value.strip()

    def job_id_of(body: dict) -> int:
        job_id = body.get("job_id")
        if not isinstance(job_id, int) or isinstance(job_id, bool):
            raise Unprocessable("job_id (integer) is required")
        return job_id

    @bp.post("/register")
    def register():
        body = read_body()
        os_name = str(body.get("os", "Linux"))
        version = body.get("version")
        if version is not None:
            try:
                runner_version(version)
            except ValueError as exc:
                raise Unprocessable(str(exc)) from None
        if "jitconfig" in body:
            if not isinstance(body["jitconfig"], str):
                raise BadRequest("invalid JIT config")
            # GitHub's minimum version (a fault the control API sets): read once per call.
            faults = emu.faults.config.runners
            out = state.register_jit(body["jitconfig"], os_name, version=version,
                                     refuse=faults.refuses,
                                     refused=lambda: emu.faults.record("runner_version_refused"))
            return reply(out, 201)
        token = emu.auth.check_registration_token(str(body.get("registration_token", "")))
        if token is None:
            raise Unauthorized("invalid or expired registration token")
        name, labels = body.get("name"), body.get("labels", [])
        if not isinstance(name, str) or not name or not isinstance(labels, list):
            raise Unprocessable("name (string) and labels (list) are required")
        scope = Scope(*token.scope)
        group = (1, "Default", False)
        inst = emu.installation_for_scope(scope)
        if inst is not None and inst.runner_groups:
            g = inst.runner_groups[0]
            group = (g.id, g.name, g.allows_public_repositories)
        out = state.register_with_token(scope, name, labels, bool(body.get("ephemeral")), group)
        return reply(out, 201)

    @bp.post("/poll")
    def poll():
        sess = session()
        body = read_body()
        timeout = body.get("timeout_s", emu.config.poll_timeout_s)
        if not isinstance(timeout, int | float) or timeout < 0:
            raise Unprocessable("timeout_s must be a non-negative number")
        offer = state.poll(sess, min(float(timeout), emu.config.poll_timeout_s))
        if offer is None:
            return Response(status=204)
        return reply({"job": offer})

    @bp.post("/acquire")
    def acquire():
        sess = session()
        return reply({"job": state.acquire(sess, job_id_of(read_body()))})

    @bp.post("/heartbeat")
    def heartbeat():
        sess = session()
        return reply(state.heartbeat(sess, job_id_of(read_body())))

    @bp.post("/complete")
    def complete():
        sess = session()
        body = read_body()
        conclusion = body.get("conclusion")
        if not isinstance(conclusion, str) or not conclusion:
            raise Unprocessable("conclusion (string) is required")
        return reply(state.complete(sess, job_id_of(body), conclusion))

    @bp.post("/disconnect")
    def disconnect():
        state.disconnect(session())
        return Response(status=204)

    return bp
