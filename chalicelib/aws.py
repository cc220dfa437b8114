"""boto3 clients, built lazily (never at import: moto must be active first, and the cold start
pays for boto3 only when a request needs it). boto3 honours AWS_ENDPOINT_URL, so the same code
talks to moto, LocalStack or AWS.

Each deployable has its time-out profile: GitHub gives up on a webhook delivery after 10 s, so
the webhook's calls give up well before that; the executor and the reconciler can wait longer.

With RUNNERHUB_AWS_CALL_LOG=<path> set (the tests set it), every call a client makes is
appended to that file as one JSON line: which deployable made it, the IAM action and the
resource. tests/infra/test_iam_calls.py compares those calls with the synthesized policies.
Unset, nothing is registered (no cost)."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from functools import cache
from typing import Any

CALL_LOG_ENV = "RUNNERHUB_AWS_CALL_LOG"
# Which deployable this process is (the local stack sets it for each child it starts); the
# Lambdas have POWERTOOLS_SERVICE_NAME (runnerhub-webhook, runnerhub-reconciler).
DEPLOYABLE_ENV = "RUNNERHUB_DEPLOYABLE"
WEBHOOK, RECONCILER, EXECUTOR, SCALER = "webhook", "reconciler", "executor", "scaler"
TRAINER = "trainer"  # forecast/trainer.py
API = "api"  # api_app.py, the management API
UNLABELLED = "unlabelled"  # set-up and test code: not a deployable


@dataclass(frozen=True)
class TimeoutProfile:
    connect_s: float
    read_s: float
    attempts: int  # botocore's total_max_attempts: the first try included

    def worst_case_s(self) -> float:
        """Longest one call can take: every attempt times out, plus standard mode's backoff
        (jittered, at most 2^n s before retry n, n from 0)."""
        backoff = sum(2**n for n in range(self.attempts - 1))
        return self.attempts * (self.connect_s + self.read_s) + backoff


# GitHub waits 10 s for a webhook answer; one slow call must leave room for the others and for
# the answer (DynamoDB and SQS answer in milliseconds: 2 s is an outage, not a slow request).
WEBHOOK_PROFILE = TimeoutProfile(connect_s=1, read_s=2, attempts=2)
# The executor and the reconciler: three tries in all. (botocore's `max_attempts` counts the
# retries alone: the `max_attempts: 3` configured before these profiles made four.)
DEFAULT_PROFILE = TimeoutProfile(connect_s=2, read_s=10, attempts=3)
# The scaler: one 60 s Lambda invocation runs every pool (a dozen calls each); a call that
# hangs must fail in time for the other pools and for the run's lease (infra: 70 s, above the
# timeout) to stay its own: 24 s at worst. Its calls (DynamoDB, Auto Scaling, EC2 describes)
# answer in well under a second.
SCALER_PROFILE = TimeoutProfile(connect_s=2, read_s=5, attempts=3)
# The management API: API Gateway stops waiting at 29 s, and a request makes a few calls
# (a pool view: the runners' seats, the group, the hosts): 13.5 s at worst for one.
API_PROFILE = TimeoutProfile(connect_s=1, read_s=2.5, attempts=3)
PROFILES = {WEBHOOK: WEBHOOK_PROFILE, SCALER: SCALER_PROFILE, API: API_PROFILE}


def deployable_of_process() -> str:
    label = os.environ.get(DEPLOYABLE_ENV)
    if label:
        return label
    service = os.environ.get("POWERTOOLS_SERVICE_NAME", "")
    if service.startswith("runnerhub-"):
        return service.removeprefix("runnerhub-")
    return UNLABELLED


@cache
def _config(profile: TimeoutProfile) -> Any:
    from botocore.config import Config

    # botocore's standard retry mode: bounded, jittered retries of throttling and 5xx.
    return Config(
        retries={"mode": "standard", "total_max_attempts": profile.attempts},
        connect_timeout=profile.connect_s,
        read_timeout=profile.read_s,
    )


def client(service: str, deployable: str | None = None) -> Any:
    """A boto3 client. `deployable`: who makes the calls (webhook, reconciler, executor);
    None: this process's (RUNNERHUB_DEPLOYABLE or the Lambda's service name)."""
    import boto3

    label = deployable or deployable_of_process()
    made = boto3.session.Session().client(
        service, config=_config(PROFILES.get(label, DEFAULT_PROFILE))
    )
    path = os.environ.get(CALL_LOG_ENV)
    if path:
        made.meta.events.register(
            f"provide-client-params.{made.meta.service_model.service_name}",
            _CallRecorder(path, label, made.meta.service_model),
        )
    return made


# --- the call recorder (tests) ---

_write_lock = threading.Lock()


class _CallRecorder:
    def __init__(self, path: str, deployable: str, service_model: Any) -> None:
        self._path = path
        self._deployable = deployable
        # The IAM prefix (`dynamodb`, `sqs`, `secretsmanager`) is the signing name.
        self._prefix = service_model.signing_name

    def __call__(self, params: dict, model: Any, **_: Any) -> None:
        lines = "".join(
            json.dumps({"deployable": self._deployable, "action": action, **resource},
                       sort_keys=True) + "\n"
            for action, resource in calls_of(self._prefix, model.name, params)
        )
        # One write with O_APPEND: lines of several processes never interleave.
        with _write_lock, open(self._path, "a", encoding="utf-8") as log:
            log.write(lines)


# IAM authorises each item of a DynamoDB transaction as its own action on its own table.
_TRANSACT_ACTIONS = {"ConditionCheck": "ConditionCheckItem", "Put": "PutItem",
                     "Update": "UpdateItem", "Delete": "DeleteItem", "Get": "GetItem"}


def calls_of(prefix: str, operation: str, params: dict) -> list[tuple[str, dict[str, str]]]:
    """The (IAM action, resource) pairs one API call needs: one pair, or one per table of a
    batch, or one per item of a transaction."""
    if "TransactItems" in params:
        return [(f"{prefix}:{_TRANSACT_ACTIONS[kind]}", {"table": item["TableName"]})
                for entry in params["TransactItems"] for kind, item in entry.items()]
    if "RequestItems" in params:  # BatchGetItem / BatchWriteItem
        return [(f"{prefix}:{operation}", {"table": table})
                for table in sorted(params["RequestItems"])]
    implied = _IMPLIED_RESOURCE.get((prefix, operation))
    if implied:
        return [(f"{prefix}:{operation}", {implied: ""})]
    return [(f"{prefix}:{operation}", resource_of(params))]


# IAM authorises these on a resource their parameters do not name: the Auto Scaling group of
# the instance, the stream of the shard iterator ("" : named by the call's target, not here).
_IMPLIED_RESOURCE = {
    ("autoscaling", "TerminateInstanceInAutoScalingGroup"): "group",
    ("dynamodb", "GetRecords"): "stream",
}


def resource_of(params: dict) -> dict[str, str]:
    """The resource a call names: a table (and index), a queue (by name), a secret, an Auto
    Scaling group, a table's stream."""
    found: dict[str, str] = {}
    if "TableName" in params:
        found["table"] = params["TableName"]
    if "IndexName" in params:
        found["index"] = params["IndexName"]
    if "QueueUrl" in params:
        found["queue"] = params["QueueUrl"].rstrip("/").rsplit("/", 1)[-1]
    if "QueueName" in params:
        found["queue"] = params["QueueName"]
    if "SecretId" in params:
        found["secret"] = params["SecretId"]
    if "AutoScalingGroupName" in params:
        found["group"] = params["AutoScalingGroupName"]
    if "StreamArn" in params:
        found["stream"] = params["StreamArn"]
    if "Bucket" in params:  # S3: the trainer's models
        found["bucket"] = params["Bucket"]
    if "repositoryName" in params:  # ECR: a runner image's scan (executor/image_scan.py)
        found["repository"] = params["repositoryName"]
    return found
