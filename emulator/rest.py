"""GitHub REST (under the optional GHES prefix): the App and its installations, installation
tokens, workflow jobs and runs, the installation's repositories, the App's webhook (config,
deliveries, redelivery), `/rate_limit` and `/meta`. The runner routes are in rest_runners.py."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from flask import Blueprint, request

from .errors import NotFound, Unprocessable
from .responses import DEFAULT_PER_PAGE, MAX_PER_PAGE, int_arg, paginate, read_body, reply
from .rest_runners import add_runner_routes
from .state import RERUN_DOC
from .webhooks import _node_id, iso

if TYPE_CHECKING:
    from .config import InstallationConfig
    from .server import Emulator

# Fields of the emulator's delivery records that GitHub's deliveries API does not have.
GROUND_TRUTH_FIELDS = ("job_id", "url", "sent_at", "fault")
HOOKS_DOC = "https://docs.github.com/rest/apps/webhooks"
RUNS_DOC = ("https://docs.github.com/rest/actions/workflow-runs"
            "#list-workflow-runs-for-a-repository")
# "This API will return up to 1,000 results for each search when using the following
# parameters: actor, branch, check_suite_id, created, event, head_sha, status." (RUNS_DOC);
# the emulator's cap is `EmulatorConfig.runs_search_cap`.
# What RunnerHub's App needs: self-hosted runners (org and repo) and reading jobs.
PERMISSIONS = {
    "organization_self_hosted_runners": "write",
    "actions": "read",
    "administration": "write",
    "metadata": "read",
}


def github_blueprint(emu: Emulator) -> Blueprint:
    bp = Blueprint("github", __name__)
    auth = emu.auth

    def installation_view(inst: InstallationConfig, app_id: int) -> dict:
        app_cfg = auth.apps[app_id]
        account = emu.builder.user(inst.account, inst.account_type)
        return {
            "id": inst.id,
            "account": account,
            "repository_selection": "all" if inst.repositories is None else "selected",
            "access_tokens_url": f"{emu.base_url}/app/installations/{inst.id}/access_tokens",
            "repositories_url": f"{emu.base_url}/installation/repositories",
            "html_url": f"{emu.root_url}/organizations/{inst.account}/settings/installations/"
            f"{inst.id}",
            "app_id": app_id,
            "app_slug": app_cfg.slug,
            "target_id": account["id"],
            "target_type": inst.account_type,
            "permissions": dict(PERMISSIONS),
            "events": ["workflow_job"],
            "created_at": "2024-01-01T00:00:00Z",
            "updated_at": "2024-01-01T00:00:00Z",
            "single_file_name": None,
            "has_multiple_single_files": False,
            "single_file_paths": [],
            "suspended_by": None,
            "suspended_at": None,
        }

    def find_installation(app_id: int, predicate) -> InstallationConfig:
        for inst in auth.apps[app_id].installations:
            if predicate(inst):
                return inst
        raise NotFound(documentation_url="https://docs.github.com/rest/apps/apps")

    @bp.get("/app")
    def get_app():
        app_cfg = auth.require_app(request.headers.get("Authorization"))
        return reply(
            {
                "id": app_cfg.app_id,
                "slug": app_cfg.slug,
                "client_id": app_cfg.client_id,
                "name": app_cfg.slug,
                "events": ["workflow_job"],
                "installations_count": len(app_cfg.installations),
            }
        )

    @bp.get("/app/installations")
    def list_installations():
        app_cfg = auth.require_app(request.headers.get("Authorization"))
        return reply([installation_view(i, app_cfg.app_id) for i in app_cfg.installations])

    @bp.get("/app/installations/<int:installation_id>")
    def get_installation(installation_id: int):
        app_cfg = auth.require_app(request.headers.get("Authorization"))
        inst = auth.installation_for_app(app_cfg, installation_id)
        return reply(installation_view(inst, app_cfg.app_id))

    @bp.post("/app/installations/<int:installation_id>/access_tokens")
    def create_access_token(installation_id: int):
        app_cfg = auth.require_app(request.headers.get("Authorization"))
        inst = auth.installation_for_app(app_cfg, installation_id)
        body = read_body()
        repos = body.get("repositories")
        token = auth.issue_installation_token(app_cfg, inst, repos)
        out = {
            "token": token.token,
            "expires_at": iso(token.expires_at),
            "permissions": dict(PERMISSIONS),
            "repository_selection": "all"
            if inst.repositories is None and token.repositories is None
            else "selected",
        }
        return reply(out, 201)

    @bp.get("/orgs/<org>/installation")
    def org_installation(org: str):
        app_cfg = auth.require_app(request.headers.get("Authorization"))
        inst = find_installation(
            app_cfg.app_id,
            lambda i: i.account.lower() == org.lower() and i.account_type == "Organization",
        )
        return reply(installation_view(inst, app_cfg.app_id))

    @bp.get("/users/<user>/installation")
    def user_installation(user: str):
        app_cfg = auth.require_app(request.headers.get("Authorization"))
        inst = find_installation(app_cfg.app_id, lambda i: i.account.lower() == user.lower())
        return reply(installation_view(inst, app_cfg.app_id))

    @bp.get("/repos/<owner>/<repo>/installation")
    def repo_installation(owner: str, repo: str):
        app_cfg = auth.require_app(request.headers.get("Authorization"))
        inst = find_installation(app_cfg.app_id, lambda i: i.covers(f"{owner}/{repo}"))
        return reply(installation_view(inst, app_cfg.app_id))

    add_runner_routes(bp, emu)

    # -- jobs --

    @bp.get("/repos/<owner>/<repo>/actions/jobs/<int:job_id>")
    def get_job(owner: str, repo: str, job_id: int):
        caller = auth.require_installation(request.headers.get("Authorization"))
        full = f"{owner}/{repo}"
        not_found = NotFound(
            documentation_url="https://docs.github.com/rest/actions/workflow-jobs"
            "#get-a-job-for-a-workflow-run"
        )
        if not caller.covers(full):
            raise not_found
        try:
            snap = emu.state.job_snapshot(job_id)
        except NotFound:
            raise not_found from None
        if snap["repository"].lower() != full.lower() or snap["status"] == "pending":
            raise not_found
        return reply(emu.builder.workflow_job(snap))

    @bp.post("/repos/<owner>/<repo>/actions/jobs/<int:job_id>/rerun")
    def rerun_job(owner: str, repo: str, job_id: int):
        # GitHub answers 201 with an empty object; 403 while the run is still running.
        caller = auth.require_installation(request.headers.get("Authorization"))
        full = f"{owner}/{repo}"
        not_found = NotFound(documentation_url=RERUN_DOC)
        if not caller.covers(full):
            raise not_found
        try:
            snap = emu.state.job_snapshot(job_id)
        except NotFound:
            raise not_found from None
        if snap["repository"].lower() != full.lower() or snap["status"] == "pending":
            raise not_found
        emu.state.rerun(job_id)
        return reply({}, 201)

    # -- what is queued: the installation's repositories, workflow runs, a run's jobs --

    runs_doc = "https://docs.github.com/rest/actions/workflow-runs"

    def repository_view(full: str, private: bool, owner_type: str, pushed_at: float | None,
                        created_at: float | None) -> dict:
        repo = dict(emu.builder.repository(full, private, owner_type))
        pushed = iso(pushed_at) or "2024-01-01T00:00:00Z"
        repo.update(pushed_at=pushed, updated_at=pushed,
                    created_at=iso(created_at) or "2024-01-01T00:00:00Z")
        return repo

    def run_view(full: str, run: dict) -> dict:
        first = run["jobs"][0]
        run_id = run["run_id"]
        repo = emu.builder.repository(full, first["private"], first["owner_type"])
        created, updated = iso(run["created_at"]), iso(run["updated_at"])
        return {
            "id": run_id,
            "name": first["workflow_name"],
            "node_id": _node_id("WorkflowRun", run_id),
            "head_branch": first["head_branch"],
            "head_sha": first["head_sha"],
            "path": ".github/workflows/ci.yml",
            "display_title": first["workflow_name"],
            "run_number": run_id % 100_000,
            "event": "push",
            "status": run["status"],
            "conclusion": run["conclusion"],
            "workflow_id": emu.builder.stable_id("repo", f"{full}/workflow"),
            "url": f"{emu.base_url}/repos/{full}/actions/runs/{run_id}",
            "html_url": f"{emu.root_url}/{full}/actions/runs/{run_id}",
            "jobs_url": f"{emu.base_url}/repos/{full}/actions/runs/{run_id}/jobs",
            "created_at": created,
            "updated_at": updated,
            "run_attempt": run["run_attempt"],
            "run_started_at": created,
            "repository": repo,
            "head_repository": repo,
        }

    def covered_repo(owner: str, repo: str) -> str:
        caller = auth.require_installation(request.headers.get("Authorization"))
        full = f"{owner}/{repo}"
        if not caller.covers(full):
            raise NotFound(documentation_url=runs_doc)
        return full

    @bp.get("/installation/repositories")
    def installation_repositories():
        caller = auth.require_installation(request.headers.get("Authorization"))
        inst = caller.installation
        found: dict[str, dict] = {}
        for repo in emu.state.repositories():
            full = repo["full_name"]
            if caller.covers(full):
                found[full.lower()] = repository_view(full, repo["private"], repo["owner_type"],
                                                      repo["pushed_at"], repo["created_at"])
        for full in inst.repositories or ():
            # Selected repositories the workload never used: no activity yet.
            if full.lower() not in found and caller.covers(full):
                found[full.lower()] = repository_view(full, True, inst.account_type, None, None)
        # GitHub lists them by name, not by activity: a caller sorts them itself.
        return paginate([found[key] for key in sorted(found)], "repositories")

    @bp.get("/repos/<owner>/<repo>/actions/runs")
    def workflow_runs(owner: str, repo: str):
        full = covered_repo(owner, repo)
        wanted = request.args.get("status")
        created = request.args.get("created")
        within = created_range(created) if created is not None else None
        runs = [
            run for run in emu.state.workflow_runs(full)
            # GitHub's `status` filter takes a status or a conclusion.
            if (wanted is None or wanted in (run["status"], run["conclusion"]))
            # Compared at whole seconds, the precision GitHub shows.
            and (within is None or within[0] <= math.floor(run["created_at"]) < within[1])
        ]
        capped = None
        if wanted is not None or created is not None:
            # A search: only its first 1,000 runs can be paged to; total_count says how many
            # matched, so a caller knows to narrow the search.
            capped = emu.config.runs_search_cap
        return paginate([run_view(full, run) for run in runs], "workflow_runs", reachable=capped)

    @bp.get("/repos/<owner>/<repo>/actions/runs/<int:run_id>/jobs")
    def run_jobs(owner: str, repo: str, run_id: int):
        full = covered_repo(owner, repo)
        which = request.args.get("filter", "latest")
        if which not in ("latest", "all"):
            raise Unprocessable(f"filter must be latest or all, not {which!r}",
                                documentation_url=runs_doc)
        run = next((r for r in emu.state.workflow_runs(full) if r["run_id"] == run_id), None)
        if run is None:
            raise NotFound(documentation_url=runs_doc)
        snaps = run["jobs"] if which == "latest" else run["all_jobs"]
        return paginate([emu.builder.workflow_job(snap) for snap in snaps], "jobs")

    # -- the App's webhook: config, deliveries, redelivery --

    @bp.get("/app/hook/config")
    def hook_config():
        auth.require_app(request.headers.get("Authorization"))
        return reply(_hook_config(emu))

    @bp.patch("/app/hook/config")
    def patch_hook_config():
        auth.require_app(request.headers.get("Authorization"))
        body = read_body()
        url, secret = body.get("url"), body.get("secret")
        if (url is not None and not isinstance(url, str)) or (
            secret is not None and not isinstance(secret, str)
        ):
            raise Unprocessable(
                "Invalid request.",
                documentation_url="https://docs.github.com/"
                "rest/apps/webhooks#update-a-webhook-configuration-for-an-app",
            )
        emu.sender.set_target(url=url, secret=secret)
        return reply(_hook_config(emu))

    @bp.get("/app/hook/deliveries")
    def list_deliveries():
        app_cfg = auth.require_app(request.headers.get("Authorization"))
        per_page = int_arg("per_page", DEFAULT_PER_PAGE, 1, MAX_PER_PAGE)
        # Newest first; the cursor is the id to continue below, like GitHub's opaque cursor.
        # Each App's log holds only the deliveries sent to its own webhook.
        items = sorted(
            (d for d in emu.sender.deliveries() if _delivered_to(d, app_cfg.app_id)),
            key=lambda d: d.id, reverse=True,
        )
        cursor = request.args.get("cursor")
        if cursor:
            try:
                below = int(cursor)
            except ValueError:
                raise Unprocessable("Invalid cursor") from None
            items = [d for d in items if d.id < below]
        page = items[:per_page]
        headers = {}
        if len(items) > per_page:
            nxt = urlencode({"per_page": per_page, "cursor": page[-1].id})
            headers["Link"] = f'<{request.base_url}?{nxt}>; rel="next"'
        out = [{k: v for k, v in d.summary().items() if k not in GROUND_TRUTH_FIELDS} for d in page]
        return reply(out, headers=headers)

    def app_delivery(delivery_id: int):
        """One delivery of the calling App's webhook, or 404."""
        app_cfg = auth.require_app(request.headers.get("Authorization"))
        delivery = emu.sender.delivery(delivery_id)
        if delivery is None or not _delivered_to(delivery, app_cfg.app_id):
            raise NotFound(documentation_url=HOOKS_DOC)
        return delivery

    @bp.get("/app/hook/deliveries/<int:delivery_id>")
    def get_delivery(delivery_id: int):
        detail = app_delivery(delivery_id).detail()
        for key in GROUND_TRUTH_FIELDS:
            if key != "url":  # GitHub's detail has the URL; its list does not
                detail.pop(key, None)
        return reply(detail)

    @bp.post("/app/hook/deliveries/<int:delivery_id>/attempts")
    def redeliver(delivery_id: int):
        app_delivery(delivery_id)
        if emu.sender.redeliver(delivery_id) is None:
            raise NotFound(documentation_url=HOOKS_DOC)
        return reply({}, 202)

    @bp.get("/rate_limit")
    def rate_limit():
        caller = auth.identify(request.headers.get("Authorization"), request.remote_addr)
        core = emu.rate_limits.status(caller)
        return reply({"resources": {"core": core}, "rate": core})

    @bp.get("/meta")
    def meta():
        return reply(
            {
                "verifiable_password_authentication": False,
                "installed_version": emu.config.ghes_version if emu.config.is_ghes else None,
            }
        )

    return bp


def created_range(value: str) -> tuple[float, float]:
    """GitHub's search syntax for dates (`created=`) as [start, end) epoch seconds: `D`,
    `>=D`, `>D`, `<=D`, `<D`, `A..B`, `A..*`, `*..B`, where a date means its whole UTC day and
    a date-time (ISO 8601, with a zone or UTC) its second. 422 otherwise."""
    text = value.strip()
    for op in (">=", "<=", ">", "<"):
        if text.startswith(op):
            start, end = _moment(text[len(op):], value)
            return {">=": (start, math.inf), ">": (end, math.inf),
                    "<=": (-math.inf, end), "<": (-math.inf, start)}[op]
    if ".." in text:
        low, _, high = text.partition("..")
        start = -math.inf if low.strip() == "*" else _moment(low, value)[0]
        end = math.inf if high.strip() == "*" else _moment(high, value)[1]
        return start, end
    return _moment(text, value)


def _moment(text: str, whole: str) -> tuple[float, float]:
    """A date (its day) or a date-time (its second) as [start, end)."""
    text = text.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
            return start, start + 86400
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise Unprocessable(f"Invalid created filter {whole!r}: use a date or an ISO 8601 "
                            "date-time, with >, >=, <, <= or A..B",
                            documentation_url=RUNS_DOC) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    start = math.floor(moment.timestamp())
    return start, start + 1


def _delivered_to(delivery, app_id: int) -> bool:
    """Whether a delivery went to this App's webhook (the target id header the sender set;
    a delivery sent with no App configured belongs to every App)."""
    target = delivery.request_headers.get("X-GitHub-Hook-Installation-Target-ID")
    return target in (None, "0", str(app_id))


def _hook_config(emu: Emulator) -> dict:
    return {
        "content_type": "json",
        "insecure_ssl": "0",
        "url": emu.sender.url or "",
        # GitHub never returns the secret itself.
        "secret": "********" if emu.sender.secret else None,
    }
