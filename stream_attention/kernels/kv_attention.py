"""Attention over KV pages of any format (float, fp8, int8, int4), read in place.

Same calling convention as :func:`stream_attention.kernels.paged_attention.paged_attention`
(packed queries, int32 block tables, bottom-right causal; see :mod:`.kv_pages` for the
page layouts). The attention kernel never materialises a dequantized page: scales fold
into the dot products,

    q . (c * s + z)          = s * (q . c) + z * sum(q)           int8/int4 per-token keys
    q . (c * s_d + z_d)      = (q * s_d) . c + q . z_d            per-channel keys (one page per tile)
    sum_j p_j (c_j s_j + z_j) = (p * s) @ c + (p . z)             int8/int4 per-token values
    q . (e * s_h), p @ (e * s_h)                                  fp8: one scale per KV head, folded
                                                                  into the softmax scale / the output

so the inner loop multiplies raw codes on the tensor cores and applies scales to the
small score/probability tiles. Decode is memory-bound; fp8 and int8 pages move about half
the bytes of bf16 pages and int4 about a quarter. Long contexts are split across programs
(flash-decoding) and merged by :mod:`.split_combine`, the same merge the float-page
kernels use.

The page format is a compile-time choice of one kernel family, not a copy per format. Two
kernels implement it. With 16-bit queries and per-token or per-head scales (the engine's
case), :func:`_paged_attn_f16_kernel` turns codes into fp16 in registers (int8/int4 with
bit tricks, ``0x6400 | c`` is ``1024 + c``; e4m3 with Hopper's ``cvt.rn.f16x2.e4m3x2``)
instead of integer-to-float conversions, which made the generic kernel instruction-bound;
see "Fast path" below for the method and its precision argument. Everything else (fp32
queries, per-channel KIVI keys, float pages, prefill on GPUs) runs the generic
:func:`_paged_attn_kernel`. :func:`paged_attention_quantized`'s ``fast_kernel=False``
forces the generic kernel, ``inline_asm=False`` the fast kernel's portable conversions (no
inline PTX); ``STREAM_ATTENTION_KV_FAST`` / ``STREAM_ATTENTION_KV_ASM`` set them for the
engine.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .attention_fwd import dot_precision_for
from .kv_pages import (
    Fp8Pages,
    Pages,
    gather_sequence,
    page_format,
    page_geometry,
    page_kernel_args,
)
from .runtime import interpreter_enabled
from .score_mods import soft_cap, softcap_arg, window_left_arg
from .split_combine import combine_splits, partial_buffers

__all__ = [
    "DEFAULT_LAUNCH",
    "FAST_DECODE_MAXNREG",
    "decode_launch",
    "choose_num_splits",
    "defer_row_sums",
    "paged_attention_quantized",
    "paged_attention_fp8",
    "paged_attention_ref",
    "paged_attention_fp8_ref",
]

_LOG2E = 1.0 / math.log(2.0)


# --------------------------------------------------------------------------------------
# Triton: paged attention over quantized (or plain) pages
# --------------------------------------------------------------------------------------


@triton.jit
def tile_pages(bt_ptr, start, cols, col_ok, BLOCK_SIZE: tl.constexpr, ONE_PAGE: tl.constexpr,
                MASKED: tl.constexpr):
    """Page index and row of each key column of a tile (``ONE_PAGE``: the tile is one page)."""
    if ONE_PAGE:
        page = tl.load(bt_ptr + start // BLOCK_SIZE).to(tl.int64)
        row = cols - start
    else:
        if MASKED:
            page = tl.load(bt_ptr + cols // BLOCK_SIZE, mask=col_ok, other=0).to(tl.int64)
        else:
            page = tl.load(bt_ptr + cols // BLOCK_SIZE).to(tl.int64)
        row = cols % BLOCK_SIZE
    return page, row


@triton.jit
def _e4m3_f16(c):
    """Exact fp16 values of e4m3 bytes ``c`` (an integer tensor) with integer ops only.

    e4m3's sign, exponent and mantissa moved into fp16's fields give the value over 2^8
    (exponent biases 7 and 15), subnormals included; the product by 2^8 is exact.
    """
    c = c.to(tl.int32)
    bits = ((c & 0x80) << 8) | ((c & 0x7F) << 7)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True) * 256.0


@triton.jit
def tile_scores(
    q_a, q_b, q_sum, K, KS, page, row, col_ok, kv_head,
    stride_kb, stride_kt, stride_kh, stride_kd, ks0, ks1, ks2, ks3,
    PART: tl.constexpr, BLOCK_P: tl.constexpr, KV_BITS: tl.constexpr, FP8: tl.constexpr,
    K_PER_CHANNEL: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Raw scores ``q . k`` of a tile (before the softmax scale), dequantization folded in
    (fp8: except the per-head scale, which the caller folds into the softmax scale)."""
    offs_p = tl.arange(0, BLOCK_P)
    p_ok = offs_p < PART
    # K is loaded transposed ([P, N]) so the score tile is a plain dot.
    k_ptrs = K + kv_head * stride_kh + (page * stride_kb + row * stride_kt)[None, :] + offs_p[:, None] * stride_kd
    if MASKED:
        kc = tl.load(k_ptrs, mask=p_ok[:, None] & col_ok[None, :], other=0)
    elif BLOCK_P != PART:
        kc = tl.load(k_ptrs, mask=p_ok[:, None], other=0)
    else:
        kc = tl.load(k_ptrs)
    if FP8:
        qk = tl.dot(q_a, _e4m3_f16(kc).to(q_a.dtype), input_precision=DOT_PRECISION)
    elif KV_BITS == 16:
        qk = tl.dot(q_a, kc, input_precision=DOT_PRECISION)
    else:
        if K_PER_CHANNEL:
            # One page per tile: fold its channel scales into q, its zeros into a bias.
            s_ptrs = KS + page * ks0 + kv_head * ks1 + offs_p * ks3
            s_a = tl.load(s_ptrs, mask=p_ok, other=0.0).to(tl.float32)
            z_a = tl.load(s_ptrs + ks2, mask=p_ok, other=0.0).to(tl.float32)
            qf_a = q_a.to(tl.float32)
            bias = tl.sum(qf_a * z_a[None, :], 1)
            qa_eff = (qf_a * s_a[None, :]).to(q_a.dtype)
            if KV_BITS == 4:
                s_b = tl.load(s_ptrs + PART * ks3, mask=p_ok, other=0.0).to(tl.float32)
                z_b = tl.load(s_ptrs + ks2 + PART * ks3, mask=p_ok, other=0.0).to(tl.float32)
                qf_b = q_b.to(tl.float32)
                bias += tl.sum(qf_b * z_b[None, :], 1)
                qb_eff = (qf_b * s_b[None, :]).to(q_b.dtype)
        else:
            qa_eff = q_a
            qb_eff = q_b
        if KV_BITS == 8:
            qk = tl.dot(qa_eff, kc.to(q_a.dtype), input_precision=DOT_PRECISION)
        else:
            qk = tl.dot(qa_eff, (kc & 15).to(q_a.dtype), input_precision=DOT_PRECISION)
            qk = tl.dot(qb_eff, (kc >> 4).to(q_b.dtype), qk, input_precision=DOT_PRECISION)
        if K_PER_CHANNEL:
            qk += bias[:, None]
        else:
            s_ptrs = KS + page * ks0 + row * ks1 + kv_head * ks2
            if MASKED:
                s_k = tl.load(s_ptrs, mask=col_ok, other=0.0).to(tl.float32)
                z_k = tl.load(s_ptrs + ks3, mask=col_ok, other=0.0).to(tl.float32)
            else:
                s_k = tl.load(s_ptrs).to(tl.float32)
                z_k = tl.load(s_ptrs + ks3).to(tl.float32)
            qk = qk * s_k[None, :] + q_sum[:, None] * z_k[None, :]
    return qk


@triton.jit
def _attend_tiles(
    acc_a, acc_b, l_i, m_i, q_a, q_b, q_sum,
    K, V, KS, VS, bt_ptr,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    ks0, ks1, ks2, ks3, vs0, vs1, vs2,  vs3,
    kv_head, row_tok, lo, hi, col_lo, ctx, diag, qk_scale, window_left, cap_log2,
    PART: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    KV_BITS: tl.constexpr, FP8: tl.constexpr, K_PER_CHANNEL: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    p_ok = offs_p < PART
    for start in range(lo, hi, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        cols = start + offs_n
        col_ok = (cols < ctx) & (cols >= col_lo)  # keys left of every row's window are not read
        page, row = tile_pages(bt_ptr, start, cols, col_ok, BLOCK_SIZE, K_PER_CHANNEL, MASKED)
        qk = tile_scores(
            q_a, q_b, q_sum, K, KS, page, row, col_ok, kv_head,
            stride_kb, stride_kt, stride_kh, stride_kd, ks0, ks1, ks2, ks3,
            PART, BLOCK_P, KV_BITS, FP8, K_PER_CHANNEL, MASKED, DOT_PRECISION,
        ) * qk_scale
        if SOFTCAP:
            qk = soft_cap(qk, cap_log2)
        if MASKED:
            visible = col_ok[None, :]
            if CAUSAL:
                rel = cols[None, :] - (row_tok[:, None] + diag)
                visible = visible & (rel <= 0) & (rel >= -window_left)
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # Rows that have seen nothing keep m = -inf; shift by 0 so exp2 gives 0, not NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_shift = m_new
        p = tl.math.exp2(qk - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc_a = acc_a * alpha[:, None]
        v_ptrs = V + kv_head * stride_vh + (page * stride_vb + row * stride_vt)[:, None] + offs_p[None, :] * stride_vd
        if MASKED:
            vc = tl.load(v_ptrs, mask=col_ok[:, None] & p_ok[None, :], other=0)
        elif BLOCK_P != PART:
            vc = tl.load(v_ptrs, mask=p_ok[None, :], other=0)
        else:
            vc = tl.load(v_ptrs)
        if FP8:
            acc_a = tl.dot(p.to(q_a.dtype), _e4m3_f16(vc).to(q_a.dtype), acc_a, input_precision=DOT_PRECISION)
        elif KV_BITS == 16:
            acc_a = tl.dot(p.to(vc.dtype), vc, acc_a, input_precision=DOT_PRECISION)
        else:
            s_ptrs = VS + page * vs0 + row * vs1 + kv_head * vs2
            if MASKED:
                s_v = tl.load(s_ptrs, mask=col_ok, other=0.0).to(tl.float32)
                z_v = tl.load(s_ptrs + vs3, mask=col_ok, other=0.0).to(tl.float32)
            else:
                s_v = tl.load(s_ptrs).to(tl.float32)
                z_v = tl.load(s_ptrs + vs3).to(tl.float32)
            p_s = (p * s_v[None, :]).to(q_a.dtype)
            p_z = tl.sum(p * z_v[None, :], 1)[:, None]
            if KV_BITS == 8:
                acc_a = tl.dot(p_s, vc.to(q_a.dtype), acc_a, input_precision=DOT_PRECISION) + p_z
            else:
                acc_b = acc_b * alpha[:, None]
                acc_a = tl.dot(p_s, (vc & 15).to(q_a.dtype), acc_a, input_precision=DOT_PRECISION) + p_z
                acc_b = tl.dot(p_s, (vc >> 4).to(q_a.dtype), acc_b, input_precision=DOT_PRECISION) + p_z
        m_i = m_new
    return acc_a, acc_b, l_i, m_i


@triton.jit
def _key_range(ctx, q_len, tok0, toks, pid_s, num_splits, window_left, CAUSAL: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Keys ``[lo, hi)`` a tile of query tokens ``[tok0, tok0 + toks)`` reads in split
    ``pid_s``, cut at ``full_lo <= full_hi``: ``[full_lo, full_hi)`` is visible to every row
    and needs no mask; ``[lo, full_lo)`` is the left edge of a sliding window (keys before
    every row's window are never read) and ``[full_hi, hi)`` the causal edge.

    The split is computed here from the sequence's own length (not on the host) so that a
    CUDA graph captured once replays for any context length.
    """
    diag = ctx - q_len
    hi = ctx
    full = ctx
    lo_any = 0
    lo_full = 0
    if CAUSAL:
        last_tok = tl.minimum(tok0 + toks, q_len) - 1
        hi = tl.minimum(hi, last_tok + diag + 1)
        full = tok0 + diag + 1
        lo_any = tl.maximum(tok0 + diag - window_left, 0)
        lo_full = tl.maximum(last_tok + diag - window_left, 0)
    hi = tl.maximum(hi, 0)
    lo = tl.minimum(lo_any // BLOCK_N * BLOCK_N, hi)
    tiles_per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), num_splits)
    lo = tl.minimum(lo + pid_s * tiles_per_split * BLOCK_N, hi)
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, hi)
    full = tl.minimum(tl.maximum(full, lo), hi)
    full_hi = lo + (full - lo) // BLOCK_N * BLOCK_N
    full_lo = tl.minimum(tl.maximum(tl.cdiv(lo_full, BLOCK_N) * BLOCK_N, lo), full_hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _program_tile(SeqLens, CuSeqlensQ, num_kv_heads, group_size, BLOCK_M: tl.constexpr):
    """This program's sequence ``b``, KV head and split, the sequence's query span and
    context length, and its tile's first query token and token count.

    A tile's rows are (query token, head of the GQA group) pairs, so one pass over the
    pages serves every query head that shares them.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // num_kv_heads
    kv_head = pid_bh % num_kv_heads
    q_start = tl.load(CuSeqlensQ + b)
    q_len = tl.load(CuSeqlensQ + b + 1) - q_start
    ctx = tl.load(SeqLens + b)
    toks = BLOCK_M // group_size
    tok0 = pid_m * toks
    return b, kv_head, pid_s, q_start, q_len, ctx, tok0, toks


@triton.jit
def _tile_rows(kv_head, q_len, ctx, tok0, toks, pid_s, group_size, num_splits, window_left,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """The tile's rows (query token, query head, in range), the causal diagonal's offset,
    the first key any row's window reaches, and the key edges ``(lo, full_lo, full_hi, hi)``
    of :func:`_key_range`: a masked stage, an unmasked one and a masked one."""
    offs_r = tl.arange(0, BLOCK_M)
    row_tok = tok0 + offs_r // group_size
    row_head = kv_head * group_size + offs_r % group_size
    row_ok = (offs_r < toks * group_size) & (row_tok < q_len)
    diag = ctx - q_len
    col_lo = tok0 + diag - window_left
    lo, full_lo, full_hi, hi = _key_range(ctx, q_len, tok0, toks, pid_s, num_splits, window_left, CAUSAL,
                                          BLOCK_N)
    return row_tok, row_head, row_ok, diag, col_lo, (lo, full_lo, full_hi, hi)


@triton.jit
def _store_lse(lse2, q_rows, row_head, row_ok, Lse, PartLse, pid_s, stride_ss, stride_st, stride_sh,
               stride_lh, stride_lt, SPLIT: tl.constexpr, STORE_LSE: tl.constexpr):
    """Store the rows' base-2 log-sum-exp of their scaled scores ``lse2``: a split
    program's as it is (for :func:`.split_combine.combine_splits`), else in natural log
    when asked for."""
    if SPLIT:
        tl.store(PartLse + pid_s * stride_ss + q_rows * stride_st + row_head * stride_sh, lse2, mask=row_ok)
    elif STORE_LSE:
        tl.store(Lse + row_head * stride_lh + q_rows * stride_lt, lse2 * 0.6931471805599453, mask=row_ok)


@triton.jit
def load_query_rows(Q, q_start, row_tok, row_head, row_ok, stride_qt, stride_qh, stride_qd,
                     PART: tl.constexpr, BLOCK_P: tl.constexpr, KV_BITS: tl.constexpr):
    """The tile's query rows, split in the two channel halves int4 pages need."""
    offs_p = tl.arange(0, BLOCK_P)
    mask = row_ok[:, None] & (offs_p < PART)[None, :]
    q_ptrs = Q + (q_start + row_tok).to(tl.int64)[:, None] * stride_qt + row_head[:, None] * stride_qh \
        + offs_p[None, :] * stride_qd
    q_a = tl.load(q_ptrs, mask=mask, other=0.0)
    if KV_BITS == 4:
        q_b = tl.load(q_ptrs + PART * stride_qd, mask=mask, other=0.0)
        q_sum = tl.sum(q_a.to(tl.float32), 1) + tl.sum(q_b.to(tl.float32), 1)
    else:
        q_b = q_a
        q_sum = tl.sum(q_a.to(tl.float32), 1)
    return q_a, q_b, q_sum


@triton.jit
def _paged_attn_kernel(
    Q, Out, Lse, PartOut, PartLse,
    K, V, KS, VS, BlockTables, SeqLens, CuSeqlensQ,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    ks0, ks1, ks2, ks3,
    vs0, vs1, vs2, vs3,
    stride_bt,
    stride_ms, stride_mt, stride_mh,
    stride_ss, stride_st, stride_sh,
    stride_lh, stride_lt,
    num_kv_heads, group_size, num_splits, qk_scale,
    tune_bucket,  # autotune key only
    window_left, cap_log2,
    PART: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, KV_BITS: tl.constexpr, FP8: tl.constexpr, K_PER_CHANNEL: tl.constexpr,
    CAUSAL: tl.constexpr, SPLIT: tl.constexpr, STORE_LSE: tl.constexpr, SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Paged attention over pages of any format; ``FP8``: KS/VS are per-head fp32 scales.

    Split programs (``SPLIT``) store their output normalised over their own keys and the
    base-2 LSE of their scaled scores, which :func:`.split_combine.combine_splits` merges.
    """
    b, kv_head, pid_s, q_start, q_len, ctx, tok0, toks = _program_tile(
        SeqLens, CuSeqlensQ, num_kv_heads, group_size, BLOCK_M)
    if tok0 >= q_len:
        return
    row_tok, row_head, row_ok, diag, col_lo, key_edges = _tile_rows(
        kv_head, q_len, ctx, tok0, toks, pid_s, group_size, num_splits, window_left, BLOCK_M, BLOCK_N, CAUSAL)

    q_a, q_b, q_sum = load_query_rows(Q, q_start, row_tok, row_head, row_ok, stride_qt, stride_qh, stride_qd,
                                       PART, BLOCK_P, KV_BITS)
    if FP8:  # q . (e * s) = s (q . e): the key scale joins the softmax scale
        qk_scale = qk_scale * tl.load(KS + kv_head)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    bt_ptr = BlockTables + b.to(tl.int64) * stride_bt

    for stage in tl.static_range(3):  # only the outer two stages straddle an edge and pay for masks
        acc_a, acc_b, l_i, m_i = _attend_tiles(
            acc_a, acc_b, l_i, m_i, q_a, q_b, q_sum, K, V, KS, VS, bt_ptr,
            stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
            ks0, ks1, ks2, ks3, vs0, vs1, vs2, vs3,
            kv_head, row_tok, key_edges[stage], key_edges[stage + 1], col_lo, ctx, diag, qk_scale, window_left,
            cap_log2, PART, BLOCK_P, BLOCK_N, BLOCK_SIZE, KV_BITS, FP8, K_PER_CHANNEL, stage != 1, CAUSAL, SOFTCAP,
            DOT_PRECISION,
        )

    if FP8:  # sum_j p_j e_j s = s (p @ e): the value scale multiplies the output
        acc_a = acc_a * tl.load(VS + kv_head)
    offs_p = tl.arange(0, BLOCK_P)
    mask = row_ok[:, None] & (offs_p < PART)[None, :]
    q_rows = (q_start + row_tok).to(tl.int64)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    if SPLIT:
        o_ptrs = PartOut + pid_s * stride_ms + q_rows[:, None] * stride_mt + row_head[:, None] * stride_mh \
            + offs_p[None, :]
        tl.store(o_ptrs, acc_a / l_safe[:, None], mask=mask)
        if KV_BITS == 4:
            tl.store(o_ptrs + PART, acc_b / l_safe[:, None], mask=mask)
    else:
        o_ptrs = Out + q_rows[:, None] * stride_ot + row_head[:, None] * stride_oh + offs_p[None, :] * stride_od
        tl.store(o_ptrs, (acc_a / l_safe[:, None]).to(Out.dtype.element_ty), mask=mask)
        if KV_BITS == 4:
            tl.store(o_ptrs + PART * stride_od, (acc_b / l_safe[:, None]).to(Out.dtype.element_ty), mask=mask)
    _store_lse(lse2, q_rows, row_head, row_ok, Lse, PartLse, pid_s, stride_ss, stride_st, stride_sh,
               stride_lh, stride_lt, SPLIT, STORE_LSE)


# --------------------------------------------------------------------------------------
# Fast path: codes become fp16 through bit tricks, dots run in fp16
# --------------------------------------------------------------------------------------
#
# The generic kernel above turns every code into the query's float type with ``code.to()``,
# an integer-to-float conversion (I2F) that Hopper issues at a quarter of the FP32 rate
# (16 per clock per SM, where ~13 codes per clock are needed at 3 TB/s), and its V tiles
# reach the tensor cores one byte load and byte permute per code (the dot reduces along
# keys, whose bytes are a row apart). scripts/sass_count.py (sm_90) counts, per 1k codes
# of its unmasked loop at (64, 4, 3), 253 warp instructions including 31 I2F: bound by the
# conversion pipe. This kernel: 98 at (128, 4, 2), no I2F (bf16 pages in
# kernels/paged_attention.py: 52 per 1k elements, i.e. per 2 kB). It builds fp16 bit
# patterns instead:
#
#     fp16 bits 0x6400 | c  ==  1024 + c   exactly, for 0 <= c < 1024
#
# (1024 has an ulp of 1 in fp16): one byte permute (PRMT) or one LOP3 per two codes.
#
# * K tiles [channels, keys] reduce along contiguous bytes: one 32-bit word holds four
#   codes of a key, two PRMTs make two fp16 operand registers, and two HADD2s subtract
#   the 1024 (exactly). Scores are amplified by the softmax, so the offset is not left
#   in the dot, where fp32 accumulation of ~8x larger terms would lose ~3 bits.
# * V tiles [keys, channels] are read as 16-bit units (two channels of a key), which
#   ldmatrix.trans delivers with the units of two consecutive keys in one register: a
#   PRMT per plane gives the fp16 pair (key n, key n + 1) of one channel, exactly the
#   tensor cores' operand. Each plane (channels 2i and 2i + 1; int4: four nibble planes)
#   is its own dot with its own accumulator, and the 1024 stays in:
#       sum_j p_j (s_j c_j + z_j) = p16 @ (1024 + c) + sum_j (p_j z_j - 1024 p16_j)
#   with p16 = fp16(p * s_v); the correction uses the same rounded p16, so the offset
#   cancels up to fp32 accumulation error (~2^-21 of the output's range: values are not
#   amplified). int4 nibbles sit at the top of their byte (1024 + 16 c) to keep the same
#   offset-to-code ratio; the accumulators are divided by 16 at the end.
# * (scale, zero) pairs are read as one 32-bit word per token, a load the pipeliner can
#   prefetch with cp.async (it does not prefetch 16-bit loads).
#
# Precision, with fp16 operands and fp32 accumulation:
# * q16 is q times a power of two per row (max |q16| in [2^14, 2^15)): a bf16 or fp16
#   query converts exactly except elements below 2^-28 of the row maximum (absolute error
#   under 2^-39 of it); the power of two returns in the softmax scale. Codes are exact, so
#   scores are exact up to fp32 accumulation, as in the generic kernel.
# * p16 = fp16(p * s_v) with p <= 1 and s_v an fp16 scale cannot overflow; its rounding
#   error, max(2^-11 p s_v, 2^-25), is below the bf16 rounding (2^-8 p s_v) the generic
#   kernel applies to the same product for bf16 queries wherever p s_v >= 2^-17; below,
#   both are under 2^-25 absolute.
#
# fp8 (e4m3) pages take the same kernel and layout: Hopper's cvt.rn.f16x2.e4m3x2 turns two
# codes into two exact fp16 values in one instruction (K: two per word of four codes; V:
# one PRMT pairs byte j of keys n and n + 1, then one cvt per plane). Their per-head
# scales are two scalars per program: the key scale joins the softmax scale, the value
# scale multiplies the output, so there is no offset, no zero and no per-token load; p16
# is fp16(p). Products of q16 (< 2^15) and codes (<= 448) stay far inside fp32.
#
# On a GPU the conversions are inline PTX (``USE_ASM``, the strings below, whose
# semantics tests/test_kv_quant.py checks on CPU with a small emulator); the interpreter,
# which cannot run PTX, takes portable integer ops computing the same fp16 values.
# ``tl.inline_asm_elementwise`` packs sub-32-bit inputs little-endian, element 0 lowest.

# fp8 K: 4 packed e4m3 codes -> 2 registers of fp16 pairs (c0, c1), (c2, c3).
_ASM_K_FP8 = tl.constexpr(
    "{\n\t.reg .b16 l, h;\n\tmov.b32 {l, h}, $2;\n\t"
    "cvt.rn.f16x2.e4m3x2 $0, l;\n\tcvt.rn.f16x2.e4m3x2 $1, h;\n\t}"
)
# fp8 V: 2 packed 16-bit units (bytes n.b0, n.b1, n1.b0, n1.b1) -> planes b0, b1 (both keys).
_ASM_V_FP8 = tl.constexpr(
    "{\n\t.reg .b32 t;\n\t.reg .b16 l, h;\n\tprmt.b32 t, $2, 0, 0x3120;\n\tmov.b32 {l, h}, t;\n\t"
    "cvt.rn.f16x2.e4m3x2 $0, l;\n\tcvt.rn.f16x2.e4m3x2 $1, h;\n\t}"
)
# int8 K: 4 packed codes -> 2 registers of fp16 pairs (c0, c1), (c2, c3).
_ASM_K8 = tl.constexpr(
    "{\n\t.reg .b32 m;\n\tmov.b32 m, 0x64006400;\n\t"
    "prmt.b32 $0, $2, 0x64646464, 0x4140;\n\tsub.f16x2 $0, $0, m;\n\t"
    "prmt.b32 $1, $2, 0x64646464, 0x4342;\n\tsub.f16x2 $1, $1, m;\n\t}"
)
# int4 K: 4 packed bytes -> low nibbles (2 registers) and 16 * high nibbles (2 registers).
# t = bytes (b0, b2, b1, b3): its 16-bit lanes hold (b0, b1) and, shifted by 8, (b2, b3).
_ASM_K4 = tl.constexpr(
    "{\n\t.reg .b32 t, u, m;\n\tmov.b32 m, 0x64006400;\n\t"
    "prmt.b32 t, $4, 0, 0x3120;\n\t"
    "shr.b32 u, t, 8;\n\t"
    "lop3.b32 $0, t, 0x000F000F, m, 0xEA;\n\tsub.f16x2 $0, $0, m;\n\t"
    "lop3.b32 $1, u, 0x000F000F, m, 0xEA;\n\tsub.f16x2 $1, $1, m;\n\t"
    "lop3.b32 $2, t, 0x00F000F0, m, 0xEA;\n\tsub.f16x2 $2, $2, m;\n\t"
    "lop3.b32 $3, u, 0x00F000F0, m, 0xEA;\n\tsub.f16x2 $3, $3, m;\n\t}"
)
# int8 V: 2 packed 16-bit units (bytes n.b0, n.b1, n1.b0, n1.b1) -> planes (1024 + b0),
# (1024 + b1), one register (both keys) each.
_ASM_V8 = tl.constexpr("prmt.b32 $0, $2, 0x64646464, 0x4240;\n\tprmt.b32 $1, $2, 0x64646464, 0x4341;")
# int4 V: 2 packed units -> 4 nibble planes (b0 low, b1 low, b0 high, b1 high) as 1024 + 16 c.
_ASM_V4 = tl.constexpr(
    "{\n\t.reg .b32 x, m;\n\tmov.b32 m, 0x64006400;\n\t"
    "shl.b32 x, $4, 4;\n\tlop3.b32 $0, x, 0x00F000F0, m, 0xEA;\n\t"
    "shr.b32 x, $4, 4;\n\tlop3.b32 $1, x, 0x00F000F0, m, 0xEA;\n\t"
    "lop3.b32 $2, $4, 0x00F000F0, m, 0xEA;\n\t"
    "shr.b32 x, $4, 8;\n\tlop3.b32 $3, x, 0x00F000F0, m, 0xEA;\n\t}"
)


@triton.jit
def _k_codes_f16(kc, KV_BITS: tl.constexpr, FP8: tl.constexpr, USE_ASM: tl.constexpr):
    """Exact fp16 codes of uint8 K bytes: int8 and fp8 ``(c, c)``; int4 ``(lo, 16 * hi)`` nibbles."""
    if FP8:
        if USE_ASM:
            lo = tl.inline_asm_elementwise(_ASM_K_FP8, "=r,=r,r", [kc], dtype=tl.float16, is_pure=True, pack=4)
        else:
            lo = _e4m3_f16(kc)
        hi = lo
    elif KV_BITS == 8:
        if USE_ASM:
            lo = tl.inline_asm_elementwise(_ASM_K8, "=r,=r,r", [kc], dtype=tl.float16, is_pure=True, pack=4)
        else:
            lo = (kc.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
        hi = lo
    else:
        if USE_ASM:
            lo, hi = tl.inline_asm_elementwise(_ASM_K4, "=r,=r,=r,=r,r", [kc], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=4)
        else:
            lo = ((kc & 15).to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
            hi = ((kc & 240).to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    return lo, hi


@triton.jit
def _v_plane(vh, j: tl.constexpr, KV_BITS: tl.constexpr, HIGH: tl.constexpr):
    """Portable :func:`_v_codes_f16` plane: byte ``j`` of 16-bit V units as fp16 ``1024 + c``
    (int8), or its ``HIGH`` / low nibble as ``1024 + 16 c`` (int4)."""
    x = vh.to(tl.int32) >> (8 * j)
    if KV_BITS == 8:
        x = x & 255
    elif HIGH:
        x = x & 240
    else:
        x = (x & 15) << 4
    return (x.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)


@triton.jit
def _v_codes_f16(vh, KV_BITS: tl.constexpr, FP8: tl.constexpr, USE_ASM: tl.constexpr):
    """fp16 planes of 16-bit V units ``[keys, units]`` (two bytes of a key), offset by 1024.

    Planes 0, 1 are bytes 0, 1 of each unit, channels ``2 i + j``: ``1024 + c`` (int8) or,
    from the low nibbles, ``1024 + 16 c`` (int4); int4 planes 2, 3 are the high nibbles,
    channels ``D / 2 + 2 i + j``, also ``1024 + 16 c``. int8 returns planes 0, 1 twice; fp8
    the same planes as exact values (no offset).
    """
    if FP8:
        if USE_ASM:
            v0, v1 = tl.inline_asm_elementwise(_ASM_V_FP8, "=r,=r,r", [vh], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=2)
        else:
            v0 = _e4m3_f16(vh.to(tl.int32) & 255)
            v1 = _e4m3_f16((vh.to(tl.int32) >> 8) & 255)
        return v0, v1, v0, v1
    elif KV_BITS == 8:
        if USE_ASM:
            v0, v1 = tl.inline_asm_elementwise(_ASM_V8, "=r,=r,r", [vh], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=2)
        else:
            v0 = _v_plane(vh, 0, KV_BITS, False)
            v1 = _v_plane(vh, 1, KV_BITS, False)
        return v0, v1, v0, v1
    else:
        if USE_ASM:
            v0, v1, v2, v3 = tl.inline_asm_elementwise(_ASM_V4, "=r,=r,=r,=r,r", [vh], dtype=(tl.float16,) * 4,
                                                       is_pure=True, pack=2)
        else:
            v0 = _v_plane(vh, 0, KV_BITS, False)
            v1 = _v_plane(vh, 1, KV_BITS, False)
            v2 = _v_plane(vh, 0, KV_BITS, True)
            v3 = _v_plane(vh, 1, KV_BITS, True)
        return v0, v1, v2, v3


@triton.jit
def _scale_zero(w):
    """fp32 (scale, zero) from int32 words holding the fp16 pair (scale in the low half)."""
    s = (w & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    z = ((w >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return s, z


@triton.jit
def _attend_tiles_f16(
    a0, a1, a2, a3, l_i, m_i, corr,
    q_a, q_b, q_sum, row_scale,
    K, V, KS, VS, bt_ptr,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    ks0, ks1, ks2, vs0, vs1, vs2,
    kv_head, row_tok, lo, hi, col_lo, ctx, diag, window_left, cap_log2,
    PART: tl.constexpr, UNITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    KV_BITS: tl.constexpr, FP8: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    USE_ASM: tl.constexpr, DEFER_SUMS: tl.constexpr, SOFTCAP: tl.constexpr,
):
    V_MULT: tl.constexpr = 1.0 if KV_BITS == 8 else 16.0
    offs_n = tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, PART)
    offs_u = tl.arange(0, UNITS)
    for start in range(lo, hi, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        cols = start + offs_n
        col_ok = (cols < ctx) & (cols >= col_lo)  # keys left of every row's window are not read
        page, row = tile_pages(bt_ptr, start, cols, col_ok, BLOCK_SIZE, False, MASKED)
        # Scores: K bytes [PART, N] -> exact fp16 code tiles.
        k_ptrs = K + kv_head * stride_kh + (page * stride_kb + row * stride_kt)[None, :] + offs_p[:, None]
        if MASKED:  # noqa: SIM108
            kc = tl.load(k_ptrs, mask=col_ok[None, :], other=0)
        else:
            kc = tl.load(k_ptrs)
        if not FP8:  # fp8's per-head key scale is in row_scale already
            ks_ptrs = KS + page * ks0 + row * ks1 + kv_head * ks2
            if MASKED:  # noqa: SIM108
                ksz = tl.load(ks_ptrs, mask=col_ok, other=0)
            else:
                ksz = tl.load(ks_ptrs)
        k_lo, k_hi = _k_codes_f16(kc, KV_BITS, FP8, USE_ASM)
        qk = tl.dot(q_a, k_lo)
        if KV_BITS == 4:
            qk = tl.dot(q_b, k_hi, qk)
        if not FP8:
            s_k, z_k = _scale_zero(ksz)
            qk = qk * s_k[None, :] + q_sum[:, None] * z_k[None, :]  # q . (s c + z) = s (q . c) + z sum(q)
        if SOFTCAP:  # the cap needs the scaled scores themselves
            qk = soft_cap(qk * row_scale[:, None], cap_log2)
        if MASKED:
            visible = col_ok[None, :]
            if CAUSAL:
                rel = cols[None, :] - (row_tok[:, None] + diag)
                visible = visible & (rel <= 0) & (rel >= -window_left)
            qk = tl.where(visible, qk, float("-inf"))
        if SOFTCAP:  # noqa: SIM108 -- capped scores are already scaled
            m_new = tl.maximum(m_i, tl.max(qk, 1))
        else:
            # row_scale > 0 (softmax scale over q16's power of two): max commutes with it, and
            # the product folds into the exponent's FMA.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * row_scale)
        m_shift = m_new
        if MASKED:  # rows that have seen nothing keep m = -inf: shift by 0 so exp2 gives 0, not NaN
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        if SOFTCAP:  # noqa: SIM108
            p = tl.math.exp2(qk - m_shift[:, None])
        else:
            p = tl.math.exp2(qk * row_scale[:, None] - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        if DEFER_SUMS:  # noqa: SIM108 -- [M, N] partial sums: no cross-warp reduction (barriers) per tile
            l_i = l_i * alpha[:, None] + p
        else:
            l_i = l_i * alpha + tl.sum(p, 1)
        # Values: 16-bit units [N, UNITS] -> fp16 (1024 + code) planes; p16 carries the scales
        # (fp8: exact value planes; the per-head scale multiplies the output at the end).
        v_ptrs = V + kv_head * stride_vh + (page * stride_vb + row * stride_vt)[:, None] + offs_u[None, :]
        if FP8:
            if MASKED:  # noqa: SIM108
                vh = tl.load(v_ptrs, mask=col_ok[:, None], other=0)
            else:
                vh = tl.load(v_ptrs)
            p16 = p.to(tl.float16)
        else:
            vs_ptrs = VS + page * vs0 + row * vs1 + kv_head * vs2
            if MASKED:
                vh = tl.load(v_ptrs, mask=col_ok[:, None], other=0)
                vsz = tl.load(vs_ptrs, mask=col_ok, other=0)
            else:
                vh = tl.load(v_ptrs)
                vsz = tl.load(vs_ptrs)
            s_v, z_v = _scale_zero(vsz)
            p16 = (p * s_v[None, :]).to(tl.float16)
            # sum_j p_j x_j = (p16 @ (1024 + M c)) / M + sum_j (p_j z_j - 1024 / M p16_j), M = V_MULT
            c_new = p * z_v[None, :] - (1024.0 / V_MULT) * p16.to(tl.float32)
            if DEFER_SUMS:  # noqa: SIM108
                corr = corr * alpha[:, None] + c_new
            else:
                corr = corr * alpha + tl.sum(c_new, 1)
        v0, v1, v2, v3 = _v_codes_f16(vh, KV_BITS, FP8, USE_ASM)
        a0 = tl.dot(p16, v0, a0 * alpha[:, None])
        a1 = tl.dot(p16, v1, a1 * alpha[:, None])
        if KV_BITS == 4:
            a2 = tl.dot(p16, v2, a2 * alpha[:, None])
            a3 = tl.dot(p16, v3, a3 * alpha[:, None])
        m_i = m_new
    return a0, a1, a2, a3, l_i, m_i, corr


@triton.jit
def _store_plane(acc, chan, corr, l_safe, row_ok, q_rows, row_head, Out, PartOut, pid_s,
                 stride_ot, stride_oh, stride_od, stride_ms, stride_mt, stride_mh,
                 INV_MULT: tl.constexpr, SPLIT: tl.constexpr):
    """Store a V plane's accumulator at output channels ``chan``: ``(acc / M + corr) / l``
    (split programs: into their fp32 partial, normalised over their own keys)."""
    val = (acc * INV_MULT + corr[:, None]) / l_safe[:, None]
    mask = row_ok[:, None]
    if SPLIT:
        o_ptrs = PartOut + pid_s * stride_ms + q_rows[:, None] * stride_mt + row_head[:, None] * stride_mh \
            + chan[None, :]
        tl.store(o_ptrs, val, mask=mask)
    else:
        o_ptrs = Out + q_rows[:, None] * stride_ot + row_head[:, None] * stride_oh + chan[None, :] * stride_od
        tl.store(o_ptrs, val.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _paged_attn_f16_kernel(
    Q, Out, Lse, PartOut, PartLse,
    K, V, KS, VS, BlockTables, SeqLens, CuSeqlensQ,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    ks0, ks1, ks2,
    vs0, vs1, vs2,
    stride_bt,
    stride_ms, stride_mt, stride_mh,
    stride_ss, stride_st, stride_sh,
    stride_lh, stride_lt,
    num_kv_heads, group_size, num_splits, qk_scale,
    tune_bucket,  # autotune key only
    window_left, cap_log2,
    PART: tl.constexpr, UNITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, KV_BITS: tl.constexpr, FP8: tl.constexpr, CAUSAL: tl.constexpr,
    SPLIT: tl.constexpr, STORE_LSE: tl.constexpr, USE_ASM: tl.constexpr, DEFER_SUMS: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """:func:`_paged_attn_kernel` for int8/int4 pages with per-token scales, or fp8 pages,
    and 16-bit queries.

    K is the page bytes (uint8), V an int16 view (units of two bytes of a key); int8/int4
    scale tensors are int32 views (one (scale, zero) fp16 pair per word), fp8's the fp32
    per-head scales; strides are in elements of those views. ``DEFER_SUMS`` keeps the row sums (softmax denominator and
    offset correction) per key column until the end: two cross-warp reductions fewer per
    tile for ~2 * BLOCK_N / 8 more registers per thread (see :func:`defer_row_sums`).
    """
    b, kv_head, pid_s, q_start, q_len, ctx, tok0, toks = _program_tile(
        SeqLens, CuSeqlensQ, num_kv_heads, group_size, BLOCK_M)
    if tok0 >= q_len:
        return
    row_tok, row_head, row_ok, diag, col_lo, key_edges = _tile_rows(
        kv_head, q_len, ctx, tok0, toks, pid_s, group_size, num_splits, window_left, BLOCK_M, BLOCK_N, CAUSAL)

    # q16 = q * 2^e per row with max |q16| in [2^14, 2^15): exact for bf16 and fp16 inputs.
    q_a, q_b, _ = load_query_rows(Q, q_start, row_tok, row_head, row_ok, stride_qt, stride_qh, stride_qd,
                                   PART, PART, KV_BITS)
    qa = q_a.to(tl.float32)
    qb = q_b.to(tl.float32)
    amax = tl.max(tl.abs(qa), 1)
    if KV_BITS == 4:
        amax = tl.maximum(amax, tl.max(tl.abs(qb), 1))
    expo = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent of the row maximum
    expo = tl.minimum(tl.maximum(expo, 14), 254)  # keeps 2^(141 - expo) a normal fp32
    pow2 = ((127 + 127 + 14 - expo) << 23).to(tl.float32, bitcast=True)  # 2^(14 - e)
    q16_a = (qa * pow2[:, None]).to(tl.float16)
    q_sum = tl.sum(q16_a.to(tl.float32), 1)
    if KV_BITS == 4:
        # High nibbles arrive as 16 c: their query half is pre-divided by 16 (exact).
        q16_b = (qb * (pow2 * 0.0625)[:, None]).to(tl.float16)
        q_sum += 16.0 * tl.sum(q16_b.to(tl.float32), 1)
    else:
        q16_b = q16_a
    if FP8:  # q . (e * s) = s (q . e): the key scale joins the softmax scale
        qk_scale = qk_scale * tl.load(KS + kv_head)
    row_scale = qk_scale / pow2

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if DEFER_SUMS:
        l_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        corr = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        corr = tl.zeros([BLOCK_M], dtype=tl.float32)
    a0 = tl.zeros([BLOCK_M, UNITS], dtype=tl.float32)
    a1 = tl.zeros([BLOCK_M, UNITS], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_M, UNITS], dtype=tl.float32)
    a3 = tl.zeros([BLOCK_M, UNITS], dtype=tl.float32)
    bt_ptr = BlockTables + b.to(tl.int64) * stride_bt

    for stage in tl.static_range(3):  # only the outer two stages straddle an edge and pay for masks
        a0, a1, a2, a3, l_i, m_i, corr = _attend_tiles_f16(
            a0, a1, a2, a3, l_i, m_i, corr, q16_a, q16_b, q_sum, row_scale,
            K, V, KS, VS, bt_ptr, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            ks0, ks1, ks2, vs0, vs1, vs2, kv_head, row_tok, key_edges[stage], key_edges[stage + 1], col_lo, ctx, diag,
            window_left, cap_log2, PART, UNITS, BLOCK_N, BLOCK_SIZE, KV_BITS, FP8, stage != 1, CAUSAL, USE_ASM,
            DEFER_SUMS, SOFTCAP,
        )

    if DEFER_SUMS:
        l_i = tl.sum(l_i, 1)
        corr = tl.sum(corr, 1)
    if FP8:  # sum_j p_j e_j s = s (p @ e): the value scale multiplies the output
        v_scale = tl.load(VS + kv_head)
        a0 = a0 * v_scale
        a1 = a1 * v_scale
    q_rows = (q_start + row_tok).to(tl.int64)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    # Plane j of 16-bit unit i holds channel 2 i + j (int4 high nibbles: D / 2 + 2 i + j).
    chan = tl.arange(0, UNITS) * 2
    INV_MULT: tl.constexpr = 0.0625 if KV_BITS == 4 else 1.0
    _store_plane(a0, chan, corr, l_safe, row_ok, q_rows, row_head, Out, PartOut, pid_s,
                 stride_ot, stride_oh, stride_od, stride_ms, stride_mt, stride_mh, INV_MULT, SPLIT)
    _store_plane(a1, chan + 1, corr, l_safe, row_ok, q_rows, row_head, Out, PartOut, pid_s,
                 stride_ot, stride_oh, stride_od, stride_ms, stride_mt, stride_mh, INV_MULT, SPLIT)
    if KV_BITS == 4:
        _store_plane(a2, chan + PART, corr, l_safe, row_ok, q_rows, row_head, Out, PartOut, pid_s,
                     stride_ot, stride_oh, stride_od, stride_ms, stride_mt, stride_mh, INV_MULT, SPLIT)
        _store_plane(a3, chan + PART + 1, corr, l_safe, row_ok, q_rows, row_head, Out, PartOut, pid_s,
                     stride_ot, stride_oh, stride_od, stride_ms, stride_mt, stride_mh, INV_MULT, SPLIT)
    lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    _store_lse(lse2, q_rows, row_head, row_ok, Lse, PartLse, pid_s, stride_ss, stride_st, stride_sh,
               stride_lh, stride_lt, SPLIT, STORE_LSE)


# --------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------

# Triton's interpreter runs programs one by one in numpy: small tiles keep CPU tests
# quick while still crossing pages and splits.
_INTERPRETER_BLOCK_N = 16

# Few configs on purpose: decode is memory-bound and each compile costs seconds.
_GPU_CONFIGS_TOKENS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bn, w, s in [(64, 4, 3), (128, 4, 2), (128, 4, 3), (128, 8, 2)]
]
# Per-channel key scales bind a tile to one page, so only the schedule is tuned.
_GPU_CONFIGS_PAGE = [triton.Config({}, num_warps=w, num_stages=s) for w, s in [(4, 2), (4, 3), (2, 3)]]
# tune_bucket is the query count per sequence (capped): decode and prefill want different tiles.
_AUTOTUNE_KEY = ["KV_BITS", "FP8", "K_PER_CHANNEL", "PART", "BLOCK_M", "BLOCK_SIZE", "CAUSAL", "SPLIT", "tune_bucket"]
_CACHE = {"cache_results": True} if "cache_results" in triton.autotune.__code__.co_varnames else {}

_paged_attn_tuned_tokens = triton.autotune(configs=_GPU_CONFIGS_TOKENS, key=_AUTOTUNE_KEY, **_CACHE)(
    _paged_attn_kernel
)
_paged_attn_tuned_page = triton.autotune(configs=_GPU_CONFIGS_PAGE, key=_AUTOTUNE_KEY, **_CACHE)(_paged_attn_kernel)
_paged_attn_f16_tuned = triton.autotune(
    configs=_GPU_CONFIGS_TOKENS, key=[k for k in _AUTOTUNE_KEY if k != "K_PER_CHANNEL"], **_CACHE,
)(_paged_attn_f16_kernel)


# Fixed (BLOCK_N, num_warps, num_stages) used when autotuning is off (the engine passes
# these explicitly). Decode: 128-key tiles with 4 warps and 2 stages, the bf16 paged
# kernel's H100 optimum (kernels/paged_attention.py) and, for the fp16-code kernel, the
# fewest SASS instructions per KV element among schedules keeping >= 2 programs per SM
# (scripts/sass_count.py, sm_90, warp instructions per 1k int8 codes in the unmasked
# loop: 98 at 196 registers, 107 capped at 128; 142 at (64, 4, 3)).
# benchmarks/bench_kv_quant.py sweeps alternatives.
# Engines capturing CUDA graphs should pass ``launch`` explicitly: autotuning inside a
# graph warm-up would tune on the dummy empty contexts used there.
DEFAULT_LAUNCH = {"decode": (128, 4, 2), "prefill": (64, 4, 2)}

# Register caps (ptxas ``maxnreg``) for the fp16-code kernel's decode launches (16-row
# tiles), by schedule, applied unless the launch names ``maxnreg``. At (128, 4, 2) the
# kernel takes 196 registers uncapped (2 programs of 4 warps per SM) and 128 capped, with
# no spills and ~8% more instructions (scripts/sass_count.py, sm_90): 4 programs per SM
# (shared memory allows 5) to hide the per-tile latency chain. benchmarks/bench_kv_quant.py
# times both.
FAST_DECODE_MAXNREG = {(128, 4, 2): 128}


def decode_launch(bits: int, programs: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for a decode launch of ``programs`` programs.

    int8 pages (H100, GQA 32/8, hd128, CUDA-graph replays, v0.6 in benchmarks/RESULTS.md):
    with at most two programs per SM (batch 16 x 8 KV heads x 2 splits) (128, 4, 3)
    without a register cap ran 73 / 124 us at 4k / 8k where (128, 4, 2) capped ran 77 /
    131; with more programs (batch 64, 1 split) (128, 2, 2) ran 217 / 408 against 228 /
    442. Other formats keep :data:`DEFAULT_LAUNCH` (int4's best alternative, (128, 4, 3)
    capped at 128 registers, was 1-6% faster at batch 16 across runs and slower at 64).
    """
    if bits == 8 and device.type == "cuda":
        return (128, 4, 3) if programs <= 2 * num_sms(device) else (128, 2, 2)
    return DEFAULT_LAUNCH["decode"]


_LAUNCH_KEYS = ("BLOCK_N", "num_warps", "num_stages")


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


# --------------------------------------------------------------------------------------
# Host wrappers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PagePair:
    """The format and geometry of a K/V page pair."""

    bits: int  # 16 (float pages), 8 (int8 and fp8) or 4
    fp8: bool
    per_channel: bool  # KIVI per-channel key scales
    block_size: int
    num_heads: int
    head_dim: int


def _page_pair(k_pages: Pages, v_pages: Pages) -> _PagePair:
    fmt, v_fmt = page_format(k_pages), page_format(v_pages)
    if fmt != v_fmt:
        if fmt.startswith("int") and v_fmt.startswith("int"):
            raise ValueError(f"K and V pages use different bit widths ({k_pages.bits} vs {v_pages.bits})")
        raise ValueError(f"k_pages and v_pages must have one format, got {fmt} and {v_fmt}")
    k_geo, v_geo = page_geometry(k_pages), page_geometry(v_pages)
    if k_geo != v_geo:
        raise ValueError(f"K and V pages differ in shape: {k_geo} vs {v_geo}")
    _, bs, h, d = k_geo
    if fmt == "float":
        if k_pages.dtype != v_pages.dtype or k_pages.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"float pages must be fp16/bf16/fp32 of one dtype, got {k_pages.dtype} and "
                             f"{v_pages.dtype}")
        return _PagePair(16, False, False, bs, h, d)
    if fmt == "fp8":
        return _PagePair(8, True, False, bs, h, d)
    if v_pages.per_channel:
        raise ValueError("value pages must use per-token scales (per-channel is for keys only, as in KIVI)")
    return _PagePair(k_pages.bits, False, k_pages.per_channel, bs, h, d)


def _decode_cu_seqlens(batch: int, device: torch.device) -> torch.Tensor:
    return torch.arange(batch + 1, dtype=torch.int32, device=device)


def choose_num_splits(batch: int, num_kv_heads: int, max_kv_len: int, device: torch.device,
                      *, q_tiles: int = 1, min_keys_per_split: int = 256) -> int:
    """Split-K factor for about two programs per SM in one wave, without tiny slices.

    H100, int8 pages, batch 16 x 4k (v0.4, benchmarks/RESULTS.md): 2 splits (two programs
    per SM, as the bf16 kernel wants) ran 1.44x the bf16 time where 5 (four per SM,
    spilling into a second wave) ran 1.35x.
    """
    if device.type != "cuda":
        return max(1, min(4, triton.cdiv(max_kv_len, 64)))
    programs = max(batch * num_kv_heads * q_tiles, 1)
    by_occupancy = max(1, 2 * num_sms(device) // programs)
    by_length = max(1, triton.cdiv(max_kv_len, min_keys_per_split))
    return int(max(1, min(by_occupancy, by_length, 64)))


def defer_row_sums(programs: int, max_q_len: int, device: torch.device) -> bool:
    """Whether the fp16-code kernel keeps its row sums per key column until the end, when
    the caller does not decide (:func:`paged_attention_quantized`'s ``defer_sums``).

    Decode launches on GPUs with at most two programs per SM defer (the (128, 4, 3) schedule of :func:`decode_launch`:
    H100, batch 16, 2 splits, 71.8 / 121.4 us at 4k / 8k against 74.6 / 129.2; with more
    programs the extra registers cost occupancy and it ran 2-20% slower).
    """
    if device.type != "cuda":
        return False
    return max_q_len <= 1 and programs <= 2 * num_sms(device)


def _asm_supported(device: torch.device, fp8: bool) -> bool:
    """Whether the inline-PTX code conversion can run on ``device``: fp8's
    ``cvt.rn.f16x2.e4m3x2`` needs compute capability 8.9 (Ada, Hopper) or later."""
    if not fp8 or device.type != "cuda":  # (the interpreter never asks; scripts/sass_count.py targets sm_90)
        return True
    return _has_e4m3_cvt(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _has_e4m3_cvt(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def _fast_views(q: torch.Tensor, k_pages: Pages, v_pages: Pages, bits: int, per_channel: bool, head_dim: int):
    """``(K bytes, V int16 units, K scales, V scales)`` when the fast kernel applies to these
    pages, else None. Scales are int32 views of the (scale, zero) pairs (int8/int4), or
    fp8's per-head fp32 scales.

    It needs 16-bit queries, per-token or per-head scales, power-of-two code rows whose
    16-bit V units give planes of >= 16 channels (``tl.dot``'s minimum: int8/fp8 head_dim
    >= 32, int4 >= 64), and layouts that reinterpret as those views (contiguous rows,
    (scale, zero) pairs in one word).
    """
    if bits not in (8, 4) or per_channel or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    part = head_dim if bits == 8 else head_dim // 2
    if part & (part - 1) or part // 2 < 16 or k_pages.data.stride(3) != 1:
        return None
    try:
        if isinstance(k_pages, Fp8Pages):
            return (k_pages.data.view(torch.uint8), v_pages.data.view(torch.uint8).view(torch.int16),
                    k_pages.scale, v_pages.scale)
        return (k_pages.data, v_pages.data.view(torch.int16), k_pages.scales.view(torch.int32),
                v_pages.scales.view(torch.int32))
    except RuntimeError:  # strides or offsets that are not whole words
        return None


def paged_attention_quantized(
    q: torch.Tensor,
    k_pages: Pages,
    v_pages: Pages,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    *,
    max_q_len: int | None = None,
    softmax_scale: float | None = None,
    num_splits: int | None = None,
    max_kv_len: int | None = None,
    causal: bool = True,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    launch: dict[str, int] | None = None,
    window_left: int | None = None,
    softcap: float | None = None,
    fast_kernel: bool = True,
    inline_asm: bool = True,
    defer_sums: bool | None = None,
    autotune: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of new query tokens over a paged KV cache in any page format.

    Same calling convention as :func:`stream_attention.kernels.paged_attention.paged_attention`:
    ``q [total_q, Hq, D]`` packed per ``cu_seqlens_q`` (int32 ``[B + 1]``; ``None`` means
    decode, one query per sequence), ``block_tables`` int32 ``[B, max_blocks]``,
    ``seq_lens`` int32 ``[B]`` counting each sequence's keys *including* the new tokens
    (already written), ``causal`` aligned bottom-right (query ``i`` of ``n`` sees keys
    ``j <= i + seq_len - n``). Pages are :class:`QuantizedPages` for K and V (same bit
    width, V per token), :class:`Fp8Pages`, or plain float ``[blocks, block_size, Hkv, D]``
    tensors of ``q``'s dtype, which run the same kernel (the like-for-like baseline).

    No host synchronisation happens unless a prefill call (``cu_seqlens_q`` given) leaves
    out ``max_q_len``, so decode calls can be captured in a CUDA graph; ``num_splits=None``
    picks one from ``max_kv_len``, or from the block table's capacity when that is not
    given. Returns ``out`` (and
    ``lse [Hq, total_q]``, natural log, fp32, ``-inf`` where no key is visible, with
    ``return_lse``). ``launch`` (``{"BLOCK_N", "num_warps", "num_stages"}``) fixes the GPU
    schedule (None: :data:`DEFAULT_LAUNCH`, or :func:`decode_launch` for the fp16-code
    kernel's decode, unless ``autotune`` runs the GPU autotuner); per-channel pages ignore
    its ``BLOCK_N`` (a tile is a page). ``window_left`` (causal only) and ``softcap`` as in
    :mod:`.score_mods`.

    Kernel variants (the engine sets them from ``STREAM_ATTENTION_KV_FAST``, ``_KV_ASM``,
    ``_KV_DEFER_SUMS`` and ``_AUTOTUNE``; the defaults are what those do when unset):

    * ``fast_kernel``: fp8 pages and int8/int4 pages with per-token scales take the fp16-code
      kernel where it applies (False: the generic dequantizing kernel);
    * ``inline_asm``: that kernel converts codes with inline PTX on GPUs (False: portable
      integer ops);
    * ``defer_sums``: that kernel keeps its row sums per key column until the end (True),
      per tile (False), or as :func:`defer_row_sums` decides for the launch (None);
    * ``autotune``: without a ``launch``, autotune the GPU launch instead of taking the
      measured schedule.
    """
    if window_left is not None and window_left >= 0 and not causal:
        raise ValueError("window_left needs causal=True (a window is measured back from the causal diagonal)")
    has_cap, cap_log2 = softcap_arg(softcap)
    fmt = _page_pair(k_pages, v_pages)
    bits, per_channel, block_size, hkv, head_dim = fmt.bits, fmt.per_channel, fmt.block_size, fmt.num_heads, \
        fmt.head_dim
    if q.dim() != 3 or q.shape[-1] != head_dim:
        raise ValueError(f"q must be [tokens, Hq, {head_dim}], got {tuple(q.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must be fp16/bf16/fp32, got {q.dtype}")
    hq = q.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if per_channel and (block_size < 16 or block_size & (block_size - 1)):
        raise ValueError(f"per-channel key pages need a power-of-two block_size >= 16, got {block_size}")
    if bits == 16 and k_pages.dtype != q.dtype:
        raise ValueError(f"float pages ({k_pages.dtype}) must have q's dtype ({q.dtype})")
    decode = cu_seqlens_q is None
    batch = q.shape[0] if decode else cu_seqlens_q.numel() - 1
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or seq_lens.numel() != batch:
        raise ValueError(f"block_tables must be [{batch}, max_blocks] and seq_lens [{batch}], got "
                         f"{tuple(block_tables.shape)} and {tuple(seq_lens.shape)}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    device = q.device
    cu_q = _decode_cu_seqlens(batch, device) if decode else cu_seqlens_q
    if decode:
        max_q_len = 1
    elif max_q_len is None:
        max_q_len = int((cu_q[1:] - cu_q[:-1]).max().item()) if batch else 0
    total_q = q.shape[0]
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty((hq, total_q), dtype=torch.float32, device=device) if return_lse else None
    if total_q == 0 or batch == 0:
        if lse is not None:
            lse.fill_(float("-inf"))
        return (out, lse) if return_lse else out

    interp = interpreter_enabled()
    group = hq // hkv
    part = head_dim // 2 if bits == 4 else head_dim
    block_p = max(16, triton.next_power_of_2(part))
    rows_cap = 32 if interp else 64
    block_m = min(max(triton.next_power_of_2(group * max_q_len), 16), max(rows_cap, triton.next_power_of_2(group)))
    q_tiles = triton.cdiv(max_q_len, block_m // group)
    if num_splits is None:
        if max_kv_len is None:  # an upper bound the host already knows: no device sync
            max_kv_len = block_tables.shape[1] * block_size
        num_splits = choose_num_splits(batch, hkv, max_kv_len, device, q_tiles=q_tiles)
    num_splits = max(1, int(num_splits))
    use_split = num_splits > 1

    # On GPUs the fp16-code kernel serves decode steps only: its prefill tiles (BLOCK_M up
    # to 64) abort inside Triton 3.6's compiler for a head_dim-64, GQA-3 model (the default
    # model, 2026-11-25), and prefill is compute-bound, where the conversion cost matters
    # least. The interpreter runs both, so the tests keep covering the prefill math.
    # Code rows of 32 bytes (int4 at head_dim 64: 16-unit V planes, the smallest tile) are
    # kept off it on GPUs too: an engine run of the default model there split from the
    # generic kernel's greedy tokens earlier than int8 did, and no kernel-level GPU test
    # covers that shape yet (hd128 int4 is covered and exact).
    gpu_ok = max_q_len <= 1 and part >= 64
    use_fast = fast_kernel and (interp or gpu_ok)
    fast = _fast_views(q, k_pages, v_pages, bits, per_channel, head_dim) if use_fast else None
    part_out, part_lse, p_strides, l_strides = partial_buffers(out, num_splits)
    lse_arg = lse if lse is not None else out
    lse_strides = lse.stride() if lse is not None else (0, 0)
    tail = (block_tables.stride(0), *p_strides[:3], *l_strides, *lse_strides,
            hkv, group, num_splits, softmax_scale * _LOG2E, min(max_q_len, 16), window_left_arg(window_left), cap_log2)
    grid = (q_tiles, batch * hkv, num_splits)
    if fast is not None:
        kf, vf, ksf, vsf = fast
        scale_strides = (0,) * 6 if fmt.fp8 else (*ksf.stride()[:3], *vsf.stride()[:3])
        args = (q, out, lse_arg, part_out, part_lse, kf, vf, ksf, vsf, block_tables, seq_lens, cu_q,
                *q.stride(), *out.stride(), *kf.stride()[:3], *vf.stride()[:3], *scale_strides, *tail)
        if launch is None and not interp and not autotune:
            sched = decode_launch(bits, math.prod(grid), device) if max_q_len <= 1 else DEFAULT_LAUNCH["prefill"]
            launch = dict(zip(_LAUNCH_KEYS, sched, strict=True))
        if launch is not None and max_q_len <= 1 and block_m <= 16 and "maxnreg" not in launch:
            cap = FAST_DECODE_MAXNREG.get(tuple(launch.get(k) for k in _LAUNCH_KEYS))
            if cap:
                launch = {**launch, "maxnreg": cap}
        meta = dict(PART=part, UNITS=part // 2, BLOCK_M=block_m, BLOCK_SIZE=block_size, KV_BITS=bits, FP8=fmt.fp8,
                    CAUSAL=causal, SPLIT=use_split, STORE_LSE=return_lse,
                    USE_ASM=inline_asm and not interp and _asm_supported(device, fmt.fp8),
                    DEFER_SUMS=defer_row_sums(math.prod(grid), max_q_len, device) if defer_sums is None else defer_sums,
                    SOFTCAP=has_cap)
        _launch(_paged_attn_f16_kernel, _paged_attn_f16_tuned, grid, args, meta, launch, device, max_q_len, autotune)
    else:
        k_data, k_scales, ksd, kss = page_kernel_args(k_pages)
        v_data, v_scales, vsd, vss = page_kernel_args(v_pages)
        args = (q, out, lse_arg, part_out, part_lse, k_data, v_data, k_scales, v_scales, block_tables, seq_lens, cu_q,
                *q.stride(), *out.stride(), *ksd, *vsd, *kss, *vss, *tail)
        meta = dict(PART=part, BLOCK_P=block_p, BLOCK_M=block_m, BLOCK_SIZE=block_size, KV_BITS=bits, FP8=fmt.fp8,
                    K_PER_CHANNEL=per_channel, CAUSAL=causal, SPLIT=use_split, STORE_LSE=return_lse,
                    SOFTCAP=has_cap, DOT_PRECISION=dot_precision_for(q.dtype))
        if per_channel:  # a tile is a page: only the schedule is chosen
            _launch(_paged_attn_kernel, _paged_attn_tuned_page, grid, args, meta, launch, device, max_q_len,
                    autotune, block_n=block_size)
        else:
            _launch(_paged_attn_kernel, _paged_attn_tuned_tokens, grid, args, meta, launch, device, max_q_len,
                    autotune)
    if use_split:
        combine_splits(part_out, part_lse, out, num_splits, lse=lse)
    return (out, lse) if return_lse else out


def paged_attention_fp8(
    q: torch.Tensor,
    k_pages: Fp8Pages,
    v_pages: Fp8Pages,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    *,
    max_q_len: int | None = None,
    softmax_scale: float | None = None,
    num_splits: int = 1,
    causal: bool = True,
    return_lse: bool = False,
    launch: tuple[int, int, int] | None = None,
    fast_kernel: bool = True,
    inline_asm: bool = True,
    defer_sums: bool | None = None,
    autotune: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`paged_attention_quantized` over e4m3 pages (checked to be :class:`Fp8Pages`),
    with a ``(BLOCK_N, num_warps, num_stages)`` tuple for ``launch`` (None: the decode
    schedule of int8 pages, :func:`decode_launch`) and one split unless told otherwise;
    the kernel variants as there."""
    if not isinstance(k_pages, Fp8Pages) or not isinstance(v_pages, Fp8Pages):
        raise ValueError("k_pages and v_pages must both be Fp8Pages")
    return paged_attention_quantized(
        q, k_pages, v_pages, block_tables, seq_lens, cu_seqlens_q, max_q_len=max_q_len, softmax_scale=softmax_scale,
        num_splits=num_splits, causal=causal, return_lse=return_lse,
        launch=None if launch is None else dict(zip(_LAUNCH_KEYS, launch, strict=True)),
        fast_kernel=fast_kernel, inline_asm=inline_asm, defer_sums=defer_sums, autotune=autotune,
    )


def _launch(kernel, tuned, grid, args, meta, launch, device, max_q_len, autotune: bool, *,
            block_n: int | None = None) -> None:
    """Run ``kernel``: under the interpreter with small tiles; on a GPU with the fixed
    schedule ``launch`` (:data:`DEFAULT_LAUNCH` when None and not ``autotune``) or through
    its autotuner ``tuned``. ``block_n`` forces BLOCK_N (per-channel pages)."""
    if interpreter_enabled():
        kernel[grid](*args, **meta, BLOCK_N=block_n or _INTERPRETER_BLOCK_N)
        return
    if launch is None and not autotune:
        launch = dict(zip(_LAUNCH_KEYS, DEFAULT_LAUNCH["decode" if max_q_len <= 1 else "prefill"], strict=True))
    with torch.cuda.device(device):
        if launch is not None:
            fixed = dict(launch)
            bn = fixed.pop("BLOCK_N", 64)
            kernel[grid](*args, **meta, BLOCK_N=block_n or bn, **fixed)
        elif block_n is not None:
            tuned[grid](*args, **meta, BLOCK_N=block_n)
        else:
            tuned[grid](*args, **meta)


# --------------------------------------------------------------------------------------
# PyTorch reference (the semantics the kernels reproduce)
# --------------------------------------------------------------------------------------


def paged_attention_ref(
    q: torch.Tensor,
    k_pages: Pages,
    v_pages: Pages,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    *,
    softmax_scale: float | None = None,
    causal: bool = True,
    dtype: torch.dtype = torch.float64,
    window_left: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the dequantized pages (any format) in ``dtype`` (default float64):
    ``(out, lse)``, with an optional causal sliding window and logit soft-cap (:mod:`.score_mods`)."""
    decode = cu_seqlens_q is None
    batch = q.shape[0] if decode else cu_seqlens_q.numel() - 1
    cu = list(range(batch + 1)) if decode else cu_seqlens_q.tolist()
    hq, d = q.shape[1], q.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    lse = torch.full((hq, q.shape[0]), float("-inf"), dtype=dtype, device=q.device)
    for b in range(batch):
        n_q, ctx = cu[b + 1] - cu[b], int(seq_lens[b])
        if n_q == 0:
            continue
        k = gather_sequence(k_pages, block_tables[b], ctx).to(dtype)
        v = gather_sequence(v_pages, block_tables[b], ctx).to(dtype)
        group = hq // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        qb = q[cu[b]:cu[b + 1]].to(dtype)
        s = torch.einsum("qhd,khd->hqk", qb, k) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        if causal:
            rows = torch.arange(n_q, device=q.device)[:, None] + (ctx - n_q)
            cols = torch.arange(ctx, device=q.device)[None, :]
            hidden = cols > rows
            if window_left is not None and window_left >= 0:
                hidden = hidden | (cols < rows - window_left)
            s = s.masked_fill(hidden, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)  # [h, q]
        p = torch.exp(s - torch.where(torch.isinf(row_lse), 0.0, row_lse)[..., None])
        p = torch.nan_to_num(p)
        out[cu[b]:cu[b + 1]] = torch.einsum("hqk,khd->qhd", p, v)
        lse[:, cu[b]:cu[b + 1]] = row_lse
    return out, lse


def paged_attention_fp8_ref(
    q: torch.Tensor,
    k_pages: Fp8Pages,
    v_pages: Fp8Pages,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    *,
    softmax_scale: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal :func:`paged_attention_ref` over e4m3 pages in ``dtype`` (default float32):
    ``(out, lse [Hq, total_q])``. The engine's path where Triton cannot run."""
    if not isinstance(k_pages, Fp8Pages) or not isinstance(v_pages, Fp8Pages):
        raise ValueError("k_pages and v_pages must both be Fp8Pages")
    return paged_attention_ref(q, k_pages, v_pages, block_tables, seq_lens, cu_seqlens_q,
                               softmax_scale=softmax_scale, dtype=dtype)
