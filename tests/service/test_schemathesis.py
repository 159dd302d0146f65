"""Property-based run of the app against its own OpenAPI schema: no server errors, every error
answer is problem+json, and every answer is one the schema documents (status, media type, body).

Driven through hypothesis directly (schemathesis's pytest plugin does not load under
pytest 9), against the app served by a real uvicorn server: one generated test per operation.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.slow  # 30 generated requests per operation, on both backends


def errors_are_problem_json(ctx, response, case) -> bool | None:
    if response.status_code >= 400:
        content_type = response.headers.get("content-type", [""])
        content_type = content_type[0] if isinstance(content_type, list) else content_type
        assert content_type.startswith("application/problem+json"), (response.status_code, content_type)
    return None


CHECKS = [
    not_a_server_error,
    errors_are_problem_json,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_api_answers_as_its_schema_says(app, live_server):
    schema = schemathesis.openapi.from_dict(app.openapi())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def exercise(case):
            case.call_and_validate(base_url=live_server, checks=CHECKS)

        exercise()
