"""Webhook faults over real HTTP: lost deliveries are missing at the receiver and failed in the
deliveries API (and a redelivery then arrives), duplicates arrive twice under one delivery id,
held deliveries are really overtaken, and the report counts what was injected."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import requests

from emulator import AppConfig, Emulator, EmulatorConfig, InstallationConfig
from emulator.faults import FaultShortfall
from emulator.testing import InProcessRunner, WebhookReceiver, app_jwt, generate_app_key

APP_ID = 88
INSTALLATION = 880
ORG = "fault-org"
REPO = f"{ORG}/app"
LABELS = ["self-hosted", "linux"]


@pytest.fixture(scope="module")
def keys():
    return generate_app_key()


@pytest.fixture
def receiver():
    with WebhookReceiver() as rx:
        yield rx


def new_emulator(keys, receiver, faults: dict) -> Emulator:
    config = EmulatorConfig(
        apps=[
            AppConfig(
                app_id=APP_ID,
                public_key_pem=keys[1],
                installations=[InstallationConfig(id=INSTALLATION, account=ORG)],
            )
        ],
        webhook_url=receiver.url,
        webhook_secret="s",
        faults=faults,
    )
    return Emulator(config)


@pytest.fixture
def make_emu(keys, receiver):
    started = []

    def make(faults: dict) -> Emulator:
        emu = new_emulator(keys, receiver, faults).start()
        started.append(emu)
        return emu

    yield make
    for emu in started:
        emu.stop()


def jwt_headers(keys) -> dict:
    return {"Authorization": f"Bearer {app_jwt(APP_ID, keys[0])}"}


def guids(receiver) -> Counter:
    return Counter(r["headers"]["X-GitHub-Delivery"] for r in receiver.received)


def add_jobs(emu, n: int, first_id: int = 5000) -> list[int]:
    return [emu.add_job(id=first_id + i, repository=REPO, labels=LABELS) for i in range(n)]


def runner(emu, keys, name: str) -> InProcessRunner:
    """A warm runner polling the emulator, as RunnerHub's executor would start one."""
    token = requests.post(
        f"{emu.base_url}/app/installations/{INSTALLATION}/access_tokens",
        headers=jwt_headers(keys),
        timeout=5,
    ).json()["token"]
    resp = requests.post(
        f"{emu.base_url}/orgs/{ORG}/actions/runners/generate-jitconfig",
        headers={"Authorization": f"token {token}"},
        json={"name": name, "runner_group_id": 1, "labels": LABELS},
        timeout=5,
    )
    assert resp.status_code == 201, resp.text
    return InProcessRunner(resp.json()["encoded_jit_config"], idle_timeout=5).start()


def test_dropped_deliveries_are_missing_failed_in_the_log_and_redeliverable(
    make_emu, receiver, keys
):
    emu = make_emu({"seed": 11, "webhooks": {"drop": 0.5}})
    add_jobs(emu, 30)
    assert emu.sender.flush(10)

    log = emu.deliveries()
    dropped = [d for d in log if d["fault"] == "dropped"]
    assert 5 < len(dropped) < 25
    assert {(d["status"], d["status_code"]) for d in dropped} == {("failed to connect to host", 0)}
    got = guids(receiver)
    assert not got.keys() & {d["guid"] for d in dropped}  # never reached the receiver
    assert sum(got.values()) == 30 - len(dropped)
    assert all(d["status"] == "OK" for d in log if d["fault"] is None)

    # What a reconciler sees in GitHub's deliveries API: the failed ones, status not "OK".
    listed = requests.get(
        f"{emu.base_url}/app/hook/deliveries?per_page=100", headers=jwt_headers(keys), timeout=5
    ).json()
    failed = [d for d in listed if d["status"] != "OK"]
    assert sorted(d["id"] for d in failed) == sorted(d["id"] for d in dropped)
    assert all("fault" not in d and d["status_code"] == 0 for d in failed)

    # Redelivery of a lost delivery really delivers (redeliveries are never faulted).
    lost = failed[0]
    resp = requests.post(
        f"{emu.base_url}/app/hook/deliveries/{lost['id']}/attempts",
        headers=jwt_headers(keys),
        timeout=5,
    )
    assert resp.status_code == 202
    assert receiver.wait_for(lambda _: guids(receiver)[lost["guid"]] == 1, timeout=5)
    assert emu.sender.flush(5)
    again = [d for d in emu.deliveries() if d["guid"] == lost["guid"] and d["redelivery"]]
    assert [(d["status"], d["status_code"]) for d in again] == [("OK", 200)]

    report = emu.faults_report()
    assert report["injected"]["dropped"] == len(dropped)
    assert report["opportunities"]["webhook"] == 30
    assert report["expected"]["dropped"] == pytest.approx(15.0)
    assert report["problems"] == []
    over_http = requests.get(f"{emu.root_url}/_emulator/faults", timeout=5).json()
    assert over_http["injected"] == report["injected"]


def test_drop_can_look_like_a_failing_gateway(make_emu, receiver):
    emu = make_emu({"webhooks": {"drop": 1.0, "drop_status_code": 502}})
    add_jobs(emu, 2)
    assert emu.sender.flush(5)
    assert {(d["status"], d["status_code"]) for d in emu.deliveries()} == {
        ("Invalid HTTP Response: 502", 502)
    }
    assert receiver.received == []


def test_duplicates_arrive_twice_with_the_same_delivery_id(make_emu, receiver):
    emu = make_emu({"seed": 5, "webhooks": {"duplicate": 0.5}})
    add_jobs(emu, 20)
    assert emu.sender.flush(10)
    got = guids(receiver)
    twice = {guid for guid, n in got.items() if n == 2}
    assert len(got) == 20 and set(got.values()) <= {1, 2}
    assert 4 <= len(twice) <= 16
    bodies: dict[str, set] = {}
    for r in receiver.received:
        bodies.setdefault(r["headers"]["X-GitHub-Delivery"], set()).add(r["body"])
    assert all(len(b) == 1 for b in bodies.values())  # the same delivery, byte for byte
    log = emu.deliveries()
    assert sum(d["fault"] == "duplicate" for d in log) == len(twice)
    assert emu.faults_report()["injected"]["duplicated"] == len(twice)
    assert emu.faults_report()["problems"] == []


def test_a_second_queued_comes_under_a_new_delivery_id(make_emu, receiver):
    emu = make_emu({"seed": 5, "webhooks": {"duplicate_new_id": 0.5}})
    ids = add_jobs(emu, 20)
    assert emu.sender.flush(10)
    per_job = Counter(p["workflow_job"]["id"] for p in receiver.payloads())
    twice = {job for job, n in per_job.items() if n == 2}
    assert set(per_job) == set(ids) and set(per_job.values()) <= {1, 2}
    assert 4 <= len(twice) <= 16
    got = guids(receiver)
    assert set(got.values()) == {1}  # every delivery has its own id
    assert {p["action"] for p in receiver.payloads()} == {"queued"}
    assert emu.faults_report()["injected"]["duplicated_new_id"] == len(twice)


def test_never_sent_deliveries_are_neither_posted_nor_logged(make_emu, receiver):
    emu = make_emu({"seed": 5, "webhooks": {"never_sent": 0.5}})
    ids = add_jobs(emu, 20)
    assert emu.sender.flush(10)
    posted = {p["workflow_job"]["id"] for p in receiver.payloads()}
    logged = {d["job_id"] for d in emu.deliveries()}
    unsent = set(ids) - posted
    assert 4 <= len(unsent) <= 16
    assert logged == posted  # GitHub's log does not know them either
    assert all(emu.job(j)["status"] == "queued" for j in unsent)  # only the REST API shows them
    assert emu.faults_report()["injected"]["never_sent"] == len(unsent)


def test_deliveries_are_spread_over_several_receivers(keys):
    with WebhookReceiver() as one, WebhookReceiver() as two:
        config = EmulatorConfig(
            apps=[AppConfig(app_id=APP_ID, public_key_pem=keys[1],
                            installations=[InstallationConfig(id=INSTALLATION, account=ORG)])],
            webhook_urls=[one.url, two.url], webhook_secret="s")
        with Emulator(config) as emu:
            add_jobs(emu, 10)
            assert emu.sender.flush(10)
        assert (len(one.received), len(two.received)) == (5, 5)


def test_completed_overtakes_a_held_in_progress(make_emu, receiver, keys):
    emu = make_emu({"webhooks": {"reorder": 1.0, "reorder_actions": ["in_progress"]}})
    rx = runner(emu, keys, "r-reorder")
    job_id = emu.add_job(repository=REPO, labels=LABELS, duration_s=0.1)
    assert emu.state.wait_until_completed([job_id], 5) and emu.sender.flush(5)
    assert rx.join(5) and rx.error is None
    assert [a for a, _ in receiver.events(job_id)] == ["queued", "completed", "in_progress"]
    held = [d for d in emu.deliveries() if d["fault"] == "reordered"]
    assert [d["action"] for d in held] == ["in_progress"]
    report = emu.check_faults()
    assert report["injected"]["reordered"] == 1 and report["opportunities"]["reorder"] == 1


def test_in_progress_overtakes_a_held_queued_when_a_warm_runner_takes_the_job(
    make_emu, receiver, keys
):
    emu = make_emu({"webhooks": {"reorder": 1.0, "reorder_actions": ["queued"]}})
    rx = runner(emu, keys, "r-warm")
    deadline = time.monotonic() + 5
    while not emu.state._idle and time.monotonic() < deadline:  # the runner is polling
        time.sleep(0.01)
    job_id = emu.add_job(repository=REPO, labels=LABELS, duration_s=0.05)
    assert emu.state.wait_until_completed([job_id], 5) and emu.sender.flush(5)
    assert rx.join(5) and rx.error is None
    assert [a for a, _ in receiver.events(job_id)] == ["in_progress", "queued", "completed"]
    assert emu.faults_report()["injected"]["reordered"] == 1


def test_a_held_delivery_nobody_overtakes_goes_out_late(make_emu, receiver):
    emu = make_emu(
        {"webhooks": {"reorder": 1.0, "reorder_actions": ["queued"], "reorder_max_hold_s": 0.3}}
    )
    start = time.monotonic()
    job_id = add_jobs(emu, 1)[0]
    assert receiver.wait_for(lambda p: len(p) == 1, timeout=5)
    assert time.monotonic() - start >= 0.3
    assert emu.sender.flush(5)
    assert receiver.events(job_id) == [("queued", "queued")]
    assert [d["fault"] for d in emu.deliveries()] == ["delayed"]
    report = emu.faults_report()
    assert report["injected"]["reordered"] == 0 and report["detail"]["delayed"] == 1
    # Held but never overtaken: the run did not exercise reordering, and the check says so.
    with pytest.raises(FaultShortfall, match="reordered"):
        emu.check_faults()


def test_workload_faults_apply_and_the_same_seed_drops_the_same_jobs(keys, receiver):
    workload = {
        "name": "lossy",
        "faults": {"seed": 42, "webhooks": {"drop": 0.4}},
        "jobs": [{"id": 7000 + i, "repository": REPO, "labels": LABELS} for i in range(15)],
    }
    dropped_runs = []
    for _ in range(2):
        with new_emulator(keys, receiver, {}) as emu:
            emu.load_workload(workload)
            emu.run_workload()
            deadline = time.monotonic() + 5
            while len(emu.deliveries()) < 15 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert emu.sender.flush(5)
            assert emu.faults_report()["seed"] == 42
            dropped_runs.append({d["job_id"] for d in emu.deliveries() if d["fault"] == "dropped"})
    assert dropped_runs[0] == dropped_runs[1] and dropped_runs[0]


def test_no_faults_configured_changes_nothing(make_emu, receiver):
    emu = make_emu({})
    add_jobs(emu, 5)
    assert emu.sender.flush(5)
    assert sum(guids(receiver).values()) == 5
    report = emu.faults_report()
    assert report["injected"] == dict.fromkeys(report["injected"], 0)
    assert report["problems"] == []
