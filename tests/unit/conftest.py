"""Unit-tier fixtures shared by several modules."""

from __future__ import annotations

import pytest
from moto import mock_aws

from chalicelib import aws
from chalicelib.jobs import DynamoJobStore
from chalicelib.memory import InMemoryJobStore
from chalicelib.resources import JOBS_TABLE
from devstack.resources import create_tables


@pytest.fixture(params=["memory", "dynamodb"])
def store(request):
    """The jobs store, once in memory and once on DynamoDB (moto): the same moves must hold."""
    if request.param == "memory":
        yield InMemoryJobStore()
        return
    with mock_aws():
        client = aws.client("dynamodb")
        create_tables(client)
        yield DynamoJobStore(client, JOBS_TABLE.default_name)
