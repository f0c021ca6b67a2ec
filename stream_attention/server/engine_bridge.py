"""The server's only contact with the engine: build it from settings, and the calls it makes.

Keeping every engine call here means the HTTP layer depends on the contract in
:mod:`stream_attention.engine.types` and on nothing else of the engine's internals.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import AsyncIterator
from typing import Any

from ..engine.types import EngineStats, Request, RequestOutput
from .settings import ServerSettings

log = logging.getLogger("stream_attention.server")


def engine_config(settings: ServerSettings) -> Any:
    """The engine's ``EngineConfig`` for ``settings`` (validated: raises ``ValueError``)."""
    from ..engine import EngineConfig

    wanted: dict[str, Any] = {
        "model": settings.model,
        "tokenizer": settings.tokenizer,
        "revision": settings.revision,
        "trust_remote_code": settings.trust_remote_code,
        "dtype": settings.dtype,
        "device": None if settings.device == "auto" else settings.device,
        "max_model_len": settings.max_model_len,
        "block_size": settings.kv_block_size,
        "gpu_memory_fraction": settings.kv_cache_memory_fraction,
        "kv_cache_memory_bytes": settings.kv_cache_memory_bytes,
        "num_kv_blocks": settings.kv_cache_blocks or None,
        "kv_cache_dtype": settings.kv_cache_dtype,
        "max_num_seqs": settings.max_num_seqs,
        "max_num_batched_tokens": settings.max_num_batched_tokens,
        "max_waiting": settings.max_queue,
        "scheduling_policy": settings.scheduling_policy,
        "enable_prefix_caching": settings.enable_prefix_caching,
        "attention_backend": settings.attention_backend,
        "use_cuda_graphs": settings.use_cuda_graphs,
        "seed": settings.seed,
        "kv_compression": settings.kv_compression,
        "kv_compression_ratio": settings.kv_compression_ratio,
        "kv_budget_tokens": settings.kv_budget_tokens,
        "kv_sink_tokens": settings.kv_sink_tokens,
        "kv_window_tokens": settings.kv_window_tokens,
        "kv_score_interval": settings.kv_score_interval,
    }
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    kwargs = {k: v for k, v in wanted.items() if k in known}
    if "kv_compression" not in known and settings.kv_compression != "none":
        raise ValueError(f"kv_compression={settings.kv_compression!r}: this engine build has no KV compression")
    config = EngineConfig(**kwargs)
    validate = getattr(config, "validate", None)
    return validate() if callable(validate) else config


def build_engine(settings: ServerSettings) -> Any:
    """Load the model and start the engine (blocking: call from a worker thread): in this
    process, or with ``engine_process`` in a child process of its own."""
    config = engine_config(settings)
    if settings.engine_process:
        from .engine_process import EngineProcess

        return EngineProcess(config)
    from ..engine import AsyncEngine

    return AsyncEngine(config=config)


async def start(engine: Any) -> None:
    """Start the engine's background loop where it has one to start."""
    fn = getattr(engine, "start", None)
    if callable(fn):
        result = fn()
        if inspect.isawaitable(result):
            await result


async def shutdown(engine: Any) -> None:
    for name in ("shutdown", "close", "stop"):
        fn = getattr(engine, name, None)
        if callable(fn):
            result = fn()
            if inspect.isawaitable(result):
                await result
            return


def stream(engine: Any, request: Request) -> AsyncIterator[RequestOutput]:
    """Outputs of ``request``; refusals (queue full, too long, invalid) raise before the first."""
    return engine.stream(request)


def stream_batches(engine: Any, request: Request) -> AsyncIterator[list[RequestOutput]]:
    """Outputs of ``request`` in batches: each item is every output that arrived since the
    previous one (the engine's ``stream_batches``; single outputs from an engine without it)."""
    batched = getattr(engine, "stream_batches", None)
    if callable(batched):
        return batched(request)
    return _one_by_one(engine.stream(request))


async def _one_by_one(outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[list[RequestOutput]]:
    try:
        async for out in outputs:
            yield [out]
    finally:
        aclose = getattr(outputs, "aclose", None)
        if aclose is not None:
            await aclose()


def is_engine_dead(exc: BaseException) -> bool:
    """Whether ``exc`` says the engine can serve nothing more (503, not a request error)."""
    try:
        from ..engine import EngineDeadError
    except ImportError:
        return False
    return isinstance(exc, EngineDeadError)


async def abort(engine: Any, request_id: str) -> None:
    result = engine.abort(request_id)
    if inspect.isawaitable(result):
        await result


def compile_grammar(engine: Any, spec: Any) -> Any:
    """Compile a structured-output spec with the engine's compiler (blocking: call from a
    worker thread). ``ValueError`` when it does not compile or the engine cannot constrain."""
    fn = getattr(engine, "compile_grammar", None)
    if not callable(fn):
        raise ValueError("this engine does not support structured output")
    return fn(spec)


def is_alive(engine: Any) -> bool:
    """False once the engine's background loop has stopped (it can serve nothing more)."""
    running = getattr(engine, "is_running", None)
    return True if running is None else bool(running)


def stats(engine: Any) -> EngineStats:
    return engine.stats()


def tokenizer(engine: Any) -> Any:
    return engine.tokenizer


def max_model_len(engine: Any) -> int:
    for owner in (engine, getattr(engine, "config", None)):
        value = getattr(owner, "max_model_len", None)
        if isinstance(value, int) and value > 0:
            return value
    raise RuntimeError("engine does not report its context length (max_model_len)")


def model_name(engine: Any, settings: ServerSettings) -> str:
    if settings.served_model_name:
        return settings.served_model_name
    for owner in (engine, getattr(engine, "config", None)):
        for attr in ("model_name", "served_model_name", "model"):
            value = getattr(owner, attr, None)
            if isinstance(value, str) and value:
                return value
    return settings.model or "stream-attention-default"


def vocab_size(engine: Any) -> int:
    tok = tokenizer(engine)
    try:
        return len(tok)
    except TypeError:
        return int(getattr(tok, "vocab_size", 0))


def device(engine: Any, settings: ServerSettings) -> str:
    for owner in (engine, getattr(engine, "config", None)):
        value = getattr(owner, "device", None)
        if value is not None and not callable(value):
            return str(value)
    return settings.resolved_device()
