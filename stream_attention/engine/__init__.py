"""The inference engine: paged KV cache, continuous batching, streaming generation.

::

    from stream_attention.engine import LLMEngine, SamplingParams

    engine = LLMEngine()  # the embedded demo model; or LLMEngine("path/or/hub-id")
    out = engine.generate(["Hello"], SamplingParams(max_tokens=32))[0]
    print(out.text)

``AsyncEngine`` serves concurrent streams (``async for out in engine.stream(request)``).

With no model the engine runs the embedded demo model (``stream_attention.models.default``,
a small Llama shipped in the package; no download). To serve a real model, pass a local
directory or a hub id (``LLMEngine("meta-llama/Llama-3.2-1B-Instruct")``, or
``EngineConfig(model=...)``), or an already loaded ``(model, tokenizer)`` pair. Any
transformers causal LM whose attention goes through ``AttentionInterface`` works
(Llama, Mistral/Qwen2 without sliding windows, ...); its attention is replaced by the
engine's paged kernels for the engine's steps only.
"""

from .async_engine import AsyncEngine, EngineDeadError, StepFailedError
from .client import EngineClient, build_engine_client
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
    StructuredOutputsParams,
    TokenLogprob,
)

__all__ = [
    "AsyncEngine",
    "EngineClient",
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
    "StepFailedError",
    "StructuredOutputsParams",
    "TokenLogprob",
    "build_engine_client",
]
