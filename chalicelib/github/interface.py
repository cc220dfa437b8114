"""What the GitHub clients share: the error, the value types, and the one client interface
that the single-App (`GitHubApp`) and the several-App (`GitHubApps`) clients both implement."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from pydantic import SecretStr

from chalicelib.errors import RunnerHubError


class GitHubError(RunnerHubError):
    """GitHub answered with an error status (never carries tokens or JIT configs)."""

    def __init__(self, status: int, method: str, path: str, message: str) -> None:
        super().__init__(f"GitHub {method} {path}: {status} {message}")
        self.status = status


@dataclass(frozen=True)
class RunnerScope:
    """Where runners are registered: an organisation, or one repository."""

    level: Literal["org", "repo"]
    owner: str
    repo: str | None = None

    @property
    def path(self) -> str:
        if self.level == "org":
            return f"/orgs/{self.owner}/actions/runners"
        return f"/repos/{self.owner}/{self.repo}/actions/runners"


@dataclass(frozen=True)
class JitRunner:
    runner_id: int
    name: str
    encoded_jit_config: SecretStr = field(repr=False)


@dataclass(frozen=True)
class DeliveryPage:
    """One page of `GET /app/hook/deliveries` (GitHub's summaries, newest first)."""

    deliveries: tuple[dict, ...]
    next_cursor: str | None


@dataclass(frozen=True)
class ListPage:
    """One page of a `page`/`per_page` list endpoint: its items, the `total_count` GitHub gave,
    and the number of the next page (from the Link header), or None on the last page."""

    items: tuple[dict, ...]
    total_count: int | None
    next_page: int | None


@runtime_checkable
class GitHubClient(Protocol):
    """The calls the executor and the reconciler make about runners and jobs, whichever App (or
    Apps) make them. `installation_id` is the installation a job or scope was recorded with;
    a several-App client resolves each App's own."""

    def installation_for(self, owner: str, repo: str | None = None) -> int: ...

    def generate_jitconfig(
        self,
        installation_id: int,
        scope: RunnerScope,
        name: str,
        labels: list[str] | tuple[str, ...],
        runner_group_id: int,
        work_folder: str = "_work",
    ) -> JitRunner: ...

    def get_runner(self, installation_id: int, scope: RunnerScope, runner_id: int
                   ) -> dict | None: ...

    def list_runners(self, installation_id: int, scope: RunnerScope) -> list[dict]: ...

    def delete_runner(self, installation_id: int, scope: RunnerScope, runner_id: int) -> bool: ...

    def get_job(self, installation_id: int, repository: str, job_id: int) -> dict: ...

    def rerun_job(self, installation_id: int, repository: str, job_id: int) -> None: ...
