"""Star attention: two-phase approximate attention for long-context inference.

Star Attention (Acharya et al., 2024, arXiv:2411.17116) splits a long context into
blocks spread over the ranks of a group (contiguous shards: rank 0 holds the start):

* Phase 1, context encoding: each block attends only to itself (causally) with an
  *anchor* prepended: the sequence's first ``anchor_size`` tokens, whose K/V are
  broadcast from rank 0. No K/V moves between ranks apart from the anchor, so phase 1
  costs ``O(block * (anchor + block))`` per block instead of ``O(T^2)`` and needs one
  broadcast. It is approximate: a block does not see the blocks between the anchor and
  itself (the anchor soaks up the attention mass that the first tokens attract, which
  keeps the blockwise softmax close to the full one). The anchor's K/V are used, never
  kept: each rank's cache holds its own blocks' K/V only.
* Phase 2, query processing: the query (and later every generated token), replicated
  on all ranks, attends to the whole distributed cache. Each rank runs the fused kernel
  over its cache and returns a partial output with its LSE; the partials are merged
  across ranks with an LSE-weighted all-reduce (``allreduce_partials``), which is
  exact: phase 2 equals full attention over the concatenated phase-1 cache.

The rank holding the query tokens' own K/V at the end of its cache (``query_rank``,
the last rank by default, where generated tokens are appended) applies the causal mask
among them; every other rank's cache lies wholly before the query.

Star attention is an inference method: it has no backward (use ring attention to train).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .config import StreamAttentionConfig
from .distributed_utils import allreduce_partials, global_rank, group_info
from .functional import check_qkv, fused_attention

__all__ = [
    "StarAttention",
    "star_attention",
    "star_attention_phase1",
    "star_attention_phase2",
    "broadcast_anchor",
]


def _no_grad_inputs(*tensors: torch.Tensor) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise ValueError(
            "star attention is an inference method and has no backward; "
            "run it under torch.no_grad() / inference_mode(), or use ring_attention for training"
        )


def broadcast_anchor(
    k: torch.Tensor, v: torch.Tensor, anchor_size: int, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``anchor_size`` tokens of rank 0's K/V, on every rank of ``group``.

    The anchor is capped at rank 0's shard length (rank 0 decides and broadcasts it, so
    the other ranks' shard lengths need not match). One small and one K/V-sized broadcast.
    """
    world, rank = group_info(group)
    anchor = min(int(anchor_size), k.shape[1]) if rank == 0 else 0
    if world == 1:
        return k[:, :anchor], v[:, :anchor]
    src = global_rank(group, 0)
    length = torch.tensor([anchor], dtype=torch.int64, device=k.device)
    dist.broadcast(length, src=src, group=group)
    anchor = int(length.item())
    batch, _, hkv, head_dim = k.shape
    if rank == 0:
        packed = torch.stack([k[:, :anchor], v[:, :anchor]]).contiguous()
    else:
        packed = torch.empty(2, batch, anchor, hkv, head_dim, dtype=k.dtype, device=k.device)
    dist.broadcast(packed, src=src, group=group)
    return packed[0], packed[1]


def star_attention_phase1(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    anchor_size: int,
    block_size: int | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Phase 1: blockwise context encoding with the anchor prepended.

    Args:
        q, k, v: this rank's contiguous context shard, ``[B, T_local, Hq|Hkv, D]``
            (rank 0 holds the start of the sequence; shard lengths may differ).
        anchor_size: tokens of the sequence start prepended to every block but the first.
        block_size: split the shard into blocks of this many tokens, each encoded
            separately (``None``: the shard is one block).
        causal: causal mask inside each ``[anchor; block]`` (the anchor is wholly
            visible to the block: it precedes it).
        group: the ranks taking part (default: the world).

    Returns this rank's phase-1 output ``[B, T_local, Hq, D]``. The rank's cache for
    phase 2 is its own ``(k, v)``; the anchor's K/V are not part of it.
    """
    check_qkv(q, k, v)
    _no_grad_inputs(q, k, v)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"phase 1 needs equal query and key lengths, got q{tuple(q.shape)}, k{tuple(k.shape)}")
    _, rank = group_info(group)
    t_local = q.shape[1]
    block = t_local if not block_size or block_size <= 0 else int(block_size)
    k_anchor, v_anchor = broadcast_anchor(k, v, anchor_size, group)
    outputs = []
    for start in range(0, t_local, block):
        stop = min(start + block, t_local)
        qb, kb, vb = q[:, start:stop], k[:, start:stop], v[:, start:stop]
        # On rank 0 an anchor longer than a block overlaps the blocks it covers: prepend
        # only the anchor keys before this block, so that no key counts twice.
        n_anchor = min(k_anchor.shape[1], start) if rank == 0 else k_anchor.shape[1]
        if n_anchor > 0:
            kb = torch.cat([k_anchor[:, :n_anchor], kb], dim=1)
            vb = torch.cat([v_anchor[:, :n_anchor], vb], dim=1)
        # Bottom-right alignment makes every anchor key visible to every block query.
        outputs.append(fused_attention(qb, kb, vb, causal=causal, softmax_scale=softmax_scale, backend=backend))
    if not outputs:
        return torch.empty_like(q)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


def star_attention_phase2(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    causal: bool = True,
    query_rank: int = -1,
    softmax_scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Phase 2: the query attends to the whole distributed cache, merged exactly.

    Args:
        q: the query tokens ``[B, Tq, Hq, D]``, identical on every rank.
        k_cache, v_cache: this rank's cache ``[B, Tc_local, Hkv, D]`` (may be empty).
            On ``query_rank`` it ends with the query tokens' own K/V.
        causal: causal mask among the query tokens (applied on ``query_rank`` only;
            every other rank's cache precedes the query entirely).
        query_rank: group rank holding the query's K/V (negative counts from the end).

    Returns the merged output ``[B, Tq, Hq, D]`` on every rank (and its LSE with
    ``return_lse``). Two collectives (an all-reduce MAX and an all-reduce SUM).
    """
    _no_grad_inputs(q, k_cache, v_cache)
    world, rank = group_info(group)
    local_causal = causal and rank == query_rank % world
    batch, seqlen_q, hq, head_dim = q.shape
    if k_cache.shape[1] == 0:
        out = torch.zeros_like(q)
        lse = torch.full((batch, hq, seqlen_q), float("-inf"), device=q.device, dtype=torch.float32)
    else:
        check_qkv(q, k_cache, v_cache)
        out, lse = fused_attention(
            q, k_cache, v_cache, causal=local_causal, softmax_scale=softmax_scale, return_lse=True, backend=backend
        )
    out, lse = allreduce_partials(out, lse, group)
    return (out, lse) if return_lse else out


def star_attention(
    context_q: torch.Tensor,
    context_k: torch.Tensor,
    context_v: torch.Tensor,
    query_q: torch.Tensor,
    query_k: torch.Tensor,
    query_v: torch.Tensor,
    *,
    anchor_size: int,
    block_size: int | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    query_rank: int = -1,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Both phases: encode this rank's context shard, then answer the (replicated) query.

    The query's K/V are appended to ``query_rank``'s cache. Returns
    ``(context_out, query_out, (k_cache, v_cache))`` with this rank's cache.
    """
    world, rank = group_info(group)
    context_out = star_attention_phase1(
        context_q,
        context_k,
        context_v,
        anchor_size=anchor_size,
        block_size=block_size,
        causal=causal,
        softmax_scale=softmax_scale,
        group=group,
        backend=backend,
    )
    k_cache, v_cache = context_k, context_v
    if rank == query_rank % world:
        k_cache = torch.cat([k_cache, query_k], dim=1)
        v_cache = torch.cat([v_cache, query_v], dim=1)
    query_out = star_attention_phase2(
        query_q,
        k_cache,
        v_cache,
        causal=causal,
        query_rank=query_rank,
        softmax_scale=softmax_scale,
        group=group,
        backend=backend,
    )
    return context_out, query_out, (k_cache, v_cache)


class StarAttention(nn.Module):
    """Star attention configured by :class:`StreamAttentionConfig`.

    Uses ``config.star_attention_anchor_size`` (anchor tokens),
    ``config.star_attention_block_size`` (tokens per phase-1 block; each rank's shard
    is encoded in blocks of this size), ``config.star_attention_num_hosts`` (ranks
    taking part; 0 = every rank of ``process_group``), ``config.backend`` and
    ``config.causal``. With ``num_hosts`` smaller than the world and no group given,
    the constructor creates a group of ranks ``0..num_hosts-1`` (a collective: build
    the module on every rank).
    """

    def __init__(self, config: StreamAttentionConfig, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.config = config
        hosts = config.star_attention_num_hosts
        world, _ = group_info(process_group)
        if hosts > world:
            raise ValueError(f"star_attention_num_hosts={hosts} exceeds the {world} ranks available")
        if process_group is None and 0 < hosts < world:
            process_group = dist.new_group(list(range(hosts)))
        self.process_group = process_group
        self.query_rank = -1

    def encode_context(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool | None = None
    ) -> torch.Tensor:
        """Phase 1 on this rank's context shard; keep ``(key, value)`` as the cache."""
        return star_attention_phase1(
            query,
            key,
            value,
            anchor_size=self.config.star_attention_anchor_size,
            block_size=self.config.star_attention_block_size,
            causal=self.config.causal if causal is None else causal,
            group=self.process_group,
            backend=self.config.backend,
        )

    def attend(
        self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, causal: bool | None = None
    ) -> torch.Tensor:
        """Phase 2: the replicated query against every rank's cache (the last rank's ends with the query's K/V)."""
        return star_attention_phase2(
            query,
            key_cache,
            value_cache,
            causal=self.config.causal if causal is None else causal,
            query_rank=self.query_rank,
            group=self.process_group,
            backend=self.config.backend,
        )

    def forward(
        self,
        context_q: torch.Tensor,
        context_k: torch.Tensor,
        context_v: torch.Tensor,
        query_q: torch.Tensor,
        query_k: torch.Tensor,
        query_v: torch.Tensor,
        causal: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both phases; returns ``(context_output_shard, query_output)``."""
        context_out, query_out, _ = star_attention(
            context_q,
            context_k,
            context_v,
            query_q,
            query_k,
            query_v,
            anchor_size=self.config.star_attention_anchor_size,
            block_size=self.config.star_attention_block_size,
            causal=self.config.causal if causal is None else causal,
            group=self.process_group,
            query_rank=self.query_rank,
            backend=self.config.backend,
        )
        return context_out, query_out
