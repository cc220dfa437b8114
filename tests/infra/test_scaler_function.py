"""The scaler's time budget (its calls give up well inside the Lambda's timeout, its lease
outlasts it) and the pools' minimum hosts (`min_hosts`: the group's MinSize, never above its
maximum)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from runnerhub_infra.stages import HostSettings, stage_settings

from chalicelib import aws
from tests.infra.test_pool_checks import pools, problems


def test_the_scalers_calls_give_up_in_time_and_its_lease_outlasts_the_function(template):
    from runnerhub_infra.control_plane import SCALER_LEASE_S, SCALER_TIMEOUT_S

    from chalicelib.scaler.handler import SECOND_PASS_MIN_S
    from chalicelib.scaler.settings import ScalerSettings

    profile = aws.PROFILES[aws.SCALER]
    assert profile is aws.SCALER_PROFILE
    # One hung call (every attempt timing out, with backoff) leaves most of the invocation to
    # the other pools: 24 s of 60.
    assert profile.worst_case_s() <= SCALER_TIMEOUT_S / 2
    config = aws.client("autoscaling", aws.SCALER).meta.config
    assert (config.connect_timeout, config.read_timeout) == (profile.connect_s, profile.read_s)
    assert config.retries["total_max_attempts"] == profile.attempts
    # The second pass starts only with time for one more call at its worst.
    assert SECOND_PASS_MIN_S >= profile.worst_case_s()
    function = template["Resources"]["Scaler"]["Properties"]
    lease = float(function["Environment"]["Variables"]["RUNNERHUB_SCALER_LEASE_S"])
    assert function["Timeout"] == SCALER_TIMEOUT_S < lease == SCALER_LEASE_S
    # Run without infra/'s setting (the CLI), the default outlasts the deployed timeout too.
    assert ScalerSettings.model_fields["scaler_lease_s"].default > SCALER_TIMEOUT_S


def test_min_hosts_above_max_hosts_is_refused():
    with pytest.raises(ValidationError, match="min_hosts 3 is above max_hosts 2"):
        HostSettings(min_hosts=3, max_hosts=2)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        HostSettings(min_hosts=-1)
    assert HostSettings(min_hosts=2, max_hosts=2).min_hosts == 2


def test_min_hosts_above_the_derived_maximum_is_refused_by_name():
    # max_runners 8 at 4 slots a host: a maximum of 2 hosts, derived (no max_hosts given)
    (problem,) = problems(pools(max_runners=8), hosts={"min_hosts": 3, "slots": 4})
    assert problem == "pool linux-small: min_hosts 3 is above the group's maximum 2"
    assert problems(pools(max_runners=8), hosts={"min_hosts": 2, "slots": 4}) == []


def test_min_hosts_is_the_groups_min_size(tmp_path):
    """One stage's executors synthesized on their own, one pool with a minimum."""
    import aws_cdk as cdk
    from aws_cdk.assertions import Template
    from runnerhub_infra.data import Data
    from runnerhub_infra.executors import Executors
    from runnerhub_infra.pool_checks import image_repositories
    from runnerhub_infra.secrets import Secrets

    from chalicelib.pools import load_pools

    stage = stage_settings("dev")
    stage = stage.model_copy(update={"hosts": stage.hosts.model_copy(update={"min_hosts": 1})})
    config = load_pools(stage.pools_file)
    app = cdk.App()
    stack = cdk.Stack(app, "MinHosts", env=cdk.Environment(account=stage.account,
                                                          region=stage.region))
    data = Data(stack, "Data", stage=stage, pools=config)
    secrets = Secrets(stack, "Secrets", stage=stage)
    executors = Executors(stack, "Executors", stage=stage, pools=config, data=data,
                          secrets=secrets, workdir=tmp_path,
                          repository_names=image_repositories(config))
    template = Template.from_stack(stack).to_json()
    min_sizes = {
        resource["Properties"]["AutoScalingGroupName"]: resource["Properties"]["MinSize"]
        for resource in template["Resources"].values()
        if resource["Type"] == "AWS::AutoScaling::AutoScalingGroup"}
    expected = {executors.group_name(pool): str(stage.host_settings(pool.name).min_hosts)
                for pool in config.pools}
    assert min_sizes == expected and "1" in expected.values()
