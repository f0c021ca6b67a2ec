"""Float64 reference attention for the kernel tests, written from the definitions.

Nothing here imports the package: the masks, the window arithmetic, the bottom-right
causal alignment and the GQA head mapping are spelled out again, so a bug in the
kernel's own helpers (``window_bounds``, ``visibility_mask``) cannot hide by being
shared with its reference.
"""

from __future__ import annotations

import torch


def visible_keys(
    seqlen_q: int,
    seqlen_k: int,
    causal: bool,
    window: tuple[int | None, int | None] | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Bool ``[Tq, Tk]``: True where query ``i`` may attend to key ``j``.

    Queries are bottom-right aligned: query ``i`` sits at key position
    ``p = i + Tk - Tq``. Causal keeps ``j <= p``; a window ``(left, right)`` keeps
    ``p - left <= j <= p + right`` (``None`` or a negative side is unbounded).
    """
    offset = seqlen_k - seqlen_q
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if causal:
        keep = keep.tril(diagonal=offset)
    if window is not None:
        left, right = window
        if left is not None and left >= 0:
            keep = keep & torch.ones_like(keep).triu(diagonal=offset - left)
        if right is not None and right >= 0:
            keep = keep & torch.ones_like(keep).tril(diagonal=offset + right)
    return keep


def visible_keys_by_loop(
    seqlen_q: int, seqlen_k: int, causal: bool, window: tuple[int | None, int | None] | None = None
) -> torch.Tensor:
    """The same mask as :func:`visible_keys`, one index pair at a time (checks the former)."""
    keep = torch.zeros(seqlen_q, seqlen_k, dtype=torch.bool)
    left, right = window if window is not None else (None, None)
    for i in range(seqlen_q):
        pos = i + seqlen_k - seqlen_q
        for j in range(seqlen_k):
            ok = not (causal and j > pos)
            if left is not None and left >= 0 and j < pos - left:
                ok = False
            if right is not None and right >= 0 and j > pos + right:
                ok = False
            keep[i, j] = ok
    return keep


def kv_head_of(num_q_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Grouped-query mapping: query head ``h`` reads K/V head ``h // (Hq / Hkv)``."""
    group = num_q_heads // num_kv_heads
    return torch.tensor([h // group for h in range(num_q_heads)], dtype=torch.long)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    window: tuple[int | None, int | None] | None = None,
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
    seqlen_q, hq, head_dim = q.shape[1], q.shape[2], q.shape[3]
    seqlen_k, hkv = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    heads = kv_head_of(hq, hkv).to(q.device)
    kr, vr = k.index_select(2, heads), v.index_select(2, heads)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    s = s.masked_fill(~visible_keys(seqlen_q, seqlen_k, causal, window, q.device), float("-inf"))
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


def star_visibility(total: int, context: int, world: int, anchor: int, block: int) -> torch.Tensor:
    """Bool ``[total, total]``: which keys each token sees under star attention, written
    from its definition (Acharya et al. 2024) for a sequence whose first ``context`` tokens
    are split contiguously over ``world`` ranks and the rest is the replicated query.

    Context token ``i`` in a block ``[s, e)`` of its rank's shard sees keys ``s..i``, plus the
    sequence's first ``anchor`` tokens (capped at rank 0's shard) that precede the block
    (none for the sequence's first block; each key once where the anchor covers a block). Query and generated tokens see every earlier key (phase 2 is exact).
    """
    visible = torch.zeros(total, total, dtype=torch.bool)
    bounds = [(r * context // world, (r + 1) * context // world) for r in range(world)]
    anchor = min(anchor, bounds[0][1] - bounds[0][0])
    for lo, hi in bounds:
        for s in range(lo, hi, block):
            for i in range(s, min(s + block, hi)):
                for j in range(s, i + 1):
                    visible[i, j] = True
                for j in range(min(anchor, s)):  # the anchor, as far as it precedes the block
                    visible[i, j] = True
    for i in range(context, total):
        for j in range(i + 1):
            visible[i, j] = True
    return visible


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of ``a`` against reference ``b``."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)
