"""The GitHub REST calls RunnerHub makes, as a GitHub App (urllib3 + PyJWT).

App JWT (RS256, at most 10 minutes) -> installation token (cached until shortly before it
expires) -> runners, JIT configs and jobs. Works against github.com, GitHub Enterprise Server
(`https://HOST/api/v3`) and the emulator alike: only the base URL differs.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
import urllib3
from pydantic import SecretStr

from chalicelib.github.budget import RateBudget
from chalicelib.github.interface import (
    DeliveryPage,
    GitHubError,
    JitRunner,
    ListPage,
    RunnerScope,
)

GITHUB_API_URL = "https://api.github.com"
API_VERSION = "2022-11-28"
# GitHub refuses App JWTs valid for more than 10 minutes; back-date iat for clock drift.
JWT_LIFETIME_S = 540
JWT_BACKDATE_S = 60
# Renew an installation token this long before GitHub's expiry (tokens last 1 hour).
TOKEN_RENEW_BEFORE_S = 300
MAX_RUNNER_LABELS = 100
# A rate-limit refusal is retried after its wait at most this many times.
RATE_LIMIT_RETRIES = 3
# GitHub's page size limit for list endpoints.
MAX_PER_PAGE = 100


@dataclass
class _Token:
    value: str
    expires_at: float


class GitHubApp:
    """One GitHub App: a GitHubClient, plus the App-level calls (webhook deliveries, hook
    config) and repository listings the reconciler makes."""

    def __init__(
        self,
        app_id: int,
        private_key_pem: str,
        api_url: str = GITHUB_API_URL,
        *,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        pool: urllib3.PoolManager | None = None,
        budget: RateBudget | None = None,
    ) -> None:
        self.app_id = app_id
        self.budget = budget or RateBudget()
        self._key = private_key_pem
        self._api_url = api_url.rstrip("/")
        self._clock = clock
        # Retries cover connection errors and 5xx on idempotent methods only: a POST that
        # reached GitHub must not register a second runner.
        self._http = pool or urllib3.PoolManager(
            num_pools=4,
            maxsize=16,
            timeout=urllib3.Timeout(connect=3.0, read=timeout_s),
            retries=urllib3.Retry(
                total=3, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504),
                raise_on_status=False,
            ),
        )
        self._lock = threading.Lock()
        self._tokens: dict[int, _Token] = {}
        self._installations: dict[str, int] = {}

    # --- auth ---

    def app_jwt(self) -> str:
        now = int(self._clock())
        claims = {"iat": now - JWT_BACKDATE_S, "exp": now + JWT_LIFETIME_S, "iss": str(self.app_id)}
        return jwt.encode(claims, self._key, algorithm="RS256")

    def installation_token(self, installation_id: int) -> str:
        now = self._clock()
        with self._lock:
            cached = self._tokens.get(installation_id)
            if cached and cached.expires_at - TOKEN_RENEW_BEFORE_S > now:
                return cached.value
        answer = self._call(
            "POST", f"/app/installations/{installation_id}/access_tokens", auth=self.app_jwt()
        )
        expires = datetime.fromisoformat(answer["expires_at"].replace("Z", "+00:00")).timestamp()
        with self._lock:
            self._tokens[installation_id] = _Token(answer["token"], expires)
        return answer["token"]

    def installation_for(self, owner: str, repo: str | None = None) -> int:
        """The installation covering an organisation (or a user's repository); cached."""
        key = f"{owner}/{repo or ''}".lower()
        with self._lock:
            if key in self._installations:
                return self._installations[key]
        try:
            answer = self._call("GET", f"/orgs/{owner}/installation", auth=self.app_jwt())
        except GitHubError as exc:
            if exc.status != 404 or repo is None:
                raise
            answer = self._call("GET", f"/repos/{owner}/{repo}/installation", auth=self.app_jwt())
        with self._lock:
            self._installations[key] = int(answer["id"])
        return int(answer["id"])

    # --- runners ---

    def generate_jitconfig(
        self,
        installation_id: int,
        scope: RunnerScope,
        name: str,
        labels: list[str] | tuple[str, ...],
        runner_group_id: int,
        work_folder: str = "_work",
    ) -> JitRunner:
        if not 1 <= len(labels) <= MAX_RUNNER_LABELS:
            raise ValueError(f"a runner takes 1-{MAX_RUNNER_LABELS} labels, got {len(labels)}")
        answer = self._call(
            "POST",
            f"{scope.path}/generate-jitconfig",
            auth=self.installation_token(installation_id), key=str(installation_id),
            body={
                "name": name,
                "runner_group_id": runner_group_id,
                "labels": list(labels),
                "work_folder": work_folder,
            },
        )
        return JitRunner(
            runner_id=int(answer["runner"]["id"]),
            name=answer["runner"]["name"],
            encoded_jit_config=SecretStr(answer["encoded_jit_config"]),
        )

    def get_runner(self, installation_id: int, scope: RunnerScope, runner_id: int) -> dict | None:
        try:
            return self._call(
                "GET", f"{scope.path}/{runner_id}", auth=self.installation_token(installation_id),
                key=str(installation_id),
            )
        except GitHubError as exc:
            if exc.status == 404:
                return None
            raise

    def delete_runner(self, installation_id: int, scope: RunnerScope, runner_id: int) -> bool:
        """True when deleted or already gone; False when GitHub refuses (the runner is busy)."""
        try:
            self._call(
                "DELETE", f"{scope.path}/{runner_id}",
                auth=self.installation_token(installation_id), key=str(installation_id),
            )
        except GitHubError as exc:
            if exc.status == 404:
                return True
            if exc.status == 422:
                return False
            raise
        return True

    def list_runners(self, installation_id: int, scope: RunnerScope) -> list[dict]:
        runners, page = [], 1
        while True:
            answer = self._call(
                "GET", f"{scope.path}?per_page=100&page={page}",
                auth=self.installation_token(installation_id), key=str(installation_id),
            )
            runners.extend(answer.get("runners", []))
            if len(answer.get("runners", [])) < 100:
                return runners
            page += 1

    def get_job(self, installation_id: int, repository: str, job_id: int) -> dict:
        return self._call(
            "GET", f"/repos/{repository}/actions/jobs/{job_id}",
            auth=self.installation_token(installation_id), key=str(installation_id),
        )

    def rerun_job(self, installation_id: int, repository: str, job_id: int) -> None:
        """Re-run a completed job (and the jobs that need it) as a new run attempt: GitHub
        answers 201 and queues a new job. A 403 means the workflow run is still running (or
        the App lacks Actions: write); GitHubError carries the status. Never retried by the
        transport: a POST that reached GitHub must not start a second attempt."""
        self._call(
            "POST", f"/repos/{repository}/actions/jobs/{int(job_id)}/rerun",
            auth=self.installation_token(installation_id), key=str(installation_id),
        )

    # --- what is queued: repositories, their queued workflow runs, the runs' jobs ---

    def list_installation_repositories(
        self, installation_id: int, page: int = 1, per_page: int = MAX_PER_PAGE
    ) -> ListPage:
        """One page of the repositories the installation can see."""
        return self._list_page(installation_id, "/installation/repositories", "repositories",
                               {}, page, per_page)

    def list_queued_runs(
        self, installation_id: int, repository: str, page: int = 1, per_page: int = MAX_PER_PAGE
    ) -> ListPage:
        """One page of a repository's workflow runs whose status is `queued`."""
        return self._list_page(installation_id, f"/repos/{repository}/actions/runs",
                               "workflow_runs", {"status": "queued"}, page, per_page)

    def list_runs(
        self, installation_id: int, repository: str, *, created: str | None = None,
        page: int = 1, per_page: int = MAX_PER_PAGE,
    ) -> ListPage:
        """One page of a repository's workflow runs, newest first; `created` is GitHub's date
        search (`>=2026-01-05`, `A..B`). A search reaches only its first 1,000 runs:
        `total_count` says when to narrow it."""
        query = {"created": created} if created else {}
        return self._list_page(installation_id, f"/repos/{repository}/actions/runs",
                               "workflow_runs", query, page, per_page)

    def list_run_jobs(
        self, installation_id: int, repository: str, run_id: int, page: int = 1,
        per_page: int = MAX_PER_PAGE, *, attempts: Literal["latest", "all"] = "latest",
    ) -> ListPage:
        """One page of the jobs of a workflow run's latest attempt (`attempts="all"`: of every
        attempt, re-run jobs included)."""
        query = {"filter": "all"} if attempts == "all" else {}
        return self._list_page(installation_id,
                               f"/repos/{repository}/actions/runs/{int(run_id)}/jobs", "jobs",
                               query, page, per_page)

    def _list_page(self, installation_id: int, path: str, key: str, query: dict[str, str],
                   page: int, per_page: int) -> ListPage:
        query = {**query, "per_page": str(per_page), "page": str(page)}
        answer, headers = self._get_with_headers(
            f"{path}?{urlencode(query)}", auth=self.installation_token(installation_id),
            key=str(installation_id),
        )
        answer = answer if isinstance(answer, dict) else {}
        items = answer.get(key)
        total = answer.get("total_count")
        return ListPage(
            items=tuple(item for item in items if isinstance(item, dict))
            if isinstance(items, list) else (),
            total_count=int(total) if isinstance(total, int) else None,
            next_page=_next_page(headers.get("link")),
        )

    # --- the App's webhook deliveries (App JWT) ---

    def list_deliveries(
        self, cursor: str | None = None, per_page: int = MAX_PER_PAGE
    ) -> DeliveryPage:
        """One page of the App's webhook deliveries, newest first, and the cursor of the next
        (older) page, or None on the last page."""
        query = {"per_page": str(per_page)}
        if cursor:
            query["cursor"] = cursor
        answer, headers = self._get_with_headers(
            f"/app/hook/deliveries?{urlencode(query)}", auth=self.app_jwt()
        )
        return DeliveryPage(
            deliveries=tuple(answer if isinstance(answer, list) else ()),
            next_cursor=_next_cursor(headers.get("link") or headers.get("Link")),
        )

    def redeliver(self, delivery_id: int) -> bool:
        """Ask GitHub to send a delivery again (same body and guid). False when GitHub no
        longer has it (404: older than its retention)."""
        try:
            self._call(
                "POST", f"/app/hook/deliveries/{int(delivery_id)}/attempts", auth=self.app_jwt()
            )
        except GitHubError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def _get_with_headers(self, path: str, *, auth: str, key: str = "app"
                          ) -> tuple[Any, dict[str, str]]:
        """A GET whose answer headers matter (pagination by Link header)."""
        return self._request("GET", path, auth=auth, key=key)

    # --- the App's webhook ---

    def update_hook_config(self, secret: str) -> None:
        """Set the secret GitHub signs the App's webhook deliveries with (rotation).

        Setting the same secret again is harmless, so a resumed rotation may repeat it. GitHub
        never returns the secret, and GitHubError never carries the request body.
        """
        self._call("PATCH", "/app/hook/config", auth=self.app_jwt(), body={"secret": secret})

    # --- transport ---

    def _call(self, method: str, path: str, *, auth: str, body: dict | None = None,
              key: str = "app") -> Any:
        return self._request(method, path, auth=auth, body=body, key=key)[0]

    def _request(self, method: str, path: str, *, auth: str, body: dict | None = None,
                 key: str = "app") -> tuple[Any, dict[str, str]]:
        """One REST call within the App's budget; a 403/429 rate-limit refusal waits for its
        `retry-after` (or reset) and retries, a few times at most."""
        headers = {
            "Accept": "application/vnd.github+json",
            "Authorization": f"Bearer {auth}",
            "X-GitHub-Api-Version": API_VERSION,
            "User-Agent": "runnerhub",
        }
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        where = path.split("?")[0]
        for _ in range(RATE_LIMIT_RETRIES + 1):
            self.budget.acquire(method, key)
            try:
                response = self._http.request(
                    method, self._api_url + path, body=payload, headers=headers
                )
            except urllib3.exceptions.HTTPError as exc:
                raise GitHubError(0, method, where, type(exc).__name__) from exc
            finally:
                self.budget.release()
            answer_headers = {name.lower(): value for name, value in response.headers.items()}
            if self.budget.observe(response.status, answer_headers, key):
                continue
            if response.status >= 400:
                raise GitHubError(response.status, method, where, _message(response))
            if response.status == 204 or not response.data:
                return {}, answer_headers
            return json.loads(response.data), answer_headers
        raise GitHubError(response.status, method, where, "rate limited")


def _message(response: urllib3.BaseHTTPResponse) -> str:
    try:
        return str(json.loads(response.data).get("message", ""))[:200]
    except (ValueError, AttributeError):
        return ""


def _next_param(link: str | None, name: str) -> str | None:
    """A query parameter of the `rel="next"` URL in a Link header."""
    if not link:
        return None
    for part in link.split(","):
        url, _, params = part.partition(";")
        if 'rel="next"' not in params:
            continue
        values = parse_qs(urlsplit(url.strip().strip("<>")).query).get(name)
        return values[0] if values else None
    return None


def _next_cursor(link: str | None) -> str | None:
    """The `cursor` of the next page (GitHub's cursor is opaque)."""
    return _next_param(link, "cursor")


def _next_page(link: str | None) -> int | None:
    """The `page` of the next page (page/per_page pagination)."""
    page = _next_param(link, "page")
    return int(page) if page is not None and page.isdigit() else None
