"""The inventory's pure parts (executor/inventory.py): the container's listing parsed, Debian
version order (checked against dpkg itself), version specs, pools matched by digest or by name,
the S3 store (moto), and the CLI's bad input."""

from __future__ import annotations

import json
import shutil
import subprocess

import boto3
import pytest
from moto import mock_aws

from executor.inventory import (
    DirectoryStore,
    InventoryError,
    S3Store,
    compare_debian,
    main,
    matches,
    parse_listing,
    which,
)
from tests.conftest import require

HEX = "c0" * 32
ENTRY = {"image": "runnerhub/runner-linux-small:local", "digest": f"sha256:{HEX}",
         "repo_digests": [], "recorded_at": "2026-01-02T00:00:00+00:00",
         "dpkg": [{"name": "openssl", "version": "3.0.11-1~deb12u2"},
                  {"name": "bash", "version": "5.2.15-2+b2"}],
         "pip": [{"name": "Requests_OAuthlib", "version": "1.3.1"}]}

PAIRS = [("1.0", "1.0"), ("1.0~rc1", "1.0"), ("1.0", "1.0+b1"), ("1:0.9", "2.0"),
         ("3.0.11-1~deb12u2", "3.0.11-1"), ("3.0.11-1~deb12u2", "3.0.13-1~deb12u1"),
         ("5.2.15-2+b2", "5.2.15-2+b13"), ("1.2a", "1.2+"), ("2.36-9+deb12u4", "2.36-9"),
         ("1.0-1", "1.0.0-1"), ("9", "10"), ("0.1~~", "0.1~"), ("7.88.1-10+deb12u5", "7.88.1-10")]


@pytest.mark.parametrize(("a", "b"), PAIRS)
def test_debian_order_is_dpkgs(a, b):
    require(shutil.which("dpkg") is not None, "dpkg (a Debian host)")

    def dpkg(op: str) -> bool:
        return subprocess.run(["dpkg", "--compare-versions", a, op, b], check=False,
                              timeout=10).returncode == 0

    expected = -1 if dpkg("lt") else 1 if dpkg("gt") else 0
    assert compare_debian(a, b) == expected
    assert compare_debian(b, a) == -expected


def test_listing_with_pip_and_packages_known_but_not_installed():
    text = ("--runnerhub-inventory-dpkg--\nbash\t5.2.15-2+b2\nlibgone\t\ntini\t0.19.0-1\n"
            '--runnerhub-inventory-pip--\n[{"name": "pip", "version": "23.0.1"}]\n')
    dpkg, pip, source = parse_listing(text)
    assert dpkg == [{"name": "bash", "version": "5.2.15-2+b2"},
                    {"name": "tini", "version": "0.19.0-1"}]
    assert (pip, source) == ([{"name": "pip", "version": "23.0.1"}], "pip list")


def test_listing_without_pip_uses_metadata_and_without_python_says_none():
    base = "--runnerhub-inventory-dpkg--\nbash\t5.2\n--runnerhub-inventory-pip--\n"
    _, pip, source = parse_listing(base + '--runnerhub-inventory-metadata--\n'
                                          '[{"name": "six", "version": "1.16.0"}]\n')
    assert (pip, source) == ([{"name": "six", "version": "1.16.0"}], "importlib.metadata")
    assert parse_listing(base + "--runnerhub-inventory-metadata--\n")[1:] == ([], "none")
    with pytest.raises(InventoryError, match="unreadable"):
        parse_listing(base + "--runnerhub-inventory-metadata--\n[{oops\n")


@pytest.mark.parametrize(("version", "spec", "kind", "expected"), [
    ("3.0.11-1~deb12u2", "<3.0.13-1~deb12u1", "dpkg", True),
    ("3.0.11-1~deb12u2", ">=3.0.11-1", "dpkg", False),
    ("3.0.11-1~deb12u2", "3.0.11-1~deb12u2", "dpkg", True),
    ("5.2.15-2+b2", ">=5.2,<5.3", "dpkg", True),
    ("1.3.1", "<2", "pip", True), ("1.3.1", "1.3.1", "pip", True),
    ("1.3.1", ">=1.4,<2", "pip", False), ("not-a-version", "<2", "pip", False),
])
def test_version_specs(version, spec, kind, expected):
    assert matches(version, spec, kind) is expected


@pytest.mark.parametrize(("spec", "kind"), [("<<1", "dpkg"), ("<=", "dpkg"), ("~~1", "pip")])
def test_a_bad_spec_is_an_error_not_a_miss(spec, kind):
    with pytest.raises(InventoryError, match="bad version spec"):
        matches("1.0", spec, kind)


def test_pools_match_by_registry_digest_or_by_the_newest_record_of_a_name():
    manifest = "ab" * 32
    pushed = ENTRY | {"repo_digests": [f"123456789012.dkr.ecr.eu-west-1.amazonaws.com/"
                                       f"runnerhub/linux-small@sha256:{manifest}"]}
    older = ENTRY | {"digest": "sha256:" + "0d" * 32, "recorded_at": "2025-01-01T00:00:00"}
    pools = {"prod": f"123456789012.dkr.ecr.eu-west-1.amazonaws.com/runnerhub/linux-small@"
                     f"sha256:{manifest}",
             "local": "runnerhub/runner-linux-small:local", "other": "runnerhub/x:local"}
    found = which([pushed, older], "openssl", "<3.0.13", pools)
    assert [(c.digest, c.pools) for c in found] == [
        (older["digest"], ()), (ENTRY["digest"], ("local", "prod"))]


def test_pip_names_compare_normalised():
    (found,) = which([ENTRY], "requests-oauthlib")
    assert (found.kind, found.version) == ("pip", "1.3.1")
    assert which([ENTRY], "requests-oauthlib", ">=2") == []


def test_the_s3_store_round_trips_one_object_per_image_id():
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="inventories")
        store = S3Store("inventories", "inventory/", s3)
        assert store.put(ENTRY) == f"s3://inventories/inventory/sha256-{HEX}.json"
        store.put(ENTRY)  # recorded again (after a push): replaced, not duplicated
        assert list(store.entries()) == [ENTRY]


def test_the_cli_rejects_bad_input_with_exit_2(tmp_path, capsys):
    assert main(["which", "bash", "--from", str(tmp_path / "absent")]) == 2
    assert "no inventory at" in capsys.readouterr().err
    DirectoryStore(tmp_path).put(ENTRY)
    bad_pools = tmp_path / "pools.toml"
    bad_pools.write_text("[[pool]]\nname = 1\n")
    assert main(["which", "bash", "--from", str(tmp_path), "--pools", str(bad_pools)]) == 2
    assert "pools file" in capsys.readouterr().err
    (tmp_path / f"sha256-{'11' * 32}.json").write_text(json.dumps({"image": "x"}))
    assert main(["which", "bash", "--from", str(tmp_path)]) == 2
    assert "not an inventory record" in capsys.readouterr().err
    with pytest.raises(InventoryError, match="not an image digest"):
        DirectoryStore(tmp_path).put(ENTRY | {"digest": "sha256:short"})
