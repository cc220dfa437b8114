"""Runner images that stay current (chalicelib/image_refresh.py, chalicelib/overrides.py): the
image override's reference check, the refresh's decision (each refusal by name), and the event
parsing. Pure: no AWS."""

from __future__ import annotations

import pytest

from chalicelib.image_refresh import (
    REFUSALS,
    Apply,
    BuiltImage,
    Proposal,
    Propose,
    Refused,
    Scan,
    decide,
    pools_of,
    runner_version_of,
    scan_of_event,
)
from chalicelib.overrides import (
    MemoryOverrideStore,
    OverrideRejected,
    PoolOverrides,
    effective,
    effective_image,
    image_error,
)
from chalicelib.pools import Pool

REGISTRY = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
OLD, NEW, OTHER = "sha256:" + "1" * 64, "sha256:" + "2" * 64, "sha256:" + "3" * 64
CURRENT = f"{REGISTRY}/runnerhub/linux-small@{OLD}"


def pool(**fields) -> Pool:
    return Pool(name="linux-small", labels=["self-hosted", "linux"], scope={"owner": "acme"},
                image=CURRENT, **fields)


def built(digest=NEW, version="2.330.0", status="COMPLETE", **counts) -> BuiltImage:
    return BuiltImage(REGISTRY, "runnerhub/linux-small", digest, version, Scan(status, counts))


@pytest.mark.parametrize("image", [
    f"{REGISTRY}/runnerhub/linux-small@{NEW}", "runnerhub/runner-linux-small:local",
    "localhost:5000/a/b:v1.2", f"repo:tag@{NEW}", "ghcr.io/actions/actions-runner:2.330.0",
])
def test_image_references_accepted(image):
    assert image_error(image) is None


@pytest.mark.parametrize("image, says", [
    ("", "non-empty"), ("runnerhub/runner", "no tag or digest"), (" repo:x", "whitespace"),
    ("Repo:x", "not an image reference"), ("repo@sha256:abc", "not an image reference"),
    ("repo:-x", "not an image reference"), ("a" * 300 + ":x", "longer than 255 characters"),
    ("repo:x; rm -rf /", "whitespace"),
])
def test_bad_image_references_say_why(image, says):
    assert says in image_error(image)


def test_the_store_refuses_a_bad_image_and_an_unknown_field():
    store = MemoryOverrideStore()
    with pytest.raises(OverrideRejected, match="no tag or digest"):
        store.set("linux-small", {"image": "runnerhub/runner"}, "me", 1.0)
    with pytest.raises(ValueError, match="unknown override"):
        store.set("linux-small", {"imagez": "a:b"}, "me", 1.0)
    assert store.get("linux-small") == PoolOverrides()


def test_effective_image_is_the_override_else_the_pools_files():
    store = MemoryOverrideStore()
    assert effective_image(pool(), None) == CURRENT
    before, after = store.set("linux-small", {"image": f"repo@{NEW}"}, "me", 1.0)
    assert before.image is None and after.image == f"repo@{NEW}" and after.version == 1
    assert effective_image(pool(), after) == f"repo@{NEW}"
    assert effective(pool(), after, 0.0).image == f"repo@{NEW}"
    # Other overrides keep the image; clearing it goes back to the file's.
    _, after = store.set("linux-small", {"warm_runners": 1}, "me", 2.0)
    assert after.image == f"repo@{NEW}"
    _, after = store.set("linux-small", {"image": None}, "me", 3.0)
    assert effective_image(pool(), after) == CURRENT


def test_a_clean_newer_image_is_proposed_and_applied_when_the_pool_opted_in():
    decision = decide(pool(), CURRENT, "2.320.0", built(), None, 50.0)
    assert isinstance(decision, Propose)
    proposal = decision.proposal
    assert proposal.image == f"{REGISTRY}/runnerhub/linux-small@{NEW}"
    assert (proposal.runner_version, proposal.found_at, proposal.current_image) == (
        "2.330.0", 50.0, CURRENT)
    assert isinstance(decide(pool(image_auto_update=True), CURRENT, "2.320.0", built(), None,
                             50.0), Apply)
    # Findings below the threshold do not refuse; the summary keeps them.
    decision = decide(pool(), CURRENT, None, built(MEDIUM=3, LOW=1), None, 50.0)
    assert isinstance(decision, Propose) and decision.proposal.scan_counts == {"MEDIUM": 3,
                                                                               "LOW": 1}


def test_an_opted_in_pool_running_an_untagged_digest_gets_a_proposal_not_an_apply():
    """Its running version is unknown, so the image may be older (a rescan): a person
    decides."""
    decision = decide(pool(image_auto_update=True), CURRENT, None, built(), None, 50.0)
    assert isinstance(decision, Propose)


def _refusal(*args, **kwargs) -> str:
    decision = decide(*args, **kwargs)
    assert isinstance(decision, Refused), decision
    return decision.reason


def test_refused_scan_incomplete():
    assert _refusal(pool(), CURRENT, "2.320.0", built(status="FAILED"), None, 1.0) == \
        "scan_incomplete"


def test_refused_scan_findings_at_or_above_the_threshold():
    assert _refusal(pool(), CURRENT, "2.320.0", built(HIGH=1), None, 1.0) == "scan_findings"
    assert _refusal(pool(), CURRENT, "2.320.0", built(CRITICAL=2), None, 1.0) == "scan_findings"
    # The threshold is configurable: CRITICAL only lets a HIGH through.
    assert isinstance(decide(pool(), CURRENT, "2.320.0", built(HIGH=1), None, 1.0,
                             max_severity="CRITICAL"), Propose)
    # An opted-in pool is refused the same way: auto-update never skips the scan.
    assert _refusal(pool(image_auto_update=True), CURRENT, None, built(HIGH=1), None,
                    1.0) == "scan_findings"


def test_refused_no_runner_version():
    assert _refusal(pool(), CURRENT, None, built(version=None), None, 1.0) == \
        "no_runner_version"


def test_refused_already_current():
    assert _refusal(pool(), CURRENT, None, built(digest=OLD), None, 1.0) == "already_current"


def test_refused_already_proposed():
    pending = Proposal("linux-small", "x", "runnerhub/linux-small", NEW, "2.330.0", 1.0,
                       "COMPLETE", {}, CURRENT)
    assert _refusal(pool(), CURRENT, None, built(), pending, 2.0) == "already_proposed"
    # A different digest replaces an older proposal.
    assert isinstance(decide(pool(), CURRENT, None, built(digest=OTHER), pending, 2.0), Propose)


def test_refused_not_newer():
    assert _refusal(pool(), CURRENT, "2.330.0", built(), None, 1.0) == "not_newer"
    assert _refusal(pool(), CURRENT, "2.331.0", built(), None, 1.0) == "not_newer"
    # Numbers, not strings: 2.330.0 is newer than 2.99.0.
    assert isinstance(decide(pool(), CURRENT, "2.99.0", built(), None, 1.0), Propose)


def test_every_refusal_named_is_tested():
    tested = {"scan_incomplete", "scan_findings", "no_runner_version", "already_current",
              "already_proposed", "not_newer"}
    assert set(REFUSALS) == tested


def test_runner_version_from_tags_and_pools_of_a_repository():
    assert runner_version_of(["latest", "2.329.0", "v2.330.0"]) == "2.330.0"
    assert runner_version_of(["latest"]) is None
    local = Pool(name="local", labels=["x"], scope={"owner": "acme"},
                 image="runnerhub/linux-small:local")
    other = Pool(name="other", labels=["y"], scope={"owner": "acme"},
                 image=f"{REGISTRY}/runnerhub/gpu@{OLD}")
    assert [p.name for p in pools_of([pool(), local, other], "runnerhub/linux-small")] == [
        "linux-small", "local"]


def scan_event(**detail) -> dict:
    return {"detail-type": "ECR Image Scan", "source": "aws.ecr", "account": "123456789012",
            "region": "eu-west-1", "detail": {
                "scan-status": "COMPLETE", "repository-name": "runnerhub/linux-small",
                "image-digest": NEW, "image-tags": ["2.330.0"],
                "finding-severity-counts": {"LOW": 1}} | detail}


def test_scan_event_parsed_and_bad_events_named():
    registry, repository, digest, scan, _ = scan_of_event(scan_event())
    assert (registry, repository, digest) == (REGISTRY, "runnerhub/linux-small", NEW)
    assert scan == Scan("COMPLETE", {"LOW": 1})
    with pytest.raises(ValueError, match="image-digest"):
        scan_of_event(scan_event(**{"image-digest": None}))
    with pytest.raises(ValueError, match="malformed image-digest"):
        scan_of_event(scan_event(**{"image-digest": "sha256:xyz"}))
    with pytest.raises(ValueError, match="finding-severity-counts"):
        scan_of_event(scan_event(**{"finding-severity-counts": {"HIGH": -1}}))
    with pytest.raises(ValueError, match="no detail"):
        scan_of_event({"detail-type": "ECR Image Scan"})


def test_image_auto_update_is_a_strict_boolean():
    with pytest.raises(ValueError, match="boolean"):
        pool(image_auto_update="yes")
    assert pool().image_auto_update is False
