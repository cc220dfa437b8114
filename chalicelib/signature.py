"""GitHub webhook signatures: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>`."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable

from chalicelib.errors import SignatureRejected

SIGNATURE_HEADER = "x-hub-signature-256"
_SIGNATURE = re.compile(r"sha256=([0-9a-f]{64})")


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(header: str | None, body: bytes, secrets: Iterable[bytes]) -> int:
    """Check the signature against each secret (several during a rotation's overlap).

    Returns the index of the secret that matched; raises SignatureRejected otherwise. Every
    candidate is compared in constant time.
    """
    if not header:
        raise SignatureRejected("missing X-Hub-Signature-256 header")
    match = _SIGNATURE.fullmatch(header.strip())
    if not match:
        raise SignatureRejected("malformed X-Hub-Signature-256: expected sha256=<64 hex digits>")
    given = match.group(1).encode()
    matched = -1
    for index, secret in enumerate(secrets):
        expected = hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
        if hmac.compare_digest(expected, given) and matched < 0:
            matched = index
    if matched < 0:
        raise SignatureRejected("signature does not match any configured webhook secret")
    return matched
