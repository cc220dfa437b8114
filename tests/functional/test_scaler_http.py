"""The scaler against the moto server over HTTP: a real Auto Scaling group (launch template,
instances, protection, SetDesiredCapacity, TerminateInstanceInAutoScalingGroup,
DescribeAutoScalingInstances), the hosts and jobs tables, the lease; and a claim racing a
retirement, 200 rounds on the serialised store. The scaler's own clients are labelled as the
scaler's: tests/infra/test_iam_calls.py compares the calls they make with its role."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from chalicelib import aws, dynamodb, resources
from chalicelib import jobs as m
from chalicelib.hosts import DynamoHostStore, Heartbeat, HostNotServing, HostState
from chalicelib.jobs import Change, DynamoJobStore
from chalicelib.pools import load_pools
from chalicelib.runners import DynamoRunnerStore
from chalicelib.scaler.autoscaling import AwsAutoScaling
from chalicelib.scaler.service import Scaler, ScalerConfig
from chalicelib.scaler.store import DynamoHeldJobs, DynamoScalerLease, DynamoWaitingJobs
from devstack.resources import create_tables

POOLS = load_pools()
POOL = "linux-small"  # max_runners 6


class NoGitHub:
    """The hosts here have no runners: GitHub is never asked."""

    def delete_runner(self, *args):
        raise AssertionError("no runner to delete")


@pytest.fixture
def stack(aws_endpoint, unique):
    dynamodb = aws.client("dynamodb")
    # <prefix>-<kind>, as a stage names them: the IAM comparison tells tables apart by kind.
    names = {spec.logical_name: f"rh-{unique}-{spec.default_name.removeprefix('runnerhub-')}"
             for spec in resources.TABLES}
    create_tables(dynamodb, names)
    asg, ec2 = aws.client("autoscaling"), aws.client("ec2")
    template = f"rh-template-{unique}"
    ec2.create_launch_template(LaunchTemplateName=template, LaunchTemplateData={
        "ImageId": "ami-12c6146b", "InstanceType": "t3.micro"})
    prefix = f"rh-{unique}-"
    asg.create_auto_scaling_group(
        AutoScalingGroupName=prefix + POOL, LaunchTemplate={"LaunchTemplateName": template},
        MinSize=0, MaxSize=5, DesiredCapacity=0, AvailabilityZones=["us-east-1a", "us-east-1b"],
        NewInstancesProtectedFromScaleIn=True)
    return {"dynamodb": dynamodb, "asg": asg, "names": names, "prefix": prefix}


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def build(stack, clock, idle_s=60.0, autoscaling=None):
    """The scaler with its own (labelled) clients; `autoscaling`: in place of its client."""
    dynamodb, names = aws.client("dynamodb", aws.SCALER), stack["names"]
    return Scaler(
        pools={POOL: POOLS.by_name(POOL)},
        hosts=DynamoHostStore(dynamodb, names["hosts_table"]),
        runners=DynamoRunnerStore(dynamodb, names["runners_table"]),
        waiting=DynamoWaitingJobs(dynamodb, names["jobs_table"]),
        held=DynamoHeldJobs(dynamodb, names["jobs_table"]),
        groups=AwsAutoScaling(autoscaling or aws.client("autoscaling", aws.SCALER),
                              aws.client("ec2", aws.SCALER)),
        github=NoGitHub(),
        lease=DynamoScalerLease(dynamodb, names["hosts_table"]),
        config=ScalerConfig(group_prefix=stack["prefix"], slots_per_host=2, idle_s=idle_s,
                            boot_timeout_s=300.0, lease_s=30.0),
        clock=clock,
    )


def group(stack):
    return stack["asg"].describe_auto_scaling_groups(
        AutoScalingGroupNames=[stack["prefix"] + POOL])["AutoScalingGroups"][0]


def beat(hosts, host_id, at, busy=0, busy_at=None):
    return hosts.beat(Heartbeat(host_id, (POOL,), 2, busy, busy, "0.1.0", (1, 1),
                                HostState.SERVING, 10.0, 0.0, busy_at=busy_at), at)


def test_scale_out_for_a_burst_then_back_to_min_without_touching_a_busy_host(stack):
    import time

    now = time.time()
    clock = Clock(now)
    jobs = DynamoJobStore(stack["dynamodb"], stack["names"]["jobs_table"])
    hosts = DynamoHostStore(stack["dynamodb"], stack["names"]["hosts_table"])
    for job_id in range(1, 6):  # 5 jobs, 2 slots per host: 3 hosts
        jobs.apply(job_id, m.RECEIVE, now, Change(facts={"pool": POOL}))
    run = build(stack, clock).run(POOL)
    assert run.errors == [] and run.desired_set == 3
    found = group(stack)
    assert found["DesiredCapacity"] == 3 and len(found["Instances"]) == 3
    assert all(i["ProtectedFromScaleIn"] for i in found["Instances"])
    # booting (no heartbeat yet): counted, nothing more is asked for
    assert build(stack, clock).run(POOL).desired_set is None
    ids = sorted(i["InstanceId"] for i in found["Instances"])
    # the hosts come up and run the jobs; then the burst is over: two idle, one still busy
    for job_id in range(1, 6):
        jobs.apply(job_id, m.COMPLETE, now + 1)
    clock.now = now + 200
    beat(hosts, ids[0], clock.now, busy=1, busy_at=clock.now)
    for host_id in ids[1:]:
        beat(hosts, host_id, clock.now, busy_at=now + 10)
    run = build(stack, clock).run(POOL)
    assert sorted(run.retired) == ids[1:] and run.errors == []
    found = group(stack)
    assert found["DesiredCapacity"] == 1
    assert [i["InstanceId"] for i in found["Instances"]
            if not i["LifecycleState"].startswith("Terminat")] == [ids[0]]
    assert {hosts.get(h).state for h in ids[1:]} == {HostState.RETIRING}
    assert hosts.get(ids[0]).state == HostState.SERVING
    # the busy host's job ends; idle past the timeout, it goes too: back to the minimum (0)
    clock.now = now + 400
    beat(hosts, ids[0], clock.now, busy_at=now + 250)
    assert build(stack, clock).run(POOL).retired == [ids[0]]
    assert group(stack)["DesiredCapacity"] == 0


def test_the_lease_lets_one_run_at_a_time_and_asks_the_holder_again(stack):
    lease = DynamoScalerLease(stack["dynamodb"], stack["names"]["hosts_table"])
    assert lease.acquire(POOL, "a", 100.0, 30.0)
    assert not lease.acquire(POOL, "b", 110.0, 30.0)
    assert lease.acquire("gpu", "b", 110.0, 30.0)  # another pool's lease is its own
    assert lease.release(POOL, "a", 111.0) is True  # b asked for one more run
    assert lease.acquire(POOL, "b", 112.0, 30.0)
    assert lease.release(POOL, "b", 113.0) is False
    assert not lease.release(POOL, "a", 114.0)  # not a's any more
    assert lease.acquire(POOL, "c", 200.0, 30.0)
    assert lease.acquire(POOL, "d", 231.0, 30.0)  # c's expired
    hosts = DynamoHostStore(stack["dynamodb"], stack["names"]["hosts_table"])
    assert hosts.all() == []  # lease items are not hosts


class ReleasingBeforeTheAsk:
    """The DynamoDB client, except that the first ask for one more run (`SET again`) lets the
    holder release first: the interleaving that lost a wake-up."""

    def __init__(self, client, release):
        self._client, self._release = client, release

    def update_item(self, **request):
        if request["UpdateExpression"] == "SET again = :yes" and self._release:
            release, self._release = self._release, None
            assert release() is False  # the holder sees no `again`
        return self._client.update_item(**request)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_a_holder_releasing_between_the_failed_take_and_the_ask_loses_no_wake_up(stack):
    table = stack["names"]["hosts_table"]
    holder = DynamoScalerLease(stack["dynamodb"], table)
    assert holder.acquire(POOL, "a", 100.0, 30.0)
    late = DynamoScalerLease(ReleasingBeforeTheAsk(
        stack["dynamodb"], lambda: holder.release(POOL, "a", 101.0)), table)
    assert late.acquire(POOL, "b", 101.0, 30.0)  # the lease was free: b runs
    assert not holder.acquire(POOL, "a", 102.0, 30.0)  # b's now, and a asked b again
    assert late.release(POOL, "b", 103.0) is True


def test_a_released_lease_is_free_whatever_the_clock_of_the_next_run(stack):
    lease = DynamoScalerLease(stack["dynamodb"], stack["names"]["hosts_table"])
    assert lease.acquire(POOL, "a", 200.0, 30.0)
    assert lease.release(POOL, "a", 200.0) is False
    # b's clock lags a's by 50 s: the released lease is free all the same (no `owner`)
    assert lease.acquire(POOL, "b", 150.0, 30.0)


def test_the_last_rounds_request_is_kept_on_the_lease(stack):
    lease = DynamoScalerLease(stack["dynamodb"], stack["names"]["hosts_table"])
    assert lease.acquire(POOL, "a", 100.0, 30.0) and not lease.acquire(POOL, "b", 101.0, 30.0)
    assert lease.release(POOL, "a", 102.0, keep_again=True) is True
    item = dynamodb.get(stack["dynamodb"], stack["names"]["hosts_table"],
                        {"host_id": {"S": f"scaler#{POOL}"}})
    assert item["again"] is True and "owner" not in item
    assert lease.acquire(POOL, "c", 103.0, 30.0)  # the next run takes it up...
    assert lease.release(POOL, "c", 104.0) is False  # ...and the request with it


# --- stuck and down instances, the cap, a refused termination ----------------------------------


def test_stuck_and_down_instances_are_reaped_unless_holding_a_claim_within_the_cap(stack):
    import time

    t0 = time.time()
    asg, name = stack["asg"], stack["prefix"] + POOL
    asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=3)
    stuck, holding, down = sorted(i["InstanceId"] for i in group(stack)["Instances"])
    hosts = DynamoHostStore(stack["dynamodb"], stack["names"]["hosts_table"])
    jobs = DynamoJobStore(stack["dynamodb"], stack["names"]["jobs_table"])
    beat(hosts, holding, t0)
    beat(hosts, down, t0)
    for job_id in range(1, 7):
        jobs.apply(job_id, m.RECEIVE, t0, Change(facts={"pool": POOL}))
    assert jobs.apply(1, m.CLAIM, t0, Change(fields={"host_id": holding}), generation=1).applied
    # 700 s on: `stuck` never beat, the other two stopped beating 700 s ago (boot timeout 300)
    run = build(stack, Clock(t0 + 700)).run(POOL)
    assert run.errors == [] and sorted(run.reaped) == sorted([stuck, down])
    assert run.kept == {holding: "holds_jobs:1"}  # left to the executors' takeover
    # linux-small: max_runners 6 at 2 slots = cap 3; the held host counts against it
    assert run.desired_set == 3 and run.rounds == 2
    found = group(stack)
    assert found["DesiredCapacity"] == 3 and holding in {i["InstanceId"]
                                                        for i in found["Instances"]}
    assert not {stuck, down} & {i["InstanceId"] for i in found["Instances"]}


class RefusingTerminate:
    """The scaler's autoscaling client, except that a termination is refused the way AWS
    refuses one (moto never does): the instance is put in Standby first (on moto, for real),
    then the call answers ValidationError."""

    def __init__(self, client, standby):
        self._client, self._standby = client, standby

    def terminate_instance_in_auto_scaling_group(self, InstanceId, **request):
        self._standby(InstanceId)
        raise self._client.exceptions.ClientError(
            {"Error": {"Code": "ValidationError",
                       "Message": f"The instance {InstanceId} is not in service"}},
            "TerminateInstanceInAutoScalingGroup")

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_a_termination_refused_for_an_instance_still_in_its_group_keeps_the_host(stack):
    import time

    now = time.time()
    asg, name = stack["asg"], stack["prefix"] + POOL
    asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=1)
    (instance,) = [i["InstanceId"] for i in group(stack)["Instances"]]
    hosts = DynamoHostStore(stack["dynamodb"], stack["names"]["hosts_table"])
    beat(hosts, instance, now, busy_at=now - 120)  # idle past the idle timeout: retired

    def standby(instance_id):
        asg.enter_standby(AutoScalingGroupName=name, InstanceIds=[instance_id],
                          ShouldDecrementDesiredCapacity=False)

    scaler_asg = aws.client("autoscaling", aws.SCALER)
    run = build(stack, Clock(now), autoscaling=RefusingTerminate(scaler_asg, standby)).run(POOL)
    assert run.retired == [] and run.kept == {instance: "terminate_refused"}
    assert len(run.errors) == 1 and "still in its group (Standby)" in run.errors[0]
    assert hosts.get(instance).state == HostState.SERVING  # not `retiring` for ever


# --- a claim racing a retirement ------------------------------------------------------------------

ROUNDS = 200


def race_round(pool, hosts, jobs, round_, claim):
    """An idle serving host; its claim and its retirement start at the same moment."""
    host_id, job_id = f"race-{round_}", 50_000 + round_
    beat(hosts, host_id, 100.0, busy_at=10.0)
    jobs.apply(job_id, m.RECEIVE, 100.0, Change(facts={"pool": POOL}))
    barrier = threading.Barrier(2)

    def claimer():
        barrier.wait()
        return claim(hosts, jobs, host_id, job_id)

    def retirer():
        barrier.wait()
        return hosts.retire(host_id, 101.0, fresh_after=70.0, by="scaler")

    claimed, retired = pool.submit(claimer), pool.submit(retirer)
    return claimed.result(), retired.result()


def transactional_claim(hosts, jobs, host_id, job_id):
    try:
        return hosts.claim(host_id, jobs, job_id, m.CLAIM, 100.5,
                           Change(fields={"host_id": host_id}), generation=1).applied
    except HostNotServing:
        return False


def claim_without_host_condition(hosts, jobs, host_id, job_id):
    """The bug the transaction prevents: the job's move alone, blind to the host's state."""
    return jobs.apply(job_id, m.CLAIM, 100.5, Change(fields={"host_id": host_id}),
                      generation=1).applied


def test_a_claim_racing_a_retirement_never_both_win(stack):
    hosts = DynamoHostStore(stack["dynamodb"], stack["names"]["hosts_table"])
    jobs = DynamoJobStore(stack["dynamodb"], stack["names"]["jobs_table"])
    with ThreadPoolExecutor(2) as pool:
        outcomes = [race_round(pool, hosts, jobs, round_, transactional_claim)
                    for round_ in range(ROUNDS)]
    both = [r for r, outcome in enumerate(outcomes) if outcome == (True, True)]
    assert both == [], f"claimed on a retired host in rounds {both}"
    # every round has exactly one winner, and each side won some rounds: a real race
    assert all(claimed != retired for claimed, retired in outcomes)
    assert 0 < sum(claimed for claimed, _ in outcomes) < ROUNDS
    # the losers left nothing: a refused claim left the job for another host
    states = {h.host_id: h.state for h in hosts.all()}
    found = {int(item["job_id"]): item["state"]
             for item in dynamodb.scan(stack["dynamodb"], stack["names"]["jobs_table"])}
    for round_, (claimed, _) in enumerate(outcomes):
        assert (found[50_000 + round_] == "claimed") is claimed, round_
        assert states[f"race-{round_}"] == ("serving" if claimed else "retiring"), round_


def test_the_race_test_catches_a_claim_blind_to_its_host(stack):
    hosts = DynamoHostStore(stack["dynamodb"], stack["names"]["hosts_table"])
    jobs = DynamoJobStore(stack["dynamodb"], stack["names"]["jobs_table"])
    with ThreadPoolExecutor(2) as pool:
        doubles = sum(race_round(pool, hosts, jobs, ROUNDS + round_,
                                 claim_without_host_condition) == (True, True)
                      for round_ in range(ROUNDS // 4))
    assert doubles > 0, "a claim blind to its host never won beside a retirement: no teeth"
