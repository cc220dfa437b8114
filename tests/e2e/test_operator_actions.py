"""An operator's actions through the management API, carried out by real executor processes:
a busy host drained (its job finishes, it takes no other, its daemon exits 0), a pool's warm
target set (its runners registered), an idle warm runner retired (deleted, and replaced).
Judged from ground truth: the emulator's record of jobs and runners, the daemon's exit code;
the API's audit log is read only to check it recorded each action."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from devstack.stack import LocalStack
from tests.conftest import FIXTURES
from tests.e2e.test_executor_resilience import start
from tests.e2e.test_warm_runners import add_jobs, idle_listening

POOLS = FIXTURES / "pools" / "warm.toml"
pytestmark = [pytest.mark.docker, pytest.mark.slow]
CAPPED_ONLY = {"RUNNERHUB_EXECUTOR_POOLS": "capped", "RUNNERHUB_WARM_REFILL_GRACE_S": "1"}


@pytest.fixture
def stack(docker_client, tmp_path: Path):
    stack = LocalStack(POOLS, tmp_path, lost_runner_timeout_s=6).start()
    yield stack
    stack.stop()


def api(stack: LocalStack, method: str, path: str, role: str, **kwargs) -> requests.Response:
    return requests.request(method, f"{stack.api_url}/api/v1{path}", timeout=15,
                            headers={"Authorization": f"Bearer {stack.token(role)}"}, **kwargs)


def test_a_drained_busy_host_finishes_its_job_takes_no_other_and_exits(stack, hosts):
    host = hosts.new("drained")
    child = start(stack, host, 2, **CAPPED_ONLY)
    (first,) = add_jobs(stack, "capped", 1, 0.0, 8.0)
    assert stack.wait_for(lambda: stack.emulator.job(first)["taken_at"], 60, 0.25), \
        child.log()[-3000:]
    answer = api(stack, "POST", f"/hosts/{host}/drain", "operator")
    assert answer.status_code == 200 and answer.json()["outcome"] == "drain_requested", \
        answer.text
    time.sleep(2)  # the daemon reads its record every heartbeat (1 s here)
    (second,) = add_jobs(stack, "capped", 1, 0.0, 1.0)
    assert stack.wait_for(lambda: child.process.poll() is not None, 60, 0.25), \
        child.log()[-3000:]
    assert child.process.returncode == 0, child.log()[-3000:]
    assert stack.emulator.job(first)["completed_at"] is not None
    assert stack.emulator.job(second)["taken_at"] is None  # nothing ran it on the drained host
    audit = api(stack, "GET", "/audit", "admin").json()["records"]
    assert any(r["action"] == "drain_host" and r["target"] == f"host:{host}"
               and r["outcome"] == "ok" for r in audit), audit


def test_a_warm_target_set_through_the_api_is_kept_and_a_retired_runner_replaced(stack, hosts):
    host = hosts.new("warm-api")
    child = start(stack, host, 3, **CAPPED_ONLY)
    assert api(stack, "PUT", "/pools/capped/warm", "operator",
               json={"warm_runners": 2}).status_code == 200
    # Within the overrides' refresh (15 s) and the refill grace.
    assert stack.wait_for(lambda: len(idle_listening(stack, "capped")) == 2, 60, 0.5), \
        child.log()[-3000:]
    runners = api(stack, "GET", "/runners?pool=capped&state=idle", "viewer").json()["runners"]
    listening = {r["name"] for r in idle_listening(stack, "capped")}
    victim = next(r["runner_name"] for r in runners if r["runner_name"] in listening)
    answer = api(stack, "POST", f"/runners/{victim}/retire", "operator")
    assert answer.status_code == 200, answer.text

    def replaced() -> bool:
        records = {r["name"]: r for r in stack.emulator.runner_records()}
        now_idle = {r["name"] for r in idle_listening(stack, "capped")}
        return bool(records[victim]["deleted_at"]) and len(now_idle) == 2 \
            and victim not in now_idle

    assert stack.wait_for(replaced, 60, 0.5), child.log()[-3000:]
    # A viewer may not change it (403 naming the permission), and nothing changes.
    refused = api(stack, "PUT", "/pools/capped/warm", "viewer", json={"warm_runners": 0})
    assert refused.status_code == 403 and refused.json()["permission"] == "act:warm"
    time.sleep(1)
    assert len(idle_listening(stack, "capped")) == 2


def test_a_flagged_job_retried_and_a_delivery_redelivered_through_the_api(stack, hosts):
    """No host yet: a job waits, dispatched. Flagged (as after failed starts), an operator's
    retry asks GitHub (the emulator) that it is still queued and re-demands it; a host then
    runs it once. An admin's redelivery makes GitHub send that delivery again (the emulator's
    record: a new attempt, marked redelivery). A viewer may do neither (403)."""
    from devstack.stack import _ground_truth_dynamodb, environ

    (job,) = add_jobs(stack, "capped", 1, 0.0, 1.0)
    assert stack.wait_for(lambda: (stack.records().get(job) or {}).get("state") == "dispatched",
                          30, 0.25)
    refused = api(stack, "POST", f"/jobs/{job}/retry", "operator")
    assert refused.status_code == 409 and "not flagged" in refused.json()["message"]
    with environ(stack.direct_env):
        _ground_truth_dynamodb().update_item(
            TableName=stack.tables["jobs_table"], Key={"job_id": {"N": str(job)}},
            UpdateExpression="SET flagged = :t", ExpressionAttributeValues={":t": {"BOOL": True}})
    assert api(stack, "POST", f"/jobs/{job}/retry", "viewer").status_code == 403
    answer = api(stack, "POST", f"/jobs/{job}/retry", "operator")
    assert answer.status_code == 200 and answer.json()["outcome"] == "redemanded", answer.text
    record = stack.records()[job]
    assert record["demand_generation"] == 2 and not record.get("flagged")
    child = start(stack, hosts.new("retry"), 2, **CAPPED_ONLY)
    assert stack.wait_for(lambda: stack.emulator.job(job)["completed_at"], 60, 0.25), \
        child.log()[-3000:]
    ran = [r for r in stack.emulator.runner_records() if r["job_id"] == job]
    assert len(ran) == 1  # run once, whatever demand messages the retry left

    (delivery,) = [d for d in stack.emulator.deliveries()
                   if d["job_id"] == job and d["action"] == "queued" and not d["redelivery"]]
    assert api(stack, "POST", f"/deliveries/{delivery['id']}/redeliver",
               "operator").status_code == 403  # an admin's (act:webhooks)
    answer = api(stack, "POST", f"/deliveries/{delivery['id']}/redeliver", "admin")
    assert answer.status_code == 200 and answer.json()["outcome"] == "redelivered", answer.text
    assert stack.wait_for(lambda: any(
        d["redelivery"] and d["guid"] == delivery["guid"] for d in stack.emulator.deliveries()),
        30, 0.25)
    missing = api(stack, "POST", "/deliveries/999999999/redeliver", "admin")
    assert missing.status_code == 404

