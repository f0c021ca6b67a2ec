"""Per-request limits and the strict JSON reading every body goes through.

Whatever a client sends must end in a 4xx naming what was wrong, never a 500: bodies are
read here before FastAPI validates them against the schemas, so the checks that no
pydantic type expresses happen once, for every route:

- the ``Content-Type`` must be JSON (415 naming the type sent);
- the body must be UTF-8 (or UTF-16/32, as RFC 8259 parsers accept) JSON;
- no string may hold a lone UTF-16 surrogate (``"\\ud800"``): the tokenizer cannot
  encode it, and nothing downstream could;
- no number may be ``NaN``/``Infinity`` (Python's parser accepts those literals, and
  ``1e999`` overflows to infinity);
- nesting stays within ``max_json_depth``.

Errors name the offending field by its path (``messages.0.content``). Limits that belong
to one field (stop strings, ``logit_bias``) are checked by the schemas through
:func:`current_limits`, which the route sets to the serving app's settings.
"""

from __future__ import annotations

import contextvars
import json
import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, fields
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from .errors import APIError
from .settings import ServerSettings


@dataclass(frozen=True)
class RequestLimits:
    """The per-request bounds of :class:`~.settings.ServerSettings` that schemas check."""

    max_json_depth: int
    max_stop_strings: int
    max_stop_string_chars: int
    max_stop_token_ids: int
    max_logit_bias: int
    max_n: int

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> RequestLimits:
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


DEFAULT_LIMITS = RequestLimits(**{f.name: ServerSettings.model_fields[f.name].default for f in fields(RequestLimits)})
_limits: contextvars.ContextVar[RequestLimits] = contextvars.ContextVar("request_limits", default=DEFAULT_LIMITS)


def current_limits() -> RequestLimits:
    """The limits of the app serving the current request (the defaults outside one)."""
    return _limits.get()


def json_content_type(value: str | None) -> bool:
    media = (value or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def parse_json_body(raw: bytes, limits: RequestLimits) -> Any:
    """``raw`` as JSON, or an :class:`APIError` (400) saying what is wrong and where."""
    try:
        # NaN/Infinity literals parse to floats, which the walk below rejects by field.
        data = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise APIError(
            400, f"request body is not valid UTF-8 (byte {exc.start}: {exc.reason})", code="invalid_encoding"
        ) from exc
    except RecursionError as exc:
        raise APIError(
            400, f"request body is nested deeper than {limits.max_json_depth} levels", code="too_deep"
        ) from exc
    except ValueError as exc:  # JSONDecodeError, or an integer literal too long to convert
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    check_json_values(data, limits.max_json_depth)
    return data


def _field(path: list[str | int]) -> str | None:
    return ".".join(map(str, path)) or None


def check_json_values(data: Any, max_depth: int) -> None:
    """Reject lone surrogates, non-finite numbers and nesting past ``max_depth``, naming
    the path of an offender. Iterative, so a deep body cannot exhaust the stack here."""
    stack: list[tuple[Any, list[str | int]]] = [(data, [])]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, float):
            if not math.isfinite(value):
                field = _field(path)
                raise APIError(
                    400,
                    f"{field or 'body'}: {value} is not a finite number",
                    param=field,
                    code="invalid_value",
                )
        elif isinstance(value, dict | list):
            if len(path) >= max_depth:
                raise APIError(
                    400,
                    f"request body is nested deeper than {max_depth} levels (at {_field(path)})",
                    param=_field(path),
                    code="too_deep",
                )
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_text(key, path)
                    stack.append((item, [*path, key]))
            elif value and not all(type(v) is int for v in value):  # token-id lists: nothing to check
                stack.extend((item, [*path, i]) for i, item in enumerate(value))


def _check_text(text: str, path: list[str | int]) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        field = _field(path)
        raise APIError(
            400,
            f"{field or 'body'}: lone UTF-16 surrogate {text[exc.start]!r} at character {exc.start}; "
            "text must be valid Unicode",
            param=field,
            code="invalid_unicode",
        ) from None


class _JSONBodyRequest(Request):
    """A request whose ``json()`` is :func:`parse_json_body` (what FastAPI validates)."""

    limits: RequestLimits = DEFAULT_LIMITS

    async def json(self) -> Any:
        if not hasattr(self, "_parsed"):
            self._parsed = parse_json_body(await self.body(), self.limits)
        return self._parsed


class JSONBodyRoute(APIRoute):
    """Route class of every router: bodies are read strictly (module doc) and the app's
    limits are in force (:func:`current_limits`) while FastAPI validates them."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            limits = getattr(request.app.state, "limits", None) or DEFAULT_LIMITS
            request = _JSONBodyRequest(request.scope, request.receive)
            request.limits = limits
            if request.method in ("POST", "PUT", "PATCH") and (await request.body()).strip():
                content_type = request.headers.get("content-type")
                if not json_content_type(content_type):
                    sent = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
                    raise APIError(
                        415,
                        f"request body sent with {sent}; send it as application/json",
                        param="Content-Type",
                        code="unsupported_media_type",
                    )
                await request.json()  # errors surface here, with their own status and message
            token = _limits.set(limits)
            try:
                return await handler(request)
            finally:
                _limits.reset(token)

        return strict_handler


def check_logit_bias(bias: dict[str, float]) -> None:
    """``logit_bias`` as OpenAI defines it: at most ``max_logit_bias`` entries, keys token
    ids (decimal strings of non-negative integers), biases in [-100, 100]."""
    limit = current_limits().max_logit_bias
    if len(bias) > limit:
        raise ValueError(f"at most {limit} entries")
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()):
            raise ValueError(f"key {key[:32]!r} is not a token id (a non-negative integer)")
        if not -100.0 <= value <= 100.0:
            raise ValueError(f"bias {value} for token {key} is outside [-100, 100]")
