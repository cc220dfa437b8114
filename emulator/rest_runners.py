"""GitHub REST: self-hosted runners at organization and repository scope (JIT configs,
registration and remove tokens, list, get, delete, labels) and the organization's runner
groups, with the installation-token scope checks they share."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from flask import Blueprint, Response, request

from .errors import NotFound, Unprocessable
from .responses import paginate, read_body, reply
from .state import Scope
from .webhooks import iso
from .workload import MAX_LABELS

if TYPE_CHECKING:
    from .config import InstallationConfig
    from .server import Emulator

RUNNERS_DOC = "https://docs.github.com/rest/actions/self-hosted-runners"


def add_runner_routes(bp: Blueprint, emu: Emulator) -> None:
    """Add the runner routes to the GitHub blueprint (one set of views, two URL shapes)."""
    auth = emu.auth

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
        if not caller.covers(full):
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
        body = read_body()
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
        return reply({"runner": view, "encoded_jit_config": blob}, 201)

    def registration_token(kind, a, b=None, purpose="registration"):
        scope, _ = scope_of(kind, a, b)
        token = auth.issue_registration_token(purpose, (scope.kind, scope.name))
        return reply({"token": token.token, "expires_at": iso(token.expires_at)}, 201)

    def list_runners(kind, a, b=None):
        scope, _ = scope_of(kind, a, b)
        runners = emu.state.runners(scope)
        name = request.args.get("name")
        if name is not None:
            runners = [r for r in runners if r["name"] == name]
        return paginate(runners, "runners")

    def get_runner(kind, a, b=None, runner_id=0):
        scope, _ = scope_of(kind, a, b)
        return reply(emu.state.runner(scope, runner_id))

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
            names = read_body().get("labels")
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
        return reply({"total_count": len(out), "labels": out})

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
        return reply({"total_count": len(groups), "runner_groups": groups})

