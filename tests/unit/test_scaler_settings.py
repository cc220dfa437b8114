"""The scaler's per-pool slots (RUNNERHUB_SCALER_POOL_SLOTS, set by infra/ from each pool's
hosts): parsed strictly, used per pool, and a pool the pools file lacks is refused."""

from __future__ import annotations

import pytest

from chalicelib.errors import ConfigurationError
from chalicelib.scaler.handler import build
from chalicelib.scaler.service import ScalerConfig
from chalicelib.scaler.settings import ScalerSettings, parse_pool_slots
from tests.conftest import ROOT


def test_pool_slots_parse_and_fall_back_to_slots():
    assert parse_pool_slots(" gpu=1, linux-large=8 ,") == {"gpu": 1, "linux-large": 8}
    assert parse_pool_slots("") == {}
    config = ScalerConfig(group_prefix="rh-", slots_per_host=4, idle_s=1, boot_timeout_s=1,
                          lease_s=5, pool_slots={"gpu": 1})
    assert (config.slots_for("gpu"), config.slots_for("linux-small")) == (1, 4)


@pytest.mark.parametrize("bad", ["gpu", "gpu=", "=2", "gpu=0", "gpu=257", "gpu=x",
                                 "gpu=1,gpu=2"])
def test_bad_pool_slots_are_refused_naming_the_part(bad, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="scaler_pool_slots"):
        parse_pool_slots(bad)
    monkeypatch.setenv("RUNNERHUB_SCALER_POOL_SLOTS", bad)
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_ID", "1")
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_KEY_FILE", str(tmp_path / "key.pem"))
    with pytest.raises(ValueError, match="scaler_pool_slots"):
        ScalerSettings()


def test_slots_for_a_pool_the_file_lacks_is_a_configuration_error(monkeypatch, tmp_path):
    monkeypatch.setenv("RUNNERHUB_POOLS_FILE", str(ROOT / "chalicelib/config/pools.toml"))
    monkeypatch.setenv("RUNNERHUB_SCALER_POOL_SLOTS", "no-such-pool=2")
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_ID", "1")
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_KEY_FILE", str(tmp_path / "key.pem"))
    with pytest.raises(ConfigurationError, match="SCALER_POOL_SLOTS names unknown pools "
                                                 "no-such-pool"):
        build(ScalerSettings())
