"""A runner GitHub refuses for its version, and the image the executor starts (issue 19):
the log line recognised, the refusal counted and its job re-demanded; every start, job or warm,
with the pool's image override; the emulator's minimum-version fault."""

from __future__ import annotations

import pytest

from chalicelib.memory import InMemoryHostStore, InMemoryJobStore, InMemoryRunnerStore
from chalicelib.overrides import MemoryOverrideStore, OverridesReader
from chalicelib.warm_targets import WarmTargets
from emulator.faults import FaultsConfig, RunnerFaults, runner_version
from executor.runner_version import rejected_version
from tests.unit.test_executor import (
    JOB,
    POOLS,
    SMALL,
    Clock,
    FakeConsumer,
    FakeContainers,
    FakeGitHub,
    message,
    receive_job,
    received,
)

NEW_IMAGE = "runnerhub/runner-linux-small:2.330.0"
REFUSED_LOG = ("standin-runner: Current runner version: '2.200.0'\n"
               "standin-runner: error: An error occurred: Runner version v2.200.0 is "
               "deprecated and cannot receive messages.\n"
               "standin-runner: error: Runner listener exit with terminated error, stop the "
               "service, no retry needed.\n")


@pytest.mark.parametrize("log, version", [
    (REFUSED_LOG, "2.200.0"),
    # The real runner's wordings (actions/runner#3658, #3381).
    ("An error occured: Runner version v2.310.0 is deprecated and cannot receive messages.",
     "2.310.0"),
    ("An error occurred: Error: Forbidden Runner version v2.316.0 is deprecated and cannot "
     "receive messages.", "2.316.0"),
    ("standin-runner: error: registration refused (401): invalid JIT config", None),
    ("", None),
])
def test_the_refusal_is_read_from_the_runners_log(log, version):
    assert rejected_version(log) == version


def executor_with(overrides: MemoryOverrideStore, containers: FakeContainers):
    from executor.daemon import Executor
    from executor.metrics import ExecutorMetrics
    from executor.settings import ExecutorSettings
    from tests.unit.test_executor import InMemoryClaimIndex, InMemoryDemandQueue

    jobs = InMemoryJobStore()
    receive_job(jobs)
    return Executor(
        ExecutorSettings(host_id="h1", slots=2, start_backoff_s=5), POOLS.pools, jobs=jobs,
        runners=InMemoryRunnerStore(), hosts=InMemoryHostStore(),
        claims=InMemoryClaimIndex(jobs), consumer=FakeConsumer(),
        demand=InMemoryDemandQueue(), github=FakeGitHub(), containers=containers,
        metrics=ExecutorMetrics(), clock=Clock(),
        warm_targets=WarmTargets(overrides=OverridesReader(overrides, refresh_s=0.0)))


@pytest.fixture
def world(monkeypatch):
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_ID", "1")
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_KEY_FILE", "/dev/null")
    overrides = MemoryOverrideStore()
    return executor_with(overrides, FakeContainers()), overrides


def test_job_and_warm_runners_start_with_the_image_override(world):
    executor, overrides = world
    assert executor.server.handle(received(message().model_dump_json())) is True
    (first,) = executor.ctx.containers.started
    assert first.image == SMALL.image  # no override: the pools file's
    overrides.set(SMALL.name, {"image": NEW_IMAGE}, "admin", 1.0)
    assert executor.launcher.start_warm(SMALL, 2, "rh-warm-linux-small-1") == "started"
    warm = executor.ctx.containers.started[-1]
    assert warm.image == NEW_IMAGE
    assert executor.ctx.runners.get("rh-warm-linux-small-1").image == NEW_IMAGE


def test_a_refused_version_is_counted_and_its_job_re_demanded(world):
    executor, _ = world
    assert executor.server.handle(received(message().model_dump_json())) is True
    (spec,) = executor.ctx.containers.started
    containers = executor.ctx.containers
    containers.status[spec.name], containers.exit_codes[spec.name] = "exited", 1
    containers.logs[spec.name] = REFUSED_LOG
    executor._tick()
    metrics = executor.ctx.metrics
    assert metrics.value("runnerhub_runner_version_rejected_total", pool=SMALL.name) == 1
    assert metrics.value("runnerhub_runner_start_failures_total", pool=SMALL.name,
                         stage="runner_version") == 1
    job = executor.ctx.jobs.get(JOB)
    # No job lost: the next generation is demanded (after the start-failure backoff).
    assert job.state in ("received", "dispatched") and job.demand_generation == 2
    assert "runner version 2.200.0" in job.last_start_error
    assert spec.name in containers.removed


def test_another_failure_is_not_counted_as_a_refused_version(world):
    executor, _ = world
    assert executor.server.handle(received(message().model_dump_json())) is True
    (spec,) = executor.ctx.containers.started
    containers = executor.ctx.containers
    containers.status[spec.name], containers.exit_codes[spec.name] = "exited", 2
    containers.logs[spec.name] = "standin-runner: error: registration refused (401): no"
    executor._tick()
    metrics = executor.ctx.metrics
    assert metrics.value("runnerhub_runner_version_rejected_total", pool=SMALL.name) == 0
    assert metrics.value("runnerhub_runner_start_failures_total", pool=SMALL.name,
                         stage="runner") == 1


def test_the_emulators_minimum_version_fault():
    faults = RunnerFaults(min_version="v2.320.0")
    assert faults.min_version == "2.320.0"
    assert faults.refuses("2.200.0") and faults.refuses("2.319.9")
    assert not faults.refuses("2.320.0") and not faults.refuses("2.330.0")
    assert not faults.refuses(None)  # a runner that reports none is served
    assert not RunnerFaults().refuses("0.0.1")  # no minimum: every version
    assert runner_version("2.99.0") < runner_version("2.100.0")  # numbers, not text
    with pytest.raises(ValueError, match=r"MAJOR\.MINOR\.PATCH"):
        FaultsConfig.model_validate({"runners": {"min_version": "latest"}})
