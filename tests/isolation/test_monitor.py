"""The runtime monitor against real containers, Docker's real events and real iptables counters
(executor/monitor.py). Each container is labelled as a job's container of a test host id of its
own, so the monitor sees only this test's containers. Every "is recorded" has its control: a
quiet, hardened-like container watched as long produces no finding at all; a real `docker`
profile engine, privileged by design, produces none for what it is granted."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from chalicelib.api.audit import MemoryAuditLog
from chalicelib.pools import Pool
from executor.containers import HOST_LABEL, MANAGED_LABEL
from executor.job_engine import JobEngines, engine_name
from executor.metrics import ExecutorMetrics
from executor.monitor import FirewallCounters, Monitor, cap_eff, cap_names
from tests.conftest import require, wait_for
from tests.isolation.conftest import RUNNER_IMAGE

pytestmark = [pytest.mark.isolation, pytest.mark.docker]

# A loopback address only this test's chain drops (127.0.0.0/8: never leaves the machine).
BLOCKED_ADDRESS = "127.213.7.1"


def pool(name: str, on_violation: str = "record") -> Pool:
    return Pool(name=name, labels=("self-hosted",), scope={"owner": "acme"}, image=RUNNER_IMAGE,
                on_violation=on_violation)


class Harness:
    def __init__(self, client, firewall: FirewallCounters | None = None) -> None:
        self.client = client
        self.host_id = f"mon-test-{uuid.uuid4().hex[:8]}"
        self.audit = MemoryAuditLog()
        self.metrics = ExecutorMetrics()
        self.monitor = Monitor(
            client=client, host_id=self.host_id,
            pools={"quiet": pool("quiet"), "stopper": pool("stopper", "stop")},
            audit=self.audit, metrics=self.metrics,
            stop_container=lambda name: client.containers.get(name).kill(),
            firewall=firewall, interval_s=0.3)

    def job(self, pool_name: str, command: str, *, hardened: bool = True, **options):
        """A container labelled as a job's runner of this host; `hardened`: as the hardened
        profile runs one (unprivileged user, no capabilities, no new privileges, read-only)."""
        name = f"{self.host_id}-{uuid.uuid4().hex[:6]}"
        if hardened:
            options = {"user": "1001", "cap_drop": ["ALL"], "read_only": True,
                       "security_opt": ["no-new-privileges:true"]} | options
        else:
            options = {"user": "root"} | options
        return self.client.containers.run(
            RUNNER_IMAGE, ["sh", "-c", command], entrypoint=[], detach=True, name=name,
            labels={MANAGED_LABEL: "true", HOST_LABEL: self.host_id, "runnerhub.pool": pool_name,
                    "runnerhub.runner": name, "runnerhub.job": "4242"},
            network_mode="none", **options)

    def findings(self, container) -> list:
        return [r for r in self.audit.items.values() if r.target == f"container:{container.name}"]

    def run_until(self, predicate, timeout: float = 8.0) -> bool:
        """Ticks the monitor (as the daemon does) until `predicate()` or the timeout."""
        return wait_for(lambda: (self.monitor.tick(time.time()), predicate())[1],
                        timeout=timeout, interval=0.1)

    def recorded(self, container, kind: str, timeout: float = 8.0):
        action = f"violation:{kind}"
        assert self.run_until(lambda: any(r.action == action for r in self.findings(container)),
                              timeout), (kind, [r.action for r in self.findings(container)])
        return next(r for r in self.findings(container) if r.action == action)

    def seen(self, container) -> bool:
        """The monitor has read the container's mounts once (its baseline)."""
        return self.run_until(lambda: any(
            s.watched.name == container.name and s.mounts is not None
            for s in self.monitor._seen.values()))

    def close(self) -> None:
        self.monitor.close()
        for container in self.client.containers.list(
                all=True, filters={"label": f"{HOST_LABEL}={self.host_id}"}):
            with contextlib.suppress(Exception):
                container.remove(force=True)


@pytest.fixture
def harness(docker_client):
    harness = Harness(docker_client)
    harness.monitor.start()
    assert harness.monitor.events.ready.wait(5), "docker events stream not open"
    yield harness
    harness.close()


def test_a_quiet_hardened_container_produces_no_finding(harness):
    quiet = harness.job("quiet", "sleep 60")
    assert harness.seen(quiet)
    harness.run_until(lambda: False, timeout=2.0)  # several polls of its processes
    assert harness.findings(quiet) == []
    assert harness.metrics.value("runnerhub_isolation_violations_total", pool="quiet",
                                 kind="exec") == 0


def test_an_exec_into_a_container_is_recorded_once_with_its_job(harness):
    target = harness.job("quiet", "sleep 60")
    bystander = harness.job("quiet", "sleep 60")
    assert harness.seen(target)
    started = time.monotonic()
    target.exec_run(["id", "-u"])
    record = harness.recorded(target, "exec", timeout=5.0)
    assert time.monotonic() - started < 5.0
    assert record.sub == "runnerhub-monitor"
    assert record.change["job_id"] == 4242 and record.change["pool"] == "quiet"
    assert record.change["host"] == harness.host_id
    assert "id -u" in record.reason
    target.exec_run(["id", "-u"])  # the same again: not a second record
    harness.run_until(lambda: False, timeout=1.5)
    assert [r.action for r in harness.findings(target)] == ["violation:exec"]
    assert harness.findings(bystander) == []
    assert harness.metrics.value("runnerhub_isolation_violations_total", pool="quiet",
                                 kind="exec") == 1


def test_a_container_with_a_capability_beyond_the_hardened_set_is_recorded(harness):
    privileged = harness.job("quiet", "sleep 60", hardened=False, cap_add=["SYS_ADMIN"])
    record = harness.recorded(privileged, "privilege_gained")
    details = " ".join(r.reason for r in harness.findings(privileged))
    assert "SYS_ADMIN" in details
    assert record.outcome == "ok"
    privileged.reload()
    assert privileged.status == "running"  # a `record` pool's container is not stopped


def test_a_mount_inside_a_container_is_recorded(harness):
    mounter = harness.job("quiet", "sleep 2; mount -t tmpfs none /mnt && sleep 60",
                          hardened=False, cap_add=["SYS_ADMIN"])
    assert harness.seen(mounter)  # the baseline comes before the mount
    record = harness.recorded(mounter, "mounted")
    assert "tmpfs on /mnt" in record.reason


def test_on_violation_stop_stops_the_container_at_once(harness):
    stopped = harness.job("stopper", "sleep 60")
    kept = harness.job("quiet", "sleep 60")
    assert harness.seen(stopped) and harness.seen(kept)
    stopped.exec_run(["true"])
    kept.exec_run(["true"])
    record = harness.recorded(stopped, "exec")
    assert "container stopped" in record.reason and record.change["stopped"] is True
    assert wait_for(lambda: (stopped.reload(), stopped.status)[1] == "exited", timeout=5)
    harness.recorded(kept, "exec")
    kept.reload()
    assert kept.status == "running"  # a `record` pool's container is only recorded


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True,
                          check=check, timeout=15)


@pytest.fixture
def test_chain():
    """A RUNNERHUB-like chain of the test's own, jumped to from OUTPUT for one loopback
    address only; removed after."""
    require(subprocess.run(["iptables", "--version"], capture_output=True).returncode == 0,
            "the iptables CLI")
    chain = f"RH-MON-{uuid.uuid4().hex[:6].upper()}"
    jump = ["OUTPUT", "-d", f"{BLOCKED_ADDRESS}/32", "-p", "udp", "-j", chain]
    _iptables("-N", chain)
    try:
        _iptables("-I", *jump)
        yield chain
    finally:
        _iptables("-D", *jump, check=False)
        _iptables("-F", chain, check=False)
        _iptables("-X", chain, check=False)


def test_a_blocked_address_counter_that_grows_is_recorded(docker_client, test_chain):
    harness = Harness(docker_client,
                      firewall=FirewallCounters(chain=test_chain, table="filter"))
    try:
        tried = harness.job("quiet", "sleep 60")
        bystander = harness.job("quiet", "sleep 60")
        network = f"rh-job-{tried.name}"
        _iptables("-A", test_chain, "-d", f"{BLOCKED_ADDRESS}/32", "-m", "comment",
                  "--comment", f"runnerhub:{network}:host", "-j", "DROP")
        assert harness.seen(tried) and harness.seen(bystander)
        harness.run_until(lambda: False, timeout=1.0)
        assert harness.findings(tried) == []  # nothing tried yet: the counter stood still
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _ in range(3):
                with contextlib.suppress(OSError):  # EPERM: the DROP in OUTPUT
                    sock.sendto(b"x", (BLOCKED_ADDRESS, 9))
        assert FirewallCounters(chain=test_chain, table="filter").read()[(network, "host")] >= 3
        record = harness.recorded(tried, "blocked_address")
        assert record.reason == f"blocked: host ({network})"
        assert harness.findings(bystander) == []
    finally:
        harness.close()


def test_a_job_engine_is_held_to_its_grant_and_an_exec_into_it_is_recorded(harness,
                                                                           engine_image):
    """The `docker` profile's engine (executor/job_engine.py), labelled with its runner's job:
    no `privilege_gained` for the capabilities it is granted (its dockerd holds SYS_ADMIN, which
    a runner would be flagged for); an exec into it, a mount in it outside dockerd's own
    directories, and it outliving its runner are recorded against the job."""
    harness.monitor.outlived_job_s = 3.0
    runner = harness.job("quiet", "sleep 120")
    engines = JobEngines(harness.client, engine_image, harness.host_id)
    engines.start(runner.name, None, job=runner.labels)
    try:
        engine = harness.client.containers.get(engine_name(runner.name))
        assert engine.labels["runnerhub.pool"] == "quiet" and "runnerhub.managed" not in \
            engine.labels
        assert harness.seen(engine)
        dockerd = cap_names(cap_eff(Path(f"/proc/{engine.attrs['State']['Pid']}/status")
                                    .read_text()))
        assert "SYS_ADMIN" in dockerd and dockerd <= engines.capabilities
        harness.run_until(lambda: False, timeout=2.0)  # several polls, its runner running
        assert harness.findings(engine) == []

        engine.exec_run(["sh", "-c", "mkdir -p /var/lib/docker/rh-own /mnt/x && "
                         "mount -t tmpfs none /var/lib/docker/rh-own && "
                         "mount -t tmpfs none /mnt/x"])
        record = harness.recorded(engine, "exec", timeout=5.0)
        assert record.change["job_id"] == 4242 and record.change["pool"] == "quiet"
        assert record.change["runner"] == runner.name
        mounted = harness.recorded(engine, "mounted")
        assert mounted.reason == "mount: tmpfs on /mnt/x"  # dockerd's data root: not a finding
        assert [r.reason for r in harness.findings(engine)
                if r.action == "violation:mounted"] == [mounted.reason]

        runner.remove(force=True)  # the job ended; its engine was left running
        outlived = harness.recorded(engine, "outlived_job", timeout=10.0)
        assert f"without its runner {runner.name}" in outlived.reason
        assert not any(r.action == "violation:privilege_gained"
                       for r in harness.findings(engine))
    finally:
        engines.remove(runner.name)
