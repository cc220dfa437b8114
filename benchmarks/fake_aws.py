"""In-memory stand-ins for the boto3 DynamoDB and SQS *clients* the webhook uses.

They take the same keyword arguments as boto3's low-level clients and answer with the same
shapes (AttributeValue items, `Attributes` on ALL_NEW, `MessageId`/`SequenceNumber` from a FIFO
send), and a failed condition raises the client's own `ConditionalCheckFailedException` (a
botocore `ClientError`, carrying the old item under `Item` when ALL_OLD was asked for). So the
deployed store code (update and condition building, the attribute codec, the SQS send) runs
unchanged on top of them; only the network and the service are replaced.

Implemented: DynamoDB `get_item`, `put_item`, `update_item`, `delete_item` with the expression
subset RunnerHub writes (SET with `+`/`-`/`if_not_exists`, REMOVE; conditions with AND/OR/NOT,
parentheses, comparisons, IN, attribute_exists/attribute_not_exists), including DynamoDB's
refusal of unused or undefined expression names and values; SQS `get_queue_url` and
`send_message` with FIFO de-duplication. Anything else raises AttributeError.

Every call's CPU and wall time is added to a `Meter`, so a benchmark can tell the time spent in
the fake (standing in for the network and the service) from its own.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import time
import uuid
from collections.abc import Callable, Iterable
from decimal import Decimal
from functools import cache, wraps
from typing import Any

REGION = "us-east-1"
ACCOUNT = "123456789012"
FIFO_DEDUP_WINDOW_S = 300.0


class Meter:
    """CPU (thread) and wall seconds spent inside the fake clients, and the number of calls."""

    def __init__(self) -> None:
        self.cpu = 0.0
        self.wall = 0.0
        self.calls = 0


def _metered(method: Callable) -> Callable:
    @wraps(method)
    def call(self, **request: Any) -> Any:
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            return method(self, **request)
        finally:
            meter = self.meter
            meter.cpu += time.thread_time() - cpu
            meter.wall += time.perf_counter() - wall
            meter.calls += 1

    return call


@cache
def _exceptions(service: str) -> Any:
    """botocore's own modeled exception classes for `service` (built once, offline)."""
    import botocore.session

    session = botocore.session.get_session()
    client = session.create_client(service, region_name=REGION, aws_access_key_id="fake",
                                   aws_secret_access_key="fake")
    return client.exceptions


def _metadata() -> dict[str, Any]:
    return {"RequestId": uuid.uuid4().hex, "HTTPStatusCode": 200, "HTTPHeaders": {},
            "RetryAttempts": 0}


def _error(exceptions: Any, name: str, code: str, message: str, operation: str,
           status: int = 400, **extra: Any) -> Exception:
    response = {"Error": {"Code": code, "Message": message},
                "ResponseMetadata": {**_metadata(), "HTTPStatusCode": status}, **extra}
    cls = getattr(exceptions, name, None) or exceptions.ClientError
    return cls(response, operation)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


# --- expressions ------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(<>|<=|>=|[=<>(),+\-]|#[A-Za-z0-9_]+|:[A-Za-z0-9_]+|[A-Za-z_][A-Za-z0-9_]*)")
_KEYWORDS = {"AND", "OR", "NOT", "IN", "SET", "REMOVE", "ADD", "DELETE", "BETWEEN"}


class ExpressionError(ValueError):
    pass


def _tokens(text: str) -> list[str]:
    tokens, position = [], 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match:
            raise ExpressionError(f"invalid syntax near {text[position:position + 20]!r}")
        tokens.append(match.group(1))
        position = match.end()
    return tokens


class _Parser:
    """Compiles an expression to closures over (item, names, values); records which `#names`
    and `:values` it refers to."""

    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.at = 0
        self.names: set[str] = set()
        self.values: set[str] = set()

    def peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token.upper() != expected):
            raise ExpressionError(f"expected {expected or 'a token'}, found {token!r}")
        self.at += 1
        return token

    def done(self) -> None:
        if self.peek() is not None:
            raise ExpressionError(f"unexpected {self.peek()!r}")

    # operands

    def path(self) -> Callable[[dict], str]:
        token = self.take()
        if token.startswith("#"):
            self.names.add(token)
            return lambda names, t=token: _resolve(names, t)
        if token.startswith(":") or token.upper() in _KEYWORDS or token in "(),=<>+-":
            raise ExpressionError(f"expected an attribute, found {token!r}")
        return lambda names, t=token: t

    def operand(self) -> Callable:
        """(item, names, values) -> AttributeValue or None (missing)."""
        token = self.peek()
        if token is not None and token.startswith(":"):
            self.take()
            self.values.add(token)
            return lambda item, names, values, t=token: _value(values, t)
        if token is not None and token.lower() == "if_not_exists":
            self.take()
            self.take("(")
            path = self.path()
            self.take(",")
            default = self.operand()
            self.take(")")
            return lambda item, names, values: (
                item.get(path(names)) if path(names) in item else default(item, names, values))
        path = self.path()
        return lambda item, names, values: item.get(path(names))

    # conditions

    def condition(self) -> Callable[[dict, dict, dict], bool]:
        left = self.conjunction()
        while (self.peek() or "").upper() == "OR":
            self.take()
            right = self.conjunction()
            left = (lambda a, b: lambda *args: a(*args) or b(*args))(left, right)
        return left

    def conjunction(self) -> Callable:
        left = self.negation()
        while (self.peek() or "").upper() == "AND":
            self.take()
            right = self.negation()
            left = (lambda a, b: lambda *args: a(*args) and b(*args))(left, right)
        return left

    def negation(self) -> Callable:
        if (self.peek() or "").upper() == "NOT":
            self.take()
            inner = self.negation()
            return lambda *args: not inner(*args)
        return self.primary()

    def primary(self) -> Callable:
        token = self.peek()
        if token == "(":
            self.take()
            inner = self.condition()
            self.take(")")
            return inner
        if token is not None and token.lower() in ("attribute_exists", "attribute_not_exists"):
            self.take()
            self.take("(")
            path = self.path()
            self.take(")")
            exists = token.lower() == "attribute_exists"
            return lambda item, names, values: (path(names) in item) == exists
        left = self.operand()
        operator = self.take()
        if operator.upper() == "IN":
            self.take("(")
            options = [self.operand()]
            while self.peek() == ",":
                self.take()
                options.append(self.operand())
            self.take(")")
            return lambda item, names, values: any(
                _compare("=", left(item, names, values), option(item, names, values))
                for option in options)
        if operator not in ("=", "<>", "<", "<=", ">", ">="):
            raise ExpressionError(f"unsupported operator {operator!r}")
        right = self.operand()
        return lambda item, names, values: _compare(
            operator, left(item, names, values), right(item, names, values))

    # updates

    def update(self) -> tuple[list[tuple[Callable, Callable]], list[Callable]]:
        sets: list[tuple[Callable, Callable]] = []
        removes: list[Callable] = []
        seen: set[str] = set()
        while self.peek() is not None:
            clause = self.take().upper()
            if clause in seen or clause not in ("SET", "REMOVE"):
                raise ExpressionError(f"unsupported or repeated clause {clause}")
            seen.add(clause)
            while True:
                if clause == "SET":
                    path = self.path()
                    self.take("=")
                    sets.append((path, self.sum()))
                else:
                    removes.append(self.path())
                if self.peek() != ",":
                    break
                self.take()
        if not sets and not removes:
            raise ExpressionError("empty update expression")
        return sets, removes

    def sum(self) -> Callable:
        left = self.operand()
        if self.peek() in ("+", "-"):
            sign = 1 if self.take() == "+" else -1
            right = self.operand()
            return lambda item, names, values: _add(
                left(item, names, values), right(item, names, values), sign)
        return left


def _resolve(names: dict[str, str], token: str) -> str:
    try:
        return names[token]
    except KeyError:
        raise ExpressionError(
            f"An expression attribute name used in the document path is not defined; "
            f"attribute name: {token}") from None


def _value(values: dict[str, Any], token: str) -> Any:
    try:
        return values[token]
    except KeyError:
        raise ExpressionError(
            f"An expression attribute value used in expression is not defined; "
            f"attribute value: {token}") from None


def _scalar(value: dict[str, Any]) -> tuple[str, Any]:
    (kind, raw), = value.items()
    return kind, Decimal(raw) if kind == "N" else raw


def _compare(operator: str, left: Any, right: Any) -> bool:
    if left is None or right is None:
        return False  # a missing attribute satisfies no comparison (not even <>)
    left_kind, a = _scalar(left)
    right_kind, b = _scalar(right)
    if operator == "=":
        return left_kind == right_kind and a == b
    if operator == "<>":
        return not (left_kind == right_kind and a == b)
    if left_kind != right_kind or left_kind not in ("N", "S", "B"):
        return False
    return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[operator]


def _add(left: Any, right: Any, sign: int) -> dict[str, str]:
    if left is None or right is None:
        raise ExpressionError("The provided expression refers to an attribute that does not "
                              "exist in the item")
    if "N" not in left or "N" not in right:
        raise ExpressionError("An operand in the update expression has an incorrect data type")
    return {"N": str(Decimal(left["N"]) + sign * Decimal(right["N"]))}


@cache
def _condition(text: str) -> tuple[Callable, frozenset[str], frozenset[str]]:
    parser = _Parser(text)
    compiled = parser.condition()
    parser.done()
    return compiled, frozenset(parser.names), frozenset(parser.values)


@cache
def _update(text: str) -> tuple[list, list, frozenset[str], frozenset[str]]:
    parser = _Parser(text)
    sets, removes = parser.update()
    parser.done()
    return sets, removes, frozenset(parser.names), frozenset(parser.values)


# --- DynamoDB -----------------------------------------------------------------------------------


class FakeDynamoDB:
    """Tables by name, each a dict from its partition key value to an AttributeValue item."""

    def __init__(self, tables: dict[str, str], meter: Meter | None = None) -> None:
        """`tables`: table name -> partition key attribute name."""
        self.meter = meter or Meter()
        self.exceptions = _exceptions("dynamodb")
        self.keys = dict(tables)
        self.tables: dict[str, dict[Any, dict]] = {name: {} for name in tables}

    # helpers

    def _table(self, name: str, operation: str) -> tuple[dict, str]:
        if name not in self.tables:
            raise _error(self.exceptions, "ResourceNotFoundException",
                         "ResourceNotFoundException", "Requested resource not found",
                         operation)
        return self.tables[name], self.keys[name]

    def _key(self, key: dict, key_name: str, operation: str) -> Any:
        if set(key) != {key_name}:
            raise self._validation(
                "The provided key element does not match the schema", operation)
        (kind, raw), = key[key_name].items()
        return kind, raw

    def _validation(self, message: str, operation: str) -> Exception:
        return _error(self.exceptions, "ClientError", "ValidationException", message, operation)

    def _check(self, operation: str, condition: str | None, update: str | None,
               names: dict | None, values: dict | None) -> tuple[Callable | None, Any]:
        """Compile the expressions and refuse unused or undefined names and values, as
        DynamoDB does (ValidationException)."""
        names, values = names or {}, values or {}
        used_names: set[str] = set()
        used_values: set[str] = set()
        test = compiled_update = None
        try:
            if condition is not None:
                test, cond_names, cond_values = _condition(condition)
                used_names |= cond_names
                used_values |= cond_values
            if update is not None:
                sets, removes, upd_names, upd_values = _update(update)
                compiled_update = (sets, removes)
                used_names |= upd_names
                used_values |= upd_values
        except ExpressionError as exc:
            raise self._validation(f"Invalid expression: {exc}", operation) from None
        if set(names) - used_names:
            raise self._validation(
                "Value provided in ExpressionAttributeNames unused in expressions: keys: {"
                + ", ".join(sorted(set(names) - used_names)) + "}", operation)
        if set(values) - used_values:
            raise self._validation(
                "Value provided in ExpressionAttributeValues unused in expressions: keys: {"
                + ", ".join(sorted(set(values) - used_values)) + "}", operation)
        if used_names - set(names) or used_values - set(values):
            missing = sorted((used_names - set(names)) | (used_values - set(values)))
            raise self._validation(
                f"Invalid expression: undefined expression attribute: {missing[0]}", operation)
        return test, compiled_update

    def _failed(self, old: dict | None, return_old: str | None, operation: str) -> Exception:
        extra = {"Item": _copy(old)} if old is not None and return_old == "ALL_OLD" else {}
        return _error(self.exceptions, "ConditionalCheckFailedException",
                      "ConditionalCheckFailedException", "The conditional request failed",
                      operation, **extra)

    # the client calls

    @_metered
    def get_item(self, *, TableName: str, Key: dict, ConsistentRead: bool = False,
                 **unused: Any) -> dict:
        table, key_name = self._table(TableName, "GetItem")
        item = table.get(self._key(Key, key_name, "GetItem"))
        answer: dict[str, Any] = {"ResponseMetadata": _metadata()}
        if item is not None:
            answer["Item"] = _copy(item)
        return answer

    @_metered
    def put_item(self, *, TableName: str, Item: dict, ConditionExpression: str | None = None,
                 ExpressionAttributeNames: dict | None = None,
                 ExpressionAttributeValues: dict | None = None,
                 ReturnValues: str = "NONE",
                 ReturnValuesOnConditionCheckFailure: str | None = None) -> dict:
        table, key_name = self._table(TableName, "PutItem")
        if key_name not in Item:
            raise self._validation("One of the required keys was not given a value", "PutItem")
        key = self._key({key_name: Item[key_name]}, key_name, "PutItem")
        test, _ = self._check("PutItem", ConditionExpression, None, ExpressionAttributeNames,
                              ExpressionAttributeValues)
        old = table.get(key)
        if test is not None and not test(old or {}, ExpressionAttributeNames or {},
                                         ExpressionAttributeValues or {}):
            raise self._failed(old, ReturnValuesOnConditionCheckFailure, "PutItem")
        table[key] = _copy(Item)
        answer: dict[str, Any] = {"ResponseMetadata": _metadata()}
        if ReturnValues == "ALL_OLD" and old is not None:
            answer["Attributes"] = _copy(old)
        return answer

    @_metered
    def update_item(self, *, TableName: str, Key: dict, UpdateExpression: str,
                    ConditionExpression: str | None = None,
                    ExpressionAttributeNames: dict | None = None,
                    ExpressionAttributeValues: dict | None = None,
                    ReturnValues: str = "NONE",
                    ReturnValuesOnConditionCheckFailure: str | None = None) -> dict:
        table, key_name = self._table(TableName, "UpdateItem")
        key = self._key(Key, key_name, "UpdateItem")
        test, (sets, removes) = self._check("UpdateItem", ConditionExpression, UpdateExpression,
                                            ExpressionAttributeNames, ExpressionAttributeValues)
        names, values = ExpressionAttributeNames or {}, ExpressionAttributeValues or {}
        old = table.get(key)
        current = old or {}
        if test is not None and not test(current, names, values):
            raise self._failed(old, ReturnValuesOnConditionCheckFailure, "UpdateItem")
        try:
            # Every right-hand side reads the item as it was before this update.
            assigned = [(path(names), value(current, names, values)) for path, value in sets]
            removed = [path(names) for path in removes]
        except ExpressionError as exc:
            raise self._validation(str(exc), "UpdateItem") from None
        touched = [name for name, _ in assigned] + removed
        if key_name in touched:
            raise self._validation("Cannot update attribute " + key_name
                                   + ". This attribute is part of the key", "UpdateItem")
        if len(set(touched)) != len(touched):
            raise self._validation("Two document paths overlap with each other", "UpdateItem")
        for _, value in assigned:
            if value is None:
                raise self._validation("The provided expression refers to an attribute that "
                                       "does not exist in the item", "UpdateItem")
        item = _copy(current) if old is not None else {key_name: _copy(Key[key_name])}
        for name, value in assigned:
            item[name] = _copy(value)
        for name in removed:
            item.pop(name, None)
        table[key] = item
        answer: dict[str, Any] = {"ResponseMetadata": _metadata()}
        if ReturnValues == "ALL_NEW":
            answer["Attributes"] = _copy(item)
        elif ReturnValues == "ALL_OLD" and old is not None:
            answer["Attributes"] = _copy(old)
        elif ReturnValues in ("UPDATED_NEW", "UPDATED_OLD"):
            source = item if ReturnValues == "UPDATED_NEW" else current
            answer["Attributes"] = {n: _copy(source[n]) for n, _ in assigned if n in source}
        return answer

    @_metered
    def delete_item(self, *, TableName: str, Key: dict, **unused: Any) -> dict:
        table, key_name = self._table(TableName, "DeleteItem")
        table.pop(self._key(Key, key_name, "DeleteItem"), None)
        return {"ResponseMetadata": _metadata()}

    def items(self, table: str) -> list[dict]:
        return [_copy(item) for item in self.tables[table].values()]


# --- SQS ----------------------------------------------------------------------------------------


class FakeSqs:
    """FIFO queues by name; each keeps what was sent to it (bodies in send order)."""

    def __init__(self, queues: Iterable[str], meter: Meter | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.meter = meter or Meter()
        self.exceptions = _exceptions("sqs")
        self._clock = clock
        self.sent: dict[str, list[dict]] = {name: [] for name in queues}
        self._dedup: dict[tuple[str, str], tuple[float, str, str]] = {}
        self._sequence = itertools.count(18_800_000_000_000_000_000)

    @staticmethod
    def url_of(name: str) -> str:
        return f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/{name}"

    @_metered
    def get_queue_url(self, *, QueueName: str, **unused: Any) -> dict:
        if QueueName not in self.sent:
            raise _error(self.exceptions, "QueueDoesNotExist",
                         "AWS.SimpleQueueService.NonExistentQueue",
                         "The specified queue does not exist.", "GetQueueUrl")
        return {"QueueUrl": self.url_of(QueueName), "ResponseMetadata": _metadata()}

    @_metered
    def send_message(self, *, QueueUrl: str, MessageBody: str,
                     MessageGroupId: str | None = None,
                     MessageDeduplicationId: str | None = None,
                     **unused: Any) -> dict:
        name = QueueUrl.rsplit("/", 1)[-1]
        if QueueUrl != self.url_of(name) or name not in self.sent:
            raise _error(self.exceptions, "QueueDoesNotExist",
                         "AWS.SimpleQueueService.NonExistentQueue",
                         "The specified queue does not exist.", "SendMessage")
        if not MessageBody or len(MessageBody.encode()) > 256 * 1024:
            raise _error(self.exceptions, "ClientError", "InvalidParameterValue",
                         "The message body must be 1 byte to 256 KiB.", "SendMessage")
        if name.endswith(".fifo") and (not MessageGroupId or not MessageDeduplicationId):
            raise _error(self.exceptions, "ClientError", "MissingParameter",
                         "The request must contain the parameter MessageGroupId and, without "
                         "content-based deduplication, MessageDeduplicationId.", "SendMessage")
        now = self._clock()
        digest = hashlib.md5(MessageBody.encode(), usedforsecurity=False).hexdigest()
        seen = self._dedup.get((name, MessageDeduplicationId or ""))
        if seen is not None and now - seen[0] < FIFO_DEDUP_WINDOW_S:
            message_id, sequence = seen[1], seen[2]  # accepted, not delivered twice
        else:
            message_id, sequence = str(uuid.uuid4()), str(next(self._sequence))
            self._dedup[(name, MessageDeduplicationId or "")] = (now, message_id, sequence)
            self.sent[name].append({"MessageId": message_id, "Body": MessageBody,
                                    "MessageGroupId": MessageGroupId})
        answer = {"MD5OfMessageBody": digest, "MessageId": message_id,
                  "ResponseMetadata": _metadata()}
        if name.endswith(".fifo"):
            answer["SequenceNumber"] = sequence
        return answer
