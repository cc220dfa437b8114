"""The fault suite's short run (`make chaos` is the long one): every fault kind at least once
(dropped, duplicated and reordered webhooks, a second `queued` under a new delivery id,
deliveries never sent, GitHub API 5xx before and after the effect and time-outs, an executor
SIGKILLed, a host lost with its containers, the AWS endpoint cut, DynamoDB alone failing, two
webhook processes), with one planted job that nothing can serve correctly: the judge must
find exactly that job lost, and nothing else lost, stuck, over-committed or leaked."""

from __future__ import annotations

from dataclasses import replace

import pytest

from devstack.chaos import PROFILES, run

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def test_short_fault_suite_loses_nothing_but_the_planted_job(docker_client, tmp_path):
    profile = replace(PROFILES["short"], selftest=True)
    result = run(profile, tmp_path)
    print("chaos:", result)
    injected = result["injected"]
    assert result["jobs"] == profile.jobs + 1
    assert len(result["planted"]) == 1
    assert result["lost_jobs"] == result["planted"], result  # the judge can fail, and did
    assert not result["ok"]
    assert result["fault_shortfall"] == [], result  # every kind injected as configured
    assert (result["stuck"], result["over_commit"], result["timed_out"]) == (0, 0, 0), result
    assert (result["leaked_containers"], result["leaked_runners"]) == (0, 0), result
    assert result["webhook_processes"] >= 2, result
    for kind in ("dropped", "duplicated", "duplicated_new_id", "reordered", "api_5xx",
                 "api_5xx_after_effect", "api_timeouts", "never_sent", "kills",
                 "host_losses"):
        assert injected[kind] >= 1, f"{kind} never injected: {result}"
    assert injected["outage_s"] >= profile.outage_s / 2
    assert injected["dynamodb_outage_s"] >= profile.dynamodb_outage_s / 2
    assert result["redelivered"] >= 1, "dropped deliveries were never redelivered"
