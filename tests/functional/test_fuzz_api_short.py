"""A short `make fuzz-api` in `make test`: benchmarks/fuzz_api.py with 30 requests a role (its
own moto server, GitHub emulator and API on loopback), whose verdict must pass. The full run
(1000 a role) is `make fuzz-api`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PER_ROLE = 30


def test_a_short_fuzz_of_every_operation_as_each_role_passes(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RUNNERHUB_"))}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.fuzz_api", "--requests-per-role", str(PER_ROLE),
         "--max-seconds", "90"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-3000:]
    summary = json.loads(lines[-1])
    assert done.returncode == 0 and summary["passed"], (summary, done.stdout[-3000:],
                                                        done.stderr[-3000:])
    assert summary["requests"] >= 4 * PER_ROLE  # three roles and no token
    assert all(summary["per_role"][role] >= PER_ROLE for role in ("admin", "operator",
                                                                  "viewer", "(no token)"))
    for key in ("5xx", "schema_violations", "valid_rejected", "forbidden_allowed"):
        assert summary[key] == 0, (key, summary)
    # The requests reached the routes: some answered 200, some were refused for their role.
    assert summary["statuses"].get("200", 0) >= PER_ROLE // 3, summary
    assert summary["statuses"].get("401", 0) >= PER_ROLE // 2, summary
    assert summary["statuses"].get("403", 0) > 0, summary
