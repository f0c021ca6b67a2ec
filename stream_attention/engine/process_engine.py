"""The engine in a process of its own: :class:`EngineProcess`, the engine client the server uses on CUDA.

In one process the engine thread's Python (scheduling, input staging, sampling,
detokenization) and the event loop's Python (HTTP, SSE, JSON) share one GIL, so every
microsecond the server spends per streamed token is taken from the engine: at 64 streams
that is what makes HTTP slower than driving the engine directly. Here the
:class:`LLMEngine` steps in a child process (spawned: CUDA is initialised there only)
and the server process keeps the event loop and a receiver thread:

- parent → child: ``("add", Request)``, ``("abort", id)``, ``("stop",)`` over a pipe;
- child → parent: per step, the outputs as small tuples (new token ids and text, and the
  full text and ids only once, when a request finishes) plus the engine's counters.

:class:`EngineProcess` shares :class:`~.async_engine.StreamFrontend` with
:class:`~.async_engine.AsyncEngine` (same streams, batching, aborts, drain and shutdown,
same step-failure policy); only where the engine lives differs.
"""

from __future__ import annotations

import contextlib
import logging
import marshal
import multiprocessing
import os
import pickle
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import fields, replace
from functools import partial
from typing import Any

from .async_engine import EngineDeadError, StepFailedError, StreamFrontend, _Stream, run_step
from .types import (
    EngineStats,
    FinishReason,
    ListView,
        Request,
    RequestOutput,
    SamplingParams,
)

log = logging.getLogger("stream_attention.engine")

# Counters at most this often while stepping (and whenever the engine goes idle).
_STATS_EVERY_S = 0.01
_MEMORY_EVERY_S = 1.0


def build_from_config(config: Any) -> Any:
    """The child's engine for ``config`` (an ``EngineConfig``): what the in-process path builds."""
    from .llm_engine import LLMEngine

    return LLMEngine(config=config)


def _send(conn: Any, msg: tuple[Any, ...]) -> None:
    """``marshal`` when the message is plain data (the per-step outputs: ~3x cheaper than
    pickle, on the engine's side), pickle otherwise (exceptions, the tokenizer, logprobs)."""
    try:
        conn.send_bytes(b"M" + marshal.dumps(msg))
    except ValueError:
        conn.send_bytes(b"P" + pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn: Any) -> tuple[Any, ...]:
    data = conn.recv_bytes()
    return marshal.loads(data[1:]) if data[:1] == b"M" else pickle.loads(data[1:])


def _stats_tuple(stats: EngineStats) -> tuple[Any, ...]:
    return tuple(getattr(stats, f.name) for f in fields(stats))


def _wire(out: RequestOutput) -> tuple[Any, ...]:
    """An output as the parent needs it: deltas, the prompt's scores once per choice (on
    its first output: the parent keeps them), and totals only when it is the last."""
    lps = out.logprobs
    new_lps = None
    n = len(out.delta_token_ids)
    if lps:
        new_lps = lps[len(lps) - n :] if n else []
    first = len(out.token_ids) == n  # nothing of this choice was sent before
    prompt_lps = out.prompt_logprobs if first else None
    reason = out.finish_reason.value if out.finish_reason is not None else None
    head = (out.request_id, out.index, out.delta_token_ids, out.delta_text, out.finished, reason, new_lps,
            out.time_to_first_token, prompt_lps)  # fmt: skip
    if out.finished:
        return (*head, out.latency, out.text, out.token_ids)
    return head


# A choice's token ids, logprobs and text so far, and its prompt's scores (prompt_logprobs).
_ChoiceProgress = tuple[list[int], list[Any] | None, list[str], list[Any] | None]


def _memory_report() -> dict[str, Any]:
    """The engine process's memory: CUDA allocator rows per device and its host RSS (the
    server process cannot read another process's allocator)."""
    from ..utils.memory import cuda_memory, host_memory

    rows = [{**row, "device": f"cuda:{row['index']}"} for row in cuda_memory()]
    return {"cuda": rows, "rss_bytes": int(host_memory().get("rss_bytes") or 0)}


def _child_main(conn: Any, build: Callable[[], Any], log_level: int) -> None:
    """The engine process: build the engine, then step it and answer commands until told
    to stop or the parent goes away (its end of the pipe closes)."""
    # Ctrl-C reaches the whole process group: the server drains, then stops this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine] %(message)s")
    try:
        engine = build()
        _send(conn, ("ready", {
            "tokenizer": engine.tokenizer,
            "config": engine.config,
            "max_model_len": engine.max_model_len,
            "model_name": engine.model_name,
            "device": str(engine.device),
            "stats": engine.stats(),
        }))  # fmt: skip
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        with contextlib.suppress(Exception):
            _send(conn, ("failed", f"{type(exc).__name__}: {exc}"))
        return
    added = 0
    stats_at = 0.0
    memory_at = 0.0
    idle_stats: EngineStats | None = None
    # One poll object for the pipe (Connection.poll builds a selector per call, every step).
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    try:
        while True:
            busy = engine.has_unfinished_requests()
            stop = False
            if poller.poll(0 if busy else 50):  # readable, or the server's end closed (recv says which)
                while True:
                    msg = _recv(conn)
                    kind = msg[0]
                    if kind == "add":
                        added += 1
                        req = msg[1]
                        try:
                            engine.add_request(req, stream=True, bounded=False)
                        except Exception as exc:  # refused: the stream raises it before any output
                            _send(conn, ("error", req.request_id, exc))
                    elif kind == "abort":
                        if not engine.abort(msg[1]):
                            _send(conn, ("gone", msg[1]))  # not (or no longer) in the engine
                    elif kind == "stop":
                        stop = True
                        break
                    if not poller.poll(0):
                        break
            if stop:
                break
            if time.monotonic() - memory_at >= _MEMORY_EVERY_S:
                memory_at = time.monotonic()
                _send(conn, ("memory", _memory_report()))
            if not engine.has_unfinished_requests():
                stats = engine.stats()
                if stats != idle_stats:  # idle: say so once (waiting/running/KV figures settle)
                    idle_stats = stats
                    _send(conn, ("stats", _stats_tuple(stats), added))
                continue
            idle_stats = None
            outputs, failed, why = run_step(engine)
            if failed:
                _send(conn, ("failed_step", failed, why))
            now = time.monotonic()
            stats = None
            if now - stats_at >= _STATS_EVERY_S:
                stats_at = now
                stats = _stats_tuple(engine.stats())
            if outputs or stats is not None:
                _send(conn, ("out", [_wire(o) for o in outputs], stats, added))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the server went away
    except BaseException as exc:  # noqa: BLE001
        log.exception("engine process loop died")
        with contextlib.suppress(Exception):
            _send(conn, ("dead", f"{type(exc).__name__}: {exc}"))


class EngineProcess(StreamFrontend):
    """An engine client whose :class:`~.llm_engine.LLMEngine` runs in a child process.

    ``build`` is a picklable callable returning the engine (default: ``LLMEngine(config=config)``);
    construction blocks until the child has loaded the model (call it from a worker
    thread) and raises ``RuntimeError`` if that failed.
    """

    def __init__(self, config: Any = None, *, build: Callable[[], Any] | None = None,
                 start_timeout: float = 1800.0, cpus: set[int] | None = None) -> None:
        super().__init__()
        self._grammars: Any = None
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        self._conn = parent
        self._send_lock = threading.Lock()
        build = build or partial(build_from_config, config)
        level = logging.getLogger("stream_attention").getEffectiveLevel()
        self._proc = ctx.Process(target=_child_main, args=(child, build, level), name="stream-attention-engine",
                                 daemon=True)  # fmt: skip
        self._proc.start()
        if cpus:  # before it starts any thread of its own
            os.sched_setaffinity(self._proc.pid, cpus)
        child.close()
        if not parent.poll(start_timeout):
            self._proc.kill()
            raise RuntimeError(f"engine process did not start within {start_timeout:g} s")
        try:
            kind, info = _recv(parent)
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"engine process exited while loading (exit code {self._proc.exitcode})") from None
        if kind != "ready":
            self._proc.join(5)
            raise RuntimeError(f"engine process failed to load: {info}")
        self._info = info
        self._stats: EngineStats = info["stats"]
        self._memory: dict[str, Any] | None = None
        self._sent_adds = 0
        self._acked_adds = 0
        # Per request: its prompt ids, and per choice index the token ids, logprobs and text
        # so far and the prompt's scores (outputs cross the pipe as deltas; totals only on the last).
        self._progress: dict[str, tuple[list[int], bool, dict[int, _ChoiceProgress]]] = {}

    @property
    def pid(self) -> int | None:
        """The engine process's id."""
        return self._proc.pid

    # ------------------------------------------------------------------ facts
    @property
    def config(self) -> Any:
        return self._info["config"]

    @property
    def tokenizer(self) -> Any:
        return self._info["tokenizer"]

    @property
    def max_model_len(self) -> int:
        return self._info["max_model_len"]

    @property
    def model_name(self) -> str:
        return self._info["model_name"]

    @property
    def device(self) -> str:
        return self._info["device"]

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._proc.is_alive()

    def memory_report(self) -> dict[str, Any] | None:
        """The engine process's latest memory report (``{"cuda": rows, "rss_bytes": n}``,
        refreshed every second), or None before the first one."""
        return self._memory

    def stats(self) -> EngineStats:
        return replace(self._stats, waiting=self._stats.waiting + max(0, self._sent_adds - self._acked_adds))

    # ------------------------------------------------------------------ requests
    def make_request(self, prompt: Any, params: SamplingParams | None = None,
                     request_id: str | None = None) -> Request:
        if isinstance(prompt, Request):
            return prompt
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        return Request(request_id or f"req-{time.monotonic_ns()}", ids, params or SamplingParams(),
                       prompt if isinstance(prompt, str) else None, time.time())  # fmt: skip

    def _prepare(self, request: Any, params: SamplingParams | None) -> Request:
        req = self.make_request(request, params)
        req.params.validate()  # the rest (lengths, ids, KV capacity) in the child: refused before any output
        return req

    def _send(self, msg: tuple[Any, ...]) -> None:
        with self._send_lock:
            _send(self._conn, msg)

    def _submit(self, req: Request) -> _Stream:
        self._ensure_started()
        with self._lock:
            stream = self._new_stream(req, self.stats().waiting, self.config.max_waiting)
            self._progress[req.request_id] = (req.prompt_token_ids, req.params.logprobs is not None, {})
            self._sent_adds += 1
        try:
            self._send(("add", req))
        except (OSError, ValueError) as exc:
            with self._lock:
                self._streams.pop(req.request_id, None)
                self._progress.pop(req.request_id, None)
            raise EngineDeadError(f"engine process unreachable: {exc}") from exc
        return stream

    def compile_grammar(self, spec: Any) -> Any:
        """Check and time ``spec`` here with a compiler for the tokenizer; the engine process
        compiles its own copy when the request arrives."""
        if self._grammars is None:
            from .structured_output import GrammarCompiler

            self._grammars = GrammarCompiler(self.tokenizer, len(self.tokenizer))
        return self._grammars.compile(spec)

    def abort(self, request_id: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # the process is gone: nothing to abort
            self._send(("abort", request_id))

    # ------------------------------------------------------------------ lifecycle
    def _ensure_started(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine process stopped: {self._dead!r}")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="stream-attention-engine-rx", daemon=True)
            self._thread.start()

    async def _stop_worker(self) -> None:
        import asyncio

        with contextlib.suppress(OSError, ValueError):
            self._send(("stop",))
        await asyncio.to_thread(self._proc.join, 30.0)
        if self._proc.is_alive():
            self._proc.kill()
        self._conn.close()  # ends the receiver
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join, 10.0)

    # ------------------------------------------------------------------ receiver
    def _output(self, wire: tuple[Any, ...]) -> RequestOutput | None:
        rid, index, delta_ids, delta_text, finished, reason, new_lps, ttft, prompt_lps = wire[:9]
        with self._lock:
            progress = self._progress.pop(rid, None) if finished else self._progress.get(rid)
        if progress is None:
            return None
        prompt_ids, want_lps, choices = progress
        choice = choices.get(index)
        if choice is None:
            # Every output of the choice carries the prompt's scores, as in-process.
            choice = choices[index] = ([], [] if want_lps else None, [""], prompt_lps)
        ids, lps, text_parts, prompt_lps = choice
        ids.extend(delta_ids)
        if lps is not None and new_lps:
            lps.extend(new_lps)
        if finished:
            latency, text, token_ids = wire[9], wire[10], list(wire[11])
        else:  # a view of the totals (they only grow): no copy per streamed token
            text_parts[0] += delta_text
            text, token_ids, latency = text_parts[0], ListView(ids, 0, len(ids)), None
        return RequestOutput(
            request_id=rid, prompt_token_ids=prompt_ids, token_ids=token_ids,
            text=text if text is not None else "", delta_token_ids=list(delta_ids), delta_text=delta_text,
            finished=finished, finish_reason=FinishReason(reason) if reason is not None else None,
            logprobs=ListView(lps, 0, len(lps)) if lps is not None else None, time_to_first_token=ttft,
            latency=latency, index=index, prompt_logprobs=prompt_lps,
        )  # fmt: skip

    def _fail(self, rids: list[str], exc: BaseException) -> None:
        with self._lock:
            for rid in rids:
                self._progress.pop(rid, None)
        self._deliver_all([(rid, exc, True) for rid in rids])

    def _run(self) -> None:
        conn = self._conn
        try:
            while True:
                msg = _recv(conn)
                kind = msg[0]
                if kind == "out":
                    _, wires, stats, added = msg
                    if stats is not None:
                        self._stats = EngineStats(*stats)
                    self._acked_adds = added
                    items = []
                    for wire in wires:
                        out = self._output(wire)
                        if out is not None:
                            items.append((out.request_id, out, out.finished))
                    if items:
                        self._deliver_all(items)
                elif kind == "stats":
                    self._stats, self._acked_adds = EngineStats(*msg[1]), msg[2]
                elif kind == "memory":
                    self._memory = msg[1]
                elif kind == "error":
                    self._fail([msg[1]], msg[2])
                elif kind == "gone":
                    rid = msg[1]
                    with self._lock:
                        known = rid in self._streams
                    if known:
                        self._fail([rid], _Aborted())
                elif kind == "failed_step":
                    self._fail(msg[1], StepFailedError(msg[2]))
                elif kind == "dead":
                    raise RuntimeError(msg[1])
        except (EOFError, OSError) as exc:
            if not self._accepting:
                return  # shutting down: the child has stopped, or the pipe was closed on purpose
            self._dead = exc
        except BaseException as exc:  # noqa: BLE001
            self._dead = exc
        self._proc.join(1.0)
        log.error("engine process stopped: %r (exit code %s)", self._dead, self._proc.exitcode)
        with self._lock:
            rids = list(self._streams)
        self._fail(rids, EngineDeadError(f"engine process stopped: {self._dead!r}"))

    def _deliver_all(self, items: list[tuple[str, Any, bool]]) -> None:
        # An abort of a request the engine no longer knows ends its stream with an ABORT output.
        fixed = [(rid, self._aborted_output(rid) if isinstance(out, _Aborted) else out, final)
                 for rid, out, final in items]  # fmt: skip
        super()._deliver_all(fixed)


class _Aborted(Exception):
    """Marker: end the stream with an ABORT output."""
