"""The outage proxy in front of the moto server: bytes pass unchanged, boto3 calls fail while
it is down (open connections and long-polls included) and succeed after, with moto's data
intact, and the proxy reports how long it was down."""

from __future__ import annotations

import socket
import threading
import time

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from devstack.outage_proxy import OutageProxy

FAST_FAIL = Config(
    retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=1, read_timeout=10
)


@pytest.fixture
def proxy(local_aws):
    with OutageProxy(local_aws.endpoint_url) as p:
        yield p


def client(service: str, proxy: OutageProxy):
    return boto3.client(service, endpoint_url=proxy.endpoint_url, config=FAST_FAIL)


def make_table(dynamodb, name: str) -> None:
    dynamodb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )


def fails_to_connect(call) -> bool:
    try:
        call()
    except BotoCoreError:  # EndpointConnectionError, ConnectionClosedError, ...
        return True
    except ClientError:
        return False  # an AWS answer got through: no outage
    return False


@pytest.mark.parametrize("mode", ["refuse", "reset"])
def test_boto3_fails_during_an_outage_and_finds_its_data_after(local_aws, unique, mode):
    with OutageProxy(local_aws.endpoint_url, mode=mode) as proxy:
        dynamodb = client("dynamodb", proxy)
        table = f"outage-{unique}"
        make_table(dynamodb, table)
        dynamodb.put_item(TableName=table, Item={"pk": {"S": "job-1"}, "v": {"N": "1"}})

        proxy.down()
        assert proxy.is_down
        assert fails_to_connect(
            lambda: dynamodb.get_item(TableName=table, Key={"pk": {"S": "job-1"}})
        )
        assert fails_to_connect(
            lambda: dynamodb.put_item(TableName=table, Item={"pk": {"S": "job-2"}})
        )
        time.sleep(0.2)
        proxy.up()

        item = dynamodb.get_item(TableName=table, Key={"pk": {"S": "job-1"}})["Item"]
        assert item == {"pk": {"S": "job-1"}, "v": {"N": "1"}}
        assert "Item" not in dynamodb.get_item(TableName=table, Key={"pk": {"S": "job-2"}})
        assert 0.2 <= proxy.outage_seconds < 5
        assert proxy.report()["outages"] == 1 and not proxy.report()["down"]


def test_an_outage_cuts_a_pending_long_poll(proxy, unique):
    sqs = client("sqs", proxy)
    url = sqs.create_queue(QueueName=f"outage-{unique}")["QueueUrl"]
    outcome: dict = {}

    def long_poll():
        start = time.monotonic()
        outcome["failed"] = fails_to_connect(
            lambda: sqs.receive_message(QueueUrl=url, WaitTimeSeconds=10)
        )
        outcome["took"] = time.monotonic() - start

    poller = threading.Thread(target=long_poll)
    poller.start()
    time.sleep(0.3)  # the poll is waiting inside moto
    proxy.outage(0.5)
    poller.join(5)
    assert not poller.is_alive()
    assert outcome["failed"] and outcome["took"] < 3
    deadline = time.monotonic() + 3
    while proxy.is_down and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not proxy.is_down  # the timer brought it back
    # moto's side of the cut poll may still be waiting on the first queue and would take a
    # message sent there (as SQS would: it reappears after the visibility timeout).
    other = sqs.create_queue(QueueName=f"outage-{unique}-after")["QueueUrl"]
    sqs.send_message(QueueUrl=other, MessageBody="after")
    got = sqs.receive_message(QueueUrl=other, WaitTimeSeconds=1)["Messages"]
    assert [m["Body"] for m in got] == ["after"]
    assert sqs.get_queue_url(QueueName=f"outage-{unique}")["QueueUrl"] == url
    assert 0.5 <= proxy.outage_seconds < 2


def test_outage_wait_blocks_until_up(proxy):
    start = time.monotonic()
    proxy.outage(0.3, wait=True)
    assert not proxy.is_down and time.monotonic() - start >= 0.3


@pytest.fixture
def echo_server():
    """A raw TCP echo server: the proxy must pass bytes both ways unchanged."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept():
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()
    stop.set()
    thread.join(2)
    listener.close()


def roundtrip(address, payload: bytes) -> bytes:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def test_raw_bytes_pass_both_ways_and_connections_are_bounded(echo_server):
    with OutageProxy(echo_server, max_connections=1) as proxy:
        address = ("127.0.0.1", proxy.port)
        payload = bytes(range(256)) * 4096  # 1 MiB
        assert roundtrip(address, payload) == payload
        deadline = time.monotonic() + 2
        while proxy.report()["open"] and time.monotonic() < deadline:
            time.sleep(0.01)  # the proxy closes its side just after the client saw the end

        held = socket.create_connection(address, timeout=5)
        held.sendall(b"x")
        assert held.recv(1) == b"x"  # the one allowed connection is up
        try:
            extra = socket.create_connection(address, timeout=5)
        except ConnectionResetError:
            pass  # reset before connect() returned: turned away all the same
        else:
            assert _turned_away(extra)  # over the bound
            extra.close()

        proxy.down()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=2)
        assert _turned_away(held)  # the open connection was cut
        held.close()
        proxy.up()
        assert roundtrip(address, b"again") == b"again"
        assert proxy.report()["refused"] >= 1 and proxy.report()["cut"] >= 1


def _turned_away(sock: socket.socket) -> bool:
    """An end of stream or a reset, promptly: the proxy closed this connection."""
    sock.settimeout(2)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
