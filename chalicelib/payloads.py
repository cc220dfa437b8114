"""Webhook payloads, validated at the edge with pydantic.

Only the fields RunnerHub reads are modelled; the rest of GitHub's payload is ignored, so a new
field never breaks us. Conclusions stay an open string: GitHub sends values (`timed_out`,
`neutral`, `action_required`) that the published schemas omit.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chalicelib.errors import validation_summary

_MODEL = ConfigDict(frozen=True, extra="ignore")


class Account(BaseModel):
    model_config = _MODEL
    login: str = Field(min_length=1)


class Repository(BaseModel):
    model_config = _MODEL
    id: int
    name: str = Field(min_length=1)
    full_name: str = Field(min_length=3)
    private: bool
    owner: Account


class Installation(BaseModel):
    model_config = _MODEL
    id: int


class WorkflowJob(BaseModel):
    model_config = _MODEL
    id: int = Field(gt=0)
    run_id: int
    run_attempt: int = 1
    name: str
    workflow_name: str | None = None
    head_branch: str | None = None
    html_url: str
    status: str = Field(min_length=1)
    conclusion: str | None = None
    labels: list[str]
    runner_id: int | None = None
    runner_name: str | None = None
    runner_group_id: int | None = None
    created_at: str
    started_at: str
    completed_at: str | None = None


class WorkflowJobEvent(BaseModel):
    model_config = _MODEL
    action: str = Field(min_length=1)
    workflow_job: WorkflowJob
    repository: Repository
    installation: Installation | None = None
    organization: Account | None = None

    @property
    def waits_for_approval(self) -> bool:
        """GitHub holds the job for an environment approval: no demand yet."""
        return self.action == "waiting" or (
            self.action == "queued" and self.workflow_job.status == "waiting"
        )


class PingEvent(BaseModel):
    model_config = _MODEL
    zen: str | None = None
    hook_id: int | None = None


def describe(error: ValidationError, limit: int = 3) -> str:
    """A short, secret-free reason for a 400: the failing fields and why."""
    return validation_summary(error, "body", limit)
