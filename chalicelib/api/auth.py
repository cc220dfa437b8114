"""Who is calling: the identity behind a request.

Deployed, API Gateway's Cognito authorizer has verified the token and passes its claims in
`requestContext.authorizer.claims` (`sub`, `cognito:username` or `email`, `cognito:groups`);
the API trusts them, because only API Gateway can invoke its function. Locally
(`api_auth = "local"`) the API verifies `Authorization: Bearer <JWT>` itself: RS256 against the
local stack's public key (an asymmetric key, as Cognito's: the API holds only the public half,
so nothing the API is configured with can mint a token), with Cognito's claims and checks:
`exp`, `iss`, `aud` (ID token) or `client_id` (access token), `token_use`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from chalicelib.api.permissions import Permission, Role, permissions_of, roles_of

ALGORITHM = "RS256"
ID_TOKEN, ACCESS_TOKEN = "id", "access"  # token kinds (`token_use`), not secrets
TOKEN_USES = (ID_TOKEN, ACCESS_TOKEN)
# Clock skew tolerated on `exp`/`iat`/`nbf`.
LEEWAY_S = 30


class Unauthenticated(Exception):
    """401: no token, or one that is invalid or expired (the reason says which)."""


@dataclass(frozen=True)
class Identity:
    sub: str
    username: str
    roles: tuple[Role, ...]
    permissions: frozenset[Permission]

    @property
    def role(self) -> Role | None:
        """The most powerful role (for the audit record and the page)."""
        return self.roles[0] if self.roles else None

    def may(self, permission: Permission) -> bool:
        return permission in self.permissions


def groups_of(claim: Any) -> list[str]:
    """`cognito:groups` as a list. JWTs carry a list; API Gateway REST hands the authorizer's
    claims to Lambda as strings, a list rendered `[admin viewer]` or `admin,viewer`."""
    if claim is None:
        return []
    if isinstance(claim, list | tuple):
        return [str(group) for group in claim]
    text = str(claim).strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
            if isinstance(parsed, list):
                return [str(group) for group in parsed]
        except ValueError:
            text = text.strip("[]")
    return [part for part in text.replace(",", " ").split() if part]


def identity_of(claims: dict[str, Any]) -> Identity:
    sub = claims.get("sub")
    if not sub:
        raise Unauthenticated("token has no subject (sub)")
    username = str(claims.get("cognito:username") or claims.get("username")
                   or claims.get("email") or sub)
    roles = roles_of(groups_of(claims.get("cognito:groups")))
    return Identity(sub=str(sub), username=username, roles=roles,
                    permissions=permissions_of(roles))


def bearer(headers: dict[str, str] | None) -> str | None:
    for name, value in (headers or {}).items():
        if name.lower() == "authorization" and value:
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("Authorization header is not 'Bearer <token>'")
            return token.strip()
    return None


def cognito_claims(event: dict[str, Any]) -> dict[str, Any] | None:
    context = event.get("requestContext") or {}
    claims = (context.get("authorizer") or {}).get("claims")
    return claims if isinstance(claims, dict) and claims else None


class LocalVerifier:
    """Verifies local tokens like Cognito's (RS256; expiry, issuer, audience, token use)."""

    def __init__(self, public_key_pem: str, issuer: str, audience: str) -> None:
        self._key = public_key_pem
        self._issuer = issuer
        self._audience = audience

    def claims(self, token: str) -> dict[str, Any]:
        import jwt

        try:
            claims = jwt.decode(
                token, self._key, algorithms=[ALGORITHM], issuer=self._issuer, leeway=LEEWAY_S,
                options={"require": ["exp", "iss", "sub", "token_use"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("token expired") from exc
        except jwt.InvalidIssuerError as exc:
            raise Unauthenticated("token issuer is not this API's") from exc
        except jwt.InvalidSignatureError as exc:
            raise Unauthenticated("token signature is not valid for this API's key") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"token lacks the {exc.claim!r} claim") from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"token is not valid: {type(exc).__name__}") from exc
        if claims.get("token_use") not in TOKEN_USES:
            raise Unauthenticated("token_use is neither 'id' nor 'access'")
        # ID tokens name the app client in `aud`, access tokens in `client_id`.
        audience = claims.get("aud") if claims["token_use"] == ID_TOKEN else claims.get("client_id")
        if audience != self._audience:
            raise Unauthenticated("token is for another audience")
        return claims


def authenticate(event: dict[str, Any], mode: str, verifier: LocalVerifier | None
                 ) -> Identity | None:
    """The caller's identity; None when the request carries no credentials at all;
    Unauthenticated when it carries bad ones."""
    if mode == "cognito":
        claims = cognito_claims(event)
        return identity_of(claims) if claims else None
    token = bearer(event.get("headers"))
    if token is None:
        return None
    if verifier is None:
        raise Unauthenticated("local tokens are not configured")
    return identity_of(verifier.claims(token))
