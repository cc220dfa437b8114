"""A DynamoDB stream poller: Lambda's event source mapping, played locally.

In AWS the jobs table's stream invokes the scaler's function with batches of records. moto
serves the stream (`DescribeStream`, `GetShardIterator`, `GetRecords`) but invokes nothing, so
this poller reads every shard from its latest position and hands each non-empty batch to the
same handler, shaped as Lambda shapes it (`{"Records": [...]}` with `eventSourceARN`).
A handler that raises is retried with the same batch on the next poll, as Lambda retries a
failed batch; the error is kept for the caller to show.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from chalicelib import aws
from devstack.stack import environ

Handler = Callable[[dict[str, Any]], Any]


class StreamPoller:
    def __init__(self, env: dict[str, str], table: str, handler: Handler,
                 poll_s: float = 0.25, batch_size: int = 100) -> None:
        self._env = env
        self._table = table
        self._handler = handler
        self._poll_s = poll_s
        self._batch_size = batch_size
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.records = 0
        self.errors: list[str] = []

    def start(self) -> StreamPoller:
        with environ(self._env):
            # Set-up, not the scaler's call: in AWS the event source mapping is given the ARN.
            dynamodb = aws.client("dynamodb", aws.UNLABELLED)
            self._arn = dynamodb.describe_table(TableName=self._table)["Table"].get(
                "LatestStreamArn")
        if not self._arn:
            raise ValueError(f"table {self._table} has no stream (StreamSpecification)")
        with environ(self._env):
            self._streams = aws.client("dynamodbstreams")
            self._iterators = {
                shard["ShardId"]: self._streams.get_shard_iterator(
                    StreamArn=self._arn, ShardId=shard["ShardId"],
                    ShardIteratorType="LATEST")["ShardIterator"]
                for shard in self._shards()
            }
        self._thread = threading.Thread(target=self._run, name="stream-poller", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _shards(self) -> list[dict[str, Any]]:
        return self._streams.describe_stream(StreamArn=self._arn)["StreamDescription"]["Shards"]

    def _run(self) -> None:
        with environ(self._env):
            while not self._stop.is_set():
                try:
                    self._poll()
                except Exception as exc:  # noqa: BLE001 - kept for the caller; polling goes on
                    self.errors.append(repr(exc))
                self._stop.wait(self._poll_s)

    def _poll(self) -> None:
        for shard in self._shards():
            shard_id = shard["ShardId"]
            if shard_id not in self._iterators:  # a new shard: read it from its start
                self._iterators[shard_id] = self._streams.get_shard_iterator(
                    StreamArn=self._arn, ShardId=shard_id,
                    ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        for shard_id, iterator in list(self._iterators.items()):
            page = self._streams.get_records(ShardIterator=iterator, Limit=self._batch_size)
            records = page.get("Records", [])
            if records:
                event = {"Records": [{**record, "eventSourceARN": self._arn}
                                     for record in records]}
                self._handler(event)  # raises: the same iterator is read again next time
                self.batches += 1
                self.records += len(records)
            next_iterator = page.get("NextShardIterator")
            if next_iterator:
                self._iterators[shard_id] = next_iterator
            else:
                del self._iterators[shard_id]  # the shard closed
