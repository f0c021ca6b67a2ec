"""The one interface between the engine and whatever serves it (the HTTP server, benchmarks).

Three implementations: :class:`~.async_engine.AsyncEngine` (the engine steps in a thread of
this process), :class:`~.process_engine.EngineProcess` (it steps in a child process, so its
Python never waits for the server's) and :class:`~.supervisor.SupervisedEngine` (either of
them, restarted when it dies). :func:`build_engine_client` picks one from the config.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, Protocol, runtime_checkable

from .config import EngineConfig
from .types import EngineStats, Request, RequestOutput, SamplingParams

EngineMode = Literal["auto", "thread", "process"]


@runtime_checkable
class EngineClient(Protocol):
    """What a server may ask of an engine. Streams raise ``QueueFullError``,
    ``PromptTooLongError`` or ``ValueError`` before their first output, and end with
    ``EngineDeadError`` (engine gone) or ``StepFailedError`` (out of device memory) when
    the engine cannot finish them."""

    @property
    def config(self) -> EngineConfig: ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def model_name(self) -> str: ...

    @property
    def device(self) -> Any: ...

    @property
    def is_running(self) -> bool:
        """Whether requests can be served now (readiness)."""
        ...

    @property
    def failure(self) -> BaseException | None:
        """Why the client can serve nothing more (None while it serves or recovers)."""
        ...

    async def start(self) -> None: ...

    async def shutdown(self, *, drain: bool = True, timeout: float | None = 30.0) -> None: ...

    def make_request(self, prompt: Any, params: SamplingParams | None = None,
                     request_id: str | None = None) -> Request: ...

    def stream(self, request: Any, params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]: ...

    def stream_batches(self, request: Any, params: SamplingParams | None = None) -> AsyncIterator[
        list[RequestOutput]]: ...

    def abort(self, request_id: str) -> None: ...

    def compile_grammar(self, spec: Any) -> Any:
        """Compile a structured-output spec (blocking, cached; call it off the event loop
        before submitting): raises ``ValueError`` when it does not compile."""
        ...

    def stats(self) -> EngineStats: ...

    def memory_report(self) -> dict[str, Any] | None:
        """Memory of the process holding the model when that is not this one, else None."""
        ...


def resolve_mode(mode: EngineMode, config: EngineConfig) -> Literal["thread", "process"]:
    """``auto``: a process of its own on CUDA (the engine's host work and the server's
    per-token Python would otherwise share one interpreter lock), a thread on CPU (where
    the model's own compute dominates and a second process only adds copies)."""
    if mode == "auto":
        return "process" if config.resolved_device().type == "cuda" else "thread"
    if mode not in ("thread", "process"):
        raise ValueError(f"engine mode={mode!r}: expected auto, thread or process")
    return mode


def build_engine_client(config: EngineConfig, *, mode: EngineMode = "auto", supervise: bool = True,
                        on_give_up: Callable[[BaseException], None] | None = None,
                        max_restarts: int = 5, restart_window_s: float = 600.0,
                        restart_backoff_s: float = 1.0) -> EngineClient:
    """Load the model and build the client for ``config`` (blocking: call from a worker thread).

    With ``supervise`` the client is wrapped in a :class:`~.supervisor.SupervisedEngine`
    that rebuilds it when it dies (up to ``max_restarts`` within ``restart_window_s``, then
    ``on_give_up``)."""
    kind = resolve_mode(mode, config)

    def build() -> EngineClient:
        if kind == "process":
            from .process_engine import EngineProcess

            return EngineProcess(config)
        from .async_engine import AsyncEngine

        return AsyncEngine(config=config)

    if not supervise:
        return build()
    from .supervisor import SupervisedEngine

    return SupervisedEngine(build, max_restarts=max_restarts, window_s=restart_window_s,
                            backoff_s=restart_backoff_s, on_give_up=on_give_up)
