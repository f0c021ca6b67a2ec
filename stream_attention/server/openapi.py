"""What the OpenAPI document declares beyond what FastAPI infers from the routes.

Every route answers errors in one JSON shape (:class:`~.errors.ErrorResponse`); streaming
routes answer Server-Sent Events. Declaring both lets a client, or a schema-driven test,
check every response the server sends against ``GET /openapi.json``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from .errors import ErrorResponse

# The error statuses any route may answer with, for the OpenAPI document.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "invalid request: the message names the field (param)",
        401: "missing or invalid API key",
        404: "unknown model, or the route is disabled",
        413: "request body too large",
        415: "request body is not JSON",
        429: "queue full or a benchmark already running (Retry-After)",
        500: "internal error",
        503: "model loading, failed or shutting down (Retry-After)",
    }.items()
}

# One event of our streams in OpenAPI 3.1 terms: a ``data:`` line holding a JSON object
# (``[DONE]`` ends OpenAI streams).
EVENT_STREAM_CONTENT = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "properties": {"data": {"type": "string", "contentMediaType": "application/json"}},
            "required": ["data"],
        }
    }
}
# OpenAPI ``responses`` of a route that streams events.
EVENT_STREAM: dict[int | str, dict[str, Any]] = {
    200: {"description": "Server-Sent Events", "content": EVENT_STREAM_CONTENT}
}
# ... and of one that answers JSON, or streams events when the request says ``stream: true``.
STREAM_OR_JSON: dict[int | str, dict[str, Any]] = {
    200: {"description": "JSON, or Server-Sent Events when stream is true", "content": EVENT_STREAM_CONTENT}
}


def document_errors_as_sent(app: FastAPI) -> None:
    """Errors in the OpenAPI document as the server sends them: every error status as JSON
    in the :class:`~.errors.ErrorResponse` shape (FastAPI files them under the route's own
    media type, e.g. ``text/event-stream``), and no automatic 422 (validation errors are 400)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    responses = operation.get("responses", {})
                    responses.pop("422", None)
                    for status in ERROR_RESPONSES:
                        content = responses.get(str(status), {}).get("content")
                        if content and "application/json" not in content:
                            responses[str(status)]["content"] = {"application/json": content.popitem()[1]}
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
