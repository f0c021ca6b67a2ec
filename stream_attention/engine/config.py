"""Engine configuration: what to load, where, and how much of the device it may use."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

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


# Short names of the float dtypes (what the server's flags offer); ``parse_dtype`` also
# takes the long ones.
DTYPE_NAMES = ("auto", "bf16", "fp16", "fp32")
DTYPE_ALIASES = {
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
    "fp8_e4m3": "fp8",  # vLLM's name for the same e4m3 KV pages
}


def canonical_dtype_name(value: str) -> str:
    """``"bfloat16"`` -> ``"bf16"`` and so on; other names lower-cased and returned as they are."""
    key = value.strip().lower().removeprefix("torch.")
    return DTYPE_ALIASES.get(key, key)


def setting(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A config field with its help text and bounds, declared once: :meth:`EngineConfig.validate`
    checks the bounds, and the server derives its flags (name, type, default, help, bounds)
    from the same metadata."""
    meta: dict[str, Any] = {"help": help}
    for key, value in (("ge", ge), ("gt", gt), ("le", le), ("choices", choices)):
        if value is not None:
            meta[key] = value
    return field(default=default, metadata=meta)


@dataclass
class EngineConfig:
    """Everything the engine needs besides the model object itself.

    Memory: the KV cache takes ``kv_cache_memory_bytes`` when given; otherwise on CUDA it
    takes whatever is left of ``gpu_memory_fraction`` of the device after the weights and
    a profiled forward pass, and on CPU ``cpu_kv_cache_bytes``. ``num_kv_blocks`` overrides
    both (tests use it to force preemption).

    Each field's help text and bounds live in its metadata (see :func:`setting`);
    ``stream-attention-serve`` offers every field as a flag of the same name.
    """

    model: str | None = setting(None, "local path or Hugging Face hub id; unset loads the embedded default model")
    tokenizer: str | None = setting(None, "tokenizer path or hub id (default: the model's)")
    dtype: str = setting(
        "auto", "weights/activations dtype (auto = the checkpoint's; fp32 on CPU, bf16 on GPU if fp32)",
        choices=DTYPE_NAMES,
    )
    device: str | None = setting(None, "cpu, cuda or cuda:N (unset: cuda when available, else cpu)")
    trust_remote_code: bool = setting(False, "allow model code from the hub")
    revision: str | None = setting(None, "model revision (branch, tag or commit) on the hub")
    max_model_len: int | None = setting(None, "context length (default: the model's max_position_embeddings)", ge=16)
    block_size: int = setting(16, "tokens per KV block (a power of two)", ge=1, le=1024)
    gpu_memory_fraction: float = setting(
        0.90, "fraction of device memory the weights plus the KV pool may take (CUDA)", gt=0.0, le=1.0
    )
    kv_cache_memory_bytes: int | None = setting(None, "bytes of KV pool (overrides the fraction)", gt=0)
    cpu_kv_cache_bytes: int = setting(512 * 1024 * 1024, "bytes of KV pool on CPU", gt=0)
    num_kv_blocks: int | None = setting(None, "KV blocks in the pool (unset: size from memory)", ge=1)
    kv_cache_dtype: str = setting(
        "auto", "storage format of KV pages (auto = the model dtype; fp8 = e4m3 pages, alias fp8_e4m3; int8/int4 "
        "quantize)",
        choices=(*DTYPE_NAMES, "fp8", "fp8_e4m3", "int8", "int4"),
    )
    kv_compression: str = setting(
        "none", "KV eviction policy: none, streaming (sinks + recent window), heavy-hitter (H2O), snapkv, hybrid"
    )
    kv_compression_ratio: float | None = setting(
        None, "eviction target: keep 1/ratio of each sequence's tokens (unless kv_budget_tokens)", ge=1.0, le=64.0
    )
    kv_budget_tokens: int | None = setting(None, "eviction target: KV tokens kept per sequence", ge=1)
    kv_sink_tokens: int = setting(4, "first tokens eviction never drops (attention sinks)", ge=0)
    kv_window_tokens: int = setting(256, "most recent tokens eviction never drops", ge=0)
    kv_score_interval: int = setting(8, "heavy-hitter eviction: score every n-th decode step", ge=1)
    max_num_seqs: int = setting(256, "sequences decoded together", ge=1, le=4096)
    max_num_batched_tokens: int = setting(8192, "tokens per engine step (decode tokens + prefill chunks)", ge=1)
    max_waiting: int = setting(
        256, "requests waiting beyond the running ones; past it add_request raises QueueFullError (HTTP 429)",
        ge=0, le=1_000_000,
    )
    scheduling_policy: str = setting(
        "fcfs", "fcfs: arrival order; priority: by (request priority, arrival), lowest priority preempted first",
        choices=("fcfs", "priority"),
    )
    enable_prefix_caching: bool = setting(True, "reuse KV blocks of shared prompt prefixes")
    enable_chunked_prefill: bool = setting(True, "split long prompts over several steps")
    hybrid_kv_cache: bool = setting(
        True, "models mixing full and sliding-window layers (Gemma 2/3): windowed layers keep only their window "
        "of KV blocks (a second block table per sequence, one shared page pool)"
    )
    prefill_wait_steps: int | None = setting(
        None,
        "decode steps a few new requests may wait for others to share one prefill step "
        "(unset: 2 on CUDA, where mixed steps run eagerly; 0 elsewhere)",
        ge=0, le=64,
    )
    attention_backend: str = setting(
        "auto", "attention kernels: triton, or sdpa (torch over gathered pages)", choices=("auto", "triton", "sdpa")
    )
    fused_layers: bool = setting(
        True, "run Llama, Mistral, Qwen2/3 and Gemma 1/2/3 models through the engine's fused forward (engine/fused_llama.py)"
    )
    use_cuda_graphs: bool = setting(True, "replay CUDA graphs for decode-only steps (CUDA only)")
    cuda_graph_max_batch: int = setting(256, "largest decode batch captured in a CUDA graph", ge=1)
    pipeline_steps: bool | None = setting(
        None, "launch the next step before this one's tokens are processed (unset: on CUDA)"
    )
    async_scheduling: bool | None = setting(
        None, "with pipeline_steps: schedule and launch a decode step before the previous step's tokens are "
        "read back, feeding them to it on the device, so the device never waits for the host between "
        "steps (vLLM's --async-scheduling; unset: on wherever pipeline_steps is)"
    )
    speculative_method: str = setting(
        "none", "speculative decoding: none, ngram (prompt lookup: propose what followed the latest match of the "
        "last tokens) or draft (a smaller model with the same vocabulary, speculative_draft_model)",
        choices=("none", "ngram", "draft"),
    )
    num_speculative_tokens: int = setting(
        4, "tokens proposed per sequence and step, verified in one target step (speculative_method != none)",
        ge=1, le=16,
    )
    speculative_draft_model: str | None = setting(
        None, "draft model for speculative_method=draft: local path or hub id of a causal LM with the target's "
        "vocabulary"
    )
    prompt_lookup_min: int = setting(1, "ngram proposals: shortest suffix matched against earlier context", ge=1)
    prompt_lookup_max: int = setting(4, "ngram proposals: longest suffix matched (tried first)", ge=1)
    speculative_disable_by_batch_size: int | None = setting(
        None, "speculation pauses in steps that start with more running sequences than this (vLLM's "
        "disable_by_batch_size: large batches already use the device well)", ge=1,
    )
    seed: int = setting(0, "seed of requests that give none, so runs are repeatable")
    fault_file: str | None = setting(
        None,
        "testing hook: when this file exists at the start of a step the engine deletes it and raises what it "
        "names inside the step ('oom': the device's out-of-memory error; anything else: RuntimeError)",
    )

    def validate(self) -> EngineConfig:
        """Raise ``ValueError`` naming the first bad field; returns ``self``."""
        parse_dtype(self.dtype)  # the dtype fields take long names too: parse_dtype checks them
        if not self.kv_cache_quantized:
            parse_dtype(self.kv_cache_dtype)
        self.kv_compression_config()  # validates the compression fields
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None or f.name in ("dtype", "kv_cache_dtype"):
                continue
            if "choices" in meta and value not in meta["choices"]:
                raise ValueError(f"{f.name}={value!r}: expected one of {', '.join(meta['choices'])}")
            if (
                ("ge" in meta and not value >= meta["ge"])
                or ("gt" in meta and not value > meta["gt"])
                or ("le" in meta and not value <= meta["le"])
            ):
                raise ValueError(f"{f.name}={value!r} is out of range")
        if self.speculative_method == "draft" and not self.speculative_draft_model:
            raise ValueError("speculative_method='draft' needs speculative_draft_model (a path or hub id)")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min={self.prompt_lookup_min} exceeds "
                             f"prompt_lookup_max={self.prompt_lookup_max}")
        if self.speculative_method != "none" and self.kv_compression_config().policy != "none":
            raise ValueError(f"speculative_method={self.speculative_method!r} cannot be combined with "
                             f"kv_compression={self.kv_compression!r} (eviction compacts the pages it would roll back)")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size!r} is out of range (a power of two)")
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

    def resolved_prefill_wait_steps(self) -> int:
        """``prefill_wait_steps``, or its default for the device: 2 on CUDA, 0 elsewhere."""
        if self.prefill_wait_steps is not None:
            return self.prefill_wait_steps
        return 2 if self.resolved_device().type == "cuda" else 0

    def resolved_device(self) -> torch.device:
        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
