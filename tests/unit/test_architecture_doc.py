"""docs/architecture.md opens with a module map; it must name every module of the packages it
maps, and name nothing that is not there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAPPED = ("chalicelib", "executor", "emulator", "devstack")


def module_map() -> set[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## Module map", 1)[1].split("```", 2)[1]
    paths, stack = set(), []
    for line in block.splitlines():
        match = re.match(r"^( *)(\S+)", line)
        if not match:
            continue
        depth, name = len(match.group(1)) // 2, match.group(2)
        if not (name.endswith("/") or name.endswith(".py")):
            continue
        stack[depth:] = [name]
        if name.endswith(".py"):
            paths.add("".join(stack))
    return paths


def modules() -> set[str]:
    return {str(p.relative_to(ROOT)) for package in MAPPED
            for p in (ROOT / package).rglob("*.py") if p.name != "__init__.py"}


def test_every_module_is_in_the_map():
    missing = modules() - module_map()
    assert not missing, f"docs/architecture.md's module map lacks {sorted(missing)}"


def test_the_map_names_only_modules_that_exist():
    named = {p for p in module_map() if p.split("/", 1)[0] in MAPPED}
    stale = named - modules()
    assert not stale, f"docs/architecture.md's module map names {sorted(stale)}, not in the code"
    assert (ROOT / "app.py").is_file() and "app.py" in module_map()
