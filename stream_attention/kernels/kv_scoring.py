"""Eviction scores over KV pages of any format: the attention probability each cached
token received (H2O heavy hitters, SnapKV's observation window).

The scores are computed with the attention's own log-sum-exps (:mod:`.kv_attention`
returns them), so they are exactly the probabilities attention used; keys are read with
the same tile code as attention, so every page format (float, fp8, int8, int4, KIVI
per-channel keys) is scored by one kernel.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from .attention_fwd import dot_precision_for
from .kv_attention import load_query_rows, tile_pages, tile_scores
from .kv_pages import Fp8Pages, Pages, QuantizedPages, gather_sequence, page_geometry, page_kernel_args
from .runtime import interpreter_enabled

__all__ = [
    "paged_token_attention_mass",
    "paged_token_attention_mass_fp8",
    "paged_token_attention_mass_ref",
]

_LOG2E = 1.0 / math.log(2.0)
# Triton's interpreter runs programs one by one in numpy: small tiles keep CPU tests quick.
_INTERPRETER_BLOCK_N = 16


@triton.jit
def _token_mass_kernel(
    Q, Lse, Mass,
    K, KS, BlockTables, SeqLens, CuSeqlensQ,
    stride_qt, stride_qh, stride_qd,
    stride_lh, stride_lt,
    stride_mb, stride_mh, stride_mt,
    stride_kb, stride_kt, stride_kh, stride_kd,
    ks0, ks1, ks2, ks3,
    stride_bt,
    num_kv_heads, group_size, qk_scale,
    PART: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, KV_BITS: tl.constexpr, FP8: tl.constexpr, K_PER_CHANNEL: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // num_kv_heads
    kv_head = pid_bh % num_kv_heads
    q_start = tl.load(CuSeqlensQ + b)
    q_len = tl.load(CuSeqlensQ + b + 1) - q_start
    ctx = tl.load(SeqLens + b)
    start = pid_n * BLOCK_N
    if start >= ctx:
        return
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < ctx
    bt_ptr = BlockTables + b.to(tl.int64) * stride_bt
    if FP8:  # the key pages' per-head scale joins the softmax scale
        qk_scale = qk_scale * tl.load(KS + kv_head)
    page, row = tile_pages(bt_ptr, start, cols, col_ok, BLOCK_SIZE, K_PER_CHANNEL, True)
    diag = ctx - q_len
    toks = BLOCK_M // group_size
    offs_r = tl.arange(0, BLOCK_M)
    mass = tl.zeros([BLOCK_N], dtype=tl.float32)
    for tok0 in range(0, q_len, toks):
        row_tok = tok0 + offs_r // group_size
        row_head = kv_head * group_size + offs_r % group_size
        row_ok = (offs_r < toks * group_size) & (row_tok < q_len)
        q_a, q_b, q_sum = load_query_rows(Q, q_start, row_tok, row_head, row_ok, stride_qt, stride_qh,
                                           stride_qd, PART, BLOCK_P, KV_BITS)
        qk = tile_scores(
            q_a, q_b, q_sum, K, KS, page, row, col_ok, kv_head,
            stride_kb, stride_kt, stride_kh, stride_kd, ks0, ks1, ks2, ks3,
            PART, BLOCK_P, KV_BITS, FP8, K_PER_CHANNEL, True, DOT_PRECISION,
        ) * qk_scale
        lse = tl.load(Lse + row_head * stride_lh + (q_start + row_tok).to(tl.int64) * stride_lt,
                      mask=row_ok, other=float("inf"))
        visible = row_ok[:, None] & col_ok[None, :] & (lse != float("-inf"))[:, None]
        if CAUSAL:
            visible = visible & (cols[None, :] <= row_tok[:, None] + diag)
        p = tl.where(visible, tl.math.exp2(qk - (lse * 1.4426950408889634)[:, None]), 0.0)
        mass += tl.sum(p, 0)
    tl.store(Mass + b.to(tl.int64) * stride_mb + kv_head * stride_mh + cols * stride_mt, mass, mask=col_ok)



def paged_token_attention_mass(
    q: torch.Tensor,
    k_pages: Pages,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    *,
    softmax_scale: float | None = None,
    max_kv_len: int | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Attention probability each cached token received, summed over the given queries.

    ``q``/``cu_seqlens_q``/``causal`` as in :func:`.kv_attention.paged_attention_quantized`
    (key pages of any format), and ``lse``
    the ``[Hq, total_q]`` log-sum-exps that call returned for the same queries (so the
    scores are normalised exactly as attention normalised them). Returns fp32
    ``[B, Hkv, max_kv_len]``: for each KV head, the probability mass summed over its
    query heads and query tokens; zero past each sequence's length. This is the
    statistic heavy-hitter eviction accumulates (H2O), or sums over an observation window
    (SnapKV). It reads K once, about a quarter of a decode step's traffic, so an engine
    calls it every few steps rather than every step.
    """
    _, block_size, hkv, head_dim = page_geometry(k_pages)
    fp8 = isinstance(k_pages, Fp8Pages)
    if isinstance(k_pages, QuantizedPages):
        bits, per_channel = k_pages.bits, k_pages.per_channel
    else:
        bits, per_channel = (8 if fp8 else 16), False
    decode = cu_seqlens_q is None
    batch = q.shape[0] if decode else cu_seqlens_q.numel() - 1
    hq = q.shape[1]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    device = q.device
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device) if decode else cu_seqlens_q.to(torch.int32)
    max_ctx = int(max_kv_len if max_kv_len is not None else (seq_lens.max().item() if batch else 0))
    mass = torch.zeros((batch, hkv, max_ctx), dtype=torch.float32, device=device)
    if batch == 0 or max_ctx == 0:
        return mass
    group = hq // hkv
    part = head_dim // 2 if bits == 4 else head_dim
    interp = interpreter_enabled()
    block_n = block_size if per_channel else (_INTERPRETER_BLOCK_N if interp else 64)
    block_m = max(16, triton.next_power_of_2(group))
    k_data, k_scales, ksd, kss = page_kernel_args(k_pages)
    grid = (batch * hkv, triton.cdiv(max_ctx, block_n))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _token_mass_kernel[grid](
            q, lse, mass, k_data, k_scales, block_tables, seq_lens, cu_q,
            *q.stride(), *lse.stride(), *mass.stride(), *ksd, *kss, block_tables.stride(0),
            hkv, group, softmax_scale * _LOG2E,
            PART=part, BLOCK_P=max(16, triton.next_power_of_2(part)), BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_SIZE=block_size, KV_BITS=bits, FP8=fp8, K_PER_CHANNEL=per_channel, CAUSAL=causal,
            DOT_PRECISION=dot_precision_for(q.dtype),
        )
    return mass


def paged_token_attention_mass_fp8(
    q: torch.Tensor,
    k_pages: Fp8Pages,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    *,
    softmax_scale: float | None = None,
    max_kv_len: int | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """:func:`paged_token_attention_mass` for key pages checked to be :class:`Fp8Pages`."""
    if not isinstance(k_pages, Fp8Pages):
        raise ValueError("k_pages must be Fp8Pages")
    return paged_token_attention_mass(q, k_pages, block_tables, seq_lens, lse, cu_seqlens_q,
                                      softmax_scale=softmax_scale, max_kv_len=max_kv_len, causal=causal)


def paged_token_attention_mass_ref(
    q: torch.Tensor,
    k_pages: Pages,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    *,
    softmax_scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Reference for :func:`paged_token_attention_mass` (normalising with its own exact LSE)."""
    decode = cu_seqlens_q is None
    batch = q.shape[0] if decode else cu_seqlens_q.numel() - 1
    cu = list(range(batch + 1)) if decode else cu_seqlens_q.tolist()
    hkv = page_geometry(k_pages)[2]
    d = q.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    max_ctx = int(seq_lens.max()) if batch else 0
    mass = torch.zeros((batch, hkv, max_ctx), dtype=torch.float64, device=q.device)
    for b in range(batch):
        n_q, ctx = cu[b + 1] - cu[b], int(seq_lens[b])
        if n_q == 0 or ctx == 0:
            continue
        k = gather_sequence(k_pages, block_tables[b], ctx).double()
        group = q.shape[1] // hkv
        qb = q[cu[b]:cu[b + 1]].double().view(n_q, hkv, group, d)
        s = torch.einsum("qhgd,khd->hgqk", qb, k) * scale
        if causal:
            rows = torch.arange(n_q, device=q.device)[:, None] + (ctx - n_q)
            s = s.masked_fill(torch.arange(ctx, device=q.device)[None, :] > rows, float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, dim=-1))
        mass[b, :, :ctx] = p.sum(dim=(1, 2))
    return mass
