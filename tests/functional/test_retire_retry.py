"""A retirement whose answer was lost: botocore retries the conditional write, which the first
attempt's own change then refuses. The retry must read as retired (it is, by us), not as
refused; another retirer's or an earlier one's must not."""

from __future__ import annotations

from chalicelib import aws, resources
from chalicelib.hosts import DynamoHostStore, HostState
from devstack.resources import create_tables
from tests.functional.test_scaler_http import beat


def test_a_retried_retirement_is_recognised_as_ours(aws_endpoint, unique):
    client = aws.client("dynamodb")
    names = {spec.logical_name: f"rh-{unique}-{spec.default_name.removeprefix('runnerhub-')}"
             for spec in resources.TABLES}
    create_tables(client, names)
    hosts = DynamoHostStore(client, names["hosts_table"])
    beat(hosts, "h1", 100.0, busy_at=10.0)
    assert hosts.retire("h1", 101.25, fresh_after=70.0, by="scaler-a") is True
    # The same request again (botocore's retry after a lost answer): ours, so retired.
    assert hosts.retire("h1", 101.25, fresh_after=70.0, by="scaler-a") is True
    # Another run, or a later one of ours: refused, the host is not theirs to retire again.
    assert hosts.retire("h1", 101.25, fresh_after=70.0, by="scaler-b") is False
    assert hosts.retire("h1", 130.0, fresh_after=70.0, by="scaler-a") is False
    assert hosts.get("h1").state is HostState.RETIRING
