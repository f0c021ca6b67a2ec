"""Ring attention: exact attention over a sequence sharded across the ranks of a group.

Every rank holds a shard of Q, K and V (``[B, T_local, H, D]``). The K/V shards travel
once around the ring; at each step a rank runs the fused kernel between its queries and
the K/V block it holds while the next block is already in flight
(``dist.batch_isend_irecv``), and folds the block's result into a running output through
the kernel's log-sum-exp. The result is the exact softmax attention over the whole
sequence, in any order of arrival.

Causal masking is decided per (query shard, key shard) pair. With contiguous shards
rank ``r`` attends its own block causally, blocks of earlier ranks fully and skips later
ones, so rank ``W-1`` does ``W`` times the work of rank 0. Zigzag sharding
(:func:`zigzag_shard`: rank ``r`` owns sequence chunks ``r`` and ``2W-1-r``) balances
this: off the diagonal every step is exactly half a block of full attention, either all
queries against the K/V's first half (block from an earlier rank) or the queries'
second half against all K/V (block from a later rank).

Backward (``torch.autograd.Function``) runs the same ring a second time: the K/V blocks
travel with fp32 dK/dV accumulators; each rank adds its contribution for the block it
holds, and after the last step the accumulators are sent one hop further, which lands
each block's finished gradient on its owner. Per block it calls the Triton backward
kernel with the *global* output and LSE (which makes the per-block gradient exact), or,
where Triton does not run, the same math in PyTorch.

GQA/MQA: only the ``Hkv`` K/V heads travel; the kernels map query heads onto them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..kernels.attention_fwd import window_bounds
from .backend import resolve_backend
from .config import StreamAttentionConfig
from .distributed_utils import (
    RingComm,
    contiguous_shard,
    gather_sequence,
    group_info,
    merge_partial_,
    zigzag_shard,
    zigzag_unshard,
)
from .functional import check_qkv, fused_attention
from .kernel_switches import KernelSwitches

__all__ = [
    "RingAttention",
    "ring_attention",
    "zigzag_shard",
    "zigzag_unshard",
    "block_backward_reference",
]

# One block's slice: (query rows, key rows, causal) or None when nothing is visible.
BlockPlan = tuple[slice, slice, bool] | None

# fp32 elements of one [B, H, rows, Tk] score tile in the PyTorch backward; bounds its
# memory to ~256 MiB whatever the shard length.
_MATH_BWD_TILE_ELEMS = 1 << 26


def block_plan(rank: int, src: int, t_local: int, causal: bool, zigzag: bool) -> BlockPlan:
    """Which part of the queries of ``rank`` attends to which part of the K/V of ``src``.

    Returns ``(q_rows, kv_rows, causal)`` for the kernel call, or None when the block
    is entirely masked.
    """
    everything = slice(0, t_local)
    if not causal:
        return everything, everything, False
    if src == rank:
        # Both zigzag chunks of a rank are in sequence order inside the shard, so the
        # plain causal mask over the concatenated shard is exactly the global one.
        return everything, everything, True
    if not zigzag:
        return (everything, everything, False) if src < rank else None
    half = t_local // 2
    if src < rank:
        # K/V chunk ``src`` precedes both query chunks; chunk ``2W-1-src`` follows both.
        return everything, slice(0, half), False
    # Neither K/V chunk precedes query chunk ``rank``; both precede chunk ``2W-1-rank``.
    return slice(half, t_local), everything, False


# ----------------------------------------------------------------- per-block kernels


def _block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = fused_attention(q, k, v, causal=causal, softmax_scale=scale, return_lse=True, backend=backend)
    return out, lse


def block_backward_reference(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float,
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one K/V block's share of an attention whose softmax spans more keys.

    The math of SDPA's math backend, written out because SDPA cannot take an external
    LSE: with ``P = exp(S - lse)`` (``lse`` and ``out`` are those of the *whole*
    attention), ``dV = P^T dO``, ``dS = P * (dO V^T - rowsum(dO * O) + dLSE)``,
    ``dQ = scale * dS K``, ``dK = scale * dS^T Q`` (``dlse``, like ``lse``, is the
    gradient reaching the LSE; None = 0). Shapes as the kernel's:
    ``q, dout, out [B, Tq, Hq, D]``, ``k, v [B, Tk, Hkv, D]``, ``lse [B, Hq, Tq]``;
    returns fp32 ``dq [B, Tq, Hq, D]``, ``dk, dv [B, Tk, Hkv, D]``. Causal masks are
    bottom-right aligned. Query rows are processed in tiles to bound memory.
    """
    batch, seqlen_q, hq, head_dim = q.shape
    seqlen_k, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    qf = q.float().transpose(1, 2)
    kf = k.float().transpose(1, 2).repeat_interleave(group, dim=1)
    vf = v.float().transpose(1, 2).repeat_interleave(group, dim=1)
    dof = dout.float().transpose(1, 2)
    delta = (dof * out.float().transpose(1, 2)).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.float().unsqueeze(-1)
    # Rows that saw no key have lse = -inf; +inf makes their probabilities exp(-inf) = 0.
    lse_safe = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse.float())
    left, right, bounded = window_bounds(causal, None)
    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    rows = max(1, _MATH_BWD_TILE_ELEMS // max(1, batch * hq * seqlen_k))
    cols = torch.arange(seqlen_k, device=q.device)
    for start in range(0, seqlen_q, rows):
        stop = min(start + rows, seqlen_q)
        s = torch.matmul(qf[:, :, start:stop], kf.transpose(-1, -2)) * softmax_scale
        p = torch.exp(s - lse_safe[:, :, start:stop, None])
        if bounded:
            diag = torch.arange(start, stop, device=q.device)[:, None] + (seqlen_k - seqlen_q)
            rel = cols[None, :] - diag
            p = p.masked_fill(~((rel <= right) & (rel >= -left)), 0.0)
        do = dof[:, :, start:stop]
        dv += torch.matmul(p.transpose(-1, -2), do)
        ds = p * (torch.matmul(do, vf.transpose(-1, -2)) - delta[:, :, start:stop])
        dq[:, :, start:stop] = torch.matmul(ds, kf) * softmax_scale
        dk += torch.matmul(ds.transpose(-1, -2), qf[:, :, start:stop]) * softmax_scale
    if group > 1:
        dk = dk.view(batch, hkv, group, seqlen_k, head_dim).sum(2)
        dv = dv.view(batch, hkv, group, seqlen_k, head_dim).sum(2)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _triton_backward() -> Callable[..., Any] | None:
    """The Triton backward kernel's launcher, or None while it is not in the tree."""
    try:
        module = importlib.import_module("stream_attention.kernels.attention_bwd")
    except ImportError:
        return None
    return getattr(module, "attention_backward", None)


def _block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
    backend: str,
    dlse: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kernel = _triton_backward() if backend == "triton" else None
    if kernel is None:
        return block_backward_reference(dout, q, k, v, out, lse, causal=causal, softmax_scale=scale, dlse=dlse)
    # The kernel reads any strides, so the zigzag half-shard views go in without copies.
    dq, dk, dv = kernel(dout, q, k, v, out, lse, causal=causal, softmax_scale=scale, dlse=dlse,
                        autotune=KernelSwitches.from_env().autotune)
    return dq, dk, dv


# ------------------------------------------------------------------------- the ring


def _ring_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    zigzag: bool,
    group: dist.ProcessGroup | None,
    backend: str,
    overlap: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    world, rank = group_info(group)
    batch, t_local, hq, head_dim = q.shape
    out = torch.zeros(batch, t_local, hq, head_dim, device=q.device, dtype=torch.float32)
    lse = torch.full((batch, hq, t_local), float("-inf"), device=q.device, dtype=torch.float32)
    comm = RingComm(group) if world > 1 else None
    kv = [k.contiguous(), v.contiguous()]
    for step in range(world):
        src = (rank - step) % world
        pending = comm.exchange(kv) if comm is not None and step + 1 < world else None
        if pending is not None and not overlap:
            pending.wait()
        plan = block_plan(rank, src, t_local, causal, zigzag)
        if plan is not None:
            rows, cols, block_causal = plan
            block_out, block_lse = _block_forward(
                q[:, rows], kv[0][:, cols], kv[1][:, cols], block_causal, scale, backend
            )
            merge_partial_(out[:, rows], lse[:, :, rows], block_out, block_lse)
        if pending is not None:
            kv = pending.wait()
    return out.to(q.dtype), lse


def _ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    *,
    causal: bool,
    scale: float,
    zigzag: bool,
    group: dist.ProcessGroup | None,
    backend: str,
    overlap: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    world, rank = group_info(group)
    t_local = q.shape[1]
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    comm = RingComm(group) if world > 1 else None
    kv = [k.contiguous(), v.contiguous()]
    dkv_pending = None
    dk = dv = None
    for step in range(world):
        src = (rank - step) % world
        kv_pending = comm.exchange(kv) if comm is not None and step + 1 < world else None
        if kv_pending is not None and not overlap:
            kv_pending.wait()
        dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
        dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
        plan = block_plan(rank, src, t_local, causal, zigzag)
        if plan is not None:
            rows, cols, block_causal = plan
            dq_b, dk_b, dv_b = _block_backward(
                dout[:, rows],
                q[:, rows],
                kv[0][:, cols],
                kv[1][:, cols],
                out[:, rows],
                lse[:, :, rows],
                block_causal,
                scale,
                backend,
                None if dlse is None else dlse[:, :, rows],
            )
            dq[:, rows] += dq_b
            dk[:, cols] += dk_b
            dv[:, cols] += dv_b
        if dkv_pending is not None:
            # The accumulators of the block held now, with every earlier rank's share.
            dk_prev, dv_prev = dkv_pending.wait()
            dk += dk_prev
            dv += dv_prev
        if comm is not None:
            # Sent even after the last step: that hop delivers each block's gradient to its owner.
            dkv_pending = comm.exchange([dk, dv])
        if kv_pending is not None:
            kv = kv_pending.wait()
    if dkv_pending is not None:
        dk, dv = dkv_pending.wait()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        scale: float,
        zigzag: bool,
        group: dist.ProcessGroup | None,
        backend: str,
        overlap: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = _ring_forward(
            q, k, v, causal=causal, scale=scale, zigzag=zigzag, group=group, backend=backend, overlap=overlap
        )
        ctx.save_for_backward(q, k, v, out, lse)
        # Unused outputs get None gradients instead of zero tensors: most callers never
        # differentiate through the LSE, and None lets the kernel skip that term.
        ctx.set_materialize_grads(False)
        ctx.settings = dict(causal=causal, scale=scale, zigzag=zigzag, group=group, backend=backend, overlap=overlap)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor | None, dlse: torch.Tensor | None) -> tuple[Any, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, dlse, **ctx.settings)
        return dq, dk, dv, None, None, None, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    zigzag: bool = True,
    *,
    overlap: bool = True,
    backend: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over a sequence sharded across the ranks of ``group``.

    Args:
        q: this rank's queries ``[B, T_local, Hq, D]``.
        k, v: this rank's keys/values ``[B, T_local, Hkv, D]`` (``Hq % Hkv == 0``).
        causal: causal mask over the *global* sequence.
        softmax_scale: defaults to ``D ** -0.5``.
        group: the ring (default: the world; a single process without
            ``torch.distributed`` is a ring of one).
        zigzag: the shards are in :func:`zigzag_shard` layout (else contiguous: rank
            ``r`` holds tokens ``[r*T_local, (r+1)*T_local)``). Only changes the causal
            work split; ``T_local`` must be even when causal.
        overlap: post the next K/V transfer before the local kernel call (False waits
            first; for measuring the overlap).
        backend: per-block kernels: ``"triton"``, ``"sdpa"`` or ``"auto"`` (Triton where
            it runs; ``STREAM_ATTENTION_BACKEND`` overrides).
        return_lse: also return the global LSE ``[B, Hq, T_local]`` (fp32, differentiable).

    Every rank of ``group`` must call this with the same shapes and settings.
    Differentiable in ``q``, ``k``, ``v``; backward runs a second ring pass.
    """
    check_qkv(q, k, v)
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"ring attention needs equal local query and key lengths, got q{tuple(q.shape)}, k{tuple(k.shape)}"
        )
    world, _ = group_info(group)
    if causal and zigzag and world > 1 and q.shape[1] % 2:
        raise ValueError(f"zigzag shards hold two equal chunks: local length {q.shape[1]} must be even")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    chosen = resolve_backend(backend, q.device)
    out, lse = _RingAttentionFunction.apply(q, k, v, causal, scale, zigzag, group, chosen, overlap)
    return (out, lse) if return_lse else out


class RingAttention(nn.Module):
    """Ring attention as a module configured by :class:`StreamAttentionConfig`.

    Uses ``config.ring_attention_zigzag`` (shard layout), ``config.ring_attention_overlap``
    (transfer/compute overlap), ``config.backend`` and ``config.causal`` (default mask).
    ``forward(query, key, value)`` takes this rank's shards ``[B, T_local, H, D]`` and
    returns this rank's output shard. :meth:`shard` and :meth:`gather` convert between a
    full sequence and this rank's shard in the configured layout.
    """

    def __init__(self, config: StreamAttentionConfig, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.config = config
        self.process_group = process_group

    @property
    def world_size(self) -> int:
        return group_info(self.process_group)[0]

    @property
    def rank(self) -> int:
        return group_info(self.process_group)[1]

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's shard of a full sequence ``x`` (same on every rank) along ``dim``."""
        world, rank = group_info(self.process_group)
        if self.config.ring_attention_zigzag:
            return zigzag_shard(x, rank, world, dim=dim)
        return contiguous_shard(x, rank, world, dim=dim)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The full sequence rebuilt from every rank's shard (a collective)."""
        return gather_sequence(x, self.process_group, zigzag=self.config.ring_attention_zigzag, dim=dim)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        causal: bool | None = None,
        softmax_scale: float | None = None,
    ) -> torch.Tensor:
        """Attend this rank's query shard to the whole distributed sequence.

        ``attention_mask`` is not supported across shards (pass None); padding at the
        end of a causal sequence needs no mask.
        """
        if attention_mask is not None:
            raise ValueError("RingAttention does not take an attention_mask; pad causal sequences at the end instead")
        causal = self.config.causal if causal is None else causal
        return ring_attention(
            query,
            key,
            value,
            causal=causal,
            softmax_scale=softmax_scale,
            group=self.process_group,
            zigzag=self.config.ring_attention_zigzag,
            overlap=self.config.ring_attention_overlap,
            backend=self.config.backend,
        )

    def extra_repr(self) -> str:
        return f"zigzag={self.config.ring_attention_zigzag}, overlap={self.config.ring_attention_overlap}"
