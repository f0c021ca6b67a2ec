"""Utilities: KV-cache compression, memory profiling, gradient checkpointing, quantization.

``stream_attention.utils.memory`` is the seed's entry point and re-exports all of them.
"""

from .memory import (
    CheckpointedSequential,
    MemoryProfiler,
    QuantizedKV,
    checkpoint_sequential_modules,
    create_kv_compressor,
)

__all__ = [
    "create_kv_compressor",
    "QuantizedKV",
    "MemoryProfiler",
    "checkpoint_sequential_modules",
    "CheckpointedSequential",
]
