"""forecast.import_history against the emulator over HTTP: the runs and jobs of an organisation's
past weeks paged with the GitHub App into the trace format, within a share of the App's budget."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import urllib3

from chalicelib.github import GitHubApp
from emulator import AppConfig, Emulator, EmulatorConfig, InstallationConfig
from emulator.testing import generate_app_key
from forecast.import_history import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_PARTIAL,
    HistoryImporter,
    ShareBudget,
    main,
)
from forecast.traces import read_trace

APP_ID, INSTALLATION, OTHER_INSTALLATION = 31, 310, 311
ORG = "acme"
DAY = 86400.0


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def past_job(repository: str, run_id: int, created: float, duration: float, labels: list[str],
             **extra) -> dict:
    # Picked up 7 s after it was queued: the trace's duration is the runner's busy time only.
    return {"repository": repository, "run_id": run_id, "labels": labels,
            "created_at": iso(created), "started_at": iso(created + 7),
            "completed_at": iso(created + 7 + duration), **extra}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    private, public = generate_app_key()
    key_file = tmp_path_factory.mktemp("app") / "app.pem"
    key_file.write_text(private)
    return private, public, key_file


def make_emulator(keys, **options) -> Emulator:
    app = AppConfig(app_id=APP_ID, public_key_pem=keys[1], installations=[
        InstallationConfig(id=INSTALLATION, account=ORG),
        InstallationConfig(id=OTHER_INSTALLATION, account="other")])
    return Emulator(EmulatorConfig(apps=[app], **options))


def cli(emu: Emulator, keys, out: Path, *extra: str, org: str = ORG) -> list[str]:
    return ["--org", org, "--since-days", "14", "--out", str(out), "--app-id", str(APP_ID),
            "--key-file", str(keys[2]), "--api-url", emu.base_url, *extra]


def installation_used(emu: Emulator, keys) -> int:
    """GitHub's own count of the installation's requests this window (the emulator's;
    `/rate_limit` itself is not counted)."""
    token = GitHubApp(APP_ID, keys[0], emu.base_url).installation_token(INSTALLATION)
    answer = urllib3.request("GET", f"{emu.base_url}/rate_limit",
                             headers={"Authorization": f"token {token}"})
    return json.loads(answer.data)["rate"]["used"]


def test_import_pages_runs_and_every_attempts_jobs_into_a_trace(keys, tmp_path, capsys):
    """150 runs in one repository (two pages of runs), a run of 120 jobs (two pages of jobs),
    a second repository, a run older than the window, another organisation's run, a skipped
    job and a job still queued: the trace holds exactly the window's completed jobs."""
    now = time.time()
    history, expected = [], []
    for n in range(150):
        created = now - 13 * DAY + n * 3600
        history.append(past_job(f"{ORG}/app", 1000 + n, created, 60 + n, ["self-hosted", "small"]))
        expected.append((int(created), ("self-hosted", "small"), 60.0 + n))
    for n in range(120):  # one matrix run
        created = now - 2 * DAY + n
        history.append(past_job(f"{ORG}/lib", 5000, created, 300, ["self-hosted", "large"]))
        expected.append((int(created), ("self-hosted", "large"), 300.0))
    history.append(past_job(f"{ORG}/lib", 5001, now - 1 * DAY, 0, ["self-hosted", "large"],
                            conclusion="skipped"))
    history.append(past_job(f"{ORG}/app", 900, now - 20 * DAY, 60, ["self-hosted", "small"]))
    history.append(past_job("other/app", 7000, now - 1 * DAY, 60, ["self-hosted", "small"]))
    out = tmp_path / "trace.csv"
    with make_emulator(keys) as emu:
        emu.add_history(history)
        emu.add_job(repository=f"{ORG}/lib", labels=["self-hosted", "nobody"])  # still queued
        code = main(cli(emu, keys, out))
        used = installation_used(emu, keys)
    assert code == EXIT_OK
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    jobs = read_trace(out)  # Part A's reader: the format round-trips
    got = sorted((int(j.at), j.labels, j.duration_s) for j in jobs)
    assert got == sorted(expected)
    # app: 150 in the window (not the older one); lib: the matrix, the skipped, the queued.
    assert summary["repositories"] == 2 and summary["runs"] == 150 + 3
    assert summary["jobs"] == 270 and summary["complete"] is True
    assert summary["skipped"] == {"jobs_not_completed": 1, "jobs_skipped": 1}
    # repositories 1 + app's runs 2 pages + lib's 1 + jobs: 153 runs, the matrix in 2 pages;
    # the App JWT's 2 (installation, token) are not the installation's.
    assert used == summary["requests"] - 2 == 1 + 2 + 1 + 154
    assert summary["allowance_per_window"] == 1000  # 0.2 x 5,000


def test_budget_share_stops_with_a_trace_of_the_newest_runs(keys, tmp_path, capsys):
    """A 100-request hourly quota at share 0.2: 20 requests, then a partial trace whose runs
    are exactly those created from `covered_from` on, and exit 3."""
    now = time.time()
    history = [past_job(f"{ORG}/app", 2000 + n, now - 10 * DAY + n * 3600, 60, ["self-hosted"])
               for n in range(40)]
    out = tmp_path / "trace.csv"
    with make_emulator(keys, rate_limit_installation=100) as emu:
        emu.add_history(history)
        code = main(cli(emu, keys, out, "--budget-share", "0.2"))
        used = installation_used(emu, keys)
    captured = capsys.readouterr()
    assert code == EXIT_PARTIAL
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert used == 20 and summary["complete"] is False
    assert "share of the rate budget is spent: 20 of 20" in captured.err
    covered_from = datetime.fromisoformat(summary["covered_from"]).timestamp()
    jobs = read_trace(out)
    created = sorted(int(j.at) for j in jobs)
    wanted = sorted(int(now - 10 * DAY + n * 3600) for n in range(40)
                    if int(now - 10 * DAY + n * 3600) >= covered_from)
    # 1 repositories + 1 runs page, then one request per run: 18 runs read.
    assert created == wanted and len(jobs) == summary["runs_read"] == 18


def test_budget_share_spent_while_listing_runs_writes_nothing(keys, tmp_path, capsys):
    out = tmp_path / "trace.csv"
    with make_emulator(keys, rate_limit_installation=100) as emu:
        emu.add_history([past_job(f"{ORG}/app", 1, time.time() - DAY, 5, ["self-hosted"]),
                         past_job(f"{ORG}/lib", 2, time.time() - DAY, 5, ["self-hosted"])])
        # 1% of 100: one request (the repositories), none left to list runs.
        code = main(cli(emu, keys, out, "--budget-share", "0.01"))
    assert code == EXIT_PARTIAL and not out.exists()
    assert "no trace written" in capsys.readouterr().err


def test_wait_for_the_quota_reset_finishes_the_import(keys, tmp_path, capsys):
    """`--wait`: the share spent, the import sleeps until GitHub's window resets (2 s windows
    here) and goes on."""
    now = time.time()
    history = [past_job(f"{ORG}/app", 3000 + n, now - 5 * DAY + n * 60, 30, ["self-hosted"])
               for n in range(12)]
    out = tmp_path / "trace.csv"
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)

    faults = {"rate_limits": {"window_s": 3.0, "enforce": True}}
    with make_emulator(keys, rate_limit_installation=50, faults=faults) as emu:
        emu.add_history(history)
        code = main(cli(emu, keys, out, "--budget-share", "0.2", "--wait"), sleep=sleep)
    assert code == EXIT_OK, capsys.readouterr().err
    assert len(read_trace(out)) == 12
    # 2 listing + 12 job requests at 10 a window (0.2 x 50): at least one wait, each at
    # most a window and 2 s (GitHub's reset is a whole epoch second, then a second more).
    assert slept and all(0 < s <= 5.0 for s in slept)


def test_runs_beyond_the_search_cap_are_reached_by_splitting_the_window(keys):
    """GitHub's run search reaches 1,000 runs (a cap of 25 here): the importer halves the
    created window until each part is under the cap, and misses no run."""
    now = time.time()
    history = [past_job(f"{ORG}/app", 4000 + n, now - 3 * DAY + n * 600, 10, ["self-hosted"])
               for n in range(90)]
    with make_emulator(keys, runs_search_cap=25) as emu:
        emu.add_history(history)
        client = GitHubApp(APP_ID, keys[0], emu.base_url, budget=ShareBudget(1.0))
        capped = client.list_runs(INSTALLATION, f"{ORG}/app", created=f">={iso(now - 4 * DAY)}")
        result = HistoryImporter(client, search_cap=25).run(ORG, now - 4 * DAY, now + 1)
    assert capped.total_count == 90 and len(capped.items) == 25 and capped.next_page is None
    assert result.complete and result.runs == 90 and len(result.jobs) == 90
    assert not result.skipped


def test_unknown_org_is_a_clear_error_and_exit_2(keys, tmp_path):
    out = tmp_path / "trace.csv"
    with make_emulator(keys) as emu:
        done = subprocess.run(
            [sys.executable, "-m", "forecast.import_history",
             *cli(emu, keys, out, org="nosuchorg")],
            capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == EXIT_BAD_INPUT
    assert "not installed on an organisation named 'nosuchorg'" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


@pytest.mark.parametrize("bad", [
    ["--budget-share", "0"], ["--budget-share", "1.5"], ["--budget-share", "x"],
    ["--since-days", "0"], ["--since-days", "1000"],
])
def test_bad_arguments_exit_2(keys, tmp_path, bad, capsys):
    args = ["--org", ORG, "--since-days", "7", "--out", str(tmp_path / "t.csv"), *bad]
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == EXIT_BAD_INPUT
    assert "error: argument" in capsys.readouterr().err


def test_missing_output_directory_and_half_credentials_exit_2(keys, tmp_path, capsys):
    base = ["--org", ORG, "--since-days", "7"]
    assert main([*base, "--out", str(tmp_path / "no" / "t.csv"), "--app-id", "1",
                 "--key-file", str(keys[2])]) == EXIT_BAD_INPUT
    assert "does not exist" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "t.csv"), "--app-id", "1"]) == EXIT_BAD_INPUT
    assert "--app-id and --key-file together" in capsys.readouterr().err


def test_history_endpoint_validates_and_lists_every_attempt(keys):
    """`POST /_emulator/history` takes past jobs (422 for times out of order); a run's jobs
    `filter=all` include a re-run's first attempt, `filter=latest` (the default) do not."""
    with make_emulator(keys) as emu:
        http = urllib3.PoolManager()
        bad = past_job(f"{ORG}/app", 1, time.time() - DAY, 5, ["self-hosted"])
        bad["started_at"] = iso(time.time() - 2 * DAY)
        answer = http.request("POST", f"{emu.root_url}/_emulator/history",
                              body=json.dumps({"jobs": [bad]}))
        assert answer.status == 422 and b"created_at <= started_at" in answer.data
        good = past_job(f"{ORG}/app", 8, time.time() - DAY, 5, ["self-hosted"])
        answer = http.request("POST", f"{emu.root_url}/_emulator/history",
                              body=json.dumps({"jobs": [good]}))
        assert answer.status == 201
        (first,) = json.loads(answer.data)["job_ids"]
        emu.state.rerun(first)
        client = GitHubApp(APP_ID, keys[0], emu.base_url)
        latest = client.list_run_jobs(INSTALLATION, f"{ORG}/app", 8)
        every = client.list_run_jobs(INSTALLATION, f"{ORG}/app", 8, attempts="all")
        bad_filter = http.request(
            "GET", f"{emu.base_url}/repos/{ORG}/app/actions/runs/8/jobs?filter=some",
            headers={"Authorization": f"token {client.installation_token(INSTALLATION)}"})
        bad_created = http.request(
            "GET", f"{emu.base_url}/repos/{ORG}/app/actions/runs?created=yesterday",
            headers={"Authorization": f"token {client.installation_token(INSTALLATION)}"})
    assert [j["run_attempt"] for j in latest.items] == [2]
    assert sorted(j["run_attempt"] for j in every.items) == [1, 2]
    assert bad_filter.status == 422 and bad_created.status == 422


def test_wrong_app_key_exits_2_with_githubs_answer(keys, tmp_path, capsys):
    other = tmp_path / "other.pem"
    other.write_text(generate_app_key()[0])
    with make_emulator(keys) as emu:
        args = cli(emu, keys, tmp_path / "t.csv")
        args[args.index("--key-file") + 1] = str(other)
        assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "401" in err and "Traceback" not in err and not (tmp_path / "t.csv").exists()
