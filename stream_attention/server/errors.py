"""Errors as JSON: one shape for every 4xx/5xx the server sends.

The body follows OpenAI's error object so the official ``openai`` client surfaces the
message and the offending parameter unchanged::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": "out_of_range"}}
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

log = logging.getLogger("stream_attention.server")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class ErrorObject(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error response (declared in the OpenAPI document)."""

    model_config = ConfigDict(extra="forbid")
    error: ErrorObject


class APIError(Exception):
    """An error the server answers with ``status`` and a JSON body naming ``param``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


# The field a request-level ValueError names first: "temperature=5.0 is out of range",
# "prompt_token_ids contain ids outside [0, 4096)", "prompt (9 tokens) + max_tokens ...".
_LEADING_FIELD = re.compile(r"([a-z_][a-z0-9_]*)(?:=|\s|$)")


def request_error(exc: ValueError, *, code: str = "invalid_value") -> APIError:
    """The 400 for a ``ValueError`` raised about one request, by the engine's validation
    or by the builder of its parameters: the one mapping of such errors to HTTP.
    The field the message starts with becomes ``param``."""
    message = str(exc) or type(exc).__name__
    named = _LEADING_FIELD.match(message)
    return APIError(400, message, param=named.group(1) if named else None, code=code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    err_type = _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param=param, code=code), status_code=status, headers=headers)


async def guarded_stream(gen: Any, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Pass ``chunks`` (an SSE body) through; once the 200 has gone out a failure can only be
    an error event, and the request ``gen`` is closed whatever happens (a client that
    disconnects closes this generator, which aborts the request and frees its blocks)."""
    try:
        async for chunk in chunks:
            yield chunk
    except APIError as exc:
        yield sse_error_event(exc.message, code=exc.code, status=exc.status)
    except Exception as exc:
        log.exception("stream of %s failed", getattr(gen, "request_id", "?"))
        yield sse_error_event(f"internal error: {type(exc).__name__}", code="internal_error")
    finally:
        await chunks.aclose()
        await gen.close()


def sse_error_event(message: str, *, code: str | None = None, status: int = 500) -> bytes:
    """An error after the stream's 200 headers went out can only travel as an event."""
    return b"data: " + json.dumps(error_body(status, message, code=code)).encode() + b"\n\n"


def _loc_to_param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    # pydantic names union branches in the location (e.g. "str", "list[int]"); they are
    # not what the caller sent, so leave them out of the parameter name.
    parts = [p for p in parts if not any(c in p for c in "[]") and p not in ("str", "int", "function-after")]
    return ".".join(parts) or None


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """400 naming the first offending field (``json_invalid`` → malformed body)."""
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": (), "type": "invalid"}
    kind = first.get("type", "")
    if kind == "json_invalid":
        ctx = first.get("ctx") or {}
        return error_response(
            400, f"request body is not valid JSON: {ctx.get('error', first.get('msg'))}", code="invalid_json"
        )
    param = _loc_to_param(first.get("loc", ()))
    if kind == "extra_forbidden":
        message = f"unknown field {param!r}"
        code = "unknown_field"
    elif kind == "missing":
        message = f"{param or 'body'}: field required" if param else "request body is required"
        code = "missing_field"
    else:
        msg = str(first.get("msg", "invalid value"))
        # Validators raising ValueError get a "Value error, " prefix from pydantic.
        msg = msg.removeprefix("Value error, ")
        message = f"{param}: {msg}" if param else msg
        code = (
            "out_of_range"
            if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
            else "invalid_value"
        )
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return error_response(400, message, param=param, code=code)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error path (validation, HTTP, ours, unexpected) to the JSON shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", code="internal_error")
