"""The image gate against the local AWS (moto server over HTTP): repositories, pushed images and
their digests, scan findings as ECR's DescribeImageScanFindings returns them.

What moto lacks, and how the tests make up for it: scan on push does not scan (moto scans only
on StartImageScan, which the tests call to play the push's scan); findings are what the test
sets through moto's API (`/moto-api/static/ecr/scan-finding-results`), basic scanning's shape
only (the enhanced shape is checked with botocore's Stubber in tests/unit/test_image_scan.py);
a scan never stays IN_PROGRESS unless set so; a set result answers one way of naming the image
(tag or digest) and moto's legacy default (one HIGH "CVE-9999-9999") answers the others.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import requests

from chalicelib import aws
from executor.containers import ContainerStartFailed
from executor.image_scan import EcrScans, ImageGate

ACCOUNT, REGION = "123456789012", "us-east-1"  # moto's account; tests/conftest.py's region
REGISTRY = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"


@pytest.fixture
def ecr(aws_endpoint):
    """The executor's client (its calls are checked against its role: tests/infra)."""
    return aws.client("ecr", aws.EXECUTOR)


@pytest.fixture
def admin(aws_endpoint):
    """Whoever pushes images: set-up, not a deployable."""
    return aws.client("ecr", aws.UNLABELLED)


def push(admin, repository: str, tag: str, scanned: bool = True) -> str:
    """An image in `repository` (created with scan on push); its digest."""
    admin.create_repository(repositoryName=repository,
                          imageScanningConfiguration={"scanOnPush": True})
    manifest = json.dumps({"schemaVersion": 2, "mediaType":
                           "application/vnd.docker.distribution.manifest.v2+json",
                           "config": {"digest": "sha256:" + hashlib.sha256(
                               repository.encode()).hexdigest()}, "layers": []})
    image = admin.put_image(repositoryName=repository, imageManifest=manifest, imageTag=tag)
    if scanned:  # moto does not scan on push: play the push's scan
        admin.start_image_scan(repositoryName=repository, imageId={"imageTag": tag})
    return image["image"]["imageId"]["imageDigest"]


def set_findings(endpoint: str, repository: str, digest: str, status: str,
                 findings: list[dict], asked_as: int = 1) -> None:
    """moto answers each way of naming the image (by tag, by digest) with the next result set
    for it, and its legacy default (one HIGH finding) after: one result per way it is asked."""
    counts: dict[str, int] = {}
    for finding in findings:
        counts[finding["severity"]] = counts.get(finding["severity"], 0) + 1
    result = {"registryId": ACCOUNT, "repositoryName": repository,
              "imageId": {"imageDigest": digest},
              "imageScanStatus": {"status": status, "description": f"scan {status}"},
              "imageScanFindings": {"findings": findings, "findingSeverityCounts": counts}}
    answer = requests.post(f"{endpoint}/moto-api/static/ecr/scan-finding-results",
                           json={"results": [result] * asked_as, "region": REGION}, timeout=5)
    answer.raise_for_status()


def finding(name: str, severity: str, package: str, version: str) -> dict:
    return {"name": name, "severity": severity, "uri": f"https://cve.example/{name}",
            "attributes": [{"key": "package_name", "value": package},
                           {"key": "package_version", "value": version}]}


class Counted:
    """The gate's ECR client, counting DescribeImageScanFindings calls on the wire."""

    def __init__(self, ecr) -> None:
        self.calls = 0
        ecr.meta.events.register("before-send.ecr.DescribeImageScanFindings", self._count)
        self.scans = EcrScans(ecr)

    def _count(self, **_) -> None:
        self.calls += 1


def test_a_high_finding_refuses_the_image_once_and_the_cache_answers_after(
        ecr, admin, aws_endpoint, unique):
    repository = f"runnerhub/bad-{unique}"
    digest = push(admin, repository, "v1")
    set_findings(aws_endpoint, repository, digest, "COMPLETE", [
        finding("CVE-2024-6387", "HIGH", "openssh-client", "1:9.2p1-2"),
        finding("CVE-2023-0001", "LOW", "zlib1g", "1:1.2.13"),
    ])
    counted = Counted(ecr)
    gate = ImageGate("HIGH", scans=lambda: counted.scans)
    image = f"{REGISTRY}/{repository}@{digest}"
    for _ in range(3):
        with pytest.raises(ContainerStartFailed) as refused:
            gate.check(image)
    assert "1 HIGH; worst: CVE-2024-6387 (HIGH, openssh-client 1:9.2p1-2)" in refused.value.reason
    assert counted.calls == 1  # cached per digest: later starts ask ECR nothing


def test_low_findings_pass_and_a_tag_resolves_to_the_pushed_digest(ecr, admin, aws_endpoint,
                                                                   unique):
    repository = f"runnerhub/ok-{unique}"
    digest = push(admin, repository, "v2")
    set_findings(aws_endpoint, repository, digest, "COMPLETE",
                 [finding("CVE-2023-0002", "LOW", "libc6", "2.36-9")], asked_as=2)
    counted = Counted(ecr)
    gate = ImageGate("HIGH", scans=lambda: counted.scans)
    verdict = gate.check(f"{REGISTRY}/{repository}:v2")
    assert verdict.allowed and verdict.digest == digest and "worst LOW" in verdict.reason
    gate.check(f"{REGISTRY}/{repository}@{digest}")
    assert counted.calls == 1
    # The same image at a stricter limit is refused.
    with pytest.raises(ContainerStartFailed, match="CVE-2023-0002"):
        ImageGate("LOW", scans=lambda: counted.scans).check(f"{REGISTRY}/{repository}@{digest}")


def test_an_image_never_scanned_is_refused_unless_pending_scans_are_allowed(ecr, admin, unique):
    repository = f"runnerhub/unscanned-{unique}"
    digest = push(admin, repository, "v1", scanned=False)
    image = f"{REGISTRY}/{repository}@{digest}"
    with pytest.raises(ContainerStartFailed, match="has no scan in ECR; not started"):
        ImageGate("HIGH", scans=lambda: EcrScans(ecr)).check(image)
    assert ImageGate("HIGH", "allow", scans=lambda: EcrScans(ecr)).check(image).allowed


def test_a_scan_in_progress_is_refused_and_asked_again(ecr, admin, aws_endpoint, unique):
    repository = f"runnerhub/scanning-{unique}"
    digest = push(admin, repository, "v1")
    set_findings(aws_endpoint, repository, digest, "IN_PROGRESS", [])
    counted = Counted(ecr)
    gate = ImageGate("HIGH", scans=lambda: counted.scans)
    for _ in range(2):
        with pytest.raises(ContainerStartFailed, match="is IN_PROGRESS"):
            gate.check(f"{REGISTRY}/{repository}@{digest}")
    assert counted.calls == 2


def test_a_repository_ecr_does_not_have_is_refused_with_ecrs_reason(ecr, unique):
    image = f"{REGISTRY}/runnerhub/missing-{unique}@sha256:{'0' * 64}"
    with pytest.raises(ContainerStartFailed, match="RepositoryNotFoundException"):
        ImageGate("HIGH", "allow", scans=lambda: EcrScans(ecr)).check(image)
