"""Flask routes: GitHub's REST paths (under the optional GHES prefix), the runner protocol
(`/_runner/*`) and the test introspection endpoints (`/_emulator/*`). Routes only translate
HTTP to calls on the Emulator's parts; the rules live in state.py, auth.py and webhooks.py."""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from flask import Blueprint, Flask, Response, g, request
from pydantic import ValidationError

from .auth import InstallationToken
from .config import InstallationConfig
from .errors import BadRequest, GitHubError, NotFound, Unauthorized, Unprocessable
from .state import Scope
from .webhooks import _node_id, iso
from .workload import MAX_LABELS, WorkloadJob

if TYPE_CHECKING:
    from .server import Emulator

log = logging.getLogger(__name__)

INTERNAL_PREFIXES = ("/_emulator", "/_runner")
# Fields of the emulator's delivery records that GitHub's deliveries API does not have.
GROUND_TRUTH_FIELDS = ("job_id", "url", "sent_at", "fault")
API_VERSION = "2022-11-28"
RUNNERS_DOC = "https://docs.github.com/rest/actions/self-hosted-runners"
MAX_PER_PAGE = 100
DEFAULT_PER_PAGE = 30
# Flask's own cap on a request body; GitHub answers 413 above its limits too.
MAX_BODY_BYTES = 6 * 1024 * 1024
# What RunnerHub's App needs: self-hosted runners (org and repo) and reading jobs.
PERMISSIONS = {
    "organization_self_hosted_runners": "write",
    "actions": "read",
    "administration": "write",
    "metadata": "read",
}


def _json(data, status: int = 200, headers: dict | None = None) -> Response:
    body = "" if data is None else json.dumps(data)
    resp = Response(body, status=status, mimetype="application/json")
    resp.headers["Content-Type"] = "application/json; charset=utf-8"
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _body() -> dict:
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise BadRequest() from exc
    if not isinstance(data, dict):
        raise BadRequest()
    return data


def _paginate(items: list, key: str) -> Response:
    """GitHub's page/per_page pagination with a Link header."""
    per_page = _int_arg("per_page", DEFAULT_PER_PAGE, 1, MAX_PER_PAGE)
    page = _int_arg("page", 1, 1, 10**9)
    total = len(items)
    last = max(1, -(-total // per_page))
    chunk = items[(page - 1) * per_page : page * per_page]
    links = []

    def url(p: int) -> str:
        args = {k: v for k, v in request.args.items() if k not in ("page", "per_page")}
        args.update(per_page=per_page, page=p)
        return f"{request.base_url}?{urlencode(args)}"

    if page > 1:
        links.append(f'<{url(min(page - 1, last))}>; rel="prev"')
    if page < last:
        links.append(f'<{url(page + 1)}>; rel="next"')
        links.append(f'<{url(last)}>; rel="last"')
    if page > 1:
        links.append(f'<{url(1)}>; rel="first"')
    headers = {"Link": ", ".join(links)} if links else {}
    return _json({"total_count": total, key: chunk}, headers=headers)


def _int_arg(name: str, default: int, lo: int, hi: int) -> int:
    try:
        value = int(request.args.get(name, default))
    except ValueError:
        return default
    return max(lo, min(hi, value))


def create_app(emu: Emulator) -> Flask:
    app = Flask("emulator")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    prefix = emu.config.api_prefix
    app.register_blueprint(_github_blueprint(emu), url_prefix=prefix or None)
    for bp_factory, path in (
        (_runner_blueprint, "/_runner"),
        (_introspection_blueprint, "/_emulator"),
    ):
        # Served at the root and, for a GHES prefix, under it too, so `runner_url` may be
        # either the server root or base_url.
        app.register_blueprint(bp_factory(emu), url_prefix=path)
        if prefix:
            app.register_blueprint(
                bp_factory(emu), url_prefix=prefix + path, name=f"p{bp_factory.__name__}"
            )

    @app.errorhandler(GitHubError)
    def _github_error(exc: GitHubError):
        return _json(exc.body(), exc.status)

    @app.errorhandler(404)
    def _not_found(_exc):
        return _json(NotFound().body(), 404)

    @app.errorhandler(405)
    def _not_allowed(_exc):
        return _json(NotFound().body(), 404)

    @app.errorhandler(413)
    def _too_large(_exc):
        return _json({"message": "Payload too large", "status": "413"}, 413)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.error("unexpected error on %s %s", request.method, request.path, exc_info=True)
        return _json({"message": "Server Error", "status": "500"}, 500)

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
            return _json(body, refusal.status)
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
        return _json(fault.body(), fault.status)

    @app.after_request
    def _github_headers(resp: Response) -> Response:
        if internal():
            return resp
        fail_after = g.get("fail_after")
        if fail_after is not None:
            resp = _json(fail_after.body(), fail_after.status)
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


# -- GitHub REST ---------------------------------------------------------------------------


def _github_blueprint(emu: Emulator) -> Blueprint:
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
        return _json(
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
        return _json([installation_view(i, app_cfg.app_id) for i in app_cfg.installations])

    @bp.get("/app/installations/<int:installation_id>")
    def get_installation(installation_id: int):
        app_cfg = auth.require_app(request.headers.get("Authorization"))
        inst = auth.installation_for_app(app_cfg, installation_id)
        return _json(installation_view(inst, app_cfg.app_id))

    @bp.post("/app/installations/<int:installation_id>/access_tokens")
    def create_access_token(installation_id: int):
        app_cfg = auth.require_app(request.headers.get("Authorization"))
        inst = auth.installation_for_app(app_cfg, installation_id)
        body = _body()
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
        return _json(out, 201)

    @bp.get("/orgs/<org>/installation")
    def org_installation(org: str):
        app_cfg = auth.require_app(request.headers.get("Authorization"))
        inst = find_installation(
            app_cfg.app_id,
            lambda i: i.account.lower() == org.lower() and i.account_type == "Organization",
        )
        return _json(installation_view(inst, app_cfg.app_id))

    @bp.get("/users/<user>/installation")
    def user_installation(user: str):
        app_cfg = auth.require_app(request.headers.get("Authorization"))
        inst = find_installation(app_cfg.app_id, lambda i: i.account.lower() == user.lower())
        return _json(installation_view(inst, app_cfg.app_id))

    @bp.get("/repos/<owner>/<repo>/installation")
    def repo_installation(owner: str, repo: str):
        app_cfg = auth.require_app(request.headers.get("Authorization"))
        inst = find_installation(app_cfg.app_id, lambda i: i.covers(f"{owner}/{repo}"))
        return _json(installation_view(inst, app_cfg.app_id))

    # -- scope checks for installation-token endpoints --

    def org_scope(org: str) -> tuple[Scope, InstallationConfig]:
        caller = auth.require_installation(request.headers.get("Authorization"))
        inst = caller.installation
        if inst.account_type != "Organization" or inst.account.lower() != org.lower():
            raise NotFound(documentation_url=RUNNERS_DOC)
        return Scope("org", inst.account), inst

    def repo_scope(owner: str, repo: str) -> tuple[Scope, InstallationConfig]:
        caller = auth.require_installation(request.headers.get("Authorization"))
        full = f"{owner}/{repo}"
        if not _token_covers(caller.token, caller.installation, full):
            raise NotFound(documentation_url=RUNNERS_DOC)
        return Scope("repo", full), caller.installation

    def scope_of(kind: str, a: str, b: str | None):
        return org_scope(a) if kind == "org" else repo_scope(a, b)

    def group_for(inst: InstallationConfig, group_id) -> tuple[int, str, bool]:
        for group in inst.runner_groups:
            if group.id == group_id:
                return (group.id, group.name, group.allows_public_repositories)
        raise NotFound(documentation_url=RUNNERS_DOC)

    # -- runners, at org and repo scope (one set of views, two URL shapes) --

    def generate_jitconfig(kind, a, b=None):
        scope, inst = scope_of(kind, a, b)
        body = _body()
        name = body.get("name")
        group_id = body.get("runner_group_id")
        labels = body.get("labels")
        work_folder = body.get("work_folder", "_work")
        for field, value, ok in (
            ("name", name, isinstance(name, str) and name.strip()),
            (
                "runner_group_id",
                group_id,
                isinstance(group_id, int) and not isinstance(group_id, bool),
            ),
            ("labels", labels, isinstance(labels, list)),
        ):
            if value is None:
                raise Unprocessable(
                    f'Invalid request.\n\n"{field}" wasn\'t supplied.',
                    documentation_url=RUNNERS_DOC,
                )
            if not ok:
                raise Unprocessable(
                    f"Invalid request.\n\nFor 'properties/{field}', {json.dumps(value)} is not "
                    "valid.",
                    documentation_url=RUNNERS_DOC,
                )
        if not 1 <= len(labels) <= MAX_LABELS or not all(
            isinstance(x, str) and x.strip() for x in labels
        ):
            raise Unprocessable(
                f"Invalid request.\n\nFor 'properties/labels', labels must be 1 to {MAX_LABELS} "
                "non-empty strings.",
                documentation_url=RUNNERS_DOC,
            )
        if not isinstance(work_folder, str):
            raise Unprocessable(
                "Invalid request.\n\nFor 'properties/work_folder', it is not a string.",
                documentation_url=RUNNERS_DOC,
            )
        group = group_for(inst, group_id)
        runner, blob = emu.state.create_runner(
            scope, name, labels, group, work_folder=work_folder, ephemeral=True, jit=True,
            app_id=auth.installations[inst.id][0].app_id,
        )
        view = emu.state.runner(scope, runner.id)
        return _json({"runner": view, "encoded_jit_config": blob}, 201)

    def registration_token(kind, a, b=None, purpose="registration"):
        scope, _ = scope_of(kind, a, b)
        token = auth.issue_registration_token(purpose, (scope.kind, scope.name))
        return _json({"token": token.token, "expires_at": iso(token.expires_at)}, 201)

    def list_runners(kind, a, b=None):
        scope, _ = scope_of(kind, a, b)
        runners = emu.state.runners(scope)
        name = request.args.get("name")
        if name is not None:
            runners = [r for r in runners if r["name"] == name]
        return _paginate(runners, "runners")

    def get_runner(kind, a, b=None, runner_id=0):
        scope, _ = scope_of(kind, a, b)
        return _json(emu.state.runner(scope, runner_id))

    def delete_runner(kind, a, b=None, runner_id=0):
        scope, _ = scope_of(kind, a, b)
        emu.state.delete_runner(scope, runner_id)
        return Response(status=204)

    def labels(kind, a, b=None, runner_id=0, name=None):
        scope, _ = scope_of(kind, a, b)
        if request.method == "GET":
            out = emu.state.runner(scope, runner_id)["labels"]
        elif request.method == "DELETE":
            mode, names = ("remove", [name]) if name else ("set", [])
            out = emu.state.set_labels(scope, runner_id, names, mode)
        else:
            names = _body().get("labels")
            if (
                not isinstance(names, list)
                or not all(isinstance(n, str) for n in names)
                or (request.method == "POST" and not names)
                or len(names) > MAX_LABELS
            ):
                raise Unprocessable(
                    "Invalid request.\n\nFor 'properties/labels', it must be an array of "
                    f"up to {MAX_LABELS} strings.",
                    documentation_url=RUNNERS_DOC,
                )
            out = emu.state.set_labels(
                scope, runner_id, names, "add" if request.method == "POST" else "set"
            )
        return _json({"total_count": len(out), "labels": out})

    shapes = (("org", "/orgs/<a>"), ("repo", "/repos/<a>/<b>"))
    for kind, base in shapes:
        runners = f"{base}/actions/runners"

        def bind(view, kind=kind, **fixed):
            def handler(**kwargs):
                return view(kind, **fixed, **kwargs)

            return handler

        bp.add_url_rule(
            f"{runners}/generate-jitconfig",
            f"{kind}_jit",
            bind(generate_jitconfig),
            methods=["POST"],
        )
        bp.add_url_rule(
            f"{runners}/registration-token",
            f"{kind}_regtoken",
            bind(registration_token),
            methods=["POST"],
        )
        bp.add_url_rule(
            f"{runners}/remove-token",
            f"{kind}_rmtoken",
            bind(registration_token, purpose="remove"),
            methods=["POST"],
        )
        bp.add_url_rule(runners, f"{kind}_list", bind(list_runners), methods=["GET"])
        bp.add_url_rule(
            f"{runners}/<int:runner_id>", f"{kind}_get", bind(get_runner), methods=["GET"]
        )
        bp.add_url_rule(
            f"{runners}/<int:runner_id>", f"{kind}_delete", bind(delete_runner), methods=["DELETE"]
        )
        bp.add_url_rule(
            f"{runners}/<int:runner_id>/labels",
            f"{kind}_labels",
            bind(labels),
            methods=["GET", "POST", "PUT", "DELETE"],
        )
        bp.add_url_rule(
            f"{runners}/<int:runner_id>/labels/<name>",
            f"{kind}_label",
            bind(labels),
            methods=["DELETE"],
        )

    @bp.get("/orgs/<org>/actions/runner-groups")
    def runner_groups(org: str):
        _, inst = org_scope(org)
        groups = [
            {
                "id": g.id,
                "name": g.name,
                "visibility": "all",
                "default": g.id == 1,
                "allows_public_repositories": g.allows_public_repositories,
                "runners_url": f"{emu.base_url}/orgs/{org}/actions/runner-groups/{g.id}/runners",
            }
            for g in inst.runner_groups
        ]
        return _json({"total_count": len(groups), "runner_groups": groups})

    # -- jobs --

    @bp.get("/repos/<owner>/<repo>/actions/jobs/<int:job_id>")
    def get_job(owner: str, repo: str, job_id: int):
        caller = auth.require_installation(request.headers.get("Authorization"))
        full = f"{owner}/{repo}"
        not_found = NotFound(
            documentation_url="https://docs.github.com/rest/actions/workflow-jobs"
            "#get-a-job-for-a-workflow-run"
        )
        if not _token_covers(caller.token, caller.installation, full):
            raise not_found
        try:
            snap = emu.state.job_snapshot(job_id)
        except NotFound:
            raise not_found from None
        if snap["repository"].lower() != full.lower() or snap["status"] == "pending":
            raise not_found
        return _json(emu.builder.workflow_job(snap))

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
            "run_attempt": 1,
            "run_started_at": created,
            "repository": repo,
            "head_repository": repo,
        }

    def covered_repo(owner: str, repo: str) -> str:
        caller = auth.require_installation(request.headers.get("Authorization"))
        full = f"{owner}/{repo}"
        if not _token_covers(caller.token, caller.installation, full):
            raise NotFound(documentation_url=runs_doc)
        return full

    @bp.get("/installation/repositories")
    def installation_repositories():
        caller = auth.require_installation(request.headers.get("Authorization"))
        inst = caller.installation
        found: dict[str, dict] = {}
        for repo in emu.state.repositories():
            full = repo["full_name"]
            if _token_covers(caller.token, inst, full):
                found[full.lower()] = repository_view(full, repo["private"], repo["owner_type"],
                                                      repo["pushed_at"], repo["created_at"])
        for full in inst.repositories or ():
            # Selected repositories the workload never used: no activity yet.
            if full.lower() not in found and _token_covers(caller.token, inst, full):
                found[full.lower()] = repository_view(full, True, inst.account_type, None, None)
        # GitHub lists them by name, not by activity: a caller sorts them itself.
        return _paginate([found[key] for key in sorted(found)], "repositories")

    @bp.get("/repos/<owner>/<repo>/actions/runs")
    def workflow_runs(owner: str, repo: str):
        full = covered_repo(owner, repo)
        wanted = request.args.get("status")
        runs = [
            run for run in emu.state.workflow_runs(full)
            # GitHub's `status` filter takes a status or a conclusion.
            if wanted is None or wanted in (run["status"], run["conclusion"])
        ]
        return _paginate([run_view(full, run) for run in runs], "workflow_runs")

    @bp.get("/repos/<owner>/<repo>/actions/runs/<int:run_id>/jobs")
    def run_jobs(owner: str, repo: str, run_id: int):
        full = covered_repo(owner, repo)
        run = next((r for r in emu.state.workflow_runs(full) if r["run_id"] == run_id), None)
        if run is None:
            raise NotFound(documentation_url=runs_doc)
        return _paginate([emu.builder.workflow_job(snap) for snap in run["jobs"]], "jobs")

    # -- the App's webhook: config, deliveries, redelivery --

    @bp.get("/app/hook/config")
    def hook_config():
        auth.require_app(request.headers.get("Authorization"))
        return _json(_hook_config(emu))

    @bp.patch("/app/hook/config")
    def patch_hook_config():
        auth.require_app(request.headers.get("Authorization"))
        body = _body()
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
        return _json(_hook_config(emu))

    @bp.get("/app/hook/deliveries")
    def list_deliveries():
        app_cfg = auth.require_app(request.headers.get("Authorization"))
        per_page = _int_arg("per_page", DEFAULT_PER_PAGE, 1, MAX_PER_PAGE)
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
        return _json(out, headers=headers)

    @bp.get("/app/hook/deliveries/<int:delivery_id>")
    def get_delivery(delivery_id: int):
        app_cfg = auth.require_app(request.headers.get("Authorization"))
        delivery = emu.sender.delivery(delivery_id)
        if delivery is None or not _delivered_to(delivery, app_cfg.app_id):
            raise NotFound(documentation_url="https://docs.github.com/rest/apps/webhooks")
        detail = delivery.detail()
        for key in GROUND_TRUTH_FIELDS:
            if key != "url":  # GitHub's detail has the URL; its list does not
                detail.pop(key, None)
        return _json(detail)

    @bp.post("/app/hook/deliveries/<int:delivery_id>/attempts")
    def redeliver(delivery_id: int):
        app_cfg = auth.require_app(request.headers.get("Authorization"))
        delivery = emu.sender.delivery(delivery_id)
        if delivery is None or not _delivered_to(delivery, app_cfg.app_id):
            raise NotFound(documentation_url="https://docs.github.com/rest/apps/webhooks")
        if emu.sender.redeliver(delivery_id) is None:
            raise NotFound(documentation_url="https://docs.github.com/rest/apps/webhooks")
        return _json({}, 202)

    @bp.get("/rate_limit")
    def rate_limit():
        caller = auth.identify(request.headers.get("Authorization"), request.remote_addr)
        core = emu.rate_limits.status(caller)
        return _json({"resources": {"core": core}, "rate": core})

    @bp.get("/meta")
    def meta():
        return _json(
            {
                "verifiable_password_authentication": False,
                "installed_version": emu.config.ghes_version if emu.config.is_ghes else None,
            }
        )

    return bp


def _delivered_to(delivery, app_id: int) -> bool:
    """Whether a delivery went to this App's webhook (the target id header the sender set;
    a delivery sent with no App configured belongs to every App)."""
    target = delivery.request_headers.get("X-GitHub-Hook-Installation-Target-ID")
    return target in (None, "0", str(app_id))


def _token_covers(token: InstallationToken, inst: InstallationConfig, full: str) -> bool:
    if not inst.covers(full):
        return False
    return token.repositories is None or full.lower() in token.repositories


def _hook_config(emu: Emulator) -> dict:
    return {
        "content_type": "json",
        "insecure_ssl": "0",
        "url": emu.sender.url or "",
        # GitHub never returns the secret itself.
        "secret": "********" if emu.sender.secret else None,
    }


# -- runner protocol -------------------------------------------------------------------------


def _runner_blueprint(emu: Emulator) -> Blueprint:
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
        body = _body()
        os_name = str(body.get("os", "Linux"))
        if "jitconfig" in body:
            if not isinstance(body["jitconfig"], str):
                raise BadRequest("invalid JIT config")
            return _json(state.register_jit(body["jitconfig"], os_name), 201)
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
        return _json(out, 201)

    @bp.post("/poll")
    def poll():
        sess = session()
        body = _body()
        timeout = body.get("timeout_s", emu.config.poll_timeout_s)
        if not isinstance(timeout, int | float) or timeout < 0:
            raise Unprocessable("timeout_s must be a non-negative number")
        offer = state.poll(sess, min(float(timeout), emu.config.poll_timeout_s))
        if offer is None:
            return Response(status=204)
        return _json({"job": offer})

    @bp.post("/acquire")
    def acquire():
        sess = session()
        return _json({"job": state.acquire(sess, job_id_of(_body()))})

    @bp.post("/heartbeat")
    def heartbeat():
        sess = session()
        return _json(state.heartbeat(sess, job_id_of(_body())))

    @bp.post("/complete")
    def complete():
        sess = session()
        body = _body()
        conclusion = body.get("conclusion")
        if not isinstance(conclusion, str) or not conclusion:
            raise Unprocessable("conclusion (string) is required")
        return _json(state.complete(sess, job_id_of(body), conclusion))

    @bp.post("/disconnect")
    def disconnect():
        state.disconnect(session())
        return Response(status=204)

    return bp


# -- introspection for tests -----------------------------------------------------------------


def _introspection_blueprint(emu: Emulator) -> Blueprint:
    bp = Blueprint("introspection", __name__)

    @bp.get("/health")
    def health():
        return _json({"ok": True, "base_url": emu.base_url, "runner_url": emu.runner_url})

    @bp.get("/jobs")
    def jobs():
        return _json({"jobs": emu.jobs()})

    @bp.post("/jobs")
    def add_job():
        try:
            spec = WorkloadJob.model_validate(_body())
        except ValidationError as exc:
            raise Unprocessable(_errors(exc)) from None
        job_id = emu.add_job(spec)
        return _json(emu.job(job_id), 201)

    @bp.get("/jobs/<int:job_id>")
    def job(job_id: int):
        return _json(emu.job(job_id))

    @bp.post("/jobs/<int:job_id>/cancel")
    def cancel(job_id: int):
        return _json(emu.cancel_job(job_id))

    @bp.post("/jobs/<int:job_id>/approve")
    def approve(job_id: int):
        emu.approve_job(job_id)
        return _json(emu.job(job_id))

    @bp.get("/deliveries")
    def deliveries():
        return _json({"deliveries": emu.deliveries()})

    @bp.get("/deliveries/<int:delivery_id>")
    def delivery(delivery_id: int):
        found = emu.sender.delivery(delivery_id)
        if found is None:
            raise NotFound()
        return _json(found.detail())

    @bp.get("/runners")
    def runners():
        return _json({"runners": emu.runners()})

    @bp.get("/stats")
    def stats():
        # GitHub's own counts: JIT configs issued per App id (JSON keys are strings).
        issued = emu.state.jit_issued()
        return _json({"jit_configs": {str(app): n for app, n in issued.items()},
                      "jit_configs_total": sum(issued.values())})

    @bp.post("/workload")
    def workload():
        try:
            ids = emu.load_workload(_body())
        except ValidationError as exc:
            raise Unprocessable(_errors(exc)) from None
        if request.args.get("start", "true").lower() not in ("0", "false", "no"):
            emu.run_workload()
        return _json({"job_ids": ids}, 201)

    @bp.post("/workload/start")
    def workload_start():
        emu.run_workload()
        return _json(emu.workload_status())

    @bp.get("/workload")
    def workload_status():
        return _json(emu.workload_status())

    @bp.put("/webhook")
    def webhook():
        body = _body()
        emu.set_webhook(url=body.get("url"), secret=body.get("secret"))
        return _json({"url": emu.sender.url})

    @bp.post("/flush")
    def flush():
        timeout = min(float(request.args.get("timeout", 10)), 60.0)
        return _json({"flushed": emu.sender.flush(timeout)})

    @bp.get("/faults")
    def faults_report():
        return _json(emu.faults_report())

    @bp.put("/faults")
    def set_faults():
        try:
            emu.set_faults(_body())
        except ValidationError as exc:
            raise Unprocessable(_errors(exc)) from None
        return _json(emu.faults_report())

    @bp.post("/faults/reset")
    def reset_faults():
        emu.faults.reset()
        return _json(emu.faults_report())

    @bp.get("/time")
    def now():
        return _json({"time": emu.clock.wall(), "iso": datetime.now(UTC).isoformat()})

    return bp


def _errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
