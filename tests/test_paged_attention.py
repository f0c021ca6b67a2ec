"""The paged attention kernel against a float64 reference on random block tables."""

from __future__ import annotations

import math

import pytest
import torch

from stream_attention.kernels.paged_attention import paged_attention, paged_attention_torch, write_kv_pages


def _make_case(
    q_lens: list[int], kv_lens: list[int], *, hq: int, hkv: int, d: int, page: int, dtype: torch.dtype,
    device: torch.device, shared_prefix_pages: int = 0, seed: int = 0,
):
    """Random pages and a shuffled (non-contiguous) block table, optionally with the first
    pages of every sequence shared as a common prefix would be."""
    g = torch.Generator().manual_seed(seed)
    pages_needed = [-(-n // page) for n in kv_lens]
    shared = min([shared_prefix_pages, *pages_needed])
    num_blocks = shared + sum(n - shared for n in pages_needed) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    shared_ids = perm[:shared]
    nxt = shared
    max_pages = max(pages_needed)
    table = torch.zeros((len(kv_lens), max_pages), dtype=torch.int32)
    for b, n in enumerate(pages_needed):
        ids = shared_ids + perm[nxt:nxt + n - shared]
        nxt += n - shared
        table[b, :n] = torch.tensor(ids, dtype=torch.int32)
    k_pages = torch.randn((num_blocks, page, hkv, d), generator=g).to(dtype)
    v_pages = torch.randn((num_blocks, page, hkv, d), generator=g).to(dtype)
    q = torch.randn((sum(q_lens), hq, d), generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return (q.to(device), k_pages.to(device), v_pages.to(device), table.to(device),
            torch.tensor(kv_lens, dtype=torch.int32, device=device), cu.to(device))


def _reference(q, k_pages, v_pages, table, seq_lens, cu, scale):
    q, k_pages, v_pages = q.double().cpu(), k_pages.double().cpu(), v_pages.double().cpu()
    table, seq_lens, cu = table.cpu(), seq_lens.cpu().tolist(), cu.cpu().tolist()
    page, hkv, d = k_pages.shape[1:]
    group = q.shape[1] // hkv
    out = torch.zeros_like(q)
    for b, kv_len in enumerate(seq_lens):
        q0, q1 = cu[b], cu[b + 1]
        idx = torch.arange(kv_len)
        k = k_pages[table[b, idx // page].long(), idx % page]  # [kv_len, Hkv, D]
        v = v_pages[table[b, idx // page].long(), idx % page]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[q0:q1], k) * scale
        rows = torch.arange(q1 - q0)[:, None] + kv_len - (q1 - q0)
        s = s.masked_fill(torch.arange(kv_len)[None, :] > rows, float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)
    return out


CASES = [
    # q_lens, kv_lens, hq, hkv, d, page, shared prefix pages, num_splits
    ([1, 1, 1], [37, 5, 64], 8, 2, 32, 16, 0, 1),  # decode, GQA 4
    ([1, 1], [100, 77], 6, 2, 16, 16, 2, 3),  # decode, GQA 3 (non power of 2), split-K, shared prefix
    ([5, 1, 9, 1], [21, 18, 9, 49], 4, 4, 32, 8, 1, 1),  # mixed prefill chunks and decode, MHA, page 8
    ([17, 3], [50, 3], 8, 1, 64, 16, 0, 2),  # MQA, prefill chunk over a cache, split-K
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_paged_attention_matches_float64(case, dtype, device):
    q_lens, kv_lens, hq, hkv, d, page, shared, splits = case
    q, kp, vp, table, seq_lens, cu = _make_case(
        q_lens, kv_lens, hq=hq, hkv=hkv, d=d, page=page, dtype=dtype, device=device, shared_prefix_pages=shared
    )
    scale = 1.0 / math.sqrt(d)
    out = paged_attention(q, kp, vp, table, seq_lens, cu, max_q_len=max(q_lens), softmax_scale=scale,
                          num_splits=splits)
    ref = _reference(q, kp, vp, table, seq_lens, cu, scale)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double().cpu(), ref, atol=tol, rtol=tol)
    # The torch fallback computes the same thing.
    alt = paged_attention_torch(q, kp, vp, table, seq_lens, cu, softmax_scale=scale)
    torch.testing.assert_close(alt.double().cpu(), ref, atol=tol, rtol=tol)


def test_strided_queries_and_empty_sequences(device):
    """Queries as HF hands them over (a transposed view) and a padded entry with no keys."""
    q, kp, vp, table, seq_lens, cu = _make_case([1, 1, 1], [30, 1, 12], hq=4, hkv=2, d=16, page=4,
                                                  dtype=torch.float32, device=device, seed=3)
    seq_lens[1] = 0
    q_view = q.transpose(0, 1).contiguous().transpose(0, 1)
    out = paged_attention(q_view, kp, vp, table, seq_lens, cu, max_q_len=1, softmax_scale=0.25, num_splits=2)
    ref = _reference(q, kp, vp, table, seq_lens, cu, 0.25)
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-5, rtol=2e-5)
    assert torch.all(out[1] == 0)


def test_pages_in_another_float_type(device):
    """kv_cache_dtype: fp16 pages under fp32 queries are upcast in the kernel."""
    q, kp, vp, table, seq_lens, cu = _make_case([1, 4], [29, 40], hq=4, hkv=2, d=16, page=8, dtype=torch.float32,
                                                  device=device, seed=5)
    kp16, vp16 = kp.half(), vp.half()
    out = paged_attention(q, kp16, vp16, table, seq_lens, cu, max_q_len=4, softmax_scale=0.25)
    ref = _reference(q, kp16.float(), vp16.float(), table, seq_lens, cu, 0.25)
    torch.testing.assert_close(out.double().cpu(), ref, atol=1e-5, rtol=1e-5)


def test_write_kv_pages_round_trip(device):
    pages = torch.zeros((4, 4, 2, 16), device=device)
    vpages = torch.zeros_like(pages)
    k = torch.randn(6, 2, 16, device=device)
    v = torch.randn(6, 2, 16, device=device)
    slots = torch.tensor([13, 14, 15, 0, 1, 2], device=device)
    write_kv_pages(k, v, pages, vpages, slots)
    assert torch.equal(pages[3, 1:], k[:3])
    assert torch.equal(vpages[0, :3], v[3:])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_paged_attention_bf16_gpu(dtype, device):
    q, kp, vp, table, seq_lens, cu = _make_case([1] * 8 + [33], [4000] * 4 + [17] * 4 + [200], hq=32, hkv=8,
                                                  d=128, page=16, dtype=dtype, device=device, shared_prefix_pages=3)
    scale = 1.0 / math.sqrt(128)
    for splits in (1, 7):
        out = paged_attention(q, kp, vp, table, seq_lens, cu, max_q_len=33, softmax_scale=scale, num_splits=splits)
        ref = _reference(q, kp, vp, table, seq_lens, cu, scale)
        torch.testing.assert_close(out.double().cpu(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_split_decode_replays_in_a_cuda_graph(device):
    """A split decode step captured once replays correctly for new queries (the engine's decode path)."""""
    from stream_attention.core.benchmarking import time_graph_ms

    q, kp, vp, table, seq_lens, cu = _make_case([1] * 6, [3000, 17, 900, 4096, 1, 2500], hq=32, hkv=8, d=128,
                                                  page=16, dtype=torch.bfloat16, device=device, seed=11)
    scale = 1.0 / math.sqrt(128)
    out = torch.empty_like(q)

    def step():
        paged_attention(q, kp, vp, table, seq_lens, cu, max_q_len=1, softmax_scale=scale, num_splits=5, out=out)

    step()  # warm-up outside the capture: compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in range(3):
        q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).to(q))
        graph.replay()
        torch.cuda.synchronize()
        ref = _reference(q, kp, vp, table, seq_lens, cu, scale)
        torch.testing.assert_close(out.double().cpu(), ref, atol=2e-2, rtol=2e-2)
    assert time_graph_ms(step, reps=5) > 0 and time_graph_ms(step, reps=5, flush="zero") > 0
