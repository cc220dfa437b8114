"""Pools whose labels cover another's (chalicelib/pool_overlap.py) and the command
`python -m chalicelib.pools check FILE`: its lines and exit codes, run as operators run it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from chalicelib.pool_overlap import main, overlaps
from chalicelib.pools import DEFAULT_POOLS_FILE, PoolConfig
from tests.conftest import ROOT


def config(*pools: dict) -> PoolConfig:
    base = {"image": "img", "scope": {"owner": "acme"}}
    return PoolConfig.model_validate({"pool": [base | pool for pool in pools]})


def pairs(pools: PoolConfig) -> list[tuple[str, str, str]]:
    return [(o.covering.name, o.covered.name, o.severity) for o in overlaps(pools)]


SMALL = {"name": "small", "labels": ["self-hosted", "linux"]}
LARGE = {"name": "large", "labels": ["self-hosted", "linux", "large"]}


def test_superset_covers_the_subset_and_not_the_reverse():
    assert pairs(config(SMALL, LARGE)) == [("large", "small", "note")]


def test_superset_with_warm_runners_is_a_warning():
    [overlap] = overlaps(config(SMALL, LARGE | {"warm_runners": 2}))
    assert (overlap.covering.name, overlap.covered.name, overlap.warm) == ("large", "small", 2)
    assert overlap.severity == "warning"


def test_warm_runners_of_the_covered_pool_alone_are_no_warning():
    # small's warm runners lack "large": they cannot take large's jobs.
    assert pairs(config(SMALL | {"warm_runners": 3}, LARGE)) == [("large", "small", "note")]


def test_warm_runners_only_in_a_schedule_window_count():
    scheduled = LARGE | {"warm_schedule": [{"start": "08:00", "end": "18:00", "warm_runners": 5}]}
    [overlap] = overlaps(config(SMALL, scheduled))
    assert (overlap.severity, overlap.warm) == ("warning", 5)


def test_equal_labels_cover_each_other():
    twin = {"name": "twin", "labels": ["linux", "self-hosted"], "warm_runners": 1}
    assert sorted(pairs(config(SMALL, twin))) == [("small", "twin", "note"),
                                                  ("twin", "small", "warning")]


def test_labels_compare_case_insensitively():
    shouty = {"name": "shouty", "labels": ["SELF-HOSTED", "Linux", "GPU"], "warm_runners": 1,
              "scope": {"owner": "ACME"}}
    assert pairs(config(SMALL, shouty)) == [("shouty", "small", "warning")]


def test_partly_shared_labels_are_no_cover():
    arm = {"name": "arm", "labels": ["self-hosted", "linux", "arm64"], "warm_runners": 1}
    assert pairs(config(LARGE, arm)) == []


def test_other_owner_shares_no_repository():
    other = LARGE | {"scope": {"owner": "someone-else"}, "warm_runners": 1}
    assert pairs(config(SMALL, other)) == []


@pytest.mark.parametrize(
    ("small_repos", "large_repos", "shared"),
    [
        ((), (), ()),  # both: every repository
        ((), ("api", "web"), ("api", "web")),  # one is all: the other's list
        (("api", "web"), (), ("api", "web")),
        (("api", "web"), ("WEB", "docs"), ("web",)),  # intersecting, case-insensitive
    ],
)
def test_scopes_that_share_repositories(small_repos, large_repos, shared):
    [overlap] = overlaps(config(SMALL | {"scope": {"owner": "acme", "repositories": small_repos}},
                                LARGE | {"scope": {"owner": "acme", "repositories": large_repos}}))
    assert overlap.repositories == shared


def test_scopes_with_disjoint_repositories_share_nothing():
    assert pairs(config(SMALL | {"scope": {"owner": "acme", "repositories": ["api"]}},
                        LARGE | {"scope": {"owner": "acme", "repositories": ["web"]}})) == []


def test_warnings_come_first():
    gpu = {"name": "gpu", "labels": ["self-hosted", "linux", "gpu"], "warm_runners": 1}
    assert pairs(config(SMALL, LARGE, gpu)) == [("gpu", "small", "warning"),
                                                ("large", "small", "note")]


def test_warning_line_says_what_to_do():
    [overlap] = overlaps(config(SMALL, LARGE | {"warm_runners": 2,
                                                "scope": {"owner": "acme",
                                                          "repositories": ["api", "web"]}}))
    assert overlap.describe() == (
        "warning: pool large (labels self-hosted, linux, large) covers pool small (labels "
        "self-hosted, linux) in scope acme/api, acme/web: large's 2 warm runner(s) take small's "
        "jobs first; give small a label large lacks and use it in runs-on, or drop large's warm "
        "runners")


def test_note_line_names_the_scope_and_the_hand_over():
    [overlap] = overlaps(config(SMALL, LARGE))
    line = overlap.describe()
    assert line.startswith("note: pool large (labels self-hosted, linux, large) covers pool "
                           "small (labels self-hosted, linux) in scope acme (all repositories): ")
    assert "hand-over keeps every job served" in line


# --- the command ---------------------------------------------------------------------------

def write(tmp_path: Path, *pools: str) -> Path:
    path = tmp_path / "pools.toml"
    path.write_text("\n".join(
        f'[[pool]]\nname = "{name}"\nlabels = [{labels}]\nscope = {{ owner = "acme" }}\n'
        f'image = "img"\n{extra}\n' for name, labels, extra in pools))
    return path


def check(*args: str) -> subprocess.CompletedProcess:
    """The command as an operator runs it, in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "chalicelib.pools", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


def assert_no_warning(result: subprocess.CompletedProcess) -> None:
    # runpy warns ("found in sys.modules") when pools.py is imported before it runs as __main__.
    assert "Warning" not in result.stderr, result.stderr


def test_command_clean_file_exits_0(tmp_path):
    path = write(tmp_path, ("a", '"linux", "x64"', "warm_runners = 2"),
                 ("b", '"linux", "arm64"', "warm_runners = 2"))
    result = check("check", str(path))
    assert_no_warning(result)
    assert (result.returncode, result.stdout) == (0, "ok: 2 pools, no pool's labels cover "
                                                     "another's\n")


def test_command_notes_only_exit_0(tmp_path):
    path = write(tmp_path, ("a", '"linux"', ""), ("b", '"linux", "large"', ""))
    result = check("check", str(path))
    assert_no_warning(result)
    assert result.returncode == 0
    assert result.stdout.startswith("note: pool b ") and result.stdout.count("\n") == 1


def test_command_warning_exits_1(tmp_path):
    path = write(tmp_path, ("a", '"linux"', ""), ("b", '"linux", "large"', "warm_runners = 1"))
    result = check("check", str(path))
    assert_no_warning(result)
    assert result.returncode == 1
    assert result.stdout.startswith("warning: pool b (labels linux, large) covers pool a ")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[[pool]]\nname = "a"\nlabels = ["x"]\nscope = { owner = "acme" }\nimage = "i"\n'
         '[[pool.warm_schedule]]\nstart = "18:00"\nend = "08:00"\nwarm_runners = 1\n',
         "error: invalid pools file .*pool.0.warm_schedule.0: .*wrap past midnight"),
        ("[[pool]\nname=", "error: cannot read pools file"),  # not TOML
    ],
)
def test_command_bad_file_exits_2_with_the_reason(tmp_path, content, message):
    path = tmp_path / "pools.toml"
    path.write_text(content)
    result = check("check", str(path))
    assert_no_warning(result)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert re.search(message, result.stderr), result.stderr


def test_missing_file_and_usage_errors_exit_2(tmp_path, capsys):
    assert main(["check", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read pools file" in capsys.readouterr().err
    assert main([]) == 2  # no command
    assert main(["lint", "x"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_command_help_exits_0():
    result = check("check", "--help")
    assert_no_warning(result)
    assert result.returncode == 0
    assert "Exit 0 when clean or notes only, 1 when" in " ".join(result.stdout.split())
    top = check("--help")
    assert top.returncode == 0 and "check" in top.stdout


@pytest.mark.parametrize(
    "path",
    [DEFAULT_POOLS_FILE, DEFAULT_POOLS_FILE.with_name("pools.production.example.toml"),
     ROOT / "benchmarks" / "scaling_pools.toml"],
    ids=["pools.toml", "pools.production.example.toml", "scaling_pools.toml"],
)
def test_bundled_pools_files_pass_the_check(path, capsys):
    assert main(["check", str(path)]) == 0, capsys.readouterr().out
    assert "warning" not in capsys.readouterr().out
