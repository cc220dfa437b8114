"""The scaler's Lambda entry (`app.scale`, wired from RUNNERHUB_* settings as deployed) against
the moto server over HTTP and the GitHub emulator: a batch of the jobs table's own stream
scales out the pools whose jobs gained demand, a scheduled run retires idle hosts after
deleting their runners from GitHub, and every run emits the metrics the dashboard and the
alarms name (RUNNERHUB_EMF_LOG). Its AWS calls are recorded as the scaler's
(tests/infra/test_iam_calls.py compares them with the scaler role)."""

from __future__ import annotations

import time

import pytest

import app as chalice_app
from chalicelib import aws, resources
from chalicelib import jobs as m
from chalicelib.github import GitHubApp, RunnerScope
from chalicelib.hosts import DynamoHostStore, Heartbeat, HostState
from chalicelib.jobs import Change, DynamoJobStore
from chalicelib.runners import DynamoRunnerStore, RunnerState
from chalicelib.scaler import handler
from chalicelib.telemetry import read_emf_log
from devstack.resources import create_tables
from emulator import AppConfig, Emulator, EmulatorConfig, InstallationConfig
from emulator.testing import generate_app_key
from tests.conftest import recording

APP_ID = 4712
ORG = "scale-org"
INSTALLATION = 2000
POOL, NO_GROUP = "linux", "spare"
POOLS_TOML = f"""
[[pool]]
name = "{POOL}"
labels = ["self-hosted", "linux", "x64"]
scope = {{ owner = "{ORG}" }}
image = "runnerhub/runner-linux-small:local"
max_runners = 8

[[pool]]
name = "{NO_GROUP}"
labels = ["self-hosted", "linux", "arm64"]
scope = {{ owner = "{ORG}" }}
image = "runnerhub/runner-linux-small:local"
"""


@pytest.fixture(scope="module")
def app_key():
    return generate_app_key()


@pytest.fixture
def emulator(app_key):
    config = EmulatorConfig(apps=[AppConfig(
        app_id=APP_ID, public_key_pem=app_key[1],
        installations=[InstallationConfig(id=INSTALLATION, account=ORG)])])
    with Emulator(config) as emu:
        yield emu


@pytest.fixture
def deployed(aws_endpoint, unique, tmp_path, monkeypatch, emulator, app_key):
    """Tables, one group (pool `linux`; `spare` has none), and the scaler's settings as the
    stack sets them."""
    dynamodb = aws.client("dynamodb")
    # <prefix>-<kind>, as a stage names them: tests/infra/test_iam_calls.py tells the
    # scaler's calls apart by the kind of table.
    names = {spec.logical_name: f"rh-{unique}-{spec.default_name.removeprefix('runnerhub-')}"
             for spec in resources.TABLES}
    create_tables(dynamodb, names)
    ec2, asg = aws.client("ec2"), aws.client("autoscaling")
    template = f"rh-lt-{unique}"
    ec2.create_launch_template(LaunchTemplateName=template, LaunchTemplateData={
        "ImageId": "ami-12c6146b", "InstanceType": "t3.micro"})
    prefix = f"rh-{unique}-"
    asg.create_auto_scaling_group(
        AutoScalingGroupName=prefix + POOL, LaunchTemplate={"LaunchTemplateName": template},
        MinSize=0, MaxSize=5, DesiredCapacity=0, AvailabilityZones=["us-east-1a"],
        NewInstancesProtectedFromScaleIn=True)
    pools_file = tmp_path / "pools.toml"
    pools_file.write_text(POOLS_TOML)
    key_file = tmp_path / "app.pem"
    key_file.write_text(app_key[0])
    for name, table in names.items():
        monkeypatch.setenv(f"RUNNERHUB_{name.upper()}", table)
    for key, value in {
        "POOLS_FILE": str(pools_file), "GITHUB_API_URL": emulator.base_url,
        "GITHUB_APP_ID": str(APP_ID), "GITHUB_APP_KEY_FILE": str(key_file),
        "SCALER_GROUP_PREFIX": prefix, "SCALER_POOL_SLOTS": f"{POOL}=2",
        "SCALER_IDLE_S": "0", "EMIT_METRICS": "false",
    }.items():
        monkeypatch.setenv(f"RUNNERHUB_{key}", value)
    handler.use(None)  # built from these settings on the first event, as in a Lambda
    yield {"dynamodb": dynamodb, "asg": asg, "names": names, "group": prefix + POOL}
    handler.use(None)


def group(deployed) -> dict:
    return deployed["asg"].describe_auto_scaling_groups(
        AutoScalingGroupNames=[deployed["group"]])["AutoScalingGroups"][0]


def stream_records(deployed) -> list[dict]:
    """Everything on the jobs table's stream so far (what Lambda's event source would pass)."""
    table = deployed["names"]["jobs_table"]
    arn = deployed["dynamodb"].describe_table(TableName=table)["Table"]["LatestStreamArn"]
    streams = aws.client("dynamodbstreams")
    records = []
    for shard in streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]:
        iterator = streams.get_shard_iterator(StreamArn=arn, ShardId=shard["ShardId"],
                                              ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        records += streams.get_records(ShardIterator=iterator, Limit=1000)["Records"]
    return records


def emitted(name: str, pool: str | None = None) -> list[float]:
    """Values of a metric the scaler emitted this session (for `pool`, else `service`)."""
    import os

    values = []
    for blob in read_emf_log(os.environ["RUNNERHUB_EMF_LOG"]):
        if name in blob and (blob.get("pool") == pool if pool else blob.get("service") ==
                             "scaler"):
            value = blob[name]
            values += value if isinstance(value, list) else [value]
    return values


def test_a_stream_batch_scales_out_only_the_pools_that_gained_demand(deployed):
    jobs = DynamoJobStore(deployed["dynamodb"], deployed["names"]["jobs_table"])
    now = time.time()
    for job_id in (1, 2, 3):  # 3 jobs at 2 slots per host: 2 hosts
        jobs.apply(job_id, m.RECEIVE, now, Change(facts={"pool": POOL}))
    records = stream_records(deployed)
    images = [r["dynamodb"]["NewImage"] for r in records]
    assert {int(i["job_id"]["N"]) for i in images} == {1, 2, 3}
    # Each job's demand shows on the stream (a job's first write may carry no state yet).
    assert {int(i["job_id"]["N"]) for i in images
            if i.get("state", {}).get("S") == "received"} == {1, 2, 3}

    summary = chalice_app.scale({"Records": records}, None)
    (run,) = summary["runs"]  # one run for the pool, however many records name it
    assert (run["pool"], run["desired_set"], run["errors"]) == (POOL, 2, [])
    assert summary["errors"] == 0
    found = group(deployed)
    assert found["DesiredCapacity"] == 2 and len(found["Instances"]) == 2
    assert all(i["ProtectedFromScaleIn"] for i in found["Instances"])
    assert 2 in emitted("PoolDesiredHosts", POOL) and 3 in emitted("PoolBacklog", POOL)

    # A record of a job that gained no demand (completed) runs nothing.
    jobs.apply(1, m.COMPLETE, now + 1)
    later = stream_records(deployed)[len(records):]
    assert [r["dynamodb"]["NewImage"]["state"]["S"] for r in later][-1:] == ["completed"]
    assert chalice_app.scale({"Records": later}, None) == {"runs": [], "errors": 0}


def test_a_schedule_retires_idle_hosts_after_deleting_their_runners(deployed, emulator,
                                                                    app_key):
    deployed["asg"].set_desired_capacity(AutoScalingGroupName=deployed["group"],
                                         DesiredCapacity=2)
    ids = sorted(i["InstanceId"] for i in group(deployed)["Instances"])
    hosts = DynamoHostStore(deployed["dynamodb"], deployed["names"]["hosts_table"])
    now = time.time()
    for host_id in ids:  # both up, idle since long ago
        hosts.beat(Heartbeat(host_id, (POOL,), 2, 0, 0, "0.1.0", (1, 1), HostState.SERVING,
                             10.0, 0.0, busy_at=now - 600), now)
    # An idle runner on the first host, registered with GitHub (the emulator).
    jit = GitHubApp(APP_ID, app_key[0], emulator.base_url).generate_jitconfig(
        INSTALLATION, RunnerScope("org", ORG), "rh-scale-1", ["self-hosted", "linux"], 1)
    runners = DynamoRunnerStore(deployed["dynamodb"], deployed["names"]["runners_table"])
    runners.move(jit.name, RunnerState.STARTING, now, pool=POOL, host_id=ids[0],
                 installation_id=INSTALLATION, repository=ORG, scope_level="org",
                 runner_id=jit.runner_id)
    # One launched before the group protected new instances: the scaler protects it first.
    deployed["asg"].set_instance_protection(AutoScalingGroupName=deployed["group"],
                                            InstanceIds=[ids[1]], ProtectedFromScaleIn=False)
    failed_before = len(emitted("ScalerRunFailed"))

    summary = chalice_app.scale({"detail-type": "Scheduled Event", "source": "aws.events"},
                                None)
    by_pool = {run["pool"]: run for run in summary["runs"]}
    assert sorted(by_pool[POOL]["retired"]) == ids and by_pool[POOL]["errors"] == []
    # The pool without a group is a failed run (and an alarm), not a crash of the others.
    assert by_pool[NO_GROUP]["skipped"] == "no_group"
    assert by_pool[POOL]["decision"]["protect"] == [ids[1]]
    assert group(deployed)["DesiredCapacity"] == 0
    assert jit.name not in {runner["name"] for runner in emulator.runners()}
    assert runners.get(jit.name).state is RunnerState.GONE
    assert {hosts.get(h).state for h in ids} == {HostState.RETIRING}
    assert len(emitted("ScalerRunFailed")) == failed_before + 1
    assert emitted("ScalerRuns") and 4 in emitted("PoolFreeSlots", POOL)  # 2 idle x 2 slots
    scaler_calls = {c["action"] for c in recording("RUNNERHUB_AWS_CALL_LOG")
                    if c["deployable"] == aws.SCALER}
    assert {"autoscaling:TerminateInstanceInAutoScalingGroup",
            "autoscaling:SetInstanceProtection", "dynamodb:Scan",
            "dynamodb:Query", "ec2:DescribeInstances"} <= scaler_calls


def test_an_event_of_no_known_kind_is_refused_with_what_was_expected(deployed):
    with pytest.raises(ValueError, match="expected a schedule"):
        chalice_app.scale({"hello": "world"}, None)
    with pytest.raises(ValueError, match="unknown pools"):
        chalice_app.scale({"pools": ["nope"]}, None)
