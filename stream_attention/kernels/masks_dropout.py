"""Attention masks and in-kernel dropout shared by the forward and backward kernels.

Masks reach the kernels in two shapes:

* a key-padding mask ``[B, Tk]`` (nonzero = attend). Besides the per-tile load, its
  first and last kept key per sequence are computed on the device (no host sync) so the
  kernels clip their key range and never visit tiles that are padding only;
* a general mask broadcastable to ``[B, Hq, Tq, Tk]``: boolean (True = attend) or an
  additive float bias. It is read through its broadcast strides, never materialised.

A boolean mask that broadcasts over heads and queries (``[B, 1, 1, Tk]``) is a key
padding mask in disguise and takes the cheaper route.

Dropout uses Philox through ``tl.rand``. The Philox key is ``(seed, b * Hq + h)`` and the
counter ``offset + row * Tk + col`` (32-bit; ``Tk`` is ``max_seqlen_k`` for packed
batches), so forward and backward regenerate the same mask element by element from
``(seed, offset)`` alone, whatever their tile shapes, and :func:`dropout_keep_mask`
rebuilds it for tests. 32-bit counters keep the stream identical across Triton versions
(wider counters changed meaning between releases).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2
_LOG2E = 1.4426950408889634


@triton.jit
def apply_masks(
    qk,
    rows,
    cols,
    seqlen_q,
    seqlen_k,
    bias_base,
    stride_bm,
    stride_bn,
    kpm_base,
    stride_kpm,
    BIAS_KIND: tl.constexpr,
    HAS_KPM: tl.constexpr,
):
    """Mask/bias a tile of base-2 scores; ``rows``/``cols`` broadcast to ``qk``'s shape."""
    if BIAS_KIND != 0:
        ok = (rows < seqlen_q) & (cols < seqlen_k)
        ptrs = bias_base + rows.to(tl.int64) * stride_bm + cols * stride_bn
        if BIAS_KIND == 1:
            keep = tl.load(ptrs, mask=ok, other=0)
            qk = tl.where(keep != 0, qk, float("-inf"))
        else:
            bias = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
            qk = qk + bias * 1.4426950408889634
    if HAS_KPM:
        keep_k = tl.load(kpm_base + cols * stride_kpm, mask=cols < seqlen_k, other=0)
        qk = tl.where(keep_k != 0, qk, float("-inf"))
    return qk


@triton.jit
def dropout_keep(seed, offset, bh, rows, cols, row_stride, dropout_p):
    """Keep-mask (True = kept) for score elements ``(rows, cols)`` of head slice ``bh``."""
    key = bh.to(tl.int64) * 4294967296 + seed
    counter = offset + rows * row_stride + cols
    return tl.rand(key, counter) >= dropout_p


@triton.jit(do_not_specialize=["seed", "offset"])
def _dropout_mask_kernel(
    Out,
    seed,
    offset,
    seqlen_q,
    seqlen_k,
    dropout_p,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2)
    keep = dropout_keep(seed, offset, bh, rows[:, None], cols[None, :], seqlen_k, dropout_p)
    ptrs = Out + bh.to(tl.int64) * seqlen_q * seqlen_k + rows[:, None].to(tl.int64) * seqlen_k + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k))


def dropout_keep_mask(
    seed: int,
    batch: int,
    heads: int,
    seqlen_q: int,
    seqlen_k: int,
    dropout_p: float,
    *,
    offset: int = 0,
    device: torch.device | str = "cuda",
) -> torch.Tensor:
    """Rebuild the dropout keep-mask the kernels used for ``(seed, offset)``.

    Returns a bool tensor ``[batch, heads, seqlen_q, seqlen_k]`` (True = kept; kept
    probabilities are scaled by ``1 / (1 - dropout_p)``). For packed batches pass
    ``max_seqlen_q``/``max_seqlen_k`` and read sequence ``b`` as ``[b, :, :len_q, :len_k]``.
    """
    out = torch.empty((batch, heads, seqlen_q, seqlen_k), dtype=torch.int8, device=device)
    if out.numel() == 0:
        return out.bool()
    block_m, block_n = 64, 64
    grid = (triton.cdiv(seqlen_q, block_m), triton.cdiv(seqlen_k, block_n), batch * heads)
    _dropout_mask_kernel[grid](
        out, int(seed), int(offset), seqlen_q, seqlen_k, float(dropout_p), BLOCK_M=block_m, BLOCK_N=block_n
    )
    return out.bool()


@dataclass
class MaskOperands:
    """Kernel-ready mask operands (dummy 1-element tensors where a feature is absent)."""

    bias: torch.Tensor
    bias_strides: tuple[int, int, int, int]
    bias_kind: int
    kpm: torch.Tensor
    kpm_stride: int
    kv_bounds: torch.Tensor
    has_kpm: bool

    @property
    def any(self) -> bool:
        return self.bias_kind != MASK_NONE or self.has_kpm


def _as_4d(mask: torch.Tensor) -> torch.Tensor:
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def prepare_masks(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    *,
    batch: int,
    heads: int,
    seqlen_q: int,
    seqlen_k: int,
    device: torch.device,
) -> MaskOperands:
    """Turn user masks into kernel operands.

    ``attn_mask``: bool (True = attend) or floating additive bias, broadcastable to
    ``[batch, heads, seqlen_q, seqlen_k]``. ``key_padding_mask``: ``[batch, seqlen_k]``,
    bool or integer (nonzero = attend). Shapes are assumed validated by the caller.
    """
    dummy = torch.zeros(1, dtype=torch.uint8, device=device)
    bias, bias_strides, bias_kind = dummy, (0, 0, 0, 0), MASK_NONE
    kpm = None
    if attn_mask is not None:
        m4 = _as_4d(attn_mask)
        if m4.dtype == torch.bool and m4.shape[1] == 1 and m4.shape[2] == 1:
            kpm = m4[:, 0, 0, :].expand(batch, seqlen_k)
        else:
            if m4.dtype == torch.bool:
                m4, bias_kind = m4.view(torch.uint8), MASK_BOOL
            elif m4.is_floating_point():
                bias_kind = MASK_ADDITIVE
            else:
                m4, bias_kind = (m4 != 0).view(torch.uint8), MASK_BOOL
            bias = m4.expand(batch, heads, seqlen_q, seqlen_k)
            bias_strides = tuple(bias.stride())
    if key_padding_mask is not None:
        kp = key_padding_mask.expand(batch, seqlen_k) != 0
        kpm = kp if kpm is None else (kpm & kp)
    if kpm is None:
        zeros = torch.zeros((1, 2), dtype=torch.int32, device=device)
        return MaskOperands(bias, bias_strides, bias_kind, dummy, 0, zeros, False)
    # First and last attended key per sequence: the kernels skip the tiles outside.
    idx = torch.arange(seqlen_k, device=device, dtype=torch.int32)
    first = torch.where(kpm, idx, seqlen_k).amin(dim=-1) if seqlen_k else torch.zeros(batch, dtype=torch.int32)
    last = torch.where(kpm, idx + 1, 0).amax(dim=-1) if seqlen_k else torch.zeros(batch, dtype=torch.int32)
    bounds = torch.stack([first, last], dim=-1).to(device=device, dtype=torch.int32).contiguous()
    kpm_u8 = kpm.to(torch.uint8).contiguous()
    return MaskOperands(bias, bias_strides, bias_kind, kpm_u8, kpm_u8.stride(0), bounds, True)


def mask_dropout_meta(masks: MaskOperands, dropout_p: float) -> dict:
    """Compile-time feature flags for a launch."""
    return dict(BIAS_KIND=masks.bias_kind, HAS_KPM=masks.has_kpm, HAS_MASKS=masks.any, HAS_DROPOUT=dropout_p > 0.0)


__all__ = [
    "MASK_NONE",
    "MASK_BOOL",
    "MASK_ADDITIVE",
    "MaskOperands",
    "apply_masks",
    "dropout_keep",
    "dropout_keep_mask",
    "mask_dropout_meta",
    "prepare_masks",
]
