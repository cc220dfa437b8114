"""The runtime monitor: what a job's container does that it should not, recorded and (per pool)
stopped.

Watched, for each RunnerHub-managed container of this host and each `docker` profile job's
engine (label `runnerhub.engine`, executor/job_engine.py) (docs/security.md, "The runtime
monitor"):
- its processes (the container's cgroup, v1 or v2, read through /proc): an effective capability
  beyond what the pool's profile grants -> `privilege_gained`; a mount that was not there when
  the monitor first saw the container -> `mounted`;
- Docker's events: an exec into it -> `exec`; a `docker update` of it -> `privilege_gained`;
- the firewall's counters (chain RUNNERHUB, rules commented `runnerhub:<network>:<kind>`,
  executor/firewall.py): a DROP rule of its job network whose packet count grew ->
  `blocked_address` (kind imds, host or egress);
- its runner's job: still running `outlived_job_s` after the job's record says completed ->
  `outlived_job`; an engine also when its runner's container has not been running for
  `outlived_job_s`.

An engine is privileged by design: it is held to what it is granted (`JobEngines.capabilities`),
not to the runner's nothing, and its mounts are those of its own mount namespace (dockerd's)
outside the directories where dockerd mounts the job's own containers and builds
(`ENGINE_MOUNT_ROOTS`): those are the job's business, inside an engine it controls anyway.

Each finding is recorded once per (container, kind, detail): an audit record (actor
`runnerhub-monitor`, action `violation:<kind>`, the JSON line first, then the put) and the
metric `runnerhub_isolation_violations_total{pool,kind}`; a pool with `on_violation = "stop"`
has the container killed at once (its job fails).

The parsers are pure functions (unit-tested); `Monitor` acts, from the daemon's tick, with the
events read on a thread of their own (`DockerEvents`).
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from aws_lambda_powertools import Logger

from chalicelib.api.audit import AuditRecord, new_record
from chalicelib.jobs import JobState
from chalicelib.pools import Pool
from chalicelib.runners import RunnerState
from executor.containers import HOST_LABEL, LABEL_PREFIX, MANAGED_LABEL
from executor.firewall import CHAIN, TABLE, parse_counters
from executor.job_engine import ENGINE_LABEL, RUNNER_LABEL, bounding_capabilities

logger = Logger(service="runnerhub-executor")

Kind = Literal["privilege_gained", "mounted", "exec", "blocked_address", "outlived_job"]
ACTOR = "runnerhub-monitor"
JOB_NETWORK_PREFIX = "rh-job-"
# Firewall rule kinds that block (their counters are attempts); `allow` rules accept.
BLOCKING_KINDS = frozenset({"imds", "host", "jobs", "egress"})
# The runner's job record is read at most this often per busy container (outlived_job).
RECORDS_EVERY_S = 15.0

# Capability bit -> name, as in linux/capability.h (stable ABI; 41 known in Linux 6.x).
CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)
# A runner container drops every capability and adds none, in both profiles
# (executor/containers.py `hardened_options`: the runner runs as an unprivileged user); the
# `docker` profile's engine is a sibling container (label `runnerhub.engine`, not
# `runnerhub.managed`) granted every capability of the host's bounding set Docker knows.
RUNNER_CAPABILITIES: frozenset[str] = frozenset()
# Where an engine's dockerd (and its containerd) mount, for the job's containers, builds and
# network namespaces: its data root and exec roots.
ENGINE_MOUNT_ROOTS = ("/var/lib/docker", "/run/docker", "/var/run/docker", "/run/containerd",
                      "/var/run/containerd")


def expected_capabilities(pool: Pool | None, engine: frozenset[str] | None = None
                          ) -> frozenset[str]:
    """What a container of this pool may hold: a runner nothing (an unknown pool: the same);
    an engine (`engine`: what it is granted) that."""
    return RUNNER_CAPABILITIES if engine is None else engine


def engine_own_mount(mount_point: str) -> bool:
    """A mount dockerd makes for the job (under its data or exec roots), not a finding."""
    return any(mount_point == root or mount_point.startswith(root + "/")
               for root in ENGINE_MOUNT_ROOTS)


# --- pure parsers ---

def cap_eff(status: str) -> int:
    """The CapEff mask of a /proc/PID/status text. ValueError when it has none."""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split(":", 1)[1].strip(), 16)
    raise ValueError("no CapEff line")


def cap_names(mask: int) -> frozenset[str]:
    """Capability names of a mask; bits Linux adds later read as CAP_<bit>."""
    return frozenset(CAPABILITIES[bit] if bit < len(CAPABILITIES) else f"CAP_{bit}"
                     for bit in range(mask.bit_length()) if mask >> bit & 1)


def _unescape(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def mounts(mountinfo: str) -> frozenset[tuple[str, str]]:
    """(mount point, file system type) of each line of a /proc/PID/mountinfo text (proc(5):
    the optional fields end at a lone "-", then fstype and source)."""
    found = set()
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        separator = fields.index("-", 6)
        if len(fields) <= separator + 1:
            continue
        found.add((_unescape(fields[4]), fields[separator + 1]))
    return frozenset(found)


def new_mounts(baseline: frozenset[tuple[str, str]], now: Iterable[tuple[str, str]]
               ) -> list[str]:
    """The mounts not in the baseline, as `<fstype> on <mount point>`, sorted."""
    return sorted(f"{fstype} on {point}" for point, fstype in set(now) - baseline)


def firewall_counters(listing: str) -> dict[tuple[str, str], int]:
    """Packets per (network, kind) of the blocking rules (kinds imds, host, egress) in
    `iptables -L CHAIN -v -x -n` output; `allow` rules and others' rules are not attempts."""
    return {key: packets for key, packets in parse_counters(listing).items()
            if key[1] in BLOCKING_KINDS}


def counter_growth(before: Mapping[tuple[str, str], int], after: Mapping[tuple[str, str], int],
                   *, new_from_zero: bool) -> list[tuple[str, str, int]]:
    """(network, kind, packets more) for each counter that grew. A counter not seen before
    grew from zero when `new_from_zero` (its rule was made after the first read, before its
    container started: every packet is an attempt), else it is only the baseline. A counter
    that shrank (rules replaced) is a new baseline, never a finding."""
    grown = []
    for key, packets in sorted(after.items()):
        old = before.get(key, 0 if new_from_zero else packets)
        if packets > old:
            grown.append((*key, packets - old))
    return grown


def runner_of_network(network: str) -> str | None:
    """The runner whose job network this is (`rh-job-<runner name>`), else None."""
    return network.removeprefix(JOB_NETWORK_PREFIX) if network.startswith(
        JOB_NETWORK_PREFIX) else None


class CgroupError(Exception):
    """A container's cgroup could not be found or read."""


def cgroup_pids(pid: int, proc: Path = Path("/proc"), root: Path = Path("/sys/fs/cgroup")
                ) -> list[int]:
    """Every process in the cgroup of `pid` and the cgroups below it. cgroup v2 (a unified
    hierarchy at `root`: Debian 12) reads the `0::` line of /proc/PID/cgroup; v1 (this machine)
    the `pids` controller's line (else `memory`'s, else `name=systemd`'s) under root/<that
    controller>. Either cgroup driver (cgroupfs: /docker/<id>, systemd:
    /system.slice/docker-<id>.scope) works: the path comes from the process."""
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError as exc:
        raise CgroupError(f"/proc/{pid}/cgroup: {exc.strerror}") from exc
    paths = {}
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        for controller in controllers.split(",") if controllers else [""]:
            paths[(hierarchy, controller)] = path
    if (root / "cgroup.controllers").exists():
        if ("0", "") not in paths:
            raise CgroupError(f"/proc/{pid}/cgroup has no cgroup v2 line")
        base = root / paths[("0", "")].lstrip("/")
    else:
        by_controller = {controller: path for (_h, controller), path in paths.items()}
        for controller in ("pids", "memory", "name=systemd"):
            if controller in by_controller:
                directory = controller.removeprefix("name=")
                base = root / directory / by_controller[controller].lstrip("/")
                break
        else:
            raise CgroupError(f"/proc/{pid}/cgroup names no pids, memory or systemd hierarchy")
    found: list[int] = []
    if not base.is_dir():
        raise CgroupError(f"{base} not found")
    for directory, _dirs, files in os.walk(base):
        if "cgroup.procs" in files:
            try:
                text = (Path(directory) / "cgroup.procs").read_text()
            except OSError:
                continue  # removed meanwhile
            found += [int(word) for word in text.split()]
    return found


# --- findings ---

@dataclass(frozen=True)
class Watched:
    """A managed container as the monitor knows it (from one inspect)."""

    container_id: str
    name: str
    pid: int
    pool: str
    job_id: int | None
    privileged: bool
    cap_add: frozenset[str]
    runner: str = ""  # its runner's name: its own for a runner, its runner's for an engine
    engine: bool = False  # a `docker` profile job's engine (label runnerhub.engine)


@dataclass(frozen=True)
class Finding:
    container_id: str
    name: str
    pool: str
    job_id: int | None
    kind: Kind
    detail: str
    runner: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return self.container_id, self.kind, self.detail


class Dedupe:
    """Each (container, kind, detail) once; a container's keys go with it (`forget`)."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str, str]] = set()

    def first(self, finding: Finding) -> bool:
        if finding.key in self._seen:
            return False
        self._seen.add(finding.key)
        return True

    def forget(self, keep: Iterable[str]) -> None:
        kept = set(keep)
        self._seen = {key for key in self._seen if key[0] in kept}

    def __len__(self) -> int:
        return len(self._seen)


def capability_findings(watched: Watched, expected: frozenset[str],
                        process_caps: Iterable[frozenset[str]]) -> list[str]:
    """Details of `privilege_gained`: the container privileged or given capabilities beyond
    its profile, or a process holding effective capabilities beyond it."""
    details = []
    if watched.privileged:
        details.append("privileged container")
    extra_config = sorted(watched.cap_add - expected - {"ALL"}) + (
        ["ALL"] if "ALL" in watched.cap_add else [])
    if extra_config:
        details.append("capabilities added: " + ",".join(extra_config))
    held = frozenset().union(*process_caps)
    if held - expected:
        details.append("effective capabilities: " + ",".join(sorted(held - expected)))
    return details


class AuditSink(Protocol):
    def append(self, record: AuditRecord) -> None: ...


class FirewallCounters:
    """The blocking rules' packet counters of the RunnerHub chain, read with the iptables CLI
    (the same binary the firewall writes with). A missing chain reads as no rules."""

    def __init__(self, chain: str = CHAIN, binary: str = "iptables", table: str = TABLE,
                 run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
        self.chain, self.table, self._binary, self._run = chain, table, binary, run

    def read(self) -> dict[tuple[str, str], int]:
        done = self._run([self._binary, "-w", "5", "-t", self.table, "-L", self.chain, "-v",
                          "-x", "-n"],
                         capture_output=True, text=True, timeout=10, check=False)
        if done.returncode != 0:
            if "No chain" in done.stderr or "does not exist" in done.stderr:
                return {}
            raise RuntimeError(f"{self._binary} -L {self.chain}: {done.stderr.strip()[:200]}")
        return firewall_counters(done.stdout)


class DockerEvents:
    """Docker's events for this host's managed containers, on a thread: an exec -> `exec`,
    an update -> `privilege_gained`; the findings wait on a queue for the monitor's tick.
    The stream is reopened (at most `reconnects` times in a row, a second apart) if Docker
    drops it."""

    def __init__(self, client: Any, host_id: str, reconnects: int = 30) -> None:
        self._client, self._host_id, self._reconnects = client, host_id, reconnects
        self.found: queue.SimpleQueue[Finding] = queue.SimpleQueue()
        self._stream: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()  # the stream is open (tests wait on it)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="monitor-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception:
                logger.debug("events stream close failed", exc_info=True)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set() and failures <= self._reconnects:
            try:
                # Docker ANDs label filters: the host's here, runner or engine in
                # event_finding.
                self._stream = self._client.events(decode=True, filters={
                    "type": "container", "label": [f"{HOST_LABEL}={self._host_id}"]})
                self.ready.set()
                failures = 0
                for event in self._stream:
                    found = event_finding(event)
                    if found is not None:
                        self.found.put(found)
            except Exception as exc:  # noqa: BLE001 - Docker restarted or dropped the stream
                if self._stop.is_set():
                    return
                failures += 1
                logger.warning("docker events stream failed (%s); reopening", exc)
            self._stop.wait(1.0)
        if not self._stop.is_set():
            logger.error("docker events stream given up after %d failures: exec and update "
                         "are no longer watched", failures)


def event_finding(event: Mapping[str, Any]) -> Finding | None:
    """An exec into, or an update of, a managed container or a job's engine -> its finding;
    others: None."""
    action = str(event.get("Action") or event.get("status") or "")
    verb, _, command = action.partition(": ")
    actor = event.get("Actor") or {}
    attributes = actor.get("Attributes") or {}
    if "true" not in (attributes.get(MANAGED_LABEL), attributes.get(ENGINE_LABEL)):
        return None
    if verb in ("exec_create", "exec_start"):
        kind: Kind = "exec"
        detail = f"exec: {command.strip()}"[:300]
    elif verb == "update":
        kind = "privilege_gained"
        detail = "container updated (docker update)"
    else:
        return None
    job = attributes.get(f"{LABEL_PREFIX}job", "")
    return Finding(
        container_id=str(actor.get("ID") or event.get("id") or ""),
        name=attributes.get("name", ""), pool=attributes.get(f"{LABEL_PREFIX}pool", ""),
        job_id=int(job) if job.isdigit() else None, kind=kind, detail=detail,
        runner=attributes.get(RUNNER_LABEL, ""))


# --- the monitor ---

@dataclass
class _Seen:
    watched: Watched
    # The mounts as first read (None: not read yet); the baseline of `mounted`.
    mounts: frozenset[tuple[str, str]] | None = None
    repository: str | None = None
    repository_read: bool = False
    records_read_at: float = float("-inf")
    completed_at: float | None = None  # its runner's job's completion, once read
    completed_job: int | None = None
    runner_gone_at: float | None = None  # an engine: since when its runner has not been running


@dataclass
class Monitor:
    """Acts on findings; `tick(now)` from the daemon's monitor thread."""

    client: Any  # docker.DockerClient
    host_id: str
    pools: Mapping[str, Pool]
    audit: AuditSink
    metrics: Any  # executor.metrics.ExecutorMetrics
    stop_container: Callable[[str], None]
    runners: Any = None  # chalicelib RunnerStore (outlived_job, repository); None: not read
    jobs: Any = None  # chalicelib JobStore
    firewall: FirewallCounters | None = None
    interval_s: float = 2.0
    outlived_job_s: float = 300.0
    deployment: str = ""
    proc: Path = Path("/proc")
    cgroup_root: Path = Path("/sys/fs/cgroup")
    events: DockerEvents | None = None
    # What a job's engine is granted (executor/job_engine.py `JobEngines.capabilities`, by
    # default every Docker capability of this host's bounding set).
    engine_capabilities: frozenset[str] = field(
        default_factory=lambda: frozenset(bounding_capabilities()))
    dedupe: Dedupe = field(default_factory=Dedupe)
    _seen: dict[str, _Seen] = field(default_factory=dict, init=False)
    _counters: dict[tuple[str, str], int] | None = field(default=None, init=False)
    _polled_at: float = field(default=float("-inf"), init=False)
    _cgroup_warned: set[str] = field(default_factory=set, init=False)
    recorded: list[Finding] = field(default_factory=list, init=False)  # the last tick's

    def start(self) -> None:
        if self.events is None:
            self.events = DockerEvents(self.client, self.host_id)
        self.events.start()

    def close(self) -> None:
        if self.events is not None:
            self.events.stop()

    def tick(self, now: float) -> list[Finding]:
        """Record what the events thread found; every `interval_s`, poll the containers'
        processes, the firewall's counters and (busy runners) their jobs. The findings
        recorded now."""
        found: list[Finding] = []
        while self.events is not None:
            try:
                found.append(self.events.found.get_nowait())
            except queue.Empty:
                break
        if now - self._polled_at >= self.interval_s:
            self._polled_at = now
            found += self.poll(now)
        self.recorded = [finding for finding in found if self._record(finding, now)]
        return self.recorded

    def poll(self, now: float) -> list[Finding]:
        found: list[Finding] = []
        running = self._running()
        runners = {seen.watched.runner for seen in running.values() if not seen.watched.engine}
        for seen in running.values():
            found += self._processes(seen)
            found += self._outlived(seen, now)
            if seen.watched.engine:
                found += self._engine_outlived(seen, runners, now)
        found += self._firewall(running)
        gone = set(self._seen) - set(running)
        for container_id in gone:
            del self._seen[container_id]
            self._cgroup_warned.discard(container_id)
        if gone:
            self.dedupe.forget(self._seen)
        return found

    def _running(self) -> dict[str, _Seen]:
        """This host's running managed containers and job engines (one list call; one
        inspect per new one)."""
        import docker.errors

        listed = [summary for summary in self.client.api.containers(filters={
            "label": [f"{HOST_LABEL}={self.host_id}"], "status": "running"})
            if "true" in ((summary.get("Labels") or {}).get(MANAGED_LABEL),
                          (summary.get("Labels") or {}).get(ENGINE_LABEL))]
        for summary in listed:
            labels = summary.get("Labels") or {}
            if self.deployment and labels.get(f"{LABEL_PREFIX}deployment",
                                              self.deployment) != self.deployment:
                continue
            if summary["Id"] in self._seen:
                continue
            try:
                attrs = self.client.api.inspect_container(summary["Id"])
            except docker.errors.NotFound:
                continue
            pid = attrs.get("State", {}).get("Pid") or 0
            if not pid:
                continue
            host_config = attrs.get("HostConfig") or {}
            job = labels.get(f"{LABEL_PREFIX}job", "")
            name = attrs.get("Name", "").lstrip("/")
            watched = Watched(
                container_id=summary["Id"], name=name, pid=pid,
                pool=labels.get(f"{LABEL_PREFIX}pool", ""),
                job_id=int(job) if job.isdigit() and int(job) else None,
                privileged=bool(host_config.get("Privileged")),
                cap_add=frozenset(cap.removeprefix("CAP_")
                                  for cap in host_config.get("CapAdd") or ()),
                runner=labels.get(RUNNER_LABEL) or name,
                engine=labels.get(ENGINE_LABEL) == "true"
                and labels.get(MANAGED_LABEL) != "true")
            self._seen[summary["Id"]] = _Seen(watched)
        listed_ids = {summary["Id"] for summary in listed}
        return {cid: seen for cid, seen in self._seen.items() if cid in listed_ids}

    def _pids(self, watched: Watched) -> list[int]:
        try:
            return cgroup_pids(watched.pid, self.proc, self.cgroup_root)
        except CgroupError as exc:
            if watched.container_id not in self._cgroup_warned:  # once per container
                self._cgroup_warned.add(watched.container_id)
                logger.warning("container's cgroup not read (%s): its init process only", exc,
                               extra={"runner": watched.name})
            return [watched.pid]

    def _mount_set(self, pids: Iterable[int]) -> frozenset[tuple[str, str]]:
        """The mounts of every mount namespace among `pids` (one read per namespace)."""
        namespaces: set[str] = set()
        found: set[tuple[str, str]] = set()
        for pid in pids:
            try:
                namespace = os.readlink(self.proc / str(pid) / "ns" / "mnt")
                if namespace in namespaces:
                    continue
                namespaces.add(namespace)
                found |= mounts((self.proc / str(pid) / "mountinfo").read_text())
            except OSError:
                continue  # the process ended meanwhile
        return frozenset(found)

    def _processes(self, seen: _Seen) -> list[Finding]:
        watched = seen.watched
        pids = self._pids(watched)
        caps = []
        for pid in pids:
            try:
                caps.append(cap_names(cap_eff((self.proc / str(pid) / "status").read_text())))
            except (OSError, ValueError):
                continue  # ended meanwhile
        expected = expected_capabilities(
            self.pools.get(watched.pool),
            self.engine_capabilities if watched.engine else None)
        details = [("privilege_gained", detail)
                   for detail in capability_findings(watched, expected, caps)]
        # An engine: its own namespace only (its nested containers' are the job's own).
        now_mounted = self._mount_set([watched.pid] if watched.engine else pids)
        if watched.engine:
            now_mounted = frozenset(mount for mount in now_mounted
                                    if not engine_own_mount(mount[0]))
        if seen.mounts is None:
            # The mounts as first seen are the container's own (Docker's, its volumes and
            # tmpfs); any later one was made from inside.
            seen.mounts = now_mounted or None
        else:
            details += [("mounted", f"mount: {detail}")
                        for detail in new_mounts(seen.mounts, now_mounted)]
        return [self._finding(watched, kind, detail) for kind, detail in details]

    def _firewall(self, running: Mapping[str, _Seen]) -> list[Finding]:
        if self.firewall is None:
            return []
        try:
            counters = self.firewall.read()
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            logger.warning("firewall counters not read: %s", exc)
            return []
        first_read = self._counters is None
        grown = counter_growth(self._counters or {}, counters, new_from_zero=not first_read)
        self._counters = counters
        # A job network's packets are its runner's; its engine's once the runner is gone.
        by_runner: dict[str, Watched] = {}
        for seen in sorted(running.values(), key=lambda seen: not seen.watched.engine):
            by_runner[seen.watched.runner] = seen.watched
        found = []
        for network, kind, packets in grown:
            watched = by_runner.get(runner_of_network(network) or "")
            if watched is None:
                logger.info("blocked packets on %s (%s) with no running container", network,
                            kind, extra={"packets": packets})
                continue
            found.append(self._finding(watched, "blocked_address",
                                       f"blocked: {kind} ({network})"))
        return found

    def _outlived(self, seen: _Seen, now: float) -> list[Finding]:
        """Its runner is busy with a job whose record is completed, and it still runs
        `outlived_job_s` later. The records are read every RECORDS_EVERY_S, and only while
        the job is not known completed."""
        if self.runners is None or self.jobs is None:
            return []
        if seen.completed_at is None and now - seen.records_read_at >= RECORDS_EVERY_S:
            seen.records_read_at = now
            try:
                self._read_completion(seen)
            except Exception as exc:  # noqa: BLE001 - a store outage: read again later
                logger.warning("runner's job not read: %s", exc,
                               extra={"runner": seen.watched.name})
        if seen.completed_at is None or now - seen.completed_at < self.outlived_job_s:
            return []
        return [self._finding(seen.watched, "outlived_job",
                              f"running past job {seen.completed_job} "
                              f"(completed more than {self.outlived_job_s:.0f} s before)")]

    def _engine_outlived(self, seen: _Seen, runners: set[str], now: float) -> list[Finding]:
        """An engine whose runner's container has not been running for `outlived_job_s`
        (exited with its job, or removed without it): it outlived its job. The grace also
        covers the start, when the engine comes up before its runner."""
        if seen.watched.runner in runners:
            seen.runner_gone_at = None
            return []
        if seen.runner_gone_at is None:
            seen.runner_gone_at = now
        if now - seen.runner_gone_at < self.outlived_job_s:
            return []
        return [self._finding(seen.watched, "outlived_job",
                              f"engine running without its runner {seen.watched.runner} "
                              f"(for more than {self.outlived_job_s:.0f} s)")]

    def _read_completion(self, seen: _Seen) -> None:
        record = self.runners.get(seen.watched.runner or seen.watched.name)
        if record is None or record.state is not RunnerState.BUSY:
            return
        job_id = record.took_job_id or record.job_id
        seen.repository, seen.repository_read = record.repository, True
        if not job_id:
            return
        job = self.jobs.get(job_id)
        if job is None or job.state is not JobState.COMPLETED:
            return
        extra = job.model_extra or {}
        seen.completed_at = float(extra.get("completed_at") or job.updated_at)
        seen.completed_job = job_id
        seen.repository = seen.repository or job.repository

    def _finding(self, watched: Watched, kind: Kind, detail: str) -> Finding:
        return Finding(container_id=watched.container_id, name=watched.name, pool=watched.pool,
                       job_id=watched.job_id, kind=kind, detail=detail, runner=watched.runner)

    def _repository(self, finding: Finding) -> str | None:
        seen = self._seen.get(finding.container_id)
        if seen is not None and seen.repository_read:
            return seen.repository
        repository = None
        if self.runners is not None:
            try:
                record = self.runners.get(finding.runner or finding.name)
                repository = record.repository if record else None
            except Exception as exc:  # noqa: BLE001 - recorded without it
                logger.warning("runner record not read: %s", exc,
                               extra={"runner": finding.name})
        if seen is not None:
            seen.repository, seen.repository_read = repository, True
        return repository

    def _record(self, finding: Finding, now: float) -> bool:
        """Audit record, metric and, where the pool says so, the container stopped. False
        for a finding recorded before."""
        if not self.dedupe.first(finding):
            return False
        pool = self.pools.get(finding.pool)
        stop = pool is not None and pool.on_violation == "stop"
        repository = self._repository(finding)
        self.metrics.violations.labels(finding.pool or "unknown", finding.kind).inc()
        outcome = "ok"
        reason = finding.detail
        if stop:
            try:
                self.stop_container(finding.name or finding.container_id)
                reason += "; container stopped (on_violation = stop)"
            except Exception as exc:
                outcome = "error"
                reason += f"; stopping the container failed: {type(exc).__name__}"
                logger.exception("violating container not stopped",
                                 extra={"runner": finding.name})
        log = {"runner": finding.name, "job_id": finding.job_id, "pool": finding.pool,
               "kind": finding.kind, "detail": finding.detail, "stopped": stop}
        logger.warning("isolation violation: %s", finding.kind, extra=log)
        record = new_record(
            now=now, action=f"violation:{finding.kind}", outcome=outcome, sub=ACTOR,
            username=ACTOR, target=f"container:{finding.name or finding.container_id}",
            reason=reason, change={"job_id": finding.job_id, "repository": repository,
                                   "pool": finding.pool, "host": self.host_id,
                                   "container_id": finding.container_id[:12],
                                   "runner": finding.runner or finding.name,
                                   "detail": finding.detail, "stopped": stop})
        try:
            self.audit.append(record)
        except Exception:
            self.metrics.errors.labels("audit").inc()
            logger.exception("violation's audit record not stored (its log line is)",
                             extra=log)
        return True


class LogOnlyAudit:
    """No audit table configured: the record is the `runnerhub.audit` JSON line alone."""

    def append(self, record: AuditRecord) -> None:
        from chalicelib.api.audit import log_line

        log_line(record)


def factory(settings: Any, client: Any, audit: AuditSink) -> Callable[[Any], Monitor] | None:
    """How `Executor` builds its monitor from its context (None: RUNNERHUB_MONITOR off). The
    firewall's counters are read only where there is a firewall (hardened networking: any
    `docker_network` but "host")."""
    if not settings.monitor:
        return None

    def build(ctx: Any) -> Monitor:
        return Monitor(
            client=client, host_id=ctx.host_id, pools=ctx.pools, audit=audit,
            metrics=ctx.metrics,
            # Killed at once: a violating job gets no grace to finish what it started.
            stop_container=lambda name: ctx.containers.stop(name, timeout_s=0),
            runners=ctx.runners, jobs=ctx.jobs,
            firewall=None if settings.docker_network == "host" else FirewallCounters(),
            interval_s=settings.monitor_interval_s, outlived_job_s=settings.outlived_job_s,
            deployment=settings.deployment)

    return build
