"""Runner images that stay current: what to do with a freshly built, freshly scanned image.

The image refresh pipeline (infra/runnerhub_infra/image_refresh.py) rebuilds each runner image
on the newest `actions/runner` release and pushes it, tagged with that version, to the pool's
ECR repository; ECR scans it on push and EventBridge sends the "ECR Image Scan" event to
`lambda_handler`. For each pool whose image lives in that repository, `decide` (pure) answers:

- refuse (`Refused`, its `reason` one of REFUSALS): the scan is not complete, found something at
  or above the configured severity, the image carries no runner version tag, or it is not newer
  than what the pool runs (or is what the pool runs, or is already proposed);
- propose (`Propose`): a `proposal#<pool>` item of the runners table (digest, runner version,
  found_at, scan summary) that an operator approves through the management API
  (chalicelib/api/actions.py: approving sets the image override from it, audited);
- apply (`Apply`): the pool opted in (`image_auto_update = true` in the pools file), so the image
  override is written at once (chalicelib/overrides.py), audited as actor ACTOR.

`ImageRefresh.handle` acts on the decisions; it takes its clients (overrides, proposals, audit,
ECR) as arguments. Executors pick an override up within OVERRIDES_REFRESH_S.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from aws_lambda_powertools import Logger

from chalicelib import dynamodb
from chalicelib.dynamodb import to_attribute, to_item
from chalicelib.overrides import OverrideStore, effective_image
from chalicelib.pools import Pool

logger = Logger(service="runnerhub-image-refresh")

ACTOR = "runnerhub-image-refresh"
PROPOSAL_PREFIX = "proposal#"
# ECR's severities, least first (basic scanning; UNDEFINED: no severity assigned yet).
SEVERITIES = ("UNDEFINED", "INFORMATIONAL", "LOW", "MEDIUM", "HIGH", "CRITICAL")
DEFAULT_MAX_SEVERITY = "HIGH"  # refused at or above this
SCAN_COMPLETE = "COMPLETE"
# A runner version as actions/runner tags its releases (v2.321.0): the pipeline tags the image
# with the bare version.
_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)$")
# Digest-pinned reference: registry/repository@sha256:<hex>.
_PINNED = re.compile(r"^(?P<registry>[^/]+)/(?P<repository>[^@:]+)(?::[^@]+)?@(?P<digest>"
                     r"sha256:[0-9a-f]{64})$")

REFUSALS = ("scan_incomplete", "scan_findings", "no_runner_version", "already_current",
            "already_proposed", "not_newer")


def parse_version(text: str | None) -> tuple[int, int, int] | None:
    found = _VERSION.match(text or "")
    return tuple(int(part) for part in found.groups()) if found else None  # type: ignore


def runner_version_of(tags: list[str]) -> str | None:
    """The highest runner version among an image's tags (None: no version tag)."""
    versions = sorted((parse_version(tag), tag.lstrip("v")) for tag in tags if parse_version(tag))
    return versions[-1][1] if versions else None


@dataclass(frozen=True)
class Scan:
    status: str
    counts: Mapping[str, int] = field(default_factory=dict)

    def worst(self) -> str | None:
        found = [s for s in SEVERITIES if self.counts.get(s, 0) > 0]
        return found[-1] if found else None


@dataclass(frozen=True)
class BuiltImage:
    registry: str
    repository: str
    digest: str
    runner_version: str | None
    scan: Scan

    @property
    def image(self) -> str:
        return f"{self.registry}/{self.repository}@{self.digest}"


@dataclass(frozen=True)
class Proposal:
    pool: str
    image: str
    repository: str
    digest: str
    runner_version: str
    found_at: float
    scan_status: str
    scan_counts: Mapping[str, int]
    current_image: str


@dataclass(frozen=True)
class Refused:
    pool: str
    reason: str  # one of REFUSALS
    detail: str


@dataclass(frozen=True)
class Propose:
    proposal: Proposal


@dataclass(frozen=True)
class Apply:
    proposal: Proposal


Decision = Refused | Propose | Apply


def decide(pool: Pool, current_image: str, current_version: str | None, built: BuiltImage,
           proposed: Proposal | None, now: float,
           max_severity: str = DEFAULT_MAX_SEVERITY) -> Decision:
    """What to do with `built` for `pool`, which runs `current_image` (runner version
    `current_version`, None when unknown) and has `proposed` pending. Pure."""
    def refuse(reason: str, detail: str) -> Refused:
        return Refused(pool.name, reason, detail)

    if built.scan.status != SCAN_COMPLETE:
        return refuse("scan_incomplete", f"ECR scan status {built.scan.status}")
    worst = built.scan.worst()
    if worst is not None and SEVERITIES.index(worst) >= SEVERITIES.index(max_severity):
        counts = ", ".join(f"{s} {n}" for s, n in sorted(built.scan.counts.items()) if n)
        return refuse("scan_findings", f"findings at or above {max_severity}: {counts}")
    version = parse_version(built.runner_version)
    if version is None:
        return refuse("no_runner_version",
                      f"image {built.digest} carries no runner version tag (2.x.y)")
    if current_image == built.image or current_image.endswith(f"@{built.digest}"):
        return refuse("already_current", f"pool {pool.name} runs {built.digest} already")
    if proposed is not None and proposed.digest == built.digest:
        return refuse("already_proposed", f"{built.digest} is proposed already")
    running = parse_version(current_version)
    if running is not None and version <= running:
        return refuse("not_newer", f"runner {built.runner_version} is not newer than the "
                                   f"{current_version} pool {pool.name} runs")
    proposal = Proposal(
        pool=pool.name, image=built.image, repository=built.repository, digest=built.digest,
        runner_version=str(built.runner_version), found_at=now, scan_status=built.scan.status,
        scan_counts=dict(built.scan.counts), current_image=current_image)
    # Applied unseen only when it is known to be newer: against a running version that is
    # unknown (an untagged digest), an older image rescanned would otherwise go back in.
    if pool.image_auto_update and running is not None:
        return Apply(proposal)
    return Propose(proposal)


def repository_of(image: str) -> str:
    """The repository path of an image reference, without registry, tag or digest."""
    name = image.split("@", 1)[0]
    if ":" in name.rsplit("/", 1)[-1]:
        name = name.rsplit(":", 1)[0]
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        name = rest
    return name


def pools_of(pools: list[Pool], repository: str) -> list[Pool]:
    """The pools whose pools-file image lives in `repository`."""
    return [pool for pool in pools if repository_of(pool.image) == repository]


def scan_of_event(event: dict) -> tuple[str, str, str, Scan, str]:
    """(registry, repository, digest, scan, account) of an "ECR Image Scan" event; ValueError
    names what is missing."""
    detail = event.get("detail") if isinstance(event, dict) else None
    if not isinstance(detail, dict):
        raise ValueError("not an ECR Image Scan event: no detail")
    repository, digest = detail.get("repository-name"), detail.get("image-digest")
    status = detail.get("scan-status")
    account, region = event.get("account"), event.get("region")
    for name, value in (("repository-name", repository), ("image-digest", digest),
                        ("scan-status", status), ("account", account), ("region", region)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"ECR Image Scan event without {name}")
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ValueError(f"ECR Image Scan event with a malformed image-digest {digest[:80]!r}")
    counts = detail.get("finding-severity-counts") or {}
    if not isinstance(counts, dict) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts.values()):
        raise ValueError("ECR Image Scan event with malformed finding-severity-counts")
    registry = f"{account}.dkr.ecr.{region}.amazonaws.com"
    return registry, repository, digest, Scan(status, dict(counts)), account


# --- the proposal item ---


def proposal_key(pool: str) -> dict[str, Any]:
    return {"runner_name": {"S": f"{PROPOSAL_PREFIX}{pool}"}}


class ProposalStore(Protocol):
    def get(self, pool: str) -> Proposal | None: ...

    def put(self, proposal: Proposal) -> None: ...

    def remove(self, pool: str, digest: str) -> bool:
        """Remove the pool's proposal if it is still `digest`'s; whether it was."""


def _proposal(item: dict[str, Any] | None) -> Proposal | None:
    if not item:
        return None
    return Proposal(pool=item["pool"], image=item["image"], repository=item["repository"],
                    digest=item["digest"], runner_version=item["runner_version"],
                    found_at=float(item["found_at"]), scan_status=item["scan_status"],
                    scan_counts={k: int(v) for k, v in (item.get("scan_counts") or {}).items()},
                    current_image=item.get("current_image", ""))


class DynamoProposalStore:
    def __init__(self, client: Any, runners_table: str) -> None:
        self._client = client
        self._table = runners_table

    def get(self, pool: str) -> Proposal | None:
        return _proposal(dynamodb.get(self._client, self._table, proposal_key(pool)))

    def put(self, proposal: Proposal) -> None:
        item = to_item({**asdict(proposal), "scan_counts": dict(proposal.scan_counts)})
        dynamodb.write(self._client.put_item, TableName=self._table,
                       Item=item | proposal_key(proposal.pool))

    def remove(self, pool: str, digest: str) -> bool:
        return dynamodb.conditional(
            self._client.delete_item, TableName=self._table, Key=proposal_key(pool),
            ConditionExpression="digest = :digest",
            ExpressionAttributeValues={":digest": to_attribute(digest)}) is not None


class MemoryProposalStore:
    def __init__(self) -> None:
        self.items: dict[str, Proposal] = {}

    def get(self, pool: str) -> Proposal | None:
        return self.items.get(pool)

    def put(self, proposal: Proposal) -> None:
        self.items[proposal.pool] = proposal

    def remove(self, pool: str, digest: str) -> bool:
        found = self.items.get(pool)
        if found is None or found.digest != digest:
            return False
        del self.items[pool]
        return True


# --- acting ---


class EcrImages:
    """The one ECR call the refresh makes: an image's tags, by digest (DescribeImages)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def tags(self, repository: str, digest: str) -> list[str]:
        try:
            found = self._client.describe_images(repositoryName=repository,
                                                 imageIds=[{"imageDigest": digest}])
        except self._client.exceptions.ImageNotFoundException:
            return []
        return [tag for image in found.get("imageDetails", [])
                for tag in image.get("imageTags", [])]


class ImageRefresh:
    def __init__(self, *, pools: list[Pool], overrides: OverrideStore,
                 proposals: ProposalStore, audit: Any, ecr: EcrImages,
                 max_severity: str = DEFAULT_MAX_SEVERITY,
                 clock: Callable[[], float] = time.time) -> None:
        if max_severity not in SEVERITIES:
            raise ValueError(f"max severity {max_severity!r} is not one of {SEVERITIES}")
        self._pools = pools
        self._overrides = overrides
        self._proposals = proposals
        self._audit = audit
        self._ecr = ecr
        self._max_severity = max_severity
        self._clock = clock

    def handle(self, event: dict) -> list[Decision]:
        """One scan event: a decision per pool of the repository, each carried out."""
        registry, repository, digest, scan, _ = scan_of_event(event)
        pools = pools_of(self._pools, repository)
        if not pools:
            logger.info("scan of %s@%s: no pool runs that repository", repository, digest)
            return []
        built = BuiltImage(registry, repository, digest,
                           runner_version_of(self._ecr.tags(repository, digest)), scan)
        decisions = []
        for pool in pools:
            overrides = self._overrides.get(pool.name)
            current = effective_image(pool, overrides)
            decision = decide(pool, current, self._version_of(current, repository),
                              built, self._proposals.get(pool.name), self._clock(),
                              self._max_severity)
            self._act(decision)
            decisions.append(decision)
        return decisions

    def _version_of(self, image: str, repository: str) -> str | None:
        """The runner version of the image a pool runs, when it is pinned in the same
        repository (its tags); None otherwise (then only digests are compared)."""
        pinned = _PINNED.match(image)
        if pinned is None or pinned["repository"] != repository:
            return None
        return runner_version_of(self._ecr.tags(repository, pinned["digest"]))

    def _act(self, decision: Decision) -> None:
        from chalicelib.api.audit import new_record

        now = self._clock()
        if isinstance(decision, Refused):
            logger.info("image not proposed: %s (%s)", decision.reason, decision.detail,
                        extra={"pool": decision.pool})
            return
        proposal = decision.proposal
        target = f"pool:{proposal.pool}"
        summary = (f"runner {proposal.runner_version}, {proposal.digest}, scan "
                   f"{dict(proposal.scan_counts) or 'clean'}")
        if isinstance(decision, Propose):
            self._proposals.put(proposal)
            self._audit.append(new_record(
                now=now, action="propose_image", target=target, outcome="ok", reason=summary,
                change={"image_before": proposal.current_image, "image_after": proposal.image},
                sub=ACTOR, username=ACTOR))
            logger.info("image proposed: %s", summary, extra={"pool": proposal.pool})
            return
        before, after = self._overrides.set(proposal.pool, {"image": proposal.image}, ACTOR,
                                            now)
        self._audit.append(new_record(
            now=now, action="set_image", target=target, outcome="ok",
            reason=f"image_auto_update: {summary}; version {after.version}",
            change={"image_before": before.image, "image_after": after.image},
            sub=ACTOR, username=ACTOR))
        logger.info("image applied (image_auto_update): %s", summary,
                    extra={"pool": proposal.pool})


def lambda_handler(event: dict, context: Any) -> dict:
    """The refresh Lambda (infra/runnerhub_infra/image_refresh.py): wired from environment
    variables (RUNNERHUB_RUNNERS_TABLE, RUNNERHUB_AUDIT_TABLE, RUNNERHUB_POOLS_FILE,
    RUNNERHUB_IMAGE_MAX_SEVERITY)."""
    import os

    from chalicelib import aws
    from chalicelib.api.audit import DynamoAuditLog
    from chalicelib.api.pages import Cursors
    from chalicelib.overrides import DynamoOverrideStore
    from chalicelib.pools import load_pools

    client = aws.client("dynamodb")
    runners = os.environ["RUNNERHUB_RUNNERS_TABLE"]
    refresh = ImageRefresh(
        pools=list(load_pools(os.environ.get("RUNNERHUB_POOLS_FILE") or None).pools),
        overrides=DynamoOverrideStore(client, runners),
        proposals=DynamoProposalStore(client, runners),
        # Appends only: its cursor key (for reading pages, which this never does) is a name.
        audit=DynamoAuditLog(client, os.environ["RUNNERHUB_AUDIT_TABLE"], Cursors(ACTOR)),
        ecr=EcrImages(aws.client("ecr")),
        max_severity=os.environ.get("RUNNERHUB_IMAGE_MAX_SEVERITY", DEFAULT_MAX_SEVERITY),
    )
    decisions = refresh.handle(event)
    return {"decisions": [
        {"pool": d.pool, "outcome": "refused", "reason": d.reason} if isinstance(d, Refused)
        else {"pool": d.proposal.pool, "outcome": "applied" if isinstance(d, Apply)
              else "proposed", "digest": d.proposal.digest} for d in decisions]}
