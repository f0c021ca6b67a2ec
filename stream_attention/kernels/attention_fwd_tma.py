"""Hopper fast path of the attention forward: tiles arrive through TMA tensor descriptors.

Same algorithm and conventions as :mod:`.attention_fwd` (base-2 online softmax,
bottom-right causal alignment, sliding windows, GQA, natural-log LSE out), restricted to
the case that dominates training and prefill: dense 16-bit ``[B, T, H, D]`` tensors with
a power-of-two head dim, no masks, no dropout. Everything else takes the pointer kernel.

What differs from the pointer kernel, and why:

* Q, K and V tiles are fetched by the tensor memory accelerator from host-built
  descriptors over a 2-D view of each tensor (rows = tokens of one sequence/head, columns
  = head dim). The copy engine writes shared memory directly in the swizzled layout the
  ``wgmma`` instructions read, and frees the warps from address arithmetic.
* The scale is applied inside the exponent as one fused multiply-add per score,
  ``exp2(s * c - m * c)``, with the running max taken on unscaled scores; the pointer
  kernel scales the whole tile first (one extra multiply per score).
* Causal and windowed launches visit query blocks longest-first, so the last wave of
  programs is the short ones.

The 2-D view needs the token and head strides to flatten into rows: ``[B, T, H, D]``
contiguous (rows ``b*T + t``, column ``h*D``) or ``[B, H, T, D]`` contiguous read through a
transposed view (rows ``(b*H + h)*T + t``). Rows read past the end of one sequence belong
to the next sequence (or are zero-filled past the tensor): the masked tail tile removes
their scores, and the output is stored with a row mask rather than through TMA.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from .attention_fwd import key_range, window_bounds
from .runtime import interpreter_enabled

try:  # host-side descriptors: triton >= 3.3
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton
    TensorDescriptor = None

_LOG2E = 1.0 / math.log(2.0)


@triton.jit
def _tma_kv_tiles(
    acc,
    l_i,
    m_i,
    q,
    desc_k,
    desc_v,
    k_row0,
    k_col,
    v_row0,
    v_col,
    offs_m,
    offs_n,
    lo,
    hi,
    seqlen_k,
    qk_scale,
    diag_offset,
    window_left,
    window_right,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = desc_k.load([k_row0 + start_n, k_col])
        qk = tl.dot(q, k.T)
        if MASKED:
            cols = start_n + offs_n
            rel = cols[None, :] - (offs_m[:, None] + diag_offset)
            visible = (cols < seqlen_k)[None, :] & (rel <= window_right) & (rel >= -window_left)
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # Rows with nothing visible yet keep m = -inf; shift by 0 so exp2 gives 0, not NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_shift[:, None])
        else:
            # Unscaled max, scaled inside the FMA (qk_scale > 0 keeps the argmax).
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_shift = m_new
            p = tl.math.exp2(qk * qk_scale - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = desc_v.load([v_row0 + start_n, v_col])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _tma_kv_tiles_lookahead(
    acc,
    l_i,
    m_i,
    q,
    desc_k,
    desc_v,
    k_row0,
    k_col,
    v_row0,
    v_col,
    lo,
    hi,
    qk_scale,
    BLOCK_N: tl.constexpr,
):
    """Unmasked tiles with the next tile's ``Q K^T`` issued before this tile's softmax,
    so the asynchronous tensor-core product can overlap the exponentials."""
    if hi > lo:
        k = desc_k.load([k_row0 + lo, k_col])
        qk = tl.dot(q, k.T)
        for start_n in tl.range(lo, hi, BLOCK_N):
            # The last iteration recomputes the final tile instead of reading past hi.
            nxt = tl.minimum(start_n + BLOCK_N, hi - BLOCK_N)
            k_next = desc_k.load([k_row0 + nxt, k_col])
            qk_next = tl.dot(q, k_next.T)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            v = desc_v.load([v_row0 + start_n, v_col])
            acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
            qk = qk_next
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_tma_kernel(
    desc_q,
    desc_k,
    desc_v,
    Out,
    Lse,
    q_rows_b,
    q_rows_h,
    q_col_h,
    k_rows_b,
    k_rows_h,
    k_col_h,
    v_rows_b,
    v_rows_h,
    v_col_h,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_lb,
    stride_lh,
    seqlen_q,
    seqlen_k,
    num_heads_q,
    group_size,
    qk_scale,
    window_left,
    window_right,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_BOUNDED: tl.constexpr,
    STORE_LSE: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    LOOKAHEAD: tl.constexpr,
):
    start_m = tl.program_id(0)
    if IS_BOUNDED:
        # Longest rows first: under a causal mask later query blocks see more keys.
        start_m = tl.num_programs(0) - 1 - start_m
    batch_head = tl.program_id(1)
    b = batch_head // num_heads_q
    h = batch_head % num_heads_q
    kv_h = h // group_size
    m0 = start_m * BLOCK_M

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q = desc_q.load([b * q_rows_b + h * q_rows_h + m0, h * q_col_h])
    k_row0 = b * k_rows_b + kv_h * k_rows_h
    v_row0 = b * v_rows_b + kv_h * v_rows_h
    k_col = kv_h * k_col_h
    v_col = kv_h * v_col_h

    diag_offset = seqlen_k - seqlen_q
    lo_any, lo_full, hi_full, hi_any = key_range(
        m0, seqlen_k, diag_offset, window_left, window_right, 0, seqlen_k, BLOCK_M, BLOCK_N, IS_BOUNDED
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if IS_BOUNDED:
        acc, l_i, m_i = _tma_kv_tiles(
            acc, l_i, m_i, q, desc_k, desc_v, k_row0, k_col, v_row0, v_col, offs_m, offs_n,
            lo_any, lo_full, seqlen_k, qk_scale, diag_offset, window_left, window_right,
            BLOCK_N, True, False,
        )
    if LOOKAHEAD:
        acc, l_i, m_i = _tma_kv_tiles_lookahead(
            acc, l_i, m_i, q, desc_k, desc_v, k_row0, k_col, v_row0, v_col, lo_full, hi_full, qk_scale, BLOCK_N,
        )
    else:
        acc, l_i, m_i = _tma_kv_tiles(
            acc, l_i, m_i, q, desc_k, desc_v, k_row0, k_col, v_row0, v_col, offs_m, offs_n,
            lo_full, hi_full, seqlen_k, qk_scale, diag_offset, window_left, window_right,
            BLOCK_N, False, WARP_SPECIALIZE,
        )
    acc, l_i, m_i = _tma_kv_tiles(
        acc, l_i, m_i, q, desc_k, desc_v, k_row0, k_col, v_row0, v_col, offs_m, offs_n,
        hi_full, hi_any, seqlen_k, qk_scale, diag_offset, window_left, window_right,
        BLOCK_N, True, False,
    )

    row_ok = offs_m < seqlen_q
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = (Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
              + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    if STORE_LSE:
        lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
        lse = tl.where(l_i == 0.0, float("-inf"), lse)
        tl.store(Lse + b.to(tl.int64) * stride_lb + h * stride_lh + offs_m, lse, mask=row_ok)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by head dim, from the H100 sweep of
# benchmarks/bench_hopper.py (RESULTS.md, v6): at hd128 one warpgroup on 64 rows beat two
# on 128 (527 vs 465 TFLOP/s non-causal, 471 vs 411 causal); at hd64 128 rows on 4 warps
# won (429 vs 419). Override per call with ``config=``.
DEFAULT_TMA_CONFIG = {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (64, 64, 4, 3),
                      256: (64, 64, 8, 2)}
DEFAULT_LOOKAHEAD = False


def _row_view(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int] | None:
    """``(2-D view, rows per batch, rows per head, column per head)`` of a
    ``[B, T, H, D]`` tensor whose tokens flatten into rows, or None."""
    bsz, t, h, d = x.shape
    sb, st, sh, sd = x.stride()
    if sd != 1 or x.data_ptr() % 16:
        return None
    elem = x.element_size()
    if (h == 1 or sh * (h - 1) + d <= st) and (bsz == 1 or sb == t * st) and (st * elem) % 16 == 0:
        # [B, T, H, D]-like: row = b*T + t, column = h*sh (heads side by side in a row).
        # Width is what the heads span, not the row stride: q/k/v slices of a fused
        # projection must not reach past the end of their storage.
        width = sh * (h - 1) + d
        return x.as_strided((bsz * t, width), (st, 1)), t, 0, sh
    if st == d and (h == 1 or sh == t * d) and (bsz == 1 or sb == h * sh) and (d * elem) % 16 == 0:
        # [B, H, T, D]-like: row = (b*H + h)*T + t, column 0.
        return x.as_strided((bsz * h * t, d), (d, 1)), h * t, t, 0
    return None


def tma_preferred(q: torch.Tensor, k: torch.Tensor, causal: bool, window: tuple[int, int] | None) -> bool:
    """Whether the TMA kernel is the faster choice for this shape on the H100 measurements:
    everywhere except hd128 non-causal at >= 8k keys, where the pointer kernel's 128-row
    tiles measured ~5% faster (RESULTS.md v0.3)."""
    return not (q.shape[-1] == 128 and not causal and window is None and k.shape[1] >= 8192)


def tma_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the descriptor kernel can take these (already validated) dense tensors."""
    if TensorDescriptor is None:
        return False
    if q.device.type == "cuda":
        if torch.cuda.get_device_capability(q.device)[0] < 9:
            return False
    elif not (q.device.type == "cpu" and interpreter_enabled()):
        return False
    d = q.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16) or d not in DEFAULT_TMA_CONFIG:
        return False
    if not (q.dtype == k.dtype == v.dtype):
        return False
    return all(_row_view(t) is not None for t in (q, k, v))


def attention_forward_tma(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float,
    window: tuple[int, int] | None = None,
    store_lse: bool = True,
    config: tuple[int, int, int, int] | None = None,
    warp_specialize: bool = False,
    lookahead: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward through TMA descriptors; the caller checked :func:`tma_supported`.

    Shapes and results as :func:`~.attention_fwd.attention_forward` (dense only).
    ``softmax_scale`` must be positive. ``lookahead`` issues each unmasked tile's
    ``Q K^T`` one iteration early (default: :data:`DEFAULT_LOOKAHEAD`).
    """
    batch, seqlen_q, hq, d = q.shape
    seqlen_k, hkv = k.shape[1], k.shape[2]
    bm, bn, warps, stages = config or DEFAULT_TMA_CONFIG[d]
    if interpreter_enabled():  # small tiles keep CPU tests quick
        bm, bn, warps, stages = min(bm, 32), min(bn, 16), 4, 1
    left, right, bounded = window_bounds(causal, window)
    out = torch.empty_like(q)
    lse = torch.empty((batch, hq, seqlen_q), device=q.device, dtype=torch.float32) if store_lse else None
    if batch == 0 or seqlen_q == 0 or hq == 0:
        if lse is not None:
            lse.fill_(float("-inf"))
        return out.zero_(), lse
    views = [_row_view(t) for t in (q, k, v)]
    descs = [
        TensorDescriptor(view[0], list(view[0].shape), list(view[0].stride()), [rows, d])
        for view, rows in zip(views, (bm, bn, bn), strict=True)
    ]
    row_maps = [n for view in views for n in view[1:]]
    ob, ot, oh, _ = out.stride()
    ls = (lse.stride(0), lse.stride(1)) if store_lse else (0, 0)
    grid = (triton.cdiv(seqlen_q, bm), batch * hq)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _attn_fwd_tma_kernel[grid](
            *descs, out, lse if store_lse else out, *row_maps, ob, ot, oh, *ls,
            seqlen_q, seqlen_k, hq, hq // hkv, softmax_scale * _LOG2E, left, right,
            HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, IS_BOUNDED=bounded, STORE_LSE=store_lse,
            WARP_SPECIALIZE=warp_specialize, LOOKAHEAD=DEFAULT_LOOKAHEAD if lookahead is None else lookahead,
            num_warps=warps, num_stages=stages,
        )
    return out, lse
