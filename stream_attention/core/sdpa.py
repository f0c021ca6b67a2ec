"""PyTorch SDPA behind the same calling convention as the fused kernel.

This is the fallback path (CPU, autograd without a Triton backward, forced by the
environment) and the baseline the benchmarks compare against. It implements the same
semantics as the kernel: bottom-right causal alignment, sliding windows, GQA without
repeating K/V in memory, zero output for rows that see no key.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..kernels.attention_fwd import window_bounds

SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


def sdpa_kernel_context(name: str | None):
    """A context manager pinning SDPA to one backend (``None``: let PyTorch choose)."""
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[name])])


def visibility_mask(
    seqlen_q: int, seqlen_k: int, causal: bool, window: tuple[int, int] | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean ``[Tq, Tk]`` mask of visible keys (bottom-right aligned), or None if all visible."""
    left, right, bounded = window_bounds(causal, window)
    if not bounded:
        return None
    rows = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    rel = torch.arange(seqlen_k, device=device)[None, :] - rows
    return (rel <= right) & (rel >= -left)


def _combine_masks(
    attn_mask: torch.Tensor | None, visible: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """One SDPA mask from a user mask (bool keep-mask or additive) and the band mask."""
    if attn_mask is None:
        return visible
    if attn_mask.dtype != torch.bool:
        mask = attn_mask.to(dtype)
        return mask if visible is None else mask.masked_fill(~visible, float("-inf"))
    return attn_mask if visible is None else attn_mask & visible


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: tuple[int, int] | None = None,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    sdpa_backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention through ``F.scaled_dot_product_attention`` on ``[B, T, H, D]`` tensors.

    ``attn_mask`` (bool, True = keep, or additive float) broadcasts to ``[B, Hq, Tq, Tk]``
    and is combined with the causal/window mask.
    """
    batch, seqlen_q, hq, head_dim = q.shape
    seqlen_k, hkv = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    orig_dtype = q.dtype
    compute_dtype = torch.float32 if q.device.type == "cpu" and q.dtype != torch.float64 else q.dtype
    qt, kt, vt = (t.transpose(1, 2).to(compute_dtype) for t in (q, k, v))

    gqa = {"enable_gqa": True} if hq != hkv else {}
    plain_causal = causal and window is None and attn_mask is None
    fused_causal = plain_causal and (seqlen_q == seqlen_k or (seqlen_q < seqlen_k and not gqa))
    # The dense [Tq, Tk] band mask costs O(Tq*Tk) memory: build it only when SDPA or the LSE needs it.
    need_dense = not fused_causal or return_lse
    dense_visible = visibility_mask(seqlen_q, seqlen_k, causal, window, q.device) if need_dense else None
    is_causal = False
    if plain_causal and seqlen_q == seqlen_k:
        # is_causal / a lower-right bias keep SDPA on its fused kernels (flash, cuDNN,
        # efficient); a dense boolean mask would push it to slower paths.
        sdpa_mask, is_causal = None, True
    elif plain_causal and seqlen_q < seqlen_k and not gqa:
        from torch.nn.attention.bias import causal_lower_right

        sdpa_mask = causal_lower_right(seqlen_q, seqlen_k)
    else:
        sdpa_mask = _combine_masks(attn_mask, dense_visible, compute_dtype)
    with sdpa_kernel_context(sdpa_backend):
        out = F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=sdpa_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **gqa
        )
    full_mask = _combine_masks(attn_mask, dense_visible, compute_dtype) if need_dense else None
    if full_mask is not None and not plain_causal:
        # SDPA returns NaN for rows that see no key; the kernel's contract is zeros.
        keep = full_mask if full_mask.dtype == torch.bool else ~torch.isneginf(full_mask)
        empty = ~keep.any(dim=-1)
        if empty.any():
            out = out.masked_fill(empty.expand(batch, hq, seqlen_q)[..., None], 0.0)
    elif plain_causal and seqlen_q > seqlen_k:
        out[:, :, : seqlen_q - seqlen_k] = 0.0
    lse = None
    if return_lse:
        kr = kt.repeat_interleave(hq // hkv, dim=1) if hq != hkv else kt
        scores = torch.matmul(qt.float(), kr.float().transpose(-1, -2)) * scale
        if full_mask is not None:
            if full_mask.dtype == torch.bool:
                scores = scores.masked_fill(~full_mask, float("-inf"))
            else:
                scores = scores + full_mask
        lse = torch.logsumexp(scores, dim=-1)
    out = out.transpose(1, 2).to(orig_dtype)
    if return_lse:
        return out, lse
    return out
