"""Several GitHub Apps as one: demand is spread over the Apps, an App near a limit is skipped
until its reset, and each App's remaining budget is a metric.

Each App has its own rate limits (primary per installation, secondary per App), so N Apps
installed on the same organisation register runners at up to N times one App's rate.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable

from chalicelib.github.budget import Headroom
from chalicelib.github.client import GitHubApp
from chalicelib.github.interface import JitRunner, RunnerScope

# An App with less than this share of a limit left is skipped while another has more.
NEAR_LIMIT_SHARE = 0.1


# How often the budget observer hears of every App's headroom (a metric, not a control loop).
REPORT_EVERY_S = 30.0


class GitHubApps:
    """A GitHubClient over several Apps: JIT configs spread over the Apps, each runner managed
    by the App that made it; look-ups (runners, jobs) through the first App."""

    def __init__(
        self,
        apps: Iterable[GitHubApp],
        observer: Callable[[dict[int, Headroom]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.apps = tuple(apps)
        self._observer = observer
        self._clock = clock
        self._reported_at = -REPORT_EVERY_S
        if not self.apps:
            raise ValueError("at least one GitHub App is required")
        self._by_id = {app.app_id: app for app in self.apps}
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._creator: dict[int, GitHubApp] = {}

    def by_id(self, app_id: int) -> GitHubApp:
        return self._by_id[app_id]

    def pick(self) -> GitHubApp:
        """The App to use next: round-robin over Apps with headroom; when every App is near a
        limit, the one with the most left (its budget then paces the call)."""
        self._report()
        if len(self.apps) == 1:
            return self.apps[0]
        with self._lock:
            start = next(self._turn)
        rooms = [(app, app.budget.headroom()) for app in self.apps]
        for offset in range(len(rooms)):
            app, room = rooms[(start + offset) % len(rooms)]
            if room.share > NEAR_LIMIT_SHARE:
                return app
        return max(rooms, key=lambda pair: (pair[1].share, -pair[1].blocked_for_s))[0]

    def headroom(self) -> dict[int, Headroom]:
        return {app.app_id: app.budget.headroom() for app in self.apps}

    def _report(self) -> None:
        now = self._clock()
        if self._observer is None or now - self._reported_at < REPORT_EVERY_S:
            return
        self._reported_at = now
        self._observer(self.headroom())

    # --- the calls the executor makes, spread over the Apps ---
    # Installation ids differ per App, so with several Apps each call resolves the chosen App's
    # own installation for the scope's owner (cached by the App).

    def installation_for(self, owner: str, repo: str | None = None) -> int:
        return self.apps[0].installation_for(owner, repo)

    def generate_jitconfig(
        self,
        installation_id: int,
        scope: RunnerScope,
        name: str,
        labels: list[str] | tuple[str, ...],
        runner_group_id: int,
        work_folder: str = "_work",
    ) -> JitRunner:
        app = self.pick()
        jit = app.generate_jitconfig(self._installation(app, installation_id, scope), scope,
                                     name, labels, runner_group_id, work_folder)
        with self._lock:
            self._creator[jit.runner_id] = app
        return jit

    def delete_runner(self, installation_id: int, scope: RunnerScope, runner_id: int) -> bool:
        app = self._app_of(runner_id)
        deleted = app.delete_runner(self._installation(app, installation_id, scope), scope,
                                    runner_id)
        if deleted:
            with self._lock:
                self._creator.pop(runner_id, None)
        return deleted

    def get_runner(self, installation_id: int, scope: RunnerScope, runner_id: int
                   ) -> dict | None:
        app = self._app_of(runner_id)
        return app.get_runner(self._installation(app, installation_id, scope), scope, runner_id)

    # --- look-ups: the first App, through its own installation for the owner ---

    def list_runners(self, installation_id: int, scope: RunnerScope) -> list[dict]:
        app = self.apps[0]
        return app.list_runners(self._installation(app, installation_id, scope), scope)

    def get_job(self, installation_id: int, repository: str, job_id: int) -> dict:
        app = self.apps[0]
        owner, _, repo = repository.partition("/")
        installation = (installation_id if len(self.apps) == 1
                        else app.installation_for(owner, repo or None))
        return app.get_job(installation, repository, job_id)

    def rerun_job(self, installation_id: int, repository: str, job_id: int) -> None:
        app = self.apps[0]
        owner, _, repo = repository.partition("/")
        installation = (installation_id if len(self.apps) == 1
                        else app.installation_for(owner, repo or None))
        app.rerun_job(installation, repository, job_id)

    def _app_of(self, runner_id: int) -> GitHubApp:
        with self._lock:
            # Any App installed on the owner may manage its runners; prefer the one that made it.
            return self._creator.get(runner_id, self.apps[0])

    def _installation(self, app: GitHubApp, given: int, scope: RunnerScope) -> int:
        if len(self.apps) == 1:
            return given
        return app.installation_for(scope.owner, scope.repo)
