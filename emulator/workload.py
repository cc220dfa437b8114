"""The workload file: which jobs arrive when, how long they run, how they end (see
docs/emulator.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from .faults import FaultsConfig

# Conclusions GitHub reports for a job. The octokit fixture schemas list only the first four.
Conclusion = Literal[
    "success", "failure", "cancelled", "skipped", "neutral", "timed_out", "action_required"
]
REPOSITORY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9-]*/[A-Za-z0-9._-]+$"
MAX_LABELS = 100
# One history request's jobs at most (a bigger history is several requests).
MAX_HISTORY_JOBS = 100_000


class WorkloadJob(BaseModel):
    """One job of a workload. Times are seconds from the workload's start."""

    model_config = ConfigDict(extra="forbid")

    id: int | None = Field(None, gt=0)
    run_id: int | None = Field(None, gt=0)
    repository: str = Field(pattern=REPOSITORY_PATTERN)
    private: bool = True
    labels: list[str] = Field(min_length=1, max_length=MAX_LABELS)
    arrival_s: float = Field(0.0, ge=0)
    duration_s: float = Field(1.0, ge=0)
    conclusion: Conclusion = "success"
    # A planted fault for judges' self-tests: the runner reports this instead of `conclusion`.
    runner_reports: Conclusion | None = None
    cancel_at_s: float | None = Field(None, ge=0)
    # Set: the job needs an environment approval, granted this long after arrival.
    environment_wait_s: float | None = Field(None, ge=0)
    environment: str = "production"
    # GitHub announces a job held for approval either as action `waiting` or as action
    # `queued` with status `waiting`; both happen.
    waiting_action: Literal["waiting", "queued"] = "waiting"
    name: str = "build"
    workflow_name: str = "CI"
    head_branch: str = "main"

    @model_validator(mode="after")
    def _check(self) -> WorkloadJob:
        if any(not label.strip() for label in self.labels):
            raise ValueError("labels must be non-empty strings")
        if self.cancel_at_s is not None and self.cancel_at_s < self.arrival_s:
            raise ValueError("cancel_at_s must not be before arrival_s")
        return self


class Workload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    description: str | None = None
    # The fault profile this workload runs under (see docs/emulator.md); None: unchanged.
    faults: FaultsConfig | None = None
    jobs: list[WorkloadJob] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_ids(self) -> Workload:
        ids = [j.id for j in self.jobs if j.id is not None]
        if len(ids) != len(set(ids)):
            raise ValueError("job ids must be unique")
        return self


class HistoryJob(BaseModel):
    """A job that ran in the past: it appears in the REST listings (workflow runs, their jobs)
    with these times, and sends no webhook. Times are ISO 8601 with a zone, or epoch seconds."""

    model_config = ConfigDict(extra="forbid")

    id: int | None = Field(None, gt=0)
    run_id: int | None = Field(None, gt=0)
    repository: str = Field(pattern=REPOSITORY_PATTERN)
    private: bool = True
    labels: list[str] = Field(min_length=1, max_length=MAX_LABELS)
    created_at: AwareDatetime
    started_at: AwareDatetime
    completed_at: AwareDatetime
    conclusion: Conclusion = "success"
    name: str = "build"
    workflow_name: str = "CI"
    head_branch: str = "main"

    @model_validator(mode="after")
    def _check(self) -> HistoryJob:
        if any(not label.strip() for label in self.labels):
            raise ValueError("labels must be non-empty strings")
        if not self.created_at <= self.started_at <= self.completed_at:
            raise ValueError("times must satisfy created_at <= started_at <= completed_at")
        return self


class History(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: list[HistoryJob] = Field(max_length=MAX_HISTORY_JOBS)

    @model_validator(mode="after")
    def _unique_ids(self) -> History:
        ids = [j.id for j in self.jobs if j.id is not None]
        if len(ids) != len(set(ids)):
            raise ValueError("job ids must be unique")
        return self


def load_workload(source: str | Path | dict | Workload) -> Workload:
    """A Workload from a model, a dict, or a path to a JSON file."""
    if isinstance(source, Workload):
        return source
    if isinstance(source, dict):
        return Workload.model_validate(source)
    return Workload.model_validate(json.loads(Path(source).read_text()))
