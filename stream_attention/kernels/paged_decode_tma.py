"""Paged decode through TMA: each K/V page arrives as one tensor-memory-accelerator copy.

The pointer kernel (:mod:`.paged_attention`) gathers a tile of keys column by column: every
thread computes addresses and issues its own asynchronous copies, and the data in flight
costs registers and shared memory of each program. Here the pool is viewed as a 2-D
tensor ``[num_blocks * page_size, Hkv * D]`` and a page of one KV head is the box
``[page_size, D]`` at row ``page * page_size``, column ``kvh * D``: one descriptor copy
per page, issued by the software pipeliner several pages ahead, with no address arithmetic
in the warps. A program is one warp or a few, so many programs share an SM and many pages
are in flight. Decode only (one query per sequence); split-K partials are merged by the
pointer module's combine kernel.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from .runtime import interpreter_enabled
from .score_mods import soft_cap, softcap_arg, window_left_arg
from .split_combine import combine_splits, partial_buffers

try:  # host-side descriptors: triton >= 3.3
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton
    TensorDescriptor = None

_LOG2E = 1.0 / math.log(2.0)
_MIN_DOT_ROWS = 16


@triton.jit
def _paged_decode_tma_kernel(
    Q, desc_k, desc_v, Out, PartOut, PartLse,
    block_tables, seq_lens, cu_seqlens_q,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_bt,
    stride_ps, stride_pt, stride_ph, stride_pd,
    stride_ls, stride_lt, stride_lh,
    num_kv_heads, group_size, num_splits, qk_scale, window_left, cap_log2,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, ROWS: tl.constexpr, SPLIT: tl.constexpr,
    SOFTCAP: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // num_kv_heads
    kvh = pid_bh % num_kv_heads
    q_start = tl.load(cu_seqlens_q + b)
    if tl.load(cu_seqlens_q + b + 1) == q_start:
        return
    kv_len = tl.load(seq_lens + b)

    # Rows are the query heads of this KV head's group, padded to the 16 rows tl.dot needs.
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_p = tl.arange(0, PAGE_SIZE)
    row_ok = offs_r < group_size
    head = kvh * group_size + offs_r
    row_t = q_start.to(tl.int64)
    q = tl.load(Q + row_t * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)

    # The query (at kv_len - 1) sees keys [first, kv_len): pages before first's are never read.
    first = tl.maximum(kv_len - 1 - window_left, 0)
    page0 = first // PAGE_SIZE
    per_split = tl.cdiv(tl.cdiv(kv_len, PAGE_SIZE) - page0, num_splits)
    lo = page0 + pid_s * per_split
    hi = tl.minimum(lo + per_split, tl.cdiv(kv_len, PAGE_SIZE))
    bt_row = block_tables + b.to(tl.int64) * stride_bt
    col = kvh * HEAD_DIM

    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    # Every page of [lo, hi) holds at least one visible key, so m is finite after the first one.
    for i in tl.range(lo, hi, num_stages=NUM_STAGES):
        page = tl.load(bt_row + i)
        k = desc_k.load([page * PAGE_SIZE, col])
        qk = tl.dot(q, k.T) * qk_scale
        if SOFTCAP:
            qk = soft_cap(qk, cap_log2)
        key = i * PAGE_SIZE + offs_p
        qk = tl.where(((key < kv_len) & (key >= first))[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = desc_v.load([page * PAGE_SIZE, col])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if SPLIT:
        tl.store(PartOut + pid_s.to(tl.int64) * stride_ps + row_t * stride_pt + head[:, None] * stride_ph
                 + offs_d[None, :] * stride_pd, out, mask=row_ok[:, None])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        tl.store(PartLse + pid_s.to(tl.int64) * stride_ls + row_t * stride_lt + head * stride_lh, lse, mask=row_ok)
    else:
        tl.store(Out + row_t * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None])


# (num_warps, num_stages) from an H100 sweep (benchmarks/bench_decode_reads.py, GQA 32/8,
# hd128): one warp per program, two pages of K and V in flight (the page-id load takes the
# first pipeline stages). More buffers (8-12 stages), two warps, or two pages per
# iteration measured equal or slower.
DEFAULT_TMA_DECODE_LAUNCH = (1, 6)


def tma_decode_enabled(device: torch.device) -> bool:
    """Whether decode calls on ``device`` can take this kernel: a Hopper or later GPU (or
    the CPU interpreter) and a Triton with host tensor descriptors."""
    if TensorDescriptor is None:
        return False
    if device.type == "cuda":
        return _capability_major(device.index if device.index is not None else torch.cuda.current_device()) >= 9
    return device.type == "cpu" and interpreter_enabled()


@functools.cache
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def tma_decode_supported(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, max_q_len: int) -> bool:
    """Whether :func:`paged_decode_tma` can take this call: decode (``max_q_len <= 1``) on
    an enabled device, pages and queries of one 16-bit dtype, contiguous pools, a
    power-of-two head dim and page size within a TMA box (16-256)."""
    if max_q_len > 1 or not tma_decode_enabled(q.device):
        return False
    d, page = q.shape[-1], k_pages.shape[1]
    if q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k_pages.dtype == v_pages.dtype):
        return False
    if not (16 <= d <= 256 and 16 <= page <= 256) or d & (d - 1) or page & (page - 1):
        return False
    return k_pages.is_contiguous() and v_pages.is_contiguous()


def paged_decode_tma(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    *,
    softmax_scale: float,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    launch: tuple[int, int] | None = None,
    window_left: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Decode attention over paged K/V with one TMA copy per page (see the module doc).

    Arguments as :func:`.paged_attention.paged_attention` with ``max_q_len = 1`` (sliding
    window and soft-cap included: pages left of the window are not read); the caller
    checked :func:`tma_decode_supported`. ``launch``: ``(num_warps, num_stages)``.
    """
    has_cap, cap_log2 = softcap_arg(softcap)
    total_q, hq, d = q.shape
    num_blocks, page_size, hkv, _ = k_pages.shape
    batch = block_tables.shape[0]
    group = hq // hkv
    rows = max(_MIN_DOT_ROWS, triton.next_power_of_2(group))
    if out is None:
        out = torch.empty((total_q, hq, d), device=q.device, dtype=q.dtype)
    if total_q == 0 or batch == 0:
        return out
    split = num_splits > 1
    part_out, part_lse, part_out_strides, part_lse_strides = partial_buffers(out, num_splits)
    descs = [TensorDescriptor(p.view(num_blocks * page_size, hkv * d), [num_blocks * page_size, hkv * d],
                              [hkv * d, 1], [page_size, d]) for p in (k_pages, v_pages)]
    warps, stages = launch or DEFAULT_TMA_DECODE_LAUNCH
    if interpreter_enabled():
        warps, stages = 4, 1
    ctx = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    with ctx:
        _paged_decode_tma_kernel[(batch * hkv, num_splits)](
            q, *descs, out, part_out, part_lse, block_tables, seq_lens, cu_seqlens_q,
            *q.stride(), *out.stride(), block_tables.stride(0),
            *part_out_strides, *part_lse_strides,
            hkv, group, num_splits, softmax_scale * _LOG2E, window_left_arg(window_left), cap_log2,
            HEAD_DIM=d, PAGE_SIZE=page_size, ROWS=rows, SPLIT=split, SOFTCAP=has_cap, NUM_STAGES=stages,
            num_warps=warps, num_stages=stages,
        )
    if split:
        combine_splits(part_out, part_lse, out, num_splits)
    return out
