"""The emulator's own control and introspection endpoints (`/_emulator/*`, no auth, no
rate-limit headers): health, jobs, deliveries, runners (live, and every runner's record), JIT
counts, the runner start-up, the workload, the webhook target, faults and the clock."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from flask import Blueprint, request
from pydantic import ValidationError

from .errors import BadRequest, NotFound, Unprocessable
from .responses import read_body, reply
from .workload import WorkloadJob

if TYPE_CHECKING:
    from .server import Emulator


def control_blueprint(emu: Emulator) -> Blueprint:
    bp = Blueprint("introspection", __name__)

    @bp.get("/health")
    def health():
        return reply({"ok": True, "base_url": emu.base_url, "runner_url": emu.runner_url})

    @bp.get("/jobs")
    def jobs():
        return reply({"jobs": emu.jobs()})

    @bp.post("/jobs")
    def add_job():
        spec = _validated(WorkloadJob.model_validate, read_body())
        job_id = emu.add_job(spec)
        return reply(emu.job(job_id), 201)

    @bp.get("/jobs/<int:job_id>")
    def job(job_id: int):
        return reply(emu.job(job_id))

    @bp.post("/jobs/<int:job_id>/cancel")
    def cancel(job_id: int):
        return reply(emu.cancel_job(job_id))

    @bp.post("/jobs/<int:job_id>/approve")
    def approve(job_id: int):
        emu.approve_job(job_id)
        return reply(emu.job(job_id))

    @bp.post("/history")
    def history():
        # Past jobs for the run and job listings: no webhooks, no runners.
        return reply({"job_ids": _validated(emu.add_history, read_body())}, 201)

    @bp.get("/deliveries")
    def deliveries():
        return reply({"deliveries": emu.deliveries()})

    @bp.get("/deliveries/<int:delivery_id>")
    def delivery(delivery_id: int):
        found = emu.sender.delivery(delivery_id)
        if found is None:
            raise NotFound()
        return reply(found.detail())

    @bp.get("/runners")
    def runners():
        return reply({"runners": emu.runners()})

    @bp.get("/runner-records")
    def runner_records():
        return reply({"runners": emu.runner_records()})

    @bp.get("/runner-startup")
    def runner_startup():
        return reply({"seconds": emu.runner_startup_s})

    @bp.post("/runner-startup")
    def set_runner_startup():
        body = read_body()
        if "seconds" not in body:
            raise BadRequest('"seconds" (a number of seconds, 0 to 600) is required')
        try:
            seconds = emu.set_runner_startup(body["seconds"])
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return reply({"seconds": seconds})

    @bp.get("/stats")
    def stats():
        # GitHub's own counts: JIT configs issued per App id (JSON keys are strings).
        issued = emu.state.jit_issued()
        return reply({"jit_configs": {str(app): n for app, n in issued.items()},
                      "jit_configs_total": sum(issued.values())})

    @bp.post("/workload")
    def workload():
        ids = _validated(emu.load_workload, read_body())
        if request.args.get("start", "true").lower() not in ("0", "false", "no"):
            emu.run_workload()
        return reply({"job_ids": ids}, 201)

    @bp.post("/workload/start")
    def workload_start():
        emu.run_workload()
        return reply(emu.workload_status())

    @bp.get("/workload")
    def workload_status():
        return reply(emu.workload_status())

    @bp.put("/webhook")
    def webhook():
        body = read_body()
        emu.set_webhook(url=body.get("url"), secret=body.get("secret"))
        return reply({"url": emu.sender.url})

    @bp.post("/flush")
    def flush():
        timeout = min(float(request.args.get("timeout", 10)), 60.0)
        return reply({"flushed": emu.sender.flush(timeout)})

    @bp.get("/faults")
    def faults_report():
        return reply(emu.faults_report())

    @bp.put("/faults")
    def set_faults():
        _validated(emu.set_faults, read_body())
        return reply(emu.faults_report())

    @bp.post("/faults/reset")
    def reset_faults():
        emu.faults.reset()
        return reply(emu.faults_report())

    @bp.get("/time")
    def now():
        return reply({"time": emu.clock.wall(), "iso": datetime.now(UTC).isoformat()})

    return bp


def _validated(parse, body: dict):
    """`parse(body)`; a pydantic validation error is answered 422 with its summary."""
    try:
        return parse(body)
    except ValidationError as exc:
        raise Unprocessable(_errors(exc)) from None


def _errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())

