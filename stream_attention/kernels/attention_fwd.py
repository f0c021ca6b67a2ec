"""Fused online-softmax attention forward, in Triton.

One program owns a ``BLOCK_M`` slice of query rows of one (sequence, head) and streams
the visible key/value tiles past it, keeping per row a running maximum ``m``, a running
sum ``l`` of ``exp(score - m)`` and an un-normalised output accumulator. Scores are
kept in base 2 (``softmax_scale * log2(e)`` is folded into one multiply) so the hot
loop uses ``exp2``. The natural-log log-sum-exp is written out for the backward pass,
for ring attention's merges and for the decode split-K combine.

The key range a query block visits is split into three stages so that only the tiles
that straddle a boundary (the causal diagonal, a sliding-window edge, the ragged tail
of the keys) pay for masking; tiles wholly outside the band are never visited:

    [lo_any, lo_full)   masked   (left window edge)
    [lo_full, hi_full)  unmasked (every key visible to every row of the block)
    [hi_full, hi_any)   masked   (causal diagonal / right window edge / key tail)

Causal masks are aligned bottom-right: with ``Tq`` queries and ``Tk`` keys, query ``i``
sees keys ``j <= i + (Tk - Tq)``, so a decode step or a prefill chunk against a longer
cache is just a call. A sliding window ``(left, right)`` keeps ``i + off - left <= j <=
i + off + right``. Rows that see no key at all produce zeros and an LSE of ``-inf``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .runtime import interpreter_enabled

# A window bound this large never clips anything; int32-safe for any realistic length.
UNBOUNDED = 1 << 30
_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2

# Triton's interpreter runs one program at a time in numpy; small tiles keep CPU tests
# quick while still crossing several tiles and all three loop stages.
INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 16}


@triton.jit
def _stream_kv_tiles(
    acc, l_i, m_i, q,
    k_tile_ptrs, v_tile_ptrs, stride_kt, stride_vt,
    offs_m, offs_n, offs_d,
    lo, hi, seqlen_k, qk_scale, diag_offset, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    d_mask = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        # K is loaded already transposed ([D, N]) so QK^T is a plain dot.
        k_ptrs = k_tile_ptrs + start_n * stride_kt
        v_ptrs = v_tile_ptrs + start_n * stride_vt
        if MASKED:
            col_ok = cols < seqlen_k
            kT = tl.load(k_ptrs, mask=d_mask[:, None] & col_ok[None, :], other=0.0)
        elif BLOCK_D != HEAD_DIM:
            kT = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)
        else:
            kT = tl.load(k_ptrs)
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            rel = cols[None, :] - (offs_m[:, None] + diag_offset)
            visible = col_ok[None, :] & (rel <= window_right) & (rel >= -window_left)
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row with nothing visible yet keeps m = -inf; subtract 0 instead so the
            # exponentials below are exp2(-inf) = 0 rather than NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_shift = m_new
        p = tl.math.exp2(qk - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=col_ok[:, None] & d_mask[None, :], other=0.0)
        elif BLOCK_D != HEAD_DIM:
            v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_lb, stride_lh, stride_lt,
    cu_seqlens_q, cu_seqlens_k,
    seqlen_q, seqlen_k, num_heads_q, group_size,
    qk_scale, window_left, window_right,
    tune_bucket,  # autotune key only: the max query length rounded to a power of two
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, IS_BOUNDED: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = batch_head // num_heads_q
    h = batch_head % num_heads_q
    kv_h = h // group_size

    if IS_VARLEN:
        q_start = tl.load(cu_seqlens_q + b)
        seqlen_q = tl.load(cu_seqlens_q + b + 1) - q_start
        k_start = tl.load(cu_seqlens_k + b)
        seqlen_k = tl.load(cu_seqlens_k + b + 1) - k_start
        q_base = q_start.to(tl.int64) * stride_qt
        k_base = k_start.to(tl.int64) * stride_kt
        v_base = k_start.to(tl.int64) * stride_vt
        o_base = q_start.to(tl.int64) * stride_ot
        lse_base = q_start.to(tl.int64) * stride_lt
    else:
        q_base = b.to(tl.int64) * stride_qb
        k_base = b.to(tl.int64) * stride_kb
        v_base = b.to(tl.int64) * stride_vb
        o_base = b.to(tl.int64) * stride_ob
        lse_base = b.to(tl.int64) * stride_lb

    m0 = start_m * BLOCK_M
    if m0 >= seqlen_q:
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    d_mask = offs_d < HEAD_DIM

    q_ptrs = Q + q_base + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_mask[None, :], other=0.0)
    k_tile_ptrs = K + k_base + kv_h * stride_kh + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd
    v_tile_ptrs = V + v_base + kv_h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd

    # Key ranges this block must visit, and the sub-range it can visit without masks.
    diag_offset = seqlen_k - seqlen_q
    last_row = m0 + BLOCK_M - 1
    if IS_BOUNDED:
        lo_any = tl.maximum(m0 + diag_offset - window_left, 0)
        hi_any = tl.minimum(last_row + diag_offset + window_right + 1, seqlen_k)
        lo_full = tl.maximum(last_row + diag_offset - window_left, 0)
        lo_full = (lo_full + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        hi_full = tl.maximum(tl.minimum(m0 + diag_offset + window_right + 1, seqlen_k), 0)
    else:
        lo_any = 0
        hi_any = seqlen_k
        lo_full = 0
        hi_full = seqlen_k
    lo_any = lo_any // BLOCK_N * BLOCK_N
    hi_any = tl.maximum(hi_any, lo_any)
    lo_full = tl.minimum(tl.maximum(lo_full, lo_any), hi_any)
    hi_full = tl.minimum(tl.maximum(hi_full // BLOCK_N * BLOCK_N, lo_full), hi_any)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    acc, l_i, m_i = _stream_kv_tiles(
        acc, l_i, m_i, q, k_tile_ptrs, v_tile_ptrs, stride_kt, stride_vt,
        offs_m, offs_n, offs_d, lo_any, lo_full, seqlen_k, qk_scale, diag_offset,
        window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_N, True, DOT_PRECISION,
    )
    acc, l_i, m_i = _stream_kv_tiles(
        acc, l_i, m_i, q, k_tile_ptrs, v_tile_ptrs, stride_kt, stride_vt,
        offs_m, offs_n, offs_d, lo_full, hi_full, seqlen_k, qk_scale, diag_offset,
        window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_N, False, DOT_PRECISION,
    )
    acc, l_i, m_i = _stream_kv_tiles(
        acc, l_i, m_i, q, k_tile_ptrs, v_tile_ptrs, stride_kt, stride_vt,
        offs_m, offs_n, offs_d, hi_full, hi_any, seqlen_k, qk_scale, diag_offset,
        window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_N, True, DOT_PRECISION,
    )

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = Out + o_base + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])
    if STORE_LSE:
        # m and l live in base 2 of the scaled scores; convert back to natural log.
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        lse_ptrs = Lse + lse_base + h * stride_lh + offs_m * stride_lt
        tl.store(lse_ptrs, lse, mask=row_ok)


def _prune_configs(configs, named_args, **kwargs):
    """Drop tile shapes whose K/V pipeline would not fit in shared memory."""
    block_d = named_args.get("BLOCK_D", kwargs.get("BLOCK_D", 128))
    elem = named_args["Q"].element_size()
    kept = []
    for cfg in configs:
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        smem = (bm * block_d + cfg.num_stages * 2 * bn * block_d) * elem
        if smem > 200 * 1024:
            continue
        if block_d >= 256 and bm * bn > 64 * 64:
            continue
        kept.append(cfg)
    return kept or configs[:1]


_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (128, 128, 8, 2),
        (128, 128, 8, 3),
        (128, 64, 8, 3),
        (128, 64, 4, 3),
        (128, 64, 4, 4),
        (128, 32, 4, 4),
        (64, 128, 4, 3),
        (64, 64, 4, 3),
        (64, 64, 4, 4),
        (64, 32, 4, 4),
        (64, 32, 2, 3),
        (32, 32, 2, 3),
    ]
]

_attn_fwd_tuned = triton.autotune(
    configs=_GPU_CONFIGS,
    key=["HEAD_DIM", "IS_BOUNDED", "IS_VARLEN", "tune_bucket", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_configs},
    **({"cache_results": True} if "cache_results" in triton.autotune.__code__.co_varnames else {}),
)(_attn_fwd_kernel)


def _bucket(n: int) -> int:
    return min(1 << max(int(n) - 1, 0).bit_length(), 1 << 16)


def dot_precision_for(dtype: torch.dtype) -> str:
    """fp32 inputs get true fp32 products; 16-bit inputs use the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def window_bounds(causal: bool, window: tuple[int, int] | None) -> tuple[int, int, bool]:
    """Translate ``causal`` and a ``(left, right)`` window into kernel bounds.

    ``-1`` on either side means unbounded. Causal clips the right side to 0.
    Returns ``(left, right, bounded)``.
    """
    left, right = UNBOUNDED, UNBOUNDED
    if window is not None:
        wl, wr = window
        left = UNBOUNDED if wl is None or wl < 0 else int(wl)
        right = UNBOUNDED if wr is None or wr < 0 else int(wr)
    if causal:
        right = min(right, 0)
    bounded = left < UNBOUNDED or right < UNBOUNDED
    return left, right, bounded


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float,
    window: tuple[int, int] | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    store_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel. Inputs are assumed validated by the caller.

    Dense: ``q [B, Tq, Hq, D]``, ``k, v [B, Tk, Hkv, D]`` with any strides; returns
    ``out`` with ``q``'s shape (and memory layout) and ``lse [B, Hq, Tq]`` (fp32).
    Varlen (``cu_seqlens_*`` given): ``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]``;
    returns ``out [total_q, Hq, D]`` and ``lse [Hq, total_q]``.
    """
    varlen = cu_seqlens_q is not None
    head_dim = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(head_dim))
    left, right, bounded = window_bounds(causal, window)
    out = torch.empty_like(q)

    if varlen:
        batch = cu_seqlens_q.numel() - 1
        _, hq, _ = q.shape
        hkv = k.shape[1]
        seqlen_q, seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
        qs = (0, q.stride(0), q.stride(1), q.stride(2))
        ks = (0, k.stride(0), k.stride(1), k.stride(2))
        vs = (0, v.stride(0), v.stride(1), v.stride(2))
        os_ = (0, out.stride(0), out.stride(1), out.stride(2))
        lse = torch.empty((hq, q.shape[0]), device=q.device, dtype=torch.float32) if store_lse else None
        ls = (0, lse.stride(0), lse.stride(1)) if store_lse else (0, 0, 0)
        cu_q, cu_k = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
    else:
        batch, seqlen_q, hq, _ = q.shape
        seqlen_k, hkv = k.shape[1], k.shape[2]
        qs, ks, vs, os_ = q.stride(), k.stride(), v.stride(), out.stride()
        lse = torch.empty((batch, hq, seqlen_q), device=q.device, dtype=torch.float32) if store_lse else None
        ls = lse.stride() if store_lse else (0, 0, 0)
        cu_q = cu_k = torch.empty(1, dtype=torch.int32, device=q.device)

    if batch == 0 or seqlen_q == 0 or hq == 0:
        if lse is not None:
            lse.fill_(float("-inf"))
        return out.zero_(), lse

    args = (
        q, k, v, out, lse if store_lse else out,
        *qs, *ks, *vs, *os_, *ls,
        cu_q, cu_k, seqlen_q, seqlen_k, hq, hq // hkv,
        softmax_scale * _LOG2E, left, right, _bucket(seqlen_q),
    )
    meta = dict(
        HEAD_DIM=head_dim, BLOCK_D=block_d, IS_VARLEN=varlen, IS_BOUNDED=bounded,
        STORE_LSE=store_lse, DOT_PRECISION=dot_precision_for(q.dtype),
    )
    if interpreter_enabled():
        blocks = INTERPRETER_BLOCKS
        grid = (triton.cdiv(seqlen_q, blocks["BLOCK_M"]), batch * hq)
        _attn_fwd_kernel[grid](*args, **meta, **blocks)
    else:
        def grid(cfg):
            return (triton.cdiv(seqlen_q, cfg["BLOCK_M"]), batch * hq)

        with torch.cuda.device(q.device):
            _attn_fwd_tuned[grid](*args, **meta)
    return out, lse
