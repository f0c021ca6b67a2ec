"""Merging split-K partial outputs of the paged decode kernels (flash-decoding's second step).

Each of ``num_splits`` programs of a (sequence, KV head) wrote its output normalised over
its own keys and the base-2 log-sum-exp of its scaled scores; one program per (token,
query head) re-weights them by ``exp2(lse - max)`` and stores the merged row (and, when
asked, the merged natural-log LSE). Every paged kernel family shares it: float pages
(:mod:`.paged_attention`, :mod:`.paged_decode_tma`) and every page format of
:mod:`.kv_attention`.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def _combine_splits_kernel(
    PartOut, PartLse, Out, Lse,
    stride_ps, stride_pt, stride_ph, stride_pd,
    stride_ls, stride_lt, stride_lh,
    stride_ot, stride_oh, stride_od,
    stride_lse_h, stride_lse_t,
    num_heads, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, STORE_LSE: tl.constexpr,
):
    pid = tl.program_id(0)
    t = (pid // num_heads).to(tl.int64)
    h = pid % num_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(PartLse + offs_s * stride_ls + t * stride_lt + h * stride_lh, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)
    denom = tl.sum(w, 0)
    denom_safe = tl.where(denom == 0.0, 1.0, denom)  # rows no split saw a key of
    parts = tl.load(
        PartOut + offs_s[:, None] * stride_ps + t * stride_pt + h * stride_ph + offs_d[None, :] * stride_pd,
        mask=s_ok[:, None] & d_ok[None, :], other=0.0,
    )
    out = tl.sum(parts * w[:, None], 0) / denom_safe
    tl.store(Out + t * stride_ot + h * stride_oh + offs_d * stride_od, out.to(Out.dtype.element_ty), mask=d_ok)
    if STORE_LSE:
        lse_all = tl.where(denom == 0.0, float("-inf"), (m + tl.math.log2(denom_safe)) * 0.6931471805599453)
        tl.store(Lse + h * stride_lse_h + t * stride_lse_t, lse_all)


def partial_buffers(out: torch.Tensor, num_splits: int):
    """Split-K scratch for an output ``out [total_q, Hq, D]``: fp32 partial outputs
    ``[S, total_q, Hq, D]`` and base-2 LSEs ``[S, total_q, Hq]`` with their strides as kernel
    arguments; without splits, placeholders and zero strides (the kernels then write ``out``)."""
    if num_splits > 1:
        part_out = torch.empty((num_splits, *out.shape), device=out.device, dtype=torch.float32)
        part_lse = torch.empty((num_splits, *out.shape[:2]), device=out.device, dtype=torch.float32)
        return part_out, part_lse, part_out.stride(), part_lse.stride()
    return out, out.new_empty((1, 1, 1), dtype=torch.float32), (0, 0, 0, 0), (0, 0, 0)


def combine_splits(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, num_splits: int, *,
                   lse: torch.Tensor | None = None) -> None:
    """Merge the ``num_splits`` partials of :func:`partial_buffers` into ``out``; with
    ``lse`` (fp32 ``[Hq, total_q]``) also store each row's merged natural-log LSE there
    (``-inf`` where no split saw a key)."""
    total_q, hq, head_dim = out.shape
    ctx = torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext()
    with ctx:
        _combine_splits_kernel[(total_q * hq,)](
            part_out, part_lse, out, lse if lse is not None else part_lse,
            *part_out.stride(), *part_lse.stride(), *out.stride(),
            *(lse.stride() if lse is not None else (0, 0)), hq, num_splits,
            HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            BLOCK_S=max(2, triton.next_power_of_2(num_splits)), STORE_LSE=lse is not None,
        )
