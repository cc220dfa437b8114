"""Metrics: CloudWatch EMF (namespace RunnerHub), plus in-process counts tests can read.

Every metric is one (name, unit, dimensions) whose dimensions are fixed by the code, never by
the environment, so the dashboard and the alarms (infra/runnerhub_infra/monitoring.py) name
exactly what is emitted: a count without a dimension carries `service` (webhook, reconciler,
executor); a count with one carries that one alone. Blobs are built with powertools' EMF
provider and go to a sink:

- stdout (Lambda: the runtime ships stdout to CloudWatch Logs, which extracts the metrics);
- the CloudWatch agent's EMF endpoint when RUNNERHUB_EMF_ENDPOINT is set (executor hosts:
  `tcp://127.0.0.1:25888`, executor/host/cloudwatch-agent.json), with the log group from
  RUNNERHUB_EMF_LOG_GROUP: a file the agent tails is shipped as plain log lines, so the
  endpoint is the one path that makes metrics of them;
- nowhere, with `emit=False`.

RUNNERHUB_EMF_LOG=<path> (set by the tests) also appends every blob built to that file, sink or
not: tests/infra/test_monitoring.py checks each metric a widget or alarm names against it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
from collections import Counter
from typing import Any, Protocol
from urllib.parse import urlsplit

NAMESPACE = "RunnerHub"
EMF_LOG_ENV = "RUNNERHUB_EMF_LOG"
EMF_ENDPOINT_ENV = "RUNNERHUB_EMF_ENDPOINT"
EMF_LOG_GROUP_ENV = "RUNNERHUB_EMF_LOG_GROUP"
COUNT, SECONDS, PERCENT = "Count", "Seconds", "Percent"
# EMF allows 100 values per metric in one blob.
MAX_VALUES = 100
# The agent is on loopback: a second is an agent that is down, not a slow one.
AGENT_TIMEOUT_S = 1.0

logger = logging.getLogger(__name__)


class Sink(Protocol):
    def send(self, blob: dict) -> None: ...


class StdoutSink:
    def send(self, blob: dict) -> None:
        print(json.dumps(blob, separators=(",", ":")), flush=True)


class AgentSink:
    """The CloudWatch agent's EMF listener (`logs.metrics_collected.emf`): newline-delimited
    JSON over TCP (one connection, re-opened after a failure) or one datagram per blob over
    UDP. A blob the agent cannot take is dropped and counted, never raised: metrics must not
    stop the executor."""

    def __init__(self, endpoint: str, log_group: str | None = None) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("tcp", "udp") or not parts.hostname or not parts.port:
            raise ValueError(
                f"{EMF_ENDPOINT_ENV} must be tcp://host:port or udp://host:port, not "
                f"{endpoint!r}"
            )
        self.address = (parts.hostname, parts.port)
        self.protocol = parts.scheme
        self.log_group = log_group
        self.dropped = 0
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()

    def send(self, blob: dict) -> None:
        if self.log_group:
            # The agent puts the event in this group (else its default, emf/logs/default).
            blob = {**blob, "log_group_name": self.log_group}
        data = (json.dumps(blob, separators=(",", ":")) + "\n").encode()
        with self._lock:
            for _ in range(2):  # a connection the agent closed is re-opened once
                try:
                    self._send(data)
                    return
                except OSError:
                    self._close()
            self.dropped += 1
        logger.warning("EMF blob dropped: the CloudWatch agent at %s:%s did not take it",
                       *self.address)

    def _send(self, data: bytes) -> None:
        if self.protocol == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.sendto(data, self.address)
            return
        if self._socket is None:
            self._socket = socket.create_connection(self.address, timeout=AGENT_TIMEOUT_S)
        self._socket.sendall(data)

    def _close(self) -> None:
        if self._socket is not None:
            try:
                self._socket.close()
            finally:
                self._socket = None

    def close(self) -> None:
        with self._lock:
            self._close()


class FileLog:
    """Appends each blob as one line (O_APPEND: several processes can share the file)."""

    _lock = threading.Lock()

    def __init__(self, path: str) -> None:
        self.path = path

    def send(self, blob: dict) -> None:
        with self._lock, open(self.path, "a", encoding="utf-8") as log:
            log.write(json.dumps(blob, separators=(",", ":")) + "\n")


def default_sink() -> Sink:
    endpoint = os.environ.get(EMF_ENDPOINT_ENV)
    if endpoint:
        return AgentSink(endpoint, os.environ.get(EMF_LOG_GROUP_ENV) or None)
    return StdoutSink()


def emf_blobs(dimensions: dict[str, str], metrics: dict[str, tuple[str, list[float]]]
              ) -> list[dict]:
    """EMF blobs for metrics sharing one dimension set, through powertools' provider (its
    validation of names, units and values), at most MAX_VALUES values a metric per blob."""
    from aws_lambda_powertools.metrics.provider.cloudwatch_emf.cloudwatch import (
        AmazonCloudWatchEMFProvider,
    )

    blobs = []
    chunk = 0
    while True:
        # service="": no `service` dimension from the environment (POWERTOOLS_SERVICE_NAME).
        provider = AmazonCloudWatchEMFProvider(namespace=NAMESPACE, service="")
        for name, value in dimensions.items():
            provider.add_dimension(name=name, value=value)
        for name, (unit, values) in metrics.items():
            for value in values[chunk * (MAX_VALUES - 1):(chunk + 1) * (MAX_VALUES - 1)]:
                provider.add_metric(name=name, unit=unit, value=value)
        if not provider.metric_set:
            return blobs
        blobs.append(provider.serialize_metric_set())
        chunk += 1


class Telemetry:
    """Counts and measures, buffered until `flush()` (per webhook request, per reconciler
    run); `autoflush` sends each at once (the executor, a long-running daemon)."""

    def __init__(self, service: str, emit: bool = True, sink: Sink | None = None,
                 autoflush: bool = False) -> None:
        self.service = service
        self._sinks: list[Sink] = []
        if emit:
            self._sinks.append(sink or default_sink())
        if os.environ.get(EMF_LOG_ENV):
            self._sinks.append(FileLog(os.environ[EMF_LOG_ENV]))
        self._autoflush = autoflush
        self._lock = threading.Lock()
        # (dimensions, name) -> (unit, values); counts are summed into one value.
        self._pending: dict[tuple[tuple[tuple[str, str], ...], str], tuple[str, list[float]]] = {}
        self.counts: Counter[tuple[str, str | None]] = Counter()

    def count(self, name: str, dimension: tuple[str, str] | None = None) -> None:
        """Count one event; `dimension` (name, value) splits it, e.g. ("reason", "too_large")."""
        with self._lock:
            self.counts[(name, dimension[1] if dimension else None)] += 1
        self._add(name, COUNT, 1.0, dict([dimension]) if dimension else None, summed=True)

    def measure(self, name: str, value: float, unit: str,
                dimensions: dict[str, str] | None = None) -> None:
        """One value (a latency, a gauge's reading); each value is kept (percentiles)."""
        self._add(name, unit, float(value), dimensions, summed=False)

    def _add(self, name: str, unit: str, value: float, dimensions: dict[str, str] | None,
             summed: bool) -> None:
        if not self._sinks:
            return
        key = (tuple(sorted((dimensions or {"service": self.service}).items())), name)
        with self._lock:
            _, values = self._pending.setdefault(key, (unit, []))
            if summed and values:
                values[0] += value
            else:
                values.append(value)
        if self._autoflush:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        groups: dict[tuple[tuple[str, str], ...], dict[str, tuple[str, list[float]]]] = {}
        for (dimensions, name), metric in pending.items():
            groups.setdefault(dimensions, {})[name] = metric
        for dimensions, metrics in groups.items():
            for blob in emf_blobs(dict(dimensions), metrics):
                for sink in self._sinks:
                    try:
                        sink.send(blob)
                    except Exception:  # noqa: BLE001 - metrics never break the caller
                        print(f"runnerhub telemetry: a metric blob was lost ({sink!r})",
                              file=sys.stderr)

    def total(self, name: str) -> int:
        with self._lock:
            return sum(value for (key, _), value in self.counts.items() if key == name)


def read_emf_log(path: str) -> list[dict[str, Any]]:
    """The blobs an EMF log holds (tests)."""
    with open(path, encoding="utf-8") as log:
        return [json.loads(line) for line in log if line.strip()]
