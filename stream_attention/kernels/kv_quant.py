"""Quantized paged KV cache: int8 / int4 pages, and attention that reads them directly.

Page layout (one tensor per layer for K and one for V, any strides)::

    data    uint8 [num_blocks, block_size, Hkv, D * bits / 8]
    scales  fp16  [num_blocks, block_size, Hkv, 2]     per token: (scale, zero) over the D channels
            fp16  [num_blocks, Hkv, 2, D]              per channel (KIVI keys): over the block's tokens

Codes are asymmetric and unsigned, ``x_hat = code * scale + zero``; int4 packs channel
``j`` in the low nibble and ``j + D/2`` in the high nibble of byte ``j`` (see
:mod:`stream_attention.utils.quantization`, whose torch functions are the reference
semantics every kernel here reproduces). Sequences address pages through an int32 block
table ``[B, max_blocks]``: logical token ``t`` lives in page ``block_table[b, t // block_size]``
at row ``t % block_size``. Writes use vLLM-style ``slot_mapping`` (``slot = page * block_size
+ row``, negative slots are skipped).

The attention kernel never materialises a dequantized page. Because scales are per token
(or per page and channel), the dequantization folds into the dot products:

    q . (c * s + z)          = s * (q . c) + z * sum(q)           per-token keys
    q . (c * s_d + z_d)      = (q * s_d) . c + q . z_d            per-channel keys (one page per tile)
    sum_j p_j (c_j s_j + z_j) = (p * s) @ c + (p . z)             per-token values

so the inner loop multiplies raw codes (exact in bf16/fp16: at most 255) on the tensor
cores and applies scales to the small score/probability tiles. Decode is memory-bound;
int8 pages move about half the bytes of bf16 pages and int4 about a quarter. Long
contexts are split across programs (flash-decoding) and merged by a second kernel
through their log-sum-exps.

Two kernels implement this. With 16-bit queries and per-token scales (the engine's
case), :func:`_paged_attn_f16_kernel` turns codes into fp16 with bit tricks (``0x6400 | c``
is ``1024 + c``) instead of integer-to-float conversions, which made the generic kernel
instruction-bound; see "Fast path" below for the method and its precision argument.
Everything else (fp32 queries, per-channel KIVI keys, float pages) runs the generic
:func:`_paged_attn_kernel`. ``STREAM_ATTENTION_KV_FAST=0`` forces the generic kernel,
``STREAM_ATTENTION_KV_ASM=0`` the fast kernel's portable conversions (no inline PTX).

Besides attention the module provides the page writers (per token by slot, and whole
blocks with per-channel scales), a dequantizer (for prefill fallbacks and tests), and
:func:`paged_token_attention_mass`, the attention probability each cached token received
from given queries, which importance-based eviction accumulates (H2O / SnapKV).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import envs
from ..utils.quantization import (
    FP16_MAX,
    SCALE_MIN,
    SCALE_REL_MARGIN,
    ZERO_ABS_MARGIN,
    ZERO_REL_MARGIN,
    dequantize_codes,
    pack_codes,
    quant_params,
    quantize_codes,
    unpack_codes,
)
from .attention_fwd import dot_precision_for
from .runtime import autotune_enabled, interpreter_enabled
from .score_mods import soft_cap, softcap_arg, window_left_arg

__all__ = [
    "PAGE_BITS",
    "QuantizedPages",
    "kv_bytes_per_token",
    "write_tokens_to_pages",
    "write_blocks_to_pages",
    "dequantize_pages",
    "DEFAULT_LAUNCH",
    "decode_launch",
    "autotune_enabled",
    "choose_num_splits",
    "paged_attention_quantized",
    "paged_token_attention_mass",
    "write_tokens_to_pages_ref",
    "write_blocks_to_pages_ref",
    "dequantize_pages_ref",
    "paged_attention_ref",
    "paged_token_attention_mass_ref",
]

PAGE_BITS = (8, 4)
_LOG2E = 1.0 / math.log(2.0)

_Z_REL = tl.constexpr(ZERO_REL_MARGIN)
_Z_ABS = tl.constexpr(ZERO_ABS_MARGIN)
_S_REL = tl.constexpr(SCALE_REL_MARGIN)
_S_MIN = tl.constexpr(SCALE_MIN)
_F16_MAX = tl.constexpr(FP16_MAX)


# --------------------------------------------------------------------------------------
# Page containers
# --------------------------------------------------------------------------------------


@dataclass
class QuantizedPages:
    """One layer's K or V pages in int8/int4 with their fp16 ``(scale, zero)`` pairs."""

    data: torch.Tensor
    scales: torch.Tensor
    bits: int
    head_dim: int
    per_channel: bool = False

    def __post_init__(self) -> None:
        if self.bits not in PAGE_BITS:
            raise ValueError(f"page bits must be one of {PAGE_BITS}, got {self.bits}")
        if self.data.dtype != torch.uint8 or self.data.dim() != 4:
            raise ValueError(f"data must be uint8 [blocks, block_size, heads, bytes], got {self.data.dtype} "
                             f"{tuple(self.data.shape)}")
        nb, bs, h, width = self.data.shape
        if width * 8 // self.bits != self.head_dim:
            raise ValueError(f"data width {width} does not hold head_dim {self.head_dim} at {self.bits} bits")
        want = (nb, h, 2, self.head_dim) if self.per_channel else (nb, bs, h, 2)
        if tuple(self.scales.shape) != want or self.scales.dtype != torch.float16:
            raise ValueError(f"scales must be float16 {want}, got {self.scales.dtype} {tuple(self.scales.shape)}")

    @classmethod
    def empty(
        cls,
        num_blocks: int,
        block_size: int,
        num_heads: int,
        head_dim: int,
        bits: int,
        *,
        per_channel: bool = False,
        device: torch.device | str | None = None,
    ) -> QuantizedPages:
        """Allocate zeroed pages (zeros dequantize to 0 thanks to zero scales)."""
        if bits not in PAGE_BITS:
            raise ValueError(f"page bits must be one of {PAGE_BITS}, got {bits}")
        if head_dim % (8 // bits):
            raise ValueError(f"head_dim {head_dim} must be even for int4 pages")
        data = torch.zeros(num_blocks, block_size, num_heads, head_dim * bits // 8, dtype=torch.uint8, device=device)
        shape = (num_blocks, num_heads, 2, head_dim) if per_channel else (num_blocks, block_size, num_heads, 2)
        scales = torch.zeros(shape, dtype=torch.float16, device=device)
        return cls(data, scales, bits, head_dim, per_channel)

    @property
    def num_blocks(self) -> int:
        return self.data.shape[0]

    @property
    def block_size(self) -> int:
        return self.data.shape[1]

    @property
    def num_heads(self) -> int:
        return self.data.shape[2]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()


def kv_bytes_per_token(
    num_kv_heads: int, head_dim: int, bits: int, *, block_size: int = 16, key_per_channel: bool = False,
) -> float:
    """Bytes one token occupies in one layer's K and V pages (scales included).

    ``bits=16`` is an unquantized bf16/fp16 cache. Per-channel key scales belong to a
    whole page and are amortised over its ``block_size`` tokens.
    """
    if bits == 16:
        return 2.0 * num_kv_heads * head_dim * 2
    data = num_kv_heads * head_dim * bits / 8
    v_meta = num_kv_heads * 4
    k_meta = num_kv_heads * head_dim * 4 / block_size if key_per_channel else num_kv_heads * 4
    return 2 * data + v_meta + k_meta


# --------------------------------------------------------------------------------------
# Triton: quantization and dequantization
# --------------------------------------------------------------------------------------


@triton.jit
def _qparams(mn, mx, QMAX_: tl.constexpr):
    """fp32 (scale, zero) exactly representable in fp16; mirrors ``quant_params``."""
    zero = mn - tl.abs(mn) * _Z_REL - _Z_ABS
    zero = tl.minimum(tl.maximum(zero, -_F16_MAX), _F16_MAX)
    zero = zero.to(tl.float16).to(tl.float32)
    scale = (mx - zero) * (_S_REL / QMAX_)
    scale = tl.minimum(tl.maximum(scale, _S_MIN), _F16_MAX)
    scale = scale.to(tl.float16).to(tl.float32)
    return scale, zero


@triton.jit
def _codes(x, scale, zero, QMAX_: tl.constexpr):
    inv = 1.0 / scale
    c = tl.floor((x - zero) * inv + 0.5)
    return tl.minimum(tl.maximum(c, 0.0), QMAX_).to(tl.int32)


@triton.jit
def _quantize_tokens_kernel(
    X, SlotMapping, Data, Scales,
    stride_xn, stride_xh, stride_xd,
    stride_db, stride_dt, stride_dh, stride_dd,
    stride_sb, stride_st, stride_sh, stride_sc,
    num_heads,
    BLOCK_SIZE: tl.constexpr, PART: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
    BITS: tl.constexpr,
):
    n = tl.program_id(0)
    slot = tl.load(SlotMapping + n).to(tl.int64)
    if slot < 0:
        return
    page = slot // BLOCK_SIZE
    row = slot % BLOCK_SIZE
    QMAX_: tl.constexpr = (1 << BITS) - 1
    offs_h = tl.arange(0, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_P)
    h_ok = offs_h < num_heads
    mask = h_ok[:, None] & (offs_p < PART)[None, :]
    x_ptrs = X + n * stride_xn + offs_h[:, None] * stride_xh + offs_p[None, :] * stride_xd
    xa = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    mn = tl.min(tl.where(mask, xa, float("inf")), 1)
    mx = tl.max(tl.where(mask, xa, float("-inf")), 1)
    if BITS == 4:
        xb = tl.load(x_ptrs + PART * stride_xd, mask=mask, other=0.0).to(tl.float32)
        mn = tl.minimum(mn, tl.min(tl.where(mask, xb, float("inf")), 1))
        mx = tl.maximum(mx, tl.max(tl.where(mask, xb, float("-inf")), 1))
    # Padded head rows would otherwise carry infinities through the parameter math.
    mn = tl.where(h_ok, mn, 0.0)
    mx = tl.where(h_ok, mx, 0.0)
    scale, zero = _qparams(mn, mx, QMAX_)
    code = _codes(xa, scale[:, None], zero[:, None], QMAX_)
    if BITS == 4:
        code = code | (_codes(xb, scale[:, None], zero[:, None], QMAX_) << 4)
    d_ptrs = Data + page * stride_db + row * stride_dt + offs_h[:, None] * stride_dh + offs_p[None, :] * stride_dd
    tl.store(d_ptrs, code.to(tl.uint8), mask=mask)
    s_ptrs = Scales + page * stride_sb + row * stride_st + offs_h * stride_sh
    tl.store(s_ptrs, scale.to(tl.float16), mask=h_ok)
    tl.store(s_ptrs + stride_sc, zero.to(tl.float16), mask=h_ok)


@triton.jit
def _quantize_blocks_kernel(
    X, BlockIds, ValidLens, Data, Scales,
    stride_xb, stride_xt, stride_xh, stride_xd,
    stride_db, stride_dt, stride_dh, stride_dd,
    stride_sb, stride_sh, stride_sc, stride_sd,
    BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, PART: tl.constexpr, BLOCK_P: tl.constexpr,
    BITS: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    page = tl.load(BlockIds + i).to(tl.int64)
    valid = tl.minimum(tl.load(ValidLens + i), BLOCK_SIZE)
    QMAX_: tl.constexpr = (1 << BITS) - 1
    offs_t = tl.arange(0, BLOCK_T)
    offs_p = tl.arange(0, BLOCK_P)
    p_ok = offs_p < PART
    t_ok = offs_t < valid
    mask = t_ok[:, None] & p_ok[None, :]
    x_ptrs = X + i * stride_xb + offs_t[:, None] * stride_xt + h * stride_xh + offs_p[None, :] * stride_xd
    xa = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    # An empty block (valid == 0) gets neutral parameters instead of infinities.
    mn_a = tl.where(p_ok & (valid > 0), tl.min(tl.where(mask, xa, float("inf")), 0), 0.0)
    mx_a = tl.where(p_ok & (valid > 0), tl.max(tl.where(mask, xa, float("-inf")), 0), 0.0)
    scale_a, zero_a = _qparams(mn_a, mx_a, QMAX_)
    code = _codes(xa, scale_a[None, :], zero_a[None, :], QMAX_)
    s_ptrs = Scales + page * stride_sb + h * stride_sh + offs_p * stride_sd
    tl.store(s_ptrs, scale_a.to(tl.float16), mask=p_ok)
    tl.store(s_ptrs + stride_sc, zero_a.to(tl.float16), mask=p_ok)
    if BITS == 4:
        xb = tl.load(x_ptrs + PART * stride_xd, mask=mask, other=0.0).to(tl.float32)
        mn_b = tl.where(p_ok & (valid > 0), tl.min(tl.where(mask, xb, float("inf")), 0), 0.0)
        mx_b = tl.where(p_ok & (valid > 0), tl.max(tl.where(mask, xb, float("-inf")), 0), 0.0)
        scale_b, zero_b = _qparams(mn_b, mx_b, QMAX_)
        code = code | (_codes(xb, scale_b[None, :], zero_b[None, :], QMAX_) << 4)
        tl.store(s_ptrs + PART * stride_sd, scale_b.to(tl.float16), mask=p_ok)
        tl.store(s_ptrs + stride_sc + PART * stride_sd, zero_b.to(tl.float16), mask=p_ok)
    # Rows past the valid length are written as zeros so a page's bytes are deterministic.
    code = tl.where(t_ok[:, None], code, 0)
    d_ptrs = Data + page * stride_db + offs_t[:, None] * stride_dt + h * stride_dh + offs_p[None, :] * stride_dd
    tl.store(d_ptrs, code.to(tl.uint8), mask=(offs_t < BLOCK_SIZE)[:, None] & p_ok[None, :])


@triton.jit
def _dequantize_kernel(
    Data, Scales, BlockIds, Out,
    stride_db, stride_dt, stride_dh, stride_dd,
    ss0, ss1, ss2, ss3,
    stride_ob, stride_ot, stride_oh, stride_od,
    BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, PART: tl.constexpr, BLOCK_P: tl.constexpr,
    BITS: tl.constexpr, PER_CHANNEL: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    page = tl.load(BlockIds + i).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_p = tl.arange(0, BLOCK_P)
    t_ok = offs_t < BLOCK_SIZE
    p_ok = offs_p < PART
    mask = t_ok[:, None] & p_ok[None, :]
    c = tl.load(
        Data + page * stride_db + offs_t[:, None] * stride_dt + h * stride_dh + offs_p[None, :] * stride_dd,
        mask=mask, other=0,
    ).to(tl.int32)
    o_ptrs = Out + i * stride_ob + offs_t[:, None] * stride_ot + h * stride_oh + offs_p[None, :] * stride_od
    if PER_CHANNEL:
        s_ptrs = Scales + page * ss0 + h * ss1 + offs_p * ss3
        sa = tl.load(s_ptrs, mask=p_ok, other=0.0).to(tl.float32)[None, :]
        za = tl.load(s_ptrs + ss2, mask=p_ok, other=0.0).to(tl.float32)[None, :]
        if BITS == 4:
            sb = tl.load(s_ptrs + PART * ss3, mask=p_ok, other=0.0).to(tl.float32)[None, :]
            zb = tl.load(s_ptrs + ss2 + PART * ss3, mask=p_ok, other=0.0).to(tl.float32)[None, :]
    else:
        s_ptrs = Scales + page * ss0 + offs_t * ss1 + h * ss2
        sa = tl.load(s_ptrs, mask=t_ok, other=0.0).to(tl.float32)[:, None]
        za = tl.load(s_ptrs + ss3, mask=t_ok, other=0.0).to(tl.float32)[:, None]
        sb = sa
        zb = za
    if BITS == 4:
        lo = (c & 15).to(tl.float32) * sa + za
        hi = (c >> 4).to(tl.float32) * sb + zb
        tl.store(o_ptrs, lo.to(Out.dtype.element_ty), mask=mask)
        tl.store(o_ptrs + PART * stride_od, hi.to(Out.dtype.element_ty), mask=mask)
    else:
        x = c.to(tl.float32) * sa + za
        tl.store(o_ptrs, x.to(Out.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# Triton: paged attention over quantized (or plain) pages
# --------------------------------------------------------------------------------------


@triton.jit
def _tile_pages(bt_ptr, start, cols, col_ok, BLOCK_SIZE: tl.constexpr, ONE_PAGE: tl.constexpr,
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
def _tile_scores(
    q_a, q_b, q_sum, K, KS, page, row, col_ok, kv_head,
    stride_kb, stride_kt, stride_kh, stride_kd, ks0, ks1, ks2, ks3,
    PART: tl.constexpr, BLOCK_P: tl.constexpr, KV_BITS: tl.constexpr, K_PER_CHANNEL: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Raw scores ``q . k`` of a tile (before the softmax scale), dequantization folded in."""
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
    if KV_BITS == 16:
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
    KV_BITS: tl.constexpr, K_PER_CHANNEL: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    p_ok = offs_p < PART
    for start in range(lo, hi, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        cols = start + offs_n
        col_ok = (cols < ctx) & (cols >= col_lo)  # keys left of every row's window are not read
        page, row = _tile_pages(bt_ptr, start, cols, col_ok, BLOCK_SIZE, K_PER_CHANNEL, MASKED)
        qk = _tile_scores(
            q_a, q_b, q_sum, K, KS, page, row, col_ok, kv_head,
            stride_kb, stride_kt, stride_kh, stride_kd, ks0, ks1, ks2, ks3,
            PART, BLOCK_P, KV_BITS, K_PER_CHANNEL, MASKED, DOT_PRECISION,
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
        if KV_BITS == 16:
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
def _load_query_rows(Q, q_start, row_tok, row_head, row_ok, stride_qt, stride_qh, stride_qd,
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
    Q, Out, Lse, MidO, MidStats,
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
    BLOCK_SIZE: tl.constexpr, KV_BITS: tl.constexpr, K_PER_CHANNEL: tl.constexpr, CAUSAL: tl.constexpr,
    SPLIT: tl.constexpr, STORE_LSE: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // num_kv_heads
    kv_head = pid_bh % num_kv_heads
    q_start = tl.load(CuSeqlensQ + b)
    q_len = tl.load(CuSeqlensQ + b + 1) - q_start
    ctx = tl.load(SeqLens + b)
    # A tile's rows are (query token, head of the GQA group) pairs, so one pass over the
    # pages serves every query head that shares them.
    toks = BLOCK_M // group_size
    tok0 = pid_m * toks
    if tok0 >= q_len:
        return
    offs_r = tl.arange(0, BLOCK_M)
    row_tok = tok0 + offs_r // group_size
    row_head = kv_head * group_size + offs_r % group_size
    row_ok = (offs_r < toks * group_size) & (row_tok < q_len)
    diag = ctx - q_len
    col_lo = tok0 + diag - window_left
    lo, full_lo, full_hi, hi = _key_range(ctx, q_len, tok0, toks, pid_s, num_splits, window_left, CAUSAL,
                                          BLOCK_N)

    q_a, q_b, q_sum = _load_query_rows(Q, q_start, row_tok, row_head, row_ok, stride_qt, stride_qh, stride_qd,
                                       PART, BLOCK_P, KV_BITS)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    bt_ptr = BlockTables + b.to(tl.int64) * stride_bt

    acc_a, acc_b, l_i, m_i = _attend_tiles(
        acc_a, acc_b, l_i, m_i, q_a, q_b, q_sum, K, V, KS, VS, bt_ptr,
        stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
        ks0, ks1, ks2, ks3, vs0, vs1, vs2, vs3,
        kv_head, row_tok, lo, full_lo, col_lo, ctx, diag, qk_scale, window_left, cap_log2,
        PART, BLOCK_P, BLOCK_N, BLOCK_SIZE, KV_BITS, K_PER_CHANNEL, True, CAUSAL, SOFTCAP, DOT_PRECISION,
    )
    acc_a, acc_b, l_i, m_i = _attend_tiles(
        acc_a, acc_b, l_i, m_i, q_a, q_b, q_sum, K, V, KS, VS, bt_ptr,
        stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
        ks0, ks1, ks2, ks3, vs0, vs1, vs2, vs3,
        kv_head, row_tok, full_lo, full_hi, col_lo, ctx, diag, qk_scale, window_left, cap_log2,
        PART, BLOCK_P, BLOCK_N, BLOCK_SIZE, KV_BITS, K_PER_CHANNEL, False, CAUSAL, SOFTCAP, DOT_PRECISION,
    )
    acc_a, acc_b, l_i, m_i = _attend_tiles(
        acc_a, acc_b, l_i, m_i, q_a, q_b, q_sum, K, V, KS, VS, bt_ptr,
        stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
        ks0, ks1, ks2, ks3, vs0, vs1, vs2, vs3,
        kv_head, row_tok, full_hi, hi, col_lo, ctx, diag, qk_scale, window_left, cap_log2,
        PART, BLOCK_P, BLOCK_N, BLOCK_SIZE, KV_BITS, K_PER_CHANNEL, True, CAUSAL, SOFTCAP, DOT_PRECISION,
    )

    offs_p = tl.arange(0, BLOCK_P)
    mask = row_ok[:, None] & (offs_p < PART)[None, :]
    q_rows = (q_start + row_tok).to(tl.int64)
    if SPLIT:
        # Un-normalised partials; the combine kernel rescales them by their maxima.
        o_ptrs = MidO + pid_s * stride_ms + q_rows[:, None] * stride_mt + row_head[:, None] * stride_mh \
            + offs_p[None, :]
        tl.store(o_ptrs, acc_a, mask=mask)
        if KV_BITS == 4:
            tl.store(o_ptrs + PART, acc_b, mask=mask)
        st_ptrs = MidStats + pid_s * stride_ss + q_rows * stride_st + row_head * stride_sh
        tl.store(st_ptrs, m_i, mask=row_ok)
        tl.store(st_ptrs + 1, l_i, mask=row_ok)
    else:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        o_ptrs = Out + q_rows[:, None] * stride_ot + row_head[:, None] * stride_oh + offs_p[None, :] * stride_od
        tl.store(o_ptrs, (acc_a / l_safe[:, None]).to(Out.dtype.element_ty), mask=mask)
        if KV_BITS == 4:
            tl.store(o_ptrs + PART * stride_od, (acc_b / l_safe[:, None]).to(Out.dtype.element_ty), mask=mask)
        if STORE_LSE:
            lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
            tl.store(Lse + row_head * stride_lh + q_rows * stride_lt, lse, mask=row_ok)


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
# On a GPU the conversions are inline PTX (``USE_ASM``, the strings below, whose
# semantics tests/test_kv_quant.py checks on CPU with a small emulator); the interpreter,
# which cannot run PTX, takes portable integer ops computing the same fp16 values.
# ``tl.inline_asm_elementwise`` packs sub-32-bit inputs little-endian, element 0 lowest.

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
def _k_codes_f16(kc, KV_BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """Exact fp16 codes of uint8 K bytes: int8 ``(c, c)``; int4 ``(lo, 16 * hi)`` nibbles."""
    if KV_BITS == 8:
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
def _v_codes_f16(vh, KV_BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """fp16 planes of 16-bit V units ``[keys, units]`` (two bytes of a key), offset by 1024.

    Planes 0, 1 are bytes 0, 1 of each unit, channels ``2 i + j``: ``1024 + c`` (int8) or,
    from the low nibbles, ``1024 + 16 c`` (int4); int4 planes 2, 3 are the high nibbles,
    channels ``D / 2 + 2 i + j``, also ``1024 + 16 c``. int8 returns planes 0, 1 twice.
    """
    if KV_BITS == 8:
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
    KV_BITS: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, USE_ASM: tl.constexpr,
    DEFER_SUMS: tl.constexpr, SOFTCAP: tl.constexpr,
):
    V_MULT: tl.constexpr = 1.0 if KV_BITS == 8 else 16.0
    offs_n = tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, PART)
    offs_u = tl.arange(0, UNITS)
    for start in range(lo, hi, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        cols = start + offs_n
        col_ok = (cols < ctx) & (cols >= col_lo)  # keys left of every row's window are not read
        page, row = _tile_pages(bt_ptr, start, cols, col_ok, BLOCK_SIZE, False, MASKED)
        # Scores: K bytes [PART, N] -> exact fp16 code tiles.
        k_ptrs = K + kv_head * stride_kh + (page * stride_kb + row * stride_kt)[None, :] + offs_p[:, None]
        ks_ptrs = KS + page * ks0 + row * ks1 + kv_head * ks2
        if MASKED:
            kc = tl.load(k_ptrs, mask=col_ok[None, :], other=0)
            ksz = tl.load(ks_ptrs, mask=col_ok, other=0)
        else:
            kc = tl.load(k_ptrs)
            ksz = tl.load(ks_ptrs)
        k_lo, k_hi = _k_codes_f16(kc, KV_BITS, USE_ASM)
        qk = tl.dot(q_a, k_lo)
        if KV_BITS == 4:
            qk = tl.dot(q_b, k_hi, qk)
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
        # Values: 16-bit units [N, UNITS] -> fp16 (1024 + code) planes; p16 carries the scales.
        v_ptrs = V + kv_head * stride_vh + (page * stride_vb + row * stride_vt)[:, None] + offs_u[None, :]
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
        v0, v1, v2, v3 = _v_codes_f16(vh, KV_BITS, USE_ASM)
        a0 = tl.dot(p16, v0, a0 * alpha[:, None])
        a1 = tl.dot(p16, v1, a1 * alpha[:, None])
        if KV_BITS == 4:
            a2 = tl.dot(p16, v2, a2 * alpha[:, None])
            a3 = tl.dot(p16, v3, a3 * alpha[:, None])
        m_i = m_new
    return a0, a1, a2, a3, l_i, m_i, corr


@triton.jit
def _store_plane(acc, chan, corr, l_i, row_ok, q_rows, row_head, Out, MidO, pid_s,
                 stride_ot, stride_oh, stride_od, stride_ms, stride_mt, stride_mh,
                 INV_MULT: tl.constexpr, SPLIT: tl.constexpr):
    """Store a V plane's accumulator at output channels ``chan`` (``acc / M + corr``)."""
    val = acc * INV_MULT + corr[:, None]
    mask = row_ok[:, None]
    if SPLIT:
        o_ptrs = MidO + pid_s * stride_ms + q_rows[:, None] * stride_mt + row_head[:, None] * stride_mh \
            + chan[None, :]
        tl.store(o_ptrs, val, mask=mask)
    else:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        o_ptrs = Out + q_rows[:, None] * stride_ot + row_head[:, None] * stride_oh + chan[None, :] * stride_od
        tl.store(o_ptrs, (val / l_safe[:, None]).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _paged_attn_f16_kernel(
    Q, Out, Lse, MidO, MidStats,
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
    BLOCK_SIZE: tl.constexpr, KV_BITS: tl.constexpr, CAUSAL: tl.constexpr,
    SPLIT: tl.constexpr, STORE_LSE: tl.constexpr, USE_ASM: tl.constexpr, DEFER_SUMS: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """:func:`_paged_attn_kernel` for int8/int4 pages with per-token scales and 16-bit queries.

    K is the uint8 page tensor, V an int16 view (units of two bytes of a key) and both
    scale tensors int32 views (one (scale, zero) fp16 pair per word); strides are in
    elements of those views. ``DEFER_SUMS`` keeps the row sums (softmax denominator and
    offset correction) per key column until the end: two cross-warp reductions fewer per
    tile for ~2 * BLOCK_N / 8 more registers per thread (see :func:`defer_row_sums`).
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
    if tok0 >= q_len:
        return
    offs_r = tl.arange(0, BLOCK_M)
    row_tok = tok0 + offs_r // group_size
    row_head = kv_head * group_size + offs_r % group_size
    row_ok = (offs_r < toks * group_size) & (row_tok < q_len)
    diag = ctx - q_len
    col_lo = tok0 + diag - window_left
    lo, full_lo, full_hi, hi = _key_range(ctx, q_len, tok0, toks, pid_s, num_splits, window_left, CAUSAL,
                                          BLOCK_N)

    # q16 = q * 2^e per row with max |q16| in [2^14, 2^15): exact for bf16 and fp16 inputs.
    q_a, q_b, _ = _load_query_rows(Q, q_start, row_tok, row_head, row_ok, stride_qt, stride_qh, stride_qd,
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

    a0, a1, a2, a3, l_i, m_i, corr = _attend_tiles_f16(
        a0, a1, a2, a3, l_i, m_i, corr, q16_a, q16_b, q_sum, row_scale,
        K, V, KS, VS, bt_ptr, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        ks0, ks1, ks2, vs0, vs1, vs2, kv_head, row_tok, lo, full_lo, col_lo, ctx, diag, window_left, cap_log2,
        PART, UNITS, BLOCK_N, BLOCK_SIZE, KV_BITS, True, CAUSAL, USE_ASM, DEFER_SUMS, SOFTCAP,
    )
    a0, a1, a2, a3, l_i, m_i, corr = _attend_tiles_f16(
        a0, a1, a2, a3, l_i, m_i, corr, q16_a, q16_b, q_sum, row_scale,
        K, V, KS, VS, bt_ptr, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        ks0, ks1, ks2, vs0, vs1, vs2, kv_head, row_tok, full_lo, full_hi, col_lo, ctx, diag, window_left, cap_log2,
        PART, UNITS, BLOCK_N, BLOCK_SIZE, KV_BITS, False, CAUSAL, USE_ASM, DEFER_SUMS, SOFTCAP,
    )
    a0, a1, a2, a3, l_i, m_i, corr = _attend_tiles_f16(
        a0, a1, a2, a3, l_i, m_i, corr, q16_a, q16_b, q_sum, row_scale,
        K, V, KS, VS, bt_ptr, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        ks0, ks1, ks2, vs0, vs1, vs2, kv_head, row_tok, full_hi, hi, col_lo, ctx, diag, window_left, cap_log2,
        PART, UNITS, BLOCK_N, BLOCK_SIZE, KV_BITS, True, CAUSAL, USE_ASM, DEFER_SUMS, SOFTCAP,
    )

    if DEFER_SUMS:
        l_i = tl.sum(l_i, 1)
        corr = tl.sum(corr, 1)
    q_rows = (q_start + row_tok).to(tl.int64)
    # Plane j of 16-bit unit i holds channel 2 i + j (int4 high nibbles: D / 2 + 2 i + j).
    chan = tl.arange(0, UNITS) * 2
    INV_MULT: tl.constexpr = 1.0 if KV_BITS == 8 else 0.0625
    _store_plane(a0, chan, corr, l_i, row_ok, q_rows, row_head, Out, MidO, pid_s,
                 stride_ot, stride_oh, stride_od, stride_ms, stride_mt, stride_mh, INV_MULT, SPLIT)
    _store_plane(a1, chan + 1, corr, l_i, row_ok, q_rows, row_head, Out, MidO, pid_s,
                 stride_ot, stride_oh, stride_od, stride_ms, stride_mt, stride_mh, INV_MULT, SPLIT)
    if KV_BITS == 4:
        _store_plane(a2, chan + PART, corr, l_i, row_ok, q_rows, row_head, Out, MidO, pid_s,
                     stride_ot, stride_oh, stride_od, stride_ms, stride_mt, stride_mh, INV_MULT, SPLIT)
        _store_plane(a3, chan + PART + 1, corr, l_i, row_ok, q_rows, row_head, Out, MidO, pid_s,
                     stride_ot, stride_oh, stride_od, stride_ms, stride_mt, stride_mh, INV_MULT, SPLIT)
    if SPLIT:
        st_ptrs = MidStats + pid_s * stride_ss + q_rows * stride_st + row_head * stride_sh
        tl.store(st_ptrs, m_i, mask=row_ok)
        tl.store(st_ptrs + 1, l_i, mask=row_ok)
    elif STORE_LSE:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(Lse + row_head * stride_lh + q_rows * stride_lt, lse, mask=row_ok)


@triton.jit
def _combine_splits_kernel(
    MidO, MidStats, Out, Lse, num_splits,
    stride_ms, stride_mt, stride_mh,
    stride_ss, stride_st, stride_sh,
    stride_ot, stride_oh, stride_od,
    stride_lh, stride_lt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, STORE_LSE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    st_ptrs = MidStats + offs_s * stride_ss + t * stride_st + h * stride_sh
    m = tl.load(st_ptrs, mask=s_ok, other=float("-inf"))
    l = tl.load(st_ptrs + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_ref)
    total = tl.sum(w * l, 0)
    o = tl.load(
        MidO + offs_s[:, None] * stride_ms + t * stride_mt + h * stride_mh + offs_d[None, :],
        mask=s_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0,
    )
    denom = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(o * w[:, None], 0) / denom
    tl.store(Out + t * stride_ot + h * stride_oh + offs_d * stride_od, out.to(Out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    if STORE_LSE:
        lse = tl.where(total == 0.0, float("-inf"), (m_ref + tl.math.log2(denom)) * 0.6931471805599453)
        tl.store(Lse + h * stride_lh + t * stride_lt, lse)


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
    BLOCK_SIZE: tl.constexpr, KV_BITS: tl.constexpr, K_PER_CHANNEL: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
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
    page, row = _tile_pages(bt_ptr, start, cols, col_ok, BLOCK_SIZE, K_PER_CHANNEL, True)
    diag = ctx - q_len
    toks = BLOCK_M // group_size
    offs_r = tl.arange(0, BLOCK_M)
    mass = tl.zeros([BLOCK_N], dtype=tl.float32)
    for tok0 in range(0, q_len, toks):
        row_tok = tok0 + offs_r // group_size
        row_head = kv_head * group_size + offs_r % group_size
        row_ok = (offs_r < toks * group_size) & (row_tok < q_len)
        q_a, q_b, q_sum = _load_query_rows(Q, q_start, row_tok, row_head, row_ok, stride_qt, stride_qh,
                                           stride_qd, PART, BLOCK_P, KV_BITS)
        qk = _tile_scores(
            q_a, q_b, q_sum, K, KS, page, row, col_ok, kv_head,
            stride_kb, stride_kt, stride_kh, stride_kd, ks0, ks1, ks2, ks3,
            PART, BLOCK_P, KV_BITS, K_PER_CHANNEL, True, DOT_PRECISION,
        ) * qk_scale
        lse = tl.load(Lse + row_head * stride_lh + (q_start + row_tok).to(tl.int64) * stride_lt,
                      mask=row_ok, other=float("inf"))
        visible = row_ok[:, None] & col_ok[None, :] & (lse != float("-inf"))[:, None]
        if CAUSAL:
            visible = visible & (cols[None, :] <= row_tok[:, None] + diag)
        p = tl.where(visible, tl.math.exp2(qk - (lse * 1.4426950408889634)[:, None]), 0.0)
        mass += tl.sum(p, 0)
    tl.store(Mass + b.to(tl.int64) * stride_mb + kv_head * stride_mh + cols * stride_mt, mass, mask=col_ok)


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
_AUTOTUNE_KEY = ["KV_BITS", "K_PER_CHANNEL", "PART", "BLOCK_M", "BLOCK_SIZE", "CAUSAL", "SPLIT", "tune_bucket"]
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
        return (128, 4, 3) if programs <= 2 * _num_sms(device) else (128, 2, 2)
    return DEFAULT_LAUNCH["decode"]


_LAUNCH_KEYS = ("BLOCK_N", "num_warps", "num_stages")


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


# --------------------------------------------------------------------------------------
# Host wrappers
# --------------------------------------------------------------------------------------


def _page_format(k_pages, v_pages) -> tuple[int, bool, int, int, int]:
    """(bits, key_per_channel, block_size, num_kv_heads, head_dim) of a K/V page pair."""
    if isinstance(k_pages, QuantizedPages) != isinstance(v_pages, QuantizedPages):
        raise ValueError("k_pages and v_pages must both be QuantizedPages or both be float tensors")
    if isinstance(k_pages, QuantizedPages):
        if k_pages.bits != v_pages.bits:
            raise ValueError(f"K and V pages use different bit widths ({k_pages.bits} vs {v_pages.bits})")
        if v_pages.per_channel:
            raise ValueError("value pages must use per-token scales (per-channel is for keys only, as in KIVI)")
        if (k_pages.data.shape[:3] != v_pages.data.shape[:3]) or k_pages.head_dim != v_pages.head_dim:
            raise ValueError(f"K and V pages differ in shape: {tuple(k_pages.data.shape)} vs {tuple(v_pages.data.shape)}")
        nb, bs, h, _ = k_pages.data.shape
        return k_pages.bits, k_pages.per_channel, bs, h, k_pages.head_dim
    if k_pages.dim() != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"float pages must be [blocks, block_size, heads, D] and equal: {tuple(k_pages.shape)} "
                         f"vs {tuple(v_pages.shape)}")
    if k_pages.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"float pages must be fp16/bf16/fp32, got {k_pages.dtype}")
    nb, bs, h, d = k_pages.shape
    return 16, False, bs, h, d


def _page_args(pages) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    if isinstance(pages, QuantizedPages):
        return pages.data, pages.scales, tuple(pages.data.stride()), tuple(pages.scales.stride())
    return pages, pages, tuple(pages.stride()), (0, 0, 0, 0)


def _device_ctx(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


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
    by_occupancy = max(1, 2 * _num_sms(device) // programs)
    by_length = max(1, triton.cdiv(max_kv_len, min_keys_per_split))
    return int(max(1, min(by_occupancy, by_length, 64)))


def defer_row_sums(programs: int, max_q_len: int, device: torch.device) -> bool:
    """Whether the fp16-code kernel keeps its row sums per key column until the end.

    ``STREAM_ATTENTION_KV_DEFER_SUMS=1``/``0`` decides; unset, decode launches with at
    most two programs per SM defer (the (128, 4, 3) schedule of :func:`decode_launch`:
    H100, batch 16, 2 splits, 71.8 / 121.4 us at 4k / 8k against 74.6 / 129.2; with more
    programs the extra registers cost occupancy and it ran 2-20% slower).
    """
    if envs.kv_defer_sums() is True:
        return True
    if envs.kv_defer_sums() is False or device.type != "cuda":
        return False
    return max_q_len <= 1 and programs <= 2 * _num_sms(device)


def fast_path_enabled() -> bool:
    """Whether int8/int4 pages with per-token scales take the fp16-code kernel
    (:func:`_paged_attn_f16_kernel`); ``STREAM_ATTENTION_KV_FAST=0`` keeps the generic one."""
    return envs.kv_fast()


def _asm_enabled() -> bool:
    """Inline-PTX code conversion on GPUs (``STREAM_ATTENTION_KV_ASM=0``: portable integer ops)."""
    return envs.kv_asm()


def _fast_views(q, k_pages, v_pages, bits: int, per_channel: bool, head_dim: int):
    """``(K bytes, V int16 units, K and V int32 (scale, zero) words)`` when the fast kernel
    applies to these pages, else None.

    It needs 16-bit queries, per-token key scales, power-of-two code rows whose 16-bit V
    units give planes of >= 16 channels (``tl.dot``'s minimum: int8 head_dim >= 32, int4
    >= 64), and layouts that reinterpret as those views (contiguous rows, (scale, zero)
    pairs in one word).
    """
    if bits not in (8, 4) or per_channel or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    if not fast_path_enabled():
        return None
    part = head_dim if bits == 8 else head_dim // 2
    if part & (part - 1) or part // 2 < 16 or k_pages.data.stride(3) != 1:
        return None
    try:
        return (k_pages.data, v_pages.data.view(torch.int16), k_pages.scales.view(torch.int32),
                v_pages.scales.view(torch.int32))
    except RuntimeError:  # strides or offsets that are not whole words
        return None


def paged_attention_quantized(
    q: torch.Tensor,
    k_pages: QuantizedPages | torch.Tensor,
    v_pages: QuantizedPages | torch.Tensor,
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of new query tokens over a paged KV cache stored as int8/int4 (or float) pages.

    Same calling convention as :func:`stream_attention.kernels.paged_attention.paged_attention`:
    ``q [total_q, Hq, D]`` packed per ``cu_seqlens_q`` (int32 ``[B + 1]``; ``None`` means
    decode, one query per sequence), ``block_tables`` int32 ``[B, max_blocks]``,
    ``seq_lens`` int32 ``[B]`` counting each sequence's keys *including* the new tokens
    (already written), ``causal`` aligned bottom-right (query ``i`` of ``n`` sees keys
    ``j <= i + seq_len - n``). Pages are :class:`QuantizedPages` for K and V (same bit
    width, V per token), or plain float ``[blocks, block_size, Hkv, D]`` tensors of ``q``'s
    dtype, which run the same kernel (the like-for-like baseline).

    No host synchronisation happens unless a prefill call (``cu_seqlens_q`` given) leaves
    out ``max_q_len``, so decode calls can be captured in a CUDA graph; ``num_splits=None``
    picks one from ``max_kv_len``, or from the block table's capacity when that is not
    given. Returns ``out`` (and
    ``lse [Hq, total_q]``, natural log, fp32, ``-inf`` where no key is visible, with
    ``return_lse``). ``launch`` (``{"BLOCK_N", "num_warps", "num_stages"}``) skips the
    GPU autotuner with a fixed schedule (so does ``STREAM_ATTENTION_AUTOTUNE=0``, with
    :data:`DEFAULT_LAUNCH`); per-channel pages ignore its ``BLOCK_N`` (a tile is a page).
    ``window_left`` (causal only) and ``softcap`` as in :mod:`.score_mods`.
    """
    if window_left is not None and window_left >= 0 and not causal:
        raise ValueError("window_left needs causal=True (a window is measured back from the causal diagonal)")
    has_cap, cap_log2 = softcap_arg(softcap)
    bits, per_channel, block_size, hkv, head_dim = _page_format(k_pages, v_pages)
    if q.dim() != 3 or q.shape[-1] != head_dim:
        raise ValueError(f"q must be [tokens, Hq, {head_dim}], got {tuple(q.shape)}")
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
    fast = _fast_views(q, k_pages, v_pages, bits, per_channel, head_dim) if interp or gpu_ok else None
    if use_split:
        mid_o = torch.empty((num_splits, total_q, hq, head_dim), dtype=torch.float32, device=device)
        mid_s = torch.empty((num_splits, total_q, hq, 2), dtype=torch.float32, device=device)
        mid_strides = (*mid_o.stride()[:3], *mid_s.stride()[:3])
    else:
        mid_o = mid_s = out
        mid_strides = (0,) * 6
    lse_arg = lse if lse is not None else out
    lse_strides = lse.stride() if lse is not None else (0, 0)
    tail = (block_tables.stride(0), *mid_strides, *lse_strides,
            hkv, group, num_splits, softmax_scale * _LOG2E, min(max_q_len, 16), window_left_arg(window_left), cap_log2)
    grid = (q_tiles, batch * hkv, num_splits)
    if fast is not None:
        kf, vf, ksf, vsf = fast
        args = (q, out, lse_arg, mid_o, mid_s, kf, vf, ksf, vsf, block_tables, seq_lens, cu_q,
                *q.stride(), *out.stride(), *kf.stride()[:3], *vf.stride()[:3], *ksf.stride()[:3],
                *vsf.stride()[:3], *tail)
        if launch is None and not interp and not autotune_enabled():
            sched = decode_launch(bits, math.prod(grid), device) if max_q_len <= 1 else DEFAULT_LAUNCH["prefill"]
            launch = dict(zip(_LAUNCH_KEYS, sched, strict=True))
        if launch is not None and max_q_len <= 1 and block_m <= 16 and "maxnreg" not in launch:
            cap = FAST_DECODE_MAXNREG.get(tuple(launch.get(k) for k in _LAUNCH_KEYS))
            if cap:
                launch = {**launch, "maxnreg": cap}
        meta = dict(PART=part, UNITS=part // 2, BLOCK_M=block_m, BLOCK_SIZE=block_size, KV_BITS=bits,
                    CAUSAL=causal, SPLIT=use_split, STORE_LSE=return_lse, USE_ASM=not interp and _asm_enabled(),
                    DEFER_SUMS=defer_row_sums(math.prod(grid), max_q_len, device), SOFTCAP=has_cap)
        _launch(_paged_attn_f16_kernel, _paged_attn_f16_tuned, grid, args, meta, launch, device, max_q_len)
    else:
        k_data, k_scales, ksd, kss = _page_args(k_pages)
        v_data, v_scales, vsd, vss = _page_args(v_pages)
        args = (q, out, lse_arg, mid_o, mid_s, k_data, v_data, k_scales, v_scales, block_tables, seq_lens, cu_q,
                *q.stride(), *out.stride(), *ksd, *vsd, *kss, *vss, *tail)
        meta = dict(PART=part, BLOCK_P=block_p, BLOCK_M=block_m, BLOCK_SIZE=block_size, KV_BITS=bits,
                    K_PER_CHANNEL=per_channel, CAUSAL=causal, SPLIT=use_split, STORE_LSE=return_lse,
                    SOFTCAP=has_cap, DOT_PRECISION=dot_precision_for(q.dtype))
        if per_channel:  # a tile is a page: only the schedule is chosen
            _launch(_paged_attn_kernel, _paged_attn_tuned_page, grid, args, meta, launch, device, max_q_len,
                    block_n=block_size)
        else:
            _launch(_paged_attn_kernel, _paged_attn_tuned_tokens, grid, args, meta, launch, device, max_q_len)
    if use_split:
        with _device_ctx(device):
            _combine_splits_kernel[(total_q, hq)](
                mid_o, mid_s, out, lse_arg, num_splits,
                *mid_o.stride()[:3], *mid_s.stride()[:3], *out.stride(), *lse_strides,
                HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
                BLOCK_S=max(2, triton.next_power_of_2(num_splits)), STORE_LSE=return_lse,
            )
    return (out, lse) if return_lse else out


def _launch(kernel, tuned, grid, args, meta, launch, device, max_q_len, *, block_n: int | None = None) -> None:
    """Run ``kernel``: under the interpreter with small tiles; on a GPU with the fixed
    schedule ``launch`` (:data:`DEFAULT_LAUNCH` when None and autotuning is off) or through
    its autotuner ``tuned``. ``block_n`` forces BLOCK_N (per-channel pages)."""
    if interpreter_enabled():
        kernel[grid](*args, **meta, BLOCK_N=block_n or _INTERPRETER_BLOCK_N)
        return
    if launch is None and not autotune_enabled():
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


def paged_token_attention_mass(
    q: torch.Tensor,
    k_pages: QuantizedPages | torch.Tensor,
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

    ``q``/``cu_seqlens_q``/``causal`` as in :func:`paged_attention_quantized`, and ``lse``
    the ``[Hq, total_q]`` log-sum-exps that call returned for the same queries (so the
    scores are normalised exactly as attention normalised them). Returns fp32
    ``[B, Hkv, max_kv_len]``: for each KV head, the probability mass summed over its
    query heads and query tokens; zero past each sequence's length. This is the
    statistic heavy-hitter eviction accumulates (H2O), or sums over an observation window
    (SnapKV). It reads K once, about a quarter of a decode step's traffic, so an engine
    calls it every few steps rather than every step.
    """
    if isinstance(k_pages, QuantizedPages):
        bits, per_channel, block_size, hkv, head_dim = k_pages.bits, k_pages.per_channel, k_pages.block_size, \
            k_pages.num_heads, k_pages.head_dim
    else:
        bits, per_channel = 16, False
        _, block_size, hkv, head_dim = k_pages.shape
    decode = cu_seqlens_q is None
    batch = q.shape[0] if decode else cu_seqlens_q.numel() - 1
    hq = q.shape[1]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    device = q.device
    cu_q = _decode_cu_seqlens(batch, device) if decode else cu_seqlens_q.to(torch.int32)
    max_ctx = int(max_kv_len if max_kv_len is not None else (seq_lens.max().item() if batch else 0))
    mass = torch.zeros((batch, hkv, max_ctx), dtype=torch.float32, device=device)
    if batch == 0 or max_ctx == 0:
        return mass
    group = hq // hkv
    part = head_dim // 2 if bits == 4 else head_dim
    interp = interpreter_enabled()
    block_n = block_size if per_channel else (_INTERPRETER_BLOCK_N if interp else 64)
    block_m = max(16, triton.next_power_of_2(group))
    k_data, k_scales, ksd, kss = _page_args(k_pages)
    grid = (batch * hkv, triton.cdiv(max_ctx, block_n))
    with _device_ctx(device):
        _token_mass_kernel[grid](
            q, lse, mass, k_data, k_scales, block_tables, seq_lens, cu_q,
            *q.stride(), *lse.stride(), *mass.stride(), *ksd, *kss, block_tables.stride(0),
            hkv, group, softmax_scale * _LOG2E,
            PART=part, BLOCK_P=max(16, triton.next_power_of_2(part)), BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_SIZE=block_size, KV_BITS=bits, K_PER_CHANNEL=per_channel, CAUSAL=causal,
            DOT_PRECISION=dot_precision_for(q.dtype),
        )
    return mass


def write_tokens_to_pages(x: torch.Tensor, slot_mapping: torch.Tensor, pages: QuantizedPages) -> None:
    """Quantize ``x [N, Hkv, D]`` per token into ``pages`` at ``slot_mapping [N]`` (negative = skip)."""
    if pages.per_channel:
        raise ValueError("per-channel pages are written a block at a time: use write_blocks_to_pages")
    n, h, d = x.shape
    if h != pages.num_heads or d != pages.head_dim:
        raise ValueError(f"x is {tuple(x.shape)}, pages hold {pages.num_heads} heads of {pages.head_dim}")
    if n == 0:
        return
    part = d // 2 if pages.bits == 4 else d
    with _device_ctx(x.device):
        _quantize_tokens_kernel[(n,)](
            x, slot_mapping, pages.data, pages.scales, *x.stride(), *pages.data.stride(), *pages.scales.stride(), h,
            BLOCK_SIZE=pages.block_size, PART=part, BLOCK_P=triton.next_power_of_2(part),
            BLOCK_H=triton.next_power_of_2(h), BITS=pages.bits,
        )


def write_blocks_to_pages(
    x: torch.Tensor, block_ids: torch.Tensor, valid_lens: torch.Tensor, pages: QuantizedPages,
) -> None:
    """Quantize whole blocks ``x [n, block_size, Hkv, D]`` into pages ``block_ids [n]``.

    With per-channel pages each (page, head, channel) gets a ``(scale, zero)`` over the
    block's first ``valid_lens[i]`` tokens; rows past that are zeroed. Per-token pages
    are written row by row (same result as :func:`write_tokens_to_pages`).
    """
    n, bs, h, d = x.shape
    if bs != pages.block_size or h != pages.num_heads or d != pages.head_dim:
        raise ValueError(f"x is {tuple(x.shape)}, pages are [.., {pages.block_size}, {pages.num_heads}, "
                         f"{pages.head_dim}]")
    if n == 0:
        return
    if not pages.per_channel:
        rows = torch.arange(bs, device=x.device)
        slots = block_ids.to(torch.int64)[:, None] * bs + rows
        slots = torch.where(rows < valid_lens.to(x.device)[:, None], slots, -1)
        write_tokens_to_pages(x.reshape(n * bs, h, d), slots.reshape(-1), pages)
        return
    part = d // 2 if pages.bits == 4 else d
    with _device_ctx(x.device):
        _quantize_blocks_kernel[(n, h)](
            x, block_ids, valid_lens.to(torch.int32), pages.data, pages.scales,
            *x.stride(), *pages.data.stride(), *pages.scales.stride(),
            BLOCK_SIZE=bs, BLOCK_T=triton.next_power_of_2(bs), PART=part, BLOCK_P=triton.next_power_of_2(part),
            BITS=pages.bits,
        )


def dequantize_pages(
    pages: QuantizedPages, block_ids: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize pages ``block_ids`` (all when None) into ``[n, block_size, Hkv, D]`` of ``dtype``."""
    if block_ids is None:
        block_ids = torch.arange(pages.num_blocks, device=pages.device)
    n = block_ids.numel()
    out = torch.empty((n, pages.block_size, pages.num_heads, pages.head_dim), dtype=dtype, device=pages.device)
    if n == 0:
        return out
    part = pages.head_dim // 2 if pages.bits == 4 else pages.head_dim
    with _device_ctx(pages.device):
        _dequantize_kernel[(n, pages.num_heads)](
            pages.data, pages.scales, block_ids, out,
            *pages.data.stride(), *pages.scales.stride(), *out.stride(),
            BLOCK_SIZE=pages.block_size, BLOCK_T=triton.next_power_of_2(pages.block_size), PART=part,
            BLOCK_P=triton.next_power_of_2(part), BITS=pages.bits, PER_CHANNEL=pages.per_channel,
        )
    return out


# --------------------------------------------------------------------------------------
# PyTorch references (the semantics the kernels reproduce)
# --------------------------------------------------------------------------------------


def write_tokens_to_pages_ref(x: torch.Tensor, slot_mapping: torch.Tensor, pages: QuantizedPages) -> None:
    """Reference for :func:`write_tokens_to_pages`."""
    keep = slot_mapping >= 0
    x, slots = x[keep], slot_mapping[keep].long()
    if x.numel() == 0:
        return
    xf = x.float()
    scale, zero = quant_params(xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True), pages.bits)
    codes = pack_codes(quantize_codes(xf, scale, zero, pages.bits), pages.bits)
    page, row = slots // pages.block_size, slots % pages.block_size
    pages.data[page, row] = codes
    pages.scales[page, row] = torch.cat([scale, zero], dim=-1).to(torch.float16)


def write_blocks_to_pages_ref(
    x: torch.Tensor, block_ids: torch.Tensor, valid_lens: torch.Tensor, pages: QuantizedPages,
) -> None:
    """Reference for :func:`write_blocks_to_pages`."""
    if not pages.per_channel:
        n, bs, h, d = x.shape
        rows = torch.arange(bs, device=x.device)
        slots = torch.where(rows < valid_lens[:, None], block_ids.long()[:, None] * bs + rows, -1)
        write_tokens_to_pages_ref(x.reshape(n * bs, h, d), slots.reshape(-1), pages)
        return
    for i, (blk, valid) in enumerate(zip(block_ids.tolist(), valid_lens.tolist(), strict=True)):
        xb = x[i].float()  # [bs, h, d]
        if valid > 0:
            mn, mx = xb[:valid].amin(0), xb[:valid].amax(0)
        else:
            mn = mx = torch.zeros_like(xb[0])
        scale, zero = quant_params(mn, mx, pages.bits)  # [h, d]
        codes = quantize_codes(xb, scale, zero, pages.bits)
        codes[valid:] = 0
        pages.data[blk] = pack_codes(codes, pages.bits)
        pages.scales[blk] = torch.stack([scale, zero], dim=1).to(torch.float16)


def dequantize_pages_ref(pages: QuantizedPages, block_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Reference for :func:`dequantize_pages` (fp32)."""
    if block_ids is None:
        block_ids = torch.arange(pages.num_blocks, device=pages.device)
    block_ids = block_ids.long()
    codes = unpack_codes(pages.data[block_ids], pages.bits)
    sc = pages.scales[block_ids].float()
    if pages.per_channel:
        scale, zero = sc[:, None, :, 0, :], sc[:, None, :, 1, :]
    else:
        scale, zero = sc[..., 0:1], sc[..., 1:2]
    return dequantize_codes(codes, scale, zero)


def _gather_sequence(pages, block_table: torch.Tensor, length: int) -> torch.Tensor:
    n_blocks = triton.cdiv(length, _block_size(pages))
    ids = block_table[:n_blocks].long()
    dense = dequantize_pages_ref(pages, ids) if isinstance(pages, QuantizedPages) else pages[ids].float()
    return dense.reshape(-1, *dense.shape[2:])[:length]


def _block_size(pages) -> int:
    return pages.block_size if isinstance(pages, QuantizedPages) else pages.shape[1]


def paged_attention_ref(
    q: torch.Tensor,
    k_pages: QuantizedPages | torch.Tensor,
    v_pages: QuantizedPages | torch.Tensor,
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
    """Attention over the dequantized pages in ``dtype`` (default float64): ``(out, lse)``,
    with an optional causal sliding window and logit soft-cap (:mod:`.score_mods`)."""
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
        k = _gather_sequence(k_pages, block_tables[b], ctx).to(dtype)
        v = _gather_sequence(v_pages, block_tables[b], ctx).to(dtype)
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


def paged_token_attention_mass_ref(
    q: torch.Tensor,
    k_pages: QuantizedPages | torch.Tensor,
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
    hkv = k_pages.num_heads if isinstance(k_pages, QuantizedPages) else k_pages.shape[2]
    d = q.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    max_ctx = int(seq_lens.max()) if batch else 0
    mass = torch.zeros((batch, hkv, max_ctx), dtype=torch.float64, device=q.device)
    for b in range(batch):
        n_q, ctx = cu[b + 1] - cu[b], int(seq_lens[b])
        if n_q == 0 or ctx == 0:
            continue
        k = _gather_sequence(k_pages, block_tables[b], ctx).double()
        group = q.shape[1] // hkv
        qb = q[cu[b]:cu[b + 1]].double().view(n_q, hkv, group, d)
        s = torch.einsum("qhgd,khd->hgqk", qb, k) * scale
        if causal:
            rows = torch.arange(n_q, device=q.device)[:, None] + (ctx - n_q)
            s = s.masked_fill(torch.arange(ctx, device=q.device)[None, :] > rows, float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, dim=-1))
        mass[b, :, :ctx] = p.sum(dim=(1, 2))
    return mass
