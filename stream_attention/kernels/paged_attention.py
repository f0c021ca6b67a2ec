"""Paged attention in Triton: queries attend to K/V stored in fixed-size pages.

The engine keeps each layer's keys and values in a pool of pages laid out
``[num_blocks, page_size, Hkv, D]``; a sequence owns an ordered list of page ids (its
row of ``block_tables``) and the first ``seq_lens[b]`` slots of those pages hold its
keys. One kernel serves decode (one query per sequence) and prefill chunks (several
queries per sequence, causal over the cached keys plus the chunk itself), so a packed
step of mixed requests is a single launch per layer. Pure decode steps of 16-bit pages on
Hopper go to :mod:`.paged_decode_tma` instead (a page per TMA copy; faster there, see
:func:`paged_attention`).

Work split, chosen for a memory-bound decode:

* One program owns one KV head of one sequence and *all* the query heads of that
  group (GQA), for ``BLOCK_Q`` consecutive query tokens. Its rows are the
  ``BLOCK_Q x group`` (token, head) pairs, so each K/V tile is fetched once per group
  rather than once per query head, and the row count reaches the 16 that ``tl.dot``
  needs even for a single decode token.
* Split-K (flash-decoding): the key range of a sequence is cut into ``num_splits``
  slices handled by different programs; each writes an un-merged partial output and its
  log-sum-exp, and a small combine kernel merges them. This keeps every SM busy when
  there are few sequences and long contexts. ``num_splits`` is a runtime argument, so
  a CUDA graph captured for one batch size replays for any context length.

Causality is bottom-right aligned as in :mod:`.attention_fwd`: with ``q_len`` queries
and ``kv_len`` keys, query ``i`` sees keys ``j <= i + kv_len - q_len``. Keys are
assumed RoPE-rotated already, so a cache that later drops pages (eviction) only has to
shrink ``seq_lens`` and the block table: logical positions never enter this kernel.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention_fwd import dot_precision_for
from .paged_decode_tma import paged_decode_tma, tma_decode_enabled, tma_decode_supported
from .runtime import interpreter_enabled
from .score_mods import soft_cap, softcap_arg, window_left_arg
from .split_combine import combine_splits, partial_buffers

_LOG2E = 1.0 / math.log(2.0)
_MIN_DOT_ROWS = 16


@triton.jit
def _paged_tiles(
    acc, l_i, m_i, q, K, V, bt_row,
    stride_ks, stride_vs, k_head_off, v_head_off, stride_kb, stride_vb, stride_kd, stride_vd,
    offs_n, offs_d, tok, lo, hi, col_lo, kv_len, diag, qk_scale, window_left, cap_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    MASKED: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        # Each column finds its page through the block table; consecutive columns share
        # a page, so these loads hit the same few cache lines. Edge tiles load only
        # [col_lo, hi): keys left of every row's window are not read at all.
        if MASKED:
            col_ok = (cols < hi) & (cols >= col_lo)
            page = tl.load(bt_row + cols // PAGE_SIZE, mask=col_ok, other=0).to(tl.int64)
        else:
            page = tl.load(bt_row + cols // PAGE_SIZE).to(tl.int64)
        slot = (cols % PAGE_SIZE).to(tl.int64)
        k_ptrs = K + k_head_off + page[None, :] * stride_kb + slot[None, :] * stride_ks + offs_d[:, None] * stride_kd
        v_ptrs = V + v_head_off + page[:, None] * stride_vb + slot[:, None] * stride_vs + offs_d[None, :] * stride_vd
        if MASKED:
            kT = tl.load(k_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        elif BLOCK_D != HEAD_DIM:
            kT = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        else:
            kT = tl.load(k_ptrs)
        # Pages may be stored in a different float type than the queries (kv_cache_dtype).
        qk = tl.dot(q, kT.to(q.dtype), input_precision=DOT_PRECISION) * qk_scale
        if SOFTCAP:
            qk = soft_cap(qk, cap_log2)
        if MASKED:
            rel = cols[None, :] - (tok[:, None] + diag)
            visible = (rel <= 0) & (rel >= -window_left) & (cols[None, :] < kv_len)
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row that has seen nothing keeps m = -inf; shifting by 0 keeps exp2 at 0, not NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_shift = m_new
        p = tl.math.exp2(qk - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        elif BLOCK_D != HEAD_DIM:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _paged_attn_kernel(
    Q, K, V, Out, PartOut, PartLse,
    block_tables, seq_lens, cu_seqlens_q,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_bt,
    stride_ps, stride_pt, stride_ph, stride_pd,
    stride_ls, stride_lt, stride_lh,
    num_kv_heads, group_size, num_splits, qk_scale, window_left, cap_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_Q: tl.constexpr, GROUP_PAD: tl.constexpr, SPLIT: tl.constexpr, SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // num_kv_heads
    kvh = pid_bh % num_kv_heads

    q_start = tl.load(cu_seqlens_q + b)
    q_len = tl.load(cu_seqlens_q + b + 1) - q_start
    m0 = pid_q * BLOCK_Q
    if m0 >= q_len:
        return
    kv_len = tl.load(seq_lens + b)
    diag = kv_len - q_len

    offs_r = tl.arange(0, BLOCK_Q * GROUP_PAD)
    tok = m0 + offs_r // GROUP_PAD
    g = offs_r % GROUP_PAD
    row_ok = (tok < q_len) & (g < group_size)
    head = kvh * group_size + g
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    row_t = (q_start + tok).to(tl.int64)
    q_ptrs = Q + row_t[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # The block's keys [lo, hi) split into a left-window edge [lo, full_lo) that needs the
    # mask, [full_lo, full_hi) visible to every row, and the causal edge [full_hi, hi).
    # Keys before lo (outside every row's window) are never read.
    last_tok = tl.minimum(m0 + BLOCK_Q, q_len) - 1
    hi = tl.maximum(tl.minimum(kv_len, diag + m0 + BLOCK_Q), 0)
    col_lo = tl.maximum(diag + m0 - window_left, 0)
    lo = col_lo // BLOCK_N * BLOCK_N
    full_hi = tl.minimum(tl.maximum(diag + m0 + 1, 0) // BLOCK_N * BLOCK_N, hi)
    full_lo = tl.minimum(tl.cdiv(tl.maximum(diag + last_tok - window_left, 0), BLOCK_N) * BLOCK_N, full_hi)
    n_tiles = tl.cdiv(hi - lo, BLOCK_N)
    tiles_per_split = tl.cdiv(n_tiles, num_splits)
    lo_s = tl.minimum(lo + pid_s * tiles_per_split * BLOCK_N, hi)
    hi_s = tl.minimum(lo_s + tiles_per_split * BLOCK_N, hi)
    full_lo_s = tl.minimum(tl.maximum(full_lo, lo_s), hi_s)
    full_hi_s = tl.minimum(tl.maximum(full_hi, lo_s), hi_s)

    bt_row = block_tables + b.to(tl.int64) * stride_bt
    k_head_off = kvh.to(tl.int64) * stride_kh
    v_head_off = kvh.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _paged_tiles(
        acc, l_i, m_i, q, K, V, bt_row, stride_ks, stride_vs, k_head_off, v_head_off,
        stride_kb, stride_vb, stride_kd, stride_vd, offs_n, offs_d, tok, lo_s, full_lo_s, col_lo, kv_len, diag, qk_scale,
        window_left, cap_log2, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE, True, SOFTCAP, DOT_PRECISION,
    )
    acc, l_i, m_i = _paged_tiles(
        acc, l_i, m_i, q, K, V, bt_row, stride_ks, stride_vs, k_head_off, v_head_off,
        stride_kb, stride_vb, stride_kd, stride_vd, offs_n, offs_d, tok, full_lo_s, full_hi_s, col_lo, kv_len, diag, qk_scale,
        window_left, cap_log2, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE, False, SOFTCAP, DOT_PRECISION,
    )
    acc, l_i, m_i = _paged_tiles(
        acc, l_i, m_i, q, K, V, bt_row, stride_ks, stride_vs, k_head_off, v_head_off,
        stride_kb, stride_vb, stride_kd, stride_vd, offs_n, offs_d, tok, full_hi_s, hi_s, col_lo, kv_len, diag, qk_scale,
        window_left, cap_log2, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE, True, SOFTCAP, DOT_PRECISION,
    )

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if SPLIT:
        p_ptrs = (PartOut + pid_s.to(tl.int64) * stride_ps + row_t[:, None] * stride_pt
                  + head[:, None] * stride_ph + offs_d[None, :] * stride_pd)
        tl.store(p_ptrs, out, mask=row_ok[:, None] & d_ok[None, :])
        # Base-2 LSE of the scaled scores; the combine only compares and re-weights them.
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        l_ptrs = PartLse + pid_s.to(tl.int64) * stride_ls + row_t * stride_lt + head * stride_lh
        tl.store(l_ptrs, lse, mask=row_ok)
    else:
        o_ptrs = Out + row_t[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# (BLOCK_N, num_warps, num_stages) per kind of launch, from H100 sweeps (benchmarks/
# bench_engine.py; decode re-measured with benchmarks/bench_kv_quant.py: (128, 4, 2) ran
# at 2.88-2.96 TB/s where (64, 4, 3) ran at 2.35-2.40, batch 64, GQA 32/8, hd128). Fixed
# rather than autotuned: autotuning inside a CUDA-graph warm-up would tune on the dummy
# (empty) contexts used there.
DEFAULT_LAUNCH = {"decode": (128, 4, 2), "prefill": (64, 4, 2)}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on ``device`` (a nominal 1 on CPU)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(batch: int, num_kv_heads: int, max_kv_len: int, device: torch.device,
                      *, min_keys_per_split: int = 256, tma: bool | None = None) -> int:
    """Split-K factor for a decode launch without making slices tiny: about four
    one-warp programs per SM for the TMA kernel (``tma``; default: whether decode on
    ``device`` can take it, :func:`.paged_decode_tma.tma_decode_enabled`; pass False when
    the calls it sizes keep to the pointer kernel), two for the pointer kernel, in one wave.

    Measured on an H100 (GQA 32/8, hd128, benchmarks/bench_decode_reads.py): the TMA kernel
    at batch 16 x 4k ran 2.36/2.45/2.48/2.47 TB/s at 2/3/4/8 splits, at batch 64 best
    unsplit; the pointer kernel 2.28/2.43/2.38/2.20 TB/s at 1/2/3/4 splits.
    """
    if device.type != "cuda":
        return 1
    if tma is None:
        tma = tma_decode_enabled(device)
    target = (4 if tma else 2) * num_sms(device)
    programs = max(batch * num_kv_heads, 1)
    by_occupancy = max(1, round(target / programs))
    by_length = max(1, -(-max_kv_len // min_keys_per_split))
    return int(max(1, min(by_occupancy, by_length, 32)))


def block_q_for(max_q_len: int, group_size: int) -> tuple[int, int]:
    """``(BLOCK_Q, GROUP_PAD)``: query tokens per program and the padded group size.

    Decode uses the fewest tokens whose (token, head) rows reach ``tl.dot``'s minimum of
    16; prefill chunks use up to 64 rows per program.
    """
    group_pad = triton.next_power_of_2(max(group_size, 1))
    min_q = max(1, _MIN_DOT_ROWS // group_pad)
    if max_q_len <= 1:
        return min_q, group_pad
    want = max(min_q, 64 // group_pad, 1)
    want = min(want, max(min_q, triton.next_power_of_2(max_q_len)))
    return want, group_pad


def paged_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    *,
    max_q_len: int,
    softmax_scale: float,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    launch: tuple[int, ...] | None = None,
    window_left: int | None = None,
    softcap: float | None = None,
    tma: bool = True,
) -> torch.Tensor:
    """Attention of packed queries over paged keys/values.

    ``q``: ``[total_q, Hq, D]`` (any strides), the queries of ``B`` sequences packed
    back to back as delimited by ``cu_seqlens_q`` (int32 ``[B+1]``).
    ``k_pages``, ``v_pages``: ``[num_blocks, page_size, Hkv, D]`` (any float dtype).
    ``block_tables``: int32 ``[B, max_blocks]``; ``seq_lens``: int32 ``[B]``, the number of
    keys of each sequence *including* this step's queries (already written to the pages).
    ``max_q_len`` must bound every sequence's query count (it sizes the grid; no host
    sync happens here, so the call can be captured in a CUDA graph). ``launch`` overrides
    ``(BLOCK_N, num_warps, num_stages[, maxnreg])`` (any power-of-two ``BLOCK_N``: each key
    column looks its page up, so tiles may span or split pages; ``maxnreg`` caps registers
    per thread so more programs fit on an SM).
    ``window_left`` (sliding window: query ``i`` sees keys ``i + off - window_left ..
    i + off``; ``None`` for none) and ``softcap`` (``softcap * tanh(s / softcap)`` on the
    scaled scores) are defined in :mod:`.score_mods`; keys left of every row's window are
    never read.
    Decode calls (``max_q_len <= 1``) without a ``launch`` go to the TMA kernel
    (:mod:`.paged_decode_tma`) where :func:`.paged_decode_tma.tma_decode_supported` allows,
    unless ``tma=False`` keeps them on the pointer kernel (``STREAM_ATTENTION_PAGED_TMA=0``
    for callers that follow the environment).
    Returns ``out [total_q, Hq, D]`` in ``q``'s dtype.
    """
    has_cap, cap_log2 = softcap_arg(softcap)
    if launch is None and tma and tma_decode_supported(q, k_pages, v_pages, max_q_len):
        return paged_decode_tma(q, k_pages, v_pages, block_tables, seq_lens, cu_seqlens_q,
                                softmax_scale=softmax_scale, num_splits=num_splits, out=out,
                                window_left=window_left, softcap=softcap)
    total_q, hq, head_dim = q.shape
    page_size, hkv = k_pages.shape[1], k_pages.shape[2]
    batch = block_tables.shape[0]
    group = hq // hkv
    block_q, group_pad = block_q_for(max_q_len, group)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if out is None:
        out = torch.empty((total_q, hq, head_dim), device=q.device, dtype=q.dtype)
    if total_q == 0 or batch == 0:
        return out
    split = num_splits > 1
    part_out, part_lse, part_out_strides, part_lse_strides = partial_buffers(out, num_splits)
    args = (
        q, k_pages, v_pages, out, part_out, part_lse,
        block_tables, seq_lens, cu_seqlens_q,
        *q.stride(), *k_pages.stride(), *v_pages.stride(), *out.stride(),
        block_tables.stride(0),
        *part_out_strides, *part_lse_strides,
        hkv, group, num_splits, softmax_scale * _LOG2E, window_left_arg(window_left), cap_log2,
    )
    meta = dict(
        HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE_SIZE=page_size, BLOCK_Q=block_q, GROUP_PAD=group_pad,
        SPLIT=split, SOFTCAP=has_cap, DOT_PRECISION=dot_precision_for(q.dtype),
    )
    grid = (triton.cdiv(max_q_len, block_q), batch * hkv, num_splits)
    block_n, warps, stages, *cap = launch or DEFAULT_LAUNCH["decode" if max_q_len <= 1 else "prefill"]
    if interpreter_enabled():
        _paged_attn_kernel[grid](*args, **meta, BLOCK_N=16)
    else:
        extra = {"maxnreg": cap[0]} if cap and cap[0] else {}
        with torch.cuda.device(q.device):
            _paged_attn_kernel[grid](*args, **meta, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **extra)
    if split:
        combine_splits(part_out, part_lse, out, num_splits)
    return out


def write_kv_pages(
    key: torch.Tensor, value: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new keys/values ``[T, Hkv, D]`` at flat slots ``page * page_size + offset``.

    ``index_copy_`` is one device op with no host sync, so it can live inside a CUDA graph.
    """
    hkv, d = k_pages.shape[2], k_pages.shape[3]
    k_pages.view(-1, hkv, d).index_copy_(0, slot_mapping, key.to(k_pages.dtype))
    v_pages.view(-1, hkv, d).index_copy_(0, slot_mapping, value.to(v_pages.dtype))


def paged_attention_torch(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    *,
    softmax_scale: float,
    seq_lens_cpu: list[int] | None = None,
    cu_seqlens_q_cpu: list[int] | None = None,
    window_left: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The same math as :func:`paged_attention` in plain PyTorch, for CPUs without Triton:
    gather the pages, then one batched GQA softmax for decode steps, or per sequence
    (SDPA with a bottom-right causal mask unless soft-capped) when some sequence has
    several queries.

    The ``*_cpu`` lists spare the device-to-host copies when the caller already has them.
    """
    total_q, hq, d = q.shape
    page_size, hkv = k_pages.shape[1], k_pages.shape[2]
    group = hq // hkv
    lens = seq_lens_cpu if seq_lens_cpu is not None else seq_lens.tolist()
    cu = cu_seqlens_q_cpu if cu_seqlens_q_cpu is not None else cu_seqlens_q.tolist()
    batch = len(lens)
    if batch == 0 or total_q == 0:
        return q.new_zeros((total_q, hq, d))
    left = window_left_arg(window_left)
    softcap = softcap or None
    max_len = max(lens)
    n_pages = max(1, -(-max_len // page_size))
    if total_q == batch:  # one query per sequence: decode
        pages = block_tables[:, :n_pages].long()
        k = k_pages[pages].reshape(batch, n_pages * page_size, hkv, d).to(q.dtype)
        v = v_pages[pages].reshape(batch, n_pages * page_size, hkv, d).to(q.dtype)
        qg = q.view(batch, hkv, group, d)
        scores = torch.einsum("bhgd,blhd->bhgl", qg.float(), k.float()) * softmax_scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        key = torch.arange(n_pages * page_size, device=q.device)[None, :]
        last = seq_lens.to(q.device)[:, None].long() - 1
        keep = (key <= last) & (key >= last - left)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
        out = torch.einsum("bhgl,blhd->bhgd", probs, v.float())
        return out.reshape(batch, hq, d).to(q.dtype)
    out = torch.empty((total_q, hq, d), device=q.device, dtype=q.dtype)
    for b, kv_len in enumerate(lens):
        q0, q1 = cu[b], cu[b + 1]
        q_len = q1 - q0
        if q_len == 0:
            continue
        if kv_len == 0:
            out[q0:q1] = 0
            continue
        pages = block_tables[b, :-(-kv_len // page_size)].long()
        k = k_pages[pages].reshape(-1, hkv, d)[:kv_len].to(q.dtype).transpose(0, 1)
        v = v_pages[pages].reshape(-1, hkv, d)[:kv_len].to(q.dtype).transpose(0, 1)
        rows = torch.arange(q_len, device=q.device)[:, None] + (kv_len - q_len)
        cols = torch.arange(kv_len, device=q.device)[None, :]
        mask = (cols <= rows) & (cols >= rows - left)
        qb = q[q0:q1].transpose(0, 1)
        if softcap is None:
            o = torch.nn.functional.scaled_dot_product_attention(
                qb, k, v, attn_mask=mask, scale=softmax_scale, enable_gqa=group > 1)
        else:
            kg, vg = k.repeat_interleave(group, 0).float(), v.repeat_interleave(group, 0).float()
            scores = qb.float() @ kg.transpose(1, 2) * softmax_scale
            scores = (softcap * torch.tanh(scores / softcap)).masked_fill(~mask, float("-inf"))
            o = (torch.softmax(scores, dim=-1) @ vg).to(q.dtype)
        out[q0:q1] = o.transpose(0, 1)
    return out
