"""Property-based requests from the app's own OpenAPI schema (schemathesis) against a real server.

Every operation gets generated valid and invalid inputs; the checks: no 5xx ever, responses match
the documented schema and content type. Generation is kept short by the server's limits.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance
from server_process import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

EXAMPLES = int(os.environ.get("MEMLLM_FUZZ_EXAMPLES", "25"))  # per operation


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    env = {
        "MEMLLM_API_MAX_OUTPUT_TOKENS": "4",
        "MEMLLM_API_DEFAULT_MAX_TOKENS": "2",
        "MEMLLM_API_MAX_PROMPT_TOKENS": "512",
        "MEMLLM_API_RATE_LIMIT_PER_MINUTE": "0",
    }
    with ServerProcess(tmp_path_factory.mktemp("fuzz") / "data", env) as srv:
        yield srv


def test_no_server_errors_and_responses_match_the_schema(fuzz_server):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/schema/openapi.json")
    checks = [not_a_server_error, response_schema_conformance, content_type_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20, [op.label for op in operations]
    failures: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate(base_url=fuzz_server.url, checks=checks, timeout=120)

        try:
            check()
        except Exception as exc:  # one report for every failing operation, not just the first
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
