"""Executors that fail safely, end to end: real Docker, moto server, the webhook app over HTTP, the
GitHub emulator and several executor processes serving the same pools.

- two executors: no demand is started twice, every job completes;
- daemon crash: SIGKILL one executor (its containers keep running), start a replacement with the
  same host id: it adopts or cleans up, no job is lost;
- host loss: SIGKILL one executor and its containers, start none: the other takes over its
  expired claims; the jobs its runners were running end as GitHub ends them (failure, after the
  emulator's lost-runner timeout) and RunnerHub records that;
- SIGTERM during a burst: running jobs finish, unstarted demand goes to the other executor, the
  process exits 0 within the drain timeout;
- rolling upgrade: both executors replaced mid-workload by ones that accept the next demand
  schema version; the control plane switches to it while an old executor still runs.

Each kill test first waits until the victim holds at least one unstarted claim (job `claimed`
with its host id; a victim started with `start_delay_s` holds each claim that much longer) and
one runner running a job, so it cannot pass by killing an idle daemon. Every test prints what it
injected and what it found; the ground truth is the emulator's (jobs) and Docker's (containers,
events).
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from chalicelib import aws
from chalicelib.demand import DEMAND_SCHEMA_VERSION
from chalicelib.resources import dead_letter_queue_name
from devstack.stack import Child, LocalStack
from devstack.stack import environ as _environ
from tests.conftest import FIXTURES

POOLS = FIXTURES / "pools" / "e2e.toml"
pytestmark = [pytest.mark.docker, pytest.mark.slow]

# Small timeouts so each test stays within about a minute on two cores.
FAST = {
    "RUNNERHUB_HEARTBEAT_S": "1",
    "RUNNERHUB_LEASE_S": "5",
    "RUNNERHUB_TICK_S": "0.25",
    "RUNNERHUB_POLL_WAIT_S": "1",
    "RUNNERHUB_VISIBILITY_S": "10",
    "RUNNERHUB_IDLE_TIMEOUT_S": "10",
    "RUNNERHUB_DRAIN_TIMEOUT_S": "30",
    "RUNNERHUB_START_BACKOFF_S": "1",
    "RUNNERHUB_ADOPT_GRACE_S": "5",
}
# The victim of a kill test holds each claim this long before starting its runner (test only).
START_DELAY_S = 4.0
NEW_SCHEMA = DEMAND_SCHEMA_VERSION + 1


# --- fixtures ---------------------------------------------------------------------------------


@dataclass
class Hosts:
    """Host ids of one test (unique, so a concurrent run on the same engine is not touched)."""

    docker: object
    ids: list[str] = field(default_factory=list)

    def new(self, role: str) -> str:
        host_id = f"{role}-{uuid.uuid4().hex[:6]}"
        self.ids.append(host_id)
        return host_id

    def containers(self, host_id: str, running_only: bool = False) -> list[dict]:
        filters = {"label": f"runnerhub.host={host_id}"}
        if running_only:
            filters["status"] = "running"
        return self.docker.api.containers(all=not running_only, filters=filters)


@pytest.fixture
def make_stack(docker_client, tmp_path: Path):
    stacks = []

    def make(lost_runner_timeout_s: float) -> LocalStack:
        stack = LocalStack(POOLS, tmp_path, lost_runner_timeout_s=lost_runner_timeout_s).start()
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


# --- helpers ----------------------------------------------------------------------------------


def workload(count: int, gap_s: float, duration_s: float | tuple[float, ...]) -> dict:
    durations = duration_s if isinstance(duration_s, tuple) else (duration_s,)
    return {"name": "resilience", "jobs": [
        {"repository": f"runnerhub-e2e/svc-{i % 3}", "labels": ["self-hosted", ("alpha", "beta")[
            i % 2]], "arrival_s": round(i * gap_s, 2),
         "duration_s": durations[i % len(durations)], "name": f"job-{i}"}
        for i in range(count)
    ]}


def run_workload(stack: LocalStack, spec: dict) -> dict[int, float]:
    """Start the workload; returns job id -> duration."""
    ids = stack.emulator.load_workload(spec)
    stack.emulator.run_workload()
    return {job_id: job["duration_s"] for job_id, job in zip(ids, spec["jobs"], strict=True)}


def start(stack: LocalStack, host_id: str, slots: int, start_delay_s: float = 0.0,
          **env: str) -> Child:
    """An executor process; each start of a host id logs to its own file. `start_delay_s`:
    a test launcher (devstack/test_executor.py) holds each claim that long before its start."""
    count = sum(c.name.startswith(f"executor-{host_id}") for c in stack.children)
    env = stack.executor_env(host_id, **(FAST | {"RUNNERHUB_SLOTS": str(slots)} | env))
    name = f"executor-{host_id}" + (f"-{count + 1}" if count else "")
    command = [sys.executable, "-m", "executor"]
    if start_delay_s:
        command = [sys.executable, "-m", "devstack.test_executor",
                   "--start-delay-s", str(start_delay_s)]
    child = stack._spawn(name, command, env=env)
    child.host_id = host_id  # type: ignore[attr-defined]
    return child


def events(child: Child) -> list[dict]:
    lines = []
    for line in child.log().splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


def said(child: Child, text: str) -> list[dict]:
    return [e for e in events(child) if text in str(e.get("message", ""))]


def settled(stack: LocalStack) -> bool:
    jobs = stack.emulator.jobs()
    records = stack.records()
    return bool(jobs) and all(
        j["status"] == "completed" and records.get(j["job_id"], {}).get("state") == "completed"
        for j in jobs)


def wait_settled(stack: LocalStack, timeout_s: float = 90.0) -> None:
    if not stack.wait_for(lambda: settled(stack), timeout_s, 0.5):
        records = stack.records()
        open_jobs = [(j["job_id"], j["status"], records.get(j["job_id"], {}).get("state"),
                      records.get(j["job_id"], {}).get("host_id"))
                     for j in stack.emulator.jobs() if j["status"] != "completed"
                     or records.get(j["job_id"], {}).get("state") != "completed"]
        pytest.fail(f"not settled in {timeout_s}s: (job, GitHub, RunnerHub, host) {open_jobs}")


@dataclass(frozen=True)
class Holding:
    """What a host held at one moment."""

    claimed: tuple[int, ...]  # jobs it claimed and started no runner for
    running: dict[int, str]  # job -> runner: its containers running a job
    idle: tuple[str, ...]  # its running containers without a job

    def __str__(self) -> str:
        return (f"{len(self.claimed)} unstarted claim(s) {list(self.claimed)}, "
                f"{len(self.running)} runner(s) running a job {self.running}, "
                f"{len(self.idle)} idle runner(s)")


class Jobs:
    """RunnerHub's job records, read through one client (a new boto3 client per read is slow)."""

    def __init__(self, stack: LocalStack) -> None:
        with _environ(getattr(stack, "direct_env", stack.env)):
            self._client = aws.client("dynamodb")
        self._table = stack.tables["jobs_table"]

    def records(self) -> dict[int, dict]:
        from chalicelib.dynamodb import from_item

        pages = self._client.get_paginator("scan").paginate(TableName=self._table)
        return {int(item["job_id"]): item for page in pages
                for item in map(from_item, page["Items"])}


def holding(stack: LocalStack, jobs: Jobs, hosts: Hosts, host_id: str,
            claimed_since: float = 0.0, durations: dict[int, float] | None = None,
            running_for_s: float = 0.0) -> Holding:
    """What the host holds now. Only claims made after `claimed_since` count as unstarted; with
    `durations`, only jobs with at least `running_for_s` left count as running."""
    names = {c["Labels"]["runnerhub.runner"] for c in hosts.containers(host_id, True)}
    now = time.time()
    running = {j["job_id"]: j["runner_name"] for j in stack.emulator.jobs()
               if j["status"] == "in_progress" and j.get("runner_name") in names
               and (durations is None
                    or j["taken_at"] + durations[j["job_id"]] - now >= running_for_s)}
    claimed = tuple(sorted(job_id for job_id, r in jobs.records().items()
                           if r.get("state") == "claimed" and r.get("host_id") == host_id
                           and float(r.get("claimed_at") or 0) >= claimed_since))
    return Holding(claimed, running, tuple(sorted(names - set(running.values()))))


def wait_for_kill_moment(stack: LocalStack, jobs: Jobs, hosts: Hosts, host_id: str,
                         durations: dict[int, float], timeout_s: float = 40.0) -> Holding:
    """Until the host holds an unstarted claim and a runner running a job, with margin: the
    claim has at least 2 s of the test start delay left and the job at least 4 s to run, so
    both still hold when the kill lands."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = holding(stack, jobs, hosts, host_id,
                        claimed_since=time.time() - START_DELAY_S + 2.0,
                        durations=durations, running_for_s=4.0)
        if found.claimed and found.running:
            return found
        time.sleep(0.05)
    pytest.fail(f"{host_id} never held an unstarted claim and a running job together")


def how_served(stack: LocalStack, jobs: Jobs, job_ids, dead_host: str,
               executors: list[Child]) -> dict[int, str]:
    """How each job a dead daemon had claimed (and not started) got its runner."""
    records = jobs.records()
    runner_of = {j["job_id"]: (j.get("runner_name"), j["status"]) for j in stack.emulator.jobs()}
    taken_over = {e.get("job_id") for child in executors
                  for e in said(child, "took over the expired claim")}
    found = {}
    for job in job_ids:
        runner, status = runner_of[job]
        generation = int(records[job].get("demand_generation", 1))
        if status != "completed" or not runner:
            found[job] = "not served"
        elif job in taken_over:
            found[job] = f"taken over, ran on {runner}"
        elif records[job].get("redemand_reason") == "previous_daemon" or generation > 1:
            found[job] = f"re-demanded ({records[job].get('redemand_reason')}), ran on {runner}"
        else:
            found[job] = f"taken by {runner} through GitHub's assignment"
    return found


def kill(child: Child) -> None:
    child.process.send_signal(signal.SIGKILL)
    child.process.wait(timeout=10)


def container_starts(docker, host_ids: list[str], since: float) -> list[dict]:
    """Every runner container started by these hosts, from Docker's own event log."""
    starts = []
    for host_id in host_ids:
        for event in docker.events(since=int(since) - 1, until=int(time.time()) + 1,
                                   decode=True, filters={"type": "container", "event": "start",
                                                         "label": f"runnerhub.host={host_id}"}):
            attributes = event["Actor"]["Attributes"]
            starts.append({"host": host_id, "runner": attributes["runnerhub.runner"],
                           "job": int(attributes["runnerhub.job"]),
                           "generation": int(attributes["runnerhub.generation"])})
    return starts


def started_twice(starts: list[dict]) -> dict:
    counts = Counter((s["job"], s["generation"]) for s in starts)
    return {key: count for key, count in counts.items() if count > 1}


def leftovers(stack: LocalStack, hosts: Hosts) -> dict:
    found = {
        "containers": [c["Names"][0] for h in hosts.ids for c in hosts.containers(h)],
        "registered_runners": [r["name"] for r in stack.emulator.runners()
                               if r["name"].startswith("rh-")],
        "jit_files": [p.name for h in hosts.ids for p in Path(f"/dev/shm/runnerhub-{h}").glob("*")],
        "networks": [n.name for n in hosts.docker.networks.list(
            filters={"label": "runnerhub.managed=true"})
            if n.attrs.get("Labels", {}).get("runnerhub.host") in hosts.ids],
    }
    return {kind: items for kind, items in found.items() if items}


def wait_nothing_left(stack: LocalStack, hosts: Hosts, timeout_s: float = 20.0) -> dict:
    stack.wait_for(lambda: not leftovers(stack, hosts), timeout_s, 0.5)
    return leftovers(stack, hosts)


def host_record(stack: LocalStack, host_id: str) -> dict:
    from chalicelib.dynamodb import from_item

    with _environ(stack.direct_env if hasattr(stack, "direct_env") else stack.env):
        item = aws.client("dynamodb").get_item(
            TableName=stack.tables["hosts_table"], Key={"host_id": {"S": host_id}},
            ConsistentRead=True).get("Item")
    return from_item(item) if item else {}


def report(title: str, **figures) -> None:
    print(f"\n== {title}")
    for key, value in figures.items():
        print(f"   {key}: {value}")


def conclusions(stack: LocalStack, job_ids) -> dict[int, tuple]:
    """job -> (GitHub's conclusion, RunnerHub's state and conclusion)."""
    records = stack.records()
    return {j["job_id"]: (j.get("conclusion"), records.get(j["job_id"], {}).get("state"),
                          records.get(j["job_id"], {}).get("conclusion"))
            for j in stack.emulator.jobs() if j["job_id"] in set(job_ids)}


# --- the tests --------------------------------------------------------------------------------


def test_two_executors_share_pools_without_starting_a_demand_twice(make_stack, hosts,
                                                                   docker_client):
    stack = make_stack(lost_runner_timeout_s=20)
    first, second = hosts.new("share-a"), hosts.new("share-b")
    executors = [start(stack, first, 2), start(stack, second, 2)]
    began = time.time()
    run_workload(stack, workload(20, gap_s=0.2, duration_s=1.5))
    wait_settled(stack)
    starts = container_starts(docker_client, hosts.ids, began)
    twice = started_twice(starts)
    found = conclusions(stack, [j["job_id"] for j in stack.emulator.jobs()])
    exit_codes = [stack.stop_child(child, timeout_s=40) for child in executors]
    left = wait_nothing_left(stack, hosts)
    report("two executors, same pools",
           injected="20 jobs over pools alpha+beta, one every 0.2 s, 2 slots per host",
           starts_per_host=dict(Counter(s["host"] for s in starts)),
           demands_started_twice=twice,
           conclusions=dict(Counter(c[0] for c in found.values())),
           exit_codes=exit_codes, leftovers=left)
    assert not twice, f"demand started twice: {twice}"
    assert all(c == ("success", "completed", "success") for c in found.values()), found
    assert exit_codes == [0, 0]
    assert not left


def test_daemon_crash_replacement_adopts_or_cleans_up(make_stack, hosts, docker_client):
    stack = make_stack(lost_runner_timeout_s=30)
    victim_id, peer_id = hosts.new("crash-victim"), hosts.new("crash-peer")
    # Heartbeat 2 s: the replacement (same host id) is up before the peer could call it dead.
    victim = start(stack, victim_id, 3, START_DELAY_S, RUNNERHUB_HEARTBEAT_S="2")
    peer = start(stack, peer_id, 2)
    began = time.time()
    durations = run_workload(stack, workload(16, gap_s=0.4, duration_s=(10.0, 4.0, 7.0)))
    jobs = Jobs(stack)

    wait_for_kill_moment(stack, jobs, hosts, victim_id, durations)
    kill(victim)  # its containers keep running
    held = holding(stack, jobs, hosts, victim_id)
    containers_at_kill = [c["Labels"]["runnerhub.runner"]
                          for c in hosts.containers(victim_id, True)]
    replacement = start(stack, victim_id, 3, RUNNERHUB_HEARTBEAT_S="2")
    assert stack.wait_for(lambda: said(replacement, "start-up adoption"), 30, 0.2), \
        replacement.log()[-3000:]
    adoption = said(replacement, "start-up adoption")[0]["adoption"]
    wait_settled(stack)

    starts = container_starts(docker_client, hosts.ids, began)
    found = conclusions(stack, [j["job_id"] for j in stack.emulator.jobs()])
    served_how = how_served(stack, jobs, held.claimed, victim_id, [replacement, peer])
    exit_codes = [stack.stop_child(child, timeout_s=40) for child in (replacement, peer)]
    left = wait_nothing_left(stack, hosts)
    report("daemon crash (SIGKILL executor, containers survive; replacement, same host id)",
           injected=f"SIGKILL {victim_id} while it held: {held}",
           containers_running_at_kill=containers_at_kill,
           replacement_adoption=adoption,
           claimed_at_kill_served=served_how,
           peer_takeovers=len(said(peer, "took over the expired claim")),
           demands_started_twice=started_twice(starts),
           conclusions=dict(Counter(c[0] for c in found.values())),
           exit_codes=exit_codes, leftovers=left)
    assert held.claimed and held.running, "the victim held no unstarted claim or running job"
    handled = (adoption["adopted"] + adoption["adopted_busy"] + adoption["discarded"]
               + adoption["exited"])
    assert handled >= len(containers_at_kill), adoption
    # its unstarted claims were served: re-demanded by the replacement, taken over by the peer,
    # or taken by another runner through GitHub's own assignment (then nothing was owed)
    assert all(served_how[job] != "not served" for job in held.claimed), served_how
    # nothing lost: every job completed as its workload said, and RunnerHub recorded it
    assert all(c == ("success", "completed", "success") for c in found.values()), found
    # the jobs running at the kill finished in the runners the dead daemon had started
    runner_of = {j["job_id"]: j["runner_name"] for j in stack.emulator.jobs()}
    assert all(runner_of[job] == runner for job, runner in held.running.items())
    assert not started_twice(starts)
    assert exit_codes == [0, 0]
    assert not left


def add_job(stack: LocalStack, pool: str, duration_s: float, name: str) -> tuple[int, float]:
    job_id = stack.emulator.add_job(repository="runnerhub-e2e/svc-0",
                                    labels=["self-hosted", pool], duration_s=duration_s,
                                    name=name)
    return job_id, duration_s


def test_host_loss_other_executor_takes_over(make_stack, hosts, docker_client):
    """The peer is kept busy with two long jobs, so the victim alone serves what comes next and
    no runner of the peer can take the victim's unstarted job by GitHub's assignment: only a
    takeover of the dead host's claim gets it served."""
    stack = make_stack(lost_runner_timeout_s=6)
    victim_id, peer_id = hosts.new("lost-victim"), hosts.new("lost-peer")
    jobs = Jobs(stack)
    began = time.time()
    peer = start(stack, peer_id, 2)
    durations = dict(add_job(stack, pool, 20.0, f"long-{pool}") for pool in ("alpha", "beta"))
    assert stack.wait_for(lambda: len(holding(stack, jobs, hosts, peer_id).running) == 2, 30,
                          0.2), "the peer did not start its two long jobs"
    victim = start(stack, victim_id, 3, START_DELAY_S)
    assert stack.wait_for(lambda: host_record(stack, victim_id).get("state") == "serving", 30,
                          0.2), victim.log()[-2000:]
    durations.update([add_job(stack, "alpha", 12.0, "running-at-kill")])
    assert stack.wait_for(lambda: holding(stack, jobs, hosts, victim_id).running, 30, 0.2)
    durations.update([add_job(stack, "beta", 3.0, "claimed-at-kill")])

    wait_for_kill_moment(stack, jobs, hosts, victim_id, durations)
    kill(victim)
    killed_at = time.time()
    held = holding(stack, jobs, hosts, victim_id)
    gone = hosts.containers(victim_id)
    for container in gone:  # the host is gone: so are its containers and its tmpfs
        docker_client.api.remove_container(container["Id"], force=True)
    shutil.rmtree(f"/dev/shm/runnerhub-{victim_id}", ignore_errors=True)
    wait_settled(stack)
    lost_marked = stack.wait_for(
        lambda: host_record(stack, victim_id).get("state") == "lost", 20, 0.5)

    starts = container_starts(docker_client, hosts.ids, began)
    found = conclusions(stack, [j["job_id"] for j in stack.emulator.jobs()])
    running_at_kill = {job: found[job] for job in held.running}
    others = {job: c for job, c in found.items() if job not in held.running}
    takeovers = said(peer, "took over the expired claim")
    runner_of = {j["job_id"]: j["runner_name"] for j in stack.emulator.jobs()}
    host_of = {s["runner"]: s["host"] for s in starts}
    exit_code = stack.stop_child(peer, timeout_s=40)
    left = wait_nothing_left(stack, hosts)
    report("host loss (SIGKILL executor and its containers; none started)",
           injected=f"SIGKILL {victim_id} and removed its {len(gone)} container(s) while it "
                    f"held: {held}",
           peer_takeovers=[(e.get("job_id"), round(_epoch(e["timestamp"]) - killed_at, 1))
                           for e in takeovers],
           victim_host_record=host_record(stack, victim_id).get("state"),
           jobs_running_at_kill=running_at_kill,
           claimed_at_kill_ran_on=[host_of.get(runner_of[job]) for job in held.claimed],
           other_jobs=dict(Counter(c for c in others.values())),
           demands_started_twice=started_twice(starts),
           exit_code=exit_code, leftovers=left)
    assert held.claimed and held.running, "the victim held no unstarted claim or running job"
    assert {e.get("job_id") for e in takeovers} >= set(held.claimed), "claims not taken over"
    # jobs its runners were running end as GitHub ends them, and RunnerHub records that
    assert all(c == ("failure", "completed", "failure") for c in running_at_kill.values())
    # every other job (the unstarted claims included) ran, on the peer
    assert all(c == ("success", "completed", "success") for c in others.values()), others
    assert all(host_of.get(runner_of[job]) == peer_id for job in held.claimed)
    assert lost_marked, host_record(stack, victim_id)
    assert not started_twice(starts)
    assert exit_code == 0
    assert not left


def _epoch(timestamp: str) -> float:
    """powertools' "2026-01-01 10:00:00,123+0000" -> epoch seconds."""
    from datetime import datetime

    return datetime.strptime(timestamp, "%Y-%m-%d %H:%M:%S,%f%z").timestamp()


def test_sigterm_during_a_burst_drains(make_stack, hosts, docker_client):
    stack = make_stack(lost_runner_timeout_s=20)
    draining_id, other_id = hosts.new("drain-a"), hosts.new("drain-b")
    drain_timeout_s = 25
    draining = start(stack, draining_id, 3, START_DELAY_S,
                     RUNNERHUB_DRAIN_TIMEOUT_S=str(drain_timeout_s))
    other = start(stack, other_id, 3)
    began = time.time()
    # Long jobs beside short ones: when a short one ends and a fresh claim waits out its start
    # delay, a long one still has seconds to run (the moment the signal must find).
    durations = run_workload(stack, workload(18, gap_s=0.15, duration_s=(12.0, 3.0, 5.0)))
    jobs = Jobs(stack)

    # What it holds when signalled (the margins keep this true until the signal lands).
    held = wait_for_kill_moment(stack, jobs, hosts, draining_id, durations)
    signalled = time.monotonic()
    draining.process.send_signal(signal.SIGTERM)
    signalled_at = time.time()
    exit_code = draining.process.wait(timeout=drain_timeout_s + 30)
    took_s = time.monotonic() - signalled
    left_by_drained = [c["Names"][0] for c in hosts.containers(draining_id)]
    record = host_record(stack, draining_id)
    wait_settled(stack)

    starts = container_starts(docker_client, hosts.ids, began)
    found = conclusions(stack, [j["job_id"] for j in stack.emulator.jobs()])
    runner_of = {j["job_id"]: j["runner_name"] for j in stack.emulator.jobs()}
    host_of = {s["runner"]: s["host"] for s in starts}
    released = said(draining, "claim released")
    starts_after = container_starts(docker_client, hosts.ids, signalled_at + 1)
    other_exit = stack.stop_child(other, timeout_s=40)
    left = wait_nothing_left(stack, hosts)
    report("SIGTERM during a burst",
           injected=f"SIGTERM {draining_id} (drain timeout {drain_timeout_s}s) while it "
                    f"held: {held}",
           exit_code=exit_code, exited_after_s=round(took_s, 1),
           claims_released=[e.get("job_id") for e in released],
           running_at_sigterm_ended=[found[job] for job in held.running],
           claimed_at_sigterm_ran_on=[host_of.get(runner_of[job]) for job in held.claimed],
           containers_left_by_drained_host=left_by_drained,
           drained_host_record={k: record.get(k) for k in ("state", "clean", "slots_busy")},
           conclusions=dict(Counter(c[0] for c in found.values())),
           demands_started_twice=started_twice(starts),
           other_exit_code=other_exit, leftovers=left)
    assert held.claimed and held.running, "the host held no unstarted claim or running job"
    assert exit_code == 0 and took_s <= drain_timeout_s + 5
    # running jobs finished (not cancelled) in the draining host's runners
    assert all(found[job] == ("success", "completed", "success") for job in held.running)
    assert all(runner_of[job] == runner for job, runner in held.running.items())
    # its unstarted demand was handed back at once and served elsewhere: nothing it released
    # was started by it after the signal (a start already past its last check may finish)
    released_ids = {e["job_id"] for e in released}
    assert released_ids >= set(held.claimed)
    assert not [s for s in starts_after
                if s["host"] == draining_id and s["job"] in released_ids], starts_after
    assert all(c == ("success", "completed", "success") for c in found.values()), found
    assert left_by_drained == []
    assert (record.get("state"), record.get("clean")) == ("stopped", True)
    assert not started_twice(starts)
    assert other_exit == 0 and not left


# An executor or webhook of the next release: the same code, accepting schema N+1 (and N) and,
# for the webhook, sending N+1. Started with `python -c` so nothing in the product is test-only.
_UPGRADED = (
    "import sys\n"
    "import chalicelib.demand as demand\n"
    f"demand.DEMAND_SCHEMA_VERSION = {NEW_SCHEMA}\n"
    f"demand.OLDEST_ACCEPTED_SCHEMA_VERSION = {NEW_SCHEMA - 1}\n"
)
UPGRADED_EXECUTOR = _UPGRADED + (
    "import executor\n"
    "import executor.messages as messages\n"
    f"messages.DEMAND_SCHEMA_VERSION = {NEW_SCHEMA}\n"
    f"messages.OLDEST_ACCEPTED_SCHEMA_VERSION = {NEW_SCHEMA - 1}\n"
    f"executor.__version__ += '+schema{NEW_SCHEMA}'\n"
    "from executor.__main__ import main\n"
    "sys.exit(main())\n"
)
UPGRADED_WEBHOOK = _UPGRADED + (
    "import chalicelib.webhook as webhook\n"
    f"webhook.DEMAND_SCHEMA_VERSION = {NEW_SCHEMA}\n"
    "from devstack.webhook_server import main\n"
    "main()\n"
)


def start_upgraded(stack: LocalStack, host_id: str, slots: int) -> Child:
    env = stack.executor_env(host_id, **(FAST | {"RUNNERHUB_SLOTS": str(slots)}))
    child = stack._spawn(f"executor-{host_id}-upgraded", [sys.executable, "-c",
                                                          UPGRADED_EXECUTOR], env=env)
    child.host_id = host_id  # type: ignore[attr-defined]
    return child


def dead_letters(stack: LocalStack) -> int:
    with _environ(stack.direct_env if hasattr(stack, "direct_env") else stack.env):
        sqs = aws.client("sqs")
        total = 0
        for pool in stack.pools.names:
            url = sqs.get_queue_url(QueueName=dead_letter_queue_name(stack.prefix, pool))[
                "QueueUrl"]
            attributes = sqs.get_queue_attributes(
                QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages",
                                              "ApproximateNumberOfMessagesNotVisible"])
            total += sum(int(v) for v in attributes["Attributes"].values())
        return total


def test_rolling_upgrade_replaces_executors_mid_workload(make_stack, hosts, docker_client):
    stack = make_stack(lost_runner_timeout_s=20)
    a_id, b_id = hosts.new("roll-a"), hosts.new("roll-b")
    old_env = {"RUNNERHUB_NEWER_SCHEMA_DELAY_S": "4"}
    a, b = start(stack, a_id, 2, **old_env), start(stack, b_id, 2, **old_env)
    url_file = stack.workdir / "webhook-v2.url"
    webhook_v2 = stack._spawn("webhook-v2", [sys.executable, "-c", UPGRADED_WEBHOOK,
                                             "--url-file", str(url_file)])
    began = time.time()
    run_workload(stack, workload(40, gap_s=0.5, duration_s=2.0))
    assert stack.wait_for(lambda: sum(j["status"] == "completed"
                                      for j in stack.emulator.jobs()) >= 4, 30, 0.2)

    # 1. Upgrade A: drain it, replace it (same host id), verify the new one serves.
    a_exit = stack.stop_child(a, timeout_s=40)
    a_left = [c["Names"][0] for c in hosts.containers(a_id)]
    a2 = start_upgraded(stack, a_id, 2)
    verified_a = stack.wait_for(
        lambda: host_record(stack, a_id).get("schema_versions") == [NEW_SCHEMA - 1, NEW_SCHEMA]
        and said(a2, "runner started"), 30, 0.2)
    # 2. The control plane moves to the new schema while B still runs the old code.
    assert stack.wait_for(url_file.exists, 20, 0.1), webhook_v2.log()
    switched_at = time.time()
    stack.emulator.set_webhook(url=url_file.read_text().strip() + "/webhook")
    b_saw_newer = stack.wait_for(lambda: said(b, "newer than this executor"), 15, 0.2)
    # 3. Upgrade B the same way.
    b_exit = stack.stop_child(b, timeout_s=40)
    b_left = [c["Names"][0] for c in hosts.containers(b_id)]
    b2 = start_upgraded(stack, b_id, 2)
    verified_b = stack.wait_for(
        lambda: host_record(stack, b_id).get("schema_versions") == [NEW_SCHEMA - 1, NEW_SCHEMA],
        30, 0.2)
    wait_settled(stack, timeout_s=120)

    starts = container_starts(docker_client, hosts.ids, began)
    found = conclusions(stack, [j["job_id"] for j in stack.emulator.jobs()])
    served = Counter()
    for child, release in ((a, "old"), (b, "old"), (a2, "new"), (b2, "new")):
        for line in said(child, "runner started"):
            served[f"schema {line.get('schema_version')} by {release} executor"] += 1
    dlq = dead_letters(stack)
    exit_codes = [stack.stop_child(child, timeout_s=40) for child in (a2, b2)]
    left = wait_nothing_left(stack, hosts)
    report("rolling upgrade (drain, replace, verify; executors first, then the control plane)",
           injected=f"40 jobs, one every 0.5 s; {a_id} drained and replaced, webhook switched "
                    f"to schema {NEW_SCHEMA} at +{switched_at - began:.1f}s, then {b_id} "
                    "drained and replaced",
           old_exit_codes=[a_exit, b_exit], containers_left_by_old=a_left + b_left,
           upgraded_verified=[verified_a, verified_b],
           newer_schema_left_by_old_executor=len(said(b, "newer than this executor")),
           runners_started=dict(served), dead_letters=dlq,
           conclusions=dict(Counter(c[0] for c in found.values())),
           demands_started_twice=started_twice(starts),
           exit_codes=exit_codes, leftovers=left)
    assert a_exit == 0 and b_exit == 0 and a_left == [] and b_left == []
    assert verified_a and verified_b
    assert b_saw_newer, "the old executor never met a newer message"
    assert served[f"schema {NEW_SCHEMA - 1} by new executor"] + served[
        f"schema {NEW_SCHEMA - 1} by old executor"] >= 1
    assert served[f"schema {NEW_SCHEMA} by new executor"] >= 1
    assert served[f"schema {NEW_SCHEMA} by old executor"] == 0
    assert dlq == 0, "a good message went to a DLQ"
    assert all(c == ("success", "completed", "success") for c in found.values()), found
    assert not started_twice(starts)
    assert exit_codes == [0, 0] and not left
