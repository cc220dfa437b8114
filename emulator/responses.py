"""HTTP helpers shared by the emulator's routes: JSON answers, request bodies and GitHub's
page/per_page pagination."""

from __future__ import annotations

import json
from urllib.parse import urlencode

from flask import Response, request

from .errors import BadRequest

MAX_PER_PAGE = 100
DEFAULT_PER_PAGE = 30


def reply(data, status: int = 200, headers: dict | None = None) -> Response:
    body = "" if data is None else json.dumps(data)
    resp = Response(body, status=status, mimetype="application/json")
    resp.headers["Content-Type"] = "application/json; charset=utf-8"
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def read_body() -> dict:
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


def paginate(items: list, key: str, reachable: int | None = None) -> Response:
    """GitHub's page/per_page pagination with a Link header. `reachable`: a search's cap
    (only its first N items can be paged to; `total_count` still counts them all)."""
    per_page = int_arg("per_page", DEFAULT_PER_PAGE, 1, MAX_PER_PAGE)
    page = int_arg("page", 1, 1, 10**9)
    total = len(items)
    if reachable is not None:
        items = items[:reachable]
    last = max(1, -(-len(items) // per_page))
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
    return reply({"total_count": total, key: chunk}, headers=headers)


def int_arg(name: str, default: int, lo: int, hi: int) -> int:
    try:
        value = int(request.args.get(name, default))
    except ValueError:
        return default
    return max(lo, min(hi, value))
