"""Merging split-K partial outputs of the paged decode kernels (flash-decoding's second step).

Each of ``num_splits`` programs of a (sequence, KV head) wrote its output normalised over
its own keys and the base-2 log-sum-exp of its scaled scores; one program per (token,
query head) re-weights them by ``exp2(lse - max)`` and stores the merged row.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _combine_splits_kernel(
    PartOut, PartLse, Out,
    stride_ps, stride_pt, stride_ph, stride_pd,
    stride_ls, stride_lt, stride_lh,
    stride_ot, stride_oh, stride_od,
    num_heads, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
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
    parts = tl.load(
        PartOut + offs_s[:, None] * stride_ps + t * stride_pt + h * stride_ph + offs_d[None, :] * stride_pd,
        mask=s_ok[:, None] & d_ok[None, :], other=0.0,
    )
    out = tl.sum(parts * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(Out + t * stride_ot + h * stride_oh + offs_d * stride_od, out.to(Out.dtype.element_ty), mask=d_ok)
