"""asyncio front of the engine: streams of outputs, aborts, stats, graceful shutdown.

The :class:`LLMEngine` runs in one background thread that owns it exclusively (the
model, the scheduler, the cache). The event loop only talks to it through a locked
inbox of "add" and "abort" commands and receives outputs through per-request
``asyncio.Queue`` objects filled with ``call_soon_threadsafe``. A model step therefore
never blocks the event loop, and PyTorch releases the GIL while it computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .config import EngineConfig
from .llm_engine import LLMEngine, PromptLike
from .types import EngineStats, FinishReason, QueueFullError, Request, RequestOutput, SamplingParams

log = logging.getLogger("stream_attention.engine")


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class EngineDeadError(RuntimeError):
    """The engine's background loop has stopped; no request can be served."""


class AsyncEngine:
    """Serve many concurrent streams from one :class:`LLMEngine`.

    Construct it like ``LLMEngine`` (``AsyncEngine(model, tokenizer, config=..., **overrides)``,
    or ``AsyncEngine(EngineConfig(...))``), or wrap an existing engine with ``engine=``.
    The background thread starts on :meth:`start` or on the first request.
    """

    def __init__(self, model: Any = None, tokenizer: Any = None, *, config: EngineConfig | None = None,
                 engine: LLMEngine | None = None, **overrides: Any) -> None:
        self.engine = engine or LLMEngine(model, tokenizer, config=config, **overrides)
        self._lock = threading.Lock()
        self._inbox: deque[tuple[str, Any]] = deque()
        self._pending_adds = 0
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        self._accepting = True
        self._dead: BaseException | None = None

    # ------------------------------------------------------------------ facts
    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def device(self) -> Any:
        return self.engine.device

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the background loop (idempotent)."""
        self._ensure_started()

    def _ensure_started(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine loop stopped: {self._dead!r}")
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="stream-attention-engine", daemon=True)
            self._thread.start()

    async def shutdown(self, *, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop accepting requests; with ``drain`` let running ones finish (up to
        ``timeout`` seconds), then abort whatever is left and stop the loop."""
        self._accepting = False
        if self._thread is None:
            return
        if drain:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._streams and (deadline is None or time.monotonic() < deadline):
                await asyncio.sleep(0.01)
        for rid in list(self._streams):
            self.abort(rid)
        # Let the loop deliver the abort outputs before it stops.
        for _ in range(200):
            if not self._streams:
                break
            await asyncio.sleep(0.005)
        self._stop = True
        self._wake.set()
        thread, self._thread = self._thread, None
        await asyncio.to_thread(thread.join, 10.0)

    close = shutdown

    # ------------------------------------------------------------------ requests
    def make_request(self, prompt: PromptLike, params: SamplingParams | None = None,
                     request_id: str | None = None) -> Request:
        """Tokenize and validate (raises ``ValueError`` / ``PromptTooLongError``)."""
        return self.engine.make_request(prompt, params, request_id)

    def _submit(self, req: Request) -> _Stream:
        if not self._accepting:
            raise EngineDeadError("engine is shutting down")
        self._ensure_started()
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if req.request_id in self._streams:
                raise ValueError(f"request_id {req.request_id!r} is already in use")
            waiting = len(self.engine.scheduler.waiting) + self._pending_adds
            if waiting >= self.engine.config.max_waiting:
                raise QueueFullError(f"waiting queue is full ({self.engine.config.max_waiting} requests)")
            self._streams[req.request_id] = stream
            self._pending_adds += 1
            self._inbox.append(("add", req))
        self._wake.set()
        return stream

    async def stream(self, request: Request | PromptLike, params: SamplingParams | None = None) -> AsyncIterator[
            RequestOutput]:
        """Yield a :class:`RequestOutput` per new token (with ``delta_token_ids`` and
        ``delta_text``) until one with ``finished=True``. Leaving the loop early (break,
        cancellation, client disconnect) aborts the request and frees its blocks.
        Raises :class:`QueueFullError`, :class:`PromptTooLongError` or ``ValueError``
        before the first output."""
        req = request if isinstance(request, Request) else self.make_request(request, params)
        if isinstance(request, Request):
            self.engine.validate(req)
        stream = self._submit(req)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(req.request_id)

    async def generate(self, request: Request | PromptLike, params: SamplingParams | None = None) -> RequestOutput:
        """Run a request to completion and return its final output."""
        last = None
        async for out in self.stream(request, params):
            last = out
        assert last is not None
        return last

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; a no-op if it already finished."""
        with self._lock:
            self._inbox.append(("abort", request_id))
        self._wake.set()

    def stats(self) -> EngineStats:
        s = self.engine.stats()
        s.waiting += self._pending_adds
        return s

    # ------------------------------------------------------------------ loop
    def _deliver(self, out: RequestOutput | BaseException, request_id: str, final: bool) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is not None and final:
                del self._streams[request_id]
        if stream is None:
            return
        # A closed consumer loop raises RuntimeError: nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    def _drain_inbox(self) -> None:
        while True:
            with self._lock:
                if not self._inbox:
                    return
                kind, arg = self._inbox.popleft()
                if kind == "add":
                    self._pending_adds -= 1
            if kind == "add":
                try:
                    self.engine.add_request(arg, stream=True, bounded=False)
                except Exception as exc:  # validated already; a race (duplicate id) lands here
                    self._deliver(exc, arg.request_id, final=True)
            elif not self.engine.abort(arg):
                # Not in the engine (already finished, or never admitted): close the stream.
                with self._lock:
                    stream = self._streams.get(arg)
                if stream is not None:
                    self._deliver(self._aborted_output(arg), arg, final=True)

    @staticmethod
    def _aborted_output(request_id: str) -> RequestOutput:
        return RequestOutput(request_id=request_id, prompt_token_ids=[], token_ids=[], text="", delta_token_ids=[],
                             delta_text="", finished=True, finish_reason=FinishReason.ABORT)

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop:
                self._drain_inbox()
                if not engine.has_unfinished_requests():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                try:
                    outputs = engine.step()
                except Exception as exc:
                    log.exception("engine step failed; aborting the requests in flight")
                    abort_all = getattr(engine, "abort_all", None)
                    if callable(abort_all):
                        failed = list(abort_all())
                    else:
                        failed = list(engine._seqs)
                        for rid in failed:
                            engine.abort(rid)
                    engine._pending.clear()
                    for rid in failed:
                        self._deliver(RuntimeError(f"engine step failed: {exc!r}"), rid, final=True)
                    continue
                for out in outputs:
                    self._deliver(out, out.request_id, final=out.finished)
        except BaseException as exc:  # pragma: no cover - a bug in the loop itself
            self._dead = exc
            log.exception("engine loop died")
            with self._lock:
                rids = list(self._streams)
            for rid in rids:
                self._deliver(EngineDeadError(f"engine loop died: {exc!r}"), rid, final=True)
