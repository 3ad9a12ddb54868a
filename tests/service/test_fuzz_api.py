"""Schemathesis against the service's own OpenAPI document: generated requests never get a 5xx or hang.

Every operation of the document is fuzzed with schemathesis' Hypothesis strategies (its pytest plugin does
not run on pytest 9)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

pytestmark = pytest.mark.slow


def test_no_server_errors(service_url):
    schema = schemathesis.openapi.from_url(f"{service_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/chat/completions",
        "GET /v1/models",
        "GET /health",
    }
    statuses: set[int] = set()
    for operation in operations:

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(operation.as_strategy())
        def call(case):
            response = case.call(timeout=30)
            statuses.add(response.status_code)
            assert response.status_code < 500, f"{case.method} {case.path}: {response.text}"
            if response.status_code >= 400 and case.path.startswith("/v1"):
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        call()
    assert 400 in statuses  # the fuzzer did reach the validation paths
