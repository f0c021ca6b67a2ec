"""Float64 reference attention shared by the kernel tests."""

from __future__ import annotations

import torch

from stream_attention.core.sdpa import visibility_mask


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T, H, D]`` attention in float64; returns ``(out, lse [B, Hq, Tq])``.

    Rows that see no key give zeros and an LSE of ``-inf`` (the kernel's contract).
    ``mask``: bool keep-mask broadcastable to ``[B, Hq, Tq, Tk]``.
    """
    hq, hkv = q.shape[2], k.shape[2]
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    kd, vd = kd.repeat_interleave(hq // hkv, 1), vd.repeat_interleave(hq // hkv, 1)
    scores = qd @ kd.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    vis = visibility_mask(q.shape[1], k.shape[1], causal, window, q.device)
    if vis is not None:
        scores = scores.masked_fill(~vis, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return (probs @ vd).transpose(1, 2), lse


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
