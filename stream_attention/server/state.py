"""Per-app server state and the generation path shared by every generating route.

:class:`GenerationStream` is where HTTP meets the engine: it turns engine refusals into
4xx/429, records TTFT/ITL/e2e, and guarantees that a request whose HTTP side goes away
(client disconnect, error, shutdown) is aborted in the engine so its KV blocks return to
the pool.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from starlette.requests import Request as HTTPRequest

from ..engine.types import EngineStats, PromptTooLongError, QueueFullError, Request, RequestOutput, SamplingParams
from . import engine_bridge as bridge
from .errors import APIError, request_error
from .generation_defaults import load_sampling_defaults, served_model_source
from .metrics import ServerMetrics
from .settings import ServerSettings

log = logging.getLogger("stream_attention.server")
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
T = TypeVar("T")
# Below this many characters tokenizing inline costs less than the hop to a thread.
_INLINE_TOKENIZE_CHARS = 8192


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was ready."""


@dataclass
class ServerState:
    """What the routes share: settings, metrics, and the engine once it has loaded."""

    settings: ServerSettings
    metrics: ServerMetrics | None = None
    engine: Any = None
    load_error: str | None = None
    draining: bool = False
    started_at: float = field(default_factory=time.time)
    model_name: str = ""
    max_model_len: int = 0
    device: str = "cpu"
    tokenizer: Any = None
    vocab_size: int = 0
    in_flight: int = 0  # HTTP requests being served, for the shutdown drain
    streams: set[GenerationStream] = field(default_factory=set)  # open engine requests, for shutdown
    token_text: Any = None  # token id -> text cache for logprob entries (built on first use)
    sampling_defaults: dict[str, float] = field(default_factory=dict)  # from the model's generation config

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining and bridge.is_ready(self.engine)

    @property
    def engine_dead(self) -> bool:
        """Loaded once, but it can serve nothing more (its supervisor gave up): only a
        restart of the server helps. A restarting engine is not dead, only not ready."""
        return self.engine is not None and not bridge.is_alive(self.engine)

    def attach(self, engine: Any) -> None:
        """Adopt a loaded engine and cache what routes read on every request."""
        source = self.settings.generation_config
        model, known = served_model_source(self.settings.model, getattr(engine, "model_name", None))
        self.sampling_defaults = load_sampling_defaults(source, model) if known or source != "auto" else {}
        self.tokenizer = bridge.tokenizer(engine)
        self.max_model_len = bridge.max_model_len(engine)
        self.model_name = bridge.model_name(engine, self.settings)
        self.device = bridge.device(engine, self.settings)
        self.vocab_size = bridge.vocab_size(engine)
        self.engine = engine

    def stats(self) -> EngineStats | None:
        return bridge.stats(self.engine) if self.engine is not None else None

    def retry_headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after)}

    def require_engine(self) -> Any:
        if self.draining:
            raise APIError(503, "server is shutting down", code="draining", headers=self.retry_headers())
        if self.engine is None:
            if self.load_error:
                raise APIError(503, f"model failed to load: {self.load_error}", code="load_failed")
            if self.metrics:
                self.metrics.rejected.labels(reason="not_ready").inc()
            raise APIError(503, "model is loading", code="not_ready", headers=self.retry_headers())
        return self.engine

    # --- prompts --------------------------------------------------------------------

    async def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; long texts are tokenized off the event loop so other
        streams keep flowing meanwhile."""

        def run() -> list[int]:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

        return await asyncio.to_thread(run) if len(text) > _INLINE_TOKENIZE_CHARS else run()

    def chat_prompt(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The chat template's text for ``messages`` (and ``tools``, for templates that render them)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
        try:
            extra = {"tools": tools} if tools else {}
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
            )
        except Exception as exc:  # the template itself rejects the conversation (roles, order)
            raise APIError(400, f"chat template rejected the messages: {exc}", param="messages") from exc

    def check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.vocab_size
        if vocab and ids and max(ids) >= vocab:
            raise APIError(
                400, f"{param}: token ids must be < vocabulary size {vocab}", param=param, code="invalid_value"
            )

    def resolve_max_tokens(
        self, requested: int | None, prompt_len: int, *, default: int | None, prompt_param: str = "prompt"
    ) -> int:
        """``max_tokens`` after limits; ``default=None`` means "the rest of the context".

        Errors name ``prompt_param`` (``messages`` for chat) when the prompt alone is too long.
        """
        limit = self.settings.max_tokens
        room = self.max_model_len - prompt_len
        if prompt_len >= self.max_model_len:
            raise APIError(
                400,
                f"{prompt_param} has {prompt_len} tokens; the context length is {self.max_model_len}",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if requested is None:
            return max(1, min(limit, room) if default is None else min(default, limit, room))
        if requested > limit:
            raise APIError(
                400,
                f"max_tokens={requested} exceeds this server's limit of {limit}",
                param="max_tokens",
                code="out_of_range",
            )
        if requested > room:
            raise APIError(
                400,
                f"prompt ({prompt_len} tokens) plus max_tokens ({requested}) exceeds the context length {self.max_model_len}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested

    # --- generation -----------------------------------------------------------------

    def new_engine_id(self, http_request: HTTPRequest) -> str:
        # A client-chosen X-Request-ID may repeat across requests; the engine needs a
        # unique key, so the client's ID becomes a prefix that still shows in engine logs.
        rid = getattr(http_request.state, "request_id", None)
        suffix = uuid.uuid4().hex
        if rid and getattr(http_request.state, "request_id_from_client", False):
            return f"{rid}-{suffix[:12]}"
        return rid or suffix

    async def open(
        self, http_request: HTTPRequest, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None,
        *, priority: int = 0,
    ) -> GenerationStream:
        """Submit a request and wait, watching for disconnect, until the engine has answered.

        Waiting for the first output before the response starts means refusals (queue
        full, prompt too long) still get their own HTTP status on streaming routes.
        """
        engine = self.require_engine()
        if priority and self.settings.scheduling_policy != "priority":
            raise APIError(400, "priority needs the server's --scheduling-policy priority", param="priority",
                           code="invalid_value")
        request = Request(
            request_id=self.new_engine_id(http_request),
            prompt_token_ids=prompt_ids,
            params=params,
            prompt=prompt,
            arrival_time=time.time(),
            priority=priority,
        )
        if self.settings.log_prompts:  # opt-in: prompts are the users' data
            shown = prompt if prompt is not None else prompt_ids
            log.info("request %s prompt %r (%d tokens) %s", request.request_id, shown, len(prompt_ids), params)
        gen = GenerationStream(self, engine, request)
        self.streams.add(gen)
        try:
            await watch_disconnect(http_request, gen.prime())
        except BaseException:
            await gen.close()
            raise
        return gen


async def watch_disconnect(http_request: HTTPRequest, coro: Awaitable[T]) -> T:
    """Await ``coro``; if the client disconnects first, cancel it and raise :class:`ClientGone`.

    Only for the time before a response starts: once a streaming response runs,
    Starlette listens for the disconnect itself and two listeners would race for it.
    ``coro`` runs in the calling task; one watcher task cancels that task if the client
    goes (cheaper than a task for each and ``asyncio.wait``, on every request).
    """
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def disconnected() -> None:
        nonlocal gone
        try:
            while (await http_request.receive())["type"] != "http.disconnect":
                pass
        except Exception:  # the server's receive failed: the client is as good as gone
            pass
        gone = True
        task.cancel()

    watcher = asyncio.ensure_future(disconnected())
    try:
        return await coro
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            raise ClientGone() from None
        raise
    finally:
        watcher.cancel()


class GenerationStream:
    """One engine request seen from HTTP: iterate outputs (or :meth:`batches` of them);
    always ``close()``.

    Metrics: TTFT is arrival → first token delta, ITL each later gap divided among the
    tokens it brought (tokens that arrive together, in one output or in one batch, share
    the gap since the previous arrival), e2e arrival → finish, all measured here so they
    include the server's own queueing and detokenisation.
    """

    def __init__(self, state: ServerState, engine: Any, request: Request) -> None:
        self.state = state
        self.engine = engine
        self.request = request
        self.request_id = request.request_id
        self._iter = bridge.stream_batches(engine, request).__aiter__()
        self._first: list[RequestOutput] | None = None
        self._start = time.perf_counter()
        self._last_token_at: float | None = None
        self.submitted = False
        self.failed = False
        self.finished = False
        self.closed = False
        self.output: RequestOutput | None = None
        self.ttft: float | None = None
        self.generated_tokens = 0  # over every choice of the request (n > 1 streams them interleaved)
        self.e2e: float | None = None

    def _check_queue(self) -> None:
        state = self.state
        stats = state.stats()
        if stats is not None and stats.waiting >= state.settings.max_waiting:
            state.metrics.rejected.labels(reason="queue_full").inc()
            raise APIError(
                429, "the request queue is full; retry later", code="queue_full", headers=state.retry_headers()
            )

    async def prime(self) -> None:
        # The queue check and the engine's submission (which runs synchronously inside
        # the first __anext__) share one event-loop step, so a burst of requests cannot
        # all pass the check before any of them is counted as waiting.
        self._check_queue()
        self.submitted = True
        self._first = await self._next_batch()

    async def _next_batch(self) -> list[RequestOutput]:
        try:
            outs = await self._iter.__anext__()
        except StopAsyncIteration:
            raise
        except Exception as exc:
            # The engine's stream raised, so it is over: nothing left to abort.
            self.failed = True
            raise self._http_error(exc) from exc
        if not outs:
            return outs
        now = time.perf_counter()
        m = self.state.metrics
        n = len(outs[0].delta_token_ids) if len(outs) == 1 else sum(len(o.delta_token_ids) for o in outs)
        self.generated_tokens += n
        if n:
            if self._last_token_at is None:
                self.ttft = now - self._start
                m.ttft.observe(self.ttft)
                if n > 1:
                    m.observe_tokens(0.0, n - 1)
            else:
                m.observe_tokens(now - self._last_token_at, n)
            self._last_token_at = now
        out = self.output = outs[-1]
        if out.finished:
            self.finished = True
            self.e2e = now - self._start
            m.e2e.observe(self.e2e)
            reason = out.finish_reason.value if out.finish_reason is not None else "stop"
            m.finished.labels(finish_reason=reason).inc()
            m.request_prompt_tokens.inc(len(out.prompt_token_ids))
            m.request_generation_tokens.inc(self.generated_tokens)
        return outs

    def _http_error(self, exc: Exception) -> APIError:
        """The HTTP answer to an engine exception (refusals before the first output,
        failures after it)."""
        m = self.state.metrics
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, QueueFullError):
            m.rejected.labels(reason="queue_full").inc()
            return APIError(
                429, str(exc) or "the request queue is full", code="queue_full", headers=self.state.retry_headers()
            )
        if isinstance(exc, PromptTooLongError):
            m.rejected.labels(reason="prompt_too_long").inc()
            return request_error(exc, code="context_length_exceeded")
        if isinstance(exc, ValueError):
            return request_error(exc)
        if bridge.is_engine_dead(exc):
            return APIError(503, str(exc), code="engine_unavailable", headers=self.state.retry_headers())
        log.error("engine request %s failed: %r", self.request_id, exc)
        return APIError(500, f"generation failed: {exc}", code="engine_error")

    async def batches(self) -> AsyncIterator[list[RequestOutput]]:
        """Every output that arrived since the previous batch, in order (one or more);
        the last output of the last batch is the finished one."""
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        while not self.finished:
            try:
                yield await self._next_batch()
            except StopAsyncIteration:
                return

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        async for batch in self.batches():
            for out in batch:
                yield out

    async def collect(self) -> RequestOutput:
        """Run to the end; the last output carries the totals."""
        async for _ in self:
            pass
        if self.output is None:
            raise APIError(500, "engine finished without output", code="internal_error")
        return self.output

    async def close(self) -> None:
        """Abort in the engine if unfinished (frees its KV blocks); idempotent."""
        if self.closed:
            return
        self.closed = True
        self.state.streams.discard(self)
        # Shielded: this runs in the finally of a stream Starlette has just cancelled, and
        # anyio would cancel every await inside it again before the abort could land.
        with anyio.CancelScope(shield=True):
            await self._close()

    async def _close(self) -> None:
        if self.failed and self.output is not None:
            self.state.metrics.finished.labels(finish_reason="error").inc()
        elif self.submitted and not self.finished and not self.failed:
            try:
                await bridge.abort(self.engine, self.request_id)
            except Exception:
                log.exception("abort of %s failed", self.request_id)
            self.state.metrics.finished.labels(finish_reason="abort").inc()
            log.info("aborted engine request %s", self.request_id)
        aclose = getattr(self._iter, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:
                log.exception("closing the engine stream of %s failed", self.request_id)

    def timings(self) -> dict[str, float | None]:
        tokens = len(self.output.token_ids) if self.output else 0
        decode = (self.e2e - self.ttft) if self.e2e is not None and self.ttft is not None else None
        return {
            "time_to_first_token_s": self.ttft,
            "e2e_s": self.e2e,
            "tokens_per_s": (tokens - 1) / decode if decode and tokens > 1 else None,
        }
