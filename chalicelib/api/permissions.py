"""Roles, permissions, and the one table of what each route needs.

Roles are Cognito groups (deployed) or the `cognito:groups` claim of a local token. A caller in
several groups has the union of their permissions; a group that is no role gives none.
`ROUTES` maps (method, path template) to the permission the route needs: `PUBLIC` routes need no
token; `SIGNED_IN` routes need a valid token and nothing more. api_app.py checks every route it
serves is in this table (and the table has no route it does not serve) at import.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    VIEWER = "viewer"


class Permission(StrEnum):
    READ = "read"  # pools, jobs, runners, hosts, analytics, health details, metrics
    READ_AUDIT = "read:audit"  # the audit log (who did what, from where: personal data)
    ACT_HOSTS = "act:hosts"  # drain a host
    ACT_RUNNERS = "act:runners"  # retire an idle runner
    ACT_JOBS = "act:jobs"  # retry a flagged job
    ACT_WARM = "act:warm"  # a pool's warm target
    ACT_POOLS = "act:pools"  # a pool's host minimum and maximum
    ACT_WEBHOOKS = "act:webhooks"  # redeliver a webhook delivery
    # Set a pool's runner image to any reference: what runs on every host, so admin only.
    ACT_IMAGES = "act:images"
    # Approve the image refresh's proposal: an image the pipeline built into the pool's own
    # repository and whose scan passed (chalicelib/image_refresh.py), so operators too.
    ACT_IMAGE_PROPOSALS = "act:image-proposals"


PUBLIC = "public"
SIGNED_IN = "signed-in"

ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.VIEWER: frozenset({Permission.READ}),
    Role.OPERATOR: frozenset({Permission.READ, Permission.READ_AUDIT, Permission.ACT_HOSTS,
                              Permission.ACT_RUNNERS, Permission.ACT_JOBS, Permission.ACT_WARM,
                              Permission.ACT_IMAGE_PROPOSALS}),
    Role.ADMIN: frozenset(Permission),
}

PREFIX = "/api/v1"
# (method, path template) -> what the route needs. Templates as API Gateway writes them.
ROUTES: dict[tuple[str, str], Permission | str] = {
    ("GET", f"{PREFIX}/health"): PUBLIC,  # shallow without a token; details with READ
    ("GET", f"{PREFIX}/health/details"): Permission.READ,  # the same details, deployed too
    ("GET", f"{PREFIX}/openapi.json"): PUBLIC,
    # The page and how it signs in: they load before anyone has a token (chalicelib/api/
    # dashboard.py); every figure on the page comes from the routes below, with the token.
    ("GET", f"{PREFIX}/dashboard"): PUBLIC,
    ("GET", f"{PREFIX}/dashboard/config"): PUBLIC,
    ("GET", f"{PREFIX}/me"): SIGNED_IN,
    ("GET", f"{PREFIX}/metrics"): Permission.READ,
    ("GET", f"{PREFIX}/pools"): Permission.READ,
    ("GET", f"{PREFIX}/pools/{{pool}}"): Permission.READ,
    ("PUT", f"{PREFIX}/pools/{{pool}}/warm"): Permission.ACT_WARM,
    ("PUT", f"{PREFIX}/pools/{{pool}}/hosts"): Permission.ACT_POOLS,
    ("PUT", f"{PREFIX}/pools/{{pool}}/image"): Permission.ACT_IMAGES,
    ("GET", f"{PREFIX}/pools/{{pool}}/image-proposal"): Permission.READ,
    ("POST", f"{PREFIX}/pools/{{pool}}/image-proposal/approve"): Permission.ACT_IMAGE_PROPOSALS,
    ("GET", f"{PREFIX}/jobs"): Permission.READ,
    ("GET", f"{PREFIX}/jobs/{{job_id}}"): Permission.READ,
    ("POST", f"{PREFIX}/jobs/{{job_id}}/retry"): Permission.ACT_JOBS,
    ("GET", f"{PREFIX}/runners"): Permission.READ,
    ("POST", f"{PREFIX}/runners/{{runner_name}}/retire"): Permission.ACT_RUNNERS,
    ("GET", f"{PREFIX}/hosts"): Permission.READ,
    ("POST", f"{PREFIX}/hosts/{{host_id}}/drain"): Permission.ACT_HOSTS,
    ("POST", f"{PREFIX}/deliveries/{{delivery_id}}/redeliver"): Permission.ACT_WEBHOOKS,
    ("GET", f"{PREFIX}/audit"): Permission.READ_AUDIT,
    ("GET", f"{PREFIX}/analytics"): Permission.READ,
}


def roles_of(groups: list[str] | tuple[str, ...]) -> tuple[Role, ...]:
    """The roles among `groups` (unknown groups ignored), most powerful first."""
    known = {group.strip().lower() for group in groups}
    return tuple(role for role in Role if role.value in known)


def permissions_of(roles: tuple[Role, ...]) -> frozenset[Permission]:
    found: set[Permission] = set()
    for role in roles:
        found |= ROLE_PERMISSIONS[role]
    return frozenset(found)


def needed(method: str, template: str) -> Permission | str:
    """What the route needs; KeyError for a route missing from the table (a bug: fail closed)."""
    return ROUTES[(method.upper(), template)]
