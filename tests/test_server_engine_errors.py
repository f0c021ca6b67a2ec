"""Engine refusals over HTTP: the real app, the real engine, errors raised past the server's checks.

The server validates requests before the engine sees them, so the engine's own refusals
(``ValueError``, ``PromptTooLongError``, ``QueueFullError``, ``EngineDeadError``) are
only reached when the server's checks pass. Here they are reached two ways: naturally
(a prompt that fits the context length but not the engine's small KV cache), and by an
:class:`AsyncEngine` subclass that refuses the next request with a chosen error, raised
where the engine raises its refusals (before the first output). Each must come back as
its documented status with the JSON error body, on every generation route, streamed or not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from stream_attention.engine import AsyncEngine, EngineConfig  # noqa: E402
from stream_attention.engine.async_engine import EngineDeadError  # noqa: E402
from stream_attention.engine.types import PromptTooLongError, QueueFullError, RequestOutput  # noqa: E402
from stream_attention.server import create_app  # noqa: E402
from tests.test_server import LiveServer, _settings  # noqa: E402

BLOCK_SIZE, NUM_BLOCKS = 16, 4  # a 64-token KV cache under a 2048-token context length


class RefusingEngine(AsyncEngine):
    """The real engine, except that it refuses the next request with :attr:`refusal`."""

    refusal: BaseException | None = None

    async def stream_batches(self, request: Any, params: Any = None) -> AsyncIterator[list[RequestOutput]]:
        refusal, self.refusal = self.refusal, None
        if refusal is not None:
            raise refusal
        async for batch in super().stream_batches(request, params):
            yield batch


ROUTES = [
    ("/generate", {"prompt": "def f(x):", "max_tokens": 4}),
    ("/generate_stream", {"prompt": "def f(x):", "max_tokens": 4}),
    ("/v1/completions", {"prompt": "def f(x):", "max_tokens": 4}),
    ("/v1/completions", {"prompt": "def f(x):", "max_tokens": 4, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}),
]
ROUTE_IDS = [f"{path}{'-stream' if body.get('stream') else ''}" for path, body in ROUTES]


@pytest.fixture(scope="module")
def served() -> tuple[RefusingEngine, httpx.Client]:
    engine = RefusingEngine(config=EngineConfig(
        device="cpu", block_size=BLOCK_SIZE, num_kv_blocks=NUM_BLOCKS, max_num_seqs=4, use_cuda_graphs=False))
    srv = LiveServer(create_app(_settings(retry_after=3), engine=engine))
    srv.wait_ready()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            yield engine, client
    finally:
        srv.stop()
        asyncio.run(engine.shutdown(drain=False))


def _assert_error(r: httpx.Response, status: int, code: str, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param
    return err


REFUSALS = [
    (ValueError("top_p=0.0 is out of range"), 400, "invalid_value", "top_p"),
    (ValueError("prompt is empty"), 400, "invalid_value", None),
    (PromptTooLongError("prompt + max_tokens = 5000 tokens exceeds the KV cache (64 tokens)"), 400,
     "context_length_exceeded", "prompt"),
    (QueueFullError("waiting queue is full (8 requests)"), 429, "queue_full", None),
    (EngineDeadError("engine loop stopped"), 503, "engine_unavailable", None),
]


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("refusal,status,code,param", REFUSALS, ids=lambda x: type(x).__name__ if isinstance(
    x, BaseException) else None)
def test_engine_refusal_maps_to_documented_status(served, route, refusal, status, code, param) -> None:
    engine, client = served
    path, body = route
    engine.refusal = refusal
    err = _assert_error(client.post(path, json=body), status, code, param)
    assert str(refusal) in err["message"]
    if status in (429, 503):
        engine.refusal = refusal
        assert client.post(path, json=body).headers["retry-after"] == "3"
    assert client.post(path, json=body).status_code == 200  # one request's refusal; the engine still serves


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_prompt_larger_than_the_kv_cache_is_a_400(served, route) -> None:
    # Fits the context length (the server's check passes) but not the 64-token KV cache:
    # the engine's own PromptTooLongError, unprovoked.
    _, client = served
    path, body = route
    r = client.post(path, json={**body, "max_tokens": 200})
    err = _assert_error(r, 400, "context_length_exceeded", "prompt")
    assert "KV cache" in err["message"]
    assert client.post(path, json=body).status_code == 200
