"""The engine's attention hook for transformers models.

The model runner registers :func:`paged_attention_forward` with
``transformers.AttentionInterface`` under :data:`ATTN_NAME` and switches the model to it.
Every attention layer then hands its freshly projected (and RoPE-rotated) ``q, k, v`` to
this function, which stores ``k, v`` into the layer's pages and attends over the pages.
What it needs besides the tensors (slot mapping, block tables, lengths) is the step's
:class:`AttentionContext`, installed by the runner around the forward call; the HF
model code never sees any of it, and builds no attention mask because the name is not
one transformers knows how to build masks for.

Per-layer attention variants (sliding window, logit soft-cap) come from the context's
``layers``, read from the config by :mod:`.attention_spec` the way transformers builds
its masks: some modeling code does not pass ``sliding_window`` to the attention function
(Qwen2-MoE) although its masks are windowed, so the keyword arguments are only the
fallback for contexts without ``layers``. ``scaling`` carries Gemma's
``query_pre_attn_scalar``. :mod:`.attention_spec` refuses at load time the variants the
kernels lack.

Outside an engine step (no context installed) the function behaves as transformers'
SDPA attention, so a model lent to the engine still works with ``model.generate``.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..core.kernel_switches import KernelSwitches
from ..kernels.paged_attention import paged_attention, paged_attention_torch, write_kv_pages
from .attention_spec import LayerAttention, layer_attention

if TYPE_CHECKING:
    from .kv_compression import BlockScoreCollector

ATTN_NAME = "stream_attention_paged"


@dataclass
class AttentionContext:
    """Per-step metadata shared by all layers of one forward pass.

    ``kv_caches[layer] = (k_pages, v_pages)``, each ``[num_blocks, block_size, Hkv, D]`` (float
    tensors, or :class:`~stream_attention.kernels.kv_pages.QuantizedPages` /
    :class:`~stream_attention.kernels.kv_pages.Fp8Pages` of that geometry).
    ``slot_mapping`` (int64 ``[T]``) is where each new token's K/V goes; ``seq_lens`` (int32
    ``[B]``) counts each sequence's keys including this step's tokens; ``cu_seqlens_q``
    (int32 ``[B+1]``) delimits the packed queries.
    """

    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_q_len: int
    max_kv_len: int
    backend: str  # "triton" or "torch"
    num_splits: int = 1
    # Every sequence starts from an empty cache this step: attention needs only the new
    # keys, so the dense varlen kernel runs on them directly.
    fresh_prefill: bool = False
    seq_lens_cpu: list[int] | None = None
    cu_seqlens_q_cpu: list[int] | None = None
    # Set on KV-compression scoring steps: every layer adds its block attention mass.
    kv_scores: BlockScoreCollector | None = None
    # Each layer's sliding window and soft-cap (by ``layer_idx``).
    layers: list[LayerAttention] | None = None
    # The kernels' launch switches (the runner reads them from the environment once).
    kernels: KernelSwitches = KernelSwitches()
    # Hybrid KV allocator (layer groups, see attention_spec.KVGroups): per layer, the
    # context of its group (this one for full-attention layers; for windowed layers one
    # with the windowed table's slot mapping, block tables and lengths). None: every
    # layer reads this context.
    groups: list[AttentionContext] | None = None


_local = threading.local()


def current_context() -> AttentionContext | None:
    return getattr(_local, "ctx", None)


@contextlib.contextmanager
def attention_context(ctx: AttentionContext) -> Iterator[AttentionContext]:
    """Install ``ctx`` for forward passes run by this thread."""
    prev = current_context()
    _local.ctx = ctx
    try:
        yield ctx
    finally:
        _local.ctx = prev


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention callable: ``[1, H, T, D]`` in, ``[1, T, Hq, D]`` out.

    ``sliding_window``: each query sees that many keys, itself included (None: all
    earlier keys); ``softcap``: logit soft-capping before the softmax. Inside engine steps
    the context's ``layers`` override both (see the module doc).
    """
    ctx = current_context()
    if ctx is None:
        return _eager_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                softcap=softcap, **kwargs)
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux) are not implemented by the paged kernels")
    if ctx.groups is not None:
        ctx = ctx.groups[module.layer_idx]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if ctx.layers is not None:
        spec = ctx.layers[module.layer_idx]
        sliding_window, softcap = spec.sliding_window, spec.softcap
    window_left = sliding_window - 1 if sliding_window else None
    softcap = softcap or None
    # HF hands over [batch=1, heads, tokens, dim] views of [1, tokens, heads, dim] data.
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    k_pages, v_pages = ctx.kv_caches[module.layer_idx]
    if not isinstance(k_pages, torch.Tensor) or ctx.kv_scores is not None:  # compressed pages, or scoring
        from .kv_compression import compressed_attention_step

        out = compressed_attention_step(q, k, v, k_pages, v_pages, ctx, scale, collector=ctx.kv_scores,
                                        layer_idx=module.layer_idx, window_left=window_left, softcap=softcap,
                                        kernels=ctx.kernels)
        return out.unsqueeze(0), None
    if not kwargs.get("kv_written", False):  # the engine's fused forward stores them in its RoPE kernel
        write_kv_pages(k, v, k_pages, v_pages, ctx.slot_mapping)
    if ctx.backend == "triton":
        # The dense varlen kernel has windows but no soft-cap: capped fresh prefills read
        # the just-written pages instead.
        if ctx.fresh_prefill and softcap is None:
            from ..kernels.attention_fwd import attention_forward

            out, _ = attention_forward(
                q, k, v, causal=True, softmax_scale=scale, cu_seqlens_q=ctx.cu_seqlens_q,
                cu_seqlens_k=ctx.cu_seqlens_q, max_seqlen_q=ctx.max_q_len, max_seqlen_k=ctx.max_q_len,
                store_lse=False, window=None if window_left is None else (window_left, 0), **ctx.kernels.dense(),
            )
        else:
            out = paged_attention(
                q, k_pages, v_pages, ctx.block_tables, ctx.seq_lens, ctx.cu_seqlens_q,
                max_q_len=ctx.max_q_len, softmax_scale=scale, num_splits=ctx.num_splits,
                window_left=window_left, softcap=softcap, **ctx.kernels.paged(),
            )
    else:
        out = paged_attention_torch(
            q, k_pages, v_pages, ctx.block_tables, ctx.seq_lens, ctx.cu_seqlens_q, softmax_scale=scale,
            seq_lens_cpu=ctx.seq_lens_cpu, cu_seqlens_q_cpu=ctx.cu_seqlens_q_cpu,
            window_left=window_left, softcap=softcap,
        )
    return out.unsqueeze(0), None


def _eager_attention(module, query, key, value, attention_mask, *, dropout, scaling, softcap, **kwargs):
    """Outside engine steps: transformers' SDPA attention, or for soft-capped layers (SDPA
    has no soft-cap) the eager attention of the layer's own modeling module.

    transformers builds no masks for this attention name, so the causal mask, with the
    layer's sliding window from its config, is built here (bottom-right aligned, as a
    cache-continued ``generate`` without padding needs).
    """
    if attention_mask is None and (softcap is not None or query.shape[-2] > 1):
        layers = layer_attention(module.config)
        window = layers[module.layer_idx].sliding_window if module.layer_idx < len(layers) else None
        if softcap is not None or window is not None:
            q_len, k_len = query.shape[-2], key.shape[-2]
            pos = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
            cols = torch.arange(k_len, device=query.device)[None, :]
            keep = ((cols <= pos) & (cols > pos - (window if window is not None else k_len + 1)))[None, None]
            # SDPA takes a boolean keep-mask; the eager functions add the mask to the scores.
            attention_mask = keep if softcap is None else torch.zeros(
                keep.shape, dtype=query.dtype, device=query.device).masked_fill(~keep, float("-inf"))
    if softcap is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"{type(module).__name__}: soft-capped attention outside engine steps needs the "
                                  "model's eager_attention_forward")
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, softcap=softcap,
                 **kwargs)


def register() -> str:
    """Register the hook with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, paged_attention_forward)
    return ATTN_NAME
