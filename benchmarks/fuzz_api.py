"""Fuzz the management API from its own OpenAPI document (schemathesis generates the requests),
as each role and with no token, and judge every answer (issue 17, "Bad input").

Starts a moto server, the API's tables and queues, the GitHub emulator (retry and redeliver ask
it) and the API over HTTP with local tokens, seeds a small state (devstack/api_seed.py), then
sends at least --requests-per-role requests as admin, operator and viewer, and as many with no
token. Each answer is checked against:

- the document: its body must validate against the operation's response schema for that
  status code (an undocumented status code is a violation too);
- PERMITTED below, written here and NOT imported from chalicelib: a valid request by a role the
  table allows must not be refused (401/403/422, or 400 unless it carried a made-up cursor); a
  role the table does not allow must never get a 2xx;
- 5xx: never.

404/409 on an id that does not exist (or a record in the wrong state, or a value beyond the
pools file's limits) are counted apart, in `not_found`. Requests the generator made invalid on
purpose (negative mode) must be refused with a 4xx, never a 5xx.

    python -m benchmarks.fuzz_api [--requests-per-role 1000] [--seed 17] [--max-seconds 900]

The LAST line printed is a JSON object: requests, 5xx, schema_violations, valid_rejected,
not_found, forbidden_allowed and a few more. Exit 1 when requests < 3 x --requests-per-role or
any failure count is not 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

V1 = "/api/v1"
ROLES = ("admin", "operator", "viewer")
NO_TOKEN = "(no token)"
PUBLIC = "public"  # no token needed
SIGNED_IN = "signed-in"  # any valid token, whatever its groups
READERS = frozenset(ROLES)
OPERATORS = frozenset({"admin", "operator"})
ADMINS = frozenset({"admin"})

# Who may call what (issue 17's roles): written here so that a change to chalicelib's table is
# caught by this check instead of followed by it.
PERMITTED: dict[tuple[str, str], frozenset[str] | str] = {
    ("GET", f"{V1}/health"): PUBLIC,
    ("GET", f"{V1}/health/details"): READERS,
    ("GET", f"{V1}/me"): SIGNED_IN,
    ("GET", f"{V1}/metrics"): READERS,
    ("GET", f"{V1}/pools"): READERS,
    ("GET", f"{V1}/pools/{{pool}}"): READERS,
    ("PUT", f"{V1}/pools/{{pool}}/warm"): OPERATORS,
    ("PUT", f"{V1}/pools/{{pool}}/hosts"): ADMINS,
    ("PUT", f"{V1}/pools/{{pool}}/image"): ADMINS,
    ("GET", f"{V1}/pools/{{pool}}/image-proposal"): READERS,
    ("POST", f"{V1}/pools/{{pool}}/image-proposal/approve"): OPERATORS,
    ("GET", f"{V1}/jobs"): READERS,
    ("GET", f"{V1}/jobs/{{job_id}}"): READERS,
    ("POST", f"{V1}/jobs/{{job_id}}/retry"): OPERATORS,
    ("GET", f"{V1}/runners"): READERS,
    ("POST", f"{V1}/runners/{{runner_name}}/retire"): OPERATORS,
    ("GET", f"{V1}/hosts"): READERS,
    ("POST", f"{V1}/hosts/{{host_id}}/drain"): OPERATORS,
    ("POST", f"{V1}/deliveries/{{delivery_id}}/redeliver"): ADMINS,
    ("GET", f"{V1}/audit"): OPERATORS,
    ("GET", f"{V1}/analytics"): READERS,
}

# The counts that fail the run (the last line has them all).
FAILURES = ("5xx", "schema_violations", "valid_rejected", "forbidden_allowed", "unknown_route")


def allowed(role: str, method: str, template: str) -> bool | None:
    """May `role` (or NO_TOKEN) call the route? None: the route is not in PERMITTED."""
    rule = PERMITTED.get((method.upper(), template))
    if rule is None:
        return None
    if rule == PUBLIC:
        return True
    if role == NO_TOKEN:
        return False
    return rule == SIGNED_IN or role in rule


# --- the judge: pure, unit-tested (tests/unit/test_fuzz_api.py) ---

@dataclass(frozen=True)
class Answer:
    """One request and what came back. `valid`: generated valid per the document (positive
    mode). `schema_problem`: why the body does not match its documented schema (None: it
    does). `made_up_cursor`: the request carried a cursor the API never issued."""

    role: str
    method: str
    template: str
    status: int
    valid: bool = True
    schema_problem: str | None = None
    made_up_cursor: bool = False


def classify(answer: Answer) -> list[str]:
    """The counters this answer adds to (besides `requests`)."""
    kinds: list[str] = []
    if answer.status >= 500:
        kinds.append("5xx")
    if answer.schema_problem is not None:
        kinds.append("schema_violations")
    may = allowed(answer.role, answer.method, answer.template)
    if may is None:
        return [*kinds, "unknown_route"]
    success = 200 <= answer.status < 300
    if not may:
        if success:
            kinds.append("forbidden_allowed")
        return kinds
    if not answer.valid or success or answer.status >= 500:
        return kinds  # an invalid request may be refused with any 4xx
    if answer.status in (404, 409):
        kinds.append("not_found")
    elif answer.status == 400 and answer.made_up_cursor:
        kinds.append("bad_cursor")  # a cursor is signed: a made-up one is refused by design
    else:
        kinds.append("valid_rejected")
    return kinds


@dataclass
class Tally:
    counts: Counter = field(default_factory=Counter)
    per_role: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, answer: Answer, detail: str = "") -> list[str]:
        kinds = classify(answer)
        self.counts["requests"] += 1
        self.per_role[answer.role] += 1
        self.statuses[answer.status] += 1
        for kind in kinds:
            self.counts[kind] += 1
            if kind in FAILURES:
                seen = self.examples.setdefault(kind, [])
                if len(seen) < 5:
                    seen.append(f"{answer.role} {answer.method} {answer.template} -> "
                                f"{answer.status}: {answer.schema_problem or detail}"[:400])
        return kinds


def verdict(tally: Tally, min_requests: int,
            roles: Iterable[str] = ROLES) -> tuple[dict[str, Any], list[str]]:
    """The summary (the last line) and why the run fails (empty: it passes). At least
    `min_requests` in all, and a third of it by each role."""
    summary: dict[str, Any] = {"requests": tally.counts["requests"]}
    for key in ("5xx", "schema_violations", "valid_rejected", "not_found",
                "forbidden_allowed", "unknown_route", "bad_cursor"):
        summary[key] = tally.counts[key]
    summary["per_role"] = {role: tally.per_role[role] for role in (*roles, NO_TOKEN)}
    summary["statuses"] = {str(code): n for code, n in sorted(tally.statuses.items())}
    problems = [f"{key}: {summary[key]}" for key in FAILURES if summary[key]]
    if summary["requests"] < min_requests:
        problems.append(f"requests: {summary['requests']} < {min_requests}")
    roles = tuple(roles)
    for role in roles:
        if summary["per_role"][role] < min_requests // max(len(roles), 1):
            problems.append(f"requests as {role}: {summary['per_role'][role]} < "
                            f"{min_requests // len(roles)}")
    return summary, problems


# --- the document's response schemas ---

class ResponseSchemas:
    """Checks a response body against the operation's documented response (OpenAPI 3.1:
    JSON Schema 2020-12, `$ref`s into the document's components)."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self._validators: dict[tuple[str, str, str, str], Any] = {}

    def problem(self, method: str, template: str, status: int, content_type: str,
                body: bytes) -> str | None:
        """None when the body matches; else what is wrong."""
        operation = self.document["paths"].get(template, {}).get(method.lower())
        if operation is None:
            return f"no operation {method} {template} in the document"
        responses = operation.get("responses", {})
        key = next((k for k in (str(status), f"{status // 100}XX", "default")
                    if k in responses), None)
        if key is None:
            return f"status {status} is not documented ({sorted(responses)})"
        content = responses[key].get("content") or {}
        if not content:
            return None if not body else f"status {status} documents no body"
        media = (content_type or "").split(";")[0].strip().lower()
        if media not in content:
            return f"content type {content_type!r} is not documented ({sorted(content)})"
        validator = self._validator(method, template, key, media, content[media]["schema"])
        if media == "application/json" or media.endswith("+json"):
            try:
                value = json.loads(body)
            except ValueError as exc:
                return f"body is not JSON: {exc}"
        else:
            try:
                value = body.decode()
            except UnicodeDecodeError as exc:
                return f"body is not text: {exc}"
        error = next(iter(validator.iter_errors(value)), None)
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path) or "(body)"
        return f"{where}: {error.message}"[:300]

    def _validator(self, method: str, template: str, key: str, media: str,
                   schema: dict[str, Any]) -> Any:
        from jsonschema import Draft202012Validator

        cache_key = (method, template, key, media)
        if cache_key not in self._validators:
            # `#/components/...` resolves against the root: give the schema the components.
            rooted = {**schema, "components": self.document.get("components", {})}
            self._validators[cache_key] = Draft202012Validator(rooted)
        return self._validators[cache_key]


# --- the run ---

@dataclass(frozen=True)
class Settings:
    requests_per_role: int = 1000
    seed: int = 17
    max_seconds: float = 900.0
    negative_share: float = 0.2  # of each role's requests: invalid on purpose


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("werkzeug", "botocore", "urllib3", "emulator", "runnerhub-api"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "ERROR")


def run(settings: Settings, out=sys.stdout) -> tuple[dict[str, Any], list[str]]:
    """Start the stack, fuzz, stop it; returns the verdict."""
    _quiet()
    os.environ.update(AWS_ACCESS_KEY_ID="fuzz", AWS_SECRET_ACCESS_KEY="fuzz",
                      AWS_DEFAULT_REGION="us-east-1", RUNNERHUB_API_AUTH="local")
    os.environ.pop("AWS_PROFILE", None)
    from chalicelib.api.tokens import new_key_pair
    from chalicelib.github import GitHubApp
    from devstack.api_seed import ApiStack, seed
    from devstack.aws_server import LocalAws
    from emulator import AppConfig, Emulator, EmulatorConfig, InstallationConfig
    from emulator.testing import generate_app_key

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fuzz-api-") as tmp:
        workdir = Path(tmp)
        private = workdir / "api.pem"
        public = new_key_pair(private)
        app_private, app_public = generate_app_key()
        moto = LocalAws().start()
        os.environ["AWS_ENDPOINT_URL"] = moto.endpoint_url
        github = Emulator(EmulatorConfig(apps=[AppConfig(
            app_id=17, public_key_pem=app_public,
            installations=[InstallationConfig(id=1700, account="octo-org")])])).start()
        api = ApiStack(workdir, (private.read_bytes(), public),
                       github=lambda: GitHubApp(17, app_private, github.base_url))
        try:
            api.start()
            seed(api.dynamodb, api.names)
            tally = fuzz(api, settings, out)
        finally:
            api.stop()
            github.stop()
            moto.stop()
    summary, problems = verdict(tally, 3 * settings.requests_per_role)
    summary["wall_s"] = round(time.monotonic() - started, 1)
    for kind, seen in tally.examples.items():
        for example in seen:
            print(f"example {kind}: {example}", file=out, flush=True)
    return summary, problems


def fuzz(api: Any, settings: Settings, out=sys.stdout) -> Tally:
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given
    from hypothesis import seed as hypothesis_seed
    from hypothesis import settings as hypothesis_settings
    from hypothesis import strategies as st
    from schemathesis.generation import GenerationMode

    from devstack import api_seed

    document = requests.get(f"{api.url}{V1}/openapi.json", timeout=10).json()
    schemas = ResponseSchemas(document)
    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]
    # Ids that exist, so that actions reach real records, not only 404s.
    known: dict[str, list[Any]] = {
        "pool": [api_seed.POOL], "job_id": list(api_seed.JOB_IDS),
        "host_id": list(api_seed.HOST_IDS), "runner_name": list(api_seed.RUNNER_NAMES),
        "delivery_id": [1, 2]}

    def strategies(mode: GenerationMode) -> list[Any]:
        made = []
        for op in operations:
            has_input = bool(op.path_parameters or op.query or op.body)
            if mode == GenerationMode.NEGATIVE and not has_input:
                continue  # nothing to make invalid
            made.append(op.as_strategy(generation_mode=mode))
            names = [p.name for p in op.path_parameters]
            if mode == GenerationMode.POSITIVE and names and all(n in known for n in names):
                made.append(st.fixed_dictionaries({n: st.sampled_from(known[n]) for n in names})
                            .flatmap(lambda fixed, op=op: op.as_strategy(
                                generation_mode=mode, path_parameters=fixed)))
            if mode == GenerationMode.POSITIVE and any(q.name == "pool" for q in op.query):
                made.append(op.as_strategy(generation_mode=mode,
                                           query={"pool": api_seed.POOL}))
        return made

    cases = {True: st.one_of(strategies(GenerationMode.POSITIVE)),
             False: st.one_of(strategies(GenerationMode.NEGATIVE))}
    session = requests.Session()
    tally = Tally()
    deadline = time.monotonic() + settings.max_seconds
    issued = set()  # cursors the API gave out: those are not made up

    def send(role: str, valid: bool, case: Any) -> None:
        headers = {"User-Agent": "fuzz-api/1"}
        if role != NO_TOKEN:
            headers["Authorization"] = f"Bearer {api.token(role)}"
        try:
            response = case.call(base_url=api.url, session=session, headers=headers,
                                 timeout=30)
        except Exception as exc:  # a request the transport could not send: not the API's
            tally.counts["unsent"] += 1
            print(f"unsent: {case.method} {case.path}: {exc}"[:300], file=sys.stderr)
            return
        body = response.content
        template = case.operation.path
        content_type = (response.headers.get("content-type") or [""])[0]  # lower-case, lists
        problem = schemas.problem(case.method, template, response.status_code, content_type,
                                  body)
        cursor = (case.query or {}).get("cursor")
        if response.status_code == 200 and b"next_cursor" in body:
            try:
                issued.add(json.loads(body).get("next_cursor"))
            except ValueError:
                pass
        tally.add(Answer(role=role, method=case.method.upper(), template=template,
                         status=response.status_code, valid=valid, schema_problem=problem,
                         made_up_cursor=bool(cursor) and not (isinstance(cursor, str)
                                                             and cursor in issued)),
                  detail=body[:200].decode(errors="replace"))

    def round_of(role: str, valid: bool, goal: int, seed: int, examples: int):
        """One Hypothesis run: up to `examples` requests as `role` until it has sent `goal`."""
        @hypothesis_seed(seed)
        @hypothesis_settings(max_examples=examples, phases=[Phase.generate], database=None,
                             deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=cases[valid])
        def one(case: Any) -> None:
            if tally.per_role[role] < goal and time.monotonic() < deadline:
                send(role, valid, case)

        return one

    for role in (*ROLES, NO_TOKEN):
        valid_count = round(settings.requests_per_role * (1 - settings.negative_share))
        for valid, count in ((True, valid_count),
                             (False, settings.requests_per_role - valid_count)):
            goal = tally.per_role[role] + count
            # Hypothesis may end a run early (a small input space): run again with another
            # seed, a bounded number of times.
            for round_ in range(20):
                left = goal - tally.per_role[role]
                if left <= 0 or time.monotonic() >= deadline:
                    break

                round_of(role, valid, goal, settings.seed * 1000 + round_, left)()
        print(f"{role}: {tally.per_role[role]} requests, {dict(tally.counts)}", file=out,
              flush=True)
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-per-role", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--max-seconds", type=float, default=900.0,
                        help="stop generating after this long (the verdict still counts)")
    args = parser.parse_args(argv)
    if args.requests_per_role < 1 or args.max_seconds <= 0:
        parser.error("--requests-per-role and --max-seconds must be positive")
    summary, problems = run(Settings(requests_per_role=args.requests_per_role, seed=args.seed,
                                     max_seconds=args.max_seconds))
    for problem in problems:
        print(f"FAIL {problem}", flush=True)
    summary["passed"] = not problems
    print(json.dumps(summary, sort_keys=False), flush=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
