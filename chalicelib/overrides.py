"""A pool's operator overrides: its warm target, its hosts' minimum and maximum, and its runner
image, set through the management API (chalicelib/api/actions.py) or, for the image, by the
image refresh (chalicelib/image_refresh.py) of a pool that opted in.

Stored as one item of the runners table, `overrides#<pool>` (beside the pool's seat counters:
the executor reads that table already), with a `version` bumped by every change. Readers: the
executors' warm keeper and the scaler's warm demand (chalicelib/warm_targets.py: a set warm
target replaces the file's and the forecast's), the scaler's host limits (`effective`), the
API's views; each through an `OverridesReader` (read at most every OVERRIDES_REFRESH_S). An
override never leaves the pools file's limits: the warm target stays within `max_runners`, and
the hosts within the group's own MinSize..MaxSize (infra/). The image override is a full image
reference (`repo@sha256:<64 hex>` or `repo:tag`, checked by `image_error`); the executors start
every runner, job or warm, with `effective_image` (the override, else the pools file's).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from chalicelib import dynamodb
from chalicelib.cache import PerKey
from chalicelib.dynamodb import from_item, to_attribute
from chalicelib.pools import Pool, can_warm
from chalicelib.resources import OVERRIDES_PREFIX
from chalicelib.warm_targets import wanted, warm_override

FIELDS = ("warm_runners", "min_hosts", "max_hosts", "image")
INT_FIELDS = ("warm_runners", "min_hosts", "max_hosts")
# An operator's change reaches every reader within this (one read per pool and reader).
OVERRIDES_REFRESH_S = 15.0


@dataclass(frozen=True)
class PoolOverrides:
    warm_runners: int | None = None
    min_hosts: int | None = None
    max_hosts: int | None = None
    image: str | None = None
    version: int = 0
    changed_by: str | None = None
    changed_at: float | None = None


@dataclass(frozen=True)
class EffectivePool:
    warm_runners: int
    min_hosts: int | None  # None: the group's own MinSize
    max_hosts: int | None  # None: the group's own MaxSize
    image: str = ""  # the runners' image (effective_image)


class OverrideRejected(ValueError):
    """The change leaves the pool's limits (the message says which): the API's 409."""


# An image reference as Docker's distribution grammar writes it (distribution/reference's
# regexp.go): [domain[:port]/]path-component(/path-component)* then a tag or a digest, or both.
# A reference without either ("latest" implied) is refused: an override names what runs.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*" \
          r"[a-zA-Z0-9])?)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_IMAGE = re.compile(
    rf"^(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")
# The same grammar as one pattern that also requires a tag or a digest, for the OpenAPI document
# (clients and the API fuzzer generate from it); image_error gives the reason in words.
IMAGE_PATTERN = (rf"^(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*"
                 r"(?::[\w][\w.-]{0,127}(?:@sha256:[0-9a-f]{64})?|@sha256:[0-9a-f]{64})$")
# Docker's own limit on a repository name (distribution/reference: NameTotalLengthMax), held
# here by the whole reference (so the OpenAPI document can say it: maxLength): real references
# (ECR's are under 150 with a digest) are far below it.
MAX_IMAGE_LENGTH = 255


def image_error(image: str) -> str | None:
    """Why `image` is not a full image reference (a tag or a sha256 digest), or None. Pure."""
    if not isinstance(image, str) or not image:
        return "the image must be a non-empty string"
    if len(image) > MAX_IMAGE_LENGTH:
        return f"image reference longer than {MAX_IMAGE_LENGTH} characters"
    if image != image.strip() or any(ch.isspace() for ch in image):
        return f"image {image[:80]!r} contains whitespace"
    found = _IMAGE.match(image)
    if found is None:
        return (f"image {image[:300]!r} is not an image reference: give repo@sha256:<64 hex> "
                "or repo:tag (lower-case repository path, optional registry host[:port]/)")
    if found["tag"] is None and found["digest"] is None:
        return (f"image {image[:300]!r} names no tag or digest: give repo@sha256:<64 hex> "
                "(preferred: it cannot change under you) or repo:tag")
    return None


def effective_image(pool: Pool, overrides: PoolOverrides | None) -> str:
    """The image `pool`'s runners start with: the operator's (or the refresh's) override, else
    the pools file's. Pure."""
    image = overrides.image if overrides is not None else None
    return image or pool.image


def host_cap(pool: Pool, slots_per_host: int) -> int:
    """Hosts beyond which the pool could not use another (max_runners over slots per host)."""
    return max(1, math.ceil(pool.max_runners / slots_per_host))


def effective(pool: Pool, overrides: PoolOverrides | None, now: float,
              group_min: int | None = None, group_max: int | None = None,
              forecast_warm: int = 0) -> EffectivePool:
    """What the pool runs with at `now` (`forecast_warm`: the trainer's warm runners now).
    Overrides are clamped to the limits again here (a pools file edited after an override
    must not be exceeded). Pure."""
    o = overrides or PoolOverrides()
    warm = warm_override(pool, o.warm_runners)
    if warm is None:
        warm = wanted(pool, now, forecast_warm)

    def clamp(value: int | None) -> int | None:
        if value is None:
            return None
        low = group_min if group_min is not None else 0
        high = group_max if group_max is not None else value
        return max(low, min(value, high))

    low, high = clamp(o.min_hosts), clamp(o.max_hosts)
    if low is not None and high is not None and low > high:
        low = high
    return EffectivePool(warm_runners=warm, min_hosts=low, max_hosts=high,
                         image=effective_image(pool, o))


# A digest-pinned image in an ECR registry: what deployed stages' pools files must name
# (infra/runnerhub_infra/pool_checks.py), and what the executor's scan gate checks.
_ECR_DIGEST = re.compile(r"^(?P<registry>\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com)/"
                         r"[a-z0-9]+(?:[._/-][a-z0-9]+)*@sha256:[0-9a-f]{64}$")


def check_image(pool: Pool, image: str | None) -> None:
    """An override never weakens the pool's image policy: where the pools file pins an ECR
    image by digest (a deployed stage: scanned, immutable), the override must be a digest in
    the same registry too, not a movable tag or another registry the scan gate does not
    check. OverrideRejected says why."""
    if image is None:
        return
    pinned = _ECR_DIGEST.match(pool.image)
    if pinned is None:
        return
    found = _ECR_DIGEST.match(image)
    if found is None or found["registry"] != pinned["registry"]:
        raise OverrideRejected(
            f"pool {pool.name} runs a digest-pinned image from {pinned['registry']}: an "
            f"override must be {pinned['registry']}/<repository>@sha256:<64 hex> too (scanned "
            f"and immutable), not {image[:200]!r}")


def check_warm(pool: Pool, warm_runners: int | None) -> None:
    if warm_runners is not None and not 0 <= warm_runners <= pool.max_runners:
        raise OverrideRejected(f"warm_runners {warm_runners} is outside 0..max_runners "
                               f"({pool.max_runners}) of pool {pool.name}")
    if warm_runners and not can_warm(pool):
        raise OverrideRejected(f"pool {pool.name} registers repository runners for several "
                               "repositories: a warm runner has none to register in")


def check_hosts(pool: Pool, min_hosts: int | None, max_hosts: int | None,
                group_min: int | None, group_max: int | None) -> None:
    """Within the group's MinSize..MaxSize when the group is known (else 0..the host cap),
    and min <= max."""
    if min_hosts is not None and max_hosts is not None and min_hosts > max_hosts:
        raise OverrideRejected(f"min_hosts {min_hosts} is above max_hosts {max_hosts}")
    low = group_min if group_min is not None else 0
    for name, value in (("min_hosts", min_hosts), ("max_hosts", max_hosts)):
        if value is None:
            continue
        if value < low or (group_max is not None and value > group_max):
            raise OverrideRejected(
                f"{name} {value} is outside the group's {low}..{group_max} for pool {pool.name}")


def key(pool: str) -> dict[str, Any]:
    return {"runner_name": {"S": f"{OVERRIDES_PREFIX}{pool}"}}


class OverrideStore(Protocol):
    def get(self, pool: str) -> PoolOverrides: ...

    def set(self, pool: str, values: dict[str, int | str | None], by: str, now: float
            ) -> tuple[PoolOverrides, PoolOverrides]:
        """Set (a value) or clear (None) the given fields; (before, after)."""


def _overrides(item: dict[str, Any] | None) -> PoolOverrides:
    item = item or {}
    return PoolOverrides(**{name: (int(item[name]) if item.get(name) is not None else None)
                            for name in INT_FIELDS},
                         image=str(item["image"]) if item.get("image") else None,
                         version=int(item.get("version", 0)),
                         changed_by=item.get("changed_by"),
                         changed_at=float(item["changed_at"]) if "changed_at" in item else None)


class DynamoOverrideStore:
    def __init__(self, client: Any, runners_table: str) -> None:
        self._client = client
        self._table = runners_table

    def get(self, pool: str) -> PoolOverrides:
        return _overrides(dynamodb.get(self._client, self._table, key(pool)))

    def set(self, pool: str, values: dict[str, int | str | None], by: str, now: float
            ) -> tuple[PoolOverrides, PoolOverrides]:
        check_values(values)
        names = {"#pool": "pool"}
        attrs: dict[str, Any] = {":pool": {"S": pool}, ":by": {"S": by},
                                 ":now": to_attribute(now), ":one": {"N": "1"}}
        sets = ["#pool = :pool", "changed_by = :by", "changed_at = :now"]
        removes = []
        for name, value in values.items():
            names[f"#{name}"] = name
            if value is None:
                removes.append(f"#{name}")
            else:
                attrs[f":{name}"] = to_attribute(str(value) if name == "image" else int(value))
                sets.append(f"#{name} = :{name}")
        expression = "SET " + ", ".join(sets) + " ADD version :one"
        if removes:
            expression += " REMOVE " + ", ".join(removes)
        answer = dynamodb.write(self._client.update_item, TableName=self._table, Key=key(pool),
                                UpdateExpression=expression, ExpressionAttributeNames=names,
                                ExpressionAttributeValues=attrs, ReturnValues="ALL_OLD")
        # The old item comes back from the write itself: before and after of one atomic change.
        before = _overrides(from_item(answer.get("Attributes") or {}))
        return before, changed(before, values, by, now)


def check_values(values: dict[str, int | str | None]) -> None:
    """Every store refuses what no reader could use: an unknown field, a bad image."""
    for name, value in values.items():
        if name not in FIELDS:
            raise ValueError(f"unknown override {name}")
        if name == "image" and value is not None and (error := image_error(value)):
            raise OverrideRejected(error)


def changed(before: PoolOverrides, values: dict[str, int | str | None], by: str, now: float
            ) -> PoolOverrides:
    fields = {name: getattr(before, name) for name in FIELDS} | values
    return PoolOverrides(**fields, version=before.version + 1, changed_by=by, changed_at=now)


class MemoryOverrideStore:
    def __init__(self) -> None:
        self.items: dict[str, PoolOverrides] = {}

    def get(self, pool: str) -> PoolOverrides:
        return self.items.get(pool, PoolOverrides())

    def set(self, pool: str, values: dict[str, int | str | None], by: str, now: float
            ) -> tuple[PoolOverrides, PoolOverrides]:
        check_values(values)
        before = self.get(pool)
        after = self.items[pool] = changed(before, values, by, now)
        return before, after


class OverridesReader(PerKey[PoolOverrides]):
    """Each pool's overrides through a store, read at most every `refresh_s`; a failed read
    keeps the last one read (or none: the pools file's and the forecast's targets)."""

    def __init__(self, store: OverrideStore, *, refresh_s: float = OVERRIDES_REFRESH_S,
                 clock: Callable[[], float] | None = None,
                 on_error: Callable[[str, Exception], None] | None = None) -> None:
        super().__init__(store.get, refresh_s=refresh_s, clock=clock, on_error=on_error)
