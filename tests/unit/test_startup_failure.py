"""Why a command could not start, and its exit code: the reconciler's and the scaler's CLIs."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from chalicelib.errors import ConfigurationError, DependencyUnavailable, startup_failure


class Settings(BaseModel):
    slots: int


def invalid() -> ValidationError:
    try:
        Settings(slots="a-secret-location")
    except ValidationError as exc:
        return exc
    raise AssertionError("not invalid")


def test_invalid_settings_exit_2_naming_the_field_and_never_the_value(capsys):
    assert startup_failure("runnerhub scaler", invalid()) == 2
    err = capsys.readouterr().err
    assert err.startswith("runnerhub scaler: invalid configuration: ") and "slots" in err
    assert "a-secret-location" not in err


@pytest.mark.parametrize("error", [ConfigurationError("unknown pools ['x']"),
                                   ValueError("pools file: bad label")])
def test_an_invalid_pools_file_exits_2(capsys, error):
    assert startup_failure("runnerhub reconciler", error) == 2
    assert capsys.readouterr().err == f"runnerhub reconciler: invalid configuration: {error}\n"


def test_a_dependency_out_of_reach_exits_1(capsys):
    assert startup_failure("runnerhub scaler", DependencyUnavailable("dynamodb", "timeout")) == 1
    assert capsys.readouterr().err == "runnerhub scaler: cannot start: dynamodb: timeout\n"


@pytest.mark.parametrize("module", ["chalicelib.scaler.__main__", "chalicelib.reconciler.__main__"])
def test_the_commands_exit_2_on_invalid_settings(module, monkeypatch, capsys):
    import importlib

    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_ID", "not-a-number")
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_KEY_FILE", "/dev/null")
    assert importlib.import_module(module).main(["--once"] if "scaler" in module else []) == 2
    assert "invalid configuration" in capsys.readouterr().err
