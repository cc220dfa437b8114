"""Import an organisation's real Actions history as a trace, within a share of the App's budget.

    python -m forecast.import_history --org ORG --since-days N --out trace.csv [--budget-share 0.2]

As the GitHub App (the same credentials as the executor: `--app-id` with `--key-file`, or the
RUNNERHUB_GITHUB_APP_* settings), it lists the installation's repositories, each repository's
workflow runs created in the window (`GET /repos/{o}/{r}/actions/runs?created=`), then the jobs
of every attempt of each run (`GET .../runs/{id}/jobs?filter=all`), newest run first, and writes
the trace format (forecast/traces.py): `timestamp` = when the job was created (queued),
`labels` = its `runs-on` labels, `duration_s` = completed_at - started_at.

The budget: GitHub's primary quota is per installation per hour (5,000 to 15,000 requests), and
RunnerHub's executors and reconciler live on the same quota. The import makes at most
`share x limit` requests per quota window (`limit` as GitHub reports it, `x-ratelimit-limit`)
and spends at most `share` of the secondary limit's points per minute. When the window's share
is spent it stops, or with `--wait` sleeps until GitHub's reset and goes on.

Exit codes: 0 the whole window imported; 2 bad input (unknown organisation, bad arguments,
missing credentials, unwritable output); 3 the share was spent first: a partial trace covering
the newest part of the window is written when runs were listed completely, none otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from chalicelib.github.budget import SECONDARY_POINTS_PER_MINUTE, BudgetLimits, RateBudget
from chalicelib.github.client import GITHUB_API_URL, MAX_PER_PAGE, GitHubApp
from chalicelib.github.interface import GitHubError
from forecast.traces import TraceJob, format_time, write_trace

log = logging.getLogger(__name__)

DEFAULT_BUDGET_SHARE = 0.2
MAX_SINCE_DAYS = 400
# GitHub's run search reaches only its first 1,000 results (actor, branch, check_suite_id,
# created, event, head_sha, status): https://docs.github.com/rest/actions/workflow-runs
RUNS_SEARCH_CAP = 1000
DAY_S = 86400
EXIT_OK, EXIT_BAD_INPUT, EXIT_PARTIAL = 0, 2, 3


class ImportInputError(Exception):
    """Bad input the operator can fix (unknown organisation, no credentials): exit 2."""


class BudgetShareSpent(Exception):
    """The import's share of the quota window is spent."""

    def __init__(self, used: int, allowance: int, reset_in_s: float) -> None:
        super().__init__(f"the import's share of the rate budget is spent: {used} of "
                         f"{allowance} requests this window (it resets in {reset_in_s:.0f} s)")
        self.used, self.allowance, self.reset_in_s = used, allowance, reset_in_s


class ShareBudget(RateBudget):
    """The App's rate budget (pacing, retries after refusals) capped at a share of each
    installation's hourly quota: every attempt through `acquire` is counted, retries too.

    The allowance is `floor(share x limit)` per quota window, known from GitHub's first
    answer for that installation (the first request is allowed before it). A new window
    (GitHub's reset passed) starts a new count. `wait`: sleep until the reset instead of
    raising BudgetShareSpent."""

    def __init__(self, share: float, *, wait: bool = False,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"budget share must be in (0, 1], got {share}")
        super().__init__(BudgetLimits(
            secondary_points_per_minute=max(1, math.floor(share * SECONDARY_POINTS_PER_MINUTE))),
            clock=clock, wall=wall, sleep=sleep)
        self.share = share
        self.wait = wait
        self._pause = sleep
        self.used: Counter[str] = Counter()  # requests this window, per installation
        self.requests = 0  # requests in all, every installation and the App JWT
        self._last_remaining: dict[str, float] = {}

    def allowance(self, key: str) -> int | None:
        quota = self.primary_quota(key)
        return None if quota is None else math.floor(self.share * quota.limit)

    def acquire(self, method: str, key: str = "app") -> None:
        if key != "app":  # the App JWT's few calls have their own quota
            self._count(key)
        self.requests += 1
        super().acquire(method, key)

    def _count(self, key: str) -> None:
        quota = self.primary_quota(key)
        if quota is None:
            self.used[key] += 1
            return
        # Only GitHub's reset raises `remaining` (everyone's requests lower it): a new window.
        if quota.remaining > self._last_remaining.get(key, math.inf):
            self.used[key] = 0
        self._last_remaining[key] = quota.remaining
        allowance = math.floor(self.share * quota.limit)
        if self.used[key] >= allowance:
            if not self.wait or allowance == 0:
                raise BudgetShareSpent(self.used[key], allowance, quota.reset_in_s)
            log.info("share of %d requests spent; waiting %.0f s for the quota's reset",
                     allowance, quota.reset_in_s + 1)
            self._pause(quota.reset_in_s + 1.0)
            self.used[key] = 0
            self._last_remaining[key] = math.inf  # the next answer starts the new window
        self.used[key] += 1


@dataclass(frozen=True)
class Run:
    repository: str
    run_id: int
    created_at: float


@dataclass
class ImportResult:
    org: str
    since: float
    until: float
    repositories: int = 0
    runs: int = 0  # runs listed in the window
    runs_read: int = 0  # runs whose jobs were read
    jobs: list[TraceJob] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    covered_from: float | None = None  # set: the runs before it were not read (partial)
    stopped: str | None = None  # why the import stopped early

    @property
    def complete(self) -> bool:
        return self.stopped is None


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class HistoryImporter:
    """Pages one organisation's runs and jobs through a GitHubApp (its budget a ShareBudget)."""

    def __init__(self, client: GitHubApp, per_page: int = MAX_PER_PAGE,
                 search_cap: int = RUNS_SEARCH_CAP) -> None:
        self.client = client
        self.per_page = per_page
        self.search_cap = search_cap

    def run(self, org: str, since: float, until: float) -> ImportResult:
        result = ImportResult(org, since, until)
        installation = self._installation(org)
        repositories = [name for name in self._repositories(installation)
                        if name.split("/", 1)[0].lower() == org.lower()]
        result.repositories = len(repositories)
        runs: list[Run] = []
        try:
            for repository in repositories:
                runs.extend(self._runs(installation, repository, since, until, result))
        except BudgetShareSpent as exc:
            result.stopped = f"{exc} while listing runs ({len(runs)} listed)"
            return result
        # Newest first over every repository: a stop leaves a trace of the window's newest
        # part, every repository in it, instead of some repositories whole and others absent.
        runs.sort(key=lambda run: (run.created_at, run.run_id), reverse=True)
        result.runs = len(runs)
        jobs_of: list[list[TraceJob]] = []
        for index, run in enumerate(runs):
            try:
                jobs_of.append(list(self._jobs(installation, run, result.skipped)))
            except BudgetShareSpent as exc:
                # Whole seconds: runs created in the same second as the first one not read
                # may be unread too, so the trace starts one second later.
                cut = math.floor(run.created_at) + 1
                result.covered_from = cut
                result.stopped = f"{exc} after the jobs of {index} of {len(runs)} runs"
                jobs_of = [jobs for jobs, done in zip(jobs_of, runs, strict=False)
                           if done.created_at >= cut]
                break
        result.runs_read = len(jobs_of)
        result.jobs = sorted((job for jobs in jobs_of for job in jobs), key=lambda j: j.at)
        return result

    def _installation(self, org: str) -> int:
        try:
            return self.client.installation_for(org)
        except GitHubError as exc:
            if exc.status == 404:
                raise ImportInputError(
                    f"the GitHub App {self.client.app_id} is not installed on an organisation "
                    f"named {org!r} (or it does not exist)") from None
            raise

    def _repositories(self, installation: int) -> Iterator[str]:
        page: int | None = 1
        while page is not None:
            answer = self.client.list_installation_repositories(installation, page,
                                                                self.per_page)
            for repo in answer.items:
                if isinstance(repo.get("full_name"), str):
                    yield repo["full_name"]
            page = answer.next_page

    def _runs(self, installation: int, repository: str, start: float, end: float,
              result: ImportResult) -> list[Run]:
        """Runs created in [start, end) (whole seconds), halving the window while GitHub's
        search cap would hide some of its runs."""
        created = f"{_iso(start)}..{_iso(end - 1)}"
        answer = self.client.list_runs(installation, repository, created=created,
                                       per_page=self.per_page)
        total = answer.total_count or 0
        if total >= self.search_cap and end - start > 1:
            middle = math.floor((start + end) / 2)
            return (self._runs(installation, repository, middle, end, result)
                    + self._runs(installation, repository, start, middle, result))
        if total > self.search_cap:
            result.skipped["runs_beyond_search_cap"] += total - self.search_cap
        runs = []
        while True:
            for item in answer.items:
                created_at = _epoch(item.get("created_at"))
                if not isinstance(item.get("id"), int) or created_at is None:
                    result.skipped["runs_malformed"] += 1
                    continue
                runs.append(Run(repository, item["id"], created_at))
            if answer.next_page is None:
                return runs
            answer = self.client.list_runs(installation, repository, created=created,
                                           page=answer.next_page, per_page=self.per_page)

    def _jobs(self, installation: int, run: Run, skipped: Counter[str]) -> Iterator[TraceJob]:
        page: int | None = 1
        found: list[TraceJob] = []
        while page is not None:
            # Every attempt: a re-run job occupied a runner as much as the first attempt.
            answer = self.client.list_run_jobs(installation, run.repository, run.run_id, page,
                                               self.per_page, attempts="all")
            for job in answer.items:
                trace_job, reason = trace_job_of(job)
                if trace_job is None:
                    skipped[reason] += 1
                else:
                    found.append(trace_job)
            page = answer.next_page
        return iter(found)


def trace_job_of(job: dict) -> tuple[TraceJob | None, str]:
    """A REST workflow job as a trace job, or None and why it is left out."""
    if job.get("status") != "completed":
        return None, "jobs_not_completed"
    if job.get("conclusion") == "skipped":
        return None, "jobs_skipped"  # never needed a runner
    created = _epoch(job.get("created_at"))
    started, completed = _epoch(job.get("started_at")), _epoch(job.get("completed_at"))
    if created is None or started is None or completed is None or completed < started:
        return None, "jobs_bad_times"
    labels = job.get("labels")
    if (not isinstance(labels, list) or not labels
            or any(not isinstance(label, str) or not label.strip() or ";" in label
                   for label in labels)):
        return None, "jobs_bad_labels"
    return TraceJob(created, tuple(label.strip() for label in labels), completed - started), ""


# --- the command ---


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share in (0, 1]")
    return value


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days") from None
    if not 1 <= value <= MAX_SINCE_DAYS:
        raise argparse.ArgumentTypeError(f"{value} days is outside 1-{MAX_SINCE_DAYS}")
    return value


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(
        prog="python -m forecast.import_history",
        description="Write an organisation's workflow jobs of the last N days as a trace.")
    cli.add_argument("--org", required=True, help="the organisation (the App is installed on it)")
    cli.add_argument("--since-days", type=_days, required=True, metavar="N",
                     help=f"runs created in the last N days (1-{MAX_SINCE_DAYS})")
    cli.add_argument("--out", type=Path, required=True, help="the trace CSV to write")
    cli.add_argument("--budget-share", type=_share, default=DEFAULT_BUDGET_SHARE,
                     metavar="S", help="at most this share of the installation's hourly "
                     f"quota and of the points per minute (default {DEFAULT_BUDGET_SHARE})")
    cli.add_argument("--wait", action="store_true",
                     help="when the window's share is spent, wait for GitHub's reset")
    cli.add_argument("--app-id", type=int, help="the App id (else RUNNERHUB_GITHUB_APP_*)")
    cli.add_argument("--key-file", type=Path, help="the App's private key (PEM)")
    cli.add_argument("--api-url", help=f"GitHub's API (default {GITHUB_API_URL}, or "
                     "RUNNERHUB_GITHUB_API_URL)")
    return cli


def _credentials(args: argparse.Namespace) -> tuple[int, str, str]:
    if (args.app_id is None) != (args.key_file is None):
        raise ImportInputError("give --app-id and --key-file together")
    if args.app_id is not None:
        try:
            key = args.key_file.read_text()
        except OSError as exc:
            raise ImportInputError(f"cannot read the key file {args.key_file}: "
                                   f"{exc.strerror}") from None
        return args.app_id, key, args.api_url or GITHUB_API_URL
    from pydantic import ValidationError

    from chalicelib.errors import ConfigurationError
    from chalicelib.settings import GitHubAppSettings

    try:
        settings = GitHubAppSettings()
        app_id, key = settings.app_credentials()[0]
    except (ValidationError, ConfigurationError, ValueError) as exc:
        raise ImportInputError(f"no GitHub App credentials: give --app-id and --key-file, or "
                               f"set RUNNERHUB_GITHUB_APP_* ({exc})") from None
    return app_id, key, args.api_url or settings.github_api_url


def main(argv: list[str] | None = None, *, clock: Callable[[], float] = time.time,
         sleep: Callable[[float], None] = time.sleep) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parser().parse_args(argv)  # bad arguments: argparse exits 2 with the reason
    try:
        if not args.out.parent.is_dir():
            raise ImportInputError(f"the output's directory {args.out.parent} does not exist")
        app_id, key, api_url = _credentials(args)
        budget = ShareBudget(args.budget_share, wait=args.wait, sleep=sleep)
        client = GitHubApp(app_id, key, api_url, budget=budget)
        until = math.floor(clock()) + 1
        since = until - args.since_days * DAY_S
        result = HistoryImporter(client).run(args.org, since, until)
    except ImportInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except GitHubError as exc:
        print(f"error: {exc}", file=sys.stderr)
        # 401: the App's key is wrong; anything else (an outage, a refusal) is not bad input.
        return EXIT_BAD_INPUT if exc.status in (401, 404) else 1
    written = result.complete or result.covered_from is not None
    if written:
        try:
            write_trace(args.out, result.jobs)
        except OSError as exc:
            print(f"error: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
            return EXIT_BAD_INPUT
    summary = {
        "org": args.org,
        "since": format_time(since),
        "covered_from": format_time(result.covered_from or since),
        "repositories": result.repositories,
        "runs": result.runs,
        "runs_read": result.runs_read,
        "jobs": len(result.jobs) if written else 0,
        "skipped": dict(sorted(result.skipped.items())),
        "requests": budget.requests,
        "allowance_per_window": max((budget.allowance(k) or 0 for k in budget.used),
                                    default=None),
        "complete": result.complete,
        "out": str(args.out) if written else None,
    }
    print(json.dumps(summary))
    if not result.complete:
        print(f"warning: {result.stopped}; " + (
            f"the trace covers runs created from {summary['covered_from']} only"
            if written else "no trace written: list fewer days, raise --budget-share, or "
            "use --wait"), file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
