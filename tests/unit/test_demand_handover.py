"""GitHub picks which runner takes which job: keep every job's demand met, with no extra runner
when a spare one exists (webhook hand-over) and a re-demand when none does."""

from __future__ import annotations

import copy

import pytest

from chalicelib import jobs as m
from chalicelib.jobs import Change
from chalicelib.memory import (
    InMemoryDeliveryLog,
    InMemoryDemandQueue,
    InMemoryJobStore,
    InMemoryRunnerStore,
)
from chalicelib.pools import load_pools
from chalicelib.runners import RunnerState
from chalicelib.secrets import CachedSecrets
from chalicelib.telemetry import Telemetry
from chalicelib.webhook import WebhookRequest, WebhookService
from devstack.webhook_events import delivery_body, delivery_headers
from tests.conftest import TEST_POOLS, example

A, B = 1001, 1002


@pytest.fixture
def world():
    service = WebhookService(
        pools=load_pools(TEST_POOLS), secrets=CachedSecrets(lambda: "s", 60),
        jobs=InMemoryJobStore(), deliveries=InMemoryDeliveryLog(), demand=InMemoryDemandQueue(),
        runners=InMemoryRunnerStore(), telemetry=Telemetry("test", emit=False),
        max_body_bytes=6 * 1024 * 1024,
    )
    return service


def send(service, action, job_id, runner=None):
    payload = copy.deepcopy(example(f"workflow_job.{action}"))
    payload["workflow_job"]["id"] = job_id
    payload["workflow_job"]["runner_name"] = runner
    body = delivery_body(payload)
    result = service.handle(WebhookRequest(delivery_headers(body, b"s"), body))
    assert result.status == 200, result.body
    return result.body


def start_runner(service, job_id, name):
    """What an executor does: claim, start a runner, record it."""
    jobs, runners = service._jobs, service._runners
    assert jobs.apply(job_id, m.CLAIM, 1.0, Change(fields={"host_id": "h"}), generation=1).applied
    runners.move(name, RunnerState.STARTING, 1.0, job_id=job_id, generation=1, host_id="h")
    runners.move(name, RunnerState.IDLE, 1.1)
    assert jobs.apply(job_id, m.START_RUNNER, 1.1, Change(fields={"started_runner": name}),
                      generation=1, host_id="h").applied


def test_runner_taking_another_job_hands_over_the_spare_runner(world):
    send(world, "queued", A)
    send(world, "queued", B)
    start_runner(world, A, "rh-a")
    start_runner(world, B, "rh-b")
    send(world, "in_progress", B, runner="rh-a")  # GitHub gave B to A's runner
    a = world._jobs.get(A)
    assert a.state == "runner_started" and a.started_runner == "rh-b"
    assert a.host_id == "h"  # the spare runner's host holds the claim now
    assert world._runners.get("rh-b").job_id == A
    assert [msg.job_id for msg in world._demand.messages] == [A, B]  # no new demand
    send(world, "in_progress", A, runner="rh-b")
    assert world._jobs.get(A).state == "in_progress"
    assert len(world._demand.messages) == 2
    assert world._telemetry.counts[("DemandHandedOver", "hosted-like")] == 1


def test_runner_taking_a_job_with_no_runner_of_its_own_re_demands_its_job(world):
    send(world, "queued", A)
    send(world, "queued", B)
    start_runner(world, A, "rh-a")
    send(world, "in_progress", B, runner="rh-a")
    a = world._jobs.get(A)
    assert a.state == "dispatched" and a.demand_generation == 2
    assert [(msg.job_id, msg.generation) for msg in world._demand.messages] == [
        (A, 1), (B, 1), (A, 2)]


def test_spare_runner_already_busy_means_re_demand(world):
    send(world, "queued", A)
    send(world, "queued", B)
    start_runner(world, A, "rh-a")
    start_runner(world, B, "rh-b")
    world._runners.move("rh-b", RunnerState.BUSY, 2.0)  # took some third job meanwhile
    send(world, "in_progress", B, runner="rh-a")
    assert world._jobs.get(A).demand_generation == 2


def test_runner_taking_its_own_job_changes_nothing_else(world):
    send(world, "queued", A)
    start_runner(world, A, "rh-a")
    send(world, "in_progress", A, runner="rh-a")
    assert world._runners.get("rh-a").state == "busy"
    assert len(world._demand.messages) == 1


def test_foreign_runner_name_is_ignored(world):
    send(world, "queued", A)
    send(world, "in_progress", A, runner="GitHub Actions 5")
    assert world._runners.get("GitHub Actions 5") is None
    assert world._jobs.get(A).state == "in_progress"


class FlakyRunners(InMemoryRunnerStore):
    """Fails the first `busy` write, as a throttled DynamoDB would."""

    def __init__(self):
        super().__init__()
        self.failures = 1

    def move(self, name, to, now, **fields):
        if to is RunnerState.BUSY and self.failures:
            self.failures -= 1
            from chalicelib.errors import DependencyUnavailable

            raise DependencyUnavailable("dynamodb", "ThrottlingException")
        return super().move(name, to, now, **fields)


def send_raw(service, action, job_id, runner=None, delivery="d"):
    payload = copy.deepcopy(example(f"workflow_job.{action}"))
    payload["workflow_job"]["id"] = job_id
    payload["workflow_job"]["runner_name"] = runner
    body = delivery_body(payload)
    return service.handle(WebhookRequest(delivery_headers(body, b"s", delivery_id=delivery), body))


def test_in_progress_redelivered_after_a_failure_still_re_demands_the_other_job(world):
    world._runners = FlakyRunners()
    send(world, "queued", A)
    send(world, "queued", B)
    start_runner(world, A, "rh-a")
    first = send_raw(world, "in_progress", B, runner="rh-a", delivery="same")
    assert first.status == 503  # the job moved, then the runner write failed
    assert world._jobs.get(B).state == "in_progress"
    again = send_raw(world, "in_progress", B, runner="rh-a", delivery="same")
    assert again.status == 200
    assert world._runners.get("rh-a").state == "busy"
    assert world._jobs.get(A).demand_generation == 2  # A's demand is met again


def test_queued_again_for_a_job_whose_runner_is_gone_re_demands_it(world):
    send(world, "queued", A)
    start_runner(world, A, "rh-a")
    world._runners.move("rh-a", RunnerState.GONE, 3.0, exit_code=137)
    body = send(world, "queued", A)
    assert body["outcome"] == "redemanded"
    assert [(m.job_id, m.generation) for m in world._demand.messages] == [(A, 1), (A, 2)]


def test_queued_again_while_its_runner_lives_changes_nothing(world):
    send(world, "queued", A)
    start_runner(world, A, "rh-a")
    assert send(world, "queued", A)["outcome"] == "no_change"
    assert len(world._demand.messages) == 1
