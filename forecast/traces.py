"""Traces of job arrivals and their 5-minute buckets per pool (pure Python: no numpy here, so the
simulator and the importer can use it without scikit-learn's weight).

A trace is a CSV file, one job a line, with the header exactly `timestamp,labels,duration_s`:
`timestamp` is ISO 8601 in UTC ("2026-01-05T08:00:00Z" or "...+00:00"), `labels` the job's
`runs-on` labels joined by ";", `duration_s` the seconds its runner was busy. `buckets` routes
each job with the real routing rule (`chalicelib.pools.route`) and sums, per pool and per
5-minute bucket, the arrivals and the runner-seconds demanded (a job's whole duration counts in
the bucket it arrived in: that is what a pool must provision for when it arrives).
"""

from __future__ import annotations

import csv
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from chalicelib.pools import PoolConfig, route

log = logging.getLogger(__name__)

BUCKET_S = 300  # 5 minutes: the history's and the forecast's granularity
HORIZON = 288  # 24 h of 5-minute buckets: what one forecast covers
DAY_BUCKETS = 86400 // BUCKET_S
WEEK_BUCKETS = 7 * DAY_BUCKETS
HEADER = ("timestamp", "labels", "duration_s")
TRACES = ("office_hours", "nightly_cron", "matrix_bursts", "growth_trend", "holiday_week",
          "aperiodic")
# The repository every simulated job comes from: private, so no pool's public-repository rule
# refuses it, and named so that a pool scoped to repositories does not serve it by accident.
SIM_REPOSITORY = "trace"
SIM_POOLS = Path(__file__).parent / "pools.sim.toml"  # the generated traces' pools
SIM_OWNER = "sim-org"  # the first pool's owner in SIM_POOLS; other pools files: sim_owner()


@dataclass(frozen=True)
class TraceJob:
    at: float  # epoch seconds, UTC: when the job was queued
    labels: tuple[str, ...]
    duration_s: float  # seconds its runner was busy


def _parse_time(text: str) -> float:
    value = datetime.fromisoformat(text.strip())
    if value.tzinfo is None or value.utcoffset().total_seconds() != 0:
        raise ValueError(f"timestamp {text!r} is not in UTC (end it with Z or +00:00)")
    return value.timestamp()


def format_time(at: float) -> str:
    """ISO 8601 UTC with a Z; microseconds only when there are any (read_trace reads both)."""
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


def _parse_row(row: list[str]) -> TraceJob:
    if len(row) != 3:
        raise ValueError(f"expected 3 fields ({','.join(HEADER)}), got {len(row)}")
    stamp, labels_text, duration_text = row
    at = _parse_time(stamp)
    labels = tuple(label.strip() for label in labels_text.split(";"))
    if not labels_text.strip() or any(not label for label in labels):
        raise ValueError(f"labels {labels_text!r}: give one or more labels joined by ';'")
    duration = float(duration_text)
    if not math.isfinite(duration) or duration < 0:
        raise ValueError(f"duration_s {duration_text!r} must be a finite number >= 0")
    return TraceJob(at, labels, duration)


def read_trace(path: str | Path) -> list[TraceJob]:
    """The jobs of a trace file, sorted by arrival. ValueError naming the line for a bad row."""
    path = Path(path)
    try:
        handle = path.open(newline="", encoding="utf-8-sig")  # a BOM (Excel) is not data
    except OSError as exc:
        raise ValueError(f"cannot read trace {path}: {exc}") from exc
    jobs = []
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}:1: {exc}") from exc
        if header is None or tuple(cell.strip() for cell in header) != HEADER:
            raise ValueError(f"{path}:1: the header must be exactly {','.join(HEADER)!r}, "
                             f"got {','.join(header or [])!r}")
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader, None)
                if row is None:
                    break
                if not row:  # a blank line
                    continue
                jobs.append(_parse_row(row))
            except (ValueError, csv.Error, UnicodeDecodeError) as exc:
                raise ValueError(f"{path}:{line}: {exc}") from exc
    jobs.sort(key=lambda job: job.at)  # stable: equal times keep file order
    return jobs


def write_trace(path: str | Path, jobs: Iterable[TraceJob]) -> None:
    """Write `jobs` in the trace format (in the order given; read_trace sorts)."""
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(HEADER)
        for job in jobs:
            if any(";" in label or not label for label in job.labels) or not job.labels:
                raise ValueError(f"job at {format_time(job.at)}: labels {job.labels!r} must be "
                                 "non-empty and contain no ';'")
            writer.writerow((format_time(job.at), ";".join(job.labels), f"{job.duration_s:g}"))


@dataclass
class Series:
    """A pool's demand in 5-minute buckets from `start`: arrivals and runner-seconds."""

    pool: str
    start: float  # epoch seconds, a multiple of BUCKET_S
    arrivals: list[int]
    runner_s: list[float]

    def __post_init__(self) -> None:
        if self.start % BUCKET_S:
            raise ValueError(f"series {self.pool}: start {self.start} is not a multiple of "
                             f"{BUCKET_S} s")
        if len(self.arrivals) != len(self.runner_s):
            raise ValueError(f"series {self.pool}: {len(self.arrivals)} arrival buckets but "
                             f"{len(self.runner_s)} runner-second buckets")

    def __len__(self) -> int:
        return len(self.runner_s)

    @property
    def end(self) -> float:
        """Epoch seconds just past the last bucket."""
        return self.start + len(self) * BUCKET_S

    def index(self, at: float) -> int:
        """The bucket holding epoch `at` (may be outside the series: negative or >= len)."""
        return math.floor((at - self.start) / BUCKET_S)

    def window(self, start: float, end: float) -> Series:
        """The buckets in [start, end), both multiples of BUCKET_S inside the series."""
        first, last = self.index(start), self.index(end)
        if start % BUCKET_S or end % BUCKET_S or not 0 <= first <= last <= len(self):
            raise ValueError(f"series {self.pool}: window {start}-{end} is not whole buckets "
                             f"inside {self.start}-{self.end}")
        return Series(self.pool, float(start), self.arrivals[first:last],
                      self.runner_s[first:last])


class Buckets(dict[str, Series]):
    """`buckets`' result: a Series per pool of the pools file, and the jobs no pool serves
    counted by reason (`unrouted`), so nothing is dropped silently."""

    unrouted: Counter[str]

    def __init__(self, series: dict[str, Series], unrouted: Counter[str]):
        super().__init__(series)
        self.unrouted = unrouted


def sim_owner(pools: PoolConfig) -> str:
    """The owner simulated jobs come from: the first pool's scope's owner."""
    return pools.pools[0].scope.owner


def buckets(jobs: Sequence[TraceJob], pools: PoolConfig, *, start: float | None = None,
            end: float | None = None) -> Buckets:
    """Route `jobs` and bucket them per pool. Every pool gets a Series over the same span:
    from `start` (default: the first job's bucket) to `end` (default: past the last job's),
    both rounded to whole buckets. Jobs outside the span or routed nowhere are counted in
    `unrouted` (by reason) and logged."""
    if start is None:
        start = min((job.at for job in jobs), default=0.0)
    first = math.floor(start / BUCKET_S) * BUCKET_S
    if end is None:
        end = max((job.at for job in jobs), default=first - 1) + 1
    count = max(0, math.ceil((end - first) / BUCKET_S))
    series = {pool.name: Series(pool.name, float(first), [0] * count, [0.0] * count)
              for pool in pools.pools}
    unrouted: Counter[str] = Counter()
    owner = sim_owner(pools)
    # Routing is pure and a trace has few distinct label sets: route each set once.
    routes: dict[tuple[str, ...], tuple[str | None, str]] = {}
    for job in jobs:
        index = math.floor((job.at - first) / BUCKET_S)
        if not 0 <= index < count:
            unrouted["outside_span"] += 1
            continue
        if job.labels not in routes:
            decision = route(pools, job.labels, owner=owner, repository=SIM_REPOSITORY,
                             private=True)
            routes[job.labels] = ((decision.pool.name, "") if decision.pool
                                  else (None, str(decision.reason)))
        name, reason = routes[job.labels]
        if name is None:
            unrouted[reason] += 1
            continue
        target = series[name]
        target.arrivals[index] += 1
        target.runner_s[index] += job.duration_s
    if unrouted:
        log.warning("buckets: %d job(s) not counted in any pool: %s", sum(unrouted.values()),
                    dict(unrouted))
    return Buckets(series, unrouted)
