"""The image gate's decisions (executor/image_scan.py): severities, pending scans, the per-digest
cache, ECR's response shapes through botocore's Stubber (enhanced findings, paging, errors: moto
answers basic scanning only, tests/functional/test_image_scan_http.py), and the launcher's
hook: a refused image starts nothing, registers nothing and re-demands the job."""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import Stubber
from pydantic import ValidationError

from chalicelib.memory import InMemoryHostStore, InMemoryJobStore, InMemoryRunnerStore
from executor.containers import ContainerStartFailed
from executor.image_scan import (
    NOT_FOUND,
    EcrImage,
    EcrScans,
    Finding,
    ImageGate,
    ImageScanUnavailable,
    Scan,
    ecr_image,
    judge,
    parse_max_severity,
)
from executor.settings import ExecutorSettings
from tests.unit.test_executor import (
    JOB,
    SMALL,
    app_env,  # noqa: F401 - a fixture
    make_executor,
    message,
    receive_job,
    received,
)

DIGEST = "sha256:" + "ab" * 32
IMAGE = f"123456789012.dkr.ecr.eu-west-1.amazonaws.com/runnerhub/linux-small@{DIGEST}"
CVE = Finding("CVE-2024-0001", "HIGH", "openssl 3.0.11")


def scan(**counts: int) -> Scan:
    return Scan("COMPLETE", DIGEST, counts, CVE if counts.get("HIGH") else None)


@pytest.mark.parametrize(("value", "parsed"), [("HIGH", "HIGH"), ("critical", "CRITICAL"),
                                               (" Low ", "LOW"), ("none", None)])
def test_max_severity_parses_any_case_and_none(value, parsed):
    assert parse_max_severity(value) == parsed


def test_unknown_max_severity_is_a_configuration_error_naming_the_levels(app_env):  # noqa: F811
    with pytest.raises(ValidationError, match="INFORMATIONAL, LOW, MEDIUM, HIGH, CRITICAL"):
        ExecutorSettings(image_max_severity="SEVERE")
    assert ExecutorSettings().image_max_severity == "HIGH"
    assert ExecutorSettings(image_max_severity="None").image_max_severity == "none"


def test_ecr_image_names_parse_by_digest_and_by_tag():
    assert ecr_image(IMAGE) == EcrImage("123456789012", "eu-west-1", "runnerhub/linux-small",
                                        None, DIGEST)
    tagged = ecr_image("123456789012.dkr.ecr.us-east-1.amazonaws.com/runnerhub/x:v1")
    assert (tagged.tag, tagged.digest, tagged.image_id) == ("v1", None, {"imageTag": "v1"})
    assert ecr_image(IMAGE).image_id == {"imageDigest": DIGEST}


@pytest.mark.parametrize("image", ["runnerhub/runner-linux-small:local",
                                   "ghcr.io/actions/actions-runner:2.320.0",
                                   "123456789012.dkr.ecr.us-east-1.amazonaws.com.evil.io/x:1",
                                   "localhost:5000/runnerhub/x@" + DIGEST])
def test_images_not_from_ecr_are_not_ecr_images(image):
    assert ecr_image(image) is None


def test_a_finding_at_the_limit_refuses_and_names_the_worst_finding():
    verdict = judge(IMAGE, scan(HIGH=2, MEDIUM=5, LOW=1), "HIGH", "refuse")
    assert not verdict.allowed and verdict.final
    assert "2 HIGH" in verdict.reason and "CVE-2024-0001 (HIGH, openssl 3.0.11)" in verdict.reason
    assert "MEDIUM" not in verdict.reason.split("found")[1].split(";")[0]


def test_findings_below_the_limit_allow_the_image():
    verdict = judge(IMAGE, scan(MEDIUM=5, LOW=1, UNDEFINED=3), "HIGH", "refuse")
    assert verdict.allowed and verdict.final and "worst MEDIUM" in verdict.reason
    assert judge(IMAGE, scan(), "INFORMATIONAL", "refuse").allowed


def test_critical_limit_lets_high_through_and_informational_limit_refuses_anything_ranked():
    assert judge(IMAGE, scan(HIGH=1), "CRITICAL", "refuse").allowed
    assert not judge(IMAGE, scan(CRITICAL=1), "CRITICAL", "refuse").allowed
    assert not judge(IMAGE, scan(INFORMATIONAL=1), "INFORMATIONAL", "refuse").allowed
    # No severity assigned yet is not a severity.
    assert judge(IMAGE, scan(UNTRIAGED=4), "INFORMATIONAL", "refuse").allowed


@pytest.mark.parametrize("status", ["IN_PROGRESS", "FAILED", NOT_FOUND, "PENDING"])
def test_a_scan_not_complete_refuses_by_default_and_allow_starts_it(status):
    pending = Scan(status, DIGEST)
    refused = judge(IMAGE, pending, "HIGH", "refuse")
    assert not refused.allowed and not refused.final
    assert ("no scan in ECR" if status == NOT_FOUND else status) in refused.reason
    assert "RUNNERHUB_IMAGE_SCAN_PENDING=allow" in refused.reason
    allowed = judge(IMAGE, pending, "HIGH", "allow")
    assert allowed.allowed and not allowed.final


class Scans:
    """An ECR stand-in counting its calls."""

    def __init__(self, result: Scan | Exception) -> None:
        self.result, self.calls = result, 0

    def scan(self, image: EcrImage) -> Scan:
        self.calls += 1
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gate(result, **kwargs) -> tuple[ImageGate, Scans, Clock]:
    scans, clock = Scans(result), Clock()
    return ImageGate(kwargs.pop("max_severity", "HIGH"), scans=lambda: scans, clock=clock,
                     **kwargs), scans, clock


def test_a_complete_scan_is_cached_per_digest_until_the_ttl_passes():
    checks, scans, clock = gate(scan(LOW=1), cache_s=3600)
    assert checks.check(IMAGE).allowed
    clock.now += 3599
    checks.check(IMAGE)
    assert scans.calls == 1  # the steady state costs no ECR call
    clock.now += 2
    checks.check(IMAGE)
    assert scans.calls == 2


def test_a_refusal_is_cached_too_and_raises_each_time():
    checks, scans, _ = gate(scan(HIGH=1))
    for _ in range(3):
        with pytest.raises(ContainerStartFailed, match="CVE-2024-0001"):
            checks.check(IMAGE)
    assert scans.calls == 1


def test_a_pending_scan_is_asked_again_at_the_next_start():
    checks, scans, _ = gate(Scan("IN_PROGRESS", DIGEST))
    for _ in range(2):
        with pytest.raises(ContainerStartFailed, match="IN_PROGRESS"):
            checks.check(IMAGE)
    assert scans.calls == 2
    allowing, scans, _ = gate(Scan("IN_PROGRESS", DIGEST), pending="allow")
    assert allowing.check(IMAGE).allowed and not allowing.check(IMAGE).final
    assert scans.calls == 2


def test_ecr_unreadable_refuses_even_when_pending_scans_are_allowed():
    checks, scans, _ = gate(ImageScanUnavailable("ECR AccessDeniedException: no"),
                            pending="allow")
    for _ in range(2):  # and never cached: asked again at the next start
        with pytest.raises(ContainerStartFailed, match=r"scan not read.*AccessDenied"):
            checks.check(IMAGE)
    assert scans.calls == 2


def test_local_images_and_none_are_never_checked():
    checks, scans, _ = gate(scan(CRITICAL=9))
    assert checks.check("runnerhub/runner-linux-small:local") is None
    off, off_scans, _ = gate(scan(CRITICAL=9), max_severity="none")
    assert off.check(IMAGE) is None
    assert scans.calls == off_scans.calls == 0


def test_a_tagged_image_is_cached_under_its_tag_and_the_digest_ecr_named():
    tagged = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/runnerhub/linux-small:v1"
    checks, scans, _ = gate(scan(LOW=1))
    checks.check(tagged)
    checks.check(tagged)
    checks.check(IMAGE)  # the same digest, named by digest
    assert scans.calls == 1


# --- EcrScans against ECR's response shapes (botocore Stubber: no network) ---

def stubbed() -> tuple[EcrScans, Stubber]:
    client = boto3.client("ecr", region_name="eu-west-1")
    return EcrScans(client), Stubber(client)


PARAMS = {"registryId": "123456789012", "repositoryName": "runnerhub/linux-small",
          "imageId": {"imageDigest": DIGEST}, "maxResults": 1000}


def test_enhanced_findings_name_the_vulnerability_and_package():
    scans, stub = stubbed()
    stub.add_response("describe_image_scan_findings", {
        "imageId": {"imageDigest": DIGEST}, "imageScanStatus": {"status": "ACTIVE"},
        "imageScanFindings": {
            "findingSeverityCounts": {"CRITICAL": 1, "MEDIUM": 1},
            "enhancedFindings": [
                {"severity": "MEDIUM", "packageVulnerabilityDetails": {
                    "vulnerabilityId": "CVE-2023-1", "vulnerablePackages": [
                        {"name": "zlib", "version": "1.2"}]}},
                {"severity": "CRITICAL", "title": "CVE-2024-9 - bash",
                 "packageVulnerabilityDetails": {
                    "vulnerabilityId": "CVE-2024-9", "vulnerablePackages": [
                        {"name": "bash", "version": "5.2.15-2"}]}},
            ]}}, PARAMS)
    with stub:
        found = scans.scan(ecr_image(IMAGE))
    assert found.status == "ACTIVE" and found.worst == Finding("CVE-2024-9", "CRITICAL",
                                                               "bash 5.2.15-2")
    verdict = judge(IMAGE, found, "HIGH", "refuse")
    assert not verdict.allowed and "1 CRITICAL; worst: CVE-2024-9" in verdict.reason


def test_pages_are_read_until_the_worst_finding_is_seen():
    scans, stub = stubbed()
    counts = {"HIGH": 1, "LOW": 1}
    stub.add_response("describe_image_scan_findings", {
        "imageScanStatus": {"status": "COMPLETE"}, "nextToken": "t2",
        "imageScanFindings": {"findingSeverityCounts": counts,
                              "findings": [{"name": "CVE-low", "severity": "LOW"}]}}, PARAMS)
    stub.add_response("describe_image_scan_findings", {
        "imageScanStatus": {"status": "COMPLETE"}, "nextToken": "t3",
        "imageScanFindings": {"findingSeverityCounts": counts, "findings": [
            {"name": "CVE-high", "severity": "HIGH", "attributes": [
                {"key": "package_name", "value": "perl"},
                {"key": "package_version", "value": "5.36"}]}]}},
        PARAMS | {"nextToken": "t2"})
    with stub:  # a third page is never asked for: the stubber would fail on it
        found = scans.scan(ecr_image(IMAGE))
    stub.assert_no_pending_responses()
    assert found.worst == Finding("CVE-high", "HIGH", "perl 5.36")


def test_no_scan_is_not_found_and_other_errors_are_unavailable():
    scans, stub = stubbed()
    stub.add_client_error("describe_image_scan_findings", "ScanNotFoundException", "none",
                          expected_params=PARAMS)
    stub.add_client_error("describe_image_scan_findings", "AccessDeniedException",
                          "not authorized", expected_params=PARAMS)
    with stub:
        assert scans.scan(ecr_image(IMAGE)) == Scan(NOT_FOUND, DIGEST)
        with pytest.raises(ImageScanUnavailable, match="AccessDeniedException: not authorized"):
            scans.scan(ecr_image(IMAGE))


# --- the launcher's hook ---

@pytest.fixture
def refusing(app_env):  # noqa: F811 - the fixture imported above
    jobs = InMemoryJobStore()
    receive_job(jobs)
    world = make_executor(jobs, InMemoryRunnerStore(), InMemoryHostStore())
    world.ctx.pools["linux-small"] = SMALL.model_copy(update={"image": IMAGE})
    scans = Scans(scan(HIGH=1))
    world.launcher.images = ImageGate("HIGH", scans=lambda: scans)
    return world, scans


def test_a_refused_image_starts_nothing_and_re_demands_the_job(refusing):
    world, scans = refusing
    assert world.server.handle(received(message().model_dump_json())) is False
    assert world.ctx.containers.started == [] and world.ctx.github.jit == []
    job = world.ctx.jobs.get(JOB)
    assert job.state == "dispatched" and job.start_failures == 1
    assert "CVE-2024-0001" in job.last_start_error
    assert world.metrics.value("runnerhub_runner_start_failures_total", pool="linux-small",
                               stage="image") == 1
    assert scans.calls == 1


def test_a_refused_image_starts_no_warm_runner(refusing):
    world, _ = refusing
    pool = world.ctx.pools["linux-small"]
    assert world.launcher.start_warm(pool, 1, "rh-warm-linux-small-x") == "failed"
    assert world.ctx.containers.started == [] and world.ctx.github.jit == []
    assert world.metrics.value("runnerhub_runner_start_failures_total", pool="linux-small",
                               stage="warm_image") == 1
