"""The runtime monitor's pure parts (executor/monitor.py): CapEff parsing, the mountinfo diff,
the firewall counters and their growth, dedupe, Docker's events, the cgroup v1 and v2 process
lists (fake /proc and /sys/fs/cgroup trees), and the outlived-job rule with fake stores."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from chalicelib.api.audit import MemoryAuditLog
from chalicelib.jobs import JobRecord, JobState
from chalicelib.pools import Pool
from chalicelib.runners import RunnerRecord, RunnerState
from executor.metrics import ExecutorMetrics
from executor.monitor import (
    RUNNER_CAPABILITIES,
    CgroupError,
    Dedupe,
    Finding,
    FirewallCounters,
    Monitor,
    Watched,
    _Seen,
    cap_eff,
    cap_names,
    capability_findings,
    cgroup_pids,
    counter_growth,
    engine_own_mount,
    event_finding,
    expected_capabilities,
    factory,
    firewall_counters,
    mounts,
    new_mounts,
    runner_of_network,
)

STATUS = """Name:\tsleep
Uid:\t0\t0\t0\t0
CapInh:\t0000000000000000
CapPrm:\t00000000a82425fb
CapEff:\t00000000a82425fb
CapBnd:\t00000000a82425fb
"""


def test_cap_eff_reads_the_effective_mask_only():
    assert cap_eff(STATUS) == 0xA82425FB


def test_a_status_without_capeff_is_an_error_not_zero():
    with pytest.raises(ValueError):
        cap_eff("Name:\tsleep\n")


def test_docker_defaults_plus_sys_admin_read_as_names():
    assert cap_names(0xA82425FB) == {
        "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
        "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
        "SYS_ADMIN"}


def test_an_unprivileged_process_holds_no_capability():
    assert cap_names(0) == frozenset()


def test_a_capability_newer_than_the_table_is_named_by_its_bit():
    assert cap_names(1 << 45) == frozenset({"CAP_45"})


def _watched(**fields) -> Watched:
    return Watched(**({"container_id": "c1", "name": "r1", "pid": 10, "pool": "p",
                       "job_id": 7, "privileged": False, "cap_add": frozenset()} | fields))


def test_no_capability_beyond_the_profile_is_no_finding():
    assert capability_findings(_watched(), frozenset(), [frozenset(), frozenset()]) == []


def test_a_process_holding_a_capability_beyond_the_hardened_set_is_a_finding():
    details = capability_findings(_watched(), frozenset(), [frozenset(), frozenset({"SYS_ADMIN"})])
    assert details == ["effective capabilities: SYS_ADMIN"]


def test_a_privileged_or_cap_added_container_is_a_finding_before_any_process_uses_it():
    details = capability_findings(_watched(privileged=True, cap_add=frozenset({"NET_ADMIN"})),
                                  frozenset(), [])
    assert details == ["privileged container", "capabilities added: NET_ADMIN"]


def test_the_expected_set_is_what_the_containers_are_started_with_in_both_profiles():
    from executor.containers import RunnerSpec, hardened_options

    for isolation in ("hardened", "docker"):
        spec = RunnerSpec(name="r", image="i", pool="p", job_id=1, generation=1, host_id="h",
                          cpus=1, memory_mb=512, pids_limit=64, isolation=isolation)
        options = hardened_options(spec, 1001)
        assert options["cap_drop"] == ["ALL"] and not options.get("cap_add")
        assert not options["privileged"]
        pool = Pool(name="p", labels=("x",), scope={"owner": "o"}, image="i",
                    isolation=isolation)
        assert expected_capabilities(pool) == RUNNER_CAPABILITIES == frozenset()
    assert expected_capabilities(None) == RUNNER_CAPABILITIES  # an unknown pool


MOUNTINFO = r"""812 700 0:52 / / rw,relatime master:310 - overlay overlay rw,lowerdir=/x
813 812 0:56 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
814 812 0:57 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
815 812 8:1 /var/lib/docker/x/hosts /etc/hosts rw,relatime - ext4 /dev/sda1 rw
816 812 0:60 / /my\040dir rw shared:5 master:1 - tmpfs none rw
"""


def test_mountinfo_reads_mount_points_and_types_with_optional_fields_and_escapes():
    assert mounts(MOUNTINFO) == {("/", "overlay"), ("/proc", "proc"), ("/dev", "tmpfs"),
                                 ("/etc/hosts", "ext4"), ("/my dir", "tmpfs")}


def test_a_malformed_mountinfo_line_is_skipped():
    assert mounts("garbage\n1 2 3\n") == frozenset()


def test_a_new_mount_is_reported_and_the_start_up_set_is_not():
    baseline = mounts(MOUNTINFO)
    later = mounts(MOUNTINFO + "900 812 0:70 / /mnt rw - tmpfs none rw\n")
    assert new_mounts(baseline, later) == ["tmpfs on /mnt"]
    assert new_mounts(baseline, baseline) == []
    # An unmount is no finding.
    assert new_mounts(baseline, baseline - {("/dev", "tmpfs")}) == []


# `iptables -L RUNNERHUB -v -x -n` output, its columns squeezed to one space each.
LISTING = """Chain RUNNERHUB (2 references)
pkts bytes target prot opt in out source destination
5 300 DROP all -- * * 0.0.0.0/0 169.254.0.0/16 /* runnerhub:rh-job-a:imds */
2 120 DROP all -- br-1 * 0.0.0.0/0 10.0.0.1 /* runnerhub:rh-job-a:host */
1 60 DROP all -- br-1 * 0.0.0.0/0 10.0.0.2 /* runnerhub:rh-job-a:host */
40 4000 ACCEPT all -- * * 0.0.0.0/0 1.2.3.0/24 /* runnerhub:rh-job-a:allow */
9 900 DROP all -- * * 0.0.0.0/0 0.0.0.0/0 /* other:thing */
3 180 REJECT all -- * * 0.0.0.0/0 0.0.0.0/0 /* runnerhub:rh-job-b:egress */ reject-with tcp-reset
0 0 RETURN all -- * * 0.0.0.0/0 0.0.0.0/0
"""


def test_firewall_counters_sum_blocking_rules_per_network_and_kind():
    assert firewall_counters(LISTING) == {("rh-job-a", "imds"): 5, ("rh-job-a", "host"): 3,
                                          ("rh-job-b", "egress"): 3}


def test_growth_is_a_finding_a_standing_or_shrinking_counter_is_not():
    before = {("n", "imds"): 5, ("n", "host"): 3, ("m", "egress"): 9}
    after = {("n", "imds"): 7, ("n", "host"): 3, ("m", "egress"): 1}
    assert counter_growth(before, after, new_from_zero=True) == [("n", "imds", 2)]


def test_a_rule_seen_at_the_first_read_is_a_baseline_a_later_one_counts_from_zero():
    after = {("n", "host"): 4}
    assert counter_growth({}, after, new_from_zero=False) == []
    assert counter_growth({}, after, new_from_zero=True) == [("n", "host", 4)]


def test_a_job_network_names_its_runner():
    assert runner_of_network("rh-job-pool-abc") == "pool-abc"
    assert runner_of_network("runnerhub") is None


def test_a_missing_chain_reads_as_no_rules_other_failures_raise():
    def run(stderr, code=1):
        return lambda *a, **k: SimpleNamespace(returncode=code, stdout="", stderr=stderr)

    assert FirewallCounters(run=run("iptables: No chain/target/match by that name.")).read() == {}
    with pytest.raises(RuntimeError, match="Permission denied"):
        FirewallCounters(run=run("Permission denied (you must be root)")).read()


def _finding(kind="exec", detail="exec: id", container="c1") -> Finding:
    return Finding(container_id=container, name="r1", pool="p", job_id=1, kind=kind,
                   detail=detail)


def test_dedupe_records_each_container_kind_and_detail_once():
    dedupe = Dedupe()
    assert dedupe.first(_finding())
    assert not dedupe.first(_finding())
    assert dedupe.first(_finding(detail="exec: sh"))
    assert dedupe.first(_finding(kind="mounted"))
    assert dedupe.first(_finding(container="c2"))


def test_dedupe_forgets_containers_that_are_gone():
    dedupe = Dedupe()
    dedupe.first(_finding(container="c1"))
    dedupe.first(_finding(container="c2"))
    dedupe.forget(["c2"])
    assert len(dedupe) == 1
    assert dedupe.first(_finding(container="c1"))


def _event(action: str, **attributes) -> dict:
    return {"Type": "container", "Action": action,
            "Actor": {"ID": "abc", "Attributes": {"name": "r1", "runnerhub.pool": "p",
                                                  "runnerhub.job": "42",
                                                  "runnerhub.managed": "true"} | attributes}}


def test_an_exec_event_is_a_finding_with_its_command_and_job():
    found = event_finding(_event("exec_start: sh -c id"))
    assert (found.kind, found.detail, found.job_id, found.pool) == ("exec", "exec: sh -c id",
                                                                    42, "p")
    # exec_create and exec_start of one exec are one finding (same detail).
    assert event_finding(_event("exec_create: sh -c id")).key == found.key


def test_an_update_event_is_a_privilege_finding_and_other_events_are_none():
    assert event_finding(_event("update")).kind == "privilege_gained"
    for action in ("start", "die", "exec_die", "kill"):
        assert event_finding(_event(action)) is None


def _proc(tmp_path: Path, pid: int, cgroup: str) -> Path:
    proc = tmp_path / "proc"
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cgroup").write_text(cgroup)
    return proc


def test_cgroup_v2_lists_the_container_scope_and_its_sub_cgroups(tmp_path):
    root = tmp_path / "cgroup"
    scope = root / "system.slice" / "docker-abc.scope"
    (scope / "inner").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (scope / "cgroup.procs").write_text("100\n101\n")
    (scope / "inner" / "cgroup.procs").write_text("102\n")
    proc = _proc(tmp_path, 100, "0::/system.slice/docker-abc.scope\n")
    assert sorted(cgroup_pids(100, proc, root)) == [100, 101, 102]


def test_cgroup_v1_reads_the_pids_hierarchy(tmp_path):
    root = tmp_path / "cgroup"
    (root / "pids" / "docker" / "abc").mkdir(parents=True)
    (root / "pids" / "docker" / "abc" / "cgroup.procs").write_text("200\n201\n")
    (root / "unified").mkdir()  # hybrid: the v2 mount under unified/ is not the root
    proc = _proc(tmp_path, 200, "12:memory:/docker/abc\n8:pids:/docker/abc\n"
                                "1:name=systemd:/docker/abc\n0::/docker/abc\n")
    assert sorted(cgroup_pids(200, proc, root)) == [200, 201]


def test_a_process_gone_or_a_cgroup_missing_is_a_cgroup_error(tmp_path):
    with pytest.raises(CgroupError):
        cgroup_pids(300, tmp_path / "proc", tmp_path / "cgroup")
    proc = _proc(tmp_path, 301, "0::/gone\n")
    (tmp_path / "cgroup").mkdir()
    (tmp_path / "cgroup" / "cgroup.controllers").write_text("")
    with pytest.raises(CgroupError, match="not found"):
        cgroup_pids(301, proc, tmp_path / "cgroup")


class _Store:
    def __init__(self, record):
        self.record, self.reads = record, 0

    def get(self, _key):
        self.reads += 1
        return self.record


def _monitor(runners, jobs, **fields) -> Monitor:
    return Monitor(client=None, host_id="h", pools={}, audit=MemoryAuditLog(),
                   metrics=ExecutorMetrics(), stop_container=lambda name: None,
                   runners=runners, jobs=jobs, outlived_job_s=60, **fields)


def _records(runner_state=RunnerState.BUSY, job_state=JobState.COMPLETED):
    runner = RunnerRecord(runner_name="r1", state=runner_state, job_id=7, took_job_id=8,
                          repository="acme/app")
    job = JobRecord(job_id=8, state=job_state, repository="acme/app", updated_at=1000.0,
                    completed_at=1000.0)
    return _Store(runner), _Store(job)


def test_a_container_running_past_its_completed_job_is_outlived_only_after_the_grace():
    runners, jobs = _records()
    monitor = _monitor(runners, jobs)
    seen = _Seen(_watched())
    assert monitor._outlived(seen, 1030.0) == []  # completed 30 s ago: within the grace
    found = monitor._outlived(seen, 1061.0)
    assert [f.kind for f in found] == ["outlived_job"]
    assert "job 8" in found[0].detail
    assert jobs.reads == 1  # a completed job is read once, not every tick


def test_a_runner_still_on_its_job_or_not_busy_is_not_outlived():
    for runner_state, job_state in ((RunnerState.BUSY, JobState.IN_PROGRESS),
                                    (RunnerState.IDLE, JobState.COMPLETED)):
        runners, jobs = _records(runner_state, job_state)
        monitor = _monitor(runners, jobs)
        assert monitor._outlived(_Seen(_watched()), 5000.0) == []


def test_a_finding_is_audited_counted_and_stops_only_a_stop_pools_container():
    stopped: list[str] = []
    runners, jobs = _records()
    monitor = _monitor(runners, jobs)
    monitor.pools = {
        "p": Pool(name="p", labels=("x",), scope={"owner": "o"}, image="i",
                  on_violation="stop"),
        "q": Pool(name="q", labels=("x",), scope={"owner": "o"}, image="i")}
    monitor.stop_container = stopped.append
    assert monitor._record(_finding(), 2000.0)
    assert not monitor._record(_finding(), 2001.0)  # once
    record = next(iter(monitor.audit.items.values()))
    assert record.action == "violation:exec" and record.target == "container:r1"
    assert record.change["repository"] == "acme/app" and record.change["stopped"] is True
    assert stopped == ["r1"]
    quiet = Finding(container_id="c9", name="r9", pool="q", job_id=2, kind="mounted",
                    detail="mount: tmpfs on /mnt")
    assert monitor._record(quiet, 2002.0)
    assert stopped == ["r1"]
    assert monitor.metrics.value("runnerhub_isolation_violations_total", pool="p",
                                 kind="exec") == 1


def test_an_audit_outage_still_counts_and_logs_the_finding():
    class Down:
        def append(self, record):
            raise RuntimeError("table unavailable")

    monitor = _monitor(None, None)
    monitor.audit = Down()
    assert monitor._record(_finding(), 1.0)
    assert monitor.metrics.value("runnerhub_isolation_violations_total", pool="p",
                                 kind="exec") == 1
    assert monitor.metrics.value("runnerhub_executor_errors_total", where="audit") == 1


def _settings(**fields):
    return SimpleNamespace(**({"monitor": True, "docker_network": "runnerhub",
                               "monitor_interval_s": 2.0, "outlived_job_s": 300.0,
                               "deployment": "dev/jobs"} | fields))


def _context():
    return SimpleNamespace(host_id="h", pools={}, metrics=ExecutorMetrics(), runners=None,
                           jobs=None, containers=SimpleNamespace(stop=lambda *a, **k: None))


def test_the_factory_reads_firewall_counters_only_where_there_is_a_firewall():
    assert factory(_settings(monitor=False), None, MemoryAuditLog()) is None
    hardened = factory(_settings(), None, MemoryAuditLog())(_context())
    assert isinstance(hardened.firewall, FirewallCounters)
    assert hardened.firewall.chain == "RUNNERHUB"
    local = factory(_settings(docker_network="host"), None, MemoryAuditLog())(_context())
    assert local.firewall is None


def test_the_daemons_tick_runs_the_monitor_and_goes_on_when_it_fails(monkeypatch):
    """The hook in executor/daemon.py: every tick, after the runner watch; a failing monitor
    is counted and logged, and the recovery scans still run."""
    from chalicelib.memory import (
        InMemoryClaimIndex,
        InMemoryDemandQueue,
        InMemoryHostStore,
        InMemoryJobStore,
        InMemoryRunnerStore,
    )
    from executor.daemon import Executor
    from executor.settings import ExecutorSettings
    from tests.unit.test_executor import POOLS, Clock, FakeConsumer, FakeContainers, FakeGitHub

    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_ID", "1")
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_KEY_FILE", "/dev/null")

    class Failing:
        def __init__(self):
            self.ticks = []

        def tick(self, now):
            self.ticks.append(now)
            raise RuntimeError("cgroup tree unreadable")

    built = {}
    jobs = InMemoryJobStore()
    clock = Clock(500.0)
    daemon = Executor(
        ExecutorSettings(host_id="h1", slots=1), POOLS.pools, jobs=jobs,
        runners=InMemoryRunnerStore(), hosts=InMemoryHostStore(),
        claims=InMemoryClaimIndex(jobs), consumer=FakeConsumer(),
        demand=InMemoryDemandQueue(), github=FakeGitHub(), containers=FakeContainers(),
        metrics=ExecutorMetrics(), clock=clock,
        monitor=lambda ctx: built.setdefault("monitor", Failing()))
    scans = []
    daemon._recover = lambda: scans.append(True)
    daemon._tick_safely()
    assert built["monitor"].ticks == [500.0]
    assert daemon.metrics.value("runnerhub_executor_errors_total",
                                where="isolation_monitor") == 1
    assert scans == [True]


# --- the `docker` profile's engine (executor/job_engine.py), watched too ---

ENGINE_GRANTED = frozenset({"CHOWN", "SYS_ADMIN", "NET_ADMIN", "SYS_MODULE"})


def _engine_event(action: str, **labels) -> dict:
    return {"Type": "container", "Action": action,
            "Actor": {"ID": "e1", "Attributes": {
                "name": "rh-engine-r1", "runnerhub.engine": "true", "runnerhub.runner": "r1",
                "runnerhub.pool": "builds", "runnerhub.job": "42"} | labels}}


def test_an_exec_into_an_engine_is_a_finding_against_its_runners_job():
    found = event_finding(_engine_event("exec_start: sh -c 'mount /dev/xvda1 /mnt'"))
    assert (found.kind, found.name, found.runner, found.pool, found.job_id) == (
        "exec", "rh-engine-r1", "r1", "builds", 42)


def test_events_of_containers_neither_runner_nor_engine_are_no_finding():
    probe = {"Type": "container", "Action": "exec_start: true",
             "Actor": {"ID": "p", "Attributes": {"name": "probe", "runnerhub.host": "h"}}}
    assert event_finding(probe) is None
    assert event_finding(_engine_event("exec_start: id", **{"runnerhub.engine": "false"})) \
        is None


def test_an_engine_holding_what_it_is_granted_is_no_finding_more_is():
    engine = _watched(name="rh-engine-r1", runner="r1", engine=True, cap_add=ENGINE_GRANTED)
    expected = expected_capabilities(None, ENGINE_GRANTED)
    assert expected == ENGINE_GRANTED
    assert capability_findings(engine, expected, [ENGINE_GRANTED, frozenset({"SYS_ADMIN"})]) \
        == []
    # What a runner would be flagged for, the engine is not: the check is against the grant.
    assert capability_findings(engine, RUNNER_CAPABILITIES, [frozenset({"SYS_ADMIN"})])
    assert capability_findings(engine, expected, [ENGINE_GRANTED | {"BPF"}]) == [
        "effective capabilities: BPF"]
    assert capability_findings(_watched(engine=True, privileged=True,
                                        cap_add=ENGINE_GRANTED | {"SYS_BOOT"}), expected,
                               []) == ["privileged container", "capabilities added: SYS_BOOT"]


def test_mounts_dockerd_makes_for_the_job_are_its_own_and_others_are_not():
    for point in ("/var/lib/docker", "/var/lib/docker/overlay2/abc/merged",
                  "/run/docker/netns/1a2b", "/var/run/docker/netns/default",
                  "/run/containerd/io.containerd.runtime.v2.task/moby/x/rootfs"):
        assert engine_own_mount(point), point
    for point in ("/mnt", "/", "/var/lib/dockerd-elsewhere", "/run", "/host/var/lib/docker"):
        assert not engine_own_mount(point), point


def test_an_engine_without_its_runner_outlives_its_job_only_after_the_grace():
    monitor = _monitor(None, None)
    seen = _Seen(_watched(name="rh-engine-r1", runner="r1", engine=True))
    assert monitor._engine_outlived(seen, set(), 1000.0) == []  # starting: runner not yet up
    assert monitor._engine_outlived(seen, {"r1"}, 1030.0) == []  # the runner came up
    assert seen.runner_gone_at is None
    assert monitor._engine_outlived(seen, {"r2"}, 1100.0) == []  # its runner exited
    assert monitor._engine_outlived(seen, set(), 1159.0) == []
    found = monitor._engine_outlived(seen, set(), 1160.0)
    assert [(f.kind, f.name, f.runner) for f in found] == [
        ("outlived_job", "rh-engine-r1", "r1")]
    assert "engine running without its runner r1" in found[0].detail


class _Api:
    """Docker's list and inspect, as the monitor calls them."""

    def __init__(self, containers: list[dict]) -> None:
        self.listed, self.filters = containers, []

    def containers(self, filters):
        self.filters.append(filters)
        return self.listed

    def inspect_container(self, container_id):
        summary = next(c for c in self.listed if c["Id"] == container_id)
        return {"Name": "/" + summary["Name"], "State": {"Pid": 100},
                "HostConfig": summary.get("HostConfig", {})}


def test_the_monitor_lists_runners_and_engines_of_its_host_and_nothing_else():
    api = _Api([
        {"Id": "r", "Name": "r1", "Labels": {"runnerhub.managed": "true",
                                             "runnerhub.runner": "r1", "runnerhub.pool": "b",
                                             "runnerhub.job": "7"}},
        {"Id": "e", "Name": "rh-engine-r1", "Labels": {
            "runnerhub.engine": "true", "runnerhub.runner": "r1", "runnerhub.pool": "b",
            "runnerhub.job": "7"}, "HostConfig": {"CapAdd": ["CAP_SYS_ADMIN"]}},
        {"Id": "p", "Name": "disk-probe", "Labels": {"runnerhub.probe": "disk"}},
    ])
    monitor = _monitor(None, None)
    monitor.client = SimpleNamespace(api=api)
    running = monitor._running()
    assert api.filters == [{"label": ["runnerhub.host=h"], "status": "running"}]
    watched = {cid: seen.watched for cid, seen in running.items()}
    assert sorted(watched) == ["e", "r"]
    assert (watched["r"].engine, watched["r"].runner) == (False, "r1")
    assert (watched["e"].engine, watched["e"].runner, watched["e"].pool,
            watched["e"].job_id, watched["e"].cap_add) == (True, "r1", "b", 7,
                                                           frozenset({"SYS_ADMIN"}))
