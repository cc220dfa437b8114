"""The dashboard page in a real headless browser (Debian's chromium and chromium-driver through
Selenium) against the local stack: the API server beside the webhook, one executor host, real
runner containers, the GitHub emulator. Ground truth: the emulator's record of each job, the
hosts table, the audit log.

During a small workload the page shows a job go from queued (received/dispatched: no host yet)
to completed, with its runner and stage bar; an operator is offered the drain button and it
works; a viewer is not offered it, gets 403 when the page's own context tries anyway, and the
refusal is audited. A screenshot is kept with the test's output and in
.cache/screenshots/dashboard.png."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import requests

from devstack.stack import LocalStack
from tests.conftest import ROOT, require, wait_for
from tests.e2e.test_executor_resilience import POOLS, host_record, start

pytestmark = [pytest.mark.browser, pytest.mark.docker, pytest.mark.slow]

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
QUEUED = {"waiting", "received", "dispatched"}
SCREENSHOT = ROOT / ".cache" / "screenshots" / "dashboard.png"


@pytest.fixture
def browser():
    require(bool(CHROMIUM and CHROMEDRIVER),
            "Debian's chromium and chromium-driver (make test installs them)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        require(False, "the selenium package (requirements-dev.txt)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--window-size=1500,1100", "--disable-gpu",
                 "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-default-apps", "--no-proxy-server"):
        options.add_argument(flag)
    if os.geteuid() == 0:  # chromium's sandbox refuses to run as root (CI containers)
        options.add_argument("--no-sandbox")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver's path given: Selenium Manager (which downloads drivers) never runs.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(10)
    yield driver
    driver.quit()


@pytest.fixture
def stack(docker_client, tmp_path: Path):
    stack = LocalStack(POOLS, tmp_path / "stack").start()
    yield stack
    stack.stop()


def by_testid(driver, testid: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, f'[data-testid="{testid}"]')


def text_of(driver, testid: str) -> str | None:
    """The element's text now, None when absent (rows are rebuilt in place while polling)."""
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        found = by_testid(driver, testid)
        return found[0].text if found else None
    except StaleElementReferenceException:
        return None


def sign_in(driver, stack: LocalStack, role: str) -> None:
    driver.get("about:blank")  # a fresh document: the fragment is read on load
    driver.get(stack.dashboard_url(role))
    assert wait_for(lambda: text_of(driver, "me-role") == role, 15, 0.1), (
        role, text_of(driver, "error"), driver.get_log("browser"))
    # The token left the address bar (and history) once kept in the tab's storage.
    assert "token" not in driver.current_url


def fetch_in_page(driver, method: str, path: str) -> dict:
    """A request from the page's own context, with the token it holds."""
    return driver.execute_async_script("""
        const [method, url, done] = arguments;
        fetch(url, {method, headers: {Authorization: "Bearer " +
                                      sessionStorage.getItem("runnerhub.token")}})
          .then(async (r) => done({status: r.status, body: await r.json()}))
          .catch((e) => done({status: null, body: String(e)}));""",
        method, driver.current_url.split("#")[0].rsplit("/dashboard", 1)[0] + path)


def csp_violations(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser")
            if "Content Security Policy" in entry.get("message", "")]


def test_the_dashboard_shows_a_job_go_from_queued_to_completed_and_offers_only_what_a_role_may(
        stack, browser, hosts, tmp_path):
    # The page answers without a token; its config says how to sign in locally.
    page = requests.get(f"{stack.api_url}/api/v1/dashboard", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "'unsafe-inline'" not in page.headers["Content-Security-Policy"]
    assert requests.get(f"{stack.api_url}/api/v1/dashboard/config",
                        timeout=10).json()["auth"] == "local"

    sign_in(browser, stack, "operator")
    assert by_testid(browser, "audit-section")[0].is_displayed()  # operators read the audit log
    assert wait_for(lambda: by_testid(browser, "pool-alpha"), 10, 0.1), text_of(browser, "error")
    assert by_testid(browser, "warm-set-alpha"), "operators may change a warm target"

    # Two jobs while no host serves: the page shows them queued.
    ids = stack.emulator.load_workload({"name": "dashboard", "jobs": [
        {"repository": "runnerhub-e2e/svc-0", "labels": ["self-hosted", "alpha"],
         "arrival_s": 0.0, "duration_s": 3.0, "name": f"page-{n}"} for n in range(2)]})
    stack.emulator.run_workload()
    watched = ids[0]
    assert wait_for(lambda: text_of(browser, f"job-state-{watched}") in QUEUED, 20, 0.2), (
        text_of(browser, f"job-state-{watched}"), text_of(browser, "error"))
    first_seen = text_of(browser, f"job-state-{watched}")
    assert int(text_of(browser, "backlog-alpha")) >= 1

    # A host comes: the page shows it with its slots and, to an operator, a drain button.
    host_id = hosts.new("page")
    executor = start(stack, host_id, 2)
    assert wait_for(lambda: by_testid(browser, f"drain-{host_id}"), 30, 0.2), executor.log()[-3000:]

    # The job completes; the page says so, with the runner GitHub gave it (the emulator's
    # record: ground truth) and its stage bar.
    def completed() -> bool:
        return text_of(browser, f"job-state-{watched}") == "completed"

    assert wait_for(completed, 60, 0.2), (text_of(browser, f"job-state-{watched}"),
                                          executor.log()[-3000:])
    truth = stack.emulator.job(watched)
    assert truth["status"] == "completed" and truth["conclusion"] == "success", truth
    row = text_of(browser, f"job-{watched}")
    assert truth["runner_name"] in row and host_id in row, (row, truth)
    assert wait_for(lambda: by_testid(browser, f"stage-{watched}-job"), 10, 0.2)
    assert wait_for(lambda: browser.execute_script(
        "return [...document.querySelectorAll('[data-testid=pickup-histogram] .col')]"
        ".reduce((n, bin) => n + Number(bin.firstChild.textContent), 0)") >= 1, 10, 0.2)
    print(f"\njob {watched}: page showed {first_seen} -> completed; "
          f"runner {truth['runner_name']} on {host_id}")
    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)
    print(f"screenshot: {shot} (copied to {SCREENSHOT})")

    # A viewer: no drain button, no warm target, no audit log; trying anyway is a 403 that
    # names the permission, audited, and the host is untouched.
    sign_in(browser, stack, "viewer")
    assert wait_for(lambda: by_testid(browser, f"host-{host_id}"), 10, 0.2)
    assert wait_for(lambda: text_of(browser, f"job-state-{watched}") == "completed", 10, 0.2)
    assert not by_testid(browser, f"drain-{host_id}")
    assert not by_testid(browser, "warm-set-alpha")
    assert not by_testid(browser, "audit-section")[0].is_displayed()
    refused = fetch_in_page(browser, "POST", f"/hosts/{host_id}/drain")
    assert refused["status"] == 403 and refused["body"]["permission"] == "act:hosts", refused
    assert host_record(stack, host_id)["state"] == "serving"
    assert not host_record(stack, host_id).get("drain_requested_at")
    audit = requests.get(f"{stack.api_url}/api/v1/audit", timeout=10, headers={
        "Authorization": f"Bearer {stack.token('admin')}"}).json()["records"]
    assert any(r["outcome"] == "denied" and r["role"] == "viewer"
               and r["target"].endswith(f"/hosts/{host_id}/drain") for r in audit), audit

    # The operator's drain button works: the idle host is retired (the hosts table says so).
    sign_in(browser, stack, "operator")
    assert wait_for(lambda: by_testid(browser, f"drain-{host_id}"), 10, 0.2)
    by_testid(browser, f"drain-{host_id}")[0].click()
    browser.switch_to.alert.accept()
    assert wait_for(lambda: host_record(stack, host_id).get("state") == "retiring"
                    or host_record(stack, host_id).get("drain_requested_at"), 10, 0.2), \
        (host_record(stack, host_id), text_of(browser, "error"))
    assert wait_for(lambda: not by_testid(browser, f"drain-{host_id}"), 10, 0.2)
    assert not csp_violations(browser)
    stack.stop_child(executor, timeout_s=30)
