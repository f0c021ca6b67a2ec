"""Compressed KV cache for the engine: compressed pages, block eviction, and their numbers.

Two independent mechanisms, combinable (``policy="hybrid"``):

* **Compressed pages** (``kv_cache_dtype`` ``fp8`` / ``int8`` / ``int4``). ``fp8``
  (alias ``fp8_e4m3``, as vLLM's ``--kv-cache-dtype fp8``) stores e4m3 values in the
  bf16 page layout at half the bytes, with one power-of-two scale per layer and KV head
  calibrated from the first prompt (:mod:`stream_attention.kernels.kv_pages` says why).
  ``int8``/``int4`` pools are :class:`~stream_attention.kernels.kv_pages.QuantizedPages`
  (uint8 codes + fp16 scale/zero per token and KV head). New tokens are quantized as they
  are written (:func:`write_kv`); attention reads the stored values and converts them in
  registers (:func:`compressed_attention_step`), so a page never exists in 16-bit form.
  int8/int4 scales are per token for keys too: a decode step writes one token at a time
  (inside CUDA graphs), while KIVI's per-channel key scales need a page's tokens before
  quantizing it; the kernels support per-channel pages for block writes, and
  ``benchmarks/kv_quality.py`` reports both. A block costs :func:`block_bytes`, so the
  same memory budget holds 2x (fp8), about 1.9x (int8) / 3.6x (int4) more blocks at head_dim
  128. Every format's pool is one allocation (:class:`KVPoolLayout`), sized so that the
  bytes allocated, scratch block and scales included, never exceed the budget.
* **Eviction** (``streaming`` = StreamingLLM sinks + recent window; ``heavy-hitter`` =
  H2O/SnapKV scores): once a sequence holds more cache slots than its budget, whole
  full blocks outside the sinks and the recent window are released back to the pool
  through ``BlockManager.drop_blocks`` (which compacts the block table; RoPE positions
  stay logical). Heavy-hitter scores are the attention probability mass each block
  received, measured by :func:`~stream_attention.kernels.kv_scoring.paged_token_attention_mass`
  on scoring steps (every prefill step, for the last ``observation_window`` queries of
  each sequence as SnapKV does, and every ``score_interval``-th decode step), averaged
  over the steps that observed the block. ``snapkv`` (Li et al. 2024) scores a prompt
  once, when its last chunk is computed: the last ``observation_window`` queries' mass
  per key and KV head, pooled along the keys (:func:`pool_token_scores`), summed per
  block over heads and layers; the prompt is compressed then, not chunk by chunk.

:class:`KVCompressionManager` owns the policy state and the statistics; the engine calls
it at a handful of points (listed in ``docs/TEAM-NOTES.md``): allocation and sizing,
the attention hook, after each step, when a sequence leaves, and for ``stats()``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..core.kernel_switches import KernelSwitches
from ..kernels.kv_attention import (
    DEFAULT_LAUNCH,
    decode_launch,
    paged_attention_fp8,
    paged_attention_fp8_ref,
    paged_attention_quantized,
    paged_attention_ref,
)
from ..kernels.kv_attention import DEFAULT_LAUNCH as FP8_LAUNCH
from ..kernels.kv_pages import (
    Fp8Pages,
    QuantizedPages,
    dequantize_fp8_pages,
    kv_bytes_per_token,
    write_tokens_fp8,
    write_tokens_fp8_ref,
    write_tokens_to_pages,
    write_tokens_to_pages_ref,
)
from ..kernels.kv_scoring import (
    paged_token_attention_mass,
    paged_token_attention_mass_fp8,
    paged_token_attention_mass_ref,
)
from ..kernels.runtime import triton_runs_on
from ..utils.kv_compression import keep_top_k

__all__ = [
    "KV_CACHE_DTYPES",
    "KV_COMPRESSION_POLICIES",
    "KVCompressionConfig",
    "KVCompressionManager",
    "KVPoolLayout",
    "PAGE_FORMATS",
    "BlockScoreCollector",
    "EvictionPolicy",
    "StreamingLLMPolicy",
    "HeavyHitterPolicy",
    "SnapKVPolicy",
    "pool_token_scores",
    "allocate_quantized_caches",
    "block_bytes",
    "write_kv",
    "compressed_attention_step",
]

QUANTIZED_BITS = {"int8": 8, "int4": 4}
# Compressed page formats: e4m3 pages (vLLM's ``--kv-cache-dtype fp8``) and int8/int4 codes.
PAGE_FORMATS = ("fp8", "int8", "int4")
KV_CACHE_DTYPE_ALIASES = {"fp8_e4m3": "fp8"}
KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16", *PAGE_FORMATS,
                   *KV_CACHE_DTYPE_ALIASES)
# Pool tensors start at multiples of this many bytes (coalesced loads; fp16/fp32 views of bytes).
_POOL_ALIGN = 256
# The CUDA caching allocator rounds a large request up to 2 MiB and counts the rounding as
# allocated when it is under 1 MiB: a pool sized to the byte would read as over budget.
_CUDA_ALLOC_GRANULE = 2 * 2**20
KV_COMPRESSION_POLICIES = ("none", "streaming", "heavy-hitter", "snapkv", "hybrid")
# Names users (and the server's flag help) reach for, mapped onto the policies above.
POLICY_ALIASES = {"off": "none", "streamingllm": "streaming", "sink-window": "streaming", "importance": "heavy-hitter",
                  "h2o": "heavy-hitter", "heavy_hitter": "heavy-hitter", "snap-kv": "snapkv"}
POOLINGS = ("max", "avg")


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass
class KVCompressionConfig:
    """Per-server KV compression settings (``--kv-cache-dtype``, ``--kv-compression``, ...).

    Eviction budget per sequence, in cache slots: ``budget_tokens`` when given, else
    ``ceil(tokens / ratio)`` when ``ratio`` is given (so it grows with the sequence), and
    never less than the sinks plus the window plus one block. ``hybrid`` evicts like
    ``heavy-hitter`` and stores pages in ``int4`` unless ``kv_cache_dtype`` names a
    compressed format. ``snapkv`` scores a prompt once, with its last
    ``observation_window`` queries, scores pooled over ``pool_kernel`` neighbouring keys
    (``pooling`` ``max`` or ``avg``), and evicts once the prompt is complete.
    """

    kv_cache_dtype: str = "auto"
    policy: str = "none"
    budget_tokens: int | None = None
    ratio: float | None = None
    sink_tokens: int = 4
    window_tokens: int = 256
    observation_window: int = 32
    score_interval: int = 8
    pool_kernel: int = 7
    pooling: str = "max"

    def __post_init__(self) -> None:
        policy = str(self.policy).strip().lower()
        self.policy = POLICY_ALIASES.get(policy, policy)
        kv_dtype = str(self.kv_cache_dtype).strip().lower()
        self.kv_cache_dtype = KV_CACHE_DTYPE_ALIASES.get(kv_dtype, kv_dtype)

    def validate(self) -> KVCompressionConfig:
        """Raise ``ValueError`` naming the first bad field; returns ``self``."""
        checks = [
            ("kv_cache_dtype", self.kv_cache_dtype in KV_CACHE_DTYPES),
            ("policy", self.policy in KV_COMPRESSION_POLICIES),
            ("budget_tokens", self.budget_tokens is None or self.budget_tokens >= 1),
            ("ratio", self.ratio is None or self.ratio >= 1.0),
            ("sink_tokens", self.sink_tokens >= 0),
            ("window_tokens", self.window_tokens >= 0),
            ("observation_window", self.observation_window >= 1),
            ("score_interval", self.score_interval >= 1),
            ("pool_kernel", self.pool_kernel >= 1 and self.pool_kernel % 2 == 1),
            ("pooling", self.pooling in POOLINGS),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range")
        if self.evicts and self.budget_tokens is None and self.ratio is None:
            raise ValueError(f"policy={self.policy!r} needs budget_tokens or ratio")
        return self

    @property
    def page_format(self) -> str | None:
        """``fp8``, ``int8`` or ``int4``; None for float pages (hybrid defaults to int4)."""
        if self.kv_cache_dtype in PAGE_FORMATS:
            return self.kv_cache_dtype
        return "int4" if self.policy == "hybrid" else None

    @property
    def bits(self) -> int | None:
        """Bits per stored K/V element of a compressed format (fp8: 8), or None for float pages."""
        fmt = self.page_format
        return None if fmt is None else QUANTIZED_BITS.get(fmt, 8)

    @property
    def evicts(self) -> bool:
        return self.policy in ("streaming", "heavy-hitter", "snapkv", "hybrid")

    @property
    def scores(self) -> bool:
        return self.policy in ("heavy-hitter", "snapkv", "hybrid")


# --------------------------------------------------------------------------------------
# Pages: sizing, allocation, writes, attention
# --------------------------------------------------------------------------------------


def block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, bits: int | None,
                float_dtype: torch.dtype = torch.bfloat16, *, page_format: str | None = None) -> int:
    """Bytes one block takes over all layers (K and V, per-token scales included).

    ``page_format`` ``fp8`` stores one byte per element (its per-head scales are not per
    block: :meth:`KVPoolLayout.pool_bytes` counts them); otherwise ``bits`` 8/4 are int8/int4
    codes with fp16 (scale, zero) per token, and 16/None float pages of ``float_dtype``.
    """
    if page_format == "fp8":
        return 2 * num_layers * block_size * num_kv_heads * head_dim
    if bits == 16 or bits is None:
        elem = torch.empty((), dtype=float_dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * elem
    return int(num_layers * block_size * kv_bytes_per_token(num_kv_heads, head_dim, bits, block_size=block_size))


def _align(n: int) -> int:
    return -(-n // _POOL_ALIGN) * _POOL_ALIGN


@dataclass(frozen=True)
class KVPoolLayout:
    """Shapes of one engine's KV pool; every tensor of it lives in one byte buffer.

    One allocation (rather than one per layer and per K/V, data and scales) makes the
    pool's size what it is on paper: the CUDA caching allocator rounds each large request
    up to 2 MiB, which over the 4 x layers tensors of a quantized pool overshot an 8 GiB
    budget by 30 MB. :meth:`blocks_for_budget` then sizes the pool, scratch block and
    scales included, so that the bytes allocated never exceed the budget.
    """

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    page_format: str | None  # fp8 | int8 | int4 | None (float pages)
    float_dtype: torch.dtype = torch.bfloat16

    def _parts(self, num_blocks: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of one layer's tensors: K's then V's."""
        page = (num_blocks, self.block_size, self.num_kv_heads)
        fmt = self.page_format
        if fmt is None:
            one = [((*page, self.head_dim), self.float_dtype)]
        elif fmt == "fp8":
            one = [((*page, self.head_dim), torch.float8_e4m3fn), ((self.num_kv_heads,), torch.float32)]
        else:
            bits = QUANTIZED_BITS[fmt]
            one = [((*page, self.head_dim * bits // 8), torch.uint8), ((*page, 2), torch.float16)]
        return one + one

    def pool_bytes(self, num_blocks: int) -> int:
        """Bytes of the buffer holding ``num_blocks`` blocks (count the scratch block in)."""
        per_layer = sum(_align(math.prod(shape) * dt.itemsize)
                        for shape, dt in self._parts(num_blocks))
        return self.num_layers * per_layer

    def blocks_for_budget(self, budget: int, device: torch.device | str) -> int:
        """Most usable blocks such that the pool with one scratch block more fits ``budget``
        bytes as the device's allocator counts them; 0 when not even one fits."""
        granule = _CUDA_ALLOC_GRANULE if torch.device(device).type == "cuda" else 1

        def fits(n: int) -> bool:
            return -(-self.pool_bytes(n + 1) // granule) * granule <= budget

        n = max(0, budget // (self.pool_bytes(2) - self.pool_bytes(1)))
        while n > 0 and not fits(n):  # a few steps: alignment and the granule cost < 2 MiB of blocks
            n -= 1
        return int(n)

    def allocate(self, num_blocks: int, device: torch.device | str) -> list[tuple[Any, Any]]:
        """Per-layer ``(k_pages, v_pages)``: float tensors, :class:`Fp8Pages` or
        :class:`QuantizedPages` of ``num_blocks`` blocks (zeroed), views of one buffer."""
        buffer = torch.zeros(self.pool_bytes(num_blocks), dtype=torch.uint8, device=device)
        offset = 0
        layers = []
        for _ in range(self.num_layers):
            views = []
            for shape, dt in self._parts(num_blocks):
                size = math.prod(shape) * dt.itemsize
                views.append(buffer[offset:offset + size].view(dt).view(shape))
                offset += _align(size)
            half = len(views) // 2
            layers.append((self._pages(views[:half]), self._pages(views[half:])))
        return layers

    def _pages(self, views: list[torch.Tensor]) -> Any:
        if self.page_format is None:
            return views[0]
        if self.page_format == "fp8":
            return Fp8Pages(views[0], views[1])
        return QuantizedPages(views[0], views[1], QUANTIZED_BITS[self.page_format], self.head_dim)


def allocate_quantized_caches(
    num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, bits: int,
    device: torch.device | str,
) -> list[tuple[QuantizedPages, QuantizedPages]]:
    """Per-layer int8/int4 ``(k_pages, v_pages)`` pools of ``num_blocks`` blocks (include the scratch block)."""
    fmt = {8: "int8", 4: "int4"}[bits]
    return KVPoolLayout(num_layers, block_size, num_kv_heads, head_dim, fmt).allocate(num_blocks, device)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_pages: Any, v_pages: Any, slot_mapping: torch.Tensor, *,
             use_triton: bool | None = None) -> None:
    """Store new ``k, v [T, Hkv, D]`` at ``slot_mapping [T]``: quantized for
    :class:`QuantizedPages` / :class:`Fp8Pages`, copied for float pages. No host sync
    (CUDA-graph safe; fp8 pages calibrate their scales on their first write, eagerly).
    ``use_triton=None`` uses the Triton kernel wherever it can run; False forces the
    torch reference (the engine's torch backend)."""
    if use_triton is None:
        use_triton = triton_runs_on(k.device)
    if isinstance(k_pages, Fp8Pages):
        write = write_tokens_fp8 if use_triton else write_tokens_fp8_ref
        write(k, slot_mapping, k_pages)
        write(v, slot_mapping, v_pages)
    elif not isinstance(k_pages, QuantizedPages):
        hkv, d = k_pages.shape[2], k_pages.shape[3]
        k_pages.view(-1, hkv, d).index_copy_(0, slot_mapping, k.to(k_pages.dtype))
        v_pages.view(-1, hkv, d).index_copy_(0, slot_mapping, v.to(v_pages.dtype))
    elif use_triton:
        write_tokens_to_pages(k, slot_mapping, k_pages)
        write_tokens_to_pages(v, slot_mapping, v_pages)
    else:
        write_tokens_to_pages_ref(k, slot_mapping, k_pages)
        write_tokens_to_pages_ref(v, slot_mapping, v_pages)


class _StepContext(Protocol):
    """The fields of the engine's ``AttentionContext`` this module reads."""

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_q_len: int
    num_splits: int
    backend: str
    fresh_prefill: bool  # no sequence of the step has cached keys yet


def compressed_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pages: QuantizedPages | torch.Tensor,
    v_pages: QuantizedPages | torch.Tensor,
    ctx: _StepContext,
    softmax_scale: float,
    *,
    collector: BlockScoreCollector | None = None,
    layer_idx: int = 0,
    window_left: int | None = None,
    softcap: float | None = None,
    kernels: KernelSwitches | None = None,
) -> torch.Tensor:
    """One layer's attention step: write ``k, v`` into the pages, then attend over them.

    ``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` are the step's packed tokens; ``ctx`` is the
    engine's attention context. Quantized pages are always handled here. Float pages only
    need this on scoring steps (``collector`` given): the attention then also returns its
    log-sum-exps, and the block attention mass of each sequence's last queries is
    accumulated into the collector. ``window_left`` / ``softcap``: the layer's sliding
    window and logit soft-cap (:mod:`~stream_attention.kernels.score_mods`; scoring steps
    do not take them, the runner refuses eviction for such models). ``kernels``: the
    launch switches the kernels get (the engine's, read from the environment; None: the
    defaults of unset variables).
    """
    kernels = kernels or KernelSwitches()
    triton_ok = ctx.backend == "triton" and triton_runs_on(q.device)
    write_kv(k, v, k_pages, v_pages, ctx.slot_mapping, use_triton=triton_ok)
    want_lse = collector is not None
    if triton_ok and ctx.fresh_prefill and not want_lse and softcap is None:
        # Nothing cached yet: the step's own keys and values are all there is to attend
        # to, in 16 bits, so the dense varlen kernel runs on them (what the float-page
        # path does) instead of reading back the codes just written: exact where the
        # pages would add quantization error, and faster than the GPU's dequantizing
        # prefill kernel (H100, 1B Llama, 64 fresh 512-token prompts: 116 vs 131 ms).
        from ..kernels.attention_fwd import attention_forward

        out, _ = attention_forward(
            q, k, v, causal=True, softmax_scale=softmax_scale, cu_seqlens_q=ctx.cu_seqlens_q,
            cu_seqlens_k=ctx.cu_seqlens_q, max_seqlen_q=ctx.max_q_len, max_seqlen_k=ctx.max_q_len, store_lse=False,
            window=None if window_left is None else (window_left, 0), **kernels.dense(),
        )
        return out
    fast = triton_ok and (isinstance(k_pages, (QuantizedPages, Fp8Pages)) or k_pages.dtype == q.dtype)
    if isinstance(k_pages, Fp8Pages):
        if fast:
            launch = FP8_LAUNCH["decode" if ctx.max_q_len <= 1 else "prefill"]
            res = paged_attention_fp8(q, k_pages, v_pages, ctx.block_tables, ctx.seq_lens, ctx.cu_seqlens_q,
                                      max_q_len=ctx.max_q_len, softmax_scale=softmax_scale,
                                      num_splits=ctx.num_splits if ctx.max_q_len <= 1 else 1,
                                      return_lse=want_lse, launch=launch, **kernels.compressed())
            out, lse = res if want_lse else (res, None)
        else:
            out32, lse = paged_attention_fp8_ref(q, k_pages, v_pages, ctx.block_tables, ctx.seq_lens,
                                                 ctx.cu_seqlens_q, softmax_scale=softmax_scale)
            out = out32.to(q.dtype)
    elif fast:
        if ctx.max_q_len <= 1:
            quantized = isinstance(k_pages, QuantizedPages)
            bits, kv_heads = (k_pages.bits, k_pages.num_heads) if quantized else (16, k_pages.shape[2])
            programs = ctx.block_tables.shape[0] * kv_heads * ctx.num_splits
            launch = decode_launch(bits, programs, q.device)
        else:
            launch = DEFAULT_LAUNCH["prefill"]
        res = paged_attention_quantized(
            q, k_pages, v_pages, ctx.block_tables, ctx.seq_lens, ctx.cu_seqlens_q, max_q_len=ctx.max_q_len,
            softmax_scale=softmax_scale, num_splits=ctx.num_splits, return_lse=want_lse,
            launch=dict(zip(("BLOCK_N", "num_warps", "num_stages"), launch, strict=True)),
            window_left=window_left, softcap=softcap, **kernels.compressed(),
        )
        out, lse = res if want_lse else (res, None)
    else:
        out32, lse = paged_attention_ref(q, k_pages, v_pages, ctx.block_tables, ctx.seq_lens, ctx.cu_seqlens_q,
                                         softmax_scale=softmax_scale, dtype=torch.float32, window_left=window_left,
                                         softcap=softcap)
        out = out32.to(q.dtype)
    if collector is not None:
        collector.add(layer_idx, q, k_pages, ctx, lse, softmax_scale, use_triton=fast)
    return out


# --------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------


def pool_token_scores(mass: torch.Tensor, kernel: int, pooling: str = "max") -> torch.Tensor:
    """SnapKV's clustering step: each key's score ``mass [..., T]`` replaced by the max
    (or mean) over the ``kernel`` keys centred on it (stride 1, same length; the mean
    counts positions past either end as zeros, as ``avg_pool1d`` with padding does).

    A key next to a strongly attended one is kept with it: the information a model
    retrieves spans a few tokens (an identifier, a number), of which attention singles
    out one or two.
    """
    if kernel <= 1:
        return mass
    flat = mass.reshape(-1, 1, mass.shape[-1])
    if pooling == "max":
        out = torch.nn.functional.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        out = torch.nn.functional.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return out.view(mass.shape)


class BlockScoreCollector:
    """Attention mass per block of each sequence of one step, summed over layers.

    Only the last ``observation_window`` queries of each sequence contribute (SnapKV's
    observation window; a decode step has one query per sequence anyway). With
    ``pool_kernel`` (SnapKV) each KV head's per-key mass is pooled along the keys
    (:func:`pool_token_scores`) before a block sums its keys' scores.
    """

    def __init__(self, request_ids: list[str], block_size: int, observation_window: int = 32, *,
                 pool_kernel: int | None = None, pooling: str = "max", observed: set[str] | None = None) -> None:
        self.request_ids = request_ids
        self.observed = observed  # the sequences whose scores count (None: all)
        self.block_size = block_size
        self.observation_window = observation_window
        self.pool_kernel = pool_kernel
        self.pooling = pooling
        self.mass: torch.Tensor | None = None  # [B, max_blocks], fp32, on the device
        self.seq_lens: torch.Tensor | None = None
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def _observation_rows(self, ctx: _StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices of the observed queries and their cu_seqlens (computed once per step)."""
        if self._rows is None:
            cu = ctx.cu_seqlens_q.to(torch.int64)
            q_len = cu[1:] - cu[:-1]
            n_obs = q_len.clamp(max=self.observation_window)
            cu_obs = torch.zeros_like(cu)
            cu_obs[1:] = n_obs.cumsum(0)
            seq = torch.repeat_interleave(torch.arange(len(q_len), device=cu.device), n_obs)
            within = torch.arange(int(cu_obs[-1]), device=cu.device) - cu_obs[seq]
            rows = cu[seq + 1] - n_obs[seq] + within
            self._rows = (rows, cu_obs.to(torch.int32))
        return self._rows

    def add(self, layer_idx: int, q: torch.Tensor, k_pages: QuantizedPages | torch.Tensor, ctx: _StepContext,
            lse: torch.Tensor, softmax_scale: float, *, use_triton: bool | None = None) -> None:
        """Accumulate one layer's mass from the step's queries and the attention's ``lse``."""
        rows, cu_obs = self._observation_rows(ctx)
        q_obs, lse_obs = q[rows], lse[:, rows]
        max_kv = ctx.block_tables.shape[1] * self.block_size
        if use_triton is None:
            use_triton = triton_runs_on(q.device)
        if use_triton:
            token_mass = paged_token_attention_mass_fp8 if isinstance(k_pages, Fp8Pages) else \
                paged_token_attention_mass
            mass = token_mass(q_obs, k_pages, ctx.block_tables, ctx.seq_lens, lse_obs, cu_obs,
                              softmax_scale=softmax_scale, max_kv_len=max_kv)
        else:
            tables = ctx.block_tables
            if isinstance(k_pages, Fp8Pages):  # the reference reads float pages: the step's blocks, dequantized
                k_pages = dequantize_fp8_pages(k_pages, tables.flatten(), q.dtype)
                tables = torch.arange(tables.numel(), dtype=torch.int32, device=q.device).view(tables.shape)
            mass = paged_token_attention_mass_ref(q_obs, k_pages, tables, ctx.seq_lens, cu_obs,
                                                  softmax_scale=softmax_scale).float()
            mass = torch.nn.functional.pad(mass, (0, max_kv - mass.shape[-1]))
        if self.pool_kernel:
            mass = pool_token_scores(mass, self.pool_kernel, self.pooling)
        per_block = mass.sum(1).view(mass.shape[0], -1, self.block_size).sum(-1)
        self.mass = per_block if self.mass is None else self.mass + per_block
        self.seq_lens = ctx.seq_lens

    def per_sequence(self) -> dict[str, np.ndarray]:
        """``request_id -> mass of each of its blocks`` (host copies; one transfer for the step)."""
        if self.mass is None:
            return {}
        host = self.mass.double().cpu().numpy()
        lens = self.seq_lens.cpu().tolist()
        return {rid: host[i, :math.ceil(lens[i] / self.block_size)] for i, rid in enumerate(self.request_ids)
                if self.observed is None or rid in self.observed}


@dataclass
class _BlockScores:
    total: np.ndarray
    seen: np.ndarray

    def resize(self, n: int) -> None:
        if n > len(self.total):
            self.total = np.concatenate([self.total, np.zeros(n - len(self.total))])
            self.seen = np.concatenate([self.seen, np.zeros(n - len(self.seen))])

    def drop(self, indices: list[int]) -> None:
        keep = np.ones(len(self.total), dtype=bool)
        keep[[i for i in indices if i < len(keep)]] = False
        self.total, self.seen = self.total[keep], self.seen[keep]

    def mean(self, n: int) -> np.ndarray:
        """Average mass per observation; never-observed blocks are +inf (kept until seen)."""
        self.resize(n)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.seen[:n] > 0, self.total[:n] / np.maximum(self.seen[:n], 1), np.inf)


# --------------------------------------------------------------------------------------
# Eviction policies
# --------------------------------------------------------------------------------------


class EvictionPolicy:
    """Which full blocks of a sequence to release when it is over its budget."""

    name = "none"

    def __init__(self, *, block_size: int, sink_tokens: int = 4, window_tokens: int = 256,
                 budget_tokens: int | None = None, ratio: float | None = None) -> None:
        self.block_size = block_size
        self.sink_tokens = sink_tokens
        self.window_tokens = window_tokens
        self.budget_tokens = budget_tokens
        self.ratio = ratio

    def budget(self, num_tokens: int) -> int:
        """Cache slots a sequence of ``num_tokens`` computed tokens may keep."""
        floor = self.sink_tokens + self.window_tokens + self.block_size
        if self.budget_tokens is not None:
            return max(self.budget_tokens, floor)
        if self.ratio is not None:
            return max(math.ceil(num_tokens / self.ratio), floor)
        return num_tokens

    def candidates(self, num_slots: int) -> list[int]:
        """Full blocks outside the sink blocks and the recent window, oldest first."""
        bs = self.block_size
        first = math.ceil(self.sink_tokens / bs)
        # A block is evictable only if all of it is older than the window.
        last = (num_slots - self.window_tokens) // bs
        return list(range(first, min(last, num_slots // bs)))

    def select(self, num_tokens: int, num_slots: int, scores: np.ndarray | None = None) -> list[int]:
        """Block indices (into the compacted table) to drop, so ``num_slots`` fits the budget.

        The blocks outside :meth:`candidates` (sinks, the window, a partial last block)
        are kept; of the candidates, the lowest-ranked go (:meth:`_rank`), through the
        selection the dense compressors use (:func:`~stream_attention.utils.kv_compression.keep_top_k`).
        """
        excess = num_slots - self.budget(num_tokens)
        if excess <= 0:
            return []
        need = math.ceil(excess / self.block_size)
        bs = self.block_size
        n_blocks = math.ceil(num_slots / bs)
        candidates = self.candidates(num_slots)
        sink = min(math.ceil(self.sink_tokens / bs), n_blocks)
        recent = n_blocks - (candidates[-1] + 1 if candidates else sink)
        keep = max(n_blocks - need, n_blocks - len(candidates))
        kept = keep_top_k(torch.as_tensor(self._rank(n_blocks, scores), dtype=torch.float64), keep,
                          sink=sink, recent=recent)
        return sorted(set(range(n_blocks)) - set(kept.tolist()))

    def _rank(self, n_blocks: int, scores: np.ndarray | None) -> np.ndarray:
        """A score per block, higher = kept longer: recency (the oldest go first)."""
        return np.arange(n_blocks, dtype=np.float64)


class StreamingLLMPolicy(EvictionPolicy):
    """StreamingLLM (Xiao et al. 2023): keep the attention sinks and a recent window; drop the oldest."""

    name = "streaming"


class HeavyHitterPolicy(EvictionPolicy):
    """H2O / SnapKV at block granularity: drop the blocks that received the least attention."""

    name = "heavy-hitter"

    def _rank(self, n_blocks: int, scores: np.ndarray | None) -> np.ndarray:
        """The blocks' attention mass (among equal scores the older block goes first)."""
        if scores is None:
            return super()._rank(n_blocks, scores)
        return np.asarray(scores, dtype=np.float64)[:n_blocks]


class SnapKVPolicy(HeavyHitterPolicy):
    """SnapKV (Li et al. 2024) at block granularity: once a prompt is complete, drop the
    blocks whose keys the prompt's last queries attended least, scores pooled along the
    keys; blocks written later (never scored) go oldest first."""

    name = "snapkv"


# --------------------------------------------------------------------------------------
# Manager
# --------------------------------------------------------------------------------------


class KVCompressionManager:
    """Policy state, eviction and statistics of one engine's compressed KV cache."""

    def __init__(self, config: KVCompressionConfig, *, num_layers: int, num_kv_heads: int, head_dim: int,
                 block_size: int, float_dtype: torch.dtype = torch.bfloat16) -> None:
        self.config = config.validate()
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.float_dtype = float_dtype
        self.bits = config.bits
        self.page_format = config.page_format
        self.layout = KVPoolLayout(num_layers, block_size, num_kv_heads, head_dim, self.page_format, float_dtype)
        kwargs = dict(block_size=block_size, sink_tokens=config.sink_tokens, window_tokens=config.window_tokens,
                      budget_tokens=config.budget_tokens, ratio=config.ratio)
        if config.policy == "streaming":
            self.policy: EvictionPolicy | None = StreamingLLMPolicy(**kwargs)
        elif config.policy == "snapkv":
            self.policy = SnapKVPolicy(**kwargs)
        elif config.scores:
            self.policy = HeavyHitterPolicy(**kwargs)
        else:
            self.policy = None
        self._scores: dict[str, _BlockScores] = {}
        self._decode_steps = 0
        self.blocks_evicted = 0
        self.blocks_freed = 0
        self.tokens_evicted = 0

    # ------------------------------------------------------------ sizing
    @property
    def quantized(self) -> bool:
        """Whether pages are stored compressed (fp8 / int8 / int4)."""
        return self.page_format is not None

    @property
    def format_name(self) -> str:
        """``fp8``, ``int8``, ``int4``, or the float pages' dtype (``bfloat16``, ...)."""
        return self.page_format or str(self.float_dtype).removeprefix("torch.")

    def block_bytes(self) -> int:
        """Bytes per block over all layers in this cache's page format."""
        return block_bytes(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.bits or 16,
                           self.float_dtype, page_format=self.page_format)

    def dense_bytes_per_token(self) -> int:
        """What one token costs in an uncompressed cache of ``float_dtype`` (all layers)."""
        return block_bytes(self.num_layers, 1, self.num_kv_heads, self.head_dim, 16, self.float_dtype)

    def pool_bytes(self, num_blocks: int) -> int:
        """Bytes :meth:`allocate` takes for ``num_blocks`` blocks (scratch included if counted in)."""
        return self.layout.pool_bytes(num_blocks)

    def blocks_for_budget(self, budget: int, device: torch.device | str) -> int:
        """Usable blocks whose pool, plus the scratch block, fits ``budget`` allocated bytes."""
        return self.layout.blocks_for_budget(budget, device)

    def allocate(self, num_blocks: int, device: torch.device | str) -> list[tuple[Any, Any]]:
        """Per-layer ``(k_pages, v_pages)`` pools of ``num_blocks`` blocks (including any
        scratch block) in this cache's format, all in one allocation."""
        return self.layout.allocate(num_blocks, device)

    @staticmethod
    def reset_calibration(kv_caches: Iterable[tuple[Any, Any]]) -> None:
        """Make fp8 pages calibrate their scales again on their next write (call after
        warm-up steps wrote dummy tokens); other formats have nothing to reset."""
        for k_pages, v_pages in kv_caches:
            for pages in (k_pages, v_pages):
                if isinstance(pages, Fp8Pages):
                    pages.reset_scales()

    # ------------------------------------------------------------ scoring
    def start_step(self, scheduled: Iterable[Any]) -> BlockScoreCollector | None:
        """A collector when this step should measure block scores (it then runs eagerly).

        ``scheduled`` are the step's ``ScheduledSeq`` (``.seq.request_id``,
        ``.num_new_tokens``, ``.samples``). Heavy-hitter: prefill steps always score,
        decode-only steps every ``score_interval``-th time. SnapKV: the steps that complete
        a prompt (its last chunk holds the observation window).
        """
        if self.policy is None or not self.config.scores:
            return None
        scheduled = list(scheduled)
        if self.config.policy == "snapkv":
            completing = {s.seq.request_id for s in scheduled if s.samples and (
                s.num_new_tokens > 1 or s.seq.num_computed_tokens < s.seq.num_prompt_tokens)}
            if not completing:
                return None
            return BlockScoreCollector([s.seq.request_id for s in scheduled], self.block_size,
                                       self.config.observation_window, pool_kernel=self.config.pool_kernel,
                                       pooling=self.config.pooling, observed=completing)
        prefill = any(s.num_new_tokens > 1 for s in scheduled)
        if not prefill:
            self._decode_steps += 1
            if self._decode_steps % self.config.score_interval:
                return None
        return BlockScoreCollector([s.seq.request_id for s in scheduled], self.block_size,
                                   self.config.observation_window)

    # ------------------------------------------------------------ eviction
    def after_step(self, running: Iterable[Any], block_manager: Any,
                   collector: BlockScoreCollector | None = None) -> int:
        """Merge the step's scores, then evict over-budget sequences. Returns blocks freed to the pool.

        Call after the scheduler committed the step (``num_computed_tokens`` advanced).
        """
        snapkv = self.config.policy == "snapkv"
        if collector is not None:
            for rid, mass in collector.per_sequence().items():
                if snapkv:  # one observation per prompt (a recomputed one replaces it)
                    self._scores.pop(rid, None)
                st = self._scores.setdefault(rid, _BlockScores(np.zeros(0), np.zeros(0)))
                n = len(mass)
                st.resize(n)
                st.total[:n] += mass
                st.seen[:n] += 1
        if self.policy is None:
            return 0
        freed = 0
        for seq in running:
            if snapkv and seq.num_computed_tokens < seq.num_prompt_tokens:
                continue  # SnapKV compresses a prompt once it is complete
            slots = seq.num_kv_slots
            st = self._scores.get(seq.request_id)
            scores = st.mean(math.ceil(slots / self.block_size)) if st is not None else None
            drop = self.policy.select(seq.num_computed_tokens, slots, scores)
            if not drop:
                continue
            freed += block_manager.drop_blocks(seq, drop)
            if st is not None:
                st.drop(drop)
            self.blocks_evicted += len(drop)
            self.tokens_evicted += len(drop) * self.block_size
        self.blocks_freed += freed
        return freed

    def forget(self, request_id: str) -> None:
        """Drop a finished, aborted or preempted sequence's scores."""
        self._scores.pop(request_id, None)

    # ------------------------------------------------------------ stats
    def stats(self, running: Iterable[Any], block_manager: Any) -> dict[str, Any]:
        """``kv_compression_ratio`` (dense bytes of the running sequences' tokens over the
        bytes of the blocks in use), ``kv_bytes_saved``, ``kv_blocks_evicted_total``, and more."""
        tokens = sum(s.num_computed_tokens for s in running)
        dense = tokens * self.dense_bytes_per_token()
        stored = block_manager.num_used_blocks * self.block_bytes()
        return {
            "kv_cache_format": self.format_name,
            "kv_compression_policy": self.config.policy,
            "kv_compression_ratio": dense / stored if stored else 1.0,
            "kv_bytes_saved": max(dense - stored, 0),
            "kv_blocks_evicted_total": self.blocks_evicted,
            "kv_blocks_freed_total": self.blocks_freed,
            "kv_tokens_evicted_total": self.tokens_evicted,
            "kv_block_bytes": self.block_bytes(),
            "kv_dense_block_bytes": self.dense_bytes_per_token() * self.block_size,
        }
