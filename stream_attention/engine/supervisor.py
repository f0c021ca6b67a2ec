"""Keep an engine client serving: restart it, with backoff, when it dies.

An engine client dies when its process is killed or a step raises something other than
running out of memory (:func:`~.async_engine.run_step`). The client itself ends every open
stream with :class:`~.async_engine.EngineDeadError` at once, so no caller waits on a dead
engine; this wrapper then builds a fresh client (a new process, or a new engine in this
process) after a backoff that doubles with each restart in quick succession. While it
restarts, ``is_running`` is False (readiness fails) but ``failure`` stays None (the service
is alive and recovering). After ``max_restarts`` restarts within ``window_s`` it gives
up: ``failure`` is set and ``on_give_up`` is called, so that the server can exit non-zero
and let an orchestrator restart the whole container.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from .async_engine import EngineDeadError
from .client import EngineClient
from .types import EngineStats, Request, RequestOutput, SamplingParams

log = logging.getLogger("stream_attention.engine")


class SupervisedEngine:
    """An :class:`~.client.EngineClient` that rebuilds the client it wraps when it dies.

    Args:
        factory: builds and returns a loaded (not yet started) client; blocking, it is
            called in a worker thread for restarts. The first client is passed in built.
        client: the first client (``factory()`` if None).
        max_restarts: restarts allowed within ``window_s`` before giving up.
        backoff_s / max_backoff_s: the wait before a restart, doubled for each restart
            already made in the window, capped.
        on_give_up: called once with the last failure when the supervisor gives up.
        poll_s: how often the client's liveness is checked.
    """

    def __init__(self, factory: Callable[[], EngineClient], client: EngineClient | None = None, *,
                 max_restarts: int = 5, window_s: float = 600.0, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0, on_give_up: Callable[[BaseException], None] | None = None,
                 poll_s: float = 0.05) -> None:
        if max_restarts < 0 or window_s <= 0 or backoff_s < 0 or max_backoff_s < backoff_s or poll_s <= 0:
            raise ValueError(
                f"max_restarts={max_restarts}, window_s={window_s}, backoff_s={backoff_s}, "
                f"max_backoff_s={max_backoff_s}, poll_s={poll_s}: out of range"
            )
        self._factory = factory
        self._client = client if client is not None else factory()
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.on_give_up = on_give_up
        self.poll_s = poll_s
        self.restarts = 0
        self._recent: deque[float] = deque()
        self._restarting = False
        self._stopping = False
        self._failure: BaseException | None = None
        self._watcher: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ facts (of the current client)
    @property
    def client(self) -> EngineClient:
        """The client serving now (replaced on each restart)."""
        return self._client

    @property
    def config(self) -> Any:
        return self._client.config

    @property
    def tokenizer(self) -> Any:
        return self._client.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._client.max_model_len

    @property
    def model_name(self) -> str:
        return self._client.model_name

    @property
    def device(self) -> Any:
        return self._client.device

    @property
    def is_running(self) -> bool:
        return not self._restarting and self._failure is None and self._client.is_running

    @property
    def restarting(self) -> bool:
        return self._restarting

    @property
    def failure(self) -> BaseException | None:
        """Set once the supervisor has given up; None while serving or restarting."""
        return self._failure

    # ------------------------------------------------------------------ requests
    def make_request(self, prompt: Any, params: SamplingParams | None = None,
                     request_id: str | None = None) -> Request:
        return self._client.make_request(prompt, params, request_id)

    def _serving(self) -> EngineClient:
        if self._failure is not None:
            raise EngineDeadError(f"engine stopped for good: {self._failure!r}")
        if self._restarting or (not self._client.is_running and self._client.failure is not None):
            raise EngineDeadError("the engine is restarting; retry shortly")
        return self._client

    async def stream_batches(self, request: Any, params: SamplingParams | None = None) -> AsyncIterator[
            list[RequestOutput]]:
        inner = self._serving().stream_batches(request, params)
        try:
            async for batch in inner:
                yield batch
        finally:
            await inner.aclose()

    async def stream(self, request: Any, params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        async for batch in self.stream_batches(request, params):
            for out in batch:
                yield out

    async def generate(self, request: Any, params: SamplingParams | None = None) -> RequestOutput:
        return await self._serving().generate(request, params)

    def abort(self, request_id: str) -> None:
        self._client.abort(request_id)

    def compile_grammar(self, spec: Any) -> Any:
        return self._client.compile_grammar(spec)

    def stats(self) -> EngineStats:
        return replace(self._client.stats(), engine_restarts_total=self.restarts)

    def memory_report(self) -> dict[str, Any] | None:
        return self._client.memory_report()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self._client.start()
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="stream-attention-engine-supervisor")

    async def shutdown(self, *, drain: bool = True, timeout: float | None = 30.0) -> None:
        self._stopping = True
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await self._client.shutdown(drain=drain, timeout=timeout)

    close = shutdown

    async def _watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.poll_s)
            client = self._client
            if client.is_running or self._stopping:
                continue
            why = client.failure or EngineDeadError("engine stopped")
            if not await self._restart(why):
                return

    def _next_backoff(self) -> float | None:
        """Seconds to wait before the next restart, or None when the budget is spent."""
        now = time.monotonic()
        while self._recent and now - self._recent[0] > self.window_s:
            self._recent.popleft()
        if len(self._recent) >= self.max_restarts:
            return None
        return min(self.max_backoff_s, self.backoff_s * (2 ** len(self._recent)))

    async def _restart(self, why: BaseException) -> bool:
        """Replace the dead client; False once the supervisor gave up."""
        self._restarting = True
        try:
            old = self._client
            with contextlib.suppress(Exception):
                await old.shutdown(drain=False, timeout=0)
            del old
            gc.collect()  # the dead engine's device memory must be free before the new one sizes its cache
            while True:
                wait = self._next_backoff()
                if wait is None:
                    self._give_up(why)
                    return False
                log.error("engine died (%r); restart %d in %.1f s", why, self.restarts + 1, wait)
                await asyncio.sleep(wait)
                if self._stopping:
                    return False
                self._recent.append(time.monotonic())
                self.restarts += 1
                try:
                    client = await asyncio.to_thread(self._factory)
                    await client.start()
                except Exception as exc:  # noqa: BLE001 - a failed rebuild counts as a restart
                    log.exception("engine restart failed")
                    why = exc
                    continue
                self._client = client
                log.warning("engine restarted (%d restarts so far)", self.restarts)
                return True
        finally:
            self._restarting = False

    def _give_up(self, why: BaseException) -> None:
        self._failure = why
        log.critical("engine died %d times within %.0f s; giving up: %r", self.max_restarts, self.window_s, why)
        if self.on_give_up is not None:
            self.on_give_up(why)
