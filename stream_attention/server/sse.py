"""Server-Sent Events over FastAPI's own ``StreamingResponse`` (no sse-starlette needed)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"

# One encoder for every event (json.dumps with options builds a new one per call).
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# A str as a JSON string literal, exactly as the encoder above writes it (C accelerated).
json_str = json.encoder.encode_basestring


def event(data: dict[str, Any]) -> bytes:
    """One ``data:`` event; compact JSON keeps per-token overhead low at many streams."""
    return b"data: " + _encode(data).encode() + b"\n\n"


def json_head(data: dict[str, Any]) -> str:
    """``data``'s compact JSON without its closing brace: the fixed head of per-token
    events whose remaining fields are written from a template."""
    return _encode(data)[:-1]


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` response that always closes its event generator.

    Starlette leaves the body iterator unclosed when the client goes away under ASGI
    spec 2.4 servers (it just stops iterating); closing it here runs the generator's
    ``finally``, which is where the engine request is aborted and its blocks freed.

    Under spec < 2.4 servers (uvicorn) the client's disconnect must be watched for:
    instead of Starlette's anyio task group per response, one plain asyncio task waits for
    ``http.disconnect`` and cancels the streaming task, which then ends quietly.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> None:
        super().__init__(content, headers={**SSE_HEADERS, **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            spec = scope.get("asgi", {}).get("spec_version", "2.0")
            if scope["type"] != "http" or tuple(map(int, spec.split("."))) >= (2, 4):
                await super().__call__(scope, receive, send)
            else:
                await self._stream_until_disconnect(receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()

    async def _stream_until_disconnect(self, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            except Exception:  # the server's receive failed: treat it as the client gone
                pass
            gone = True
            task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not gone or task.uncancel() > 0:
                raise  # a cancellation of someone else's (shutdown): pass it on
        finally:
            watcher.cancel()
        if self.background is not None:
            await self.background()
