"""asyncio front of the engine: streams of outputs, aborts, stats, graceful shutdown.

The :class:`LLMEngine` runs in one background thread that owns it exclusively (the
model, the scheduler, the cache). The event loop only talks to it through a locked
inbox of "add" and "abort" commands and receives outputs through a locked outbox per
event loop: the engine thread appends a step's outputs to it and wakes the loop with one
``call_soon_threadsafe`` (none while a wake-up is still pending), and the loop fans them
out to the per-request streams. A model step therefore never blocks the event loop,
PyTorch releases the GIL while it computes, and the cost of handing outputs over does not
grow with the number of streams: when the loop falls behind, each wake-up carries
several steps and a stream's consumer gets them all at once (:meth:`AsyncEngine.stream_batches`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import torch

from .config import EngineConfig
from .llm_engine import LLMEngine, PromptLike
from .types import EngineStats, FinishReason, QueueFullError, Request, RequestOutput, SamplingParams

log = logging.getLogger("stream_attention.engine")


class _Stream:
    """One request's outputs on its event loop: a deque and at most one waiter (lighter
    than an ``asyncio.Queue``; only the loop's thread touches it)."""

    __slots__ = ("loop", "items", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: deque[RequestOutput | BaseException] = deque()
        self.waiter: asyncio.Future[None] | None = None

    def push(self, item: RequestOutput | BaseException) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        while not self.items:
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None


class EngineDeadError(RuntimeError):
    """The engine's background loop has stopped; no request can be served."""


class StepFailedError(RuntimeError):
    """A step failed in a way the engine survives (out of device memory): the requests of
    that step end with this error and the engine keeps serving the others."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the device running out of memory (CUDA's, or the same type
    raised on CPU by a test)."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom)


class StreamFrontend:
    """The event-loop side shared by every engine client: per-request streams, batched
    hand-over of outputs from a driver thread, aborts, drain and shutdown.

    A subclass drives an engine (in a thread of this process, or in another process) and
    calls :meth:`_deliver_all` from its driver thread with each step's outputs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        # Outputs not yet handed to their loop; a loop is a key only while its wake-up is pending.
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput | BaseException]]] = {}
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._dead: BaseException | None = None

    # Subclasses: the facts (config, tokenizer, ...), make_request/_prepare, _submit, abort,
    # stats, _ensure_started and _stop_worker.

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def failure(self) -> BaseException | None:
        """Why the engine stopped serving, once it has (None while it runs or after a clean stop)."""
        return self._dead

    def memory_report(self) -> dict[str, Any] | None:
        """The device and host memory of the process that holds the model, when it is not
        this one (None: read this process's own)."""
        return None

    async def start(self) -> None:
        """Start the background driver (idempotent)."""
        self._ensure_started()

    async def shutdown(self, *, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop accepting requests; with ``drain`` let running ones finish (up to
        ``timeout`` seconds), then abort whatever is left and stop the driver."""
        self._accepting = False
        if self._thread is not None:
            await self._finish_streams(drain, timeout)
        await self._stop_worker()
        if self._dead is None:
            self._dead = EngineDeadError("the engine was shut down")

    async def _finish_streams(self, drain: bool, timeout: float | None) -> None:
        """Let open streams finish (with ``drain``, up to ``timeout`` s), then abort the rest."""
        if drain:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._streams and (deadline is None or time.monotonic() < deadline):
                await asyncio.sleep(0.01)
        for rid in list(self._streams):
            self.abort(rid)
        # Let the driver deliver the abort outputs before it stops.
        for _ in range(200):
            if not self._streams or not self.is_running:
                break
            await asyncio.sleep(0.005)

    close = shutdown

    async def stream(self, request: Request | PromptLike, params: SamplingParams | None = None) -> AsyncIterator[
            RequestOutput]:
        """Yield a :class:`RequestOutput` per new token (with ``delta_token_ids`` and
        ``delta_text``) until one with ``finished=True``. Leaving the loop early (break,
        cancellation, client disconnect) aborts the request and frees its blocks.
        Raises :class:`QueueFullError`, :class:`PromptTooLongError` or ``ValueError``
        before the first output."""
        batches = self.stream_batches(request, params)
        try:
            async for batch in batches:
                for out in batch:
                    yield out
        finally:
            await batches.aclose()

    async def stream_batches(self, request: Request | PromptLike, params: SamplingParams | None = None
                             ) -> AsyncIterator[list[RequestOutput]]:
        """Like :meth:`stream`, but each item is every output that has arrived since the
        previous one (usually one; several when the consumer is behind the engine), in
        order, the last of the last batch ``finished``. Lets a consumer handle a burst in
        one go (e.g. one socket write for several SSE events)."""
        req = self._prepare(request, params)
        stream = self._submit(req)
        items = stream.items
        finished = False
        try:
            while True:
                if not items:
                    await stream.wait()
                batch: list[RequestOutput] = []
                while items:
                    item = items.popleft()
                    if isinstance(item, BaseException):
                        if not batch:
                            finished = True  # the engine ended this request itself
                            raise item
                        items.appendleft(item)  # raised on the next call, after this batch
                        break
                    batch.append(item)
                    if item.finished:
                        finished = True
                        break
                yield batch
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

    def _new_stream(self, req: Request, waiting: int, max_waiting: int) -> _Stream:
        """Register ``req``'s stream (under the lock) unless refused; raises before any output."""
        if not self._accepting:
            raise EngineDeadError("engine is shutting down")
        if self._dead is not None:
            raise EngineDeadError(f"engine stopped: {self._dead!r}")
        if req.request_id in self._streams:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        if waiting >= max_waiting:
            raise QueueFullError(f"waiting queue is full ({max_waiting} requests)")
        stream = _Stream(asyncio.get_running_loop())
        self._streams[req.request_id] = stream
        return stream

    def _fail_every_stream(self, exc: BaseException) -> None:
        """End every open stream with ``exc`` (the engine can serve none of them)."""
        with self._lock:
            rids = list(self._streams)
        self._deliver_all([(rid, exc, True) for rid in rids])

    # ------------------------------------------------------------------ loop
    def _deliver(self, out: RequestOutput | BaseException, request_id: str, final: bool) -> None:
        self._deliver_all([(request_id, out, final)])

    def _deliver_all(self, items: list[tuple[str, RequestOutput | BaseException, bool]]) -> None:
        """Hand outputs to their streams' loops: one wake-up per loop, and none for a loop
        whose previous wake-up has not run yet (it will pick these up too)."""
        wake: list[asyncio.AbstractEventLoop] = []
        with self._lock:
            streams, outbox = self._streams, self._outbox
            for request_id, out, final in items:
                stream = streams.get(request_id)
                if stream is None:
                    continue
                if final:
                    del streams[request_id]
                box = outbox.get(stream.loop)
                if box is None:
                    box = outbox[stream.loop] = []
                    wake.append(stream.loop)
                box.append((stream, out))
        for loop in wake:
            try:
                loop.call_soon_threadsafe(self._flush, loop)
            except RuntimeError:  # a closed consumer loop: nobody is listening any more
                with self._lock:
                    self._outbox.pop(loop, None)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """On ``loop``: move its pending outputs into their streams, in arrival order."""
        with self._lock:
            box = self._outbox.pop(loop, None)
        if box:
            for stream, out in box:
                stream.push(out)

    @staticmethod
    def _aborted_output(request_id: str) -> RequestOutput:
        return RequestOutput(request_id=request_id, prompt_token_ids=[], token_ids=[], text="", delta_token_ids=[],
                             delta_text="", finished=True, finish_reason=FinishReason.ABORT)


class AsyncEngine(StreamFrontend):
    """Serve many concurrent streams from one :class:`LLMEngine` stepping in a thread of
    this process.

    Construct it like ``LLMEngine`` (``AsyncEngine(model, tokenizer, config=..., **overrides)``,
    or ``AsyncEngine(EngineConfig(...))``), or wrap an existing engine with ``engine=``.
    The background thread starts on :meth:`start` or on the first request.

    A step that runs out of device memory fails the requests of that step
    (:class:`StepFailedError`) and the engine serves on; any other exception inside a step
    leaves the engine's state unknown, so every open stream ends with
    :class:`EngineDeadError` and the loop stops (:class:`~.supervisor.SupervisedEngine`
    restarts it).
    """

    def __init__(self, model: Any = None, tokenizer: Any = None, *, config: EngineConfig | None = None,
                 engine: LLMEngine | None = None, **overrides: Any) -> None:
        super().__init__()
        self.engine = engine or LLMEngine(model, tokenizer, config=config, **overrides)
        self._inbox: deque[tuple[str, Any]] = deque()
        self._pending_adds = 0
        self._wake = threading.Event()
        self._stop = False

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

    # ------------------------------------------------------------------ lifecycle
    def _ensure_started(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine loop stopped: {self._dead!r}")
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="stream-attention-engine", daemon=True)
            self._thread.start()

    async def _stop_worker(self) -> None:
        """Stop the background loop (after the streams were drained or aborted)."""
        self._stop = True
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join, 10.0)

    # ------------------------------------------------------------------ requests
    def make_request(self, prompt: PromptLike, params: SamplingParams | None = None,
                     request_id: str | None = None) -> Request:
        """Tokenize and validate (raises ``ValueError`` / ``PromptTooLongError``)."""
        return self.engine.make_request(prompt, params, request_id)

    def _prepare(self, request: Request | PromptLike, params: SamplingParams | None) -> Request:
        req = request if isinstance(request, Request) else self.make_request(request, params)
        if isinstance(request, Request):
            self.engine.validate(req)
        return req

    def _submit(self, req: Request) -> _Stream:
        self._ensure_started()
        with self._lock:
            waiting = len(self.engine.scheduler.waiting) + self._pending_adds
            stream = self._new_stream(req, waiting, self.engine.config.max_waiting)
            self._pending_adds += 1
            self._inbox.append(("add", req))
        self._wake.set()
        return stream

    def compile_grammar(self, spec: Any) -> Any:
        """Compile a :class:`~.types.StructuredOutputsParams` (blocking, thread-safe, cached):
        call it from a worker thread before submitting, so the engine's loop never compiles."""
        return self.engine.compile_grammar(spec)

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

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop:
                self._drain_inbox()
                if not engine.has_unfinished_requests():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                outputs, failed, why = run_step(engine)
                if failed:
                    err = StepFailedError(why)
                    self._deliver_all([(rid, err, True) for rid in failed])
                if outputs:
                    self._deliver_all([(out.request_id, out, out.finished) for out in outputs])
        except BaseException as exc:
            log.exception("engine loop died")
            # Without its traceback the exception no longer holds the engine's frames (and
            # their device memory) alive after the client is dropped.
            self._dead = exc.with_traceback(None)
            self._fail_every_stream(EngineDeadError(f"engine loop died: {exc!r}"))


def run_step(engine: LLMEngine) -> tuple[list[RequestOutput], list[str], str]:
    """One engine step under the engine clients' failure policy.

    Returns ``(outputs, failed_ids, why)``. A step that runs out of device memory ends the
    requests it had scheduled (``failed_ids``, for their streams to end with
    :class:`StepFailedError` and ``why``); waiting requests keep their place and the
    engine serves on. Any other exception ends every request and propagates: the engine's
    state is unknown, so the caller stops and a supervisor builds a fresh engine.
    """
    try:
        return engine.step(), [], ""
    except Exception as exc:
        oom = is_out_of_memory(exc)
        failed = engine.fail_all(waiting_too=not oom)
        if not oom:
            raise
        log.warning("engine step ran out of device memory; failing its %d requests", len(failed))
        if engine.device.type == "cuda":
            torch.cuda.empty_cache()
        return [], failed, f"the engine ran out of device memory: {exc}"
