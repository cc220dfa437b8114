"""`python -m emulator`: serve the GitHub emulator until SIGTERM; print its base URL first."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .config import (
    REAL_RUNNER_STARTUP_S,
    EmulatorConfig,
    load_apps_file,
    runner_startup_seconds,
)
from .faults import FaultsConfig
from .server import Emulator


def _startup_arg(text: str) -> float:
    # argparse turns ArgumentTypeError into a usage error (exit 2), not a traceback.
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    try:
        return runner_startup_seconds(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m emulator", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback)")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--api-prefix", default="", help="e.g. /api/v3 to stand in for GHES")
    p.add_argument("--apps-file", help="JSON file of Apps and installations")
    p.add_argument("--webhook-url", help="where workflow_job deliveries are POSTed")
    p.add_argument(
        "--webhook-secret",
        help="HMAC secret (prefer --webhook-secret-file or $EMULATOR_WEBHOOK_SECRET)",
    )
    p.add_argument("--webhook-secret-file", help="file holding the webhook secret")
    p.add_argument("--workload", action="append", default=[], help="workload JSON (repeatable)")
    p.add_argument(
        "--no-start",
        action="store_true",
        help="load the workload but wait for /_emulator/workload/start",
    )
    p.add_argument("--exit-when-done", action="store_true", help="exit once the workload is done")
    p.add_argument("--runner-url", help="URL runners use (baked into JIT configs)")
    p.add_argument("--lost-runner-timeout", type=float, default=30.0, metavar="S")
    p.add_argument("--acquire-timeout", type=float, default=10.0, metavar="S")
    p.add_argument("--poll-timeout", type=float, default=30.0, metavar="S")
    p.add_argument("--sender-threads", type=int, default=8)
    p.add_argument(
        "--runner-startup-s",
        type=_startup_arg,
        default=0.0,
        metavar="S",
        help=f"stand-in runner start-up before it registers, 0-600 (real runner: "
        f"{REAL_RUNNER_STARTUP_S:g})",
    )
    p.add_argument("--faults", metavar="F", help="fault profile JSON (see docs/emulator.md)")
    p.add_argument("--fault-seed", type=int, metavar="N", help="override the profile's seed")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> EmulatorConfig:
    secret = args.webhook_secret
    if args.webhook_secret_file:
        secret = Path(args.webhook_secret_file).read_text().strip()
    if secret is None:
        secret = os.environ.get("EMULATOR_WEBHOOK_SECRET", "")
    faults = FaultsConfig()
    if args.faults:
        faults = FaultsConfig.model_validate_json(Path(args.faults).read_text())
    if args.fault_seed is not None:
        faults = faults.model_copy(update={"seed": args.fault_seed})
    return EmulatorConfig(
        faults=faults,
        host=args.host,
        port=args.port,
        api_prefix=args.api_prefix,
        apps=load_apps_file(args.apps_file) if args.apps_file else [],
        webhook_url=args.webhook_url,
        webhook_secret=secret,
        runner_url=args.runner_url,
        lost_runner_timeout_s=args.lost_runner_timeout,
        acquire_timeout_s=args.acquire_timeout,
        poll_timeout_s=args.poll_timeout,
        sender_threads=args.sender_threads,
        runner_startup_s=args.runner_startup_s,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    # Werkzeug logs every request at INFO; that drowns the emulator's own lines.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    emu = Emulator(build_config(args)).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        for path in args.workload:
            emu.load_workload(path)
        print(emu.base_url, flush=True)
        if args.workload and not args.no_start:
            emu.run_workload()
        while not stop.wait(0.2):
            if args.exit_when_done and args.workload and emu.workload_status()["done"]:
                emu.sender.flush(emu.config.webhook_timeout_s)
                break
    finally:
        emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
