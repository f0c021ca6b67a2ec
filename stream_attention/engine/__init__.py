"""The inference engine: paged KV cache, continuous batching, streaming generation.

::

    from stream_attention.engine import LLMEngine, SamplingParams

    engine = LLMEngine()  # the embedded demo model; or LLMEngine("path/or/hub-id")
    out = engine.generate(["Hello"], SamplingParams(max_tokens=32))[0]
    print(out.text)

``AsyncEngine`` serves concurrent streams (``async for out in engine.stream(request)``).
"""

from .async_engine import AsyncEngine, EngineDeadError
from .config import EngineConfig
from .llm_engine import LLMEngine
from .types import (
    EngineStats,
    FinishReason,
    PromptTooLongError,
    QueueFullError,
    Request,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)

__all__ = [
    "AsyncEngine",
    "EngineConfig",
    "EngineDeadError",
    "EngineStats",
    "FinishReason",
    "LLMEngine",
    "PromptTooLongError",
    "QueueFullError",
    "Request",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
]
