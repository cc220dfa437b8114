"""`workflow_job` payloads built from octokit's real fixtures, and the signed sender.

The sender never blocks the assignment engine: `State` only enqueues, and a pool of threads
POSTs. Deliveries of one job go out one at a time in the order they were enqueued (queued ->
in_progress -> completed), deliveries of different jobs in parallel, as GitHub mostly does.
GitHub does not retry a failed delivery by itself; neither does this sender.

With a FaultInjector the sender also loses, duplicates and reorders original deliveries (never
redeliveries): a lost one is logged as failed and never POSTed; a duplicate is POSTed twice with
one `X-GitHub-Delivery`; a held one waits until the job's next delivery is queued and goes right
behind it (or goes late after `reorder_max_hold_s`).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import itertools
import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import requests

from .config import EmulatorConfig
from .faults import FaultInjector

log = logging.getLogger(__name__)

FIXTURES = Path(__file__).parent / "fixtures"
HOOKSHOT_VERSION = "GitHub-Hookshot/e7a2c0b"
STEP_CONCLUSIONS = {"success", "failure", "cancelled", "skipped"}
MAX_RESPONSE_BODY = 4096


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _node_id(kind: str, number: int) -> str:
    return base64.b64encode(f"0{len(kind)}:{kind}{number}".encode()).decode()


def _load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


class PayloadBuilder:
    """Payloads shaped exactly like GitHub's, from the fixture examples with our values in."""

    def __init__(self, api_url: str, html_url: str):
        self.api_url = api_url.rstrip("/")
        self.html_url = html_url.rstrip("/")
        queued = _load("workflow_job.queued.payload.json")
        self._repo_template = queued["repository"]
        self._user_template = queued["sender"]
        self._org_template = _load("workflow_job.completed.success.with-organization.payload.json")[
            "organization"
        ]
        self._deployment_template = _load("workflow_job.queued.with-deployment.payload.json")[
            "deployment"
        ]
        self._lock = threading.Lock()
        self._ids: dict[str, int] = {}
        self._repos: dict[tuple, dict] = {}

    def _rewrite(self, obj, old: str, new: str):
        """Replace an owner/repo name inside the template's URLs and point them at us."""
        text = json.dumps(obj).replace(old, new)
        text = text.replace("https://api.github.com", self.api_url)
        text = text.replace("https://github.com", self.html_url)
        return json.loads(text)

    def stable_id(self, kind: str, name: str) -> int:
        """Stable ids for the accounts and repositories the workload names."""
        base = {"user": 1_000_000, "repo": 500_000_000}[kind]
        with self._lock:
            return self._ids.setdefault(f"{kind}:{name.lower()}", base + len(self._ids) + 1)

    def user(self, login: str, user_type: str = "User") -> dict:
        user = self._rewrite(self._user_template, "Codertocat", login)
        uid = self.stable_id("user", login)
        user.update(id=uid, node_id=_node_id("User", uid), type=user_type)
        user["avatar_url"] = f"https://avatars.githubusercontent.com/u/{uid}?v=4"
        return user

    def organization(self, login: str) -> dict:
        org = self._rewrite(self._org_template, "Octocoders", login)
        oid = self.stable_id("user", login)
        org.update(id=oid, node_id=_node_id("Organization", oid))
        org["avatar_url"] = f"https://avatars.githubusercontent.com/u/{oid}?v=4"
        return org

    def repository(self, full_name: str, private: bool, owner_type: str) -> dict:
        key = (full_name, private, owner_type)
        with self._lock:
            cached = self._repos.get(key)
        if cached is not None:
            return cached
        owner, name = full_name.split("/", 1)
        repo = self._rewrite(self._repo_template, "Codertocat/Hello-World", full_name)
        rid = self.stable_id("repo", full_name)
        repo.update(
            id=rid,
            node_id=_node_id("Repository", rid),
            name=name,
            full_name=full_name,
            private=private,
            visibility="private" if private else "public",
            owner=self.user(owner, owner_type),
        )
        repo["git_url"] = repo["git_url"].replace("git://github.com", "git://" + self.host())
        repo["ssh_url"] = f"git@{self.host()}:{full_name}.git"
        with self._lock:
            self._repos[key] = repo
        return repo

    def host(self) -> str:
        return self.html_url.split("://", 1)[-1].split("/", 1)[0]

    def deployment(self, snap: dict, sender: dict) -> dict:
        dep = copy.deepcopy(self._deployment_template)
        full = snap["repository"]
        dep_id = snap["deployment_id"]
        created = iso(snap["created_at"])
        dep.update(
            url=f"{self.api_url}/repos/{full}/deployments/{dep_id}",
            id=dep_id,
            node_id=_node_id("Deployment", dep_id),
            environment=snap["environment"],
            original_environment=snap["environment"],
            sha=snap["head_sha"],
            ref=snap["head_branch"],
            created_at=created,
            updated_at=created,
            statuses_url=f"{self.api_url}/repos/{full}/deployments/{dep_id}/statuses",
            repository_url=f"{self.api_url}/repos/{full}",
            creator=sender,
        )
        return dep

    def workflow_job(self, snap: dict) -> dict:
        """The `workflow_job` object; also the REST answer for GET .../actions/jobs/{id}."""
        full = snap["repository"]
        job_id, run_id = snap["job_id"], snap["run_id"]
        created = iso(snap["created_at"])
        started = iso(snap["taken_at"]) or created
        completed = iso(snap["completed_at"])
        return {
            "id": job_id,
            "run_id": run_id,
            "workflow_name": snap["workflow_name"],
            "head_branch": snap["head_branch"],
            "run_url": f"{self.api_url}/repos/{full}/actions/runs/{run_id}",
            "run_attempt": snap.get("run_attempt", 1),
            "node_id": _node_id("CheckRun", job_id),
            "head_sha": snap["head_sha"],
            "url": f"{self.api_url}/repos/{full}/actions/jobs/{job_id}",
            "html_url": f"{self.html_url}/{full}/actions/runs/{run_id}/job/{job_id}",
            "status": snap["status"],
            "conclusion": snap["conclusion"],
            "created_at": created,
            "started_at": started,
            "completed_at": completed,
            "name": snap["name"],
            "steps": _steps(snap, started, completed),
            "check_run_url": f"{self.api_url}/repos/{full}/check-runs/{job_id}",
            "labels": list(snap["labels"]),
            "runner_id": snap["runner_id"],
            "runner_name": snap["runner_name"],
            "runner_group_id": snap["runner_group_id"],
            "runner_group_name": snap["runner_group_name"],
        }

    def build(self, action: str, snap: dict) -> dict:
        owner = snap["repository"].split("/", 1)[0]
        owner_type = snap["owner_type"]
        sender = self.user(owner) if owner_type == "User" else self.user("octocat")
        payload = {"action": action, "workflow_job": self.workflow_job(snap)}
        if snap["deployment_id"] is not None:
            payload["deployment"] = self.deployment(snap, sender)
        payload["repository"] = self.repository(snap["repository"], snap["private"], owner_type)
        if owner_type == "Organization":
            payload["organization"] = self.organization(owner)
        payload["sender"] = sender
        if snap["installation_id"] is not None:
            payload["installation"] = {
                "id": snap["installation_id"],
                "node_id": _node_id("IntegrationInstallation", snap["installation_id"]),
            }
        return payload


def _steps(snap: dict, started: str | None, completed: str | None) -> list[dict]:
    if snap["runner_id"] is None:
        return []  # never reached a runner
    if snap["status"] == "in_progress":
        return [_step("Set up job", 1, "in_progress", None, started, None)]
    conclusion = snap["conclusion"] if snap["conclusion"] in STEP_CONCLUSIONS else "failure"
    return [
        _step("Set up job", 1, "completed", "success", started, started),
        _step(f"Run {snap['name']}", 2, "completed", conclusion, started, completed),
        _step("Complete job", 3, "completed", "success", completed, completed),
    ]


def _step(name, number, status, conclusion, started, completed) -> dict:
    return {
        "name": name,
        "status": status,
        "conclusion": conclusion,
        "number": number,
        "started_at": started,
        "completed_at": completed,
    }


@dataclass
class Delivery:
    """One attempt, as GitHub's deliveries log keeps it."""

    id: int
    guid: str
    event: str
    action: str
    installation_id: int | None
    repository_id: int | None
    job_id: int | None
    redelivery: bool
    request_headers: dict
    body: bytes
    url: str = ""
    delivered_at: float = 0.0
    duration: float = 0.0
    status_code: int = 0
    status: str = "pending"
    response_headers: dict = field(default_factory=dict)
    response_body: str = ""
    # The injected fault: "dropped", "duplicate" (the second copy), "reordered", "delayed".
    fault: str | None = None

    def summary(self) -> dict:
        # GitHub's shape for GET /app/hook/deliveries, plus the job id for the ground truth.
        return {
            "id": self.id,
            "guid": self.guid,
            "delivered_at": iso(self.delivered_at),
            "redelivery": self.redelivery,
            "duration": round(self.duration, 3),
            "status": self.status,
            "status_code": self.status_code,
            "event": self.event,
            "action": self.action,
            "installation_id": self.installation_id,
            "repository_id": self.repository_id,
            "throttled_at": None,
            "job_id": self.job_id,
            "url": self.url,
            "sent_at": self.delivered_at,
            "fault": self.fault,
        }

    def detail(self) -> dict:
        out = self.summary()
        out["url"] = self.url
        out["request"] = {"headers": dict(self.request_headers), "payload": json.loads(self.body)}
        out["response"] = {"headers": self.response_headers, "payload": self.response_body}
        return out


class WebhookSender:
    """Signs and POSTs deliveries from a thread pool, keeping per-job order."""

    def __init__(
        self,
        config: EmulatorConfig,
        builder: PayloadBuilder,
        on_sent: Callable[[int, str, str, float], None] = lambda *a: None,
        clock: Callable[[], float] = time.time,
        faults: FaultInjector | None = None,
    ):
        self.config = config
        self.faults = faults
        self.builder = builder
        self.on_sent = on_sent
        self.clock = clock
        # Several receivers (several webhook Lambda containers behind one URL, played locally
        # by several processes): deliveries are spread over them in turn.
        self.urls = list(config.webhook_urls) or ([config.webhook_url] if config.webhook_url
                                                  else [])
        self._turn = itertools.count()
        self.secret = config.webhook_secret
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending: dict[object, deque] = {}
        self._ready: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._log: list[Delivery] = []
        self._by_id: dict[int, Delivery] = {}
        self._ids = itertools.count(1)
        self._local = threading.local()
        # Deliveries held back for reordering: job id -> (item, monotonic deadline).
        self._held: dict[object, tuple[tuple, float]] = {}
        self._hold_cv = threading.Condition(self._lock)
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        for i in range(self.config.sender_threads):
            t = threading.Thread(target=self._work, name=f"webhook-sender-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        with self._lock:
            self._stopping = False
        self._holder = threading.Thread(target=self._hold_loop, name="webhook-holder", daemon=True)
        self._holder.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._hold_cv.notify_all()
        for _ in self._threads:
            self._ready.put(None)
        for t in self._threads:
            t.join(timeout=self.config.webhook_timeout_s + 1)
        self._threads.clear()
        holder = getattr(self, "_holder", None)
        if holder is not None:
            holder.join(timeout=2)

    @property
    def url(self) -> str | None:
        return self.urls[0] if self.urls else None

    def _next_url(self) -> str | None:
        # Caller holds self._lock.
        return self.urls[next(self._turn) % len(self.urls)] if self.urls else None

    def set_target(self, url: str | None = None, secret: str | None = None) -> None:
        with self._lock:
            if url is not None:
                self.urls = [url] if url else []
            if secret is not None:
                self.secret = secret

    def flush(self, timeout: float) -> bool:
        """Wait until everything enqueued so far has been attempted."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending or self._held:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    # -- queueing --------------------------------------------------------------------------

    def enqueue_job_event(self, action: str, snap: dict) -> None:
        """Called by State under its lock: only queue, never block."""
        key = snap["job_id"]
        with self._lock:
            fault = None
            if self.faults is not None and self.url:
                fault = self.faults.webhook_fault(
                    key, action, snap["status"], can_hold=key not in self._held
                )
            if fault == "reorder":
                hold_s = self.faults.config.webhooks.reorder_max_hold_s
                self._held[key] = (("job", action, snap, None), time.monotonic() + hold_s)
                self._hold_cv.notify_all()
                return
            self._append(key, ("job", action, snap, fault))
            held = self._held.pop(key, None)
            if held is not None:
                # The held delivery goes right behind the one that overtook it.
                self._append(key, (*held[0][:3], "reordered"))

    def redeliver(self, delivery_id: int) -> Delivery | None:
        with self._lock:
            original = self._by_id.get(delivery_id)
        if original is None:
            return None
        self._enqueue(("redelivery", delivery_id), ("redelivery", original))
        return original

    def _enqueue(self, key, item) -> None:
        with self._lock:
            self._append(key, item)

    def _append(self, key, item) -> None:
        # Caller holds self._lock.
        line = self._pending.get(key)
        if line is None:
            self._pending[key] = deque([item])
            self._ready.put(key)  # no worker owns this key: hand it to one
        else:
            line.append(item)

    def _hold_loop(self) -> None:
        """Release held deliveries whose successor never came in time: they go out late."""
        with self._lock:
            while not self._stopping:
                now = time.monotonic()
                for key, (item, deadline) in list(self._held.items()):
                    if deadline <= now:
                        del self._held[key]
                        self._append(key, (*item[:3], "delayed"))
                deadlines = [deadline for _, deadline in self._held.values()]
                wait = min(deadlines) - now if deadlines else 1.0
                self._hold_cv.wait(max(0.01, min(wait, 1.0)))

    def _work(self) -> None:
        while True:
            key = self._ready.get()
            if key is None:
                return
            while True:
                with self._lock:
                    line = self._pending[key]
                    if not line:
                        del self._pending[key]
                        self._idle.notify_all()
                        break
                    item = line[0]
                try:
                    self._send_item(item)
                except Exception:
                    log.error("webhook delivery failed unexpectedly", exc_info=True)
                with self._lock:
                    line.popleft()

    # -- sending ---------------------------------------------------------------------------

    def _send_item(self, item) -> None:
        with self._lock:
            url, secret = self._next_url(), self.secret
        fault = None
        if item[0] == "job":
            _, action, snap, fault = item
            now = self.clock()
            if not url:
                self.on_sent(snap["job_id"], action, snap["status"], now)
                return
            payload = self.builder.build(action, snap)
            body = json.dumps(payload, separators=(",", ":")).encode()
            delivery = Delivery(
                id=next(self._ids),
                guid=str(uuid.uuid4()),
                event="workflow_job",
                action=action,
                installation_id=snap["installation_id"],
                repository_id=payload["repository"]["id"],
                job_id=snap["job_id"],
                redelivery=False,
                request_headers={},
                body=body,
            )
            delivery.request_headers = self._headers(delivery, snap.get("app_id"), secret)
            self.on_sent(snap["job_id"], action, snap["status"], now)
            if fault == "drop":
                self._record_drop(url, delivery)
                return
            if fault == "never_sent":
                # Neither POSTed nor logged: no redelivery can bring it back.
                self.faults.record("never_sent")
                return
        else:
            original: Delivery = item[1]
            if not url:
                return
            delivery = copy.copy(original)
            delivery.id = next(self._ids)
            delivery.redelivery = True
            delivery.fault = None
            app_id = original.request_headers.get("X-GitHub-Hook-Installation-Target-ID")
            delivery.request_headers = self._headers(delivery, app_id, secret)
        if fault in ("reordered", "delayed"):
            delivery.fault = fault
        self._post(url, delivery)
        if fault == "reordered":
            self.faults.record("reordered")
        elif fault == "delayed":
            self.faults.record("", "delayed")
        elif fault == "duplicate":
            if self.faults.config.webhooks.duplicate_delay_s:
                time.sleep(self.faults.config.webhooks.duplicate_delay_s)
            second = copy.copy(delivery)
            second.id = next(self._ids)
            second.fault = "duplicate"
            self._post(url, second)
            self.faults.record("duplicated")
        elif fault == "duplicate_new_id":
            # GitHub's own second event for the job: a new delivery id, a new guid.
            if self.faults.config.webhooks.duplicate_delay_s:
                time.sleep(self.faults.config.webhooks.duplicate_delay_s)
            second = copy.copy(delivery)
            second.id = next(self._ids)
            second.guid = str(uuid.uuid4())
            second.fault = "duplicate_new_id"
            app_id = delivery.request_headers.get("X-GitHub-Hook-Installation-Target-ID")
            second.request_headers = self._headers(second, app_id, secret)
            with self._lock:
                second_url = self._next_url() or url
            self._post(second_url, second)
            self.faults.record("duplicated_new_id")

    def _record_drop(self, url: str, delivery: Delivery) -> None:
        """A lost delivery: logged as GitHub logs a failed one (status not "OK"), never POSTed,
        so a reconciler can find it in the deliveries API and redeliver it."""
        code = self.faults.config.webhooks.drop_status_code
        delivery.url = url
        delivery.delivered_at = self.clock()
        delivery.status_code = code
        delivery.status = f"Invalid HTTP Response: {code}" if code else "failed to connect to host"
        delivery.fault = "dropped"
        with self._lock:
            self._log.append(delivery)
            self._by_id[delivery.id] = delivery
        self.faults.record("dropped")

    def _headers(self, delivery: Delivery, app_id, secret: str) -> dict:
        if app_id is None and self.config.apps:
            app_id = self.config.apps[0].app_id
        headers = {
            "Content-Type": "application/json",
            "User-Agent": HOOKSHOT_VERSION,
            "X-GitHub-Event": delivery.event,
            "X-GitHub-Delivery": delivery.guid,
            "X-GitHub-Hook-ID": str(self.config.hook_id),
            "X-GitHub-Hook-Installation-Target-ID": str(app_id or 0),
            "X-GitHub-Hook-Installation-Target-Type": "integration",
        }
        if secret:
            # Without a secret GitHub sends no signature headers at all.
            key = secret.encode()
            headers["X-Hub-Signature"] = (
                "sha1=" + hmac.new(key, delivery.body, hashlib.sha1).hexdigest()
            )
            headers["X-Hub-Signature-256"] = (
                "sha256=" + hmac.new(key, delivery.body, hashlib.sha256).hexdigest()
            )
        if self.config.is_ghes:
            headers["X-GitHub-Enterprise-Version"] = self.config.ghes_version
            headers["X-GitHub-Enterprise-Host"] = self.builder.host()
        return headers

    def _post(self, url: str, delivery: Delivery) -> None:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        delivery.url = url
        delivery.delivered_at = self.clock()
        start = time.monotonic()
        try:
            resp = session.post(
                url,
                data=delivery.body,
                headers=delivery.request_headers,
                timeout=self.config.webhook_timeout_s,
            )
            delivery.status_code = resp.status_code
            delivery.status = (
                "OK"
                if 200 <= resp.status_code < 300
                else (f"Invalid HTTP Response: {resp.status_code}")
            )
            delivery.response_headers = dict(resp.headers)
            delivery.response_body = resp.text[:MAX_RESPONSE_BODY]
        except requests.Timeout:
            delivery.status = "timed out"
        except requests.RequestException:
            delivery.status = "failed to connect to host"
        delivery.duration = time.monotonic() - start
        with self._lock:
            self._log.append(delivery)
            self._by_id[delivery.id] = delivery

    # -- the log ---------------------------------------------------------------------------

    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return list(self._log)

    def delivery(self, delivery_id: int) -> Delivery | None:
        with self._lock:
            return self._by_id.get(delivery_id)
