"""Python clients of the StreamAttention server: :class:`Client` (sync) and :class:`AsyncClient`.

Both speak every route: ``/generate`` and its SSE stream, the OpenAI-compatible
completions and chat (plain and streamed), ``/benchmark``, ``/metrics``, ``/memory``,
``/health``, ``/ready`` and ``/v1/models``. Requests the server refuses for load
(429/503) and connections that never reached it are retried with exponential backoff,
honouring ``Retry-After``; a stream is retried only before its first byte.

Example::

    from stream_attention.clients import Client

    with Client("http://127.0.0.1:8000") as c:
        print(c.generate("The capital of France is", max_tokens=8).text)
        for ev in c.generate_stream("Once upon a time", max_tokens=32):
            print(ev.text, end="", flush=True)
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from .. import envs

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 503})


class APIError(Exception):
    """The server answered with an error (or an error event mid-stream)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        request_id: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(f"{status}: {message}" + (f" (param: {param})" if param else ""))
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.request_id = request_id
        self.body = body


@dataclass
class Generation:
    """The answer of ``POST /generate``."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: dict[str, int]
    timings: dict[str, float | None]
    request_id: str | None = None
    logprobs: list[dict[str, Any]] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Generation:
        return cls(
            text=data.get("generated_text", ""),
            token_ids=list(data.get("token_ids", [])),
            finish_reason=data.get("finish_reason"),
            usage=dict(data.get("usage") or {}),
            timings=dict(data.get("timings") or {}),
            request_id=data.get("request_id"),
            logprobs=data.get("logprobs"),
            raw=data,
        )


@dataclass
class StreamEvent:
    """One event of ``POST /generate_stream``: a text delta, or the final event."""

    text: str
    token_ids: list[int]
    index: int
    finished: bool
    finish_reason: str | None = None
    generated_text: str | None = None
    usage: dict[str, int] | None = None
    timings: dict[str, float | None] | None = None
    request_id: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StreamEvent:
        token = data.get("token") or {}
        finished = data.get("generated_text") is not None
        return cls(
            text=token.get("text", "") if token else "",
            token_ids=list(data.get("token_ids") or ([token["id"]] if token else [])),
            index=int(data.get("index", 0)),
            finished=finished,
            finish_reason=data.get("finish_reason"),
            generated_text=data.get("generated_text"),
            usage=data.get("usage"),
            timings=data.get("timings"),
            request_id=data.get("request_id"),
            raw=data,
        )


class _SSEParser:
    """Incremental ``text/event-stream`` parser yielding each event's ``data`` field."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r")
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        return self.feed("")


def _error_from(response: httpx.Response, body: bytes | None = None) -> APIError:
    raw = body if body is not None else response.content
    try:
        data = json.loads(raw)
    except (ValueError, TypeError):
        data = None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return APIError(
            response.status_code,
            str(err.get("message", "")),
            param=err.get("param"),
            code=err.get("code"),
            request_id=response.headers.get("x-request-id"),
            body=data,
        )
    text = raw.decode("utf-8", "replace")[:500] if isinstance(raw, bytes) else str(raw)
    return APIError(
        response.status_code, text or response.reason_phrase, request_id=response.headers.get("x-request-id"), body=data
    )


def _event_json(data: str) -> dict[str, Any]:
    obj = json.loads(data)
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict) and "choices" not in obj:
        err = obj["error"]
        raise APIError(500, str(err.get("message", "stream error")), code=err.get("code"), body=obj)
    return obj


def _generate_body(prompt: str | None, prompt_token_ids: list[int] | None, params: dict[str, Any]) -> dict[str, Any]:
    if (prompt is None) == (prompt_token_ids is None):
        raise ValueError("give exactly one of prompt and prompt_token_ids")
    body: dict[str, Any] = (
        {"prompt": prompt} if prompt is not None else {"prompt_token_ids": list(prompt_token_ids or [])}
    )
    body.update({k: v for k, v in params.items() if v is not None})
    return body


def _chat_messages(messages: str | list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
    if system is not None:
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def _openai_body(model: str | None, params: dict[str, Any], **fields: Any) -> dict[str, Any]:
    body = {k: v for k, v in fields.items() if v is not None}
    if model is not None:
        body["model"] = model
    body.update({k: v for k, v in params.items() if v is not None})
    return body


class _Base:
    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        connect_timeout: float = 5.0,
        max_retries: int = 4,
        backoff: float = 0.25,
        max_backoff: float = 10.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.base_url = (base_url or envs.client_url() or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else envs.client_api_key()
        self.headers = dict(headers or {})
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        """``Retry-After`` when the server gives one, else jittered exponential backoff."""
        if response is not None:
            after = response.headers.get("retry-after", "")
            try:
                return min(float(after), self.max_backoff)
            except ValueError:
                pass
        return min(self.backoff * 2**attempt, self.max_backoff) * random.uniform(0.5, 1.0)

    def _retryable(self, attempt: int, response: httpx.Response | None, exc: Exception | None) -> bool:
        if attempt >= self.max_retries:
            return False
        if exc is not None:
            # Only failures that prove the request never reached the server are safe to
            # repeat for a non-idempotent POST.
            return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
        return response is not None and response.status_code in RETRY_STATUSES


class Client(_Base):
    """Synchronous client. Use as a context manager or call :meth:`close`."""

    def __init__(
        self, base_url: str | None = None, *, transport: httpx.BaseTransport | None = None, **kwargs: Any
    ) -> None:
        super().__init__(base_url, **kwargs)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -------------------------------------------------------------------

    def request(
        self, method: str, path: str, *, json_body: Any = None, timeout: float | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send with retries; raise :class:`APIError` for any status >= 400."""
        attempt = 0
        extra = {"timeout": httpx.Timeout(timeout, connect=self.timeout.connect)} if timeout else {}
        while True:
            try:
                response = self._http.request(method, path, json=json_body, **extra, **kwargs)
            except httpx.TransportError as exc:
                if not self._retryable(attempt, None, exc):
                    raise
                time.sleep(self._delay(attempt, None))
                attempt += 1
                continue
            if response.status_code < 400:
                return response
            if not self._retryable(attempt, response, None):
                raise _error_from(response)
            time.sleep(self._delay(attempt, response))
            attempt += 1

    def stream_events(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST ``body`` and yield each SSE event's JSON until ``[DONE]`` or the end."""
        attempt = 0
        while True:
            with self._http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    content = response.read()
                    if self._retryable(attempt, response, None):
                        delay = self._delay(attempt, response)
                    else:
                        raise _error_from(response, content)
                else:
                    parser = _SSEParser()
                    for line in response.iter_lines():
                        data = parser.feed(line)
                        if data is None:
                            continue
                        if data == "[DONE]":
                            return
                        yield _event_json(data)
                    data = parser.flush()
                    if data is not None and data != "[DONE]":
                        yield _event_json(data)
                    return
            time.sleep(delay)
            attempt += 1

    # --- routes ---------------------------------------------------------------------

    def generate(
        self, prompt: str | None = None, *, prompt_token_ids: list[int] | None = None, **params: Any
    ) -> Generation:
        """``POST /generate``; ``params`` are sampling fields (max_tokens, temperature, stop, seed...)."""
        body = _generate_body(prompt, prompt_token_ids, params)
        return Generation.from_json(self.request("POST", "/generate", json_body=body).json())

    def generate_stream(
        self, prompt: str | None = None, *, prompt_token_ids: list[int] | None = None, **params: Any
    ) -> Iterator[StreamEvent]:
        """``POST /generate_stream``: one :class:`StreamEvent` per delta, the last with ``finished``."""
        body = _generate_body(prompt, prompt_token_ids, params)
        for data in self.stream_events("/generate_stream", body):
            yield StreamEvent.from_json(data)

    def completions(self, prompt: str | list[int], *, model: str | None = None, **params: Any) -> dict[str, Any]:
        """``POST /v1/completions`` (OpenAI shape)."""
        return self.request("POST", "/v1/completions", json_body=_openai_body(model, params, prompt=prompt)).json()

    def completions_stream(
        self, prompt: str | list[int], *, model: str | None = None, **params: Any
    ) -> Iterator[dict[str, Any]]:
        """Streamed ``/v1/completions``: yields each ``text_completion`` chunk."""
        yield from self.stream_events("/v1/completions", _openai_body(model, params, prompt=prompt, stream=True))

    def chat(
        self,
        messages: str | list[dict[str, Any]],
        *,
        system: str | None = None,
        model: str | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        """``POST /v1/chat/completions``; ``messages`` may be a single user string."""
        body = _openai_body(model, params, messages=_chat_messages(messages, system))
        return self.request("POST", "/v1/chat/completions", json_body=body).json()

    def chat_stream(
        self,
        messages: str | list[dict[str, Any]],
        *,
        system: str | None = None,
        model: str | None = None,
        **params: Any,
    ) -> Iterator[str]:
        """Streamed chat: yields the assistant's content deltas as text."""
        body = _openai_body(model, params, messages=_chat_messages(messages, system), stream=True)
        for chunk in self.stream_events("/v1/chat/completions", body):
            for choice in chunk.get("choices", []):
                content = (choice.get("delta") or {}).get("content")
                if content:
                    yield content

    def benchmark(self, *, timeout: float = 600.0, **spec: Any) -> dict[str, Any]:
        """``POST /benchmark``: ``kind="kernel"`` (default) or ``"generation"`` and its sizes."""
        return self.request("POST", "/benchmark", json_body=spec, timeout=timeout).json()

    def metrics(self) -> str:
        """``GET /metrics``: the Prometheus text exposition."""
        return self.request("GET", "/metrics").text

    def metrics_dict(self) -> dict[str, list[dict[str, Any]]]:
        """``/metrics`` parsed: ``{sample name: [{"labels": {...}, "value": v}]}``."""
        return parse_metrics(self.metrics())

    def memory(self, *, reset_peak: bool = False) -> dict[str, Any]:
        return self.request("GET", "/memory", params={"reset_peak": str(reset_peak).lower()}).json()

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health").json()

    def ready(self) -> bool:
        """True once the model is loaded (no retries: a 503 here is an answer)."""
        response = self._http.get("/ready")
        if response.status_code in (200, 503):
            return response.status_code == 200
        raise _error_from(response)

    def wait_ready(self, timeout: float = 300.0, interval: float = 0.25) -> None:
        """Poll ``/ready`` until it answers 200; ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.ready():
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.base_url} not ready after {timeout:g} s")
            time.sleep(interval)

    def models(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/models").json()["data"]


class AsyncClient(_Base):
    """Asynchronous twin of :class:`Client` (``await``/``async for``)."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        limits: httpx.Limits | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_url, **kwargs)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self.headers,
            timeout=self.timeout,
            transport=transport,
            limits=limits or httpx.Limits(max_connections=256, max_keepalive_connections=256),
        )

    @property
    def http(self) -> httpx.AsyncClient:
        """The underlying ``httpx.AsyncClient`` (base URL, auth header and limits set)."""
        return self._http

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def request(
        self, method: str, path: str, *, json_body: Any = None, timeout: float | None = None, **kwargs: Any
    ) -> httpx.Response:
        attempt = 0
        extra = {"timeout": httpx.Timeout(timeout, connect=self.timeout.connect)} if timeout else {}
        while True:
            try:
                response = await self._http.request(method, path, json=json_body, **extra, **kwargs)
            except httpx.TransportError as exc:
                if not self._retryable(attempt, None, exc):
                    raise
                await asyncio.sleep(self._delay(attempt, None))
                attempt += 1
                continue
            if response.status_code < 400:
                return response
            if not self._retryable(attempt, response, None):
                raise _error_from(response)
            await asyncio.sleep(self._delay(attempt, response))
            attempt += 1

    async def stream_events(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        attempt = 0
        while True:
            async with self._http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    content = await response.aread()
                    if self._retryable(attempt, response, None):
                        delay = self._delay(attempt, response)
                    else:
                        raise _error_from(response, content)
                else:
                    parser = _SSEParser()
                    async for line in response.aiter_lines():
                        data = parser.feed(line)
                        if data is None:
                            continue
                        if data == "[DONE]":
                            return
                        yield _event_json(data)
                    data = parser.flush()
                    if data is not None and data != "[DONE]":
                        yield _event_json(data)
                    return
            await asyncio.sleep(delay)
            attempt += 1

    async def generate(
        self, prompt: str | None = None, *, prompt_token_ids: list[int] | None = None, **params: Any
    ) -> Generation:
        body = _generate_body(prompt, prompt_token_ids, params)
        return Generation.from_json((await self.request("POST", "/generate", json_body=body)).json())

    async def generate_stream(
        self, prompt: str | None = None, *, prompt_token_ids: list[int] | None = None, **params: Any
    ) -> AsyncIterator[StreamEvent]:
        body = _generate_body(prompt, prompt_token_ids, params)
        async for data in self.stream_events("/generate_stream", body):
            yield StreamEvent.from_json(data)

    async def completions(self, prompt: str | list[int], *, model: str | None = None, **params: Any) -> dict[str, Any]:
        return (
            await self.request("POST", "/v1/completions", json_body=_openai_body(model, params, prompt=prompt))
        ).json()

    async def completions_stream(
        self, prompt: str | list[int], *, model: str | None = None, **params: Any
    ) -> AsyncIterator[dict[str, Any]]:
        async for chunk in self.stream_events(
            "/v1/completions", _openai_body(model, params, prompt=prompt, stream=True)
        ):
            yield chunk

    async def chat(
        self,
        messages: str | list[dict[str, Any]],
        *,
        system: str | None = None,
        model: str | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        body = _openai_body(model, params, messages=_chat_messages(messages, system))
        return (await self.request("POST", "/v1/chat/completions", json_body=body)).json()

    async def chat_stream(
        self,
        messages: str | list[dict[str, Any]],
        *,
        system: str | None = None,
        model: str | None = None,
        **params: Any,
    ) -> AsyncIterator[str]:
        body = _openai_body(model, params, messages=_chat_messages(messages, system), stream=True)
        async for chunk in self.stream_events("/v1/chat/completions", body):
            for choice in chunk.get("choices", []):
                content = (choice.get("delta") or {}).get("content")
                if content:
                    yield content

    async def benchmark(self, *, timeout: float = 600.0, **spec: Any) -> dict[str, Any]:
        return (await self.request("POST", "/benchmark", json_body=spec, timeout=timeout)).json()

    async def metrics(self) -> str:
        return (await self.request("GET", "/metrics")).text

    async def metrics_dict(self) -> dict[str, list[dict[str, Any]]]:
        return parse_metrics(await self.metrics())

    async def memory(self, *, reset_peak: bool = False) -> dict[str, Any]:
        return (await self.request("GET", "/memory", params={"reset_peak": str(reset_peak).lower()})).json()

    async def health(self) -> dict[str, Any]:
        return (await self.request("GET", "/health")).json()

    async def ready(self) -> bool:
        response = await self._http.get("/ready")
        if response.status_code in (200, 503):
            return response.status_code == 200
        raise _error_from(response)

    async def wait_ready(self, timeout: float = 300.0, interval: float = 0.25) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.ready():
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.base_url} not ready after {timeout:g} s")
            await asyncio.sleep(interval)

    async def models(self) -> list[dict[str, Any]]:
        return (await self.request("GET", "/v1/models")).json()["data"]


def parse_metrics(text: str) -> dict[str, list[dict[str, Any]]]:
    """A Prometheus exposition as ``{sample name: [{"labels": {...}, "value": v}]}``."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:  # the client does not otherwise need prometheus_client
        return _parse_metrics_plain(text)
    out: dict[str, list[dict[str, Any]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append({"labels": dict(s.labels), "value": s.value})
    return out


def _parse_metrics_plain(text: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, label_text = head.partition("{")
        labels = {}
        for part in label_text.rstrip("}").split(","):
            if "=" in part:
                k, _, v = part.partition("=")
                labels[k.strip()] = v.strip().strip('"')
        out.setdefault(name, []).append({"labels": labels, "value": float(value)})
    return out
