"""What the daemon asks GitHub about runners and jobs, and the one way it deregisters a runner:
GitHub refusing (the runner is busy) or failing is an answer, logged, never an exception."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger

from chalicelib.errors import DependencyUnavailable
from chalicelib.github import GitHubError, RunnerScope
from chalicelib.jobs import JobRecord
from chalicelib.pools import Pool
from chalicelib.runners import RunnerRecord, RunnerState
from executor import recovery
from executor.context import Context

logger = Logger(service="runnerhub-executor")


def runner_scope(pool: Pool, repository: str) -> RunnerScope:
    owner, _, repo = repository.partition("/")
    return RunnerScope("org", owner) if pool.runner_scope == "org" else RunnerScope(
        "repo", owner, repo)


def record_scope(record: RunnerRecord) -> RunnerScope | None:
    """The scope a runner was registered in, as its record says (None for older records)."""
    level, repository = record.scope_level, record.repository
    if level not in ("org", "repo") or not repository:
        return None
    owner, _, repo = repository.partition("/")
    return RunnerScope(level, owner, repo if level == "repo" else None)


class GitHubRunners:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._github = ctx.github

    def delete(self, installation: int, scope: RunnerScope, runner_id: int, name: str,
               log: dict | None = None) -> bool | None:
        """Deregister a runner: True when gone, False when GitHub refused (it is busy), None
        when GitHub could not be asked (logged)."""
        try:
            return self._github.delete_runner(installation, scope, runner_id)
        except GitHubError as exc:
            logger.warning("could not deregister runner %s: %s", name, exc,
                           extra=(log or {}) | {"runner": name})
            return None

    def find(self, name: str, installation: int, scope: RunnerScope,
             runner_id: int | None, log: dict) -> Any:
        """GitHub's record of a runner (by id, else by name), None when GitHub has none, or
        `recovery.UNKNOWN` when GitHub can't be asked."""
        if not installation:
            return recovery.UNKNOWN
        try:
            if runner_id is None:
                return next((r for r in self._list(installation, scope)
                             if r.get("name") == name), None)
            return self._github.get_runner(installation, scope, runner_id)
        except (GitHubError, DependencyUnavailable) as exc:
            logger.warning("could not ask GitHub about runner %s: %s", name, exc, extra=log)
            return recovery.UNKNOWN

    def job_queued(self, job: JobRecord) -> bool | None:
        """GitHub's view: True while the job is queued; None when GitHub can't be asked."""
        repository = job.repository or ""
        owner, _, repo = repository.partition("/")
        try:
            installation = job.installation_id or self._github.installation_for(
                owner, repo or None)
            answer = self._github.get_job(int(installation), repository, job.job_id)
        except (GitHubError, DependencyUnavailable, ValueError) as exc:
            logger.warning("could not ask GitHub about job %s: %s", job.job_id, exc,
                           extra={"job_id": job.job_id, "pool": job.pool})
            return None
        return answer.get("status") == "queued"

    def deregister_record(self, record: RunnerRecord, reason: str) -> bool:
        """A runner of a dead host (or one with no container): remove it from GitHub (GitHub
        refuses a busy one and ends its job itself) and record it gone."""
        name = record.runner_name
        pools = self._ctx.pools
        scope = record_scope(record)
        if scope is None and record.pool in pools and record.repository:
            scope = runner_scope(pools[record.pool], record.repository)
        installation = record.installation_id
        log = {"runner": name, "job_id": record.job_id, "pool": record.pool}
        if scope is not None and installation is not None:
            try:
                runner_id = record.runner_id
                if runner_id is None:  # registered, but its id was never recorded
                    runner_id = next((r["id"] for r in self._list(int(installation), scope)
                                      if r.get("name") == name), None)
            except GitHubError as exc:
                logger.warning("could not deregister runner %s: %s", name, exc, extra=log)
                return False
            if runner_id is not None and self.delete(int(installation), scope, int(runner_id),
                                                     name, log) is None:
                return False
        self._ctx.runners.move(name, RunnerState.GONE, self._ctx.clock(), reason=reason[:300])
        return True

    def _list(self, installation: int | None, scope: RunnerScope) -> list[dict]:
        # One client interface for one App or several (each resolves its own installation).
        if not installation:
            installation = self._github.installation_for(scope.owner, scope.repo)
        return self._github.list_runners(int(installation), scope)
