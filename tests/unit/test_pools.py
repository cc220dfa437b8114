"""The routing rule (DESIGN.md) over label sets, case, scope, ties, no labels, public repos."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from chalicelib.pools import NotRouted, PoolConfig, load_pools, route
from tests.conftest import TEST_POOLS


def config(*pools: dict) -> PoolConfig:
    base = {"image": "img", "scope": {"owner": "acme"}}
    return PoolConfig.model_validate({"pool": [base | pool for pool in pools]})


POOLS = config(
    {"name": "small", "labels": ["self-hosted", "linux", "x64"]},
    {"name": "large", "labels": ["self-hosted", "linux", "x64", "large"]},
    {"name": "gpu", "labels": ["self-hosted", "linux", "gpu"],
     "scope": {"owner": "acme", "repositories": ["ml"]}},
    {"name": "public", "labels": ["self-hosted", "oss"], "allow_public_repos": True},
)


def routed(labels, owner="acme", repo="app", private=True):
    decision = route(POOLS, labels, owner, repo, private)
    return decision.pool.name if decision.pool else decision.reason


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (["self-hosted", "linux", "x64"], "small"),  # exact match
        (["linux"], "small"),  # subset: fewest extra labels wins
        (["self-hosted"], "public") ,  # both small(2 extra) and public(1 extra)
        (["large"], "large"),  # only pool with the label
        (["x64", "large"], "large"),
        (["SELF-HOSTED", "Linux", "X64"], "small"),  # case-insensitive
        (["linux", "arm64"], NotRouted.NO_MATCHING_POOL),  # not a superset
        ([], NotRouted.NO_LABELS),  # a job with no labels is not ours
        (["ubuntu-latest"], NotRouted.NO_MATCHING_POOL),  # GitHub-hosted label
    ],
)
def test_route_label_sets(labels, expected):
    assert routed(labels) == expected


def test_self_hosted_label_not_required_of_the_job():
    assert routed(["x64"]) == "small"


def test_scope_other_owner_is_not_served():
    assert routed(["linux"], owner="someone-else") == NotRouted.NO_MATCHING_POOL


def test_scope_owner_is_case_insensitive():
    assert routed(["linux"], owner="ACME") == "small"


def test_scope_repository_list_limits_pool():
    assert routed(["gpu"], repo="ml") == "gpu"
    assert routed(["gpu"], repo="ML") == "gpu"
    assert routed(["gpu"], repo="web") == NotRouted.NO_MATCHING_POOL


def test_tie_on_extra_labels_is_broken_by_pool_name():
    tied = config({"name": "zeta", "labels": ["a", "b"]}, {"name": "alpha", "labels": ["a", "c"]})
    assert route(tied, ["a"], "acme", "r", True).pool.name == "alpha"


def test_public_repository_refused_without_opt_in():
    assert routed(["linux", "x64"], private=False) == NotRouted.PUBLIC_REPOSITORY


def test_public_repository_served_by_opted_in_pool():
    assert routed(["oss"], private=False) == "public"


def test_public_repository_skips_pools_without_opt_in_for_one_with_it():
    # "self-hosted" matches small (2 extra, no opt-in) and public (1 extra, opt-in).
    assert routed(["self-hosted"], private=False) == "public"


def test_duplicate_pool_names_rejected():
    with pytest.raises(ValidationError, match="duplicate pool names: a"):
        config({"name": "a", "labels": ["x"]}, {"name": "a", "labels": ["y"]})


@pytest.mark.parametrize(
    ("pool", "message"),
    [
        ({"name": "Bad Name", "labels": ["x"]}, "pattern"),
        ({"name": "p", "labels": []}, "at least 1"),
        ({"name": "p", "labels": ["has space"]}, "invalid runner label"),
        ({"name": "p", "labels": ["x"], "warm_runners": 5, "max_runners": 2}, "warm_runners"),
        ({"name": "p", "labels": ["x"], "scope": {"owner": "a", "repositories": ["a/b"]}},
         "name only"),
        ({"name": "p", "labels": ["x"], "cpus": 0}, "greater than 0"),
        ({"name": "p", "labels": ["x"], "unknown": 1}, "Extra inputs"),
    ],
)
def test_invalid_pool_rejected_with_reason(pool, message):
    with pytest.raises(ValidationError, match=message):
        config(pool)


def test_labels_are_normalised_and_deduplicated():
    pools = config({"name": "p", "labels": ["Linux", "linux", "X64"]})
    assert pools.pools[0].labels == ("linux", "x64")


def test_bundled_default_pools_load():
    pools = load_pools()
    assert set(pools.names) == {"linux-small", "linux-large", "gpu"}


def test_test_pools_file_loads():
    assert load_pools(TEST_POOLS).names == ("hosted-like", "schemas", "k8s")


def test_unreadable_pools_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "pools.toml"
    bad.write_text("[[pool]\nname=")
    with pytest.raises(ValueError, match="cannot read pools file"):
        load_pools(bad)
    with pytest.raises(ValueError, match="cannot read pools file"):
        load_pools(tmp_path / "missing.toml")
