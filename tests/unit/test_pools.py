"""The routing rule (DESIGN.md) over label sets, case, scope, ties, no labels, public repos;
the warm-runner fields: schedules (edges, days, time zones, DST), their validation."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from chalicelib.pools import (
    WEEKDAYS,
    NotRouted,
    Pool,
    PoolConfig,
    load_pools,
    route,
    warm_ever,
    warm_target,
)
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


# --- warm runners ------------------------------------------------------------------------

BERLIN = ZoneInfo("Europe/Berlin")


def pool(**fields) -> Pool:
    return Pool.model_validate({"name": "p", "labels": ["x"], "image": "img",
                                "scope": {"owner": "acme"}, "max_runners": 10} | fields)


def window(start: str, end: str, warm: int, days=None) -> dict:
    fields = {"start": start, "end": end, "warm_runners": warm}
    return fields if days is None else fields | {"days": days}


def at(*parts: int, tz=UTC) -> float:
    return datetime(*parts, tzinfo=tz).timestamp()


OFFICE = pool(warm_runners=1, warm_schedule=[
    window("08:00", "18:00", 4, ["mon", "tue", "wed", "thu", "fri"])])


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        (at(2024, 1, 1, 12, 0), 4),  # Monday noon: inside
        (at(2024, 1, 1, 8, 0), 4),  # start is inside (half-open)
        (at(2024, 1, 1, 7, 59, 59), 1),  # a second before start: base
        (at(2024, 1, 1, 17, 59, 59), 4),  # a second before end: inside
        (at(2024, 1, 1, 18, 0), 1),  # end is outside
        (at(2024, 1, 6, 12, 0), 1),  # Saturday: not one of the window's days
    ],
)
def test_warm_target_inside_edges_and_outside(when, expected):
    assert warm_target(OFFICE, when) == expected


def test_warm_target_without_schedule_is_the_base():
    assert warm_target(pool(warm_runners=3), at(2024, 1, 1, 12)) == 3


def test_window_to_24_00_covers_the_day_up_to_midnight_and_not_the_next_day():
    mondays = pool(warm_schedule=[window("00:00", "24:00", 2, ["mon"])])
    assert warm_target(mondays, at(2023, 12, 31, 23, 59, 59)) == 0  # Sunday's last second
    assert warm_target(mondays, at(2024, 1, 1, 0, 0)) == 2  # Monday 00:00
    assert warm_target(mondays, at(2024, 1, 1, 23, 59, 59)) == 2
    assert warm_target(mondays, at(2024, 1, 2, 0, 0)) == 0  # Tuesday 00:00: end is exclusive


def test_warm_target_uses_the_day_and_time_in_the_pools_zone():
    mondays = pool(warm_timezone="Europe/Berlin",
                   warm_schedule=[window("00:00", "01:00", 2, ["mon"])])
    # Sunday 23:30 UTC is Monday 00:30 in Berlin (CET, UTC+1).
    assert warm_target(mondays, at(2023, 12, 31, 23, 30)) == 2
    assert warm_target(mondays, at(2024, 1, 1, 0, 30)) == 0  # Monday 01:30 in Berlin


def test_warm_window_follows_wall_clock_across_the_dst_change():
    berlin = pool(warm_timezone="Europe/Berlin", warm_schedule=[window("08:00", "18:00", 3)])
    # Saturday 2024-03-30 is CET (UTC+1): 08:00 local = 07:00 UTC.
    assert warm_target(berlin, at(2024, 3, 30, 6, 59)) == 0
    assert warm_target(berlin, at(2024, 3, 30, 7, 0)) == 3
    # Sunday 2024-03-31 02:00 CET became 03:00 CEST (UTC+2): 08:00 local = 06:00 UTC.
    assert warm_target(berlin, at(2024, 3, 31, 5, 59)) == 0
    assert warm_target(berlin, at(2024, 3, 31, 6, 0)) == 3
    assert warm_target(berlin, at(2024, 3, 31, 16, 0)) == 0  # 18:00 CEST


def test_window_in_the_hour_dst_skips_never_applies_that_day():
    skipped = pool(warm_timezone="Europe/Berlin", warm_schedule=[window("02:00", "03:00", 5)])
    minutes = [at(2024, 3, 31, 0, 0) + 60 * m for m in range(24 * 60)]
    assert {warm_target(skipped, when) for when in minutes} == {0}
    assert warm_target(skipped, at(2024, 3, 30, 1, 30)) == 5  # the day before: 02:30 CET


def test_window_in_the_hour_dst_repeats_applies_both_times():
    repeated = pool(warm_timezone="Europe/Berlin", warm_schedule=[window("02:00", "03:00", 5)])
    assert warm_target(repeated, at(2024, 10, 27, 0, 30)) == 5  # 02:30 CEST
    assert warm_target(repeated, at(2024, 10, 27, 1, 30)) == 5  # 02:30 CET, again
    assert warm_target(repeated, at(2024, 10, 27, 2, 0)) == 0  # 03:00 CET


def test_first_window_in_file_order_wins():
    layered = pool(warm_runners=1, warm_schedule=[window("08:00", "18:00", 4),
                                                  window("00:00", "24:00", 2)])
    assert warm_target(layered, at(2024, 1, 1, 12)) == 4
    assert warm_target(layered, at(2024, 1, 1, 20)) == 2
    reversed_order = layered.model_copy(
        update={"warm_schedule": tuple(reversed(layered.warm_schedule))})
    assert warm_target(reversed_order, at(2024, 1, 1, 12)) == 2


def test_warm_ever_is_the_most_of_base_and_windows():
    assert warm_ever(pool(warm_runners=3)) == 3
    assert warm_ever(pool(warm_runners=1, warm_schedule=[window("08:00", "18:00", 4),
                                                         window("18:00", "20:00", 2)])) == 4
    assert warm_ever(pool(warm_runners=5, warm_schedule=[window("08:00", "18:00", 0)])) == 5
    assert warm_ever(pool()) == 0


def test_warm_defaults():
    plain = pool()
    assert (plain.warm_runners, plain.warm_idle_limit_s, plain.warm_schedule,
            plain.warm_timezone) == (0, 1800.0, (), "UTC")
    assert pool(warm_schedule=[window("08:00", "09:00", 1)]).warm_schedule[0].days == WEEKDAYS


def test_window_days_are_lower_cased_and_deduplicated():
    days = pool(warm_schedule=[window("08:00", "09:00", 1, ["MON", "Tue", "mon"])])
    assert days.warm_schedule[0].days == ("mon", "tue")


def test_warm_schedule_in_toml(tmp_path):
    path = tmp_path / "pools.toml"
    path.write_text("""
[[pool]]
name = "office"
labels = ["self-hosted", "linux"]
scope = { owner = "acme" }
image = "img"
max_runners = 8
warm_runners = 1
warm_idle_limit_s = 600
warm_timezone = "Europe/Berlin"

[[pool.warm_schedule]]
days = ["mon","tue","wed","thu","fri"]
start = "08:00"
end = "18:00"
warm_runners = 4
""")
    office = load_pools(path).by_name("office")
    assert office.warm_idle_limit_s == 600.0
    assert office.warm_schedule[0].days == ("mon", "tue", "wed", "thu", "fri")
    assert warm_target(office, at(2024, 1, 1, 8, 0, tz=BERLIN)) == 4
    assert warm_target(office, at(2024, 1, 1, 7, 59, tz=BERLIN)) == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"warm_schedule": [window("8:00", "18:00", 1)]}, "'8:00' is not HH:MM"),
        ({"warm_schedule": [window("08:60", "18:00", 1)]}, "not HH:MM"),
        ({"warm_schedule": [window("08:00", "25:00", 1)]}, "not HH:MM"),
        ({"warm_schedule": [window("0800", "1800", 1)]}, "not HH:MM"),
        ({"warm_schedule": [window("08:00", "24:01", 1)]}, "not HH:MM"),
        ({"warm_schedule": [window("24:00", "24:00", 1)]}, "cannot start at 24:00"),
        ({"warm_schedule": [window("22:00", "06:00", 1)]},
         r"wrap past midnight, split it into two \(22:00-24:00 on one day and 00:00-06:00"),
        ({"warm_schedule": [window("08:00", "08:00", 1)]}, "start must be before end"),
        ({"warm_schedule": [window("08:00", "18:00", 1, ["monday"])]}, "unknown day 'monday'"),
        ({"warm_schedule": [window("08:00", "18:00", 1, [])]}, "at least 1"),
        ({"warm_schedule": [window("08:00", "18:00", -1)]}, "greater than or equal to 0"),
        ({"warm_schedule": [window("08:00", "18:00", 1) | {"extra": 1}]}, "Extra inputs"),
        ({"warm_timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"warm_timezone": "europe/berlin"}, "unknown time zone"),
        ({"warm_timezone": "/etc/localtime"}, "unknown time zone"),
        ({"warm_timezone": ""}, "unknown time zone"),
        ({"warm_idle_limit_s": 4}, "greater than or equal to 5"),
        ({"warm_idle_limit_s": 86401}, "less than or equal to 86400"),
        ({"max_runners": 3, "warm_schedule": [window("00:00", "01:00", 1),
                                              window("08:00", "18:00", 4, ["mon"])]},
         r"pool p: warm_schedule window 2 \(mon 08:00-18:00\) asks for 4 warm runners, "
         r"above max_runners 3"),
    ],
)
def test_invalid_warm_settings_rejected_with_reason(fields, message):
    with pytest.raises(ValidationError, match=message):
        pool(**fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"warm_runners": 1},  # every repository of the owner
        {"warm_runners": 1, "scope": {"owner": "acme", "repositories": ["a", "b"]}},
        {"warm_schedule": [window("08:00", "18:00", 1)]},  # warm only in a window
    ],
)
def test_repo_scoped_warm_runners_need_exactly_one_repository(fields):
    with pytest.raises(ValidationError, match="pool p: warm runners with runner_scope"):
        pool(runner_scope="repo", **fields)


def test_repo_scoped_pool_without_warm_runners_or_with_one_repository_is_accepted():
    assert pool(runner_scope="repo").warm_runners == 0
    one = pool(runner_scope="repo", warm_runners=2,
               scope={"owner": "acme", "repositories": ["app"]})
    assert warm_ever(one) == 2


# --- isolation ------------------------------------------------------------------------------

def test_isolation_defaults_are_the_hardened_profile():
    found = pool()
    assert (found.isolation, found.egress_allow, found.on_violation) == ("hardened", (), "record")
    assert found.disk_mb == 20480


@pytest.mark.parametrize(("fields", "message"), [
    ({"isolation": "none"}, "isolation"),
    ({"egress_allow": ["10.0.0.0/33"]}, "egress_allow '10.0.0.0/33'"),
    ({"egress_allow": ["10.0.0.0/8:0"]}, "port must be 1-65535"),
    ({"egress_allow": ["github.com:443"]}, "egress_allow 'github.com:443'"),
    ({"disk_mb": 100}, "disk_mb"),
    ({"on_violation": "kill"}, "on_violation"),
])
def test_bad_isolation_settings_are_refused_with_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        pool(**fields)


def test_egress_rules_parse_cidr_and_port():
    assert pool(egress_allow=["140.82.112.0/20:443", "1.2.3.4"]).egress_allow == (
        "140.82.112.0/20:443", "1.2.3.4")
