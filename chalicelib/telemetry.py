"""Metrics: CloudWatch EMF through powertools, plus in-process counts tests can read."""

from __future__ import annotations

import threading
from collections import Counter

from aws_lambda_powertools import Metrics, single_metric
from aws_lambda_powertools.metrics import MetricUnit

NAMESPACE = "RunnerHub"


class Telemetry:
    def __init__(self, service: str, emit: bool = True) -> None:
        self._metrics = Metrics(namespace=NAMESPACE, service=service) if emit else None
        self._emit = emit
        self._lock = threading.Lock()
        self.counts: Counter[tuple[str, str | None]] = Counter()

    def count(self, name: str, dimension: tuple[str, str] | None = None) -> None:
        """Count one event; `dimension` (name, value) splits it, e.g. ("reason", "too_large")."""
        with self._lock:
            self.counts[(name, dimension[1] if dimension else None)] += 1
        if not self._emit:
            return
        if dimension is None:
            self._metrics.add_metric(name=name, unit=MetricUnit.Count, value=1)
            return
        with single_metric(
            name=name, unit=MetricUnit.Count, value=1, namespace=NAMESPACE
        ) as metric:
            metric.add_dimension(name=dimension[0], value=dimension[1])

    def flush(self) -> None:
        if self._metrics is not None:
            self._metrics.flush_metrics(raise_on_empty_metrics=False)

    def total(self, name: str) -> int:
        with self._lock:
            return sum(value for (key, _), value in self.counts.items() if key == name)
