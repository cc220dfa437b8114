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
    assert len(templates) == len(synthesized.templates) + 1  # + runnerhub-images
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
        # two image sources
        {"hosts": {"ami_id": "ami-0123456789abcdef0", "ami_ssm_parameter": "/x"}},
        {"hosts": {"ami_ssm_parameter": None}},  # none
        {"webhook_timeout_s": 10},  # GitHub has given up by then
        {"secrets": {"backend": "vault"}},  # Vault without its address
    ],
)
def test_bad_settings_are_refused(overrides):
    with pytest.raises(ValidationError):
        stage_settings("dev", overrides)


def test_prod_differs_from_dev_where_it_should():
    dev, prod = stage_settings("dev"), stage_settings("prod")
    assert prod.prod and not dev.prod
    assert prod.host_subnets == "private" and prod.nat_gateways >= 2


def test_vault_backend_reaches_every_deployable_as_its_settings():
    from runnerhub_infra.stages import overrides_from_context

    from chalicelib.secrets.store import SecretBackendSettings

    context = {"secret_backend": "vault", "vault_addr": "https://vault.internal:8200"}
    stage = stage_settings("prod", overrides_from_context(context.get))
    variables = stage.secrets.environment()
    assert variables["RUNNERHUB_SECRET_BACKEND"] == "vault"
    assert variables["RUNNERHUB_VAULT_AUTH"] == "aws-iam"  # never a token in the environment
    names = {key.removeprefix("RUNNERHUB_").lower() for key in variables}
    assert names <= set(SecretBackendSettings.model_fields)
    # The deployables' own settings model accepts them as they are.
    parsed = SecretBackendSettings.model_validate(
        {key.removeprefix("RUNNERHUB_").lower(): value for key, value in variables.items()}
    )
    assert parsed.vault_addr == "https://vault.internal:8200"
    assert stage.role_name("webhook") == "runnerhub-prod-webhook"
    assert stage_settings("dev").secrets.environment() == {
        "RUNNERHUB_SECRET_BACKEND": "secretsmanager"
    }
