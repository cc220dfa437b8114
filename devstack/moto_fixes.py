"""Where moto's Auto Scaling differs from AWS in a way RunnerHub's tests depend on, made right.

- Each instance's `LaunchTemplate.Version` in DescribeAutoScalingGroups: AWS reports the version
  the instance was launched with; moto reports the template's default version for every
  instance, so a rollout (chalicelib/scaler/rollout.py) could never tell old hosts from new.
  Here an instance keeps the group's version (resolved to its number) from its launch.

`apply()` is idempotent; the local AWS server calls it before serving (devstack/aws_server.py).
"""

from __future__ import annotations

from typing import Any

from moto.autoscaling import models

_applied = False


def _launched_version(group: Any) -> str | None:
    template = getattr(group, "ec2_launch_template", None)
    if template is None:
        return None
    try:
        return str(template.get_version(group.launch_template_version).number)
    except Exception:  # noqa: BLE001 - an unresolvable version: report the default, as moto does
        return None


def apply() -> None:
    global _applied
    if _applied:
        return
    original_init = models.InstanceState.__init__
    original_template = models.InstanceState.launch_template

    def __init__(self: Any, instance: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, instance, *args, **kwargs)
        self.launched_version = _launched_version(self.auto_scaling_group)

    def launch_template(self: Any) -> dict[str, Any] | None:
        found = original_template.fget(self)
        launched = getattr(self, "launched_version", None)
        if found is not None and launched is not None:
            found = {**found, "Version": launched}
        return found

    models.InstanceState.__init__ = __init__  # type: ignore[method-assign]
    models.InstanceState.launch_template = property(launch_template)  # type: ignore[assignment]
    _applied = True
