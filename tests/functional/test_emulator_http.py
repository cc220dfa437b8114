"""The emulator's REST API over real HTTP on loopback: auth, runners, jobs, errors, headers,
the GHES prefix, the deliveries log and the introspection endpoints."""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest
import requests

from emulator import AppConfig, Emulator, EmulatorConfig, InstallationConfig, RunnerGroupConfig
from emulator.testing import InProcessRunner, WebhookReceiver, app_jwt, generate_app_key

APP_ID = 4242
ORG = "octo-org"
RATE_HEADERS = (
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "x-ratelimit-used",
    "x-ratelimit-resource",
)


@pytest.fixture(scope="module")
def keys():
    return generate_app_key()


def make_config(keys, **overrides) -> EmulatorConfig:
    app = AppConfig(
        app_id=APP_ID,
        public_key_pem=keys[1],
        installations=[
            InstallationConfig(
                id=1001,
                account=ORG,
                runner_groups=[
                    RunnerGroupConfig(id=1, name="Default"),
                    RunnerGroupConfig(id=7, name="public-ok", allows_public_repositories=True),
                ],
            ),
            InstallationConfig(
                id=1002, account="alice", account_type="User", repositories=["dotfiles"]
            ),
        ],
    )
    return EmulatorConfig(apps=[app], **overrides)


@pytest.fixture
def receiver():
    with WebhookReceiver() as rx:
        yield rx


@pytest.fixture
def emu(keys, receiver):
    with Emulator(
        make_config(keys, webhook_url=receiver.url, webhook_secret="s", lost_runner_timeout_s=1.0)
    ) as emulator:
        yield emulator


class Client:
    def __init__(self, emu, keys):
        self.base = emu.base_url
        self.keys = keys
        self.session = requests.Session()

    def jwt_headers(self):
        return {"Authorization": f"Bearer {app_jwt(APP_ID, self.keys[0])}"}

    def token(self, installation_id=1001, **body) -> str:
        resp = self.session.post(
            f"{self.base}/app/installations/{installation_id}/access_tokens",
            headers=self.jwt_headers(),
            json=body or None,
        )
        assert resp.status_code == 201, resp.text
        return resp.json()["token"]

    def call(self, method, path, token=None, **kw):
        headers = {"Authorization": f"token {token}"} if token else {}
        return self.session.request(method, f"{self.base}{path}", headers=headers, timeout=10, **kw)


@pytest.fixture
def client(emu, keys):
    return Client(emu, keys)


def jit(
    client, token, name="runner-1", labels=("self-hosted", "linux"), group=1, scope=f"/orgs/{ORG}"
):
    return client.call(
        "POST",
        f"{scope}/actions/runners/generate-jitconfig",
        token,
        json={"name": name, "runner_group_id": group, "labels": list(labels)},
    )


# -- App auth ----------------------------------------------------------------------------------


def test_app_jwt_gets_a_one_hour_installation_token(client):
    before = time.time()
    resp = client.session.post(
        f"{client.base}/app/installations/1001/access_tokens", headers=client.jwt_headers()
    )
    assert resp.status_code == 201
    body = resp.json()
    assert body["token"].startswith("ghs_")
    expires = time.mktime(time.strptime(body["expires_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert before + 3590 <= expires <= time.time() + 3601
    assert resp.headers["Content-Type"].startswith("application/json")


def test_expired_jwt_is_401_with_githubs_body(client, keys):
    now = time.time()
    token = app_jwt(APP_ID, keys[0], iat=now - 1200, exp=now - 600)
    resp = client.session.post(
        f"{client.base}/app/installations/1001/access_tokens",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert resp.status_code == 401
    body = resp.json()
    assert body["message"].startswith("'Expiration time' claim ('exp')")
    assert body["documentation_url"].startswith("https://docs.github.com/")


def test_jwt_signed_by_wrong_key_is_401(client):
    other_private, _ = generate_app_key()
    forged = app_jwt(APP_ID, other_private)
    resp = client.session.post(
        f"{client.base}/app/installations/1001/access_tokens",
        headers={"Authorization": f"Bearer {forged}"},
    )
    assert (resp.status_code, resp.json()["message"]) == (
        401,
        "A JSON web token could not be decoded",
    )


def test_unknown_installation_is_404(client):
    resp = client.session.post(
        f"{client.base}/app/installations/999/access_tokens", headers=client.jwt_headers()
    )
    assert (resp.status_code, resp.json()["message"]) == (404, "Not Found")


def test_org_and_repo_installation_lookup(client):
    org = client.session.get(f"{client.base}/orgs/{ORG}/installation", headers=client.jwt_headers())
    assert org.status_code == 200
    assert (org.json()["id"], org.json()["account"]["login"], org.json()["app_id"]) == (
        1001,
        ORG,
        APP_ID,
    )
    repo = client.session.get(
        f"{client.base}/repos/alice/dotfiles/installation", headers=client.jwt_headers()
    )
    assert (repo.status_code, repo.json()["id"]) == (200, 1002)
    missing = client.session.get(
        f"{client.base}/repos/alice/private-stuff/installation", headers=client.jwt_headers()
    )
    assert missing.status_code == 404
    nobody = client.session.get(
        f"{client.base}/orgs/nobody/installation", headers=client.jwt_headers()
    )
    assert nobody.status_code == 404


@pytest.mark.parametrize("authorization", [None, "token ghs_doesnotexist", "Bearer x.y.z"])
def test_runner_endpoints_require_an_installation_token(client, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    resp = client.session.get(f"{client.base}/orgs/{ORG}/actions/runners", headers=headers)
    assert resp.status_code == 401
    body = resp.json()
    assert body["message"] in ("Bad credentials", "Requires authentication")
    assert body["documentation_url"] == "https://docs.github.com/rest"


def test_token_of_another_account_cannot_see_org_runners(client):
    alice = client.token(1002)
    assert client.call("GET", f"/orgs/{ORG}/actions/runners", alice).status_code == 404


def test_rate_limit_headers_on_every_answer(client):
    token = client.token()
    answers = [
        client.call("GET", f"/orgs/{ORG}/actions/runners", token),
        client.call("GET", f"/orgs/{ORG}/actions/runners", token),
        client.call("GET", f"/orgs/{ORG}/actions/runners", "ghs_bad"),
        client.call("GET", "/no/such/path", token),
        jit(client, token, name=""),
    ]
    for resp in answers:
        for header in RATE_HEADERS:
            assert header in resp.headers, (resp.status_code, header)
    assert (
        int(answers[1].headers["x-ratelimit-used"])
        == int(answers[0].headers["x-ratelimit-used"]) + 1
    )
    assert answers[0].headers["x-ratelimit-limit"] == "5000"
    assert answers[2].headers["x-ratelimit-limit"] == "60"  # bad token counts as anonymous
    assert answers[3].status_code == 404 and answers[3].json()["message"] == "Not Found"


# -- runners -----------------------------------------------------------------------------------


def test_generate_jitconfig_answers_201_with_an_offline_runner(client):
    resp = jit(client, client.token(), labels=["self-hosted", "linux", "gpu"])
    assert resp.status_code == 201
    body = resp.json()
    runner = body["runner"]
    assert (runner["name"], runner["status"], runner["busy"]) == ("runner-1", "offline", False)
    assert {(lab["name"], lab["type"]) for lab in runner["labels"]} == {
        ("self-hosted", "read-only"),
        ("linux", "read-only"),
        ("gpu", "custom"),
    }
    assert all(isinstance(lab["id"], int) for lab in runner["labels"])
    assert isinstance(body["encoded_jit_config"], str) and body["encoded_jit_config"]


def test_generate_jitconfig_duplicate_name_is_409(client):
    token = client.token()
    assert jit(client, token, name="dup").status_code == 201
    assert jit(client, token, name="dup").status_code == 409


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "labels": ["a"]},  # no runner group
        {"runner_group_id": 1, "labels": ["a"]},  # no name
        {"name": "x", "runner_group_id": 1},  # no labels
        {"name": "x", "runner_group_id": 1, "labels": []},
        {"name": "x", "runner_group_id": 1, "labels": ["a"] * 101},
        {"name": "x", "runner_group_id": "1", "labels": ["a"]},
    ],
)
def test_generate_jitconfig_invalid_body_is_422(client, body):
    resp = client.call(
        "POST", f"/orgs/{ORG}/actions/runners/generate-jitconfig", client.token(), json=body
    )
    assert resp.status_code == 422
    assert resp.json()["message"].startswith("Invalid request.")


def test_generate_jitconfig_with_100_labels_is_accepted(client):
    labels = [f"l{i}" for i in range(100)]
    assert jit(client, client.token(), labels=labels).status_code == 201


def test_generate_jitconfig_unknown_group_is_404(client):
    assert jit(client, client.token(), group=99).status_code == 404


def test_generate_jitconfig_bad_json_is_400(client):
    resp = client.session.post(
        f"{client.base}/orgs/{ORG}/actions/runners/generate-jitconfig",
        headers={"Authorization": f"token {client.token()}", "Content-Type": "application/json"},
        data="{not json",
    )
    assert (resp.status_code, resp.json()["message"]) == (400, "Problems parsing JSON")


def test_repo_scope_runners(client):
    token = client.token(1002)
    scope = "/repos/alice/dotfiles"
    resp = jit(client, token, name="repo-runner", scope=scope)
    assert resp.status_code == 201
    runner_id = resp.json()["runner"]["id"]
    listed = client.call("GET", f"{scope}/actions/runners", token).json()
    assert [r["id"] for r in listed["runners"]] == [runner_id]
    assert client.call("GET", f"{scope}/actions/runners/{runner_id}", token).status_code == 200
    # the same runner is not visible at another scope
    other = client.token()
    assert client.call("GET", f"/orgs/{ORG}/actions/runners/{runner_id}", other).status_code == 404
    assert jit(client, token, scope="/repos/alice/not-installed").status_code == 404


def test_registration_and_remove_tokens(client):
    token = client.token()
    for kind in ("registration-token", "remove-token"):
        resp = client.call("POST", f"/orgs/{ORG}/actions/runners/{kind}", token)
        assert resp.status_code == 201
        assert len(resp.json()["token"]) == 29 and resp.json()["expires_at"].endswith("Z")


def test_list_runners_paginates_with_link_headers_and_filters_by_name(client):
    token = client.token()
    for i in range(5):
        assert jit(client, token, name=f"page-{i}").status_code == 201
    first = client.call("GET", f"/orgs/{ORG}/actions/runners?per_page=2", token)
    assert first.json()["total_count"] == 5
    assert [r["name"] for r in first.json()["runners"]] == ["page-0", "page-1"]
    assert 'rel="next"' in first.headers["Link"] and 'rel="last"' in first.headers["Link"]
    assert "page=3" in first.links["last"]["url"]
    names = []
    url = first.links["next"]["url"]
    names += [r["name"] for r in first.json()["runners"]]
    for _ in range(5):
        resp = client.session.get(url, headers={"Authorization": f"token {token}"})
        names += [r["name"] for r in resp.json()["runners"]]
        if "next" not in resp.links:
            break
        url = resp.links["next"]["url"]
    assert names == [f"page-{i}" for i in range(5)]
    assert 'rel="prev"' in resp.headers["Link"] and 'rel="first"' in resp.headers["Link"]
    filtered = client.call("GET", f"/orgs/{ORG}/actions/runners?name=page-3", token).json()
    assert (filtered["total_count"], filtered["runners"][0]["name"]) == (1, "page-3")
    huge = client.call("GET", f"/orgs/{ORG}/actions/runners?per_page=1000", token).json()
    assert len(huge["runners"]) == 5


def test_delete_idle_runner_is_204_and_busy_runner_is_422(client, emu):
    token = client.token()
    idle = jit(client, token, name="idle").json()["runner"]["id"]
    busy_resp = jit(client, token, name="busy").json()
    runner = InProcessRunner(busy_resp["encoded_jit_config"], idle_timeout=5).start()
    job_id = emu.add_job(repository=f"{ORG}/app", labels=["self-hosted"], duration_s=2)
    deadline = time.monotonic() + 5
    while emu.job(job_id)["status"] != "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    busy_id = busy_resp["runner"]["id"]
    resp = client.call("DELETE", f"/orgs/{ORG}/actions/runners/{busy_id}", token)
    assert resp.status_code == 422
    assert "still running a job" in resp.json()["message"]
    assert client.call("GET", f"/orgs/{ORG}/actions/runners/{busy_id}", token).json()["busy"]
    assert client.call("DELETE", f"/orgs/{ORG}/actions/runners/{idle}", token).status_code == 204
    assert client.call("GET", f"/orgs/{ORG}/actions/runners/{idle}", token).status_code == 404
    assert client.call("DELETE", f"/orgs/{ORG}/actions/runners/{idle}", token).status_code == 404
    emu.cancel_job(job_id)
    assert runner.join(5)


def test_runner_labels_endpoints(client):
    token = client.token()
    runner_id = jit(client, token, labels=["self-hosted", "linux", "a"]).json()["runner"]["id"]
    path = f"/orgs/{ORG}/actions/runners/{runner_id}/labels"

    def names(resp):
        assert resp.status_code == 200, resp.text
        return sorted(lab["name"] for lab in resp.json()["labels"])

    assert names(client.call("GET", path, token)) == ["a", "linux", "self-hosted"]
    assert names(client.call("POST", path, token, json={"labels": ["b"]})) == [
        "a",
        "b",
        "linux",
        "self-hosted",
    ]
    assert names(client.call("PUT", path, token, json={"labels": ["c"]})) == [
        "c",
        "linux",
        "self-hosted",
    ]
    assert names(client.call("DELETE", f"{path}/c", token)) == ["linux", "self-hosted"]
    assert client.call("DELETE", f"{path}/nope", token).status_code == 404
    assert client.call("POST", path, token, json={"labels": []}).status_code == 422
    assert names(client.call("DELETE", path, token)) == ["linux", "self-hosted"]


# -- jobs --------------------------------------------------------------------------------------


def test_get_job_follows_its_state_and_is_404_elsewhere(client, emu):
    token = client.token()
    job_id = emu.add_job(repository=f"{ORG}/app", labels=["self-hosted"], duration_s=0.1)
    resp = client.call("GET", f"/repos/{ORG}/app/actions/jobs/{job_id}", token)
    assert resp.status_code == 200
    body = resp.json()
    assert (body["id"], body["status"], body["conclusion"], body["runner_name"]) == (
        job_id,
        "queued",
        None,
        None,
    )
    assert client.call("GET", f"/repos/{ORG}/other/actions/jobs/{job_id}", token).status_code == 404
    assert client.call("GET", f"/repos/{ORG}/app/actions/jobs/1", token).status_code == 404
    emu.cancel_job(job_id)
    done = client.call("GET", f"/repos/{ORG}/app/actions/jobs/{job_id}", token).json()
    assert (done["status"], done["conclusion"]) == ("completed", "cancelled")


def test_token_narrowed_to_one_repository(client, emu):
    token = client.token(1001, repositories=["app"])
    job_id = emu.add_job(repository=f"{ORG}/lib", labels=["x"])
    assert client.call("GET", f"/repos/{ORG}/lib/actions/jobs/{job_id}", token).status_code == 404
    resp = client.session.post(
        f"{client.base}/app/installations/1002/access_tokens",
        headers=client.jwt_headers(),
        json={"repositories": ["nope"]},
    )
    assert resp.status_code == 422


# -- GHES --------------------------------------------------------------------------------------


def test_ghes_prefix_serves_the_api_under_api_v3(keys, receiver):
    config = make_config(keys, api_prefix="/api/v3", webhook_url=receiver.url)
    with Emulator(config) as ghes:
        assert ghes.base_url.endswith("/api/v3")
        client = Client(ghes, keys)
        token = client.token()
        resp = client.call("GET", f"/orgs/{ORG}/actions/runners", token)
        assert resp.status_code == 200 and "x-ratelimit-used" in resp.headers
        assert "X-GitHub-Enterprise-Version" in resp.headers
        # the github.com path is not served by a GHES
        root = requests.get(
            f"{ghes.root_url}/orgs/{ORG}/actions/runners",
            headers={"Authorization": f"token {token}"},
            timeout=5,
        )
        assert root.status_code == 404
        blob = jit(client, token).json()["encoded_jit_config"]
        runner = InProcessRunner(blob, idle_timeout=5).start()
        job_id = ghes.add_job(repository=f"{ORG}/app", labels=["linux"], duration_s=0)
        assert runner.join(5) and runner.conclusion == "success"
        assert ghes.wait_until_done(5) is True or ghes.job(job_id)["status"] == "completed"
        assert receiver.wait_for(lambda ps: len(ps) == 3, 5)
        payload = receiver.payloads()[0]
        assert payload["workflow_job"]["url"].startswith(ghes.base_url + "/repos/")
        assert "X-GitHub-Enterprise-Host" in receiver.received[0]["headers"]


# -- deliveries log, redelivery, hook config ---------------------------------------------------


def test_deliveries_api_lists_newest_first_with_cursor_and_redelivers(client, emu, receiver):
    for _ in range(3):
        emu.add_job(repository=f"{ORG}/app", labels=["nobody"])
    assert emu.sender.flush(5)
    first = client.session.get(
        f"{client.base}/app/hook/deliveries?per_page=2", headers=client.jwt_headers()
    )
    assert first.status_code == 200
    page = first.json()
    assert [d["id"] for d in page] == [3, 2]
    assert {
        "guid",
        "delivered_at",
        "redelivery",
        "duration",
        "status",
        "status_code",
        "event",
        "action",
        "installation_id",
        "repository_id",
    } <= set(page[0])
    second = client.session.get(first.links["next"]["url"], headers=client.jwt_headers())
    assert [d["id"] for d in second.json()] == [1]
    assert "next" not in second.links
    detail = client.session.get(
        f"{client.base}/app/hook/deliveries/1", headers=client.jwt_headers()
    ).json()
    assert detail["request"]["payload"]["action"] == "queued"
    assert detail["request"]["headers"]["X-GitHub-Event"] == "workflow_job"
    again = client.session.post(
        f"{client.base}/app/hook/deliveries/1/attempts", headers=client.jwt_headers()
    )
    assert again.status_code == 202
    assert receiver.wait_for(lambda ps: len(ps) == 4, 5)
    # deliveries of different jobs go out in parallel: find the original by its guid
    same_guid = [
        r for r in receiver.received if r["headers"]["X-GitHub-Delivery"] == detail["guid"]
    ]
    assert len(same_guid) == 2
    assert same_guid[0]["body"] == same_guid[1]["body"]
    assert receiver.received[3] is same_guid[1]
    assert emu.sender.flush(5)
    assert emu.deliveries()[-1]["redelivery"] is True
    missing = client.session.post(
        f"{client.base}/app/hook/deliveries/999/attempts", headers=client.jwt_headers()
    )
    assert missing.status_code == 404
    token = client.token()
    assert client.call("GET", "/app/hook/deliveries", token).status_code == 401


def test_patch_hook_config_rotates_the_secret(client, emu, receiver):
    resp = client.session.patch(
        f"{client.base}/app/hook/config",
        headers=client.jwt_headers(),
        json={"secret": "new-secret"},
    )
    assert resp.status_code == 200 and resp.json()["url"] == receiver.url
    assert resp.json()["secret"] == "********"
    emu.add_job(repository=f"{ORG}/app", labels=["x"])
    assert receiver.wait_for(lambda ps: len(ps) == 1, 5)
    got = receiver.received[0]
    expected = hmac.new(b"new-secret", got["body"], hashlib.sha256).hexdigest()
    assert got["headers"]["X-Hub-Signature-256"] == f"sha256={expected}"


def test_repository_no_installation_covers_gets_no_webhook(client, emu, receiver):
    job_id = emu.add_job(repository="stranger/app", labels=["x"])
    emu.add_job(repository=f"{ORG}/app", labels=["x"])
    assert receiver.wait_for(lambda ps: len(ps) == 1, 5)
    assert emu.sender.flush(5)
    assert [p["repository"]["full_name"] for p in receiver.payloads()] == [f"{ORG}/app"]
    assert emu.job(job_id)["queued_sent_at"] is not None


# -- introspection -----------------------------------------------------------------------------


def test_introspection_endpoints_give_the_ground_truth(emu, receiver):
    root = emu.root_url
    resp = requests.post(
        f"{root}/_emulator/jobs",
        timeout=5,
        json={"repository": f"{ORG}/app", "labels": ["x"], "duration_s": 0},
    )
    assert resp.status_code == 201
    job_id = resp.json()["job_id"]
    jobs = requests.get(f"{root}/_emulator/jobs", timeout=5).json()["jobs"]
    (job,) = [j for j in jobs if j["job_id"] == job_id]
    assert {
        "job_id",
        "repository",
        "labels",
        "status",
        "conclusion",
        "queued_sent_at",
        "taken_at",
        "runner_name",
        "completed_at",
    } <= set(job)
    cancel = requests.post(f"{root}/_emulator/jobs/{job_id}/cancel", timeout=5)
    assert (cancel.status_code, cancel.json()["conclusion"]) == (200, "cancelled")
    assert requests.post(f"{root}/_emulator/jobs/{job_id}/cancel", timeout=5).status_code == 409
    assert requests.post(f"{root}/_emulator/flush", timeout=15).json()["flushed"]
    deliveries = requests.get(f"{root}/_emulator/deliveries", timeout=5).json()["deliveries"]
    assert [(d["job_id"], d["action"], d["status_code"]) for d in deliveries] == [
        (job_id, "queued", 200),
        (job_id, "completed", 200),
    ]
    assert all(d["duration"] >= 0 and d["guid"] for d in deliveries)
    bad = requests.post(f"{root}/_emulator/jobs", json={"labels": []}, timeout=5)
    assert bad.status_code == 422
    assert requests.get(f"{root}/_emulator/jobs/1", timeout=5).status_code == 404


def test_workload_posted_over_http_runs_to_completion(emu, client):
    workload = {
        "jobs": [
            {"repository": f"{ORG}/app", "labels": ["linux"], "arrival_s": 0.0, "duration_s": 0.1},
            {
                "repository": f"{ORG}/app",
                "labels": ["linux"],
                "arrival_s": 0.1,
                "duration_s": 0.1,
                "conclusion": "failure",
            },
        ]
    }
    resp = requests.post(f"{emu.root_url}/_emulator/workload", json=workload, timeout=5)
    assert resp.status_code == 201
    ids = resp.json()["job_ids"]
    token = client.token()
    runners = [
        InProcessRunner(
            jit(client, token, name=f"w{i}", labels=["linux"]).json()["encoded_jit_config"],
            idle_timeout=5,
        ).start()
        for i in range(2)
    ]
    assert all(r.join(10) for r in runners)
    assert emu.wait_until_done(5)
    status = requests.get(f"{emu.root_url}/_emulator/workload", timeout=5).json()
    assert status["done"] and status["by_status"] == {"completed": 2}
    conclusions = {j["job_id"]: j["conclusion"] for j in emu.jobs()}
    assert [conclusions[i] for i in ids] == ["success", "failure"]


# -- what is queued: repositories, workflow runs, a run's jobs ---------------------------------


def test_installation_repositories_are_listed_with_activity_and_paginated(client, emu):
    token = client.token()
    for name in ("zeta", "alpha", "mid"):
        emu.add_job(repository=f"{ORG}/{name}", labels=["nobody"])
        time.sleep(0.01)
    emu.add_job(repository="someone-else/app", labels=["nobody"])
    first = client.call("GET", "/installation/repositories?per_page=2", token)
    assert first.status_code == 200
    body = first.json()
    assert body["total_count"] == 3
    assert [r["full_name"] for r in body["repositories"]] == [f"{ORG}/alpha", f"{ORG}/mid"]
    repo = body["repositories"][0]
    assert {"id", "name", "full_name", "private", "owner", "pushed_at", "updated_at",
            "created_at"} <= set(repo)
    assert repo["owner"]["login"] == ORG and repo["private"] is True
    assert 'rel="next"' in first.headers["Link"]
    second = client.session.get(first.links["next"]["url"],
                                headers={"Authorization": f"token {token}"}).json()
    assert [r["full_name"] for r in second["repositories"]] == [f"{ORG}/zeta"]
    pushed = {r["full_name"]: r["pushed_at"] for r in body["repositories"] + second["repositories"]}
    assert pushed[f"{ORG}/mid"] >= pushed[f"{ORG}/alpha"]
    # A user installation of selected repositories lists them, used or not.
    alice = client.call("GET", "/installation/repositories", client.token(1002)).json()
    assert [r["full_name"] for r in alice["repositories"]] == ["alice/dotfiles"]
    with_jwt = client.session.get(f"{client.base}/installation/repositories",
                                  headers=client.jwt_headers(), timeout=10)
    assert with_jwt.status_code == 401  # an installation endpoint: App JWTs are refused


def test_queued_workflow_runs_and_their_jobs_with_githubs_shapes(client, emu):
    token = client.token()
    queued = [emu.add_job(repository=f"{ORG}/app", labels=["nobody"], run_id=77)
              for _ in range(3)]
    other = emu.add_job(repository=f"{ORG}/app", labels=["nobody"], run_id=78)
    emu.cancel_job(other)
    runs = client.call("GET", f"/repos/{ORG}/app/actions/runs?status=queued", token).json()
    assert runs["total_count"] == 1
    (run,) = runs["workflow_runs"]
    assert (run["id"], run["status"], run["conclusion"]) == (77, "queued", None)
    assert run["repository"]["full_name"] == f"{ORG}/app"
    assert {"name", "head_sha", "event", "run_attempt", "created_at", "updated_at", "jobs_url",
            "html_url", "url"} <= set(run)
    every = client.call("GET", f"/repos/{ORG}/app/actions/runs", token).json()
    assert {(r["id"], r["status"], r["conclusion"]) for r in every["workflow_runs"]} == {
        (77, "queued", None), (78, "completed", "cancelled")}
    page = client.call("GET", f"/repos/{ORG}/app/actions/runs/77/jobs?per_page=2", token)
    jobs = page.json()
    assert jobs["total_count"] == 3 and len(jobs["jobs"]) == 2
    rest = client.session.get(page.links["next"]["url"],
                              headers={"Authorization": f"token {token}"}).json()
    listed = jobs["jobs"] + rest["jobs"]
    assert [j["id"] for j in listed] == sorted(queued)
    # The same object GET .../actions/jobs/{id} answers.
    single = client.call("GET", f"/repos/{ORG}/app/actions/jobs/{queued[0]}", token).json()
    assert listed[0] == single and listed[0]["run_id"] == 77 and listed[0]["status"] == "queued"


def test_runs_of_a_repository_the_token_does_not_cover_are_404(client, emu):
    token = client.token(1001, repositories=["app"])
    emu.add_job(repository=f"{ORG}/lib", labels=["nobody"], run_id=5)
    assert client.call("GET", f"/repos/{ORG}/lib/actions/runs", token).status_code == 404
    assert client.call("GET", f"/repos/{ORG}/lib/actions/runs/5/jobs", token).status_code == 404
    full = client.token()
    assert client.call("GET", f"/repos/{ORG}/lib/actions/runs/6/jobs", full).status_code == 404


def test_each_apps_delivery_log_holds_only_its_own_deliveries(keys, receiver):
    second_keys = generate_app_key()
    config = make_config(keys, webhook_url=receiver.url)
    config.apps.append(AppConfig(app_id=APP_ID + 1, public_key_pem=second_keys[1],
                                 installations=[InstallationConfig(id=2001, account="other")]))
    with Emulator(config) as emu:
        emu.add_job(repository=f"{ORG}/app", labels=["nobody"])
        emu.add_job(repository="other/app", labels=["nobody"])
        assert emu.sender.flush(5)

        def log(app_id, key):
            headers = {"Authorization": f"Bearer {app_jwt(app_id, key)}"}
            return requests.get(f"{emu.base_url}/app/hook/deliveries", headers=headers,
                                timeout=10).json()
        first, second = log(APP_ID, keys[0]), log(APP_ID + 1, second_keys[0])
        assert [d["installation_id"] for d in first] == [1001]
        assert [d["installation_id"] for d in second] == [2001]
        headers = {"Authorization": f"Bearer {app_jwt(APP_ID, keys[0])}"}
        refused = requests.post(f"{emu.base_url}/app/hook/deliveries/{second[0]['id']}/attempts",
                                headers=headers, timeout=10)
        assert refused.status_code == 404


def test_rerun_a_job_answers_201_and_queues_a_new_attempt(client, emu, receiver):
    token = client.token()
    job_id = emu.add_job(repository=f"{ORG}/app", labels=["nobody"], run_id=91)
    path = f"/repos/{ORG}/app/actions/jobs/{job_id}/rerun"
    running = client.call("POST", path, token)
    assert running.status_code == 403 and running.json()["message"] == \
        "This workflow is already running"
    emu.cancel_job(job_id)
    assert client.call("POST", f"/repos/{ORG}/other/actions/jobs/{job_id}/rerun",
                       token).status_code == 404
    assert client.call("POST", f"/repos/{ORG}/app/actions/jobs/1/rerun", token).status_code == 404
    assert client.call("POST", path).status_code == 401  # no token
    done = client.call("POST", path, token)
    assert done.status_code == 201 and done.json() == {}
    (new,) = [j for j in emu.jobs() if j.get("rerun_of") == job_id]
    assert (new["run_id"], new["run_attempt"], new["status"]) == (91, 2, "queued")
    # The new attempt's `queued` webhook, with its attempt number (schema-valid like any).
    assert receiver.wait_for(lambda ps: any(
        p["workflow_job"]["id"] == new["job_id"] for p in ps), 5)
    (payload,) = [p for p in receiver.payloads() if p["workflow_job"]["id"] == new["job_id"]]
    assert payload["action"] == "queued" and payload["workflow_job"]["run_attempt"] == 2
    run = client.call("GET", f"/repos/{ORG}/app/actions/runs", token).json()["workflow_runs"][0]
    assert (run["id"], run["run_attempt"], run["status"]) == (91, 2, "queued")
    assert client.call("POST", path, token).status_code == 403  # re-run already
