"""The engine's attention hook for transformers models.

The model runner registers :func:`paged_attention_forward` with
``transformers.AttentionInterface`` under :data:`ATTN_NAME` and switches the model to it.
Every attention layer then hands its freshly projected (and RoPE-rotated) ``q, k, v`` to
this function, which stores ``k, v`` into the layer's pages and attends over the pages.
What it needs besides the tensors (slot mapping, block tables, lengths) is the step's
:class:`AttentionContext`, installed by the runner around the forward call; the HF
model code never sees any of it, and builds no attention mask because the name is not
one transformers knows how to build masks for.

Outside an engine step (no context installed) the function behaves as transformers'
SDPA attention, so a model lent to the engine still works with ``model.generate``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..kernels.paged_attention import paged_attention, paged_attention_torch, write_kv_pages

if TYPE_CHECKING:
    from .kv_compression import BlockScoreCollector

ATTN_NAME = "stream_attention_paged"


@dataclass
class AttentionContext:
    """Per-step metadata shared by all layers of one forward pass.

    ``kv_caches[layer] = (k_pages, v_pages)``, each ``[num_blocks, block_size, Hkv, D]`` (float
    tensors, or :class:`~stream_attention.kernels.kv_quant.QuantizedPages` /
    :class:`~stream_attention.kernels.kv_fp8.Fp8Pages` of that geometry).
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
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention callable: ``[1, H, T, D]`` in, ``[1, T, Hq, D]`` out."""
    ctx = current_context()
    if ctx is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise NotImplementedError("the paged attention kernel has no logit soft-capping or sliding window")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # HF hands over [batch=1, heads, tokens, dim] views of [1, tokens, heads, dim] data.
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    k_pages, v_pages = ctx.kv_caches[module.layer_idx]
    if not isinstance(k_pages, torch.Tensor) or ctx.kv_scores is not None:  # compressed pages, or scoring
        from .kv_compression import compressed_attention_step

        out = compressed_attention_step(q, k, v, k_pages, v_pages, ctx, scale, collector=ctx.kv_scores,
                                        layer_idx=module.layer_idx)
        return out.unsqueeze(0), None
    if not kwargs.get("kv_written", False):  # the engine's fused forward stores them in its RoPE kernel
        write_kv_pages(k, v, k_pages, v_pages, ctx.slot_mapping)
    if ctx.backend == "triton":
        if ctx.fresh_prefill:
            from ..kernels.attention_fwd import attention_forward

            out, _ = attention_forward(
                q, k, v, causal=True, softmax_scale=scale, cu_seqlens_q=ctx.cu_seqlens_q,
                cu_seqlens_k=ctx.cu_seqlens_q, max_seqlen_q=ctx.max_q_len, max_seqlen_k=ctx.max_q_len,
                store_lse=False,
            )
        else:
            out = paged_attention(
                q, k_pages, v_pages, ctx.block_tables, ctx.seq_lens, ctx.cu_seqlens_q,
                max_q_len=ctx.max_q_len, softmax_scale=scale, num_splits=ctx.num_splits,
            )
    else:
        out = paged_attention_torch(
            q, k_pages, v_pages, ctx.block_tables, ctx.seq_lens, ctx.cu_seqlens_q, softmax_scale=scale,
            seq_lens_cpu=ctx.seq_lens_cpu, cu_seqlens_q_cpu=ctx.cu_seqlens_q_cpu,
        )
    return out.unsqueeze(0), None


def register() -> str:
    """Register the hook with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, paged_attention_forward)
    return ATTN_NAME
