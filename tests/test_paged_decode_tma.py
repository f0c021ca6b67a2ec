"""The TMA paged decode kernel against a float64 reference, and when paged_attention takes it."""

from __future__ import annotations

import math

import pytest
import torch

from stream_attention.kernels import paged_attention as paged_module
from stream_attention.kernels.paged_attention import paged_attention
from stream_attention.kernels.paged_decode_tma import paged_decode_tma, tma_decode_supported
from tests.test_paged_attention import _make_case, _reference

CASES = [
    # kv_lens, hq, hkv, d, shared prefix pages, num_splits
    ([37, 5, 64, 100], 8, 2, 32, 1, 1),  # GQA 4, ragged, a one-page sequence
    ([37, 5, 64, 100], 8, 2, 32, 1, 3),  # split-K: splits of one page and empty splits
    ([130, 17], 6, 2, 16, 2, 5),  # GQA 3 (not a power of two), shared prefix
    ([48, 49], 4, 4, 64, 0, 2),  # MHA, one key past a page boundary
    ([70], 8, 1, 32, 0, 4),  # MQA
]


@pytest.mark.parametrize("case", CASES)
def test_tma_decode_matches_float64(case, device):
    kv_lens, hq, hkv, d, shared, splits = case
    q, kp, vp, table, seq_lens, cu = _make_case([1] * len(kv_lens), kv_lens, hq=hq, hkv=hkv, d=d, page=16,
                                                  dtype=torch.float16, device=device, shared_prefix_pages=shared)
    if not tma_decode_supported(q, kp, vp, 1):
        pytest.skip("no TMA decode on this device (needs Hopper, or TRITON_INTERPRET=1 on CPU)")
    scale = 1.0 / math.sqrt(d)
    out = paged_decode_tma(q, kp, vp, table, seq_lens, cu, softmax_scale=scale, num_splits=splits)
    ref = _reference(q, kp, vp, table, seq_lens, cu, scale)
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-3, rtol=2e-3)


def test_tma_decode_empty_and_query_less_sequences(device):
    """A sequence with no keys gives zeros; one with no query row (a repeated cu_seqlens
    entry) is skipped; queries may be a strided view."""
    q, kp, vp, table, seq_lens, cu = _make_case([1, 1, 1], [40, 1, 20], hq=4, hkv=2, d=16, page=16,
                                                  dtype=torch.float16, device=device, seed=3)
    if not tma_decode_supported(q, kp, vp, 1):
        pytest.skip("no TMA decode on this device")
    seq_lens[1] = 0
    q_view = q.transpose(0, 1).contiguous().transpose(0, 1)
    out = paged_decode_tma(q_view, kp, vp, table, seq_lens, cu, softmax_scale=0.25, num_splits=2)
    ref = _reference(q, kp, vp, table, seq_lens, cu, 0.25)
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-3, rtol=2e-3)
    assert torch.all(out[1] == 0)
    # Sequence 1 has no query row: cu = [0, 1, 1, 2], two rows for three sequences.
    cu2 = torch.tensor([0, 1, 1, 2], dtype=torch.int32, device=device)
    q2 = q[[0, 2]]
    out2 = paged_decode_tma(q2, kp, vp, table, seq_lens, cu2, softmax_scale=0.25)
    ref2 = _reference(q2, kp, vp, table, seq_lens, cu2, 0.25)
    torch.testing.assert_close(out2.double().cpu(), ref2, atol=2e-3, rtol=2e-3)


def test_paged_attention_dispatch(device, monkeypatch):
    """Decode calls take the TMA kernel where it applies and give the pointer kernel's
    answer; ``tma=False`` (``STREAM_ATTENTION_PAGED_TMA=0`` in the engine) or an explicit
    launch keeps the pointer kernel."""
    q, kp, vp, table, seq_lens, cu = _make_case([1, 1], [33, 90], hq=8, hkv=2, d=32, page=16,
                                                  dtype=torch.float16, device=device, seed=5)
    assert not tma_decode_supported(q.float(), kp.float(), vp.float(), 1)  # 16-bit only
    assert not tma_decode_supported(q, kp, vp, 2)  # decode only
    assert not tma_decode_supported(q, kp[:, :8].contiguous(), vp[:, :8].contiguous(), 1)  # pages >= 16
    assert not tma_decode_supported(q, kp.transpose(2, 3), vp, 1)  # contiguous pools
    if not tma_decode_supported(q, kp, vp, 1):
        pytest.skip("no TMA decode on this device")
    tma_calls = []
    real = paged_module.paged_decode_tma
    monkeypatch.setattr(paged_module, "paged_decode_tma", lambda *a, **kw: tma_calls.append(1) or real(*a, **kw))
    via_tma = paged_attention(q, kp, vp, table, seq_lens, cu, max_q_len=1, softmax_scale=0.2, num_splits=2)
    assert len(tma_calls) == 1
    via_pointer = paged_attention(q, kp, vp, table, seq_lens, cu, max_q_len=1, softmax_scale=0.2, num_splits=2,
                                  tma=False)
    assert len(tma_calls) == 1  # the pointer kernel answered
    torch.testing.assert_close(via_tma, via_pointer, atol=2e-3, rtol=2e-3)
    ref = _reference(q, kp, vp, table, seq_lens, cu, 0.2)
    torch.testing.assert_close(via_tma.double().cpu(), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
def test_tma_decode_bf16_in_a_cuda_graph(device):
    """bf16 at the benchmark's shapes (GQA 32/8, hd128 and hd64), split and not, eagerly and
    replayed from a CUDA graph for new queries."""
    for d, splits in ((128, 4), (64, 1), (128, 1), (64, 7)):
        q, kp, vp, table, seq_lens, cu = _make_case([1] * 6, [3000, 17, 900, 4096, 1, 2500], hq=32, hkv=8, d=d,
                                                      page=16, dtype=torch.bfloat16, device=device, seed=11)
        assert tma_decode_supported(q, kp, vp, 1)
        scale = 1.0 / math.sqrt(d)
        out = torch.empty_like(q)

        def step(q=q, kp=kp, vp=vp, table=table, seq_lens=seq_lens, cu=cu, scale=scale, out=out, splits=splits):
            paged_decode_tma(q, kp, vp, table, seq_lens, cu, softmax_scale=scale, num_splits=splits, out=out)

        step()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.double().cpu(), _reference(q, kp, vp, table, seq_lens, cu, scale),
                                   atol=2e-2, rtol=2e-2)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for seed in range(2):
            q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).to(q))
            graph.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(out.double().cpu(), _reference(q, kp, vp, table, seq_lens, cu, scale),
                                       atol=2e-2, rtol=2e-2)
