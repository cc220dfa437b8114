"""Local tokens: the local stack's RS256 key pair, and tokens with Cognito's claims.

    python -m chalicelib.api.tokens --new-key F          # writes F (private) and F.pub
    python -m chalicelib.api.tokens --role viewer [--key F] [--ttl 3600] [--sub S]

Prints the token. The API verifies it with F.pub (RUNNERHUB_API_JWT_PUBLIC_KEY_FILE).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

from chalicelib.api.auth import ALGORITHM, ID_TOKEN
from chalicelib.api.permissions import Role
from chalicelib.api.settings import LOCAL_AUDIENCE, LOCAL_ISSUER

DEFAULT_KEY = Path(".runnerhub") / "api-jwt.pem"


def public_path(private: Path) -> Path:
    return private.with_name(private.name + ".pub")


def new_key_pair(private: Path) -> Path:
    """Write a fresh RSA key pair (private key 0600); returns the public key's path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public = public_path(private)
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return public


def ensure_key_pair(private: Path) -> Path:
    """The key pair at `private` (made when absent); returns the public key's path."""
    if not private.is_file() or not public_path(private).is_file():
        return new_key_pair(private)
    return public_path(private)


def mint(private_key_pem: str | bytes, *, groups: list[str] | None, sub: str | None = None,
         username: str | None = None, ttl_s: float = 3600, now: float | None = None,
         issuer: str = LOCAL_ISSUER, audience: str = LOCAL_AUDIENCE,
         token_use: str = ID_TOKEN, extra: dict | None = None) -> str:
    """A signed token with Cognito's claims. `groups` None leaves `cognito:groups` out."""
    import jwt

    now = time.time() if now is None else now
    sub = sub or str(uuid.uuid4())
    claims = {"sub": sub, "iss": issuer, "token_use": token_use, "iat": int(now),
              "exp": int(now + ttl_s), "cognito:username": username or sub,
              "aud" if token_use == ID_TOKEN else "client_id": audience}
    if groups is not None:
        claims["cognito:groups"] = groups
    claims.update(extra or {})
    return jwt.encode(claims, private_key_pem, algorithm=ALGORITHM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key", type=Path, default=DEFAULT_KEY, help="private key (PEM)")
    parser.add_argument("--new-key", type=Path, help="write a new key pair here and exit")
    parser.add_argument("--role", choices=[role.value for role in Role])
    parser.add_argument("--sub", help="the subject (default: a new uuid)")
    parser.add_argument("--username", help="cognito:username (default: the role's name)")
    parser.add_argument("--ttl", type=float, default=3600.0, help="seconds it is valid")
    args = parser.parse_args(argv)
    if args.new_key:
        print(new_key_pair(args.new_key))
        return 0
    if not args.role:
        parser.error("--role is required (or --new-key)")
    if args.ttl <= 0:
        parser.error("--ttl must be positive")
    try:
        pem = args.key.read_bytes()
    except OSError as exc:
        print(f"cannot read the private key {args.key}: {exc.strerror}; make one with "
              f"--new-key {args.key}", file=sys.stderr)
        return 2
    print(mint(pem, groups=[args.role], sub=args.sub, username=args.username or args.role,
               ttl_s=args.ttl))
    return 0


if __name__ == "__main__":
    sys.exit(main())
