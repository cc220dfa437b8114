"""The management API's Lambda (its own function and role): routes and wiring only.

Logic is in chalicelib/api/. Every route is in chalicelib/api/permissions.ROUTES with the
permission it needs. Order of checks: the token (401, before anything else is read), then the
request's validation (422), then the route's permission (403, audited), then the route.

    handler(event, context)     # API Gateway REST proxy event (devstack/api_server.py locally)
"""

from __future__ import annotations

import base64
import json
import threading
from typing import Annotated, Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError
from aws_lambda_powertools.event_handler.openapi.models import HTTPBearer
from aws_lambda_powertools.event_handler.openapi.params import Path, Query

from chalicelib.api import models
from chalicelib.api.actions import Caller
from chalicelib.api.audit import new_record
from chalicelib.api.auth import Identity, Unauthenticated, authenticate
from chalicelib.api.errors import ApiError, Forbidden, Unauthorized
from chalicelib.api.permissions import PREFIX, PUBLIC, ROUTES, SIGNED_IN, Permission, needed
from chalicelib.api.service import ApiService
from chalicelib.api.views import JobFilter
from chalicelib.errors import DependencyUnavailable
from chalicelib.jobs import JobState
from chalicelib.pools import POOL_NAME_PATTERN

logger = Logger(service="runnerhub-api")
app = APIGatewayRestResolver(enable_validation=True)

_service: ApiService | None = None
_lock = threading.Lock()


def service() -> ApiService:
    """The container's service, built from settings on first use."""
    global _service
    if _service is None:
        with _lock:
            if _service is None:
                from chalicelib.api.service import aws_autoscaling, build
                from chalicelib.api.settings import ApiSettings

                settings = ApiSettings()
                _service = build(settings, autoscaling=(
                    aws_autoscaling() if settings.stage != "local" else None))
    return _service


def use(built: ApiService | None) -> None:
    """Replace (or with None, forget) the service: tests and the local server wire their own."""
    global _service
    _service = built


# --- errors: one JSON body for all ---

def _error(status: int, kind: str, message: str, permission: str | None = None) -> Response:
    body = models.ErrorBody(status=status, error=kind, message=message, permission=permission)
    return Response(status_code=status, content_type="application/json",
                    body=body.model_dump_json())


@app.exception_handler(ApiError)
def _api_error(exc: ApiError) -> Response:
    return _error(exc.status, exc.kind, exc.message, getattr(exc, "permission", None))


@app.exception_handler(RequestValidationError)
def _invalid(exc: RequestValidationError) -> Response:
    # powertools' own 422 leaves out `msg`, which the document's ValidationError requires
    # (found by benchmarks/fuzz_api.py): answer the documented shape. pydantic's message names
    # the rule broken (no code, no file), so the caller can tell what to fix.
    return _unprocessable([{"loc": list(error["loc"]), "msg": str(error["msg"]),
                            "type": error["type"]} for error in exc.errors()])


def _unprocessable(detail: list[dict[str, Any]]) -> Response:
    return Response(status_code=422, content_type="application/json",
                    body=json.dumps({"statusCode": 422, "detail": detail}))


def _undecodable(event: dict) -> bool:
    """A base64 body that is not UTF-8 text: powertools' body parsing would raise (a 500)."""
    body = event.get("body")
    if not body or not event.get("isBase64Encoded"):
        return False
    try:
        base64.b64decode(body, validate=True).decode("utf-8")
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        return True
    return False


@app.exception_handler(DependencyUnavailable)
def _unavailable(exc: DependencyUnavailable) -> Response:
    logger.warning("dependency unavailable: %s", exc)
    return _error(503, "unavailable", f"a dependency is unavailable: {exc}")


@app.not_found
def _not_found(_: Exception) -> Response:
    return _error(404, "not_found", "no such route")


def _errors(*codes: int) -> dict[int, dict[str, Any]]:
    descriptions = {400: "bad cursor", 401: "no valid token", 403: "missing permission",
                    404: "not found", 409: "wrong state or out of limits",
                    503: "a dependency is unavailable"}
    return {code: {"description": descriptions[code],
                   "content": {"application/json": {"model": models.ErrorBody}}}
            for code in codes}


def _answers(model: type, *codes: int) -> dict[int, dict[str, Any]]:
    """The route's responses: 200 with `model` (given explicitly: powertools leaves the 200 out
    of the document when a route lists its other responses) and its errors."""
    return {200: {"description": "OK", "content": {"application/json": {"model": model}}},
            **_errors(*codes)}


READ = (401, 403, 503)
ACT = (401, 403, 404, 409, 503)


# --- who is calling, and may they ---

def _caller() -> Caller:
    identity: Identity = app.context["identity"]
    event = app.current_event
    return Caller(identity=identity, source_ip=_source_ip(event.raw_event),
                  user_agent=event.headers.get("user-agent") or event.headers.get("User-Agent"))


def _source_ip(event: dict) -> str | None:
    return ((event.get("requestContext") or {}).get("identity") or {}).get("sourceIp")


def _authorize(app: APIGatewayRestResolver, next_middleware):
    route = app.context["_route"]
    if (route.method.upper(), route.openapi_path) not in ROUTES:
        # No route matched: powertools runs the middlewares around its 404 handler too, with
        # the request's own path as the template. Every served route is in ROUTES
        # (tests/unit/test_api_core.py), so nothing is served here: let the 404 answer.
        return next_middleware(app)
    need = needed(route.method, route.openapi_path)
    identity: Identity | None = app.context.get("identity")
    if need == PUBLIC:
        return next_middleware(app)
    if identity is None:  # the handler answers 401 first; kept for a caller of resolve()
        raise Unauthorized("a valid token is required")
    if need == SIGNED_IN or identity.may(Permission(need)):
        return next_middleware(app)
    reason = f"role {identity.role.value if identity.role else '(none)'} lacks {need}"
    service().audit.append(new_record(
        now=service().clock(), action=f"{route.method} {route.openapi_path}",
        target=app.current_event.path, outcome="denied", reason=reason, sub=identity.sub,
        username=identity.username, role=identity.role.value if identity.role else None,
        source_ip=_source_ip(app.current_event.raw_event),
        user_agent=app.current_event.headers.get("user-agent")))
    raise Forbidden(f"permission {need} required ({reason})", permission=str(need))


app.use(middlewares=[_authorize])


def handler(event: dict, context: Any) -> dict:
    try:
        identity = authenticate(event, service().settings.api_auth, service().verifier)
        problem = None
    except Unauthenticated as exc:
        identity, problem = None, str(exc)
    public = ROUTES.get(((event.get("httpMethod") or "").upper(), event.get("path") or ""))
    if identity is None and public != PUBLIC:
        logger.info("unauthenticated request refused", extra={"path": event.get("path"),
                                                              "reason": problem})
        response = _error(401, "unauthorized", problem or "a valid token is required")
        return {"statusCode": 401, "headers": {"Content-Type": "application/json",
                                               "WWW-Authenticate": "Bearer"},
                "body": response.body, "isBase64Encoded": False}
    if _undecodable(event):
        answer = _unprocessable([{"loc": ["body"], "msg": "the body is not UTF-8 text",
                                  "type": "json_invalid"}])
        return {"statusCode": 422, "headers": {"Content-Type": "application/json"},
                "body": answer.body, "isBase64Encoded": False}
    app.append_context(identity=identity)
    return app.resolve(event, context)


# --- routes ---

PoolName = Annotated[str, Path(pattern=POOL_NAME_PATTERN, max_length=40)]
# No `#`: the router's path segments cannot hold it (a documented value must be routable).
Name = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$")]
# At most 2**53 - 1: the document writes the bound as a float, exact only up to 2**53 (with
# 2**63 - 1 it allowed ids the route refused: benchmarks/fuzz_api.py); also the largest id a
# JavaScript client (the dashboard) holds exactly. GitHub's ids are far below it.
Id = Annotated[int, Path(ge=1, le=2**53 - 1)]
Limit = Annotated[int, Query(ge=1, le=1000, description="items a page")]
CursorQ = Annotated[str | None, Query(max_length=4096, description="`next_cursor` of a page")]


@app.get(f"{PREFIX}/health", responses=_answers(models.Health, 503))
def health() -> models.Health:
    identity: Identity | None = app.context.get("identity")
    if identity is not None and identity.may(Permission.READ):
        return service().health.deep()
    return service().health.shallow()


@app.get(f"{PREFIX}/health/details", responses=_answers(models.Health, *READ))
def health_details() -> models.Health:
    """Each dependency's state, always (deployed, `/health` has no authorizer: API Gateway
    passes it no token, so its answer there is the shallow one)."""
    return service().health.deep()


@app.get(f"{PREFIX}/openapi.json", include_in_schema=False)
def openapi() -> Response[str]:
    return Response(status_code=200, content_type="application/json", body=openapi_document())


@app.get(f"{PREFIX}/dashboard", include_in_schema=False)
def dashboard_page() -> Response[str]:
    from chalicelib.api import dashboard

    return Response(status_code=200, content_type="text/html; charset=utf-8",
                    body=dashboard.page(), headers=dashboard.headers(service().settings))


@app.get(f"{PREFIX}/dashboard/config", include_in_schema=False)
def dashboard_config() -> Response[str]:
    from chalicelib.api import dashboard

    return Response(status_code=200, content_type="application/json",
                    body=dashboard.config(service().settings).model_dump_json(),
                    headers={"Cache-Control": "no-store"})


@app.get(f"{PREFIX}/me", responses=_answers(models.Me, 401))
def me() -> models.Me:
    identity: Identity = app.context["identity"]
    return models.Me(sub=identity.sub, username=identity.username,
                     role=identity.role.value if identity.role else None,
                     roles=[r.value for r in identity.roles],
                     permissions=sorted(p.value for p in identity.permissions))


@app.get(f"{PREFIX}/metrics", responses={
    200: {"description": "Prometheus text exposition format",
          "content": {"text/plain": {"schema": {"type": "string"}}}}, **_errors(*READ)})
def metrics() -> Response[str]:
    return Response(status_code=200, content_type="text/plain; version=0.0.4; charset=utf-8",
                    body=service().health.metrics())


@app.get(f"{PREFIX}/pools", responses=_answers(models.PoolList, *READ))
def pools() -> models.PoolList:
    return service().views.pool_views()


@app.get(f"{PREFIX}/pools/<pool>", responses=_answers(models.PoolView, 401, 403, 404, 503))
def pool(pool: PoolName) -> models.PoolView:
    return service().views.pool_view(pool)


@app.put(f"{PREFIX}/pools/<pool>/warm", responses=_answers(models.OverridesResult, *ACT))
def set_warm(pool: PoolName, change: models.WarmChange) -> models.OverridesResult:
    return service().actions.set_warm(_caller(), pool, change)


@app.put(f"{PREFIX}/pools/<pool>/hosts", responses=_answers(models.OverridesResult, *ACT))
def set_hosts(pool: PoolName, change: models.HostsChange) -> models.OverridesResult:
    return service().actions.set_hosts(_caller(), pool, change)


@app.put(f"{PREFIX}/pools/<pool>/image", responses=_answers(models.OverridesResult, *ACT))
def set_image(pool: PoolName, change: models.ImageChange) -> models.OverridesResult:
    return service().actions.set_image(_caller(), pool, change)


@app.get(f"{PREFIX}/pools/<pool>/image-proposal",
         responses=_answers(models.ImageProposal, 401, 403, 404, 503))
def image_proposal(pool: PoolName) -> models.ImageProposal:
    return service().actions.image_proposal(pool)


@app.post(f"{PREFIX}/pools/<pool>/image-proposal/approve",
          responses=_answers(models.OverridesResult, *ACT))
def approve_image_proposal(pool: PoolName, approval: models.ApproveProposal
                           ) -> models.OverridesResult:
    return service().actions.approve_proposal(_caller(), pool, approval)


@app.get(f"{PREFIX}/jobs", responses=_answers(models.JobPage, 400, 401, 403, 503))
def jobs(state: Annotated[JobState | None, Query()] = None,
         pool: Annotated[str | None, Query(max_length=40)] = None,
         repository: Annotated[str | None, Query(max_length=200)] = None,
         since: Annotated[float | None, Query(ge=0, le=1e11)] = None,
         until: Annotated[float | None, Query(ge=0, le=1e11)] = None,
         limit: Limit = 50, cursor: CursorQ = None) -> models.JobPage:
    where = JobFilter(state=state, pool=pool, repository=repository, since=since, until=until)
    return service().views.jobs(where, min(limit, service().settings.api_max_page), cursor)


@app.get(f"{PREFIX}/jobs/<job_id>", responses=_answers(models.JobDetail, 401, 403, 404, 503))
def job(job_id: Id) -> models.JobDetail:
    return service().views.job(job_id)


@app.post(f"{PREFIX}/jobs/<job_id>/retry", responses=_answers(models.ActionResult, *ACT))
def retry_job(job_id: Id) -> models.ActionResult:
    return service().actions.retry_job(_caller(), job_id)


@app.get(f"{PREFIX}/runners", responses=_answers(models.RunnerPage, 400, 401, 403, 503))
def runners(pool: Annotated[str | None, Query(max_length=40)] = None,
            state: Annotated[str | None, Query(pattern="^(starting|idle|busy|gone)$")] = None,
            limit: Limit = 50, cursor: CursorQ = None) -> models.RunnerPage:
    return service().views.runners(pool, state, min(limit, service().settings.api_max_page),
                                   cursor)


@app.post(f"{PREFIX}/runners/<runner_name>/retire",
          responses=_answers(models.ActionResult, *ACT))
def retire_runner(runner_name: Name) -> models.ActionResult:
    return service().actions.retire_runner(_caller(), runner_name)


@app.get(f"{PREFIX}/hosts", responses=_answers(models.HostList, *READ))
def hosts() -> models.HostList:
    return service().views.hosts()


@app.post(f"{PREFIX}/hosts/<host_id>/drain", responses=_answers(models.ActionResult, *ACT))
def drain_host(host_id: Name) -> models.ActionResult:
    return service().actions.drain_host(_caller(), host_id)


@app.post(f"{PREFIX}/deliveries/<delivery_id>/redeliver",
          responses=_answers(models.ActionResult, *ACT))
def redeliver(delivery_id: Id) -> models.ActionResult:
    return service().actions.redeliver(_caller(), delivery_id)


@app.get(f"{PREFIX}/audit", responses=_answers(models.AuditPage, 400, 401, 403, 503))
def audit(limit: Limit = 50, cursor: CursorQ = None) -> models.AuditPage:
    records, next_cursor = service().audit.page(
        min(limit, service().settings.api_max_page), cursor, service().clock())
    return models.AuditPage(records=records, next_cursor=next_cursor)


@app.get(f"{PREFIX}/analytics", responses=_answers(models.Analytics, 401, 403, 404, 503))
def analytics(pool: Annotated[str, Query(max_length=40)],
              window_s: Annotated[float, Query(ge=60, le=31 * 86400)] = 86400.0
              ) -> models.Analytics:
    return service().views.analytics(pool, window_s)


_document: list[str] = []


def openapi_document() -> str:
    """The OpenAPI document, generated once from the routes' models."""
    if not _document:
        _document.append(app.get_openapi_json_schema(
            title="RunnerHub management API", version="1",
            security_schemes={"bearer": HTTPBearer(bearerFormat="JWT")},
            security=[{"bearer": []}]))
    return _document[0]


def _served_routes() -> set[tuple[str, str]]:
    spec = json.loads(openapi_document())
    found = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    # Routes left out of the document: the document itself and the page.
    return found | {("GET", f"{PREFIX}/openapi.json"), ("GET", f"{PREFIX}/dashboard"),
                    ("GET", f"{PREFIX}/dashboard/config")}
