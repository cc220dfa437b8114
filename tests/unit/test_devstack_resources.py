"""devstack/resources.py: the local tables and queues."""

from __future__ import annotations

from moto import mock_aws

from chalicelib import aws
from chalicelib.resources import TABLES
from devstack.resources import create_tables


def test_creating_the_tables_twice_is_idempotent_past_the_first_page_of_tables():
    """A session's moto server holds many tests' tables: ListTables answers 100 a page, and a
    table on a later page must be seen as existing (else CreateTable refuses it)."""
    with mock_aws():
        client = aws.client("dynamodb")
        for n in range(101):  # sorted before "runnerhub-": the defaults land on page 2
            client.create_table(TableName=f"a-{n:03}", BillingMode="PAY_PER_REQUEST",
                                AttributeDefinitions=[{"AttributeName": "k",
                                                       "AttributeType": "S"}],
                                KeySchema=[{"AttributeName": "k", "KeyType": "HASH"}])
        first = create_tables(client)
        assert create_tables(client) == first
        assert set(first.values()) == {spec.default_name for spec in TABLES}
