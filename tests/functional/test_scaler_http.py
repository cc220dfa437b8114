"""The scaler against the moto server over HTTP: a real Auto Scaling group (launch template,
instances, protection, SetDesiredCapacity, TerminateInstanceInAutoScalingGroup), the hosts and
jobs tables, the lease; and a claim racing a retirement, 200 rounds on the serialised store."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from chalicelib import aws, dynamodb
from chalicelib import jobs as m
from chalicelib.hosts import DynamoHostStore, Heartbeat, HostNotServing, HostState
from chalicelib.jobs import Change, DynamoJobStore
from chalicelib.pools import load_pools
from chalicelib.runners import DynamoRunnerStore
from chalicelib.scaler.autoscaling import AwsAutoScaling
from chalicelib.scaler.service import Scaler, ScalerConfig
from chalicelib.scaler.store import DynamoScalerLease, DynamoWaitingJobs
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
    names = {"jobs_table": f"jobs-{unique}", "hosts_table": f"hosts-{unique}",
             "runners_table": f"runners-{unique}", "deliveries_table": f"deliveries-{unique}"}
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


def build(stack, clock, idle_s=60.0):
    dynamodb, names = stack["dynamodb"], stack["names"]
    return Scaler(
        pools={POOL: POOLS.by_name(POOL)},
        hosts=DynamoHostStore(dynamodb, names["hosts_table"]),
        runners=DynamoRunnerStore(dynamodb, names["runners_table"]),
        waiting=DynamoWaitingJobs(dynamodb, names["jobs_table"]),
        groups=AwsAutoScaling(stack["asg"], aws.client("ec2")),
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
