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

Key-padding masks, general bool/additive masks and attention dropout
(:mod:`.masks_dropout`) are compile-time features: a launch that uses none of them
compiles to the same code as before they existed. A key-padding mask also narrows the
visited key range to its first..last attended key, so padding-only tiles are skipped.
The backward lives in :mod:`.attention_bwd`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .masks_dropout import apply_masks, dropout_keep, mask_dropout_meta, prepare_masks
from .runtime import first_config, interpreter_enabled, launch_kwargs

# A window bound this large never clips anything; int32-safe for any realistic length.
UNBOUNDED = 1 << 30
_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2

# Triton's interpreter runs one program at a time in numpy; small tiles keep CPU tests
# quick while still crossing several tiles and all three loop stages.
INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 16}


@triton.jit
def _stream_kv_tiles(
    acc,
    l_i,
    m_i,
    q,
    k_tile_ptrs,
    v_tile_ptrs,
    stride_kt,
    stride_vt,
    offs_m,
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
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_MASKS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
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
        if HAS_MASKS:
            qk = apply_masks(
                qk,
                offs_m[:, None],
                cols[None, :],
                seqlen_q,
                seqlen_k,
                bias_base,
                stride_bm,
                stride_bn,
                kpm_base,
                stride_kpm,
                BIAS_KIND,
                HAS_KPM,
            )
        if MASKED:
            rel = cols[None, :] - (offs_m[:, None] + diag_offset)
            visible = col_ok[None, :] & (rel <= window_right) & (rel >= -window_left)
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:
            # A row with nothing visible yet keeps m = -inf; subtract 0 instead so the
            # exponentials below are exp2(-inf) = 0 rather than NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        elif HAS_MASKS:
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
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
        if HAS_DROPOUT:
            # The normaliser l keeps every probability; only the values see the mask.
            keep = dropout_keep(
                philox_seed, philox_offset, bh, offs_m[:, None], cols[None, :], philox_row_stride, dropout_p
            )
            p = tl.where(keep, p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def key_range(
    m0,
    seqlen_k,
    diag_offset,
    window_left,
    window_right,
    k_lo,
    k_hi,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_BOUNDED: tl.constexpr,
):
    """Key tiles a query block ``[m0, m0 + BLOCK_M)`` visits: ``(lo_any, lo_full, hi_full, hi_any)``.

    Keys outside ``[k_lo, k_hi)`` (key padding, or the whole ``[0, seqlen_k)``) are
    never visited. ``[lo_full, hi_full)`` is the tile-aligned part every row fully sees.
    """
    last_row = m0 + BLOCK_M - 1
    if IS_BOUNDED:
        lo_any = tl.maximum(m0 + diag_offset - window_left, k_lo)
        hi_any = tl.minimum(last_row + diag_offset + window_right + 1, k_hi)
        lo_full = tl.maximum(last_row + diag_offset - window_left, k_lo)
        hi_full = tl.maximum(tl.minimum(m0 + diag_offset + window_right + 1, k_hi), 0)
    else:
        lo_any = k_lo
        hi_any = k_hi
        lo_full = k_lo
        hi_full = k_hi
    lo_full = (lo_full + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo_any = lo_any // BLOCK_N * BLOCK_N
    hi_any = tl.maximum(hi_any, lo_any)
    lo_full = tl.minimum(tl.maximum(lo_full, lo_any), hi_any)
    hi_full = tl.minimum(tl.maximum(hi_full // BLOCK_N * BLOCK_N, lo_full), hi_any)
    return lo_any, lo_full, hi_full, hi_any


@triton.jit(do_not_specialize=["philox_seed", "philox_offset"])
def _attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
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
    stride_ob,
    stride_ot,
    stride_oh,
    stride_od,
    stride_lb,
    stride_lh,
    stride_lt,
    cu_seqlens_q,
    cu_seqlens_k,
    seqlen_q,
    seqlen_k,
    num_heads_q,
    group_size,
    qk_scale,
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
    tune_bucket,  # autotune key only: the coarse length class of `_bucket`
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    IS_BOUNDED: tl.constexpr,
    STORE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_MASKS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    start_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = batch_head // num_heads_q
    h = batch_head % num_heads_q
    kv_h = h // group_size
    # Dropout counters are laid out on the (max) dense [Tq, Tk] grid of each head.
    philox_row_stride = seqlen_k

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
    bias_base = Bias + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh
    kpm_base = Kpm + b.to(tl.int64) * stride_kpm_b

    k_lo = 0
    k_hi = seqlen_k
    if HAS_KPM:
        k_lo = tl.load(KvBounds + 2 * b)
        k_hi = tl.load(KvBounds + 2 * b + 1)
    diag_offset = seqlen_k - seqlen_q
    lo_any, lo_full, hi_full, hi_any = key_range(
        m0, seqlen_k, diag_offset, window_left, window_right, k_lo, k_hi, BLOCK_M, BLOCK_N, IS_BOUNDED
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Three stages over the key range: the left edge [lo_any, lo_full) and the right edge
    # [hi_full, hi_any) need the causal / window / length mask, the middle is visible to
    # every row. One call site, unrolled at compile time (as the Triton tutorial's
    # _attn_fwd_inner is called per STAGE).
    for stage in tl.static_range(3):
        if stage == 0:
            lo, hi = lo_any, lo_full
        elif stage == 1:
            lo, hi = lo_full, hi_full
        else:
            lo, hi = hi_full, hi_any
        acc, l_i, m_i = _stream_kv_tiles(
            acc,
            l_i,
            m_i,
            q,
            k_tile_ptrs,
            v_tile_ptrs,
            stride_kt,
            stride_vt,
            offs_m,
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
            stride_kpm_n,
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
        )

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
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
        (16, 64, 4, 2),
    ]
]


def preferred_fwd_config(head_dim: int, bucket: int) -> tuple[int, int, int, int] | None:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` used when autotuning is off: what the
    autotuner chose on an H100 (bf16) for this head dim and query-length class."""
    if bucket <= 16:  # decode-like: few query rows, keep the tile short
        return (16, 64, 4, 2)
    if bucket <= 256 or head_dim <= 64:
        return (64, 64, 4, 3)
    if head_dim <= 128:
        return (128, 64, 8, 3)
    return None

_attn_fwd_tuned = triton.autotune(
    configs=_GPU_CONFIGS,
    key=[
        "HEAD_DIM",
        "IS_BOUNDED",
        "IS_VARLEN",
        "tune_bucket",
        "DOT_PRECISION",
        "BIAS_KIND",
        "HAS_KPM",
        "HAS_DROPOUT",
    ],
    prune_configs_by={"early_config_prune": _prune_configs},
    **({"cache_results": True} if "cache_results" in triton.autotune.__code__.co_varnames else {}),
)(_attn_fwd_kernel)


# Autotune buckets of the longest query (or key, for the backward) length: decode-like,
# short prefill, mid and long. Every bucket costs one tuning pass (a compile and a timing
# of each config) per feature combination, so they are few and coarse.
# The value is the bucket's upper edge (all multiples of 16, so Triton's integer
# specialisation never splits a bucket into two compiles).
_TUNE_BUCKETS = (16, 256, 4096)


def _bucket(n: int) -> int:
    return next((edge for edge in _TUNE_BUCKETS if n <= edge), 1 << 16)


def dot_precision_for(dtype: torch.dtype) -> str:
    """fp32 inputs get true fp32 products; 16-bit inputs use the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def tma_enabled(device: torch.device, tma: bool | None = None) -> bool:
    """Whether dense, unmasked launches on ``device`` may take the TMA-descriptor kernel
    (:mod:`.attention_fwd_tma`): ``tma=False`` never, ``tma=True`` also under the
    interpreter, ``None`` (auto) on GPUs (the kernel then checks for Hopper or newer)."""
    if tma is False:
        return False
    return device.type == "cuda" or tma is True


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


def dense_or_varlen_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """``(batch, token, head, dim)`` strides; packed tensors have no batch stride."""
    return (0, *t.stride()) if varlen else tuple(t.stride())


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
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    dropout_offset: int = 0,
    tma: bool | None = None,
    autotune: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel. Inputs are assumed validated by the caller.

    Dense: ``q [B, Tq, Hq, D]``, ``k, v [B, Tk, Hkv, D]`` with any strides; returns
    ``out`` with ``q``'s shape (and memory layout) and ``lse [B, Hq, Tq]`` (fp32).
    Varlen (``cu_seqlens_*`` given): ``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]``;
    returns ``out [total_q, Hq, D]`` and ``lse [Hq, total_q]``.

    Optional features, each compiled in only when used:

    * ``attn_mask``: bool (True = attend) or additive float, broadcastable to
      ``[B, Hq, Tq, Tk]`` (packed: ``[B, Hq, max_seqlen_q, max_seqlen_k]``, indexed by
      positions within each sequence);
    * ``key_padding_mask``: ``[B, Tk]`` (nonzero = attend); padding-only tiles are skipped;
    * ``dropout_p`` with ``dropout_seed``/``dropout_offset`` (``0 <= seed, offset < 2**31``):
      attention dropout on the probabilities (see :mod:`.masks_dropout`). The LSE is that
      of the un-dropped scores, as the backward expects.

    Launch choices (callers that follow the environment pass ``STREAM_ATTENTION_TMA`` and
    ``STREAM_ATTENTION_AUTOTUNE`` here):

    * ``tma``: whether a dense, unmasked call may take the TMA-descriptor kernel when the
      shape suits it: ``None`` (auto) on Hopper and newer GPUs, ``True`` also under the
      interpreter, ``False`` never (:func:`tma_enabled`);
    * ``autotune``: autotune the GPU launch (a compile and a timing of every candidate
      config per new shape key, tens of seconds) instead of taking the config measured
      for the shape class on an H100 (the default).
    """
    varlen = cu_seqlens_q is not None
    if not varlen and attn_mask is None and key_padding_mask is None and dropout_p == 0.0 and softmax_scale > 0:
        from . import attention_fwd_tma as tma_kernel

        use_tma = tma_enabled(q.device, tma)
        if use_tma and tma_kernel.tma_preferred(q, k, causal, window) and tma_kernel.tma_supported(q, k, v):
            return tma_kernel.attention_forward_tma(
                q, k, v, causal=causal, softmax_scale=softmax_scale, window=window, store_lse=store_lse
            )
    head_dim = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(head_dim))
    left, right, bounded = window_bounds(causal, window)

    if varlen:
        # Tokens past cu_seqlens_q[-1] belong to no sequence: zeros / -inf, not garbage.
        out = torch.zeros_like(q)
        batch = cu_seqlens_q.numel() - 1
        _, hq, _ = q.shape
        hkv = k.shape[1]
        seqlen_q, seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
        lse = torch.full((hq, q.shape[0]), float("-inf"), device=q.device, dtype=torch.float32) if store_lse else None
        ls = (0, lse.stride(0), lse.stride(1)) if store_lse else (0, 0, 0)
        cu_q, cu_k = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
    else:
        out = torch.empty_like(q)
        batch, seqlen_q, hq, _ = q.shape
        seqlen_k, hkv = k.shape[1], k.shape[2]
        lse = torch.empty((batch, hq, seqlen_q), device=q.device, dtype=torch.float32) if store_lse else None
        ls = lse.stride() if store_lse else (0, 0, 0)
        cu_q = cu_k = torch.empty(1, dtype=torch.int32, device=q.device)

    if batch == 0 or seqlen_q == 0 or hq == 0:
        if lse is not None:
            lse.fill_(float("-inf"))
        return out.zero_(), lse

    masks = prepare_masks(
        attn_mask, key_padding_mask, batch=batch, heads=hq, seqlen_q=seqlen_q, seqlen_k=seqlen_k, device=q.device
    )
    args = (
        q,
        k,
        v,
        out,
        lse if store_lse else out,
        *dense_or_varlen_strides(q, varlen),
        *dense_or_varlen_strides(k, varlen),
        *dense_or_varlen_strides(v, varlen),
        *dense_or_varlen_strides(out, varlen),
        *ls,
        cu_q,
        cu_k,
        seqlen_q,
        seqlen_k,
        hq,
        hq // hkv,
        softmax_scale * _LOG2E,
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
        _bucket(seqlen_q),
    )
    meta = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        IS_VARLEN=varlen,
        IS_BOUNDED=bounded,
        STORE_LSE=store_lse,
        DOT_PRECISION=dot_precision_for(q.dtype),
        **mask_dropout_meta(masks, dropout_p),
    )
    if interpreter_enabled():
        blocks = INTERPRETER_BLOCKS
        grid = (triton.cdiv(seqlen_q, blocks["BLOCK_M"]), batch * hq)
        _attn_fwd_kernel[grid](*args, **meta, **blocks)
    else:

        def grid(cfg):
            return (triton.cdiv(seqlen_q, cfg["BLOCK_M"]), batch * hq)

        with torch.cuda.device(q.device):
            if autotune:
                _attn_fwd_tuned[grid](*args, **meta)
            else:
                prefer = preferred_fwd_config(head_dim, _bucket(seqlen_q))
                cfg = first_config(_GPU_CONFIGS, _prune_configs, {"Q": q, **meta}, prefer)
                _attn_fwd_kernel[grid(cfg.kwargs)](*args, **meta, **launch_kwargs(cfg))
    return out, lse
