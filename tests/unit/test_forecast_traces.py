"""forecast/traces.py: the trace CSV format and the 5-minute buckets per pool."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from chalicelib.pools import load_pools
from forecast.traces import (
    BUCKET_S,
    SIM_OWNER,
    SIM_POOLS,
    Series,
    TraceJob,
    buckets,
    read_trace,
    sim_owner,
    write_trace,
)

MONDAY = datetime(2026, 1, 5, tzinfo=UTC).timestamp()
SMALL = ("self-hosted", "linux", "x64")
LARGE = ("self-hosted", "linux", "x64", "large")


@pytest.fixture(scope="module")
def pools():
    return load_pools(SIM_POOLS)


def write(tmp_path, *lines, header="timestamp,labels,duration_s"):
    path = tmp_path / "trace.csv"
    path.write_text("\n".join((header, *lines)) + "\n")
    return path


def test_round_trip_keeps_jobs_and_sorts_by_arrival(tmp_path):
    jobs = [TraceJob(MONDAY + 600.5, LARGE, 12.25), TraceJob(MONDAY, SMALL, 60.0)]
    path = tmp_path / "t.csv"
    write_trace(path, jobs)
    assert read_trace(path) == sorted(jobs, key=lambda job: job.at)


def test_z_and_plus_zero_offsets_read_the_same(tmp_path):
    path = write(tmp_path, "2026-01-05T08:00:00Z,self-hosted;linux,30",
                 "2026-01-05T08:00:00+00:00,self-hosted; linux ,30")
    first, second = read_trace(path)
    assert first.at == second.at == MONDAY + 8 * 3600
    assert first.labels == second.labels == ("self-hosted", "linux")


def test_bad_header_is_named(tmp_path):
    with pytest.raises(ValueError, match=r":1: the header must be exactly"):
        read_trace(write(tmp_path, header="time,labels,duration"))


def test_empty_file_is_a_bad_header(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(ValueError, match=":1:"):
        read_trace(path)


@pytest.mark.parametrize(("row", "message"), [
    ("2026-01-05T08:00:00,linux,30", "not in UTC"),  # no zone: ambiguous
    ("2026-01-05T08:00:00+01:00,linux,30", "not in UTC"),
    ("yesterday,linux,30", "Invalid isoformat"),
    ("2026-01-05T08:00:00Z,,30", "labels"),
    ("2026-01-05T08:00:00Z,linux;;x64,30", "labels"),
    ("2026-01-05T08:00:00Z,linux,-1", "duration_s"),
    ("2026-01-05T08:00:00Z,linux,nan", "duration_s"),
    ("2026-01-05T08:00:00Z,linux,soon", "could not convert"),
    ("2026-01-05T08:00:00Z,linux", "expected 3 fields"),
])
def test_a_bad_row_names_its_line(tmp_path, row, message):
    path = write(tmp_path, "2026-01-05T07:00:00Z,linux,30", row)
    with pytest.raises(ValueError, match=rf"trace.csv:3: .*{message}"):
        read_trace(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read trace"):
        read_trace(tmp_path / "absent.csv")


def test_write_refuses_labels_that_would_not_read_back(tmp_path):
    with pytest.raises(ValueError, match="labels"):
        write_trace(tmp_path / "t.csv", [TraceJob(MONDAY, ("a;b",), 1.0)])


def test_buckets_route_and_count_runner_seconds_at_arrival(pools):
    jobs = [TraceJob(MONDAY + 10, SMALL, 100.0), TraceJob(MONDAY + 20, SMALL, 50.0),
            TraceJob(MONDAY + BUCKET_S * 2 + 1, LARGE, 4000.0),
            TraceJob(MONDAY + 30, ("self-hosted", "LINUX", "x64", "GPU"), 7.0)]
    result = buckets(jobs, pools)
    assert set(result) == {"linux-small", "linux-large", "gpu"}
    small, large, gpu = result["linux-small"], result["linux-large"], result["gpu"]
    assert small.start == large.start == MONDAY and len(small) == len(large) == len(gpu) == 3
    assert small.arrivals == [2, 0, 0] and small.runner_s == [150.0, 0.0, 0.0]
    # A long job's whole duration counts where it arrived: what the pool must provision for.
    assert large.arrivals == [0, 0, 1] and large.runner_s == [0.0, 0.0, 4000.0]
    assert gpu.arrivals == [1, 0, 0]  # labels match case-insensitively
    assert not result.unrouted
    assert sim_owner(pools) == SIM_OWNER


def test_unrouted_and_out_of_span_jobs_are_counted_not_dropped(pools, caplog):
    jobs = [TraceJob(MONDAY, ("windows",), 10.0), TraceJob(MONDAY + 5, SMALL, 10.0),
            TraceJob(MONDAY + 10 * BUCKET_S, SMALL, 10.0)]
    result = buckets(jobs, pools, start=MONDAY, end=MONDAY + 3 * BUCKET_S)
    assert result.unrouted == {"no_matching_pool": 1, "outside_span": 1}
    assert sum(result["linux-small"].arrivals) == 1
    assert "2 job(s) not counted" in caplog.text


def test_buckets_of_no_jobs_are_empty_series(pools):
    result = buckets([], pools)
    assert all(len(series) == 0 for series in result.values())


def test_series_rejects_a_start_off_the_grid_and_unequal_lengths():
    with pytest.raises(ValueError, match="multiple of 300"):
        Series("p", 10.0, [0], [0.0])
    with pytest.raises(ValueError, match="1 arrival buckets but 2"):
        Series("p", 0.0, [0], [0.0, 1.0])


def test_window_slices_whole_buckets_inside_the_series():
    series = Series("p", MONDAY, [1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0])
    part = series.window(MONDAY + BUCKET_S, MONDAY + 3 * BUCKET_S)
    assert (part.start, part.arrivals, part.runner_s) == (MONDAY + BUCKET_S, [2, 3], [2.0, 3.0])
    assert part.end == MONDAY + 3 * BUCKET_S
    with pytest.raises(ValueError, match="not whole buckets inside"):
        series.window(MONDAY, MONDAY + 5 * BUCKET_S)


def test_a_byte_order_mark_before_the_header_is_accepted(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbftimestamp,labels,duration_s\n2026-01-05T00:00:00Z,linux,5\n")
    assert read_trace(path) == [TraceJob(MONDAY, ("linux",), 5.0)]
