"""Property-based fuzzing of the whole API from its own OpenAPI document (schemathesis).

Every operation gets generated valid and invalid requests with an admin token; no
response may be a 5xx or break the documented response schema.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import response_schema_conformance

from gateway.api import create_app
from gateway.registry import Registry
from tests.gateway import test_registry_fixtures as _fx
from tests.gateway.test_api import ADMIN, make_config
from tests.gateway.test_registry_fixtures import T0

_EXAMPLES = 60

# Fixtures shared with the other registry/API tests.
registry = _fx.registry
hebei = _fx.hebei


def test_no_server_errors_and_responses_match_the_schema(hebei: Registry) -> None:
    app = create_app(hebei, make_config(), clock=lambda: T0 / 1000)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operations.append(result.ok())
    assert len(operations) >= 15
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def run(case: Any) -> None:
            case.call_and_validate(
                headers=ADMIN, checks=[not_a_server_error, response_schema_conformance]
            )

        try:
            run()
        except Exception as exc:
            raise AssertionError(f"{op.method.upper()} {op.path}: {exc}") from exc
    with TestClient(app) as client:
        text = client.get("/metrics", headers=ADMIN).text
    served = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("iiot_api_requests_total{")
    )
    assert served >= len(operations) * 10  # the fuzzer really exercised the app
    assert 'status="500"' not in text
