"""Property-based tests generated from the server's own OpenAPI document (schemathesis).

Requests go to the real app in process (ASGI, no network), serving the embedded default
model on CPU. Whatever schemathesis generates, valid or not, the server must answer with
no 5xx, with a status, content type and body the document declares, and every error in
the one error shape (:class:`stream_attention.server.errors.ErrorResponse`).
"""

from __future__ import annotations

from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from stream_attention.server import ServerSettings, create_app  # noqa: E402
from stream_attention.server.errors import ErrorResponse  # noqa: E402

from .test_server import shared_server  # noqa: E402

# Small enough that a generated generation request or benchmark finishes in tens of
# milliseconds on CPU.
CONTRACT_SETTINGS = {
    "max_tokens": 4,
    "benchmark_max_seq_len": 32,
    "benchmark_max_tokens": 2,
    "benchmark_max_requests": 2,
    "benchmark_time_budget": 2.0,
    "log_level": "warning",
}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = {GenerationMode.POSITIVE: 12, GenerationMode.NEGATIVE: 12}


def _settings() -> ServerSettings:
    return ServerSettings(_env_file=None, **CONTRACT_SETTINGS)


# The operations come from the document itself (building it loads no model). Negative
# cases need something to break: a body or a parameter.
CASES = [
    (method.upper(), path, mode)
    for path, operations in create_app(_settings()).openapi()["paths"].items()
    for method, operation in operations.items()
    for mode in EXAMPLES
    if mode is GenerationMode.POSITIVE or "requestBody" in operation or operation.get("parameters")
]


@pytest.fixture(scope="module")
def api_schema(request: pytest.FixtureRequest) -> Any:
    engine = shared_server("main", request.config).engine
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(_settings(), engine=engine))


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_every_answer_is_declared_and_no_input_is_a_server_error(
    api_schema: Any, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES[mode], deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def check(case: Any) -> None:
        response = case.call()
        case.validate_response(response, checks=CHECKS)
        if response.status_code >= 400:
            ErrorResponse.model_validate_json(response.content)

    check()
