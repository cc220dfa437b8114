"""The scaler acting on its decisions: the lease, the Auto Scaling calls, the retire protocol,
the daemon's side of a retirement, and the Lambda handler's events. In-memory stores and fakes
of the scaler's own interfaces (Auto Scaling, GitHub)."""

from __future__ import annotations

import pytest

from chalicelib import jobs as m
from chalicelib.history import ForecastItem, ForecastReader, MemoryHistory
from chalicelib.hosts import Heartbeat, HostState
from chalicelib.jobs import Change
from chalicelib.memory import (
    InMemoryHeldJobs,
    InMemoryHostStore,
    InMemoryJobStore,
    InMemoryRunnerStore,
    InMemoryScalerLease,
    InMemoryWaitingJobs,
)
from chalicelib.overrides import PoolOverrides
from chalicelib.pools import load_pools
from chalicelib.runners import RunnerState
from chalicelib.scaler import handler
from chalicelib.scaler.autoscaling import AwsAutoScaling, Group, TerminateRefused
from chalicelib.scaler.decision import Instance
from chalicelib.scaler.handler import pools_of, run_pools, seen_of
from chalicelib.scaler.service import MAX_ROUNDS, Scaler, ScalerConfig
from chalicelib.warm_targets import WarmTargets

POOLS = load_pools()
POOL = "linux-small"
NOW = 1000.0


class Clock:
    def __init__(self, now=NOW):
        self.now = now

    def __call__(self):
        return self.now


class FakeAutoScaling:
    def __init__(self, *ids, min_size=0, max_size=10):
        self.min_size, self.max_size = min_size, max_size
        self.instances = {i: "InService" for i in ids}
        self.desired = len(ids)
        self.calls = []
        self.refuse = {}  # instance id -> the lifecycle state the group keeps it in

    def group(self, name):
        self.calls.append(("group", name))
        return Group(name, self.min_size, self.max_size, self.desired,
                     tuple(Instance(i, state, "a", 0.0, True)
                           for i, state in self.instances.items()))

    def set_desired(self, name, desired):
        self.calls.append(("set_desired", desired))
        self.desired = desired

    def terminate(self, instance_id, decrement=True):
        self.calls.append(("terminate", instance_id))
        if instance_id in self.refuse:
            raise TerminateRefused(instance_id, self.refuse[instance_id])
        if instance_id not in self.instances:
            return False
        del self.instances[instance_id]
        self.desired -= decrement
        return True

    def protect(self, name, ids):
        self.calls.append(("protect", ids))


class FakeGitHub:
    def __init__(self, busy=(), down=False):
        self.busy, self.down = set(busy), down
        self.deleted = []

    def delete_runner(self, installation_id, scope, runner_id):
        if self.down:
            from chalicelib.github import GitHubError
            raise GitHubError(503, "DELETE", "/runners", "unavailable")
        if runner_id in self.busy:
            return False  # 422: the runner is running a job
        self.deleted.append(runner_id)
        return True


class World:
    def __init__(self, *ids, **group):
        self.clock = Clock()
        self.jobs = InMemoryJobStore()
        self.hosts = InMemoryHostStore()
        self.runners = InMemoryRunnerStore()
        self.lease = InMemoryScalerLease()
        self.groups = FakeAutoScaling(*ids, **group)
        self.github = FakeGitHub()
        self.waiting = InMemoryWaitingJobs(self.jobs)
        self.held = InMemoryHeldJobs(self.jobs)

    def scaler(self, warm_targets=None, overrides=None, **config):
        settings = dict(group_prefix="rh-", slots_per_host=2, idle_s=60.0, boot_timeout_s=300.0,
                        lease_s=30.0) | config
        return Scaler(pools={POOL: POOLS.by_name(POOL)}, hosts=self.hosts,
                      runners=self.runners, waiting=self.waiting, held=self.held,
                      groups=self.groups,
                      github=self.github, lease=self.lease, config=ScalerConfig(**settings),
                      clock=self.clock, warm_targets=warm_targets, overrides=overrides)

    def beat(self, host_id, busy=0, at=NOW, busy_at=None, started_at=0.0):
        return self.hosts.beat(Heartbeat(host_id, (POOL,), 2, busy, busy, "0.1.0", (1, 1),
                                         HostState.SERVING, 10.0, started_at,
                                         busy_at=busy_at), at)

    def demand(self, *job_ids):
        for job_id in job_ids:
            self.jobs.apply(job_id, m.RECEIVE, NOW, Change(facts={"pool": POOL}))

    def runner(self, name, host_id, runner_id):
        self.runners.move(name, RunnerState.STARTING, NOW, host_id=host_id, pool=POOL,
                          installation_id=9, repository="runnerhub-demo/api",
                          scope_level="org")
        self.runners.move(name, RunnerState.IDLE, NOW, runner_id=runner_id)


@pytest.fixture
def world():
    return World()


def test_burst_sets_desired_capacity_for_the_backlog(world):
    world.demand(1, 2, 3)
    run = world.scaler().run(POOL)
    assert run.desired_set == 2 and world.groups.desired == 2
    assert ("group", "rh-linux-small") in world.groups.calls


def test_max_runners_caps_the_scale_out(world):
    world.demand(*range(1, 50))  # linux-small: max_runners 6, 2 slots per host -> 3 hosts
    world.scaler().run(POOL)
    assert world.groups.desired == 3


def test_missing_warm_runners_are_demand_and_seated_ones_are_not_counted_twice():
    pool = POOLS.by_name(POOL).model_copy(update={"warm_runners": 3})
    world = World("i-1", "i-2")
    scaler = Scaler(pools={POOL: pool}, hosts=world.hosts, runners=world.runners,
                    waiting=world.waiting, held=world.held, groups=world.groups,
                    github=world.github, lease=world.lease,
                    config=ScalerConfig(group_prefix="rh-", slots_per_host=2, idle_s=60.0,
                                        boot_timeout_s=300.0, lease_s=30.0),
                    clock=world.clock)
    world.beat("i-1")
    world.beat("i-2")
    run = scaler.run(POOL)  # no job; 3 warm runners wanted, none seated: 2 hosts of 2 slots
    assert run.decision.needed_slots == 3 and world.groups.desired == 2
    # Two seated (they hold slots: busy in the heartbeat) and one missing: still 3 slots.
    world.runners.start("w1", NOW, pool=POOL, max_runners=6, warm_limit=3)
    world.runners.start("w2", NOW, pool=POOL, max_runners=6, warm_limit=3)
    world.beat("i-1", busy=2)
    run = scaler.run(POOL)
    assert run.decision.needed_slots == 3 and world.groups.desired == 2
    # Without warm runners both idle hosts would go: the warm target keeps them.
    assert not run.decision.retire


def test_the_forecasts_warm_runners_are_demand_too_within_max_runners():
    """A pool whose file wants no warm runners, and a forecast asking 3 now: 3 slots of
    demand (2 hosts); one asking 40: max_runners' 6 (3 hosts); a stale one: none."""
    world = World()
    history = MemoryHistory()
    history.put_forecast(ForecastItem(POOL, 900.0, (0.0,) * 2, trained_at=NOW, warm=(3, 40)))
    targets = WarmTargets(ForecastReader(history, refresh_s=0, clock=world.clock))
    assert POOLS.by_name(POOL).warm_runners == 0
    run = world.scaler(warm_targets=targets).run(POOL)
    assert run.decision.needed_slots == 3 and world.groups.desired == 2
    world.clock.now = 1200.0 + 1  # the next bucket
    run = world.scaler(warm_targets=targets).run(POOL)
    assert run.decision.needed_slots == 6 and world.groups.desired == 3
    world.clock.now = NOW + 49 * 3600
    run = world.scaler(warm_targets=targets).run(POOL)
    assert run.decision.needed_slots == 0


class Overrides:
    def __init__(self, **values):
        self.values = values

    def get(self, pool):
        return PoolOverrides(**self.values)


def test_an_operators_host_limits_narrow_the_group_and_a_warm_target_is_demand():
    """Overrides set through the management API: min_hosts keeps hosts up with no demand,
    max_hosts caps a burst below the group's max; a warm target replaces the file's (0) and
    the forecast's; limits outside the group's are clamped to it."""
    world = World()
    run = world.scaler(overrides=Overrides(min_hosts=2)).run(POOL)
    assert world.groups.desired == 2 and run.decision.target == 2
    world = World()
    world.demand(*range(1, 20))
    world.scaler(overrides=Overrides(max_hosts=1)).run(POOL)
    assert world.groups.desired == 1
    world = World()
    world.scaler(overrides=Overrides(min_hosts=50)).run(POOL)  # the group's max is 10
    assert world.groups.desired == 3  # and max_runners 6 on 2-slot hosts caps it at 3
    world = World()
    reader = Overrides(warm_runners=3)
    world.scaler(overrides=reader, warm_targets=WarmTargets(overrides=reader)).run(POOL)
    assert world.groups.desired == 2  # 3 warm runners on 2-slot hosts


def test_an_idle_host_is_retired_runners_deleted_then_terminated():
    world = World("i-1")
    world.beat("i-1", busy_at=NOW - 120)
    world.runner("rh-old", "i-1", 41)
    run = world.scaler().run(POOL)
    assert run.retired == ["i-1"] and run.kept == {}
    assert world.github.deleted == [41] and world.runners.get("rh-old").state == "gone"
    assert world.hosts.get("i-1").state == "retiring"
    assert world.groups.calls[-1] == ("terminate", "i-1") and world.groups.desired == 0


def test_a_busy_runner_422_keeps_the_host_serving():
    world = World("i-1")
    world.beat("i-1", busy_at=NOW - 120)
    world.runner("rh-busy", "i-1", 42)
    world.github.busy = {42}
    run = world.scaler().run(POOL)
    assert run.retired == [] and run.kept == {"i-1": "runner_busy:rh-busy"}
    assert world.hosts.get("i-1").state == "serving"
    assert not any(call[0] == "terminate" for call in world.groups.calls)


def test_github_unreachable_keeps_the_host(world):
    world = World("i-1")
    world.beat("i-1", busy_at=NOW - 120)
    world.runner("rh-x", "i-1", 43)
    world.github.down = True
    run = world.scaler().run(POOL)
    assert run.kept == {"i-1": "github_unavailable:rh-x"}
    assert world.hosts.get("i-1").state == "serving" and world.groups.instances == {
        "i-1": "InService"}


def test_idle_below_the_timeout_is_kept():
    world = World("i-1")
    world.beat("i-1", busy_at=NOW - 30)
    assert world.scaler().run(POOL).retired == [] and world.groups.instances


def test_a_host_that_claimed_after_the_read_is_not_retired():
    world = World("i-1")
    world.beat("i-1", busy_at=NOW - 120)
    world.jobs.apply(7, m.RECEIVE, NOW, Change(facts={"pool": "elsewhere"}))

    class ClaimingWhileRead(InMemoryWaitingJobs):
        def waiting(self, pool):
            found = super().waiting(pool)
            # the host claims between the scaler's read and its retirement
            world.hosts.claim("i-1", world.jobs, 7, m.CLAIM, NOW,
                              Change(fields={"host_id": "i-1"}), generation=1)
            return found

    world.waiting = ClaimingWhileRead(world.jobs)
    run = world.scaler().run(POOL)
    assert run.kept == {"i-1": "changed"} and run.retired == []
    assert world.hosts.get("i-1").state == "serving" and "i-1" in world.groups.instances


def test_a_host_left_retiring_by_a_failed_run_is_finished():
    world = World("i-1", "i-2")
    world.beat("i-1", busy_at=NOW - 120)
    world.beat("i-2", busy=1)
    assert world.hosts.retire("i-1", NOW, NOW - 30, by="earlier-run")
    run = world.scaler(idle_s=10_000).run(POOL)
    assert run.retired == ["i-1"] and list(world.groups.instances) == ["i-2"]


def test_a_run_finding_the_lease_held_is_skipped_and_the_holder_runs_again(world):
    assert world.lease.acquire(POOL, "other", NOW, 30.0)
    run = world.scaler().run(POOL)
    assert run.skipped == "lease_held" and world.groups.calls == []
    assert world.lease.release(POOL, "other", NOW) is True  # asked to run again
    assert world.scaler().run(POOL).rounds == 1


def test_demand_arriving_during_a_run_gets_a_second_round(world):
    scaler = world.scaler()

    class Arriving(InMemoryWaitingJobs):
        calls = 0

        def waiting(self, pool):
            Arriving.calls += 1
            if Arriving.calls == 1:  # another invocation comes while this run reads
                assert not scaler.run(POOL).rounds
                world.demand(*range(1, 6))
            return super().waiting(pool)

    world.waiting = Arriving(world.jobs)
    scaler._waiting = world.waiting
    run = scaler.run(POOL)
    assert run.rounds == 2 and world.groups.desired == 3


def test_no_group_is_reported_not_raised(world):
    world.groups.group = lambda name: None
    assert world.scaler().run(POOL).skipped == "no_group"


def test_an_unknown_pool_is_a_clear_error(world):
    with pytest.raises(ValueError, match="unknown pool 'nope'"):
        world.scaler().run("nope")


def test_an_outage_in_one_pool_is_counted_not_raised(world):
    from chalicelib.errors import DependencyUnavailable

    def down(name):
        raise DependencyUnavailable("autoscaling", "ServiceUnavailable")

    world.groups.group = down
    summary = run_pools(world.scaler(), [POOL])
    assert summary["errors"] == 1 and "autoscaling" in summary["runs"][0]["errors"][0]


# --- the daemon's side: a retiring host receives nothing and claims nothing ---------------------


def test_a_retiring_daemon_stops_receiving_refuses_claims_and_resumes_when_kept(monkeypatch):
    from tests.unit.test_executor import make_executor, message, receive_job, received

    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_ID", "1")
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_KEY_FILE", "/dev/null")
    jobs, hosts = InMemoryJobStore(), InMemoryHostStore()
    receive_job(jobs)
    executor = make_executor(jobs, InMemoryRunnerStore(), hosts)
    executor._beat(force=True)
    assert executor.ctx.receiving.is_set()
    assert hosts.retire("h1", 100.0, 90.0, by="scaler")
    executor._beat(force=True)  # the heartbeat finds `retiring`: it stays so
    assert hosts.get("h1").state == "retiring" and not executor.ctx.receiving.is_set()
    # a message already received: the claim is refused, the demand goes back at once as a
    # fresh copy (its receive count starts over: a refusal never edges it to the DLQ)
    assert executor.server.handle(received(message().model_dump_json())) is False
    assert executor.ctx.consumer.recycled == ["m1"] and executor.ctx.consumer.visibility == []
    assert jobs.get(77).state == "received" and executor.ctx.containers.started == []
    assert hosts.unretire("h1", 101.0)
    executor._beat(force=True)
    assert executor.ctx.receiving.is_set()
    assert executor.server.handle(received(message().model_dump_json(), "m2")) is True


def test_a_daemon_without_a_record_writes_its_heartbeat_then_claims(monkeypatch):
    from tests.unit.test_executor import make_executor, message, receive_job, received

    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_ID", "1")
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_KEY_FILE", "/dev/null")
    jobs, hosts = InMemoryJobStore(), InMemoryHostStore()
    receive_job(jobs)
    executor = make_executor(jobs, InMemoryRunnerStore(), hosts)
    assert hosts.get("h1") is None  # its first heartbeat failed
    assert executor.server.handle(received(message().model_dump_json())) is True
    assert hosts.get("h1").state == "serving" and hosts.get("h1").claims == 1


# --- the Lambda handler's events ------------------------------------------------------------------

KNOWN = ("linux-small", "linux-large", "gpu")


def stream_record(pool, state, source="aws:dynamodb", job_id=1):
    return {"eventSource": source, "eventName": "MODIFY",
            "dynamodb": {"NewImage": {"pool": {"S": pool}, "state": {"S": state},
                                      "job_id": {"N": str(job_id)}}}}


def test_a_schedule_runs_every_pool():
    assert pools_of({"source": "aws.events", "detail-type": "Scheduled Event"}, KNOWN) == KNOWN


def test_a_stream_batch_runs_each_pool_with_new_demand_once():
    batch = {"Records": [stream_record("gpu", "received"), stream_record("gpu", "dispatched"),
                         stream_record("linux-small", "dispatched"),
                         stream_record("linux-large", "completed"),
                         stream_record("unknown-pool", "received"),
                         {"eventSource": "aws:dynamodb", "eventName": "REMOVE",
                          "dynamodb": {"OldImage": {"pool": {"S": "gpu"}}}}]}
    assert pools_of(batch, KNOWN) == ("linux-small", "gpu")


@pytest.mark.parametrize(
    ("event", "error"),
    [
        ({"Records": [stream_record("gpu", "received", source="aws:sqs")]}, "not a DynamoDB"),
        ({"pools": ["nope"]}, "unknown pools"),
        ({"pools": "gpu"}, "list of pool names"),
        ({"hello": 1}, "unrecognised scaler event"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_events_are_refused_clearly(event, error):
    with pytest.raises(ValueError, match=error):
        pools_of(event, KNOWN)


def test_named_pools_run_in_the_pools_order():
    assert pools_of({"pools": ["gpu", "linux-small"]}, KNOWN) == ("linux-small", "gpu")


# --- the lease: no wake-up lost -------------------------------------------------------------------


class InterleavedLease(InMemoryScalerLease):
    """Runs `between` once, after a failed take and before the ask for one more run: the
    holder releasing at that very moment."""

    between = None

    def ask_again(self, pool, owner, now):
        if self.between is not None:
            step, self.between = self.between, None
            step()
        return super().ask_again(pool, owner, now)


def test_a_holder_releasing_between_the_failed_take_and_the_ask_loses_no_wake_up(world):
    world.lease = InterleavedLease()
    assert world.lease.acquire(POOL, "holder", NOW, 30.0)
    released = []
    world.lease.between = lambda: released.append(world.lease.release(POOL, "holder", NOW))
    world.demand(1, 2, 3)
    run = world.scaler().run(POOL)
    assert released == [False]  # the holder never saw `again`...
    assert run.skipped is None and run.rounds == 1  # ...so this run took the lease and ran
    assert world.groups.desired == 2


def test_a_lease_changing_hands_without_end_is_an_outage_not_a_silent_skip(world):
    class Churning(InMemoryScalerLease):
        def take(self, *args):
            return False

        def ask_again(self, *args):
            return False  # free every time it is asked, taken every time it is tried

    world.lease = Churning()
    summary = run_pools(world.scaler(), [POOL])
    assert summary["errors"] == 1 and "changed hands 5 times" in summary["runs"][0]["errors"][0]


class AskedEveryRound(InMemoryWaitingJobs):
    """Another invocation comes during each of the first `rounds` reads (it finds the lease
    held and asks for one more run)."""

    def __init__(self, jobs, scaler, rounds):
        super().__init__(jobs)
        self.scaler, self.rounds = scaler, rounds

    def waiting(self, pool):
        if self.rounds > 0:
            self.rounds -= 1
            assert self.scaler.run(pool).skipped == "lease_held"
        return super().waiting(pool)


def test_a_request_after_the_last_round_stays_on_the_lease_for_the_next_run(world):
    scaler = world.scaler()
    scaler._waiting = AskedEveryRound(world.jobs, scaler, rounds=MAX_ROUNDS)
    run = scaler.run(POOL)
    assert run.rounds == MAX_ROUNDS and run.again_pending
    item = world.lease.items[POOL]
    assert item.get("again") is True and "owner" not in item  # free, and the request kept
    # the next run takes it up
    second = scaler.run(POOL)
    assert second.rounds == 1 and not second.again_pending
    assert "again" not in world.lease.items[POOL]


def test_a_pool_left_pending_runs_once_more_at_the_end_of_the_invocation(world):
    scaler = world.scaler()
    scaler._waiting = AskedEveryRound(world.jobs, scaler, rounds=MAX_ROUNDS)
    summary = run_pools(scaler, [POOL], time_left_s=lambda: 45.0)
    assert [r["rounds"] for r in summary["runs"]] == [MAX_ROUNDS, 1]
    assert "again" not in world.lease.items[POOL]


def test_the_lambda_runs_no_second_pass_without_the_time_for_it(world):
    class Context:  # Lambda's context: 10 s left
        @staticmethod
        def get_remaining_time_in_millis():
            return 10_000

    scaler = world.scaler()
    scaler._waiting = AskedEveryRound(world.jobs, scaler, rounds=MAX_ROUNDS)
    handler.use(scaler)
    try:
        summary = handler.handle({"pools": [POOL]}, Context())
    finally:
        handler.use(None)
    assert [r["rounds"] for r in summary["runs"]] == [MAX_ROUNDS]
    assert summary["runs"][0]["again_pending"] is True


def test_no_second_pass_without_the_time_for_it(world):
    scaler = world.scaler()
    scaler._waiting = AskedEveryRound(world.jobs, scaler, rounds=MAX_ROUNDS)
    summary = run_pools(scaler, [POOL], time_left_s=lambda: handler.SECOND_PASS_MIN_S - 1)
    assert [r["rounds"] for r in summary["runs"]] == [MAX_ROUNDS]
    assert world.lease.items[POOL]["again"] is True  # left for the next invocation


# --- stuck and down instances, the cap ------------------------------------------------------------


def test_stuck_instances_are_reaped_and_the_room_they_held_scaled_out():
    # launched at 0, no heartbeat at 1000: stuck (boot timeout 300 s); linux-small's
    # max_runners 6 at 3 slots a host: cap 2
    world = World("i-s1", "i-s2")
    world.demand(*range(1, 9))
    run = world.scaler(slots_per_host=3).run(POOL)
    assert run.reaped == ["i-s1", "i-s2"] and run.rounds == 2 and run.errors == []
    sets = [call[1] for call in world.groups.calls if call[0] == "set_desired"]
    assert sets == [2]  # never 4: the stuck pair counted against the cap until reaped
    assert world.groups.desired == 2 and world.groups.instances == {}


def test_a_down_host_holding_a_claim_is_left_to_the_takeover_then_reaped():
    world = World("i-1")
    world.beat("i-1", at=NOW - 400)  # silent longer than the boot timeout
    world.runner("rh-down", "i-1", 44)
    world.demand(9)
    assert world.jobs.apply(9, m.CLAIM, NOW - 450, Change(fields={"host_id": "i-1"}),
                            generation=1).applied
    run = world.scaler().run(POOL)
    assert run.reaped == [] and run.kept == {"i-1": "holds_jobs:9"}
    assert ("terminate", "i-1") not in world.groups.calls and world.github.deleted == []
    # another executor takes the job over (it is then another host's) and runs it
    world.jobs.apply(9, m.COMPLETE, NOW)
    run = world.scaler().run(POOL)
    assert run.reaped == ["i-1"] and world.github.deleted == [44]
    assert world.runners.get("rh-down").state == "gone" and "i-1" not in world.groups.instances


def test_a_down_host_whose_runner_github_still_runs_is_not_reaped():
    world = World("i-1")
    world.beat("i-1", at=NOW - 400)
    world.runner("rh-busy", "i-1", 45)
    world.github.busy = {45}
    run = world.scaler().run(POOL)
    assert run.reaped == [] and run.kept == {"i-1": "runner_busy:rh-busy"}
    assert "i-1" in world.groups.instances


# --- a termination the group refuses --------------------------------------------------------------


def test_a_refused_termination_puts_the_host_back_to_serving_and_fails_the_run():
    world = World("i-1")
    world.beat("i-1", busy_at=NOW - 120)
    world.groups.refuse = {"i-1": "Standby"}
    run = world.scaler().run(POOL)
    assert run.retired == [] and run.kept == {"i-1": "terminate_refused"}
    assert len(run.errors) == 1 and "still in its group (Standby)" in run.errors[0]
    assert world.hosts.get("i-1").state == "serving"  # not `retiring` for ever


class ValidationErrorAutoScaling:
    """boto3's autoscaling client as AWS answers a refused or moot termination: ValidationError,
    the instance listed (`listed`: its lifecycle state) or not (None)."""

    def __init__(self, listed):
        from botocore.exceptions import ClientError

        self.exceptions = type("Exceptions", (), {"ClientError": ClientError})
        self.listed = listed

    def terminate_instance_in_auto_scaling_group(self, **request):
        raise self.exceptions.ClientError(
            {"Error": {"Code": "ValidationError", "Message": "refused"}},
            "TerminateInstanceInAutoScalingGroup")

    def describe_auto_scaling_instances(self, InstanceIds):
        return {"AutoScalingInstances": [
            {"InstanceId": i, "LifecycleState": self.listed} for i in InstanceIds
            if self.listed is not None]}


@pytest.mark.parametrize(
    ("listed", "outcome"),
    [
        (None, False),  # no longer in a group: gone already
        ("Terminating:Wait", True),  # on its way out already
        ("Standby", "refused"),
        ("InService", "refused"),  # e.g. a decrement below MinSize
    ],
)
def test_a_validation_error_is_confirmed_with_the_group(listed, outcome):
    groups = AwsAutoScaling(ValidationErrorAutoScaling(listed), ec2=None)
    if outcome == "refused":
        with pytest.raises(TerminateRefused, match=f"still in its group \\({listed}\\)"):
            groups.terminate("i-1")
    else:
        assert groups.terminate("i-1") is outcome


# --- the stream's jobs (the index may lag) --------------------------------------------------------


def test_a_stream_job_the_index_does_not_list_yet_is_scaled_for(world):
    class Lagging(InMemoryWaitingJobs):
        def waiting(self, pool):
            return []  # the by_state index has not caught up

    world.waiting = Lagging(world.jobs)
    batch = {"Records": [stream_record(POOL, "received", job_id=5),
                         stream_record(POOL, "dispatched", job_id=5),
                         stream_record(POOL, "received", job_id=6),
                         stream_record(POOL, "received", job_id=7)]}
    handler.use(world.scaler())
    try:
        summary = handler.handle(batch)
    finally:
        handler.use(None)
    assert summary["runs"][0]["decision"]["backlog"] == 3  # job 5 once
    assert world.groups.desired == 2


def test_seen_of_keeps_each_jobs_last_image_by_pool_and_skips_what_is_not_a_job(caplog):
    batch = {"Records": [stream_record("gpu", "received", job_id=1),
                         stream_record("gpu", "dispatched", job_id=1),
                         stream_record("linux-small", "received", job_id=2),
                         stream_record("gpu", "no-such-state", job_id=3),
                         {"eventSource": "aws:dynamodb", "dynamodb": {"NewImage": {
                             "pool": {"S": "gpu"}, "state": {"S": "received"}}}},
                         {"eventSource": "aws:dynamodb", "eventName": "REMOVE",
                          "dynamodb": {"OldImage": {"pool": {"S": "gpu"}}}}]}
    found = seen_of(batch)
    assert {pool: [(j.job_id, j.state.value) for j in jobs] for pool, jobs in found.items()} \
        == {"gpu": [(1, "dispatched")], "linux-small": [(2, "received")]}
    assert sum("not a job" in r.getMessage() for r in caplog.records) == 2
