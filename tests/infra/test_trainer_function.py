"""The trainer Lambda as synthesized: its package fits Lambda's unzipped limit (measured on the
layer built from the manylinux x86_64 cp311 wheels, and the code), the layer really imports
(scikit-learn fits from it, with nothing of this virtualenv on the path), it is its own function
(scikit-learn is in no Chalice function's package), daily, with a role limited to its calls."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
from runnerhub_infra import trainer_package
from runnerhub_infra.trainer import (
    TRAINER_BUCKET_ACTIONS,
    TRAINER_SCHEDULE,
    TRAINER_TABLE_ACTIONS,
    TRAINER_TIMEOUT_S,
)

from tests.conftest import require
from tests.infra.cfn import actions, resources, role_statements

ROOT = Path(__file__).resolve().parents[2]


def trainer_function(template: dict) -> tuple[str, dict]:
    (found,) = [(logical_id, resource) for logical_id, resource in
                resources(template, "AWS::Lambda::Function").items()
                if resource["Properties"].get("FunctionName", "").endswith("-trainer")]
    return found


def test_the_package_fits_lambdas_unzipped_limit(tmp_path):
    require(any(trainer_package.wheelhouse().glob("*.whl")),
            f"the trainer's wheels in {trainer_package.wheelhouse()} (make wheelhouse-trainer)")
    layer = trainer_package.build_layer()
    code = trainer_package.build_code(tmp_path / "code")
    layer_bytes = trainer_package.unzipped_bytes(layer)
    code_bytes = trainer_package.tree_bytes(code)
    total = layer_bytes + code_bytes
    print(f"trainer package unzipped: layer {layer_bytes / 1e6:.1f} MB + code "
          f"{code_bytes / 1e6:.1f} MB = {total / 1e6:.1f} MB of "
          f"{trainer_package.LAMBDA_UNZIPPED_LIMIT / 1e6:.1f} MB; layer zip "
          f"{layer.stat().st_size / 1e6:.1f} MB")
    assert total < trainer_package.LAMBDA_UNZIPPED_LIMIT
    with zipfile.ZipFile(layer) as found:
        names = found.namelist()
    wheels = {wheel.name.split("-")[0].lower() for wheel in
              trainer_package.wheelhouse().glob("*.whl")}
    assert {"scikit_learn", "numpy", "scipy", "joblib", "threadpoolctl"} <= wheels
    # Linux x86_64 CPython 3.11 builds, under python/ (where Lambda puts a layer on the path).
    assert all(name.startswith("python/") for name in names)
    assert any(name.startswith("python/sklearn/") and name.endswith(
        ".cpython-311-x86_64-linux-gnu.so") for name in names)
    assert not any("/tests/" in name for name in names)


def test_the_layer_and_the_code_alone_train_a_forecast(tmp_path):
    """The layer unpacked as Lambda would (/opt/python) beside the code (/var/task): the
    trainer's modules import and fit without this virtualenv's packages (boto3, the Lambda
    runtime's own, is imported only when a client is made)."""
    require(any(trainer_package.wheelhouse().glob("*.whl")),
            f"the trainer's wheels in {trainer_package.wheelhouse()} (make wheelhouse-trainer)")
    require(sys.platform == "linux" and sys.version_info[:2] == (3, 11),
            "Linux and CPython 3.11 (the layer's wheels)")
    opt = Path(tempfile.mkdtemp(dir=tmp_path))
    with zipfile.ZipFile(trainer_package.build_layer()) as layer:
        layer.extractall(opt)
    code = trainer_package.build_code(tmp_path / "task")
    script = (
        "import sys, json\n"
        "from forecast.trainer import Trainer, series_of\n"
        "from forecast.model import Forecaster\n"
        "from forecast.traces import Series\n"
        "import sklearn\n"
        "values = [300.0 * (1 + (n % 288 > 100)) for n in range(2 * 288)]\n"
        "series = Series('p', 0.0, [1] * len(values), values)\n"
        "forecast = Forecaster(0.9).fit(series).predict(len(values) * 300.0, 288)\n"
        "print(json.dumps({'sklearn': sklearn.__file__, 'n': len(forecast.upper)}))\n")
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c",
         f"import sys; sys.path[:0] = {[str(code), str(opt / 'python')]!r}\n"
         + script],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["n"] == 288 and found["sklearn"].startswith(str(opt))


def test_the_trainer_is_its_own_daily_function_with_its_layer(template, stage):
    logical_id, function = trainer_function(template)
    props = function["Properties"]
    assert props["Handler"] == "forecast.trainer.handler"
    assert props["Runtime"] == "python3.11" and props["Architectures"] == ["x86_64"]
    assert props["Timeout"] == TRAINER_TIMEOUT_S and len(props["Layers"]) == 1
    variables = props["Environment"]["Variables"]
    from forecast.trainer import TrainerSettings

    names = {k.removeprefix("RUNNERHUB_").lower() for k in variables if k.startswith("RUNNERHUB_")}
    assert {"history_table", "models_bucket", "pools_file"} <= names
    assert names - {"stage"} <= set(TrainerSettings.model_fields)
    # Through its `live` alias (rollouts.py: CodeDeploy moves it), never the function itself.
    (alias_id,) = [alias_id for alias_id, alias in resources(template, "AWS::Lambda::Alias").items()
                   if alias["Properties"]["FunctionName"] == {"Ref": logical_id}]
    rules = [rule["Properties"] for rule in resources(template, "AWS::Events::Rule").values()
             if any(target["Arn"] == {"Ref": alias_id}
                    for target in rule["Properties"]["Targets"])]
    (rule,) = rules
    assert rule["ScheduleExpression"] == TRAINER_SCHEDULE
    # No Chalice function carries scikit-learn: the trainer is outside the Chalice package.
    requirements = (ROOT / "requirements.txt").read_text()
    assert "scikit-learn" not in requirements and "numpy" not in requirements


def test_the_trainer_role_reads_history_and_writes_forecasts_and_models_only(template):
    _, function = trainer_function(template)
    role_id = function["Properties"]["Role"]["Fn::GetAtt"][0]
    statements = list(role_statements(template, role_id))
    assert actions(statements) == {"logs:CreateLogStream", "logs:PutLogEvents",
                                   *TRAINER_TABLE_ACTIONS, *TRAINER_BUCKET_ACTIONS}
    text = json.dumps(statements)
    tables = {props["Properties"]["TableName"]: logical_id for logical_id, props in
              resources(template, "AWS::DynamoDB::Table").items()}
    history = next(logical_id for name, logical_id in tables.items()
                   if name.endswith("-history"))
    assert all(logical_id not in text for logical_id in set(tables.values()) - {history})
    (bucket_id,) = resources(template, "AWS::S3::Bucket").keys() & {
        ref for statement in statements for ref in _get_att_targets(statement)}
    bucket = resources(template, "AWS::S3::Bucket")[bucket_id]["Properties"]
    assert bucket["PublicAccessBlockConfiguration"]["BlockPublicPolicy"] is True
    assert '"/models/*"' in text


def _get_att_targets(statement: dict) -> set[str]:
    found = set()
    for value in json.dumps(statement.get("Resource")).split('"Fn::GetAtt": ["')[1:]:
        found.add(value.split('"', 1)[0])
    return found


def test_the_trainer_knows_each_pools_slots_per_host_as_the_scaler_does(template):
    _, trainer = trainer_function(template)
    (scaler,) = [r for r in resources(template, "AWS::Serverless::Function").values()
                 if "RUNNERHUB_SCALER_GROUP_PREFIX" in json.dumps(r["Properties"])]
    slots = trainer["Properties"]["Environment"]["Variables"]["RUNNERHUB_SCALER_POOL_SLOTS"]
    assert slots, "the trainer would size every pool's floor for the default 4 slots"
    assert slots == scaler["Properties"]["Environment"]["Variables"][
        "RUNNERHUB_SCALER_POOL_SLOTS"]


def test_the_hourly_cost_cap_reaches_the_scaler_and_the_trainer_alike(template, stage):
    """dev caps its forecast floor ($2 an hour a pool at $0.192 a host); prod does not. Both
    functions read the same variables, so the trainer plans warm runners on the hosts the
    scaler's floor may keep."""
    functions = {name: resource["Properties"].get("Environment", {}).get("Variables", {})
                 for name, resource in template["Resources"].items()
                 if resource["Type"] in ("AWS::Lambda::Function", "AWS::Serverless::Function")}
    scaler = next(env for name, env in functions.items() if name.startswith("Scaler"))
    trainer = next(env for env in functions.values()
                   if env.get("POWERTOOLS_SERVICE_NAME") == "runnerhub-trainer")
    keys = ("RUNNERHUB_SCALER_FORECAST_HOURLY_CAP", "RUNNERHUB_SCALER_HOST_HOURLY_COST")
    expected = {"dev": {keys[0]: "2.0", keys[1]: "0.192"}, "prod": {}}[stage.name]
    for env in (scaler, trainer):
        assert {key: env[key] for key in keys if key in env} == expected


def test_a_cost_cap_without_a_host_price_is_refused():
    from runnerhub_infra.stages import stage_settings

    with pytest.raises(ValueError, match="needs host_hourly_cost"):
        stage_settings("prod", {"forecast_hourly_cap": 5.0})
