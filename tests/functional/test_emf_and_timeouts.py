"""Over loopback sockets: the executor's EMF reaches a CloudWatch agent's EMF endpoint (a local
listener standing in for it), and the webhook's boto3 calls give up within GitHub's 10 s."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from chalicelib import aws
from chalicelib.telemetry import AgentSink, Telemetry, default_sink
from tests.conftest import wait_for

GITHUB_WEBHOOK_TIMEOUT_S = 10


@pytest.fixture(autouse=True)
def session_emf_log(monkeypatch):
    """These tests' own calls and blobs are not a deployable's: not recorded (the session's
    EMF log is handed to the test that drives the real webhook)."""
    saved = os.environ.get("RUNNERHUB_EMF_LOG")
    monkeypatch.delenv("RUNNERHUB_AWS_CALL_LOG", raising=False)
    monkeypatch.delenv("RUNNERHUB_EMF_LOG", raising=False)
    return saved


class Listener:
    """A TCP listener that keeps what it reads, line by line; `silent` accepts and never
    answers (a hung endpoint)."""

    def __init__(self, silent: bool = False) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.lines: list[str] = []
        self.connections: list[socket.socket] = []
        self.silent = silent
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections.append(conn)
            if not self.silent:
                threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        buffer = b""
        while chunk := conn.recv(65536):
            buffer += chunk
            *done, buffer = buffer.split(b"\n")
            self.lines += [line.decode() for line in done]

    def drop_connections(self) -> None:
        for conn in self.connections:
            if conn.fileno() != -1:
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()

    def close(self) -> None:
        self.server.close()
        self.drop_connections()


@pytest.fixture
def agent():
    listener = Listener()
    yield listener
    listener.close()


def test_executor_emf_reaches_the_agent_endpoint_with_its_log_group(agent):
    sink = AgentSink(f"tcp://127.0.0.1:{agent.port}", "/runnerhub/test/executor")
    telemetry = Telemetry("executor", sink=sink, autoflush=True)
    telemetry.measure("PickupSeconds", 1.25, "Seconds", {"pool": "cpu"})
    telemetry.count("Something")
    assert wait_for(lambda: len(agent.lines) == 2, timeout=5)
    first, second = (json.loads(line) for line in agent.lines)
    (directive,) = first["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == "RunnerHub"
    assert directive["Dimensions"] == [["pool"]]
    assert directive["Metrics"] == [{"Name": "PickupSeconds", "Unit": "Seconds"}]
    assert (first["pool"], first["PickupSeconds"]) == ("cpu", [1.25])
    assert first["log_group_name"] == "/runnerhub/test/executor"
    assert (second["service"], second["Something"]) == ("executor", [1.0])
    assert sink.dropped == 0
    sink.close()


def test_agent_restart_reconnects_without_losing_the_next_blob(agent):
    sink = AgentSink(f"tcp://127.0.0.1:{agent.port}")
    telemetry = Telemetry("executor", sink=sink, autoflush=True)
    telemetry.count("Before")
    assert wait_for(lambda: len(agent.lines) == 1, timeout=5)
    agent.drop_connections()  # the agent restarted: our connection is dead
    time.sleep(0.1)
    # The first write after a peer close may still "succeed" into the kernel buffer; the
    # next ones fail and reconnect. Bounded: a few blobs, each sent at most twice.
    for _ in range(5):
        telemetry.count("After")
        if wait_for(lambda: any('"After"' in line for line in agent.lines), timeout=0.5):
            break
    assert any('"After"' in line for line in agent.lines)
    assert "log_group_name" not in json.loads(agent.lines[0])  # no group: the agent's default
    sink.close()


def test_agent_down_drops_and_counts_never_raises_never_hangs():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    sink = AgentSink(f"tcp://127.0.0.1:{port}")
    telemetry = Telemetry("executor", sink=sink, autoflush=True)
    started = time.monotonic()
    telemetry.measure("SlotsBusy", 2, "Count", {"pool": "cpu"})
    assert time.monotonic() - started < 2.5
    assert sink.dropped == 1


def test_udp_endpoint_gets_one_datagram_per_blob():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(5)
        sink = AgentSink(f"udp://127.0.0.1:{receiver.getsockname()[1]}")
        Telemetry("executor", sink=sink, autoflush=True).measure(
            "SlotsFree", 3, "Count", {"pool": "cpu"})
        blob = json.loads(receiver.recv(65536))
    assert blob["SlotsFree"] == [3.0] and blob["pool"] == "cpu"


@pytest.mark.parametrize("endpoint", ["127.0.0.1:25888", "http://127.0.0.1:25888",
                                      "tcp://127.0.0.1", "tcp://:25888"])
def test_bad_endpoint_is_refused_by_name(endpoint):
    with pytest.raises(ValueError, match="RUNNERHUB_EMF_ENDPOINT"):
        AgentSink(endpoint)


def test_endpoint_setting_chooses_the_agent_else_stdout(monkeypatch):
    monkeypatch.setenv("RUNNERHUB_EMF_ENDPOINT", "tcp://127.0.0.1:25888")
    monkeypatch.setenv("RUNNERHUB_EMF_LOG_GROUP", "/runnerhub/dev/executor")
    sink = default_sink()
    assert isinstance(sink, AgentSink) and sink.log_group == "/runnerhub/dev/executor"
    monkeypatch.delenv("RUNNERHUB_EMF_ENDPOINT")
    assert not isinstance(default_sink(), AgentSink)


def test_webhook_profile_fits_githubs_ten_seconds_and_others_keep_theirs():
    assert aws.WEBHOOK_PROFILE.worst_case_s() <= GITHUB_WEBHOOK_TIMEOUT_S - 3
    assert aws.DEFAULT_PROFILE.read_s > aws.WEBHOOK_PROFILE.read_s
    assert aws.PROFILES.get(aws.EXECUTOR, aws.DEFAULT_PROFILE) is aws.DEFAULT_PROFILE
    assert aws.PROFILES.get(aws.RECONCILER, aws.DEFAULT_PROFILE) is aws.DEFAULT_PROFILE
    # The management API: one call gives up well inside API Gateway's 29 s.
    assert aws.API_PROFILE.worst_case_s() <= 29 / 2


def test_webhook_call_to_a_hung_endpoint_gives_up_within_its_profile(monkeypatch):
    """DynamoDB accepts the connection and never answers: the webhook's client tries
    `attempts` times, each cut at `read_s`, and raises well inside GitHub's 10 s."""
    from botocore.exceptions import ReadTimeoutError

    hung = Listener(silent=True)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{hung.port}")
    try:
        client = aws.client("dynamodb", aws.WEBHOOK)
        started = time.monotonic()
        with pytest.raises(ReadTimeoutError):
            client.get_item(TableName="jobs", Key={"job_id": {"N": "1"}})
        elapsed = time.monotonic() - started
    finally:
        hung.close()
    profile = aws.WEBHOOK_PROFILE
    assert len(hung.connections) == profile.attempts
    assert profile.attempts * profile.read_s * 0.9 <= elapsed <= profile.worst_case_s() + 0.5


def test_webhook_counts_every_answer_by_its_status_class(aws_endpoint, unique, monkeypatch,
                                                         tmp_path, session_emf_log):
    """Through the whole Lambda handler: an accepted ping (2xx), a forged signature (4xx) and
    a DynamoDB table that is not there (5xx), each counted as WebhookAnswered{status} in the
    EMF it flushes (into the session's EMF log: tests/infra/test_monitoring.py reads it)."""
    from devstack.webhook_stack import webhook_stack
    from tests.conftest import TEST_POOLS, example

    emf_log = Path(session_emf_log or tmp_path / "emf.jsonl")
    monkeypatch.setenv("RUNNERHUB_EMF_LOG", str(emf_log))
    before = emf_log.stat().st_size if emf_log.exists() else 0
    with webhook_stack(TEST_POOLS, unique) as stack:
        assert stack.post(example("ping"), event="ping")[0] == 200
        assert stack.post(example("ping"), event="ping", secret=b"forged")[0] == 401
        stack.dynamodb.delete_table(TableName=stack.settings.jobs_table)  # every move fails
        status, _ = stack.post(example("workflow_job.queued"))
    assert status >= 500
    answered = {}
    for line in emf_log.read_bytes()[before:].decode().splitlines():
        blob = json.loads(line)
        if "WebhookAnswered" in blob:
            answered[blob["status"]] = answered.get(blob["status"], 0) + blob["WebhookAnswered"][0]
    assert answered == {"2xx": 1, "4xx": 1, "5xx": 1}
