"""Memory optimisation utilities (the seed's ``stream_attention.utils.memory`` module).

* KV-cache compression: ``create_kv_compressor('importance' | 'chunk' | 'quantized' |
  'hybrid' | 'streaming')``, whose ``.compress(keys, values, compression_ratio=8.0)`` returns
  ``(compressed_keys, compressed_values, stats)`` (see :mod:`.kv_compression`);
* ``MemoryProfiler`` for peak/current allocation snapshots and a report (:mod:`.profiler`);
* gradient checkpointing of sequential modules (:mod:`.checkpointing`).

Example::

    from stream_attention.utils.memory import create_kv_compressor
    comp = create_kv_compressor('hybrid')
    ck, cv, stats = comp.compress(keys, values, compression_ratio=8.0)
    print(stats)
"""

from __future__ import annotations

from .checkpointing import CheckpointedSequential, checkpoint_sequential_modules, segment_bounds
from .kv_compression import (
    ChunkKVCompressor,
    CompressionResult,
    HybridKVCompressor,
    ImportanceKVCompressor,
    KVCompressor,
    QuantizedKV,
    QuantizedKVCompressor,
    StreamingKVCompressor,
    attention_error,
    available_kv_compressors,
    create_kv_compressor,
    select_chunks,
    select_tokens,
    token_importance,
)
from .profiler import MemoryProfiler, cuda_memory, format_bytes, host_memory

__all__ = [
    "create_kv_compressor",
    "available_kv_compressors",
    "KVCompressor",
    "ImportanceKVCompressor",
    "ChunkKVCompressor",
    "QuantizedKVCompressor",
    "HybridKVCompressor",
    "StreamingKVCompressor",
    "QuantizedKV",
    "CompressionResult",
    "token_importance",
    "select_tokens",
    "select_chunks",
    "attention_error",
    "MemoryProfiler",
    "host_memory",
    "cuda_memory",
    "format_bytes",
    "checkpoint_sequential_modules",
    "CheckpointedSequential",
    "segment_bounds",
]
