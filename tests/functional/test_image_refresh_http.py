"""The image refresh's handler against the local AWS (moto server over HTTP: ECR, DynamoDB) and
the management API over HTTP: a scan event becomes a proposal, an operator reads and approves it
(the image override, audited with before and after), a pool that opted in gets the newer image
applied by the refresh itself (actor runnerhub-image-refresh), and refusals change nothing."""

from __future__ import annotations

import hashlib
import json

import pytest
import requests

from chalicelib import aws
from chalicelib.api.audit import DynamoAuditLog
from chalicelib.api.pages import Cursors
from chalicelib.api.tokens import new_key_pair
from chalicelib.image_refresh import (
    ACTOR,
    DynamoProposalStore,
    EcrImages,
    ImageRefresh,
    Propose,
    Refused,
)
from chalicelib.overrides import DynamoOverrideStore
from chalicelib.pools import load_pools
from devstack.api_seed import ApiStack

ACCOUNT, REGION = "123456789012", "us-east-1"
REPOSITORY = "runnerhub/runner-linux-small"  # the repository of ApiStack's pool `linux`
V1 = "/api/v1"


@pytest.fixture(scope="module")
def api(local_aws, tmp_path_factory):
    private = tmp_path_factory.mktemp("refresh-keys") / "api.pem"
    public = new_key_pair(private)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", local_aws.endpoint_url)
        stack = ApiStack(tmp_path_factory.mktemp("refresh-api"), (private.read_bytes(), public))
        stack.start()
        ecr = aws.client("ecr", aws.UNLABELLED)
        ecr.create_repository(repositoryName=REPOSITORY,
                              imageScanningConfiguration={"scanOnPush": True})
        yield stack, ecr
        stack.stop()


def push(ecr, version: str) -> str:
    # moto's digest is a hash of the layers' digests: one layer per version, so each differs.
    layer = {"digest": "sha256:" + hashlib.sha256(version.encode()).hexdigest(), "size": 1,
             "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip"}
    manifest = json.dumps({"schemaVersion": 2, "mediaType":
                           "application/vnd.docker.distribution.manifest.v2+json",
                           "config": layer, "layers": [layer]})
    return ecr.put_image(repositoryName=REPOSITORY, imageManifest=manifest,
                         imageTag=version)["image"]["imageId"]["imageDigest"]


def scan_event(digest: str, **counts: int) -> dict:
    return {"version": "0", "detail-type": "ECR Image Scan", "source": "aws.ecr",
            "account": ACCOUNT, "region": REGION, "resources": [], "detail": {
                "scan-status": "COMPLETE", "repository-name": REPOSITORY,
                "image-digest": digest, "finding-severity-counts": counts}}


def refresh(stack, auto_update: bool) -> ImageRefresh:
    client = aws.client("dynamodb", "image_refresh")
    pools = [p.model_copy(update={"image_auto_update": auto_update})
             for p in load_pools(stack.settings.pools_file).pools]
    return ImageRefresh(
        pools=pools, overrides=DynamoOverrideStore(client, stack.names["runners_table"]),
        proposals=DynamoProposalStore(client, stack.names["runners_table"]),
        audit=DynamoAuditLog(client, stack.names["audit_table"], Cursors(ACTOR)),
        ecr=EcrImages(aws.client("ecr", "image_refresh")))


def call(stack, method, path, role, body=None):
    return requests.request(method, stack.url + V1 + path, json=body, timeout=10,
                            headers={"Authorization": f"Bearer {stack.token(role)}"})


def test_proposed_approved_then_applied_by_an_opted_in_pool(api):
    stack, ecr = api
    assert call(stack, "GET", "/pools/linux/image-proposal", "viewer").status_code == 404

    # A clean image of a newer runner: proposed (the pool has not opted in).
    first = push(ecr, "2.330.0")
    (decision,) = refresh(stack, auto_update=False).handle(scan_event(first, LOW=2))
    assert isinstance(decision, Propose)
    proposal = call(stack, "GET", "/pools/linux/image-proposal", "viewer").json()
    image = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/{REPOSITORY}@{first}"
    assert proposal["image"] == image and proposal["runner_version"] == "2.330.0"
    assert proposal["scan"] == {"counts": {"LOW": 2}, "status": "COMPLETE"}
    assert proposal["current_image"] == "runnerhub/runner-linux-small:local"

    # Approving needs the digest shown (a stale one is 409) and the permission (viewer 403).
    assert call(stack, "POST", "/pools/linux/image-proposal/approve", "viewer",
                {"digest": first}).status_code == 403
    stale = call(stack, "POST", "/pools/linux/image-proposal/approve", "operator",
                 {"digest": "sha256:" + "0" * 64})
    assert stale.status_code == 409 and first in stale.text
    approved = call(stack, "POST", "/pools/linux/image-proposal/approve", "operator",
                    {"digest": first})
    assert approved.status_code == 200, approved.text
    assert approved.json()["effective"]["image"] == image
    assert call(stack, "GET", "/pools/linux/image-proposal", "viewer").status_code == 404
    assert call(stack, "GET", "/pools/linux", "viewer").json()["effective"]["image"] == image

    # Refusals change nothing: the same image again, a newer one with a HIGH finding.
    (again,) = refresh(stack, auto_update=True).handle(scan_event(first))
    assert isinstance(again, Refused) and again.reason == "already_current"
    second = push(ecr, "2.331.0")
    (dirty,) = refresh(stack, auto_update=True).handle(scan_event(second, HIGH=1))
    assert isinstance(dirty, Refused) and dirty.reason == "scan_findings"
    older = push(ecr, "2.329.0")  # the pool runs 2.330.0 (its image's tag, read from ECR)
    (behind,) = refresh(stack, auto_update=True).handle(scan_event(older))
    assert isinstance(behind, Refused) and behind.reason == "not_newer"
    assert call(stack, "GET", "/pools/linux", "viewer").json()["effective"]["image"] == image

    # The pool opted in: the clean newer image is applied by the refresh itself.
    (applied,) = refresh(stack, auto_update=True).handle(scan_event(second))
    assert type(applied).__name__ == "Apply"
    newer = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/{REPOSITORY}@{second}"
    pool = call(stack, "GET", "/pools/linux", "viewer").json()
    assert pool["effective"]["image"] == newer and pool["overrides"]["changed_by"] == ACTOR

    # Audited with before and after: the approval (operator), the refresh's own change.
    records = call(stack, "GET", "/audit?limit=100", "admin").json()["records"]
    by_action = {r["action"]: r for r in reversed(records)  # newest first: the latest wins
                 if r["target"] == "pool:linux" and r["outcome"] == "ok"}
    assert by_action["approve_image_proposal"]["username"] == "operator-user"
    assert by_action["approve_image_proposal"]["change"] == {
        "image_before": None, "image_after": image}
    assert by_action["set_image"]["sub"] == ACTOR
    assert by_action["set_image"]["change"] == {"image_before": image, "image_after": newer}
    assert by_action["propose_image"]["sub"] == ACTOR


def test_set_image_is_admin_only_validated_and_audited(api):
    stack, _ = api
    body = {"image": "runnerhub/runner-linux-small:2.330.0"}
    assert call(stack, "PUT", "/pools/linux/image", "operator", body).status_code == 403
    bad = call(stack, "PUT", "/pools/linux/image", "admin", {"image": "Not An Image"})
    assert bad.status_code == 422 and "whitespace" in bad.text
    assert call(stack, "PUT", "/pools/nope/image", "admin", body).status_code == 404
    done = call(stack, "PUT", "/pools/linux/image", "admin", body)
    assert done.status_code == 200 and done.json()["overrides"]["image"] == body["image"]
    cleared = call(stack, "PUT", "/pools/linux/image", "admin", {"image": None})
    assert cleared.json()["effective"]["image"] == "runnerhub/runner-linux-small:local"
    records = call(stack, "GET", "/audit?limit=100", "admin").json()["records"]
    changes = [r["change"] for r in records if r["action"] == "set_image"
               and r["username"] == "admin-user"]
    assert {"image_before": body["image"], "image_after": None} in changes
