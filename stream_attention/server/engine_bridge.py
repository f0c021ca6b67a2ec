"""The server's only contact with the engine: build it from settings, and the calls it makes.

Keeping every engine call here means the HTTP layer depends on the contract in
:mod:`stream_attention.engine.types` and on nothing else of the engine's internals.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..engine import EngineClient, EngineDeadError, StepFailedError, build_engine_client
from ..engine.config import EngineConfig
from ..engine.types import EngineStats, Request, RequestOutput
from .settings import ServerSettings

log = logging.getLogger("stream_attention.server")


def engine_config(settings: ServerSettings) -> EngineConfig:
    """The engine's config: each engine field of ``settings`` as it is (validated: raises ``ValueError``)."""
    return EngineConfig(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(EngineConfig)}).validate()


def build_engine(settings: ServerSettings,
                 on_give_up: Callable[[BaseException], None] | None = None) -> EngineClient:
    """Load the model and build its supervised engine client (blocking: call from a worker
    thread). ``on_give_up`` runs if the engine keeps dying and will not be restarted again."""
    mode = "process" if settings.engine_process else settings.engine_mode
    return build_engine_client(engine_config(settings), mode=mode, supervise=True, on_give_up=on_give_up,
                               max_restarts=settings.engine_max_restarts)


async def start(engine: EngineClient) -> None:
    await engine.start()


async def shutdown(engine: EngineClient, timeout: float | None = 30.0) -> None:
    await engine.shutdown(drain=True, timeout=timeout)


def stream(engine: EngineClient, request: Request) -> AsyncIterator[RequestOutput]:
    """Outputs of ``request``; refusals (queue full, too long, invalid) raise before the first."""
    return engine.stream(request)


def stream_batches(engine: EngineClient, request: Request) -> AsyncIterator[list[RequestOutput]]:
    """Outputs of ``request`` in batches: each item is every output that arrived since the previous one."""
    return engine.stream_batches(request)


def is_engine_dead(exc: BaseException) -> bool:
    """Whether ``exc`` says the engine cannot finish the request (503, not a request error):
    it is gone or restarting, or the step ran out of device memory."""
    return isinstance(exc, EngineDeadError | StepFailedError)


async def abort(engine: EngineClient, request_id: str) -> None:
    engine.abort(request_id)


def compile_grammar(engine: EngineClient, spec: Any) -> Any:
    """Compile a structured-output spec with the engine's compiler (blocking: call from a
    worker thread). ``ValueError`` when it does not compile."""
    return engine.compile_grammar(spec)


def is_alive(engine: EngineClient) -> bool:
    """False once the engine can serve nothing more (not while it restarts)."""
    return engine.failure is None


def is_ready(engine: EngineClient) -> bool:
    """Whether requests can be served now."""
    return engine.is_running


def stats(engine: EngineClient) -> EngineStats:
    return engine.stats()


def tokenizer(engine: EngineClient) -> Any:
    return engine.tokenizer


def max_model_len(engine: EngineClient) -> int:
    return engine.max_model_len


def model_name(engine: EngineClient, settings: ServerSettings) -> str:
    return settings.served_model_name or engine.model_name or settings.model or "stream-attention-default"


def vocab_size(engine: EngineClient) -> int:
    tok = tokenizer(engine)
    try:
        return len(tok)
    except TypeError:
        return int(getattr(tok, "vocab_size", 0))


def device(engine: EngineClient, settings: ServerSettings) -> str:
    return str(engine.device) if engine.device is not None else settings.resolved_device()
