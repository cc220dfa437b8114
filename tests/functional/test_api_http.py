"""The management API over real HTTP (devstack/api_server.py's gateway around
`api_app.handler`) against the moto server: each role on read and act routes, 401 and 403
bodies, an action's audit record, the drain/retire/override actions on real records, paginated
jobs with a tampered cursor, and the OpenAPI document."""

from __future__ import annotations

import json

import pytest
import requests

from chalicelib.api.tokens import mint, new_key_pair
from devstack.api_seed import ApiStack, seed

V1 = "/api/v1"

# Written here, not imported from chalicelib: what each role may do (issue 17).
ALLOWED = {
    ("GET", "/pools"): {"viewer", "operator", "admin"},
    ("GET", "/pools/linux"): {"viewer", "operator", "admin"},
    ("GET", "/jobs"): {"viewer", "operator", "admin"},
    ("GET", "/jobs/9001"): {"viewer", "operator", "admin"},
    ("GET", "/runners"): {"viewer", "operator", "admin"},
    ("GET", "/hosts"): {"viewer", "operator", "admin"},
    ("GET", "/analytics?pool=linux"): {"viewer", "operator", "admin"},
    ("GET", "/metrics"): {"viewer", "operator", "admin"},
    ("GET", "/me"): {"viewer", "operator", "admin"},
    ("GET", "/audit"): {"operator", "admin"},
    ("PUT", "/pools/linux/warm"): {"operator", "admin"},
    ("PUT", "/pools/linux/hosts"): {"admin"},
    ("POST", "/hosts/no-such-host/drain"): {"operator", "admin"},
    ("POST", "/runners/rh-no-such/retire"): {"operator", "admin"},
    ("POST", "/jobs/424242/retry"): {"operator", "admin"},
    ("POST", "/deliveries/1/redeliver"): {"admin"},
}
BODIES = {"/pools/linux/warm": {"warm_runners": 2},
          "/pools/linux/hosts": {"min_hosts": 0, "max_hosts": 2}}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    private = tmp_path_factory.mktemp("api-keys") / "api.pem"
    public = new_key_pair(private)
    return private.read_bytes(), public


@pytest.fixture(scope="module")
def stack(local_aws, keys, tmp_path_factory):
    """Tables and queues of their own, the API wired to them, served over HTTP."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", local_aws.endpoint_url)
        api = ApiStack(tmp_path_factory.mktemp("api"), keys).start()
        yield {"url": api.url, "names": api.names, "dynamodb": api.dynamodb,
               "service": api.service}
        api.stop()


def token(keys, role: str | None, **extra) -> str:
    return mint(keys[0], groups=[role] if role else None, sub=f"sub-{role}",
                username=f"{role}-user", **extra)


def call(stack, keys, method, path, role="viewer", body=None, raw_token=None):
    headers = {"User-Agent": "api-test/1"}
    if role or raw_token:
        headers["Authorization"] = f"Bearer {raw_token or token(keys, role)}"
    return requests.request(method, stack["url"] + V1 + path, json=body, headers=headers,
                            timeout=10)


@pytest.fixture(scope="module")
def seeded(stack):
    """devstack/api_seed.py's state: jobs in several states, hosts, runners, an override."""
    return seed(stack["dynamodb"], stack["names"])


@pytest.mark.parametrize("role", ["viewer", "operator", "admin"])
def test_each_role_gets_what_the_table_allows_and_403_otherwise(stack, keys, seeded, role):
    for (method, path), roles in ALLOWED.items():
        answer = call(stack, keys, method, path, role, body=BODIES.get(path.split("?")[0]))
        if role in roles:
            assert answer.status_code not in (401, 403, 422, 500), (role, method, path,
                                                                    answer.text)
        else:
            assert answer.status_code == 403, (role, method, path, answer.text)
            body = answer.json()
            assert body["error"] == "forbidden" and body["permission"], body


def test_without_a_valid_token_every_route_but_health_is_401(stack, keys):
    expired = mint(keys[0], groups=["admin"], ttl_s=-120)
    other_key = new_key_pair_text()
    wrong_key = mint(other_key, groups=["admin"])
    for raw, reason in ((None, "a valid token is required"), (expired, "token expired"),
                        (wrong_key, "signature")):
        answer = call(stack, keys, "GET", "/pools", role=None, raw_token=raw)
        assert answer.status_code == 401
        body = answer.json()
        assert body["status"] == 401 and body["error"] == "unauthorized"
        assert reason in body["message"]
        assert answer.headers["WWW-Authenticate"] == "Bearer"
    shallow = call(stack, keys, "GET", "/health", role=None)
    assert shallow.status_code == 200 and shallow.json() == {"status": "ok",
                                                             "dependencies": None}


def new_key_pair_text() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def test_a_token_in_no_group_is_signed_in_but_may_read_nothing(stack, keys):
    me = call(stack, keys, "GET", "/me", role=None, raw_token=token(keys, None))
    assert me.status_code == 200 and me.json()["role"] is None
    answer = call(stack, keys, "GET", "/pools", role=None, raw_token=token(keys, None))
    assert answer.status_code == 403 and answer.json()["permission"] == "read"


def audit_records(stack, keys):
    answer = call(stack, keys, "GET", "/audit?limit=200", "admin")
    assert answer.status_code == 200, answer.text
    return answer.json()["records"]


def test_a_403_is_audited_with_who_and_from_where(stack, keys):
    answer = call(stack, keys, "PUT", "/pools/linux/hosts", "operator",
                  body={"min_hosts": 0, "max_hosts": 1})
    assert answer.status_code == 403
    assert answer.json()["permission"] == "act:pools"
    denied = [r for r in audit_records(stack, keys)
              if r["outcome"] == "denied" and r["action"] == "PUT /api/v1/pools/{pool}/hosts"]
    assert denied, "the 403 was not audited"
    assert denied[0]["sub"] == "sub-operator" and denied[0]["role"] == "operator"
    assert denied[0]["source_ip"] == "127.0.0.1" and denied[0]["user_agent"] == "api-test/1"


def test_a_warm_target_change_is_applied_audited_and_bounded(stack, keys, seeded):
    answer = call(stack, keys, "PUT", "/pools/linux/warm", "operator",
                  body={"warm_runners": 3})
    assert answer.status_code == 200, answer.text
    assert answer.json()["effective"]["warm_runners"] == 3
    pool = call(stack, keys, "GET", "/pools/linux").json()
    assert pool["overrides"]["warm_runners"] == 3 and pool["warm_runners_configured"] == 1
    (record,) = [r for r in audit_records(stack, keys)
                 if r["action"] == "set_warm_target" and r["outcome"] == "ok"
                 and r["change"]["warm_runners_after"] == 3][:1]
    assert record["target"] == "pool:linux" and record["username"] == "operator-user"
    assert "warm_runners_before" in record["change"]
    over = call(stack, keys, "PUT", "/pools/linux/warm", "operator", body={"warm_runners": 7})
    assert over.status_code == 409 and "max_runners" in over.json()["message"]
    negative = call(stack, keys, "PUT", "/pools/linux/warm", "operator",
                    body={"warm_runners": -1})
    assert negative.status_code == 422


def test_drain_retires_an_idle_host_requests_a_busy_ones_and_refuses_twice(stack, keys,
                                                                          seeded):
    idle = call(stack, keys, "POST", "/hosts/host-idle/drain", "operator")
    assert idle.status_code == 200 and idle.json()["outcome"] == "retiring", idle.text
    busy = call(stack, keys, "POST", "/hosts/host-busy/drain", "operator")
    assert busy.status_code == 200 and busy.json()["outcome"] == "drain_requested", busy.text
    again = call(stack, keys, "POST", "/hosts/host-idle/drain", "operator")
    assert again.status_code == 409 and "retiring" in again.json()["message"]
    hosts = {h["host_id"]: h for h in call(stack, keys, "GET", "/hosts").json()["hosts"]}
    assert hosts["host-idle"]["state"] == "retiring"
    assert hosts["host-busy"]["drain_requested_at"] is not None
    missing = call(stack, keys, "POST", "/hosts/no-such-host/drain", "admin")
    assert missing.status_code == 404


def test_retire_is_for_idle_runners_only(stack, keys, seeded):
    assert call(stack, keys, "POST", "/runners/rh-busy/retire", "operator").status_code == 409
    idle = call(stack, keys, "POST", "/runners/rh-idle/retire", "operator")
    assert idle.status_code == 200 and idle.json()["outcome"] == "retire_requested"
    runners = {r["runner_name"]: r for r in
               call(stack, keys, "GET", "/runners?pool=linux").json()["runners"]}
    assert runners["rh-idle"]["retire_requested_at"] is not None
    assert set(runners) == {"rh-idle", "rh-busy"}  # the seats item is no runner


def test_retry_is_for_flagged_waiting_jobs_and_asks_github(stack, keys, seeded):
    taken = call(stack, keys, "POST", "/jobs/9001/retry", "operator")
    assert taken.status_code == 409 and "in_progress" in taken.json()["message"]
    unflagged = call(stack, keys, "POST", "/jobs/9002/retry", "operator")
    assert unflagged.status_code == 409 and "not flagged" in unflagged.json()["message"]
    flagged = call(stack, keys, "POST", "/jobs/9003/retry", "operator")
    assert flagged.status_code == 503 and "GitHub App" in flagged.json()["message"]
    redeliver = call(stack, keys, "POST", "/deliveries/5/redeliver", "admin")
    assert redeliver.status_code == 503 and "GitHub App" in redeliver.json()["message"]


def test_jobs_page_with_a_cursor_and_a_tampered_cursor_is_400(stack, keys, seeded):
    seen: list[int] = []
    cursor = None
    for _ in range(10):
        query = "/jobs?state=received&pool=linux&limit=2" + (f"&cursor={cursor}" if cursor
                                                              else "")
        page = call(stack, keys, "GET", query).json()
        seen += [job["job_id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sorted(seen) == list(range(9100, 9105))
    first = call(stack, keys, "GET", "/jobs?state=received&limit=2").json()
    tampered = first["next_cursor"][:-3] + ("AAA" if not first["next_cursor"].endswith("AAA")
                                            else "BBB")
    answer = call(stack, keys, "GET", f"/jobs?state=received&limit=2&cursor={tampered}")
    assert answer.status_code == 400 and answer.json()["error"] == "bad_request"
    other_query = call(stack, keys, "GET",
                       f"/jobs?state=claimed&limit=2&cursor={first['next_cursor']}")
    assert other_query.status_code == 400


def test_one_job_has_its_timeline_stages_runner_and_host(stack, keys, seeded):
    detail = call(stack, keys, "GET", "/jobs/9001").json()
    assert [e["stamp"] for e in detail["timeline"]] == [
        "received_at", "dispatched_at", "claimed_at", "runner_started_at", "in_progress_at"]
    stages = {s["stage"]: s for s in detail["stages"]}
    assert stages["enqueue"]["seconds"] == pytest.approx(0.1, abs=0.01)
    assert stages["runner_boot"]["seconds"] == pytest.approx(23, abs=0.01)
    assert stages["job"]["seconds"] is None and stages["job"]["reason"]
    assert detail["runner"]["runner_name"] == "rh-busy"
    assert detail["host"]["host_id"] == "host-busy"
    assert call(stack, keys, "GET", "/jobs/1").status_code == 404


def test_health_and_metrics_read_the_tables(stack, keys, seeded):
    deep = call(stack, keys, "GET", "/health").json()
    deps = {d["name"]: d for d in deep["dependencies"]}
    assert deps["dynamodb"]["ok"] is True and deps["sqs"]["ok"] is True
    assert deps["github_budget"]["ok"] is None and "memory" in deps["github_budget"]["detail"]
    assert deps["reconciler"]["detail"] == "no run recorded yet"
    # Deployed, `/health` gets no token (no authorizer): the details route always answers them.
    details = call(stack, keys, "GET", "/health/details", role="viewer").json()
    assert {d["name"] for d in details["dependencies"]} == set(deps)
    assert call(stack, keys, "GET", "/health/details", role=None).status_code == 401
    text = call(stack, keys, "GET", "/metrics").text
    assert 'runnerhub_jobs{pool="linux",state="received"} 5.0' in text
    assert 'runnerhub_slots{kind="total",pool="linux"}' in text


def test_the_openapi_document_is_valid_and_has_every_route_typed(stack, keys):
    from openapi_spec_validator import validate

    answer = requests.get(stack["url"] + V1 + "/openapi.json", timeout=10)
    assert answer.status_code == 200
    document = answer.json()
    validate(document)
    paths = {(m.upper(), p) for p, item in document["paths"].items() for m in item}
    expected = {("GET", "/health"), ("GET", "/health/details"), ("GET", "/me"),
                ("GET", "/metrics"), ("GET", "/pools"), ("GET", "/pools/{pool}"),
                ("PUT", "/pools/{pool}/warm"),
                ("PUT", "/pools/{pool}/hosts"), ("PUT", "/pools/{pool}/image"),
                ("GET", "/pools/{pool}/image-proposal"),
                ("POST", "/pools/{pool}/image-proposal/approve"),
                ("GET", "/jobs"), ("GET", "/jobs/{job_id}"),
                ("POST", "/jobs/{job_id}/retry"), ("GET", "/runners"),
                ("POST", "/runners/{runner_name}/retire"), ("GET", "/hosts"),
                ("POST", "/hosts/{host_id}/drain"),
                ("POST", "/deliveries/{delivery_id}/redeliver"), ("GET", "/audit"),
                ("GET", "/analytics")}
    assert paths == {(m, V1 + p) for m, p in expected}
    schemas = document["components"]["schemas"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                (content,) = response["content"].values()
                schema = content["schema"]
                assert schema, (method, path, status)
                if "$ref" in schema:
                    target = schemas[schema["$ref"].rsplit("/", 1)[-1]]
                    assert target.get("properties"), (method, path, status)
                else:
                    assert schema.get("type") == "string", (method, path, status)
    json.dumps(document)


def test_analytics_of_the_seeded_pool(stack, keys, seeded):
    figures = call(stack, keys, "GET", "/analytics?pool=linux&window_s=3600").json()
    stages = {s["stage"]: s for s in figures["stages"]}
    assert stages["runner_boot"]["p95_s"] == pytest.approx(23, abs=0.01)
    assert stages["job"]["p50_s"] is None and stages["job"]["reason"]
    # 9001-9003 waited 1 s for their webhook, 9100-9104 11 to 15 s.
    assert stages["webhook"]["samples"] == 8
    assert stages["webhook"]["p50_s"] == pytest.approx(11.5, abs=0.01)
    assert figures["bottleneck"] == "runner_boot"
    assert figures["utilisation"] == pytest.approx(2 / 8)  # host-busy: 2 of 4, host-idle 0 of 4
    assert figures["cross_pool"] == []
    assert call(stack, keys, "GET", "/analytics?pool=nope").status_code == 404


def test_bad_input_found_by_the_fuzzer_is_a_4xx_in_the_documented_shape(stack, keys):
    """benchmarks/fuzz_api.py found these 500s and an undocumented 422 body."""
    unknown = call(stack, keys, "GET", "/no-such-route", "admin")
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
    unroutable = call(stack, keys, "POST", "/runners/a%23b/retire", "admin")
    assert unroutable.status_code == 404, unroutable.text
    answer = requests.put(stack["url"] + V1 + "/pools/linux/warm", data=b"\xa3\xff",
                          headers={"Authorization": f"Bearer {token(keys, 'admin')}",
                                   "Content-Type": "application/json"}, timeout=10)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"] == [{"loc": ["body"], "msg": "the body is not UTF-8 text",
                                        "type": "json_invalid"}]
    invalid = call(stack, keys, "PUT", "/pools/linux/warm", "operator",
                   body={"warm_runners": "many"})
    assert invalid.status_code == 422
    (detail,) = invalid.json()["detail"]
    assert detail["loc"] == ["body", "warm_runners"] and detail["msg"] and detail["type"]


def test_a_retry_of_a_job_github_does_not_know_is_409_not_try_again_later(stack, keys, seeded,
                                                                          monkeypatch):
    from chalicelib.github.interface import GitHubError

    class NoSuchJob:
        def get_job(self, installation_id, repository, job_id):
            raise GitHubError(404, "GET", f"/repos/{repository}/actions/jobs/{job_id}",
                              "Not Found")

    monkeypatch.setattr(stack["service"].actions, "_github", lambda: NoSuchJob())
    answer = call(stack, keys, "POST", "/jobs/9003/retry", "operator")
    assert answer.status_code == 409, answer.text
    assert "GitHub has no job 9003" in answer.json()["message"]
