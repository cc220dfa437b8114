#!/usr/bin/env python3
"""Stand-in for the GitHub Actions runner, speaking the emulator's runner protocol.

Standard library only: it runs in a minimal Debian container with just python3.

    python3 standin_runner.py --jitconfig-file PATH [--idle-timeout S]
    python3 standin_runner.py --jitconfig BLOB

It first sleeps through the real runner's start-up (the JIT config's `startup_s`, written by
the emulator; 0 when absent), then registers with its JIT config (which carries the emulator's
URL), long-polls for a job, acquires it, "runs" it by sleeping `duration_s` while heartbeating,
reports the job's conclusion (or `cancelled` when told to stop) and exits 0. SIGTERM during the
start-up exits 0 without registering. A bad or used JIT config exits 2 with one line on stderr.
It never prints the JIT config or its session token.

Its runner version is `RUNNER_VERSION` from its environment (an image bakes it in), else
STANDIN_VERSION; it prints it and reports it when it opens its session, as the real runner
does. Below GitHub's minimum (the emulator's `faults.runners.min_version`) the session is
refused (403); like the real runner it then prints "An error occurred: Runner version vX is
deprecated and cannot receive messages." and exits 1 (the real listener's terminated error).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request

EXIT_OK = 0
# The real runner's listener exits 1 ("terminated error, stop the service, no retry needed")
# when GitHub refuses its version.
EXIT_TERMINATED = 1
EXIT_BAD_CONFIG = 2
EXIT_PROTOCOL = 3
MAX_POLL_S = 30.0
CONNECT_RETRY_S = 30.0
# The emulator's own bound (emulator.config.MAX_RUNNER_STARTUP_S); this file is copied into
# runner images alone, so it cannot import it.
MAX_STARTUP_S = 600.0
# The version the stand-in reports when its image names none (a current actions/runner).
STANDIN_VERSION = "2.330.0"
DEPRECATED = "is deprecated and cannot receive messages"


class Terminated(Exception):
    """SIGTERM arrived while the runner was waiting (polling or sleeping)."""


class ProtocolError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Runner:
    def __init__(self, url: str, idle_timeout: float | None, log=print,
                 version: str = STANDIN_VERSION):
        self.url = url.rstrip("/")
        self.version = version
        self.idle_timeout = idle_timeout
        self.session: str | None = None
        self.log = log
        self.terminating = False
        self.interruptible = False

    # -- HTTP ------------------------------------------------------------------------------

    def call(self, path: str, body: dict, timeout: float = 30.0) -> tuple[int, dict]:
        data = json.dumps(body).encode()
        # The URL came from the JIT config and decode_url() admits only http(s).
        req = urllib.request.Request(  # noqa: S310
            f"{self.url}/_runner/{path}", data=data, method="POST"
        )
        req.add_header("Content-Type", "application/json")
        if self.session:
            req.add_header("Authorization", f"Bearer {self.session}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (our URL)
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw.strip() else {})
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("message", exc.reason)
            except ValueError:
                message = str(exc.reason)
            raise ProtocolError(exc.code, message) from None

    def call_retrying(self, path: str, body: dict) -> tuple[int, dict]:
        """Ride out a brief outage of the emulator (connection refused, reset)."""
        deadline = time.monotonic() + CONNECT_RETRY_S
        while True:
            try:
                return self.call(path, body)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                self.wait(0.5)

    def wait(self, seconds: float) -> None:
        self.interruptible = True
        try:
            if self.terminating:
                raise Terminated()
            time.sleep(max(0.0, seconds))
        finally:
            self.interruptible = False

    # -- the runner's life -----------------------------------------------------------------

    def start_up(self, seconds: float) -> None:
        """The real runner's start-up before it connects; SIGTERM cuts it short (Terminated)."""
        if seconds > 0:
            self.log(f"starting up for {seconds:g}s")
            self.wait(seconds)
        if self.terminating:  # SIGTERM between the sleep and here: still never register
            raise Terminated()

    def register(self, blob: str) -> None:
        _, reg = self.call_retrying("register", {"jitconfig": blob, "os": "Linux",
                                                 "version": self.version})
        self.session = reg["session"]
        self.log(f"registered as runner {reg['runner_name']} (id {reg['runner_id']})")

    def next_job(self) -> dict | None:
        """Long-poll until a job is acquired; None after the idle timeout."""
        idle_since = time.monotonic()
        while True:
            timeout = MAX_POLL_S
            if self.idle_timeout is not None:
                left = self.idle_timeout - (time.monotonic() - idle_since)
                if left <= 0:
                    return None
                timeout = min(timeout, left)
            self.interruptible = True
            try:
                if self.terminating:
                    raise Terminated()
                status, body = self.call("poll", {"timeout_s": timeout}, timeout=timeout + 15)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                self.interruptible = False
                self.wait(0.5)
                continue
            finally:
                self.interruptible = False
            if status == 204:
                continue
            offer = body["job"]
            try:
                _, acquired = self.call_retrying("acquire", {"job_id": offer["job_id"]})
            except ProtocolError as exc:
                if exc.status == 409:  # cancelled or withdrawn meanwhile: poll again
                    continue
                raise
            return acquired["job"]

    def run(self, job: dict) -> str:
        """Sleep through the job, heartbeating; stop early when GitHub says it was cancelled."""
        self.log(f"running job {job['job_id']} for {job['duration_s']}s")
        end = time.monotonic() + float(job["duration_s"])
        interval = float(job.get("heartbeat_interval_s", 5.0))
        try:
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    return job["conclusion"]
                self.wait(min(interval, left))
                _, beat = self.call_retrying("heartbeat", {"job_id": job["job_id"]})
                if beat.get("cancelled"):
                    self.log(f"job {job['job_id']} was cancelled")
                    return "cancelled"
        except Terminated:
            # The real runner cancels its job on shutdown ("The operation was canceled.").
            self.terminating = False  # let the final report go through
            return "cancelled"

    def complete(self, job: dict, conclusion: str) -> None:
        self.call_retrying("complete", {"job_id": job["job_id"], "conclusion": conclusion})
        self.log(f"job {job['job_id']} completed: {conclusion}")

    def disconnect(self) -> None:
        try:
            self.call("disconnect", {}, timeout=5)
        except (ProtocolError, urllib.error.URLError, OSError):
            pass  # leaving anyway


def decode_jit(blob: str) -> tuple[str, float]:
    """The emulator's URL and the start-up (s) an encoded JIT config carries; a config without
    `startup_s` (issued before it existed) means no start-up."""
    try:
        doc = json.loads(base64.b64decode(blob.strip(), validate=True))
        url = doc["url"]
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError("no URL")
        startup = doc.get("startup_s", 0.0)
        if isinstance(startup, bool) or not isinstance(startup, int | float) \
                or not 0.0 <= startup <= MAX_STARTUP_S:  # also false for NaN
            raise ValueError("bad startup_s")
        return url, float(startup)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError("the JIT config is not a valid encoded JIT config") from exc


def decode_url(blob: str) -> str:
    return decode_jit(blob)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Stand-in GitHub Actions runner for the emulator")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--jitconfig-file", help="file holding the encoded JIT config")
    src.add_argument("--jitconfig", help="the encoded JIT config (prefer --jitconfig-file)")
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        metavar="S",
        help="exit 0 if no job arrives within S seconds (default: wait forever)",
    )
    args = p.parse_args(argv)

    def err(message: str) -> None:
        print(f"standin-runner: error: {message}", file=sys.stderr, flush=True)

    def log(message: str) -> None:
        print(f"standin-runner: {message}", flush=True)

    try:
        if args.jitconfig_file:
            with open(args.jitconfig_file) as f:
                blob = f.read().strip()
        else:
            blob = args.jitconfig.strip()
        url, startup_s = decode_jit(blob)
    except (OSError, ValueError) as exc:
        err(str(exc))
        return EXIT_BAD_CONFIG

    version = os.environ.get("RUNNER_VERSION", "").strip().lstrip("v") or STANDIN_VERSION
    runner = Runner(url, args.idle_timeout, log=log, version=version)

    def on_term(*_):
        runner.terminating = True
        if runner.interruptible:
            raise Terminated()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    try:
        runner.start_up(startup_s)
    except Terminated:
        log("terminated during start-up: not registered")
        return EXIT_OK

    log(f"Current runner version: '{version}'")
    try:
        runner.register(blob)
    except ProtocolError as exc:
        if exc.status == 403 and DEPRECATED in str(exc):
            # The real runner's lines, word for word: operators and the executor match them.
            err(f"An error occurred: Runner version v{version} {DEPRECATED}.")
            err("Runner listener exit with terminated error, stop the service, no retry "
                "needed.")
            return EXIT_TERMINATED
        err(f"registration refused ({exc.status}): {exc}")
        return EXIT_BAD_CONFIG
    except (urllib.error.URLError, OSError) as exc:
        err(f"cannot reach the emulator: {getattr(exc, 'reason', exc)}")
        return EXIT_PROTOCOL
    except Terminated:
        return EXIT_OK

    try:
        job = runner.next_job()
    except Terminated:
        runner.disconnect()
        log("terminated while idle")
        return EXIT_OK
    except ProtocolError as exc:
        err(f"poll refused ({exc.status}): {exc}")
        return EXIT_PROTOCOL
    if job is None:
        runner.disconnect()
        log("idle timeout: no job arrived")
        return EXIT_OK

    try:
        conclusion = runner.run(job)
        runner.complete(job, conclusion)
    except ProtocolError as exc:
        # e.g. 401 after GitHub already failed the job as lost: nothing left to report to.
        err(f"job {job['job_id']} could not be reported ({exc.status}): {exc}")
        return EXIT_PROTOCOL
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
