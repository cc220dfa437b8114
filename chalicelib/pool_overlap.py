"""Pools whose labels cover another pool's: the logic of `python -m chalicelib.pools check FILE`.

GitHub hands a queued job to any idle runner whose labels cover the job's, oldest queued job
first. Pool P covers pool Q when P's labels include all of Q's (P != Q) and their scopes can share
a repository: every job routed to Q can then be taken by an idle P runner. With warm runners in P
that happens routinely, P's warm pool drains into Q's jobs (which run on P's runners, perhaps
bigger ones) and P's own jobs find no warm runner: a warning. Without warm runners in P it
happens only when a P runner is idle as a Q job is queued; the hand-over (docs/architecture.md,
"Demand, not assignment") keeps every job served: a note.

Exit codes: 0 clean or notes only, 1 any warning, 2 a pools file that cannot be read or is invalid.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from chalicelib.errors import validation_summary
from chalicelib.pools import Pool, PoolConfig, PoolScope, load_pools, warm_ever


def shared_repositories(a: PoolScope, b: PoolScope) -> tuple[str, ...] | None:
    """The repositories both scopes serve: None when none, () when all of the owner's."""
    if a.owner != b.owner:
        return None
    if not a.repositories:
        return b.repositories
    if not b.repositories:
        return a.repositories
    shared = tuple(name for name in a.repositories if name in b.repositories)
    return shared or None


@dataclass(frozen=True, slots=True)
class Overlap:
    """Pool `covering`'s runners can take every job routed to pool `covered`."""

    covering: Pool
    covered: Pool
    warm: int  # the most warm runners `covering` ever keeps (warm_ever)
    repositories: tuple[str, ...]  # where both serve; () = every repository of the owner

    @property
    def severity(self) -> Literal["warning", "note"]:
        return "warning" if self.warm > 0 else "note"

    @property
    def scope(self) -> str:
        owner = self.covering.scope.owner
        if not self.repositories:
            return f"{owner} (all repositories)"
        return ", ".join(f"{owner}/{name}" for name in self.repositories)

    def describe(self) -> str:
        p, q = self.covering.name, self.covered.name
        head = (f"{self.severity}: pool {p} (labels {', '.join(self.covering.labels)}) covers "
                f"pool {q} (labels {', '.join(self.covered.labels)}) in scope {self.scope}: ")
        if self.warm:
            return head + (f"{p}'s {self.warm} warm runner(s) take {q}'s jobs first; give {q} a "
                           f"label {p} lacks and use it in runs-on, or drop {p}'s warm runners")
        return head + (f"{p} has no warm runners; an idle {p} runner may take a {q} job, the "
                       f"hand-over keeps every job served, {q}'s jobs may run on {p}'s runners")


def overlaps(config: PoolConfig) -> list[Overlap]:
    """Every ordered pair (P, Q) where P covers Q, warnings first, then in file order. Pure."""
    found = []
    for covering in config.pools:
        for covered in config.pools:
            if covering is covered or not covered.label_set <= covering.label_set:
                continue
            shared = shared_repositories(covering.scope, covered.scope)
            if shared is not None:
                found.append(Overlap(covering, covered, warm_ever(covering), shared))
    return sorted(found, key=lambda overlap: overlap.severity != "warning")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chalicelib.pools", description="Tools for a RunnerHub pools file.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "check", help="validate a pools file and report pools whose labels cover another's",
        description="Validate a pools file and report each pool whose labels cover another "
        "pool's in a shared scope (its runners can take the other pool's jobs). Exit 0 when "
        "clean or notes only, 1 when a covering pool has warm runners, 2 for an invalid file.")
    check.add_argument("file", type=Path, help="the pools file (TOML, [[pool]] tables)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): a code, not an exit
        return exc.code if isinstance(exc.code, int) else 2
    try:
        config = load_pools(args.file)
    except ValidationError as exc:
        print(f"error: invalid pools file {args.file}: {validation_summary(exc, 'pools file')}",
              file=sys.stderr)
        return 2
    except ValueError as exc:  # unreadable, not TOML
        print(f"error: {exc}", file=sys.stderr)
        return 2
    found = overlaps(config)
    if not found:
        print(f"ok: {len(config.pools)} pools, no pool's labels cover another's")
        return 0
    for overlap in found:
        print(overlap.describe())
    return 1 if any(overlap.severity == "warning" for overlap in found) else 0
