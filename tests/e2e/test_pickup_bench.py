"""The short version of `make bench-pickup`'s warm mode (the full run is its own target): one
host, a 1 s modelled runner start-up, a warm pool sized by the benchmark's own rule, steady
arrivals. Every figure comes from the emulator's record; the ones a short run can hold to are
asserted (warm hits, sub-second pickup, each take refilled), the rest must at least exist."""

from __future__ import annotations

import pytest

from benchmarks import warm_figures
from benchmarks.pickup import even_workload, run_mode

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def test_warm_mode_short(docker_client):
    rate, startup = 0.5, 1.0
    warm = warm_figures.warm_pool_size(rate, startup)  # ceil(0.5 x 2) + 1 = 2
    figures = run_mode("warm-short", even_workload(8, rate, 2.0), warm=warm,
                       startup_s=startup, hosts=1, slots=6)
    assert figures["jobs"] == 8
    assert figures["warm_hit_share"] >= 0.875, figures  # one cold start at most
    assert figures["pickup_p50_s"] <= warm_figures.WARM_P50_MAX_S, figures
    assert figures["unreplaced"] == 0 and figures["untaken"] == 0, figures
    assert figures["startup_seen_p50_s"] >= startup, figures  # the start-up was modelled
    assert figures["warm_pool_seen"] <= warm, figures  # never more idle than the pool
    assert figures["refill_p95_s"] <= startup + 3.0, figures
    assert figures["cpu_s_per_job"] > 0 and figures["peak_rss_mb"] > 10, figures
    assert figures["idle_warm_s_per_job"] > 0, figures
