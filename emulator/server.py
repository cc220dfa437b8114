"""The Emulator: wires state, auth, webhooks and the HTTP server, runs workloads, and answers the
ground-truth questions tests ask."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from pathlib import Path

from werkzeug.serving import WSGIRequestHandler, make_server

from .api import create_app
from .auth import Auth
from .config import EmulatorConfig, InstallationConfig, runner_startup_seconds
from .errors import GitHubError
from .faults import FaultInjector, FaultsConfig
from .rate_limits import RateLimiter
from .state import Clock, Scope, State
from .webhooks import PayloadBuilder, WebhookSender
from .workload import History, HistoryJob, Workload, WorkloadJob, load_workload

log = logging.getLogger(__name__)

REAP_INTERVAL_MAX_S = 0.5


class _RequestHandler(WSGIRequestHandler):
    # HTTP/1.1 keeps connections alive (clients poll and call often); requests are logged at
    # DEBUG, not on stderr as werkzeug does by default.
    protocol_version = "HTTP/1.1"

    def log_request(self, code="-", size="-"):
        log.debug("%s %s -> %s", self.command, self.path, code)


class Emulator:
    """A GitHub stand-in on loopback. `Emulator(config).start()`; `.stop()` when done."""

    def __init__(self, config: EmulatorConfig | None = None, **overrides):
        config = config or EmulatorConfig()
        if overrides:
            config = EmulatorConfig.model_validate({**config.model_dump(), **overrides})
        self.config = config
        self.clock = Clock()
        self.auth = Auth(config, clock=self.clock.wall)
        self.rate_limits = RateLimiter(config, clock=self.clock.wall)
        self.faults = FaultInjector(config.faults, limiter=self.rate_limits)
        # Real URLs are known once the port is bound; start() fills them in.
        self.builder = PayloadBuilder("http://127.0.0.1", "http://127.0.0.1")
        self.sender = WebhookSender(config, self.builder, clock=self.clock.wall, faults=self.faults)
        self.state = State(
            emit=self._emit,
            clock=self.clock,
            acquire_timeout_s=config.acquire_timeout_s,
            lost_runner_timeout_s=config.lost_runner_timeout_s,
            runner_offline_after_s=config.runner_offline_after_s,
            heartbeat_interval_s=config.heartbeat_interval_s,
            runner_startup_s=config.runner_startup_s,
        )
        self.sender.on_sent = self.state.mark_sent
        self._server = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._schedule: list[tuple[float, int, str, int]] = []
        self._schedule_cv = threading.Condition()
        self._seq = itertools.count()
        self._workload_jobs: list[tuple[int, WorkloadJob]] = []
        self._unscheduled: list[tuple[int, WorkloadJob]] = []
        self.root_url = ""
        self.base_url = ""
        self.runner_url = ""

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Emulator:
        app = create_app(self)
        self._server = make_server(
            self.config.host, self.config.port, app, threaded=True, request_handler=_RequestHandler
        )
        port = self._server.server_port
        self.root_url = f"http://{self.config.host}:{port}"
        self.base_url = self.root_url + self.config.api_prefix
        self.runner_url = self.config.runner_url or self.base_url
        self.state.runner_url = self.runner_url
        self.builder.api_url = self.base_url
        self.builder.html_url = self.root_url
        self.sender.start()
        for target, name in (
            # A short poll interval makes stop() quick (tests start and stop many emulators).
            (lambda: self._server.serve_forever(poll_interval=0.05), "emulator-http"),
            (self._reap_loop, "emulator-reaper"),
            (self._schedule_loop, "emulator-scheduler"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("GitHub emulator serving at %s", self.base_url)
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._schedule_cv:
            self._schedule_cv.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()
        self.sender.stop()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- workloads and jobs ----------------------------------------------------------------

    def load_workload(self, source: str | Path | dict | Workload) -> list[int]:
        """Add a workload's jobs (not yet arrived); `run_workload()` starts their clocks."""
        workload = load_workload(source)
        if workload.faults is not None:
            self.set_faults(workload.faults)
        loaded = [(self._create(spec), spec) for spec in workload.jobs]
        with self._schedule_cv:
            self._workload_jobs += loaded
            self._unscheduled += loaded
        return [job_id for job_id, _ in loaded]

    def run_workload(self) -> None:
        """Start the clock of every loaded, not yet started job: time 0 is now."""
        with self._schedule_cv:
            pending, self._unscheduled = self._unscheduled, []
            t0 = time.monotonic()
            for job_id, spec in pending:
                self._plan(t0, job_id, spec)
            self._schedule_cv.notify_all()

    def add_job(self, spec: WorkloadJob | None = None, **fields) -> int:
        """One job that arrives now (its `arrival_s` is ignored); returns its id."""
        spec = spec or WorkloadJob(**fields)
        job_id = self._create(spec)
        with self._schedule_cv:
            self._plan(time.monotonic() - spec.arrival_s, job_id, spec, arrive=False)
            self._schedule_cv.notify_all()
        self.state.arrive(job_id)
        return job_id

    def add_history(self, source: History | dict | list[HistoryJob | dict]) -> list[int]:
        """Jobs that ran in the past (no webhooks): what GitHub's run and job listings show of
        an organisation's earlier weeks. Returns their ids."""
        if isinstance(source, list):
            source = {"jobs": source}
        history = source if isinstance(source, History) else History.model_validate(source)
        ids = []
        for spec in history.jobs:
            installation_id, app_id, owner_type = self._owner_of(spec.repository)
            job = self.state.add_past_job(
                spec.id, spec.run_id,
                created_at=spec.created_at.timestamp(), started_at=spec.started_at.timestamp(),
                completed_at=spec.completed_at.timestamp(), conclusion=spec.conclusion,
                repository=spec.repository, private=spec.private, labels=list(spec.labels),
                name=spec.name, workflow_name=spec.workflow_name, head_branch=spec.head_branch,
                installation_id=installation_id, app_id=app_id, owner_type=owner_type,
            )
            ids.append(job.id)
        return ids

    def wait_until_done(self, timeout: float) -> bool:
        """True once every workload job is completed and its deliveries were attempted."""
        deadline = time.monotonic() + timeout
        ids = [job_id for job_id, _ in self._workload_jobs]
        if not self.state.wait_until_completed(ids, timeout):
            return False
        return self.sender.flush(max(0.0, deadline - time.monotonic()))

    def workload_status(self) -> dict:
        ids = {job_id for job_id, _ in self._workload_jobs}
        by_status: dict[str, int] = {}
        for job in self.state.jobs():
            if job["job_id"] in ids:
                by_status[job["status"]] = by_status.get(job["status"], 0) + 1
        return {
            "total": len(ids),
            "by_status": by_status,
            "done": by_status.get("completed", 0) == len(ids),
            "started": not self._unscheduled,
        }

    def cancel_job(self, job_id: int) -> dict:
        return self.state.cancel(job_id)

    def approve_job(self, job_id: int) -> None:
        self.state.approve(job_id)

    def _create(self, spec: WorkloadJob) -> int:
        installation_id, app_id, owner_type = self._owner_of(spec.repository)
        job = self.state.add_job(
            spec.id,
            spec.run_id,
            repository=spec.repository,
            private=spec.private,
            labels=list(spec.labels),
            duration_s=spec.duration_s,
            planned_conclusion=spec.conclusion,
            runner_reports=spec.runner_reports,
            name=spec.name,
            workflow_name=spec.workflow_name,
            head_branch=spec.head_branch,
            environment=spec.environment,
            environment_wait_s=spec.environment_wait_s,
            waiting_action=spec.waiting_action,
            installation_id=installation_id,
            app_id=app_id,
            owner_type=owner_type,
        )
        return job.id

    def _plan(self, t0: float, job_id: int, spec: WorkloadJob, arrive: bool = True) -> None:
        if arrive:
            self._push(t0 + spec.arrival_s, "arrive", job_id)
        if spec.environment_wait_s is not None:
            self._push(t0 + spec.arrival_s + spec.environment_wait_s, "approve", job_id)
        if spec.cancel_at_s is not None:
            self._push(t0 + spec.cancel_at_s, "cancel", job_id)

    def _push(self, due: float, action: str, job_id: int) -> None:
        heapq.heappush(self._schedule, (due, next(self._seq), action, job_id))

    def _schedule_loop(self) -> None:
        actions = {
            "arrive": self.state.arrive,
            "approve": self.state.approve,
            "cancel": self.state.cancel,
        }
        while not self._stopping.is_set():
            with self._schedule_cv:
                now = time.monotonic()
                if not self._schedule or self._schedule[0][0] > now:
                    wait = self._schedule[0][0] - now if self._schedule else 1.0
                    self._schedule_cv.wait(min(wait, 1.0))
                    continue
                _, _, action, job_id = heapq.heappop(self._schedule)
            try:
                actions[action](job_id)
            except GitHubError as exc:
                # e.g. an approval for a job cancelled meanwhile: nothing to do.
                log.info("workload %s of job %s skipped: %s", action, job_id, exc.message)
            except Exception:
                log.error("workload %s of job %s failed", action, job_id, exc_info=True)

    def _owner_of(self, repository: str) -> tuple[int | None, int | None, str]:
        """Which installation sees this repository (it receives the webhooks), and the
        owner's account type."""
        owner = repository.split("/", 1)[0].lower()
        owner_type = "Organization"
        for app in self.config.apps:
            for inst in app.installations:
                if inst.covers(repository):
                    return inst.id, app.app_id, inst.account_type
                if inst.account.lower() == owner:
                    owner_type = inst.account_type
        return None, None, owner_type

    def installation_for_scope(self, scope: Scope) -> InstallationConfig | None:
        owner = scope.name.split("/", 1)[0].lower()
        for app in self.config.apps:
            for inst in app.installations:
                if inst.account.lower() == owner:
                    return inst
        return None

    # -- webhooks --------------------------------------------------------------------------

    def _emit(self, action: str, snap: dict) -> None:
        if snap["installation_id"] is None and self.config.apps:
            # No installation of any App sees this repository: GitHub sends the App nothing.
            # The ground-truth clock still runs as if it had been sent.
            self.state.mark_sent(snap["job_id"], action, snap["status"], self.clock.wall())
            return
        self.sender.enqueue_job_event(action, snap)

    def set_webhook(self, url: str | None = None, secret: str | None = None) -> None:
        """Change the webhook URL and/or secret at runtime (secret rotation)."""
        self.sender.set_target(url=url, secret=secret)

    # -- faults ----------------------------------------------------------------------------

    def set_faults(self, faults: FaultsConfig | dict) -> FaultsConfig:
        """Replace the fault profile from now on (counts carry on; `faults.reset()` clears)."""
        return self.faults.configure(faults)

    def faults_report(self, ratio: float = 0.5) -> dict:
        """Faults really injected per kind, opportunities, expected counts, and `problems`:
        the kinds injected less than `ratio` x (share x opportunities)."""
        return self.faults.report(ratio)

    def check_faults(self, ratio: float = 0.5) -> dict:
        """The report; raises `emulator.faults.FaultShortfall` if a configured kind fell short."""
        return self.faults.check(ratio)

    # -- the stand-in runner's start-up ----------------------------------------------------

    @property
    def runner_startup_s(self) -> float:
        return self.state.runner_startup_s

    def set_runner_startup(self, seconds: float) -> float:
        """The start-up (s) written into JIT configs issued from now on; runners already
        created keep theirs. ValueError, with the reason, outside [0, 600]."""
        seconds = runner_startup_seconds(seconds)
        self.state.set_runner_startup(seconds)
        return seconds

    # -- ground truth ----------------------------------------------------------------------

    def jobs(self) -> list[dict]:
        return self.state.jobs()

    def job(self, job_id: int) -> dict:
        return self.state.job_record(job_id)

    def deliveries(self) -> list[dict]:
        return [d.summary() for d in self.sender.deliveries()]

    def runners(self) -> list[dict]:
        return self.state.runners(with_scope=True)

    def runner_records(self) -> list[dict]:
        """Every runner's life (created, registered, listening, its job, removed), removed
        runners included: the ground truth for warm runners."""
        return self.state.runner_records()

    # -- time-outs -------------------------------------------------------------------------

    def _reap_loop(self) -> None:
        interval = min(
            REAP_INTERVAL_MAX_S,
            self.config.lost_runner_timeout_s / 4,
            self.config.acquire_timeout_s / 4,
        )
        while not self._stopping.wait(interval):
            try:
                self.state.reap()
            except Exception:
                log.error("reaper failed", exc_info=True)
