"""The functional entry points: ``fused_attention`` and ``fused_attention_varlen``."""

from __future__ import annotations

import torch

from ..kernels.attention_fwd import attention_forward
from .backend import resolve_backend
from .sdpa import sdpa_attention

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
_LAYOUTS = ("bthd", "bhtd")


def _shapes(**tensors: torch.Tensor) -> str:
    return ", ".join(f"{name}{tuple(t.shape)}" for name, t in tensors.items())


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, packed: bool = False) -> None:
    """Raise ``ValueError`` naming the offending shapes unless q, k, v can be attended.

    Dense tensors are ``[B, T, H, D]``; ``packed=True`` checks varlen ``[total, H, D]``.
    """
    rank = 3 if packed else 4
    layout = "[total, heads, head_dim]" if packed else "[batch, seq, heads, head_dim]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {layout}, got {name}{tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype} ({_shapes(q=q, k=k, v=v)})")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}; expected float16, bfloat16 or float32")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {_shapes(k=k, v=v)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head_dim of q and k differ: {_shapes(q=q, k=k)}")
    if not packed and q.shape[0] != k.shape[0]:
        raise ValueError(f"batch sizes differ: {_shapes(q=q, k=k)}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}): {_shapes(q=q, k=k)}")
    d = q.shape[-1]
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d} unsupported (expected {MIN_HEAD_DIM}..{MAX_HEAD_DIM}): {_shapes(q=q)}")


def check_window(window: tuple[int, int] | None) -> tuple[int, int] | None:
    if window is None:
        return None
    try:
        left, right = (int(w) for w in window)
    except (TypeError, ValueError):
        raise ValueError(f"window must be a (left, right) pair of ints (-1 = unbounded), got {window!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"window bounds must be >= -1 (-1 = unbounded), got {window!r}")
    return left, right


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    *,
    layout: str = "bthd",
    window: tuple[int, int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention computed in one streaming pass (online softmax).

    Args:
        q: ``[B, Tq, Hq, D]`` queries (``[B, Hq, Tq, D]`` with ``layout="bhtd"``).
        k, v: ``[B, Tk, Hkv, D]`` keys and values; ``Hq`` must be a multiple of ``Hkv``
            (GQA/MQA, K/V are never repeated in memory).
        causal: mask future keys, aligned bottom-right when ``Tq != Tk`` (query ``i``
            sees keys ``j <= i + Tk - Tq``).
        softmax_scale: defaults to ``D ** -0.5``.
        return_lse: also return the natural-log log-sum-exp, fp32 ``[B, Hq, Tq]``.
        backend: ``"triton"`` (raises if it cannot run), ``"sdpa"``, or ``"auto"``
            (Triton on CUDA, else SDPA; ``STREAM_ATTENTION_BACKEND`` overrides).
        layout: ``"bthd"`` or ``"bhtd"``; any strides are read in place, without copies.
        window: optional sliding window ``(left, right)`` in keys, ``-1`` unbounded.

    Returns:
        Output with ``q``'s shape and layout, and the LSE when ``return_lse``.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected 'bthd' or 'bhtd'")
    if layout == "bhtd":
        q, k, v = (t.transpose(1, 2) if isinstance(t, torch.Tensor) and t.dim() == 4 else t for t in (q, k, v))
    check_qkv(q, k, v)
    window = check_window(window)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    chosen = resolve_backend(backend, q.device, needs_grad=_needs_grad(q, k, v), grad_supported=False)
    if chosen == "triton":
        out, lse = attention_forward(q, k, v, causal=causal, softmax_scale=scale, window=window, store_lse=return_lse)
    else:
        res = sdpa_attention(q, k, v, causal=causal, softmax_scale=scale, window=window, return_lse=return_lse)
        out, lse = res if return_lse else (res, None)
    if layout == "bhtd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
