"""Every command in a fence of docs/deploy.md is checked: `npx aws-cdk@2` subcommands, stack
selectors (against the synthesized app's stack ids) and `-c` keys; `aws <service> <operation>`
and its options against botocore's service models; `make` targets and variables against the
Makefile; `docker`, `cp`, `cd` and scripts against the tree. A command of any other kind fails:
a new kind of command in the docs needs a check here first."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import botocore.session
import pytest
from botocore import xform_name
from runnerhub_infra.stages import CONTEXT_KEYS, DEFAULT_STAGES

from tests.infra.conftest import ROOT

DOC = ROOT / "docs" / "deploy.md"
FENCE = re.compile(r"^[ \t]*```(?:sh|bash|console)?\n(.*?)^[ \t]*```", re.M | re.S)
CDK = ("npx", "aws-cdk@2")
CDK_SUBCOMMANDS = {"bootstrap", "deploy", "destroy", "synth", "diff", "list", "ls"}
# CDK CLI flags the docs may use (with how many values they take).
CDK_FLAGS = {"--require-approval": 1, "--outputs-file": 1, "--profile": 1, "--all": 0}
# The AWS CLI's global options (with a value), accepted on every operation.
AWS_GLOBAL = {"--region", "--query", "--output", "--profile", "--endpoint-url"}
# AWS CLI commands that are CLI customizations, not API operations (no botocore model).
AWS_CUSTOM = {("ecr", "get-login-password"): set()}
# The AWS CLI's name of a service whose botocore model is named otherwise.
AWS_CLI_SERVICES = {"deploy": "codedeploy"}
DOCKER_SUBCOMMANDS = {"login", "tag", "push", "build", "pull"}
MAKE_ASSIGNMENT = re.compile(r"^([A-Z_]+)=(.*)$")
# Files an earlier command of the docs creates (the operator's pools file).
CREATED: set[str] = set()


def doc_commands(text: str) -> list[tuple[int, list[str]]]:
    """(block number, argv) for every simple command: continuations joined, comments
    dropped, split at `|`, `&&` and `;`. Each block starts at the repository root."""
    found = []
    for number, block in enumerate(FENCE.findall(text)):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            argv: list[str] = []
            for token in [*lexer, ";"]:
                if token in ("|", "&&", ";", "||"):
                    if argv:
                        found.append((number, argv))
                    argv = []
                else:
                    argv.append(token)
    return found


def _stack_ids(synthesized) -> set[str]:
    return set(synthesized.stack_ids)


def check_cdk(argv: list[str], stack_ids: set[str], cwd: Path) -> list[str]:
    errors = []
    if cwd != ROOT / "infra":
        errors.append("cdk runs in infra/ (cdk.json): `cd infra` first")
    rest = argv[len(CDK):]
    if not rest or rest[0] not in CDK_SUBCOMMANDS:
        return [*errors, f"unknown cdk subcommand in {argv}"]
    subcommand, rest = rest[0], rest[1:]
    positionals = []
    index = 0
    while index < len(rest):
        arg = rest[index]
        if arg in ("-c", "--context"):
            key, _, value = rest[index + 1].partition("=")
            if key not in (*CONTEXT_KEYS, "stages"):
                errors.append(f"unknown context key {key}")
            if key == "stages" and not set(value.split(",")) <= set(DEFAULT_STAGES):
                errors.append(f"unknown stage in {value}")
            if key == "pools_file" and not (ROOT / value).is_file() and value not in CREATED:
                errors.append(f"pools_file {value}: no such file")
            index += 2
        elif arg.startswith("-"):
            if arg not in CDK_FLAGS:
                errors.append(f"unknown cdk flag {arg}")
            index += 1 + CDK_FLAGS.get(arg, 0)
        else:
            positionals.append(arg)
            index += 1
    if subcommand == "bootstrap":
        errors += [f"not an environment: {p}" for p in positionals if not p.startswith("aws://")]
    else:
        errors += [
            f"stack selector {p} matches no stack ({sorted(stack_ids)})"
            for p in positionals
            if p not in stack_ids
        ]
    return errors


def check_aws(argv: list[str], session) -> list[str]:
    if len(argv) < 3:
        return [f"aws needs a service and an operation: {argv}"]
    service, operation = argv[1], argv[2]
    options = {arg.split("=")[0] for arg in argv[3:] if arg.startswith("--")}
    if (service, operation) in AWS_CUSTOM:
        allowed = AWS_CUSTOM[(service, operation)]
    else:
        model_name = AWS_CLI_SERVICES.get(service, service)
        if model_name not in session.get_available_services():
            return [f"no AWS service {service}"]
        model = session.get_service_model(model_name)
        operations = {xform_name(name, "-"): name for name in model.operation_names}
        if operation not in operations:
            return [f"no operation {service} {operation}"]
        shape = model.operation_model(operations[operation]).input_shape
        allowed = {xform_name(member, "-") for member in (shape.members if shape else {})}
    errors = []
    for option in options:
        name = option[2:]
        if option in AWS_GLOBAL:
            continue
        if name not in allowed and not (name.startswith("no-") and name[3:] in allowed):
            errors.append(f"aws {service} {operation}: no parameter {option}")
    return errors


def check_make(argv: list[str], makefile: str) -> list[str]:
    errors = []
    for arg in argv[1:]:
        assignment = MAKE_ASSIGNMENT.match(arg)
        if assignment:
            variable, value = assignment.groups()
            if f"$({variable})" not in makefile:
                errors.append(f"make variable {variable} is not used by the Makefile")
            if variable == "POOLS" and not (ROOT / value).is_file() and value not in CREATED:
                errors.append(f"POOLS={value}: no such file")
        elif not re.search(rf"^{re.escape(arg)}:", makefile, re.M):
            errors.append(f"no make target {arg}")
    return errors


def check(argv: list[str], cwd: Path, stack_ids: set[str], session, makefile: str) -> list[str]:
    head = argv[0]
    if tuple(argv[:2]) == CDK:
        return check_cdk(argv, stack_ids, cwd)
    if head == "aws":
        return check_aws(argv, session)
    if head == "make":
        return check_make(argv, makefile)
    if head == "docker":
        return [] if len(argv) > 1 and argv[1] in DOCKER_SUBCOMMANDS else [f"docker {argv[1:]}"]
    if head == "cp":
        CREATED.add(argv[2])  # the docs make this file: later commands may name it
        return [] if (cwd / argv[1]).is_file() else [f"cp: no file {argv[1]}"]
    if head == ".venv/bin/pip":
        return [] if argv[1] == "download" and (cwd / argv[-3]).is_file() else [f"pip {argv}"]
    if head.startswith("scripts/"):
        return [] if (cwd / head).is_file() else [f"no script {head}"]
    return [f"unknown kind of command: {shlex.join(argv)}"]


@pytest.fixture(scope="module")
def botocore_session():
    return botocore.session.get_session()


def test_every_fenced_command_in_deploy_doc_is_real(synthesized, botocore_session):
    text = DOC.read_text()
    makefile = (ROOT / "Makefile").read_text()
    stack_ids = _stack_ids(synthesized)
    assert {"runnerhub-images", "runnerhub-dev", "runnerhub-prod"} == stack_ids
    commands = doc_commands(text)
    assert len(commands) >= 15
    errors = []
    cwd, block = ROOT, None
    for number, argv in commands:
        if number != block:
            cwd, block = ROOT, number
        if argv[0] == "cd":
            cwd = cwd / argv[1]
            if not cwd.is_dir():
                errors.append(f"cd {argv[1]}: no such directory")
            continue
        errors += [f"{shlex.join(argv)}: {error}"
                   for error in check(argv, cwd, stack_ids, botocore_session, makefile)]
    assert errors == []
    kinds = {argv[0] if argv[0] != "npx" else "cdk" for _, argv in commands}
    assert {"cdk", "aws", "make", "docker", "cd"} <= kinds


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        # The old docs' selector: the stack's construct id was the stage name.
        ("npx aws-cdk@2 deploy -c stages=dev dev", "matches no stack"),
        ("npx aws-cdk@2 deploy -c stage=dev runnerhub-dev", "unknown context key stage"),
        ("npx aws-cdk@2 deploy -c stages=qa runnerhub-dev", "unknown stage in qa"),
        ("aws ecr describe-images --repository runnerhub/x", "no parameter --repository"),
        ("aws ecr push-image --repository-name x", "no operation ecr push-image"),
        ("aws imagebuilder start-pipeline --image-pipeline-arn x", "no operation"),
        ("make deploy", "no make target deploy"),
        ("make synth STAGE=dev", "STAGE is not used"),
        ("terraform apply", "unknown kind of command"),
    ],
)
def test_the_checker_catches(command, expected, botocore_session):
    makefile = (ROOT / "Makefile").read_text()
    stack_ids = {"runnerhub-images", "runnerhub-dev", "runnerhub-prod"}
    (_, argv), = doc_commands(f"```sh\n{command}\n```\n")
    errors = check(argv, ROOT / "infra", stack_ids, botocore_session, makefile)
    assert any(expected in error for error in errors), errors
