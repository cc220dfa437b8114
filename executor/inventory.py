"""Each runner image's packages, recorded with its digest, so an operator can answer "which pools
run the vulnerable version of X" (docs/security.md).

    python -m executor.inventory record IMAGE [--out DIR|s3://BUCKET/PREFIX]
    python -m executor.inventory which PACKAGE [VERSION_SPEC] [--pools FILE] [--from DIR|s3://...]

`record` runs one throw-away container of the image (no network, its entry point replaced) that
prints `dpkg-query -W` and `pip list --format=json` (or, without pip, the same list from
`importlib.metadata`), and writes `sha256-<hex>.json` named by the image id (the config digest:
the same before and after a push), holding {image, digest, repo_digests, built_at, recorded_at,
dpkg: [{name, version}], pip: [{name, version}], pip_source}. Run it again after `docker push`
and the record gains the image's registry digests (what pools files name), in place.
scripts/build-runner-images.sh records every image it builds into .cache/inventory; deployed
images go to the images stack's inventory bucket (infra/runnerhub_infra/ecr.py).

`which` reads every record, keeps those carrying PACKAGE (dpkg or pip; VERSION_SPEC such as
`<3.0.13-1`, `==5.2.15-2`, `>=2.0,<2.3`: Debian ordering for dpkg, PEP 440 for pip) and names the
pools whose image is one of them: by digest (`...@sha256:<hex>` in the pools file against the
record's image id or registry digests) or by name (the newest record of that name).
Exit status: 0 found, 1 nothing carries it, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

DEFAULT_DIR = Path(__file__).resolve().parent.parent / ".cache" / "inventory"
RUN_TIMEOUT_S = 120  # one dpkg-query and one pip list in a stopped-network container
_MARK = "--runnerhub-inventory-{}--"
# POSIX sh: dpkg's list, then pip's (pip itself, else importlib.metadata, else nothing).
_SCRIPT = (
    f"echo {_MARK.format('dpkg')}; "
    "dpkg-query -W -f='${Package}\\t${Version}\\n' 2>/dev/null; "
    f"echo {_MARK.format('pip')}; "
    "python3 -m pip list --format=json --disable-pip-version-check 2>/dev/null "
    f"|| {{ echo {_MARK.format('metadata')}; python3 -c 'import json, importlib.metadata as m; "
    "print(json.dumps([{\"name\": d.metadata[\"Name\"], \"version\": d.version} "
    "for d in m.distributions()]))' 2>/dev/null; }; true"
)


class InventoryError(Exception):
    """Bad input or an image that cannot be read: a clear message, exit status 2."""


# --- recording ---

def parse_listing(text: str) -> tuple[list[dict], list[dict], str]:
    """(dpkg packages, pip packages, where pip's list came from) from the container's output."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        marker = re.fullmatch(r"--runnerhub-inventory-(\w+)--", line.strip())
        if marker:
            current = marker[1]
            sections.setdefault(current, [])
        elif current is not None:
            sections[current].append(line)
    dpkg = []
    for line in sections.get("dpkg", ()):
        name, tab, version = line.partition("\t")
        if tab and name and version:  # a package known but not installed has no version
            dpkg.append({"name": name, "version": version})
    source = "metadata" if "metadata" in sections else "pip"
    raw = "\n".join(sections.get(source, ())).strip()
    pip: list[dict] = []
    if raw:
        try:
            listed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InventoryError(f"unreadable {source} list: {exc}") from exc
        pip = [{"name": str(p["name"]), "version": str(p["version"])} for p in listed]
    if not pip and source == "metadata" and not raw:
        source = "none"  # no Python in the image
    return (sorted(dpkg, key=lambda p: p["name"]),
            sorted(pip, key=lambda p: p["name"].lower()),
            {"pip": "pip list", "metadata": "importlib.metadata", "none": "none"}[source])


def record(image: str, client: Any = None, now: float | None = None) -> dict:
    """The inventory of a local image (pull it first)."""
    import docker
    import docker.errors

    client = client or docker.from_env()
    try:
        found = client.images.get(image)
    except docker.errors.ImageNotFound as exc:
        raise InventoryError(f"image {image} is not on this Docker engine (pull it)") from exc
    container = client.containers.create(
        found.id, ["-c", _SCRIPT], entrypoint=["/bin/sh"], network_disabled=True,
        labels={"runnerhub.inventory": "true"})
    try:
        container.start()
        result = container.wait(timeout=RUN_TIMEOUT_S)
        output = container.logs(stdout=True, stderr=False).decode("utf-8", "replace")
    finally:
        container.remove(force=True)
    if result.get("StatusCode") != 0 or _MARK.format("dpkg") not in output:
        raise InventoryError(f"image {image}: the listing failed (exit "
                             f"{result.get('StatusCode')}; does it have /bin/sh?)")
    dpkg, pip, source = parse_listing(output)
    attrs = found.attrs
    return {
        "image": image, "digest": found.id, "repo_digests": sorted(attrs.get("RepoDigests") or []),
        "built_at": attrs.get("Created", ""),
        "recorded_at": datetime.fromtimestamp(now or time.time(), UTC).isoformat(),
        "dpkg": dpkg, "pip": pip, "pip_source": source,
    }


def file_name(digest: str) -> str:
    algorithm, _, hex_ = digest.partition(":")
    if not re.fullmatch(r"[0-9a-f]{64}", hex_) or algorithm != "sha256":
        raise InventoryError(f"not an image digest: {digest!r}")
    return f"sha256-{hex_}.json"


# --- where records live ---

class Store(Protocol):
    def put(self, entry: dict) -> str: ...

    def entries(self) -> Iterator[dict]: ...


@dataclass(frozen=True)
class DirectoryStore:
    path: Path

    def put(self, entry: dict) -> str:
        self.path.mkdir(parents=True, exist_ok=True)
        target = self.path / file_name(entry["digest"])
        temporary = target.with_suffix(".tmp")
        temporary.write_text(json.dumps(entry, indent=1, sort_keys=True) + "\n")
        temporary.replace(target)  # a reader never sees half a record
        return str(target)

    def entries(self) -> Iterator[dict]:
        for path in sorted(self.path.glob("sha256-*.json")):
            yield _loaded(path.read_text(), str(path))


@dataclass(frozen=True)
class S3Store:
    bucket: str
    prefix: str
    client: Any

    def put(self, entry: dict) -> str:
        key = self.prefix + file_name(entry["digest"])
        self.client.put_object(Bucket=self.bucket, Key=key, ContentType="application/json",
                               Body=json.dumps(entry, sort_keys=True).encode())
        return f"s3://{self.bucket}/{key}"

    def entries(self) -> Iterator[dict]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for item in page.get("Contents", ()):
                if item["Key"].endswith(".json"):
                    body = self.client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"]
                    yield _loaded(body.read().decode(), f"s3://{self.bucket}/{item['Key']}")


def _loaded(text: str, where: str) -> dict:
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InventoryError(f"{where}: not JSON ({exc})") from exc
    if not isinstance(entry, dict) or not {"image", "digest", "dpkg", "pip"} <= set(entry):
        raise InventoryError(f"{where}: not an inventory record")
    return entry


def store_at(where: str | Path) -> Store:
    text = str(where)
    if text.startswith("s3://"):
        bucket, _, prefix = text.removeprefix("s3://").partition("/")
        if not bucket:
            raise InventoryError(f"no bucket in {text!r}")
        from chalicelib import aws

        prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        return S3Store(bucket, prefix, aws.client("s3"))
    return DirectoryStore(Path(text))


# --- versions ---

def _dpkg_order(char: str) -> int:
    # deb-version(7): `~` sorts before everything, even the end; letters before non-letters.
    if char == "~":
        return -1
    if char.isdigit():
        return 0
    if char.isalpha():
        return ord(char)
    return ord(char) + 256


def _compare_part(a: str, b: str) -> int:
    while a or b:
        text_a, text_b = re.match(r"\D*", a)[0], re.match(r"\D*", b)[0]
        a, b = a[len(text_a):], b[len(text_b):]
        for i in range(max(len(text_a), len(text_b))):
            order_a = _dpkg_order(text_a[i]) if i < len(text_a) else 0
            order_b = _dpkg_order(text_b[i]) if i < len(text_b) else 0
            if order_a != order_b:
                return -1 if order_a < order_b else 1
        num_a, num_b = re.match(r"\d*", a)[0], re.match(r"\d*", b)[0]
        a, b = a[len(num_a):], b[len(num_b):]
        if int(num_a or 0) != int(num_b or 0):
            return -1 if int(num_a or 0) < int(num_b or 0) else 1
    return 0


def compare_debian(a: str, b: str) -> int:
    """dpkg's ordering of two versions ([epoch:]upstream[-revision]): -1, 0 or 1."""
    def split(version: str) -> tuple[int, str, str]:
        epoch, colon, rest = version.partition(":")
        if not colon:
            epoch, rest = "0", version
        upstream, dash, revision = rest.rpartition("-")
        if not dash:
            upstream, revision = rest, ""
        return int(epoch or 0), upstream, revision

    epoch_a, up_a, rev_a = split(a)
    epoch_b, up_b, rev_b = split(b)
    if epoch_a != epoch_b:
        return -1 if epoch_a < epoch_b else 1
    return _compare_part(up_a, up_b) or _compare_part(rev_a, rev_b)


# A Debian version starts with a digit (deb-version(7)); its characters are these.
_CLAUSE = re.compile(r"(==|!=|<=|>=|<|>|=)?\s*([0-9][A-Za-z0-9.+~:-]*)")


def matches(version: str, spec: str, kind: str) -> bool:
    """Whether `version` meets `spec` (comma-separated clauses; no operator: equal)."""
    if not spec.strip():
        return True
    if kind == "pip":
        from packaging.specifiers import InvalidSpecifier, SpecifierSet
        from packaging.version import InvalidVersion, Version

        text = ",".join(c if re.match(r"\s*[=!<>~]", c) else f"=={c.strip()}"
                        for c in spec.split(","))
        try:
            return Version(version) in SpecifierSet(text)
        except InvalidSpecifier as exc:
            raise InventoryError(f"bad version spec {spec!r}: {exc}") from exc
        except InvalidVersion:
            return False
    for clause in spec.split(","):
        found = _CLAUSE.fullmatch(clause.strip())
        if not found:
            raise InventoryError(f"bad version spec {spec!r}")
        operator, wanted = found[1] or "==", found[2]
        order = compare_debian(version, wanted)
        ok = {"==": order == 0, "=": order == 0, "!=": order != 0, "<": order < 0,
              "<=": order <= 0, ">": order > 0, ">=": order >= 0}[operator]
        if not ok:
            return False
    return True


# --- the question ---

@dataclass(frozen=True)
class Carrier:
    image: str
    digest: str
    kind: str  # dpkg or pip
    package: str
    version: str
    pools: tuple[str, ...]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # pip names compare normalised (PEP 503)


def pools_of(entry: dict, newest: dict[str, str], pool_images: dict[str, str]) -> tuple[str, ...]:
    """The pools whose image is this record: by digest, or by name when it is the newest
    record of that name."""
    digests = {entry["digest"].partition(":")[2]} | {
        d.rpartition("@sha256:")[2] for d in entry.get("repo_digests", ())}
    found = []
    for pool, image in pool_images.items():
        _, at, digest = image.rpartition("@sha256:")
        by_digest = bool(at) and digest in digests
        by_name = not at and image == entry["image"] and newest.get(image) == entry["digest"]
        if by_digest or by_name:
            found.append(pool)
    return tuple(sorted(found))


def which(entries: Iterable[dict], package: str, spec: str = "",
          pool_images: dict[str, str] | None = None) -> list[Carrier]:
    entries = list(entries)
    newest: dict[str, tuple[str, str]] = {}
    for entry in entries:
        stamp = entry.get("recorded_at", "")
        if entry["image"] not in newest or stamp > newest[entry["image"]][0]:
            newest[entry["image"]] = (stamp, entry["digest"])
    latest = {image: digest for image, (_, digest) in newest.items()}
    found = []
    for entry in entries:
        for kind in ("dpkg", "pip"):
            for item in entry.get(kind, ()):
                same = (item["name"] == package if kind == "dpkg"
                        else _normal(item["name"]) == _normal(package))
                if same and matches(item["version"], spec, kind):
                    found.append(Carrier(entry["image"], entry["digest"], kind, item["name"],
                                         item["version"],
                                         pools_of(entry, latest, pool_images or {})))
    return sorted(found, key=lambda c: (c.package, c.image, c.digest))


def _pool_images(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    from chalicelib.pools import load_pools

    try:
        config = load_pools(path)
    except (OSError, ValueError) as exc:
        raise InventoryError(f"pools file {path}: {str(exc).splitlines()[0]}") from exc
    return {pool.name: pool.image for pool in config.pools}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m executor.inventory", description=(
        "Record runner images' packages; ask which images and pools carry a package."))
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="record a local image's dpkg and pip packages")
    rec.add_argument("image")
    rec.add_argument("--out", default=str(DEFAULT_DIR), help="a directory or s3://BUCKET/PREFIX")
    ask = sub.add_parser("which", help="which images and pools carry PACKAGE [VERSION_SPEC]")
    ask.add_argument("package")
    ask.add_argument("spec", nargs="?", default="",
                     help="e.g. '<3.0.13-1' or '>=2.0,<2.3' (dpkg: Debian order; pip: PEP 440)")
    ask.add_argument("--pools", type=Path, help="name the pools of this pools file")
    ask.add_argument("--from", dest="source", default=str(DEFAULT_DIR),
                     help="a directory or s3://BUCKET/PREFIX (default .cache/inventory)")
    ask.add_argument("--json", action="store_true", help="one JSON list instead of lines")
    args = parser.parse_args(argv)
    try:
        if args.command == "record":
            entry = record(args.image)
            where = store_at(args.out).put(entry)
            print(f"{args.image} {entry['digest']}: {len(entry['dpkg'])} dpkg, "
                  f"{len(entry['pip'])} pip packages -> {where}")
            return 0
        pool_images = _pool_images(args.pools)
        source = store_at(args.source)
        if isinstance(source, DirectoryStore) and not source.path.is_dir():
            raise InventoryError(f"no inventory at {source.path} (record images first)")
        carriers = which(source.entries(), args.package, args.spec, pool_images)
    except InventoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([c.__dict__ | {"pools": list(c.pools)} for c in carriers], indent=1))
    else:
        for c in carriers:
            pools = ", ".join(c.pools) if c.pools else "no pool"
            print(f"{c.package} {c.version} ({c.kind}) in {c.image} {c.digest}: {pools}")
        if not carriers:
            spec = f" {args.spec}" if args.spec else ""
            print(f"no recorded image carries {args.package}{spec}", file=sys.stderr)
    return 0 if carriers else 1


if __name__ == "__main__":
    sys.exit(main())
