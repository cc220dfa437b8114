"""Refuse a runner image whose ECR scan found what the host may not run (docs/security.md).

In AWS every runner image comes from an ECR repository with scan on push
(infra/runnerhub_infra/ecr.py). Before a runner starts, `ImageGate.check` reads the scan of the
pool's image (ECR `DescribeImageScanFindings`, by digest: pools files name digests) and raises
`ContainerStartFailed` when it found anything at or above `RUNNERHUB_IMAGE_MAX_SEVERITY`: the
launcher then cleans up and re-demands the job with backoff, as for any failed start, and the
reason names the worst finding. A scan not complete yet is refused too (or allowed, by
`RUNNERHUB_IMAGE_SCAN_PENDING=allow`): the re-demand's backoff is the wait for it.

A complete scan's verdict is cached per digest for `image_scan_cache_s` (an image's findings
change only when ECR re-scans it): the steady state costs no ECR call. Images not from ECR (the
local stack's `runnerhub/...:local`) are not checked, which is logged once per image.

`judge` decides from one `Scan` (a frozen dataclass) and is pure; `EcrScans` is the one ECR call.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aws_lambda_powertools import Logger

from chalicelib.errors import RunnerHubError
from executor.containers import ContainerStartFailed

logger = Logger(service="runnerhub-executor")

# ECR's severities, lowest first (basic and enhanced scanning). UNDEFINED and UNTRIAGED (no
# severity assigned yet) rank below INFORMATIONAL: they never refuse an image on their own.
SEVERITIES = ("INFORMATIONAL", "LOW", "MEDIUM", "HIGH", "CRITICAL")
_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}
# Basic scanning says COMPLETE, enhanced scanning ACTIVE, once findings are there.
DONE = frozenset({"COMPLETE", "ACTIVE"})
NOT_FOUND = "NOT_FOUND"  # no scan of the image at all (ScanNotFoundException)
# DescribeImageScanFindings returns at most 1000 findings a page; the worst one is looked for
# in at most this many (the counts cover them all).
FINDINGS_PAGE = 1000
MAX_FINDINGS = 5000

# <account>.dkr.ecr.<region>.amazonaws.com[.cn]/<repository>[:tag][@sha256:<64 hex>]
_ECR_IMAGE = re.compile(
    r"(?P<registry>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/"
    r"(?P<repository>[a-z0-9][a-z0-9._/-]*?)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?"
)


class ImageScanUnavailable(RunnerHubError):
    """ECR could not say (unreachable, access denied, no such image): the start is refused."""


def parse_max_severity(value: str) -> str | None:
    """RUNNERHUB_IMAGE_MAX_SEVERITY: a severity (any case) or "none" (None: no check)."""
    text = value.strip().upper()
    if text == "NONE":
        return None
    if text not in _RANK:
        raise ValueError(f"must be one of {', '.join(SEVERITIES)} or none, not {value!r}")
    return text


@dataclass(frozen=True)
class EcrImage:
    registry_id: str
    region: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def image_id(self) -> dict[str, str]:
        # A digest says exactly what runs; a tag (immutable in our repositories) resolves to one.
        return {"imageDigest": self.digest} if self.digest else {"imageTag": self.tag or "latest"}


def ecr_image(image: str) -> EcrImage | None:
    """The ECR repository and digest (or tag) of an image name; None when not from ECR."""
    found = _ECR_IMAGE.fullmatch(image.strip())
    if not found:
        return None
    return EcrImage(found["registry"], found["region"], found["repository"], found["tag"],
                    found["digest"])


@dataclass(frozen=True)
class Finding:
    name: str
    severity: str
    package: str = ""  # "name version" when the scan says

    def __str__(self) -> str:
        return f"{self.name} ({self.severity}{', ' + self.package if self.package else ''})"


@dataclass(frozen=True)
class Scan:
    """What ECR says of one image's scan."""

    status: str  # COMPLETE / ACTIVE, IN_PROGRESS, PENDING, FAILED, NOT_FOUND, ...
    digest: str = ""
    counts: Mapping[str, int] = field(default_factory=dict)
    worst: Finding | None = None
    description: str = ""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str
    digest: str = ""
    # Only a complete scan's verdict is kept: a pending one is asked again next time.
    final: bool = False


def worst_severity(counts: Mapping[str, int]) -> str | None:
    ranked = [name for name, count in counts.items() if count and name in _RANK]
    return max(ranked, key=_RANK.__getitem__) if ranked else None


def judge(image: str, scan: Scan, max_severity: str, pending: str) -> Verdict:
    """Allow or refuse `image` from its scan: refused when a finding is at or above
    `max_severity`, or the scan is not complete and `pending` is "refuse"."""
    at = f"{image} ({scan.digest})" if scan.digest and scan.digest not in image else image
    if scan.status not in DONE:
        why = (f"image {at} has no scan in ECR" if scan.status == NOT_FOUND
               else f"the ECR scan of image {at} is {scan.status}"
               f"{': ' + scan.description if scan.description else ''}")
        if pending == "allow":
            return Verdict(True, f"{why}; started anyway (RUNNERHUB_IMAGE_SCAN_PENDING=allow)",
                           scan.digest)
        return Verdict(False, f"{why}; not started until it completes "
                              "(RUNNERHUB_IMAGE_SCAN_PENDING=allow starts it)", scan.digest)
    worst = worst_severity(scan.counts)
    if worst is None or _RANK[worst] < _RANK[max_severity]:
        return Verdict(True, f"image {at}: scan found nothing at or above {max_severity}"
                             f"{' (worst ' + worst + ')' if worst else ''}", scan.digest, True)
    found = ", ".join(f"{scan.counts[name]} {name}" for name in reversed(SEVERITIES)
                      if scan.counts.get(name) and _RANK[name] >= _RANK[max_severity])
    named = f"; worst: {scan.worst}" if scan.worst else ""
    return Verdict(False, f"image {at} refused: its ECR scan found {found}{named} "
                          f"(RUNNERHUB_IMAGE_MAX_SEVERITY={max_severity})", scan.digest, True)


def _finding(raw: Mapping[str, Any]) -> Finding:
    """A basic finding (name, attributes) or an enhanced one (title, vulnerable packages)."""
    attributes = {a.get("key"): a.get("value") for a in raw.get("attributes", ())}
    package = " ".join(filter(None, (attributes.get("package_name"),
                                     attributes.get("package_version"))))
    details = raw.get("packageVulnerabilityDetails") or {}
    name = raw.get("name") or details.get("vulnerabilityId") or raw.get("title") or "?"
    if not package and details.get("vulnerablePackages"):
        first = details["vulnerablePackages"][0]
        package = " ".join(filter(None, (first.get("name"), first.get("version"))))
    return Finding(name=name, severity=str(raw.get("severity", "")).upper(), package=package)


class EcrScans:
    """The one ECR call: an image's scan status, severity counts and its worst finding."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def scan(self, image: EcrImage) -> Scan:
        from botocore.exceptions import BotoCoreError, ClientError

        params = {"registryId": image.registry_id, "repositoryName": image.repository,
                  "imageId": image.image_id}
        paginator = self._client.get_paginator("describe_image_scan_findings")
        status, digest, description = "", image.digest or "", ""
        counts: dict[str, int] = {}
        worst: Finding | None = None
        try:
            for page in paginator.paginate(**params, PaginationConfig={
                    "MaxItems": MAX_FINDINGS, "PageSize": FINDINGS_PAGE}):
                scan_status = page.get("imageScanStatus") or {}
                status = scan_status.get("status", status)
                description = scan_status.get("description", description)
                digest = (page.get("imageId") or {}).get("imageDigest") or digest
                findings = page.get("imageScanFindings") or {}
                counts = dict(findings.get("findingSeverityCounts") or counts)
                top = worst_severity(counts)
                for raw in [*findings.get("findings", ()), *findings.get("enhancedFindings", ())]:
                    candidate = _finding(raw)
                    if candidate.severity in _RANK and (
                            worst is None or _RANK[candidate.severity] > _RANK[worst.severity]):
                        worst = candidate
                if worst is not None and worst.severity == top:
                    break  # the worst there is: no need for the other pages
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "ScanNotFoundException":
                return Scan(NOT_FOUND, digest)
            message = exc.response.get("Error", {}).get("Message", "")
            raise ImageScanUnavailable(f"ECR {code}: {message}"[:300]) from exc
        except BotoCoreError as exc:
            raise ImageScanUnavailable(f"ECR unreachable: {exc}"[:300]) from exc
        return Scan(status or "UNKNOWN", digest, counts, worst, description)


class ImageGate:
    """The check before each runner start (`executor.launch`), with its per-digest cache."""

    def __init__(self, max_severity: str, pending: str = "refuse", cache_s: float = 3600.0,
                 scans: Callable[[], EcrScans] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        import time

        self.max_severity = parse_max_severity(max_severity)
        self.pending = pending
        self.cache_s = cache_s
        self._make_scans = scans or _aws_scans
        self._scans: EcrScans | None = None  # built at the first ECR image (boto3 lazily)
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        # digest (or the image name when its tag is all we have) -> (verdict, when judged)
        self._cache: dict[str, tuple[Verdict, float]] = {}
        self._unchecked: set[str] = set()  # images not from ECR, logged once each

    @classmethod
    def from_settings(cls, settings: Any) -> ImageGate:
        return cls(settings.image_max_severity, settings.image_scan_pending,
                   settings.image_scan_cache_s)

    def check(self, image: str, log: Mapping[str, Any] | None = None) -> Verdict | None:
        """None when the image is not checked (not from ECR, or checks off); the verdict when it
        may start; ContainerStartFailed naming why when it may not."""
        if self.max_severity is None:
            return None
        found = ecr_image(image)
        if found is None:
            if image not in self._unchecked:
                self._unchecked.add(image)
                logger.info("image %s is not from ECR: its scan is not checked", image,
                            extra=dict(log or {}))
            return None
        key = found.digest or image
        now = self._clock()
        with self._lock:
            cached = self._cache.get(key)
        if cached and now - cached[1] < self.cache_s:
            verdict = cached[0]
        else:
            verdict = self._ask(image, found)
            if verdict.final:
                with self._lock:
                    self._cache[key] = (verdict, now)
                    if verdict.digest:
                        self._cache[verdict.digest] = (verdict, now)
        if not verdict.allowed:
            raise ContainerStartFailed(verdict.reason)
        if not verdict.final:
            logger.warning(verdict.reason, extra=dict(log or {}))
        return verdict

    def _ask(self, image: str, found: EcrImage) -> Verdict:
        if self._scans is None:
            self._scans = self._make_scans()
        try:
            scan = self._scans.scan(found)
        except ImageScanUnavailable as exc:
            # Never allowed blind: an access error would otherwise switch the check off.
            return Verdict(False, f"image {image}: scan not read ({exc}); not started")
        assert self.max_severity is not None
        return judge(image, scan, self.max_severity, self.pending)


def _aws_scans() -> EcrScans:
    from chalicelib import aws

    return EcrScans(aws.client("ecr", aws.EXECUTOR))
