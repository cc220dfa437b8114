"""Small helpers to read synthesized CloudFormation templates."""

from __future__ import annotations

import json
from collections.abc import Iterator


def resources(template: dict, kind: str) -> dict[str, dict]:
    return {
        logical_id: resource
        for logical_id, resource in template["Resources"].items()
        if resource["Type"] == kind
    }


def refers_to(value: object, logical_id: str) -> bool:
    """Whether a (nested) value references the resource by Ref or GetAtt."""
    text = json.dumps(value)
    return f'{{"Ref": "{logical_id}"}}' in text or f'"Fn::GetAtt": ["{logical_id}"' in text


def as_list(value: object) -> list:
    return value if isinstance(value, list) else [value]


def role_statements(template: dict, role_id: str) -> Iterator[dict]:
    """Every statement granted to a role: inline policies and AWS::IAM::Policy resources."""
    role = template["Resources"][role_id]
    for policy in role["Properties"].get("Policies", []):
        yield from policy["PolicyDocument"]["Statement"]
    for policy in resources(template, "AWS::IAM::Policy").values():
        if any(refers_to(ref, role_id) for ref in policy["Properties"].get("Roles", [])):
            yield from policy["Properties"]["PolicyDocument"]["Statement"]


def actions(statements: list[dict]) -> set[str]:
    return {action for statement in statements for action in as_list(statement["Action"])}


def webhook_role(template: dict) -> str:
    function = template["Resources"]["APIHandler"]
    return function["Properties"]["Role"]["Fn::GetAtt"][0]


def executor_roles(template: dict) -> dict[str, str]:
    """Pool name -> the role id of its hosts (via launch template -> instance profile)."""
    found = {}
    profiles = resources(template, "AWS::IAM::InstanceProfile")
    for group in resources(template, "AWS::AutoScaling::AutoScalingGroup").values():
        pool = next(
            tag["Value"] for tag in group["Properties"]["Tags"] if tag["Key"] == "runnerhub:pool"
        )
        lt_id = launch_template_of(group)
        lt = template["Resources"][lt_id]["Properties"]["LaunchTemplateData"]
        profile_id = lt["IamInstanceProfile"]["Arn"]["Fn::GetAtt"][0]
        found[pool] = profiles[profile_id]["Properties"]["Roles"][0]["Ref"]
    return found


def launch_template_of(group: dict) -> str:
    """The logical id of a group's launch template (plain, or in its mixed-instances policy)."""
    props = group["Properties"]
    spec = props.get("LaunchTemplate") or \
        props["MixedInstancesPolicy"]["LaunchTemplate"]["LaunchTemplateSpecification"]
    return spec["LaunchTemplateId"]["Ref"]
