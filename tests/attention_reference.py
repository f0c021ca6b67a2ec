"""Float64 reference attention and helpers shared by the kernel gradient tests."""

from __future__ import annotations

import contextlib

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
    keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain float64 attention on ``[B, T, H, D]`` tensors (differentiable).

    ``mask``: bool keep-mask or additive float, broadcastable to ``[B, Hq, Tq, Tk]``.
    ``keep``: dropout keep-mask ``[B, Hq, Tq, Tk]``; kept probabilities are scaled by
    ``1 / (1 - dropout_p)``. Rows that see no key give zeros and an LSE of ``-inf``.
    Returns ``(out [B, Tq, Hq, D], lse [B, Hq, Tq])`` in float64.
    """
    q, k, v = (t.double() for t in (q, k, v))
    batch, seqlen_q, hq, head_dim = q.shape
    seqlen_k, hkv = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    kr = k.repeat_interleave(hq // hkv, dim=2)
    vr = v.repeat_interleave(hq // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    visible = visibility_mask(seqlen_q, seqlen_k, causal, window, q.device)
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    # Rows that see nothing must not push NaN through logsumexp's backward.
    empty = torch.isneginf(s).all(dim=-1, keepdim=True)
    lse = torch.logsumexp(s.masked_fill(empty, 0.0), dim=-1, keepdim=True)
    p = torch.exp(s - lse).masked_fill(empty, 0.0)
    lse = lse.masked_fill(empty, float("-inf")).squeeze(-1)
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vr)
    return out, lse


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of ``a`` against reference ``b``."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def grads(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


@contextlib.contextmanager
def nan_poisoned_allocations():
    """Make ``torch.empty``/``torch.empty_like`` return NaN-filled floats, so any output
    element a kernel forgets to write shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty = lambda *a, **kw: poison(empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poison(empty_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like
