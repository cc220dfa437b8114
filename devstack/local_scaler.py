"""The scaler as the local stack runs it: `python -m devstack.local_scaler [--every S]`.

In AWS the scaler is a Lambda function invoked by the jobs table's stream (within seconds of new
demand) and by a schedule (whatever the stream missed). Here one process plays both event
sources around the same `chalicelib.scaler.handler.handle`: a stream poller (GetRecords on the
local AWS, devstack/stream_poller.py) and a timer sending scheduled events. Invocations are
serialised, as one Lambda container handles one event at a time; the scaler's own lease still
guards against a second scaler process. Each run's summary is printed as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Any

SCHEDULED_EVENT = {"detail-type": "Scheduled Event", "source": "aws.events"}


class LocalScaler:
    def __init__(self, every_s: float) -> None:
        from chalicelib.scaler import handler

        self._handler = handler
        self._every_s = every_s
        self._lock = threading.Lock()
        self.stopping = threading.Event()

    def invoke(self, event: dict[str, Any]) -> dict[str, Any]:
        arrived = time.time()
        with self._lock:
            began = time.time()
            summary = self._handler.handle(event)
        kind = "stream" if "Records" in event else "schedule"
        print(json.dumps({"trigger": kind, "at": round(arrived, 3),
                          "waited_s": round(began - arrived, 3),
                          "run_s": round(time.time() - began, 3), **summary},
                         sort_keys=True, default=str), flush=True)
        return summary

    def run(self, jobs_table: str) -> None:
        from devstack.stream_poller import StreamPoller

        self._handler.scaler()  # built once, before the first event (as a Lambda's init)
        poller = StreamPoller(dict(os.environ), jobs_table, self.invoke).start()
        try:
            while not self.stopping.is_set():
                try:
                    self.invoke(dict(SCHEDULED_EVENT))
                except Exception as exc:  # noqa: BLE001 - a failed invocation, as Lambda's:
                    # shown, and the next one comes on schedule
                    print(json.dumps({"trigger": "schedule", "error": repr(exc)}), flush=True)
                self.stopping.wait(self._every_s)
        finally:
            poller.stop()
            for error in poller.errors[-5:]:
                print(json.dumps({"stream_error": error}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=30.0,
                        help="seconds between scheduled runs (the stream reacts at once)")
    args = parser.parse_args(argv)
    jobs_table = os.environ.get("RUNNERHUB_JOBS_TABLE")
    if not jobs_table:
        print("local scaler: RUNNERHUB_JOBS_TABLE is not set", file=sys.stderr)
        return 2
    scaler = LocalScaler(args.every)
    signal.signal(signal.SIGTERM, lambda *_: scaler.stopping.set())
    scaler.run(jobs_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
