"""Rollouts onto a group's launch template version (chalicelib/scaler/rollout.py), each rule by
name, and the scaler carrying a step out (rollback: the group's version set back, failed hosts
terminated without lowering desired capacity, the metric)."""

from __future__ import annotations

import pytest

from chalicelib.hosts import Heartbeat, HostRecord, HostState
from chalicelib.memory import (
    InMemoryHeldJobs,
    InMemoryHostStore,
    InMemoryJobStore,
    InMemoryRunnerStore,
    InMemoryScalerLease,
    InMemoryWaitingJobs,
)
from chalicelib.pools import load_pools
from chalicelib.scaler.autoscaling import AwsAutoScaling, Group
from chalicelib.scaler.decision import Instance
from chalicelib.scaler.rollout import (
    RolloutPolicy,
    RolloutState,
    RolloutView,
    out_of_service_budget,
    step,
)
from chalicelib.scaler.service import Scaler, ScalerConfig
from chalicelib.scaler.settings import parse_checkpoints
from chalicelib.scaler.store import InMemoryRolloutStore
from chalicelib.telemetry import Telemetry

NOW = 10_000.0
POLICY = RolloutPolicy(min_healthy_percent=75, checkpoints=(50,), checkpoint_delay_s=60,
                       health_grace_s=120, max_start_failures=3, max_failed_hosts=1)


def inst(instance_id: str, version: str, launched_at: float = NOW - 3600,
         state: str = "InService") -> Instance:
    return Instance(instance_id, state, "a", launched_at, True, launch_version=version)


def host(host_id: str, *, busy: int = 0, beat: float = NOW, state: HostState = HostState.SERVING,
         starts: int = 0, failures: int = 0) -> HostRecord:
    return HostRecord(host_id=host_id, state=state, pools=("p",), heartbeat_at=beat,
                      heartbeat_s=10.0, slots_total=2, slots_busy=busy, starts=starts,
                      start_failures=failures)


def view(instances, hosts, version="2", desired=None, now=NOW) -> RolloutView:
    return RolloutView(pool="p", now=now, group_version=version,
                       desired=len(instances) if desired is None else desired,
                       instances=tuple(instances), hosts={h.host_id: h for h in hosts})


def rolling(**changes) -> RolloutState:
    return RolloutState(**({"target": "2", "previous": "1", "status": "rolling",
                            "started_at": NOW - 10} | changes))


def test_nothing_rolls_when_every_host_runs_the_groups_version():
    taken = step(view([inst("a", "2"), inst("b", "2")], [host("a"), host("b")]), None, POLICY)
    assert taken.state is None and taken.terminate == () and taken.event == "none"


@pytest.mark.parametrize("version", [None, "$Latest", "$Default"])
def test_an_unpinned_group_version_never_rolls(version):
    taken = step(view([inst("a", "1")], [host("a")], version=version), None, POLICY)
    assert taken.terminate == () and taken.state is None


def test_old_hosts_start_a_rollout_idle_ones_replaced_first_within_the_budget():
    hosts = [host("busy", busy=2), host("idle1"), host("idle2"), host("idle3")]
    instances = [inst(h.host_id, "1") for h in hosts]
    taken = step(view(instances, hosts), None, POLICY)
    assert taken.event == "started" and taken.state.status == "rolling"
    assert taken.state.target == "2" and taken.state.previous == "1"
    # 4 hosts at 75 % healthy: one out of service at a time, an idle one.
    assert out_of_service_budget(4, POLICY) == 1
    assert len(taken.terminate) == 1 and taken.terminate[0].startswith("idle")


def test_a_booting_new_host_holds_the_next_replacement():
    hosts = [host("a"), host("b"), host("c")]  # "new" has no heartbeat yet
    instances = [inst("a", "1"), inst("b", "1"), inst("c", "1"), inst("new", "2", NOW - 30)]
    taken = step(view(instances, hosts), rolling(), POLICY)
    assert taken.terminate == () and taken.event == "waiting"


def test_a_checkpoint_pauses_the_rollout_then_it_goes_on():
    hosts = [host("a"), host("b"), host("n1"), host("n2")]
    instances = [inst("a", "1"), inst("b", "1"), inst("n1", "2"), inst("n2", "2")]
    paused = step(view(instances, hosts), rolling(), POLICY)
    assert paused.event == "checkpoint" and paused.terminate == ()
    assert paused.state.checkpoint_until == NOW + 60 and paused.state.passed_checkpoints == (50,)
    still = step(view(instances, hosts, now=NOW + 30), paused.state, POLICY)
    assert still.terminate == () and still.event == "checkpoint"
    fresh = [host(h.host_id, beat=NOW + 60) for h in hosts]
    later = step(view(instances, fresh, now=NOW + 61), paused.state, POLICY)
    assert later.event == "replacing" and len(later.terminate) == 1


def test_a_new_host_without_a_heartbeat_past_the_grace_rolls_back():
    hosts = [host("a"), host("b"), host("c")]
    instances = [inst("a", "1"), inst("b", "1"), inst("c", "1"),
                 inst("broken", "2", launched_at=NOW - 121)]
    taken = step(view(instances, hosts), rolling(), POLICY)
    assert taken.event == "rolled_back" and taken.set_version == "1"
    assert taken.terminate == ("broken",)
    assert taken.state.status == "rolling_back" and taken.state.target == "1"
    assert taken.state.previous == "2" and "no heartbeat" in taken.state.reason
    assert taken.state.failed_hosts == ("broken",)


def test_a_new_host_inside_the_grace_is_booting_not_failed():
    instances = [inst("a", "1"), inst("slow", "2", launched_at=NOW - 119)]
    taken = step(view(instances, [host("a")]), rolling(), POLICY)
    assert taken.event != "rolled_back" and taken.set_version is None


def test_failed_runner_starts_with_none_succeeding_roll_back():
    hosts = [host("a"), host("new", starts=0, failures=3)]
    taken = step(view([inst("a", "1"), inst("new", "2")], hosts), rolling(), POLICY)
    assert taken.event == "rolled_back" and "3 failed runner starts" in taken.state.reason


def test_failed_starts_of_a_host_that_also_started_runners_are_not_a_bad_version():
    hosts = [host("a"), host("new", starts=5, failures=3)]
    taken = step(view([inst("a", "1"), inst("new", "2")], hosts), rolling(), POLICY)
    assert taken.event != "rolled_back"


def test_a_failing_rollback_stalls_instead_of_flapping():
    back = rolling(target="1", previous="2", status="rolling_back")
    instances = [inst("b", "2"), inst("x", "1", launched_at=NOW - 500)]
    taken = step(view(instances, [host("b")], version="1"), back, POLICY)
    assert taken.event == "stalled" and taken.state.status == "stalled"
    assert taken.set_version is None and taken.terminate == ()


def test_a_stalled_rollout_does_nothing_until_the_group_version_changes():
    stalled = rolling(target="1", previous="2", status="stalled")
    instances = [inst("b", "2"), inst("x", "1", launched_at=NOW - 500)]
    taken = step(view(instances, [host("b")], version="1"), stalled, POLICY)
    assert taken.state == stalled and taken.terminate == () and taken.set_version is None
    redeployed = step(view(instances, [host("b")], version="3"), stalled, POLICY)
    assert redeployed.event == "started" and redeployed.state.target == "3"


def test_the_rollout_completes_once_every_host_is_new_and_healthy():
    instances = [inst("n1", "2"), inst("n2", "2", launched_at=NOW - 30)]
    booting = step(view(instances, [host("n1")]), rolling(), POLICY)
    assert booting.event == "waiting" and booting.state.status == "rolling"
    done = step(view(instances, [host("n1"), host("n2")]), rolling(), POLICY)
    assert done.event == "completed" and done.state.status == "done"
    # and the next run finds nothing to do
    again = step(view(instances, [host("n1"), host("n2")]), done.state, POLICY)
    assert again.terminate == () and again.event == "none"


def test_a_new_group_version_during_a_rollout_restarts_it_towards_that_version():
    instances = [inst("a", "1"), inst("n", "2")]
    taken = step(view(instances, [host("a"), host("n")], version="3"), rolling(), POLICY)
    assert taken.event == "started" and taken.state.target == "3"
    assert set(taken.terminate) <= {"a", "n"} and taken.terminate


def test_a_rollout_still_under_way_past_its_limit_is_stalled():
    instances = [inst("a", "1"), inst("n", "2")]
    old = rolling(started_at=NOW - POLICY.stall_after_s - 1)
    taken = step(view(instances, [host("a"), host("n")]), old, POLICY)
    assert taken.event == "stalled" and "still on other versions" in taken.state.reason


def test_hosts_already_terminating_are_not_replaced_twice():
    instances = [inst("a", "1", state="Terminating:Wait"), inst("b", "1"), inst("n", "2")]
    taken = step(view(instances, [host("a"), host("b"), host("n")]), rolling(
        passed_checkpoints=(50,)), POLICY)
    assert "a" not in taken.terminate


@pytest.mark.parametrize("bad", [dict(min_healthy_percent=101), dict(checkpoints=(0,)),
                                 dict(max_failed_hosts=0), dict(max_start_failures=0)])
def test_a_bad_policy_is_refused(bad):
    with pytest.raises(ValueError):
        RolloutPolicy(**bad)


def test_checkpoints_setting_parses_and_refuses_garbage():
    assert parse_checkpoints("50, 25,50") == (25, 50) and parse_checkpoints("") == ()
    for bad in ("0", "101", "half", "50;75"):
        with pytest.raises(ValueError, match="percents"):
            parse_checkpoints(bad)


# --- the scaler carrying a step out ---


class VersionedGroups:
    def __init__(self, instances, version):
        self.instances = {i.instance_id: i for i in instances}
        self.version = version
        self.calls = []

    def group(self, name):
        return Group(name, 0, 10, len(self.instances), tuple(self.instances.values()),
                     launch_version=self.version, launch_template_id="lt-1")

    def set_desired(self, name, desired):
        self.calls.append(("set_desired", desired))

    def terminate(self, instance_id, decrement=True):
        self.calls.append(("terminate", instance_id, decrement))
        return self.instances.pop(instance_id, None) is not None

    def protect(self, name, ids):
        pass

    def set_version(self, group, version):
        self.calls.append(("set_version", version))
        self.version = version


def test_the_scaler_rolls_a_failing_version_back_and_counts_it():
    hosts = beaten("a", "b")
    groups = VersionedGroups([inst("a", "1"), inst("b", "1"),
                              inst("broken", "2", launched_at=NOW - 700)], "2")
    emitted, rollouts = Emitted(), InMemoryRolloutStore()
    pool, scaler = _scaler(groups, hosts, rollouts, telemetry=Telemetry("scaler", sink=emitted),
                           policy=RolloutPolicy(min_healthy_percent=50, health_grace_s=600),
                           boot_timeout_s=1e9)
    run = scaler.run(pool.name)
    assert run.rollout["event"] == "rolled_back", run.as_dict()
    assert ("set_version", "1") in groups.calls
    assert ("terminate", "broken", False) in groups.calls  # desired kept: a replacement
    assert rollouts.get(pool.name).status == "rolling_back"
    assert any("RolloutRolledBack" in str(blob) for blob in emitted.blobs)


def test_the_scaler_counts_a_stalled_rollout_on_every_run():
    hosts = beaten("b")
    groups = VersionedGroups([inst("b", "2"), inst("x", "1", launched_at=NOW - 700)], "1")
    rollouts = InMemoryRolloutStore()
    rollouts.put("linux-small", rolling(target="1", previous="2", status="rolling_back"), NOW)
    emitted = Emitted()
    pool, scaler = _scaler(groups, hosts, rollouts, telemetry=Telemetry("scaler", sink=emitted),
                           policy=RolloutPolicy(health_grace_s=600), boot_timeout_s=1e9)
    first = scaler.run(pool.name)
    assert first.rollout["event"] == "stalled" and rollouts.get(pool.name).status == "stalled"
    scaler.run(pool.name)
    assert sum("RolloutStalled" in str(blob) for blob in emitted.blobs) == 2
    assert [c for c in groups.calls if c[0] in ("set_version", "terminate")] == []


# --- the review's cases (each a way a rollout could go wrong) ---


def test_replacements_the_group_has_not_listed_yet_count_against_the_budget():
    # desired 4 at 75 %: one out of service at a time. One old host is terminating and its
    # replacement is not listed yet: nothing more is replaced.
    instances = [inst("gone", "1", state="Terminating:Wait"), inst("a", "1"), inst("b", "1"),
                 inst("c", "1")]
    taken = step(view(instances, [host("a"), host("b"), host("c")], desired=4), rolling(),
                 POLICY)
    assert taken.terminate == () and taken.detail["booting"] == 1


def test_replacements_never_launched_past_the_grace_roll_back():
    instances = [inst("a", "1"), inst("b", "1"), inst("c", "1")]
    stuck = rolling(last_replaced_at=NOW - 121)
    taken = step(view(instances, [host("a"), host("b"), host("c")], desired=4), stuck, POLICY)
    assert taken.event == "rolled_back" and "not launched" in taken.state.reason
    assert taken.terminate == ()  # nothing of the new version to terminate


@pytest.mark.parametrize("state", [HostState.STOPPED, HostState.LOST, HostState.DRAINING,
                                   HostState.RETIRING])
def test_a_new_host_drained_stopped_or_lost_is_not_the_versions_failure(state):
    record = host("new", state=state, beat=NOW - 500)
    taken = step(view([inst("a", "1"), inst("new", "2")], [host("a"), record]), rolling(),
                 POLICY)
    assert taken.event != "rolled_back"


def test_a_new_host_whose_heartbeat_stopped_while_serving_fails_but_is_left_to_the_reaper():
    crashed = host("new", beat=NOW - 500, starts=2)  # it served: it may hold a job
    taken = step(view([inst("a", "1"), inst("new", "2")], [host("a"), crashed]), rolling(),
                 POLICY)
    assert taken.event == "rolled_back" and "heartbeat stopped" in taken.state.reason
    assert taken.terminate == ()


def test_a_round_that_lowered_the_group_judges_health_but_replaces_nothing():
    hosts = [host("a"), host("b"), host("c"), host("d")]
    instances = [inst(h.host_id, "1") for h in hosts]
    held = step(RolloutView(pool="p", now=NOW, group_version="2", desired=4,
                            instances=tuple(instances), hosts={h.host_id: h for h in hosts},
                            gone=frozenset({"d"}), may_replace=False), rolling(), POLICY)
    assert held.terminate == () and held.detail["may_replace"] is False


def test_the_heartbeat_counts_only_failures_the_host_is_to_blame_for():
    from executor.metrics import HOST_FAILURE_STAGES, ExecutorMetrics, counter_total
    metrics = ExecutorMetrics()
    for stage in ("github", "image", "warm_image", "runner_version", "seat"):
        metrics.start_failures.labels("p", stage).inc()
    assert counter_total(metrics.start_failures, "stage", HOST_FAILURE_STAGES) == 0
    metrics.start_failures.labels("p", "docker").inc()
    metrics.start_failures.labels("p", "runner").inc(2)
    assert counter_total(metrics.start_failures, "stage", HOST_FAILURE_STAGES) == 3


class Emitted:
    """A telemetry sink keeping each EMF blob."""

    def __init__(self):
        self.blobs = []

    def send(self, blob):
        self.blobs.append(blob)


def beaten(*host_ids: str) -> InMemoryHostStore:
    """A hosts store where each host heartbeats, serving linux-small, at NOW."""
    hosts = InMemoryHostStore()
    for host_id in host_ids:
        hosts.beat(Heartbeat(host_id, ("linux-small",), 2, 0, 0, "0.1.0", (1, 1),
                             HostState.SERVING, 10.0, NOW - 3600), NOW)
    return hosts


def _scaler(groups, hosts, rollouts, telemetry=None, policy=None, **config):
    pool = load_pools().by_name("linux-small")
    jobs = InMemoryJobStore()
    settings = dict(group_prefix="rh-", slots_per_host=2, idle_s=1e9, boot_timeout_s=600.0,
                    lease_s=30.0) | config
    return pool, Scaler(pools={pool.name: pool}, hosts=hosts, runners=InMemoryRunnerStore(),
                        waiting=InMemoryWaitingJobs(jobs), held=InMemoryHeldJobs(jobs),
                        groups=groups, github=None, lease=InMemoryScalerLease(),
                        config=ScalerConfig(**settings), clock=lambda: NOW,
                        telemetry=telemetry, rollouts=rollouts,
                        rollout_policy=policy or RolloutPolicy())


def test_with_the_default_settings_a_stuck_new_host_reaped_first_still_rolls_back():
    """The scaler's reaping (boot timeout 600 s) and the rollout's grace (600 s) are equal by
    default: the reaped new host must still count as failed, and no old host is replaced."""
    hosts = beaten("a", "b")
    groups = VersionedGroups([inst("a", "1"), inst("b", "1"),
                              inst("broken", "2", launched_at=NOW - 700)], "2")
    rollouts = InMemoryRolloutStore()
    pool, scaler = _scaler(groups, hosts, rollouts)
    run = scaler.run(pool.name)
    assert "broken" in run.reaped, run.as_dict()
    assert ("set_version", "1") in groups.calls
    # Rolled back; the run's second round (it reaped) finds every host on version 1: done.
    final = rollouts.get(pool.name)
    assert final.target == "1" and final.previous == "2" and "broken" in final.reason
    assert not any(c[0] == "terminate" and c[1] in ("a", "b") for c in groups.calls)


# --- an image override never weakens the pool's image policy (chalicelib/overrides.py) ---

ECR = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
DIGEST = "@sha256:" + "a" * 64


@pytest.mark.parametrize("image", [
    f"{ECR}/runnerhub/linux:2.330.0",  # a movable tag
    f"210987654321.dkr.ecr.eu-west-1.amazonaws.com/runnerhub/linux{DIGEST}",  # another registry
    f"docker.io/library/ubuntu{DIGEST}",  # not ECR: the scan gate would not check it
])
def test_a_deployed_pools_override_must_be_a_digest_in_its_registry(image):
    from chalicelib.overrides import OverrideRejected, check_image
    from chalicelib.pools import Pool
    pool = Pool(name="linux", labels=("self-hosted",), scope={"owner": "acme"},
                image=f"{ECR}/runnerhub/linux{DIGEST}")
    with pytest.raises(OverrideRejected, match="digest-pinned image"):
        check_image(pool, image)
    check_image(pool, f"{ECR}/runnerhub/linux@sha256:{'b' * 64}")  # the same policy: allowed
    check_image(pool, None)  # removing the override: allowed


def test_a_local_pools_override_may_name_a_tag():
    from chalicelib.overrides import check_image
    from chalicelib.pools import Pool
    pool = Pool(name="linux", labels=("self-hosted",), scope={"owner": "acme"},
                image="runnerhub/runner-base:local")
    check_image(pool, "runnerhub/runner-old:2.200.0")


class RecordingAsg:
    def __init__(self):
        self.updates = []

    def update_auto_scaling_group(self, **kwargs):
        self.updates.append(kwargs)


@pytest.mark.parametrize("mixed", [True, False])
def test_setting_a_version_back_names_only_the_templates_version(mixed):
    """A mixed-instances group (infra/) gets a partial MixedInstancesPolicy (AWS leaves the
    rest unchanged); a plain one (the local fleet) its LaunchTemplate."""
    asg = RecordingAsg()
    group = Group("rh-p", 0, 4, 2, (), launch_version="7", launch_template_id="lt-0abc",
                  mixed=mixed)
    AwsAutoScaling(asg, ec2=None).set_version(group, "6")
    spec = {"LaunchTemplateId": "lt-0abc", "Version": "6"}
    wanted = ({"MixedInstancesPolicy": {"LaunchTemplate": {"LaunchTemplateSpecification": spec}}}
              if mixed else {"LaunchTemplate": spec})
    assert asg.updates == [{"AutoScalingGroupName": "rh-p", **wanted}]


def test_a_groups_template_is_read_from_either_place():
    from chalicelib.scaler.autoscaling import group_template
    spec = {"LaunchTemplateId": "lt-1", "Version": "3"}
    assert group_template({"LaunchTemplate": spec}) == (spec, False)
    assert group_template({"MixedInstancesPolicy": {"LaunchTemplate": {
        "LaunchTemplateSpecification": spec}}}) == (spec, True)
    assert group_template({}) == ({}, False)
