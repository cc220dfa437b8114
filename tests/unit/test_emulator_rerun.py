"""GitHub's "re-run a job" on the emulator's State alone: a new job of the same run, one attempt
later, queued at once; refused (403) while the run still runs or for a job already re-run."""

from __future__ import annotations

import pytest

from emulator.errors import Forbidden, NotFound
from tests.unit.test_emulator_state import (  # noqa: F401 - fixtures
    emitted,
    online_runner,
    queued_job,
    state,
    take,
)


def test_rerun_of_a_completed_job_queues_a_new_attempt_of_the_same_run(state, emitted):  # noqa: F811
    job_id = queued_job(state, duration_s=5.0, planned_conclusion="success")
    state.cancel(job_id)
    again = state.rerun(job_id)
    first, second = state.job_record(job_id), state.job_record(again.id)
    assert again.id != job_id and second["run_id"] == first["run_id"]
    assert (second["run_attempt"], second["rerun_of"], second["status"]) == (2, job_id, "queued")
    assert first["rerun_by"] == again.id and first["conclusion"] == "cancelled"
    assert second["labels"] == first["labels"] and second["planned_conclusion"] == "success"
    assert emitted.for_job(again.id) == [("queued", "queued")]
    session = online_runner(state)
    assert take(state, session) == again.id  # GitHub hands it to a runner like any job


def test_rerun_while_the_job_runs_is_403(state):  # noqa: F811
    job_id = queued_job(state, duration_s=60.0)
    with pytest.raises(Forbidden, match="already running"):
        state.rerun(job_id)  # queued
    assert take(state, online_runner(state)) == job_id
    with pytest.raises(Forbidden, match="already running"):
        state.rerun(job_id)  # in progress


def test_rerun_while_another_job_of_the_run_runs_is_403(state):  # noqa: F811
    done = state.add_job(None, 42, repository="octo-org/app", labels=["nobody"], private=True,
                         duration_s=0.0, planned_conclusion="success").id
    other = state.add_job(None, 42, repository="octo-org/app", labels=["nobody"], private=True,
                          duration_s=0.0, planned_conclusion="success").id
    state.arrive(done)
    state.arrive(other)  # still queued: the run is running
    state.cancel(done)
    with pytest.raises(Forbidden, match="already running"):
        state.rerun(done)


def test_a_job_already_rerun_is_not_rerun_again(state):  # noqa: F811
    job_id = queued_job(state, labels=("nobody",))
    state.cancel(job_id)
    again = state.rerun(job_id)
    state.cancel(again.id)
    with pytest.raises(Forbidden, match="re-run already"):
        state.rerun(job_id)
    assert state.rerun(again.id).run_attempt == 3  # the latest attempt can be re-run


def test_rerun_of_an_unknown_job_is_404(state):  # noqa: F811
    with pytest.raises(NotFound):
        state.rerun(123)


def test_runs_show_the_latest_attempt_only(state):  # noqa: F811
    job_id = queued_job(state, repository="octo-org/app", labels=("nobody",))
    state.cancel(job_id)
    again = state.rerun(job_id)
    (run,) = state.workflow_runs("octo-org/app")
    assert (run["run_attempt"], run["status"]) == (2, "queued")
    assert [job["job_id"] for job in run["jobs"]] == [again.id]
