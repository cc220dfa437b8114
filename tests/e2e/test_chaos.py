"""The fault suite's short run (`make chaos` is the long one): 40 jobs with dropped,
duplicated and reordered webhooks, GitHub API 5xx, an executor SIGKILLed and restarted, and the
AWS endpoint cut; nothing lost, stuck or leaked, every fault kind really injected."""

from __future__ import annotations

import pytest

from devstack.chaos import PROFILES, run

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def test_short_fault_suite_loses_nothing(docker_client, tmp_path):
    profile = PROFILES["short"]
    result = run(profile, tmp_path)
    print("chaos:", result)
    injected = result["injected"]
    assert result["jobs"] == profile.jobs
    assert (result["lost"], result["stuck"]) == (0, 0), result
    assert (result["leaked_containers"], result["leaked_runners"]) == (0, 0), result
    for kind in ("dropped", "duplicated", "reordered", "api_5xx", "kills"):
        assert injected[kind] >= 1, f"{kind} never injected: {result}"
    assert injected["outage_s"] >= profile.outage_s / 2
    assert result["redelivered"] >= 1, "dropped deliveries were never redelivered"
    assert result["ok"], result
