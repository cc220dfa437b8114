"""GitHub App authentication: App JWTs, installation tokens, runner registration tokens. The
per-identity rate-limit counters behind the `x-ratelimit-*` headers live in rate_limits.py
(they can be enforced); `RateLimits` is their old name here."""

from __future__ import annotations

import secrets
import string
import threading
import time
from dataclasses import dataclass

import jwt

from .config import AppConfig, EmulatorConfig, InstallationConfig
from .errors import NotFound, Unauthorized, Unprocessable
from .rate_limits import RateLimiter as RateLimits  # noqa: F401 (the name tests and callers use)

# GitHub refuses App JWTs that live longer than 10 minutes.
MAX_JWT_LIFETIME_S = 600
# GitHub tolerates some clock drift on `iat`; its docs suggest back-dating it by 60 s.
IAT_DRIFT_S = 60

MSG_BAD_JWT = "A JSON web token could not be decoded"
MSG_EXPIRED = (
    "'Expiration time' claim ('exp') must be a numeric value representing the future time at "
    "which the assertion expires"
)
MSG_TOO_FAR = "'Expiration time' claim ('exp') is too far in the future"
MSG_IAT = (
    "'Issued at' claim ('iat') must be an Integer representing the time that the assertion "
    "was issued"
)
MSG_REQUIRES_AUTH = "Requires authentication"

_ALNUM = string.ascii_letters + string.digits


def _random(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


@dataclass(frozen=True)
class InstallationToken:
    token: str
    app_id: int
    installation_id: int
    expires_at: float
    # None = every repository the installation can see.
    repositories: frozenset[str] | None


@dataclass(frozen=True)
class RegistrationToken:
    token: str
    kind: str  # "registration" or "remove"
    scope: tuple[str, str]  # ("org", login) or ("repo", "owner/name")
    expires_at: float


@dataclass
class Caller:
    """Who made a request, as far as rate limiting and permission checks care."""

    kind: str  # "installation", "app" or "anonymous"
    key: str
    app: AppConfig | None = None
    installation: InstallationConfig | None = None
    token: InstallationToken | None = None

    def covers(self, full_name: str) -> bool:
        """Whether an installation caller's token reaches this repository: the installation
        sees it and the token was not narrowed to other repositories."""
        if self.installation is None or not self.installation.covers(full_name):
            return False
        return self.token is None or self.token.repositories is None or (
            full_name.lower() in self.token.repositories
        )


class Auth:
    """Verifies credentials the way GitHub does and issues the tokens GitHub would."""

    def __init__(self, config: EmulatorConfig, clock=time.time):
        self.config = config
        self.clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, InstallationToken] = {}
        self._reg_tokens: dict[str, RegistrationToken] = {}
        self.apps: dict[int, AppConfig] = {app.app_id: app for app in config.apps}
        self.installations: dict[int, tuple[AppConfig, InstallationConfig]] = {}
        for app in config.apps:
            for inst in app.installations:
                self.installations[inst.id] = (app, inst)

    # -- App JWT ---------------------------------------------------------------------------

    def verify_app_jwt(self, encoded: str) -> AppConfig:
        try:
            unverified = jwt.decode(encoded, options={"verify_signature": False})
            header = jwt.get_unverified_header(encoded)
        except jwt.PyJWTError as exc:
            raise Unauthorized(MSG_BAD_JWT) from exc
        if header.get("alg") != "RS256":
            raise Unauthorized(MSG_BAD_JWT)
        app = self._app_for_issuer(unverified.get("iss"))
        if app is None:
            raise Unauthorized(MSG_BAD_JWT)
        try:
            claims = jwt.decode(
                encoded,
                app.public_key_pem,
                algorithms=["RS256"],
                # GitHub's own claim checks follow, with GitHub's messages.
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )
        except jwt.PyJWTError as exc:
            raise Unauthorized(MSG_BAD_JWT) from exc
        now = self.clock()
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(iat, int | float) or iat > now + IAT_DRIFT_S:
            raise Unauthorized(MSG_IAT)
        if not isinstance(exp, int | float) or exp <= now:
            raise Unauthorized(MSG_EXPIRED)
        if exp - iat > MAX_JWT_LIFETIME_S or exp > now + MAX_JWT_LIFETIME_S + IAT_DRIFT_S:
            raise Unauthorized(MSG_TOO_FAR)
        return app

    def _app_for_issuer(self, iss) -> AppConfig | None:
        # GitHub accepts the App id (int or numeric string) and, since 2024, the client id.
        if isinstance(iss, int) or (isinstance(iss, str) and iss.isdigit()):
            return self.apps.get(int(iss))
        if isinstance(iss, str):
            return next((a for a in self.apps.values() if a.client_id == iss), None)
        return None

    # -- installation tokens ------------------------------------------------------------------

    def installation_for_app(self, app: AppConfig, installation_id: int) -> InstallationConfig:
        found = self.installations.get(installation_id)
        if found is None or found[0].app_id != app.app_id:
            raise NotFound(
                documentation_url="https://docs.github.com/rest/apps/apps"
                "#create-an-installation-access-token-for-an-app"
            )
        return found[1]

    def issue_installation_token(
        self, app: AppConfig, installation: InstallationConfig, repositories: list[str] | None
    ) -> InstallationToken:
        scoped = None
        if repositories:
            scoped = set()
            for name in repositories:
                full = name if "/" in name else f"{installation.account}/{name}"
                if not installation.covers(full):
                    raise Unprocessable(
                        "There is at least one repository that does not exist or is not "
                        "accessible to the parent installation.",
                        documentation_url="https://docs.github.com/rest/apps/apps"
                        "#create-an-installation-access-token-for-an-app",
                    )
                scoped.add(full.lower())
        token = InstallationToken(
            token="ghs_" + _random(_ALNUM, 36),
            app_id=app.app_id,
            installation_id=installation.id,
            expires_at=self.clock() + self.config.installation_token_ttl_s,
            repositories=frozenset(scoped) if scoped is not None else None,
        )
        with self._lock:
            self._tokens[token.token] = token
        return token

    def verify_installation_token(self, value: str) -> InstallationToken:
        with self._lock:
            token = self._tokens.get(value)
        if token is None or token.expires_at <= self.clock():
            raise Unauthorized()
        return token

    # -- request identity -----------------------------------------------------------------

    def identify(self, authorization: str | None, remote_addr: str | None) -> Caller:
        """Who the caller claims to be, for rate limiting; raises nothing."""
        credential = _credential(authorization)
        if credential:
            with self._lock:
                token = self._tokens.get(credential)
            if token is not None:
                app, inst = self.installations[token.installation_id]
                return Caller("installation", f"inst:{inst.id}", app, inst, token)
            if credential.count(".") == 2:
                try:
                    iss = jwt.decode(credential, options={"verify_signature": False}).get("iss")
                except jwt.PyJWTError:
                    iss = None
                app = self._app_for_issuer(iss)
                if app is not None:
                    return Caller("app", f"app:{app.app_id}", app)
        return Caller("anonymous", f"ip:{remote_addr}")

    def require_app(self, authorization: str | None) -> AppConfig:
        credential = _credential(authorization)
        if not credential:
            raise Unauthorized(MSG_REQUIRES_AUTH)
        if credential.startswith("ghs_"):
            # An installation token on an App endpoint: GitHub wants a JWT here.
            raise Unauthorized(MSG_BAD_JWT)
        return self.verify_app_jwt(credential)

    def require_installation(self, authorization: str | None) -> Caller:
        credential = _credential(authorization)
        if not credential:
            raise Unauthorized(MSG_REQUIRES_AUTH)
        token = self.verify_installation_token(credential)
        app, inst = self.installations[token.installation_id]
        return Caller("installation", f"inst:{inst.id}", app, inst, token)

    # -- runner registration tokens ---------------------------------------------------------

    def issue_registration_token(self, kind: str, scope: tuple[str, str]) -> RegistrationToken:
        token = RegistrationToken(
            token=_random(string.ascii_uppercase + string.digits, 29),
            kind=kind,
            scope=scope,
            expires_at=self.clock() + 3600,
        )
        with self._lock:
            self._reg_tokens[token.token] = token
        return token

    def check_registration_token(self, value: str) -> RegistrationToken | None:
        with self._lock:
            token = self._reg_tokens.get(value)
        if token is None or token.kind != "registration" or token.expires_at <= self.clock():
            return None
        return token


def _credential(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() not in ("bearer", "token") or not value.strip():
        return None
    return value.strip()
