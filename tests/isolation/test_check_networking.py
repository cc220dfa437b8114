"""`python -m executor --check` against this machine's real Docker engine and iptables: with a
job network it verifies hardened networking can work here (executor/check.py); the failure
cases by name are in tests/unit/test_check.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from executor import check
from executor.firewall import FirewallError
from tests.conftest import ROOT

pytestmark = [pytest.mark.isolation, pytest.mark.docker]


def _check(network: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "PYTHONPATH": str(ROOT), "RUNNERHUB_GITHUB_APP_SECRET_ID": "x",
           "RUNNERHUB_HOST_ID": "check-test", "RUNNERHUB_DOCKER_NETWORK": network}
    return subprocess.run([sys.executable, "-m", "executor", "--check"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_the_check_finds_hardened_networking_ready_on_this_host(docker_client):
    result = _check("runnerhub")
    assert result.returncode == 0, result.stderr
    assert "hardened networking: ok (iptables v" in result.stdout
    assert "chain RUNNERHUB in mangle FORWARD, INPUT" in result.stdout
    # What it reported is there: the chain and both jumps (ensure_chain is idempotent).
    for parent in ("FORWARD", "INPUT"):
        jump = subprocess.run(["iptables", "-w", "10", "-t", "mangle", "-C", parent, "-j",
                               "RUNNERHUB"], capture_output=True, text=True, timeout=30)
        assert jump.returncode == 0, jump.stderr


def test_a_missing_iptables_binary_is_a_clear_failure_not_a_crash(docker_client):
    with pytest.raises(FirewallError, match=r"the iptables CLI cannot run .*install iptables"):
        check.hardened_networking(binary="/nonexistent/iptables")
