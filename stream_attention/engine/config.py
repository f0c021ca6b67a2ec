"""Engine configuration: what to load, where, and how much of the device it may use."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

_DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# Compressed page formats (``engine/kv_compression.py``): never parsed as torch dtypes.
_QUANTIZED_KV = ("fp8", "fp8_e4m3", "int8", "int4")


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``"auto"``/``None`` -> ``None``; a name or a ``torch.dtype`` -> that float dtype."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype={value!r}: expected one of {', '.join(_DTYPES)}")
    return _DTYPES[key]


@dataclass
class EngineConfig:
    """Everything the engine needs besides the model object itself.

    Memory: the KV cache takes ``kv_cache_memory_bytes`` when given; otherwise on CUDA it
    takes whatever is left of ``gpu_memory_fraction`` of the device after the weights and
    a profiled forward pass, and on CPU ``cpu_kv_cache_bytes``. ``num_kv_blocks`` overrides
    both (tests use it to force preemption).
    """

    model: str | None = None  # local path or hub id; None -> the embedded demo model
    tokenizer: str | None = None  # defaults to ``model``
    dtype: str = "auto"  # weights/activations: auto = the checkpoint's (fp32 on CPU, bf16 on GPU if fp32)
    device: str | None = None  # None -> cuda when available, else cpu
    trust_remote_code: bool = False
    revision: str | None = None
    max_model_len: int | None = None  # None -> the model's max_position_embeddings
    block_size: int = 16
    gpu_memory_fraction: float = 0.90
    kv_cache_memory_bytes: int | None = None
    cpu_kv_cache_bytes: int = 512 * 1024 * 1024
    num_kv_blocks: int | None = None
    # auto = the model dtype; fp16/bf16/fp32 store pages in that type; fp8 (fp8_e4m3) / int8 / int4 compress them
    kv_cache_dtype: str = "auto"
    # KV compression (``engine/kv_compression.py``): none | streaming | heavy-hitter | snapkv | hybrid (aliases accepted).
    kv_compression: str = "none"
    kv_compression_ratio: float | None = None  # eviction budget = ceil(tokens / ratio) (unless kv_budget_tokens)
    kv_budget_tokens: int | None = None  # eviction budget in cache slots per sequence
    kv_sink_tokens: int = 4
    kv_window_tokens: int = 256
    kv_score_interval: int = 8  # heavy-hitter: score every n-th decode step
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192  # per-step token budget: decode tokens + prefill chunks
    max_waiting: int = 1024  # bound of the waiting queue; beyond it add_request raises QueueFullError
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    attention_backend: str = "auto"  # auto | triton | sdpa (torch over gathered pages)
    # Llama-family models run through the engine's fused forward (engine/fused_llama.py)
    # instead of transformers' layers; False keeps transformers' forward with the attention hook.
    fused_layers: bool = True
    use_cuda_graphs: bool = True  # decode-only steps replay captured graphs (CUDA only)
    cuda_graph_max_batch: int = 256
    seed: int = 0  # seeds requests that have no seed of their own, so runs are repeatable
    extra: dict = field(default_factory=dict)

    def validate(self) -> EngineConfig:
        """Raise ``ValueError`` naming the first bad field; returns ``self``."""
        parse_dtype(self.dtype)
        if not self.kv_cache_quantized:
            parse_dtype(self.kv_cache_dtype)
        self.kv_compression_config()  # validates the compression fields
        checks = [
            ("block_size", self.block_size >= 1 and (self.block_size & (self.block_size - 1)) == 0),
            ("gpu_memory_fraction", 0.0 < self.gpu_memory_fraction <= 1.0),
            ("kv_cache_memory_bytes", self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0),
            ("cpu_kv_cache_bytes", self.cpu_kv_cache_bytes > 0),
            ("num_kv_blocks", self.num_kv_blocks is None or self.num_kv_blocks >= 1),
            ("max_num_seqs", self.max_num_seqs >= 1),
            ("max_num_batched_tokens", self.max_num_batched_tokens >= 1),
            ("max_waiting", self.max_waiting >= 0),
            ("attention_backend", self.attention_backend in ("auto", "triton", "sdpa")),
            ("max_model_len", self.max_model_len is None or self.max_model_len >= 1),
            ("cuda_graph_max_batch", self.cuda_graph_max_batch >= 1),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range")
        return self

    @property
    def kv_cache_quantized(self) -> bool:
        """Whether ``kv_cache_dtype`` names a compressed page format (fp8 / int8 / int4)."""
        return str(self.kv_cache_dtype).strip().lower() in _QUANTIZED_KV

    def kv_compression_config(self):
        """The validated :class:`~.kv_compression.KVCompressionConfig` these fields describe."""
        from .kv_compression import KVCompressionConfig

        kv_dtype = str(self.kv_cache_dtype).strip().lower() if self.kv_cache_quantized else "auto"
        return KVCompressionConfig(
            kv_cache_dtype=kv_dtype, policy=self.kv_compression, budget_tokens=self.kv_budget_tokens,
            ratio=self.kv_compression_ratio, sink_tokens=self.kv_sink_tokens, window_tokens=self.kv_window_tokens,
            score_interval=self.kv_score_interval,
        ).validate()

    def replace(self, **changes) -> EngineConfig:
        """A copy with ``changes`` applied (unknown names raise ``TypeError``)."""
        return dataclasses.replace(self, **changes)

    def resolved_device(self) -> torch.device:
        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
