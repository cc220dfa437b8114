"""benchmarks/fuzz_api.py's judge: each failure it exists to catch, fed to it by hand (a 5xx, a
body not matching its schema, a valid request refused, a forbidden one allowed, too few
requests), and what it must not count as a failure."""

from __future__ import annotations

import json

import pytest

from benchmarks.fuzz_api import (
    NO_TOKEN,
    PERMITTED,
    ROLES,
    V1,
    Answer,
    ResponseSchemas,
    Tally,
    allowed,
    classify,
    verdict,
)

WARM = f"{V1}/pools/{{pool}}/warm"
POOLS = f"{V1}/pools"


def run_of(*answers: Answer, per_role: int = 1) -> tuple[dict, list[str]]:
    """A run: `per_role` clean reads by each role, plus `answers`."""
    tally = Tally()
    for role in ROLES:
        for _ in range(per_role):
            tally.add(Answer(role, "GET", POOLS, 200))
    for answer in answers:
        tally.add(answer)
    return verdict(tally, min_requests=3 * per_role)


def test_a_clean_run_passes_and_its_summary_has_the_issues_keys():
    summary, problems = run_of(Answer("viewer", "GET", f"{V1}/jobs/{{job_id}}", 404))
    assert problems == []
    assert {"requests", "5xx", "schema_violations", "valid_rejected", "not_found"} <= set(summary)
    assert summary["requests"] == 4 and summary["not_found"] == 1
    json.dumps(summary)


def test_a_5xx_fails_the_run_even_for_an_invalid_request():
    summary, problems = run_of(Answer("admin", "PUT", WARM, 500, valid=False))
    assert summary["5xx"] == 1 and problems == ["5xx: 1"]
    summary, _ = run_of(Answer("admin", "POST", f"{V1}/jobs/{{job_id}}/retry", 503))
    assert summary["5xx"] == 1 and summary["valid_rejected"] == 0


def test_a_body_not_matching_its_schema_fails_the_run():
    summary, problems = run_of(Answer("viewer", "GET", POOLS, 200,
                                      schema_problem="pools: 'x' is not of type 'array'"))
    assert summary["schema_violations"] == 1 and problems == ["schema_violations: 1"]


@pytest.mark.parametrize("status", [401, 403, 422, 400, 405, 413])
def test_a_valid_request_by_a_role_allowed_refused_is_valid_rejected(status):
    summary, problems = run_of(Answer("operator", "PUT", WARM, status))
    assert summary["valid_rejected"] == 1 and problems == ["valid_rejected: 1"]


def test_400_on_a_made_up_cursor_is_counted_apart_not_as_a_refusal():
    summary, problems = run_of(Answer("viewer", "GET", f"{V1}/jobs", 400, made_up_cursor=True))
    assert summary["bad_cursor"] == 1 and summary["valid_rejected"] == 0 and problems == []


@pytest.mark.parametrize("status", [404, 409])
def test_404_and_409_by_an_allowed_role_are_not_found_not_failures(status):
    summary, problems = run_of(Answer("admin", "POST", f"{V1}/hosts/{{host_id}}/drain", status))
    assert summary["not_found"] == 1 and problems == []


def test_an_invalid_request_refused_with_any_4xx_is_fine():
    assert classify(Answer("admin", "PUT", WARM, 422, valid=False)) == []
    assert classify(Answer("admin", "PUT", WARM, 400, valid=False)) == []


@pytest.mark.parametrize(("role", "method", "template"), [
    ("viewer", "PUT", WARM),
    ("operator", "PUT", f"{V1}/pools/{{pool}}/hosts"),
    ("operator", "POST", f"{V1}/deliveries/{{delivery_id}}/redeliver"),
    ("viewer", "GET", f"{V1}/audit"),
    (NO_TOKEN, "GET", POOLS),
    (NO_TOKEN, "GET", f"{V1}/me"),
])
def test_a_forbidden_caller_answered_2xx_fails_the_run(role, method, template):
    summary, problems = run_of(Answer(role, method, template, 200))
    assert summary["forbidden_allowed"] == 1 and problems == ["forbidden_allowed: 1"]
    # ... even with a request the generator made invalid: no 2xx for them, ever.
    assert "forbidden_allowed" in classify(Answer(role, method, template, 204, valid=False))
    # Refusing them is right.
    assert classify(Answer(role, method, template, 401 if role == NO_TOKEN else 403)) == []


def test_health_is_public_and_me_needs_only_a_token():
    assert classify(Answer(NO_TOKEN, "GET", f"{V1}/health", 200)) == []
    assert allowed(NO_TOKEN, "GET", f"{V1}/me") is False
    assert classify(Answer("viewer", "GET", f"{V1}/me", 200)) == []


def test_a_route_missing_from_the_table_fails_the_run():
    summary, problems = run_of(Answer("admin", "DELETE", f"{V1}/pools/{{pool}}", 405))
    assert summary["unknown_route"] == 1 and problems == ["unknown_route: 1"]


def test_too_few_requests_fail_the_run():
    tally = Tally()
    for role in ROLES:
        for _ in range(999):
            tally.add(Answer(role, "GET", POOLS, 200))
    summary, problems = verdict(tally, min_requests=3000)
    assert summary["requests"] == 2997 and "requests: 2997 < 3000" in problems


def test_requests_by_no_token_do_not_make_up_for_a_role_left_out():
    tally = Tally()
    for role in ("admin", "operator", NO_TOKEN, NO_TOKEN):
        for _ in range(1000):
            tally.add(Answer(role, "GET", POOLS, 200 if role != NO_TOKEN else 401))
    summary, problems = verdict(tally, min_requests=3000)
    assert summary["requests"] == 4000
    assert problems == ["requests as viewer: 0 < 1000"]


def test_the_table_gives_admin_everything_and_viewer_only_reads():
    for (method, template) in PERMITTED:
        assert allowed("admin", method, template)
        assert allowed("viewer", method, template) == (method == "GET"
                                                       and template != f"{V1}/audit")


DOCUMENT = {
    "openapi": "3.1.0",
    "paths": {f"{V1}/pools": {"get": {"responses": {
        "200": {"description": "OK", "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/PoolList"}}}},
        "403": {"description": "no", "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ErrorBody"}}}},
    }}}, f"{V1}/metrics": {"get": {"responses": {
        "200": {"description": "text", "content": {"text/plain": {
            "schema": {"type": "string"}}}}}}}},
    "components": {"schemas": {
        "PoolList": {"type": "object", "required": ["pools"], "additionalProperties": False,
                     "properties": {"pools": {"type": "array", "items": {"type": "string"}}}},
        "ErrorBody": {"type": "object", "required": ["status", "error"],
                      "properties": {"status": {"type": "integer"},
                                     "error": {"type": "string"}}}}},
}


def test_response_schemas_accept_a_matching_body():
    schemas = ResponseSchemas(DOCUMENT)
    assert schemas.problem("GET", f"{V1}/pools", 200, "application/json",
                           b'{"pools": ["linux"]}') is None
    assert schemas.problem("GET", f"{V1}/metrics", 200, "text/plain; version=0.0.4",
                           b"runnerhub_up 1\n") is None


@pytest.mark.parametrize(("status", "content_type", "body", "expected"), [
    (200, "application/json", b'{"pools": "linux"}', "is not of type 'array'"),
    (200, "application/json", b'{"pools": [], "extra": 1}', "Additional properties"),
    (403, "application/json", b'{"status": 403}', "'error' is a required property"),
    (200, "application/json", b"not json", "not JSON"),
    (200, "text/html", b"<p>", "content type 'text/html' is not documented"),
    (500, "application/json", b'{"status": 500, "error": "x"}', "status 500 is not documented"),
])
def test_response_schemas_catch_a_body_not_matching_its_schema(status, content_type, body,
                                                               expected):
    problem = ResponseSchemas(DOCUMENT).problem("GET", f"{V1}/pools", status, content_type,
                                                body)
    assert problem is not None and expected in problem
