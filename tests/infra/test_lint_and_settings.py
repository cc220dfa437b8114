"""cfn-lint on every synthesized template; the stage settings' rules (no synth needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from runnerhub_infra.stages import stage_settings


def test_cfn_lint_passes_on_every_template(synthesized):
    templates = sorted(Path(synthesized.outdir).glob("*.template.json"))
    assert len(templates) == len(synthesized.templates)
    cfn_lint = Path(sys.executable).with_name("cfn-lint")
    result = subprocess.run(
        [str(cfn_lint), *map(str, templates)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_stage_synthesizes_quickly(synthesized):
    # Both stages in one process; the Chalice package is cached in .chalice/deployments.
    assert synthesized.seconds < 240


def test_default_zones_follow_the_region():
    assert stage_settings("dev", {"region": "eu-west-1"}).availability_zones == (
        "eu-west-1a",
        "eu-west-1b",
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"availability_zones": ["us-east-1a"]},
        {"availability_zones": ["us-east-1a", "eu-west-1b"]},
        {"vpc_id": "vpc-0123456789abcdef0"},  # a lookup needs the account
        {"host_subnets": "private", "nat_gateways": 0},
        {"pools_file": "/etc/pools.toml"},  # not deployed with the code
        {"hosts": {"ami_id": "ami-0123456789abcdef0"}},  # two image sources
    ],
)
def test_bad_settings_are_refused(overrides):
    with pytest.raises(ValidationError):
        stage_settings("dev", overrides)


def test_prod_differs_from_dev_where_it_should():
    dev, prod = stage_settings("dev"), stage_settings("prod")
    assert prod.prod and not dev.prod
    assert prod.host_subnets == "private" and prod.nat_gateways >= 2
