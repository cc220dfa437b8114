"""X-Hub-Signature-256 checks: good, wrong, rotation, missing, sha1, truncated, tampered."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from chalicelib.errors import SignatureRejected
from chalicelib.signature import sign, verify

BODY = b'{"action":"queued"}'
OLD, NEW = b"old-secret", b"new-secret"


def test_good_signature_matches_first_secret():
    assert verify(sign(OLD, BODY), BODY, [OLD]) == 0


def test_rotation_secret_matches_second_secret():
    assert verify(sign(NEW, BODY), BODY, [OLD, NEW]) == 1


def test_wrong_secret_rejected():
    with pytest.raises(SignatureRejected, match="does not match"):
        verify(sign(b"other", BODY), BODY, [OLD, NEW])


@pytest.mark.parametrize("header", [None, ""])
def test_missing_signature_rejected(header):
    with pytest.raises(SignatureRejected, match="missing"):
        verify(header, BODY, [OLD])


def test_sha1_signature_rejected_as_malformed():
    sha1 = "sha1=" + hmac.new(OLD, BODY, hashlib.sha1).hexdigest()
    with pytest.raises(SignatureRejected, match="malformed"):
        verify(sha1, BODY, [OLD])


def test_truncated_signature_rejected():
    with pytest.raises(SignatureRejected, match="malformed"):
        verify(sign(OLD, BODY)[:-2], BODY, [OLD])


def test_no_prefix_rejected():
    with pytest.raises(SignatureRejected, match="malformed"):
        verify(sign(OLD, BODY).removeprefix("sha256="), BODY, [OLD])


def test_tampered_body_rejected():
    with pytest.raises(SignatureRejected, match="does not match"):
        verify(sign(OLD, BODY), BODY.replace(b"queued", b"complet"), [OLD])


def test_no_secrets_configured_rejects_everything():
    with pytest.raises(SignatureRejected):
        verify(sign(OLD, BODY), BODY, [])


def test_rejection_message_never_contains_the_secret():
    with pytest.raises(SignatureRejected) as info:
        verify(sign(b"x", BODY), BODY, [OLD])
    assert OLD.decode() not in str(info.value)
