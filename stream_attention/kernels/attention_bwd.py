"""Fused attention backward (dQ, dK, dV) in Triton, FlashAttention-2 style.

The forward saved the natural-log LSE per query row, so probabilities are recomputed
tile by tile as ``P = exp(S - lse)`` and no ``[Tq, Tk]`` matrix is ever stored. Three
launches:

1. ``delta = rowsum(dO * O) - dLSE`` per query row (``dLSE`` only when the caller
   differentiates through the LSE, e.g. ring attention's merges);
2. one program per key tile of one (sequence, kv head) holds ``K``/``V`` and its ``dK``/
   ``dV`` accumulators and streams the query tiles that can see it, for every query head
   of its GQA group in turn. Nothing is shared between programs, hence no atomics and
   bitwise reproducible gradients (the backward is always deterministic);
3. one program per query tile of one (sequence, query head) streams the visible key tiles
   and accumulates ``dQ``.

With ``dS = P * (dP - delta)``: ``dV = P_drop^T dO``, ``dK = scale * dS^T Q``,
``dQ = scale * dS K`` and, for an additive bias, ``dBias = dS``. Dropout regenerates the
forward's Philox mask; ``delta`` needs no change because ``rowsum(dO * O)`` already
equals ``rowsum(P * dP)`` with the dropped, rescaled ``dP``.

Band skipping mirrors the forward: each program visits only tiles that intersect the
causal / sliding-window band and the key-padding range, and only the tiles that straddle
an edge pay for the element masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_fwd import _LOG2E, _bucket, dense_or_varlen_strides, dot_precision_for, key_range, window_bounds
from .masks_dropout import apply_masks, dropout_keep, mask_dropout_meta, prepare_masks
from .runtime import first_config, interpreter_enabled, launch_kwargs

__all__ = ["attention_backward", "INTERPRETER_BWD_BLOCKS"]

# Small fixed tiles under the interpreter: quick on CPU, still several tiles per axis.
INTERPRETER_BWD_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32}
INTERPRETER_DQ_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 16}
_PREPROCESS_BLOCK_M = 64


@triton.jit
def _bwd_preprocess_kernel(
    Out,
    DOut,
    DLse,
    Delta,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_od,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_dod,
    stride_lb,
    stride_lh,
    stride_lt,
    stride_db,
    stride_dh,
    stride_dt,
    cu_seqlens_q,
    seqlen_q,
    num_heads_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    start_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = batch_head // num_heads_q
    h = batch_head % num_heads_q
    if IS_VARLEN:
        q_start = tl.load(cu_seqlens_q + b)
        seqlen_q = tl.load(cu_seqlens_q + b + 1) - q_start
        tok = q_start.to(tl.int64)
        o_base = tok * stride_ot
        do_base = tok * stride_dot
        l_base = tok * stride_lt
        d_base = tok * stride_dt
    else:
        o_base = b.to(tl.int64) * stride_ob
        do_base = b.to(tl.int64) * stride_dob
        l_base = b.to(tl.int64) * stride_lb
        d_base = b.to(tl.int64) * stride_db
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if start_m * BLOCK_M >= seqlen_q:
        return
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(
        Out + o_base + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od, mask=ok, other=0.0
    )
    do = tl.load(
        DOut + do_base + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
        mask=ok,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    if HAS_DLSE:
        dlse = tl.load(DLse + l_base + h * stride_lh + offs_m * stride_lt, mask=offs_m < seqlen_q, other=0.0)
        delta = delta - dlse.to(tl.float32)
    tl.store(Delta + d_base + h * stride_dh + offs_m * stride_dt, delta, mask=offs_m < seqlen_q)


@triton.jit
def _tile_probabilities(
    qk, lse2, rows, cols, seqlen_q, seqlen_k, diag_offset, window_left, window_right,
    bias_base, stride_bm, stride_bn, kpm_base, stride_kpm,
    MASKED: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_KPM: tl.constexpr, HAS_MASKS: tl.constexpr,
):
    """The forward's probabilities ``exp2(S - lse2)`` of a tile of base-2 scores ``qk``, with
    the masks applied. ``lse2``, the query ``rows`` and key ``cols`` broadcast to the tile,
    so either orientation works (the dK/dV pass keeps transposed tiles). ``MASKED`` tiles
    straddle an edge: elements outside the band or the sequences become 0."""
    if HAS_MASKS:
        qk = apply_masks(
            qk, rows, cols, seqlen_q, seqlen_k, bias_base, stride_bm, stride_bn, kpm_base, stride_kpm, BIAS_KIND,
            HAS_KPM,
        )
    p = tl.math.exp2(qk - lse2)
    if MASKED:
        rel = cols - (rows + diag_offset)
        visible = (cols < seqlen_k) & (rows < seqlen_q) & (rel <= window_right) & (rel >= -window_left)
        p = tl.where(visible, p, 0.0)
    return p


@triton.jit
def _dkdv_q_tiles(
    dk,
    dv,
    k,
    v,
    q_ptrs,
    do_ptrs,
    lse_ptrs,
    delta_ptrs,
    stride_qt,
    stride_dot,
    stride_lt,
    stride_dt,
    offs_m_base,
    offs_n,
    offs_d,
    lo,
    hi,
    seqlen_q,
    seqlen_k,
    qk_scale,
    diag_offset,
    window_left,
    window_right,
    bias_base,
    stride_bm,
    stride_bn,
    kpm_base,
    stride_kpm,
    philox_seed,
    philox_offset,
    philox_row_stride,
    bh,
    dropout_p,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_MASKS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    """Accumulate one key tile's dK/dV over query tiles ``[lo, hi)`` of one head.

    Works on transposed ``[BLOCK_N, BLOCK_M]`` score tiles so both products land in the
    key-major accumulators without transposing them.
    """
    d_mask = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_m_base
        row_ok = offs_m < seqlen_q
        if MASKED:
            qT = tl.load(q_ptrs + start_m * stride_qt, mask=d_mask[:, None] & row_ok[None, :], other=0.0)
            do = tl.load(do_ptrs + start_m * stride_dot, mask=row_ok[:, None] & d_mask[None, :], other=0.0)
            lse = tl.load(lse_ptrs + offs_m * stride_lt, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_ptrs + offs_m * stride_dt, mask=row_ok, other=0.0)
        elif BLOCK_D != HEAD_DIM:
            qT = tl.load(q_ptrs + start_m * stride_qt, mask=d_mask[:, None], other=0.0)
            do = tl.load(do_ptrs + start_m * stride_dot, mask=d_mask[None, :], other=0.0)
            lse = tl.load(lse_ptrs + offs_m * stride_lt)
            delta = tl.load(delta_ptrs + offs_m * stride_dt)
        else:
            qT = tl.load(q_ptrs + start_m * stride_qt)
            do = tl.load(do_ptrs + start_m * stride_dot)
            lse = tl.load(lse_ptrs + offs_m * stride_lt)
            delta = tl.load(delta_ptrs + offs_m * stride_dt)
        # Rows that saw no key have lse = -inf; +inf makes their probabilities 0, not NaN.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        qkT = tl.dot(k, qT, input_precision=DOT_PRECISION) * qk_scale
        pT = _tile_probabilities(
            qkT, lse2[None, :], offs_m[None, :], offs_n[:, None], seqlen_q, seqlen_k, diag_offset, window_left,
            window_right, bias_base, stride_bm, stride_bn, kpm_base, stride_kpm, MASKED, BIAS_KIND, HAS_KPM, HAS_MASKS,
        )
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep(
                philox_seed, philox_offset, bh, offs_m[None, :], offs_n[:, None], philox_row_stride, dropout_p
            )
            inv_keep = 1.0 / (1.0 - dropout_p)
            dv = tl.dot(tl.where(keep, pT * inv_keep, 0.0).to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dpT = tl.where(keep, dpT * inv_keep, 0.0)
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _row_base(row0, stride_b, stride_t, IS_VARLEN: tl.constexpr):
    """Offset of a sequence's first row in a tensor: its first packed token (varlen) or its
    batch index (dense), as returned by :func:`_bwd_prologue`."""
    if IS_VARLEN:
        return row0 * stride_t
    else:
        return row0 * stride_b


@triton.jit
def _bwd_prologue(
    b,
    cu_seqlens_q,
    cu_seqlens_k,
    seqlen_q,
    seqlen_k,
    stride_qb,
    stride_qt,
    stride_dob,
    stride_dot,
    stride_lb,
    stride_lt,
    stride_deb,
    stride_det,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    IS_VARLEN: tl.constexpr,
):
    """Where sequence ``b`` lives, shared by both backward kernels: its lengths (varlen:
    from ``cu_seqlens``; dense: the arguments), the int64 row index of its first query and
    key (``q_row0``, ``k_row0``: for :func:`_row_base` of the output tensors), and the
    offsets of its rows in Q, dO, LSE, Delta, K and V."""
    if IS_VARLEN:
        q_row0 = tl.load(cu_seqlens_q + b).to(tl.int64)
        seqlen_q = (tl.load(cu_seqlens_q + b + 1) - q_row0).to(tl.int32)
        k_row0 = tl.load(cu_seqlens_k + b).to(tl.int64)
        seqlen_k = (tl.load(cu_seqlens_k + b + 1) - k_row0).to(tl.int32)
    else:
        q_row0 = b.to(tl.int64)
        k_row0 = q_row0
    q_base = _row_base(q_row0, stride_qb, stride_qt, IS_VARLEN)
    do_base = _row_base(q_row0, stride_dob, stride_dot, IS_VARLEN)
    l_base = _row_base(q_row0, stride_lb, stride_lt, IS_VARLEN)
    de_base = _row_base(q_row0, stride_deb, stride_det, IS_VARLEN)
    k_base = _row_base(k_row0, stride_kb, stride_kt, IS_VARLEN)
    v_base = _row_base(k_row0, stride_vb, stride_vt, IS_VARLEN)
    return seqlen_q, seqlen_k, q_row0, k_row0, q_base, do_base, l_base, de_base, k_base, v_base


@triton.jit(do_not_specialize=["philox_seed", "philox_offset"])
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DOut,
    Lse,
    Delta,
    DK,
    DV,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_dod,
    stride_lb,
    stride_lh,
    stride_lt,
    stride_deb,
    stride_deh,
    stride_det,
    stride_dkb,
    stride_dkt,
    stride_dkh,
    stride_dkd,
    stride_dvb,
    stride_dvt,
    stride_dvh,
    stride_dvd,
    cu_seqlens_q,
    cu_seqlens_k,
    seqlen_q,
    seqlen_k,
    num_heads_q,
    num_heads_kv,
    group_size,
    qk_scale,
    sm_scale,
    window_left,
    window_right,
    Bias,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    Kpm,
    stride_kpm_b,
    stride_kpm_n,
    KvBounds,
    philox_seed,
    philox_offset,
    dropout_p,
    tune_bucket,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    IS_BOUNDED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_MASKS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    start_n = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = batch_head // num_heads_kv
    kv_h = batch_head % num_heads_kv
    philox_row_stride = seqlen_k

    seqlen_q, seqlen_k, q_row0, k_row0, q_base, do_base, l_base, de_base, k_base, v_base = _bwd_prologue(
        b, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, stride_qb, stride_qt, stride_dob, stride_dot,
        stride_lb, stride_lt, stride_deb, stride_det, stride_kb, stride_kt, stride_vb, stride_vt, IS_VARLEN,
    )
    dk_base = _row_base(k_row0, stride_dkb, stride_dkt, IS_VARLEN)
    dv_base = _row_base(k_row0, stride_dvb, stride_dvt, IS_VARLEN)

    n0 = start_n * BLOCK_N
    if n0 >= seqlen_k:
        return

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < seqlen_k
    d_mask = offs_d < HEAD_DIM
    kv_mask = col_ok[:, None] & d_mask[None, :]
    k = tl.load(
        K + k_base + kv_h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + v_base + kv_h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
        mask=kv_mask,
        other=0.0,
    )

    # Query rows that can see this key tile: i in [j - off - right, j - off + left].
    diag_offset = seqlen_k - seqlen_q
    last_col = n0 + BLOCK_N - 1
    if IS_BOUNDED:
        lo_any = tl.maximum(n0 - diag_offset - window_right, 0)
        hi_any = tl.minimum(last_col - diag_offset + window_left + 1, seqlen_q)
        lo_full = tl.maximum(last_col - diag_offset - window_right, 0)
        hi_full = tl.maximum(tl.minimum(n0 - diag_offset + window_left + 1, seqlen_q), 0)
    else:
        lo_any = 0
        hi_any = seqlen_q
        lo_full = 0
        hi_full = seqlen_q
    lo_any = lo_any // BLOCK_M * BLOCK_M
    hi_any = tl.maximum(hi_any, lo_any)
    lo_full = (lo_full + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    lo_full = tl.minimum(tl.maximum(lo_full, lo_any), hi_any)
    hi_full = tl.minimum(tl.maximum(hi_full // BLOCK_M * BLOCK_M, lo_full), hi_any)
    # A ragged key tile is masked for every query tile.
    hi_full = tl.where(n0 + BLOCK_N > seqlen_k, lo_full, hi_full)
    if HAS_KPM:
        k_lo = tl.load(KvBounds + 2 * b)
        k_hi = tl.load(KvBounds + 2 * b + 1)
        # Padding only: no query attends here, dK = dV = 0.
        padding_only = (n0 >= k_hi) | (n0 + BLOCK_N <= k_lo)
        hi_any = tl.where(padding_only, lo_any, hi_any)
        lo_full = tl.where(padding_only, lo_any, lo_full)
        hi_full = tl.where(padding_only, lo_any, hi_full)
    edges = (lo_any, lo_full, hi_full, hi_any)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    kpm_base = Kpm + b.to(tl.int64) * stride_kpm_b
    for g in range(group_size):
        h = kv_h * group_size + g
        bh = b * num_heads_q + h
        qT_ptrs = Q + q_base + h * stride_qh + offs_m[None, :] * stride_qt + offs_d[:, None] * stride_qd
        do_ptrs = DOut + do_base + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod
        lse_ptrs = Lse + l_base + h * stride_lh
        delta_ptrs = Delta + de_base + h * stride_deh
        bias_base = Bias + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh
        for stage in tl.static_range(3):  # only the outer two stages straddle an edge and pay for masks
            dk, dv = _dkdv_q_tiles(
                dk,
                dv,
                k,
                v,
                qT_ptrs,
                do_ptrs,
                lse_ptrs,
                delta_ptrs,
                stride_qt,
                stride_dot,
                stride_lt,
                stride_det,
                offs_m,
                offs_n,
                offs_d,
                edges[stage],
                edges[stage + 1],
                seqlen_q,
                seqlen_k,
                qk_scale,
                diag_offset,
                window_left,
                window_right,
                bias_base,
                stride_bm,
                stride_bn,
                kpm_base,
                stride_kpm_n,
                philox_seed,
                philox_offset,
                philox_row_stride,
                bh,
                dropout_p,
                HEAD_DIM,
                BLOCK_D,
                BLOCK_M,
                stage != 1,
                DOT_PRECISION,
                BIAS_KIND,
                HAS_KPM,
                HAS_MASKS,
                HAS_DROPOUT,
            )

    dk = dk * sm_scale
    tl.store(
        DK + dk_base + kv_h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
        dk.to(DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        DV + dv_base + kv_h * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty),
        mask=kv_mask,
    )


@triton.jit
def _dq_kv_tiles(
    dq,
    q,
    do,
    lse2,
    delta,
    kT_ptrs,
    vT_ptrs,
    stride_kt,
    stride_vt,
    offs_m,
    offs_n_base,
    offs_d,
    lo,
    hi,
    seqlen_q,
    seqlen_k,
    qk_scale,
    diag_offset,
    window_left,
    window_right,
    bias_base,
    stride_bm,
    stride_bn,
    kpm_base,
    stride_kpm,
    dbias_base,
    stride_dbm,
    philox_seed,
    philox_offset,
    philox_row_stride,
    bh,
    dropout_p,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_MASKS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_DBIAS: tl.constexpr,
):
    d_mask = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n_base
        if MASKED:
            col_ok = cols < seqlen_k
            kT = tl.load(kT_ptrs + start_n * stride_kt, mask=d_mask[:, None] & col_ok[None, :], other=0.0)
            vT = tl.load(vT_ptrs + start_n * stride_vt, mask=d_mask[:, None] & col_ok[None, :], other=0.0)
        elif BLOCK_D != HEAD_DIM:
            kT = tl.load(kT_ptrs + start_n * stride_kt, mask=d_mask[:, None], other=0.0)
            vT = tl.load(vT_ptrs + start_n * stride_vt, mask=d_mask[:, None], other=0.0)
        else:
            kT = tl.load(kT_ptrs + start_n * stride_kt)
            vT = tl.load(vT_ptrs + start_n * stride_vt)
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
        p = _tile_probabilities(
            qk, lse2[:, None], offs_m[:, None], cols[None, :], seqlen_q, seqlen_k, diag_offset, window_left,
            window_right, bias_base, stride_bm, stride_bn, kpm_base, stride_kpm, MASKED, BIAS_KIND, HAS_KPM, HAS_MASKS,
        )
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep(
                philox_seed, philox_offset, bh, offs_m[:, None], cols[None, :], philox_row_stride, dropout_p
            )
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if STORE_DBIAS:
            ok = (offs_m[:, None] < seqlen_q) & (cols[None, :] < seqlen_k)
            tl.store(dbias_base + offs_m[:, None].to(tl.int64) * stride_dbm + cols[None, :], ds, mask=ok)
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["philox_seed", "philox_offset"])
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DOut,
    Lse,
    Delta,
    DQ,
    DBias,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_dod,
    stride_lb,
    stride_lh,
    stride_lt,
    stride_deb,
    stride_deh,
    stride_det,
    stride_dqb,
    stride_dqt,
    stride_dqh,
    stride_dqd,
    stride_dbb,
    stride_dbh,
    stride_dbm,
    cu_seqlens_q,
    cu_seqlens_k,
    seqlen_q,
    seqlen_k,
    num_heads_q,
    group_size,
    qk_scale,
    sm_scale,
    window_left,
    window_right,
    Bias,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    Kpm,
    stride_kpm_b,
    stride_kpm_n,
    KvBounds,
    philox_seed,
    philox_offset,
    dropout_p,
    tune_bucket,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    IS_BOUNDED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_MASKS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_DBIAS: tl.constexpr,
):
    start_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = batch_head // num_heads_q
    h = batch_head % num_heads_q
    kv_h = h // group_size
    philox_row_stride = seqlen_k

    seqlen_q, seqlen_k, q_row0, k_row0, q_base, do_base, l_base, de_base, k_base, v_base = _bwd_prologue(
        b, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, stride_qb, stride_qt, stride_dob, stride_dot,
        stride_lb, stride_lt, stride_deb, stride_det, stride_kb, stride_kt, stride_vb, stride_vt, IS_VARLEN,
    )
    dq_base = _row_base(q_row0, stride_dqb, stride_dqt, IS_VARLEN)

    m0 = start_m * BLOCK_M
    if m0 >= seqlen_q:
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    qd_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(
        Q + q_base + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0
    )
    do = tl.load(
        DOut + do_base + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
        mask=qd_mask,
        other=0.0,
    )
    lse = tl.load(Lse + l_base + h * stride_lh + offs_m * stride_lt, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + de_base + h * stride_deh + offs_m * stride_det, mask=row_ok, other=0.0)
    kT_ptrs = K + k_base + kv_h * stride_kh + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd
    vT_ptrs = V + v_base + kv_h * stride_vh + offs_n[None, :] * stride_vt + offs_d[:, None] * stride_vd
    bias_base = Bias + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh
    kpm_base = Kpm + b.to(tl.int64) * stride_kpm_b
    dbias_base = DBias + b.to(tl.int64) * stride_dbb + h.to(tl.int64) * stride_dbh

    k_lo = 0
    k_hi = seqlen_k
    if HAS_KPM:
        k_lo = tl.load(KvBounds + 2 * b)
        k_hi = tl.load(KvBounds + 2 * b + 1)
    diag_offset = seqlen_k - seqlen_q
    lo_any, lo_full, hi_full, hi_any = key_range(
        m0, seqlen_k, diag_offset, window_left, window_right, k_lo, k_hi, BLOCK_M, BLOCK_N, IS_BOUNDED
    )

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    edges = (lo_any, lo_full, hi_full, hi_any)
    for stage in tl.static_range(3):  # only the outer two stages straddle an edge and pay for masks
        dq = _dq_kv_tiles(
            dq,
            q,
            do,
            lse2,
            delta,
            kT_ptrs,
            vT_ptrs,
            stride_kt,
            stride_vt,
            offs_m,
            offs_n,
            offs_d,
            edges[stage],
            edges[stage + 1],
            seqlen_q,
            seqlen_k,
            qk_scale,
            diag_offset,
            window_left,
            window_right,
            bias_base,
            stride_bm,
            stride_bn,
            kpm_base,
            stride_kpm_n,
            dbias_base,
            stride_dbm,
            philox_seed,
            philox_offset,
            philox_row_stride,
            batch_head,
            dropout_p,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_N,
            stage != 1,
            DOT_PRECISION,
            BIAS_KIND,
            HAS_KPM,
            HAS_MASKS,
            HAS_DROPOUT,
            STORE_DBIAS,
        )
    dq = dq * sm_scale
    tl.store(
        DQ + dq_base + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
        dq.to(DQ.dtype.element_ty),
        mask=qd_mask,
    )


def _prune(configs, named_args, acc_rows_key: str, max_acc_regs: int, stream_rows_key: str, **kwargs):
    """Drop tiles whose fp32 accumulators would spill registers or whose pipelined operands
    would overflow shared memory (every kept entry costs a compile per key)."""
    block_d = named_args.get("BLOCK_D", kwargs.get("BLOCK_D", 128))
    elem = named_args["Q"].element_size()
    kept = []
    for cfg in configs:
        acc_rows, stream_rows = cfg.kwargs[acc_rows_key], cfg.kwargs[stream_rows_key]
        acc_regs = acc_rows * block_d / (32 * cfg.num_warps)
        smem = (2 * acc_rows * block_d + cfg.num_stages * 2 * stream_rows * block_d) * elem
        if acc_regs <= max_acc_regs and smem <= 200 * 1024:
            kept.append(cfg)
    return kept or configs[-1:]


def _prune_dkdv_configs(configs, named_args, **kwargs):
    # Two accumulators (dK, dV) of BLOCK_N rows; query tiles stream.
    return _prune(configs, named_args, "BLOCK_N", 64, "BLOCK_M", **kwargs)


def _prune_dq_configs(configs, named_args, **kwargs):
    # One accumulator (dQ) of BLOCK_M rows; key tiles stream.
    return _prune(configs, named_args, "BLOCK_M", 128, "BLOCK_N", **kwargs)


# Key tiles wide, query tiles narrow for dK/dV (the accumulators are key-major) and the
# reverse for dQ, as in FlashAttention-2. The last entry of each list is the one left for
# head_dim 256.
_DKDV_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(32, 128, 4, 3), (64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 3), (32, 64, 8, 2)]
]
_DQ_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 8, 2)]
]
def _preferred_bwd_configs(head_dim: int, bounded: bool):
    """dK/dV and dQ configs used when autotuning is off: the H100 autotuner's bf16 picks."""
    if head_dim <= 64:
        return (64, 64, 4, 3), (64, 64, 4, 3)
    if head_dim <= 128:
        return ((64, 128, 8, 2) if bounded else (32, 128, 8, 3)), (128, 64, 8, 3)
    return None, None


_TUNE_KEY = [
    "HEAD_DIM",
    "IS_BOUNDED",
    "IS_VARLEN",
    "tune_bucket",
    "DOT_PRECISION",
    "BIAS_KIND",
    "HAS_KPM",
    "HAS_DROPOUT",
]
_CACHE = {"cache_results": True} if "cache_results" in triton.autotune.__code__.co_varnames else {}
_bwd_dkdv_tuned = triton.autotune(
    configs=_DKDV_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune_dkdv_configs}, **_CACHE
)(_bwd_dkdv_kernel)
_bwd_dq_tuned = triton.autotune(
    configs=_DQ_CONFIGS,
    key=[*_TUNE_KEY, "STORE_DBIAS"],
    prune_configs_by={"early_config_prune": _prune_dq_configs},
    **_CACHE,
)(_bwd_dq_kernel)


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float,
    window: tuple[int, int] | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    dropout_offset: int = 0,
    dlse: torch.Tensor | None = None,
    dbias: torch.Tensor | None = None,
    autotune: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`~stream_attention.kernels.attention_fwd.attention_forward`.

    Takes exactly the forward's layout conventions and options (pass the same
    ``causal``, ``softmax_scale``, ``window``, masks and dropout ``seed``/``offset``):

    * dense: ``dout, q, out [B, Tq, Hq, D]``, ``k, v [B, Tk, Hkv, D]``, ``lse [B, Hq, Tq]``;
    * packed (``cu_seqlens_*`` int32 ``[B + 1]`` plus ``max_seqlen_*``): ``q, out, dout
      [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]``, ``lse [Hq, total_q]``.

    Any strides are accepted for every tensor. ``out`` and ``lse`` are the forward's
    results (or, for ring attention, the globally merged output and LSE: the formulas
    only need the final ``O`` and LSE of the rows). ``dlse``, shaped like ``lse``, adds
    the gradient flowing into the LSE. ``dbias``, a zero-filled fp32 ``[B, Hq, Tq, Tk]``
    buffer, receives the gradient of an additive ``attn_mask`` (the caller reduces it
    over broadcast dimensions).

    Returns ``(dq, dk, dv)`` in the dtypes and layouts of ``q, k, v``. The result is
    deterministic (no atomics): GQA's dK/dV sum over the group inside one program.
    ``autotune`` autotunes the GPU launches instead of taking the measured configs
    (as the forward's ``autotune``; ``STREAM_ATTENTION_AUTOTUNE`` for callers that follow
    the environment).
    """
    varlen = cu_seqlens_q is not None
    head_dim = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(head_dim))
    left, right, bounded = window_bounds(causal, window)
    if varlen:
        # Tokens outside every sequence get zero gradients rather than garbage.
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        batch = cu_seqlens_q.numel() - 1
        hq, hkv = q.shape[1], k.shape[1]
        seqlen_q, seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
        delta = torch.empty((hq, q.shape[0]), device=q.device, dtype=torch.float32)
        ls, des = (0, *lse.stride()), (0, *delta.stride())
        dls = (0, *dlse.stride()) if dlse is not None else (0, 0, 0)
        cu_q, cu_k = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
    else:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        batch, seqlen_q, hq, _ = q.shape
        seqlen_k, hkv = k.shape[1], k.shape[2]
        delta = torch.empty((batch, hq, seqlen_q), device=q.device, dtype=torch.float32)
        ls, des = tuple(lse.stride()), tuple(delta.stride())
        dls = tuple(dlse.stride()) if dlse is not None else (0, 0, 0)
        cu_q = cu_k = torch.empty(1, dtype=torch.int32, device=q.device)
    if batch == 0 or hq == 0 or seqlen_k == 0 or seqlen_q == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()

    store_dbias = dbias is not None
    if store_dbias and (dbias.dtype != torch.float32 or dbias.shape != (batch, hq, seqlen_q, seqlen_k)):
        raise ValueError(
            f"dbias must be float32 {(batch, hq, seqlen_q, seqlen_k)}, got {dbias.dtype} {tuple(dbias.shape)}"
        )
    masks = prepare_masks(
        attn_mask, key_padding_mask, batch=batch, heads=hq, seqlen_q=seqlen_q, seqlen_k=seqlen_k, device=q.device
    )
    group = hq // hkv
    qs, ks, vs = (dense_or_varlen_strides(t, varlen) for t in (q, k, v))
    dos, os_ = dense_or_varlen_strides(dout, varlen), dense_or_varlen_strides(out, varlen)
    interp = interpreter_enabled()

    pre_grid = (triton.cdiv(seqlen_q, _PREPROCESS_BLOCK_M), batch * hq)
    _bwd_preprocess_kernel[pre_grid](
        out,
        dout,
        dlse if dlse is not None else delta,
        delta,
        *os_,
        *dos,
        *dls,
        *des,
        cu_q,
        seqlen_q,
        hq,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=_PREPROCESS_BLOCK_M,
        IS_VARLEN=varlen,
        HAS_DLSE=dlse is not None,
    )

    common_tail = (
        softmax_scale * _LOG2E,
        softmax_scale,
        left,
        right,
        masks.bias,
        *masks.bias_strides,
        masks.kpm,
        masks.kpm_stride,
        1,
        masks.kv_bounds,
        int(dropout_seed),
        int(dropout_offset),
        float(dropout_p),
        _bucket(max(seqlen_q, seqlen_k)),
    )
    meta = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        IS_VARLEN=varlen,
        IS_BOUNDED=bounded,
        DOT_PRECISION=dot_precision_for(q.dtype),
        **mask_dropout_meta(masks, dropout_p),
    )
    # Both kernels take (inputs, their outputs, input strides, output strides, lengths, ...).
    inputs = (q, k, v, dout, lse, delta)
    input_strides = (*qs, *ks, *vs, *dos, *ls, *des)
    lengths = (cu_q, cu_k, seqlen_q, seqlen_k, hq)
    dk_strides, dv_strides = dense_or_varlen_strides(dk, varlen), dense_or_varlen_strides(dv, varlen)
    dkdv_args = (*inputs, dk, dv, *input_strides, *dk_strides, *dv_strides, *lengths, hkv, group, *common_tail)
    dbias_buf = dbias if store_dbias else delta
    dbs = tuple(dbias.stride()[:3]) if store_dbias else (0, 0, 0)
    dq_strides = dense_or_varlen_strides(dq, varlen)
    dq_args = (*inputs, dq, dbias_buf, *input_strides, *dq_strides, *dbs, *lengths, group, *common_tail)
    if interp:
        b1, b2 = INTERPRETER_BWD_BLOCKS, INTERPRETER_DQ_BLOCKS
        _bwd_dkdv_kernel[(triton.cdiv(seqlen_k, b1["BLOCK_N"]), batch * hkv)](*dkdv_args, **meta, **b1)
        _bwd_dq_kernel[(triton.cdiv(seqlen_q, b2["BLOCK_M"]), batch * hq)](
            *dq_args, **meta, STORE_DBIAS=store_dbias, **b2
        )
    else:
        with torch.cuda.device(q.device):
            if autotune:
                _bwd_dkdv_tuned[lambda cfg: (triton.cdiv(seqlen_k, cfg["BLOCK_N"]), batch * hkv)](*dkdv_args, **meta)
                _bwd_dq_tuned[lambda cfg: (triton.cdiv(seqlen_q, cfg["BLOCK_M"]), batch * hq)](
                    *dq_args, **meta, STORE_DBIAS=store_dbias
                )
            else:
                p1, p2 = _preferred_bwd_configs(head_dim, meta["IS_BOUNDED"])
                c1 = first_config(_DKDV_CONFIGS, _prune_dkdv_configs, {"Q": q, **meta}, p1)
                c2 = first_config(_DQ_CONFIGS, _prune_dq_configs, {"Q": q, **meta}, p2)
                _bwd_dkdv_kernel[(triton.cdiv(seqlen_k, c1.kwargs["BLOCK_N"]), batch * hkv)](
                    *dkdv_args, **meta, **launch_kwargs(c1)
                )
                _bwd_dq_kernel[(triton.cdiv(seqlen_q, c2.kwargs["BLOCK_M"]), batch * hq)](
                    *dq_args, **meta, STORE_DBIAS=store_dbias, **launch_kwargs(c2)
                )
    return dq, dk, dv
