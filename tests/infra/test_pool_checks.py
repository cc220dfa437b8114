"""What a deployed stage refuses in a pools file: each refusal by name (no synth needed)."""

from __future__ import annotations

import math

import pytest
from runnerhub_infra import synth
from runnerhub_infra.pool_checks import (
    INSTANCE_TYPES,
    PoolsRefused,
    check_deployable,
    host_slots,
    image_repositories,
    max_hosts,
    require_deployable,
)
from runnerhub_infra.stages import (
    DEFAULT_STAGES,
    PRODUCTION_POOLS_FILE,
    HostSettings,
    stage_settings,
)

from chalicelib.pools import PoolConfig, load_pools
from tests.infra.conftest import ROOT

DEMO_POOLS = ROOT / "chalicelib" / "config" / "pools.toml"
REGISTRY = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
DIGEST = "sha256:" + "ab" * 32


def pools(**fields) -> PoolConfig:
    pool = {
        "name": "linux-small",
        "labels": ["self-hosted", "linux"],
        "scope": {"owner": "acme"},
        "image": f"{REGISTRY}/runnerhub/runner-linux-small@{DIGEST}",
        "cpus": 1.0,
        "memory_mb": 2048,
        "max_runners": 8,
    }
    return PoolConfig.model_validate({"pool": [{**pool, **fields}]})


def problems(config: PoolConfig, **stage_overrides) -> list[str]:
    return check_deployable(config, stage_settings("dev", stage_overrides))


@pytest.mark.parametrize("stage", sorted(DEFAULT_STAGES))
def test_production_example_passes_every_stage(stage):
    settings = stage_settings(stage)
    assert settings.pools_file == PRODUCTION_POOLS_FILE
    assert check_deployable(load_pools(settings.pools_file), settings) == []


def test_demo_pools_fail_naming_each_local_image_and_the_demo_scope():
    demo = load_pools(DEMO_POOLS)
    with pytest.raises(PoolsRefused) as refused:
        require_deployable(demo, stage_settings("dev", {"pools_file": str(DEMO_POOLS)}))
    message = str(refused.value)
    assert "pools.toml cannot be deployed to stage dev" in message
    for pool in demo.pools:
        assert pool.image.endswith(":local")
        assert f"pool {pool.name}: image {pool.image} is not pinned by digest" in message
        assert f"pool {pool.name}: scope owner runnerhub-demo is the local demo's" in message


def test_make_synth_with_demo_pools_exits_2_before_synthesizing(tmp_path, capsys):
    code = synth.main(["--outdir", str(tmp_path / "out"), "-c", f"pools_file={DEMO_POOLS}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "runnerhub/runner-linux-small:local" in err and "runnerhub-demo" in err
    assert not list((tmp_path / "out").glob("*.template.json"))


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (f"{REGISTRY}/runnerhub/runner-linux-small:v1", "not pinned by digest"),
        (f"{REGISTRY}/runnerhub/runner-linux-small:v1@{DIGEST}", "not pinned by digest"),
        (f"{REGISTRY}/runnerhub/runner-linux-small@sha256:abc", "not pinned by digest"),
        (f"docker.io/runnerhub/runner-linux-small@{DIGEST}", "not in an ECR registry"),
        (
            f"123456789012.dkr.ecr.eu-west-1.amazonaws.com/runnerhub/runner@{DIGEST}",
            "is in region eu-west-1, the stage in us-east-1",
        ),
        (f"{REGISTRY}/someone-else/runner@{DIGEST}", "not in a repository the runnerhub-images"),
    ],
)
def test_images_refused(image, expected):
    (problem,) = problems(pools(image=image))
    assert expected in problem and image in problem


def test_image_in_another_account_refused_when_the_stage_names_its_account():
    assert problems(pools(), account="123456789012") == []
    (problem,) = problems(pools(), account="210987654321")
    assert "is in account 123456789012, the stage in 210987654321" in problem


def test_demo_scope_refused():
    (problem,) = problems(pools(scope={"owner": "runnerhub-demo"}))
    assert "scope owner runnerhub-demo is the local demo's" in problem


def test_runners_exceeding_the_vcpus_refused():
    # The case: 4 x 2 vCPU runners on a 2 vCPU host.
    (problem,) = problems(
        pools(cpus=2.0, memory_mb=1024), hosts={"instance_type": "m6i.large", "slots": 4}
    )
    assert "4 slots x 2 vCPU = 8 vCPU exceed m6i.large's 2" in problem


def test_runners_exceeding_the_memory_refused():
    (problem,) = problems(pools(memory_mb=4096),
                          hosts={"instance_type": "c6i.xlarge", "slots": 4})
    assert "16384 MiB exceed c6i.xlarge's 8192 MiB" in problem


def test_gpu_pool_on_a_type_without_gpu_refused():
    (problem,) = problems(pools(gpus=1), hosts={"instance_type": "m6i.xlarge", "slots": 1})
    assert "needs a GPU, instance type m6i.xlarge has none" in problem
    assert problems(pools(gpus=1, cpus=4.0), hosts={"instance_type": "g5.xlarge", "slots": 1}) == []


def test_gpu_label_without_gpus_refused():
    labels = ["self-hosted", "linux", "gpu"]
    found = problems(pools(labels=labels), hosts={"instance_type": "g5.xlarge", "slots": 1})
    assert found == ["pool linux-small: labelled gpu but asks for no GPU (set gpus = 1)"]


def test_more_gpus_than_the_type_has_refused():
    (problem,) = problems(pools(gpus=1), hosts={"instance_type": "g5.xlarge", "slots": 2})
    assert "2 slots x 1 GPU exceed g5.xlarge's 1" in problem


def test_unknown_instance_type_refused():
    (problem,) = problems(pools(), hosts={"instance_type": "t2.nano"})
    assert "instance type t2.nano is not one the app allows" in problem


def test_max_hosts_below_max_runners_refused():
    (problem,) = problems(pools(max_runners=9), hosts={"max_hosts": 2, "slots": 4})
    assert "max_hosts 2 x 4 slots = 8 runners, under max_runners 9" in problem


def test_max_hosts_default_is_runners_over_slots_rounded_up():
    host = stage_settings("dev").hosts
    assert host.max_hosts is None
    assert host.hosts_for(9, 4) == math.ceil(9 / 4) == 3
    assert host.hosts_for(8, 4) == 2
    assert max_hosts(pools(max_runners=9).pools[0], host) == 3  # 4 slots fit every type


# --- the instance mix -----------------------------------------------------------------------


def test_slots_default_to_what_fits_the_smallest_type_of_the_mix():
    (pool,) = pools(memory_mb=3072).pools
    # m6i.xlarge holds 4 (16 GiB), c6i.xlarge 2 (8 GiB less the host's 1 GiB): any host may
    # be a c6i, so every host gets 2.
    mix = HostSettings(instance_types=["m6i.xlarge", "c6i.xlarge"])
    assert host_slots(pool, HostSettings(instance_type="m6i.xlarge")) == 4
    assert host_slots(pool, mix) == 2
    assert max_hosts(pool, mix) == 4  # 8 runners, 2 a host
    assert problems(pools(memory_mb=3072), hosts={"instance_types": ["m6i.xlarge",
                                                                     "c6i.xlarge"]}) == []


def test_explicit_slots_must_fit_every_type_of_the_mix():
    (problem,) = problems(pools(memory_mb=3072), hosts={
        "instance_types": ["m6i.xlarge", "c6i.xlarge"], "slots": 4})
    assert "4 slots x 3072 MiB = 12288 MiB exceed c6i.xlarge's 8192 MiB" in problem


def test_a_runner_that_fits_no_host_of_the_mix_refused():
    (problem,) = problems(pools(cpus=4.0, memory_mb=12288),
                          hosts={"instance_types": ["m6i.xlarge", "c6i.xlarge"]})
    assert "one runner (4 vCPU, 12288 MiB, 0 GPU) does not fit c6i.xlarge" in problem


def test_gpu_pool_refuses_a_mix_with_a_type_without_gpu():
    found = problems(pools(gpus=1, cpus=4.0, memory_mb=8192),
                     hosts={"instance_types": ["g5.xlarge", "m6i.xlarge"], "slots": 1})
    assert found == ["pool linux-small: needs a GPU, instance type m6i.xlarge has none "
                     f"(e.g. {', '.join(t for t, k in INSTANCE_TYPES.items() if k.gpus)})"]


def test_spot_needs_a_choice_of_types_and_a_base_within_the_group():
    (one_type,) = problems(pools(), hosts={"instance_type": "m6i.xlarge", "spot": True})
    assert "Spot with one instance type (m6i.xlarge)" in one_type
    (base,) = problems(pools(max_runners=8), hosts={
        "instance_types": ["m6i.xlarge", "m7i.xlarge"], "spot": True, "on_demand_base": 3})
    assert "on_demand_base 3 exceeds the group's 2 hosts at most" in base
    assert problems(pools(), hosts={"instance_types": ["m6i.xlarge", "m7i.xlarge"],
                                    "spot": True, "on_demand_base": 1,
                                    "on_demand_percent_above_base": 25}) == []


def test_host_settings_keep_the_one_type_spelling_and_refuse_contradictions():
    assert HostSettings(instance_type="g5.xlarge").instance_types == ("g5.xlarge",)
    assert HostSettings().instance_type == "m6i.xlarge"  # the launch template's: the first
    for bad, message in [
        ({"instance_type": "m6i.xlarge", "instance_types": ["m7i.xlarge"]}, "not both"),
        ({"instance_types": []}, "at least one instance type"),
        ({"instance_types": ["m6i.xlarge", "m6i.xlarge"]}, "listed more than once"),
        ({"on_demand_base": 1}, "apply with spot = true only"),
        ({"spot": True, "on_demand_percent_above_base": 101}, "less than or equal to 100"),
    ]:
        with pytest.raises(ValueError, match=message):
            HostSettings(**bad)


def test_role_name_over_iams_limit_refused():
    name = "a" * 40
    (problem,) = problems(pools(name=name), name="a" * 20)
    assert f"runnerhub-{'a' * 20}-executor-{name}" in problem and "64 characters" in problem


def test_every_allowed_type_is_sane():
    for name, kind in INSTANCE_TYPES.items():
        assert kind.vcpus >= 2 and kind.memory_mib >= 4096, name
        assert (kind.gpus > 0) == name.startswith("g"), name


def test_repositories_come_from_the_images():
    example = load_pools(PRODUCTION_POOLS_FILE)
    assert image_repositories(example) == [
        "runnerhub/runner-gpu",
        "runnerhub/runner-linux-large",
        "runnerhub/runner-linux-small",
    ]
    assert image_repositories(load_pools(DEMO_POOLS)) == []
