"""The management API's pure parts: the role x route table, local and Cognito identities,
the append-only audit log, page cursors, percentiles and the bottleneck, overrides' limits."""

from __future__ import annotations

import logging
import time

import pytest
from moto import mock_aws

from chalicelib import aws
from chalicelib.api import stats
from chalicelib.api.audit import (
    AlreadyRecorded,
    DynamoAuditLog,
    MemoryAuditLog,
    new_record,
)
from chalicelib.api.auth import LocalVerifier, Unauthenticated, authenticate, groups_of
from chalicelib.api.pages import BadCursor, Cursors
from chalicelib.api.permissions import PUBLIC, ROUTES, SIGNED_IN, needed, permissions_of, roles_of
from chalicelib.api.tokens import main as tokens_main
from chalicelib.api.tokens import mint, new_key_pair
from chalicelib.overrides import (
    OverrideRejected,
    PoolOverrides,
    check_hosts,
    check_warm,
    effective,
)
from chalicelib.pools import Pool
from chalicelib.resources import AUDIT_TABLE
from devstack.resources import create_tables

V = "viewer"
O = "operator"  # noqa: E741
A = "admin"
# Written here, not imported: which roles may use each route (issue 17). PUBLIC: no token.
EXPECTED = {
    ("GET", "/api/v1/health"): "public",
    ("GET", "/api/v1/health/details"): {V, O, A},
    ("GET", "/api/v1/openapi.json"): "public",
    ("GET", "/api/v1/dashboard"): "public",
    ("GET", "/api/v1/dashboard/config"): "public",
    ("GET", "/api/v1/me"): {V, O, A, None},
    ("GET", "/api/v1/metrics"): {V, O, A},
    ("GET", "/api/v1/pools"): {V, O, A},
    ("GET", "/api/v1/pools/{pool}"): {V, O, A},
    ("PUT", "/api/v1/pools/{pool}/warm"): {O, A},
    ("PUT", "/api/v1/pools/{pool}/hosts"): {A},
    ("PUT", "/api/v1/pools/{pool}/image"): {A},
    ("GET", "/api/v1/pools/{pool}/image-proposal"): {V, O, A},
    ("POST", "/api/v1/pools/{pool}/image-proposal/approve"): {O, A},
    ("GET", "/api/v1/jobs"): {V, O, A},
    ("GET", "/api/v1/jobs/{job_id}"): {V, O, A},
    ("POST", "/api/v1/jobs/{job_id}/retry"): {O, A},
    ("GET", "/api/v1/runners"): {V, O, A},
    ("POST", "/api/v1/runners/{runner_name}/retire"): {O, A},
    ("GET", "/api/v1/hosts"): {V, O, A},
    ("POST", "/api/v1/hosts/{host_id}/drain"): {O, A},
    ("POST", "/api/v1/deliveries/{delivery_id}/redeliver"): {A},
    ("GET", "/api/v1/audit"): {O, A},
    ("GET", "/api/v1/analytics"): {V, O, A},
}


def test_the_route_table_matches_the_roles_written_in_this_test():
    assert set(ROUTES) == set(EXPECTED)
    for route, roles in EXPECTED.items():
        need = needed(*route)
        if roles == "public":
            assert need == PUBLIC, route
            continue
        for role in (V, O, A, None):
            granted = permissions_of(roles_of([role] if role else []))
            allowed = need == SIGNED_IN or need in granted
            assert allowed == (role in roles), (route, role, need)


def test_an_unknown_route_is_refused_not_allowed():
    with pytest.raises(KeyError):
        needed("DELETE", "/api/v1/pools")


# --- identities ---


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    private = tmp_path_factory.mktemp("keys") / "k.pem"
    public = new_key_pair(private)
    return private.read_bytes(), public.read_text()


def local(keys, token):
    event = {"headers": {"Authorization": f"Bearer {token}"}}
    return authenticate(event, "local", LocalVerifier(keys[1], "runnerhub-local",
                                                       "runnerhub-api"))


def test_a_local_token_gives_its_groups_roles(keys):
    who = local(keys, mint(keys[0], groups=["viewer", "operator"], sub="u1", username="ann"))
    assert who.sub == "u1" and who.username == "ann" and who.role.value == "operator"


@pytest.mark.parametrize(("case", "message"), [
    ("expired", "token expired"),
    ("wrong_key", "signature"),
    ("wrong_issuer", "issuer"),
    ("wrong_audience", "audience"),
    ("access_token_wrong_client", "audience"),
    ("no_token_use", "token_use"),
    ("garbage", "not valid"),
])
def test_bad_local_tokens_are_401_with_the_reason(keys, tmp_path, case, message):
    other = new_key_pair(tmp_path / "other.pem")
    tokens = {
        "expired": lambda: mint(keys[0], groups=["admin"], ttl_s=-120),
        "wrong_key": lambda: mint((tmp_path / "other.pem").read_bytes(), groups=["admin"]),
        "wrong_issuer": lambda: mint(keys[0], groups=["admin"], issuer="someone-else"),
        "wrong_audience": lambda: mint(keys[0], groups=["admin"], audience="another-app"),
        "access_token_wrong_client": lambda: mint(keys[0], groups=["admin"],
                                                  token_use="access", audience="x"),
        "no_token_use": lambda: mint(keys[0], groups=["admin"], extra={"token_use": "refresh"}),
        "garbage": lambda: "not.a.jwt",
    }
    assert other.is_file()
    with pytest.raises(Unauthenticated, match=message):
        local(keys, tokens[case]())


def test_missing_or_unknown_groups_give_no_role_and_no_permission(keys):
    missing = local(keys, mint(keys[0], groups=None))
    unknown = local(keys, mint(keys[0], groups=["root", "Administrators"]))
    for who in (missing, unknown):
        assert who.role is None and not who.permissions


def test_an_access_token_names_its_client_in_client_id(keys):
    who = local(keys, mint(keys[0], groups=["viewer"], token_use="access"))
    assert who.role.value == "viewer"


def test_no_authorization_header_is_no_identity_and_a_bad_scheme_is_401(keys):
    verifier = LocalVerifier(keys[1], "runnerhub-local", "runnerhub-api")
    assert authenticate({"headers": {}}, "local", verifier) is None
    with pytest.raises(Unauthenticated, match="Bearer"):
        authenticate({"headers": {"authorization": "Basic abc"}}, "local", verifier)


@pytest.mark.parametrize("claim", ["[admin viewer]", "admin,viewer", '["admin","viewer"]',
                                   ["admin", "viewer"]])
def test_cognito_claims_as_api_gateway_passes_them(claim):
    event = {"requestContext": {"authorizer": {"claims": {
        "sub": "abc", "cognito:username": "bob", "cognito:groups": claim}}}}
    who = authenticate(event, "cognito", None)
    assert who.role.value == "admin" and who.username == "bob"
    assert set(groups_of(claim)) == {"admin", "viewer"}


def test_cognito_mode_ignores_a_bearer_header_without_authorizer_claims(keys):
    event = {"headers": {"Authorization": f"Bearer {mint(keys[0], groups=['admin'])}"}}
    assert authenticate(event, "cognito", None) is None


def test_the_token_cli_makes_a_key_and_a_viewer_token(tmp_path, capsys, keys):
    key = tmp_path / "cli.pem"
    assert tokens_main(["--new-key", str(key)]) == 0
    capsys.readouterr()
    assert tokens_main(["--role", "viewer", "--key", str(key)]) == 0
    token = capsys.readouterr().out.strip()
    verifier = LocalVerifier((tmp_path / "cli.pem.pub").read_text(), "runnerhub-local",
                             "runnerhub-api")
    who = authenticate({"headers": {"authorization": f"Bearer {token}"}}, "local", verifier)
    assert who.role.value == "viewer"
    assert tokens_main(["--role", "viewer", "--key", str(tmp_path / "absent.pem")]) == 2


# --- the audit log ---


def record(now: float, action: str = "drain_host"):
    return new_record(now=now, action=action, outcome="ok", target="host:h1", sub="u1",
                      username="ann", role="operator", source_ip="127.0.0.1",
                      change={"warm_runners_before": None, "warm_runners_after": 2})


@pytest.fixture(params=["memory", "dynamodb"])
def audit_log(request):
    cursors = Cursors("test")
    if request.param == "memory":
        yield MemoryAuditLog(cursors)
        return
    with mock_aws():
        client = aws.client("dynamodb")
        create_tables(client)
        yield DynamoAuditLog(client, AUDIT_TABLE.default_name, cursors)


def test_the_audit_log_refuses_a_second_put_of_the_same_key(audit_log):
    first = record(1_800_000_000.0)
    audit_log.append(first)
    replacement = first.model_copy(update={"outcome": "error", "reason": "rewritten"})
    with pytest.raises(AlreadyRecorded):
        audit_log.append(replacement)
    (kept,), _ = audit_log.page(10, None, 1_800_000_001.0)
    assert kept == first


def test_audit_pages_are_newest_first_across_days(audit_log):
    day = 86400.0
    base = 1_800_000_000.0
    written = [record(base - n * day / 2, action=f"a{n}") for n in range(7)]
    for item in written:
        audit_log.append(item)
    seen, cursor = [], None
    for _ in range(20):
        page, cursor = audit_log.page(3, cursor, base + 1)
        seen += page
        if cursor is None:
            break
    assert [r.action for r in seen] == [f"a{n}" for n in range(7)]
    with pytest.raises(BadCursor):
        audit_log.page(3, "bm90IGEgY3Vyc29y", base)


def test_each_audit_record_is_also_a_json_log_line(caplog):
    log = MemoryAuditLog()
    with caplog.at_level(logging.INFO, logger="runnerhub.audit"):
        log.append(record(time.time()))
    (line,) = [r for r in caplog.records if r.name == "runnerhub.audit"]
    assert line.action == "drain_host" and line.sub == "u1" and line.outcome == "ok"


# --- cursors ---


def test_a_tampered_or_foreign_cursor_is_refused():
    cursors = Cursors("secret")
    cursor = cursors.encode("jobs|received", {"job_id": {"N": "5"}})
    assert cursors.decode("jobs|received", cursor) == {"job_id": {"N": "5"}}
    flipped = cursor[:10] + ("A" if cursor[10] != "A" else "B") + cursor[11:]
    for bad in (flipped, cursor[:-4], "", "%%%"):
        with pytest.raises(BadCursor):
            cursors.decode("jobs|received", bad)
    with pytest.raises(BadCursor, match="another query"):
        cursors.decode("jobs|claimed", cursor)
    with pytest.raises(BadCursor):
        Cursors("other secret").decode("jobs|received", cursor)


# --- analytics ---


def test_percentiles_interpolate_between_ranks():
    assert stats.percentile([], 50) is None
    assert stats.percentile([4.0], 95) == 4.0
    assert stats.percentile([1, 2, 3, 4], 50) == 2.5
    assert stats.percentile(list(range(1, 101)), 95) == pytest.approx(95.05)
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def job(job_id, **stamps):
    return {"job_id": job_id, "pool": "linux", **stamps}


def test_stages_of_a_job_and_the_bottleneck_is_the_largest_wait_p95():
    claimed = job(1, created_at="2026-01-01T00:00:00Z", received_at=1767225600.5,
                  dispatched_at=1767225600.6, claimed_at=1767225601.0,
                  runner_started_at=1767225602.0, in_progress_at=1767225610.0,
                  completed_at=1767225700.0)
    runner = {"job_id": 1, "jit_s": 0.3, "container_start_s": 0.7}
    stages = stats.job_stages(claimed, runner)
    assert stages == {"webhook": 0.5, "enqueue": 0.1, "claim": 0.4, "jit": 0.3,
                      "container_start": 0.7, "runner_boot": 8.0, "job": 90.0}
    warm = job(2, received_at=10.0, in_progress_at=10.2)  # a warm runner took it
    assert stats.job_stages(warm, None)["claim"] is None
    figures = stats.stage_figures([stages, stats.job_stages(warm, None)])
    assert stats.bottleneck(figures) == "runner_boot"  # the job's own run time is no wait
    assert stats.bottleneck(stats.stage_figures([])) is None


def test_idle_warm_seconds_and_cross_pool_runs():
    runners = [
        {"runner_name": "a", "pool": "linux", "warm_at": 100.0, "warm_taken_at": 160.0},
        {"runner_name": "b", "pool": "linux", "warm_at": 50.0},  # still warm
        {"runner_name": "c", "pool": "gpu", "warm_at": 0.0},
    ]
    assert stats.idle_warm_seconds(runners, "linux", since=90.0, now=200.0) == 60.0 + 110.0
    jobs = [job(1, runner_name="c"), job(2, runner_name="a"), job(3)]
    assert stats.cross_pool(jobs, {r["runner_name"]: r for r in runners}) == {"gpu": 1}


# --- overrides ---


def pool(**fields):
    return Pool.model_validate({"name": "linux", "labels": ["linux"],
                                "scope": {"owner": "o"}, "image": "i", "max_runners": 4,
                                "warm_runners": 1, **fields})


def test_overrides_stay_within_the_pools_file_and_the_group():
    p = pool()
    assert effective(p, None, 0.0).warm_runners == 1
    assert effective(p, PoolOverrides(warm_runners=3), 0.0).warm_runners == 3
    # A pools file lowered after the override: the override is clamped, not obeyed.
    assert effective(pool(max_runners=2, warm_runners=0), PoolOverrides(warm_runners=3),
                     0.0).warm_runners == 2
    clamped = effective(p, PoolOverrides(min_hosts=5, max_hosts=9), 0.0, 1, 4)
    assert (clamped.min_hosts, clamped.max_hosts) == (4, 4)
    with pytest.raises(OverrideRejected, match="max_runners"):
        check_warm(p, 5)
    with pytest.raises(OverrideRejected, match="above max_hosts"):
        check_hosts(p, 3, 2, None, None)
    with pytest.raises(OverrideRejected, match="outside"):
        check_hosts(p, None, 9, 0, 4)
    check_hosts(p, 1, 4, 1, 4)


def test_the_webhook_never_imports_the_api():
    """The API is its own Lambda: the webhook's cold start must not pay for it."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import sys, app; from chalicelib import wiring; "
            "print(sorted(m for m in sys.modules if m == 'api_app' "
            "or m.startswith(('chalicelib.api', 'prometheus_client', 'jwt.algorithms'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout.strip()
    assert out == "[]"
