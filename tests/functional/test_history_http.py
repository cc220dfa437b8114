"""Predictive scaling's loop on the moto server over HTTP: the scaler's Lambda entry (`app.scale`)
turns the jobs table's own stream into demand history (arrivals, runner-seconds; a retried
batch counts nothing twice) and applies a trained forecast as its floor; the trainer's Lambda
entry (`forecast.trainer.handler`, wired from RUNNERHUB_* settings as deployed) fits Part A's
forecaster on that history and writes the model (S3) and the forecast item; bad history fails
its pool alone, keeps the previous forecast and is counted. The calls are recorded as the
scaler's and the trainer's (tests/infra/test_iam_calls.py compares them with their roles)."""

from __future__ import annotations

import random
import time

import pytest

import app as chalice_app
from chalicelib import aws, resources
from chalicelib import jobs as m
from chalicelib.history import (
    BUCKET_S,
    DynamoHistory,
    Event,
    ForecastItem,
    Kind,
    bucket_of,
)
from chalicelib.jobs import Change, DynamoJobStore
from chalicelib.scaler import handler
from devstack.resources import create_tables
from emulator.testing import generate_app_key
from forecast import trainer
from forecast.traces import DAY_BUCKETS, HORIZON
from forecast.trainer import STORED_HORIZON

POOL, QUIET = "linux", "quiet"
POOLS_TOML = f"""
[[pool]]
name = "{POOL}"
labels = ["self-hosted", "linux", "x64"]
scope = {{ owner = "hist-org" }}
image = "runnerhub/runner-linux-small:local"
max_runners = 8

[[pool]]
name = "{QUIET}"
labels = ["self-hosted", "linux", "arm64"]
scope = {{ owner = "hist-org" }}
image = "runnerhub/runner-linux-small:local"
"""
DAY = 86400


@pytest.fixture
def deployed(aws_endpoint, unique, tmp_path, monkeypatch):
    dynamodb = aws.client("dynamodb")
    names = {spec.logical_name: f"rh-{unique}-{spec.default_name.removeprefix('runnerhub-')}"
             for spec in resources.TABLES}
    create_tables(dynamodb, names)
    pools_file = tmp_path / "pools.toml"
    pools_file.write_text(POOLS_TOML)
    for name, table in names.items():
        monkeypatch.setenv(f"RUNNERHUB_{name.upper()}", table)
    monkeypatch.setenv("RUNNERHUB_POOLS_FILE", str(pools_file))
    monkeypatch.setenv("RUNNERHUB_EMIT_METRICS", "false")
    yield {"dynamodb": dynamodb, "names": names, "unique": unique}


@pytest.fixture
def scaler_env(deployed, tmp_path, monkeypatch):
    """The scaler's settings as the stack sets them, and one Auto Scaling group (`linux`)."""
    ec2, asg = aws.client("ec2"), aws.client("autoscaling")
    unique = deployed["unique"]
    ec2.create_launch_template(LaunchTemplateName=f"rh-lt-{unique}", LaunchTemplateData={
        "ImageId": "ami-12c6146b", "InstanceType": "t3.micro"})
    prefix = f"rh-{unique}-"
    asg.create_auto_scaling_group(
        AutoScalingGroupName=prefix + POOL, MinSize=0, MaxSize=5, DesiredCapacity=0,
        LaunchTemplate={"LaunchTemplateName": f"rh-lt-{unique}"},
        AvailabilityZones=["us-east-1a"], NewInstancesProtectedFromScaleIn=True)
    key_file = tmp_path / "app.pem"
    key_file.write_text(generate_app_key()[0])
    for key, value in {
        # GitHub is not called: nothing is retired in these tests.
        "GITHUB_API_URL": "http://127.0.0.1:9", "GITHUB_APP_ID": "4713",
        "GITHUB_APP_KEY_FILE": str(key_file), "SCALER_GROUP_PREFIX": prefix,
        "SCALER_POOL_SLOTS": f"{POOL}=2", "SCALER_POOLS": POOL,
    }.items():
        monkeypatch.setenv(f"RUNNERHUB_{key}", value)
    handler.use(None)
    yield {**deployed, "asg": asg, "group": prefix + POOL}
    handler.use(None)


def stream_records(deployed) -> list[dict]:
    arn = deployed["dynamodb"].describe_table(TableName=deployed["names"]["jobs_table"])[
        "Table"]["LatestStreamArn"]
    streams = aws.client("dynamodbstreams", aws.UNLABELLED)
    records = []
    for shard in streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]:
        iterator = streams.get_shard_iterator(StreamArn=arn, ShardId=shard["ShardId"],
                                              ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        records += streams.get_records(ShardIterator=iterator, Limit=1000)["Records"]
    return records


def history_of(deployed) -> DynamoHistory:
    """The history as set-up code reads it (not a deployable's calls)."""
    return DynamoHistory(aws.client("dynamodb", aws.UNLABELLED),
                         deployed["names"]["history_table"])


def test_the_jobs_stream_becomes_history_once_however_often_it_is_delivered(scaler_env):
    jobs = DynamoJobStore(scaler_env["dynamodb"], scaler_env["names"]["jobs_table"])
    now = time.time()
    for job_id in (11, 12):
        jobs.apply(job_id, m.RECEIVE, now - 100, Change(facts={"pool": POOL}))
    jobs.apply(11, m.START_JOB, now - 80)
    jobs.apply(11, m.COMPLETE, now - 20)
    records = stream_records(scaler_env)

    first = chalice_app.scale({"Records": records}, None)
    assert first["history"] == {"written": 3, "duplicates": 0, "failed": 0, "unusable": 0}
    (bucket,) = history_of(scaler_env).buckets(POOL, 0, int(now) + BUCKET_S)
    assert (bucket.bucket, bucket.arrivals, bucket.runner_s) == (
        bucket_of(now - 100), 2, pytest.approx(60.0))
    assert bucket.durations == (pytest.approx(60.0),)  # the trainer's spread kernel's input
    # Lambda delivers a batch again after a failure: nothing is counted twice.
    again = chalice_app.scale({"Records": records}, None)
    assert again["history"]["written"] == 0 and again["history"]["duplicates"] == 3
    assert history_of(scaler_env).buckets(POOL, 0, int(now) + BUCKET_S) == [bucket]
    calls = {(c["action"], c.get("table")) for c in _recorded(aws.SCALER)}
    assert ("dynamodb:UpdateItem", scaler_env["names"]["history_table"]) in calls


def test_the_scaler_provisions_for_the_forecast_floor_before_demand(scaler_env):
    now = time.time()
    # The trainer's floor: 3 hosts in every bucket of the next day.
    history_of(scaler_env).put_forecast(ForecastItem(
        POOL, bucket_of(now) - BUCKET_S, (1800.0,) * HORIZON, trained_at=now - 3600,
        floor_hosts=(3,) * HORIZON, skill=0.5))
    summary = chalice_app.scale({"detail-type": "Scheduled Event", "source": "aws.events"},
                                None)
    (run,) = summary["runs"]
    assert run["errors"] == [] and run["desired_set"] == 3
    assert run["decision"]["backlog"] == 0 and run["decision"]["target"] == 3
    group = scaler_env["asg"].describe_auto_scaling_groups(
        AutoScalingGroupNames=[scaler_env["group"]])["AutoScalingGroups"][0]
    assert group["DesiredCapacity"] == 3
    calls = {(c["action"], c.get("table")) for c in _recorded(aws.SCALER)}
    assert ("dynamodb:GetItem", scaler_env["names"]["history_table"]) in calls


@pytest.fixture
def trainer_env(deployed, monkeypatch):
    bucket = f"rh-{deployed['unique']}-models"
    aws.client("s3", aws.UNLABELLED).create_bucket(Bucket=bucket)
    monkeypatch.setenv("RUNNERHUB_MODELS_BUCKET", bucket)
    trainer.use(None)
    yield {**deployed, "bucket": bucket}
    trainer.use(None)


def test_the_trainer_fits_the_history_and_writes_the_model_and_forecast(trainer_env):
    """Fifteen days of a daily peak (12 runners 09:00-10:00 UTC, 1 otherwise, +-30 %) for
    `linux`; `quiet` has none (skipped, not failed). The pattern passes the skill gate: the
    item carries the floor, 4-slot hosts (RUNNERHUB_SLOTS' default) up to `max_runners` 8."""
    from forecast.model import Forecaster

    now = time.time()
    end = bucket_of(now)
    rng = random.Random(7)
    events = []
    for n in range(15 * DAY_BUCKETS):  # up to the current bucket
        at = end - 15 * DAY + n * BUCKET_S
        runners = 12 if 9 * 3600 <= at % DAY < 10 * 3600 else 1
        events.append(Event(POOL, at, n + 1, Kind.COMPLETION,
                            round(runners * BUCKET_S * rng.uniform(0.7, 1.3), 1)))
    seed(trainer_env, events)

    result = trainer.handler({"detail-type": "Scheduled Event", "source": "aws.events"}, None)
    assert result["failed"] == 0, result
    assert [(p["pool"], p["status"]) for p in result["pools"]] == [
        (POOL, "trained"), (QUIET, "skipped")]
    item = history_of(trainer_env).forecast(POOL)
    # 48 h stored: a failed run tomorrow leaves this run's second day in force.
    assert item.start == end and len(item.upper) == STORED_HORIZON
    assert len(item.floor_hosts) == len(item.warm) == STORED_HORIZON
    assert abs(item.trained_at - now) < 120
    # The peak of the next 24 h is learnt; a night bucket stays low.
    peak = [item.upper[i] for i in range(HORIZON)
            if 9 * 3600 + 600 <= (end + i * BUCKET_S) % DAY < 10 * 3600 - 600]
    night = [item.upper[i] for i in range(HORIZON)
             if 2 * 3600 <= (end + i * BUCKET_S) % DAY < 4 * 3600]
    assert min(peak) >= 9 * BUCKET_S and max(night) <= 3 * BUCKET_S
    (trained, _) = result["pools"]
    assert trained["skill"] >= 0.2 and trained["no_floor"] == "" == item.no_floor
    # 12 runners need 3 hosts of 4 slots: capped at the 2 that max_runners 8 fill.
    floor_at = {end + i * BUCKET_S: h for i, h in enumerate(item.floor_hosts)}
    assert {h for at, h in floor_at.items()
            if 9 * 3600 + 600 <= at % DAY < 10 * 3600 - 600} == {2}
    assert {h for at, h in floor_at.items() if 2 * 3600 <= at % DAY < 4 * 3600} == {1}
    blob = aws.client("s3", aws.UNLABELLED).get_object(
        Bucket=trainer_env["bucket"], Key=item.model_key)["Body"].read()
    assert Forecaster.loads(blob).predict(end, 1).upper
    assert history_of(trainer_env).forecast(QUIET) is None
    calls = {c["action"] for c in _recorded(trainer.TRAINER)}
    assert {"dynamodb:Query", "dynamodb:PutItem", "s3:PutObject"} <= calls


def test_bad_history_fails_its_pool_alone_and_keeps_the_previous_forecast(trainer_env):
    now = time.time()
    end = bucket_of(now)
    history = history_of(trainer_env)
    previous = ForecastItem(POOL, end - DAY, (300.0,) * HORIZON, trained_at=round(now) - DAY)
    history.put_forecast(previous)
    # Runner-seconds below zero (a clock gone backwards, a hand edit): the fit refuses them.
    seed(trainer_env, [Event(POOL, end - (n + 1) * BUCKET_S, n + 1, Kind.COMPLETION,
                             -5.0 if n == 3 else 60.0) for n in range(DAY_BUCKETS + 2)])
    failed_before = len(_emitted("TrainerPoolFailed"))

    result = trainer.handler({"pools": [POOL]}, None)
    (pool,) = result["pools"]
    assert (pool["status"], result["failed"]) == ("failed", 1)
    assert "runner_s must be finite and >= 0" in pool["error"]
    assert history.forecast(POOL) == previous
    assert len(_emitted("TrainerPoolFailed")) == failed_before + 1
    assert _emitted("TrainerRuns")
    with pytest.raises(ValueError, match="unknown pools"):
        trainer.handler({"pools": ["nope"]}, None)


def seed(deployed, events: list[Event]) -> None:
    """History items put in batches by set-up code (one bucket an event): the stream's
    conditional adds would take a minute for days of buckets on moto."""
    client = aws.client("dynamodb", aws.UNLABELLED)
    items = [{"PutRequest": {"Item": {
        "pool": {"S": e.pool}, "bucket": {"N": str(e.bucket)}, "arrivals": {"N": "1"},
        "runner_s": {"N": str(e.runner_s)}}}} for e in events]
    for start in range(0, len(items), 25):  # BatchWriteItem takes 25 at most
        left = {deployed["names"]["history_table"]: items[start:start + 25]}
        for _ in range(10):
            left = client.batch_write_item(RequestItems=left).get("UnprocessedItems")
            if not left:
                break
        assert not left, "moto left items unprocessed"


def _recorded(deployable: str) -> list[dict]:
    from tests.conftest import recording

    return [c for c in recording("RUNNERHUB_AWS_CALL_LOG") if c["deployable"] == deployable]


def _emitted(name: str) -> list[float]:
    from tests.conftest import recording

    values = []
    for blob in recording("RUNNERHUB_EMF_LOG"):
        if name in blob and blob.get("service") == "trainer":
            value = blob[name]
            values += value if isinstance(value, list) else [value]
    return values
