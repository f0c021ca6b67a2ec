"""Sliding windows and logit soft-capping in the paged kernels, against a float64 reference.

The reference is written from the definitions (transformers' eager attention for Gemma 2 /
Mistral): query ``i`` of a sequence with ``q_len`` new tokens and ``kv_len`` keys sits at
position ``p = kv_len - q_len + i`` and attends to key ``j`` iff ``p - window_left <= j <= p``;
scores are ``softcap * tanh(scale * q.k / softcap)`` before the softmax. Keys are gathered
token by token from the pages. Every kernel path is checked: the pointer kernel (prefill
chunks and decode, split-K), the TMA decode kernel (fp16 under the interpreter, bf16 on
GPUs), int8/int4 pages and float pages through :mod:`kv_attention`, and the torch fallback.
Pages wholly outside the window are filled with NaN, so a kernel that reads them fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from stream_attention.kernels import kv_attention as kva
from stream_attention.kernels import kv_pages as kvp
from stream_attention.kernels.paged_attention import paged_attention, paged_attention_torch
from stream_attention.kernels.paged_decode_tma import paged_decode_tma, tma_decode_supported
from tests.test_paged_attention import _make_case


def _reference(q, k_pages, v_pages, table, seq_lens, cu, *, scale, window_left=None, softcap=None):
    """float64 attention of each query token over its visible keys, one (token, head) at a time."""
    q, k_pages, v_pages = q.double().cpu(), k_pages.double().cpu(), v_pages.double().cpu()
    table, lens, cu = table.cpu(), seq_lens.cpu().tolist(), cu.cpu().tolist()
    page, hkv = k_pages.shape[1], k_pages.shape[2]
    group = q.shape[1] // hkv
    out = torch.zeros_like(q)
    for b, kv_len in enumerate(lens):
        q_len = cu[b + 1] - cu[b]
        keys = [(table[b, j // page].item(), j % page) for j in range(kv_len)]
        for i in range(q_len):
            pos = kv_len - q_len + i
            first = 0 if window_left is None else max(0, pos - window_left)
            visible = range(first, pos + 1)
            if not visible:
                continue
            for h in range(q.shape[1]):
                kvh = h // group
                k = torch.stack([k_pages[keys[j][0], keys[j][1], kvh] for j in visible])
                v = torch.stack([v_pages[keys[j][0], keys[j][1], kvh] for j in visible])
                s = (k @ q[cu[b] + i, h]) * scale
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                out[cu[b] + i, h] = torch.softmax(s, 0) @ v
    return out


def _poison_outside_windows(k_pages, v_pages, table, seq_lens, cu, window_left, *, whole_pages):
    """NaN into the keys/values no query of a sequence can see (left of the earliest
    window); with ``whole_pages`` only pages that lie entirely there (what a kernel that
    reads whole pages may skip)."""
    page = k_pages.shape[1]
    lens, cu_l = seq_lens.tolist(), cu.tolist()
    for b, kv_len in enumerate(lens):
        q_len = cu_l[b + 1] - cu_l[b]
        first = max(0, kv_len - q_len - window_left)
        for j in range((first // page) * page if whole_pages else first):
            blk = table[b, j // page].item()
            k_pages[blk, j % page] = float("nan")
            v_pages[blk, j % page] = float("nan")


# q_lens, kv_lens, hq, hkv, d, page, num_splits, window_left, softcap
CASES = [
    ([1, 1, 1], [37, 5, 64], 8, 2, 32, 16, 1, 19, None),  # decode, window of 20 keys
    ([1, 1], [100, 77], 6, 2, 16, 8, 3, 40, None),  # decode, GQA 3, split-K over the window
    ([5, 1, 9, 1], [21, 18, 9, 49], 4, 4, 32, 8, 1, 6, None),  # prefill chunks + decode, window < chunk
    ([17, 3], [50, 3], 8, 1, 64, 16, 2, 0, None),  # window_left 0: each query sees itself only
    ([1, 1], [40, 12], 4, 2, 32, 16, 1, None, 5.0),  # soft-cap only
    ([7, 1], [60, 33], 4, 2, 32, 8, 2, 13, 2.0),  # window + soft-cap, split-K, strong capping
    ([33], [33], 4, 2, 16, 16, 1, 100, 30.0),  # window wider than the context: no effect
]


def _ids(case):
    return f"q{case[0]}-kv{case[1]}-w{case[7]}-cap{case[8]}-s{case[6]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_pointer_kernel_window_softcap(case, dtype, device):
    q_lens, kv_lens, hq, hkv, d, page, splits, window, cap = case
    q, kp, vp, table, seq_lens, cu = _make_case(q_lens, kv_lens, hq=hq, hkv=hkv, d=d, page=page, dtype=dtype,
                                                  device=device, seed=7)
    scale = 0.7 / math.sqrt(d)  # not 1/sqrt(d): a query_pre_attn_scalar-style scale
    ref = _reference(q, kp, vp, table, seq_lens, cu, scale=scale, window_left=window, softcap=cap)
    if window is not None:
        _poison_outside_windows(kp, vp, table, seq_lens, cu, window, whole_pages=False)
    # An explicit launch keeps decode on the pointer kernel (the TMA kernel has its own test).
    out = paged_attention(q, kp, vp, table, seq_lens, cu, max_q_len=max(q_lens), softmax_scale=scale,
                          num_splits=splits, launch=(16, 4, 1), window_left=window, softcap=cap)
    tol = 2e-5 if dtype == torch.float32 else 2e-3  # fp16 queries/pages; fp32 accumulation
    torch.testing.assert_close(out.double().cpu(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("case", [c for c in CASES if set(c[0]) == {1}], ids=_ids)
def test_tma_decode_window_softcap(case, device):
    q_lens, kv_lens, hq, hkv, d, page, splits, window, cap = case
    q, kp, vp, table, seq_lens, cu = _make_case(q_lens, kv_lens, hq=hq, hkv=hkv, d=d, page=max(page, 16),
                                                  dtype=torch.float16, device=device, seed=8)
    if not tma_decode_supported(q, kp, vp, 1):
        pytest.skip("no TMA decode on this device (needs Hopper, or TRITON_INTERPRET=1 on CPU)")
    scale = 1.0 / math.sqrt(d)
    ref = _reference(q, kp, vp, table, seq_lens, cu, scale=scale, window_left=window, softcap=cap)
    if window is not None:
        _poison_outside_windows(kp, vp, table, seq_lens, cu, window, whole_pages=True)
    out = paged_decode_tma(q, kp, vp, table, seq_lens, cu, softmax_scale=scale, num_splits=splits,
                           window_left=window, softcap=cap)
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-3, rtol=2e-3)  # fp16 inputs
    # paged_attention's own dispatch reaches the same kernel with the same answer.
    routed = paged_attention(q, kp, vp, table, seq_lens, cu, max_q_len=1, softmax_scale=scale, num_splits=splits,
                             window_left=window, softcap=cap)
    torch.testing.assert_close(routed, out, atol=0, rtol=0)


@pytest.mark.parametrize("case, bits", [(CASES[2], 8), (CASES[5], 8), (CASES[5], 4), (CASES[2], 16), (CASES[5], 16),
                                        pytest.param(CASES[1], 4, marks=pytest.mark.slow)])
def test_kv_quant_window_softcap(case, bits, device):
    """int8/int4 pages (the reference reads their dequantized values) and float pages."""
    q_lens, kv_lens, hq, hkv, d, page, splits, window, cap = case
    dtype = torch.float16
    q, kp, vp, table, seq_lens, cu = _make_case(q_lens, kv_lens, hq=hq, hkv=hkv, d=d, page=page, dtype=dtype,
                                                  device=device, seed=9)
    if bits == 16:
        k_pages, v_pages = kp, vp
        k_dense, v_dense = kp, vp
    else:
        nb = kp.shape[0]
        k_pages = kvp.QuantizedPages.empty(nb, page, hkv, d, bits, device=device)
        v_pages = kvp.QuantizedPages.empty(nb, page, hkv, d, bits, device=device)
        kvp.write_blocks_to_pages(kp, torch.arange(nb, device=device), torch.full((nb,), page, device=device),
                                 k_pages)
        kvp.write_blocks_to_pages(vp, torch.arange(nb, device=device), torch.full((nb,), page, device=device),
                                 v_pages)
        k_dense = kvp.dequantize_pages_ref(k_pages)
        v_dense = kvp.dequantize_pages_ref(v_pages)
    scale = 1.0 / math.sqrt(d)
    ref = _reference(q, k_dense, v_dense, table, seq_lens, cu, scale=scale, window_left=window, softcap=cap)
    # kv_attention's own torch reference (the engine's fallback for these pages) agrees.
    ref_out, _ = kva.paged_attention_ref(q, k_pages, v_pages, table, seq_lens, cu, softmax_scale=scale,
                                        window_left=window, softcap=cap)
    torch.testing.assert_close(ref_out, ref, atol=1e-9, rtol=1e-9)
    if bits == 16:
        _poison_outside_windows(kp, vp, table, seq_lens, cu, window, whole_pages=False)
    out = kva.paged_attention_quantized(q, k_pages, v_pages, table, seq_lens, cu, max_q_len=max(q_lens),
                                       softmax_scale=scale, num_splits=splits, window_left=window, softcap=cap)
    # fp16 queries and fp16 products of the dequantized values (fp32 accumulation).
    torch.testing.assert_close(out.double().cpu(), ref, atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5]], ids=_ids)
def test_torch_fallback_window_softcap(case, device):
    q_lens, kv_lens, hq, hkv, d, page, _, window, cap = case
    q, kp, vp, table, seq_lens, cu = _make_case(q_lens, kv_lens, hq=hq, hkv=hkv, d=d, page=page,
                                                  dtype=torch.float32, device=device, seed=10)
    scale = 1.0 / math.sqrt(d)
    ref = _reference(q, kp, vp, table, seq_lens, cu, scale=scale, window_left=window, softcap=cap)
    out = paged_attention_torch(q, kp, vp, table, seq_lens, cu, softmax_scale=scale, window_left=window,
                                softcap=cap)
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-5, rtol=2e-5)  # fp32 math


def test_bad_softcap_is_refused(device):
    q, kp, vp, table, seq_lens, cu = _make_case([1], [5], hq=2, hkv=1, d=16, page=16, dtype=torch.float32,
                                                  device=device)
    with pytest.raises(ValueError, match="softcap"):
        paged_attention(q, kp, vp, table, seq_lens, cu, max_q_len=1, softmax_scale=1.0, softcap=-1.0)
    with pytest.raises(ValueError, match="causal"):
        kva.paged_attention_quantized(q, kp, vp, table, seq_lens, cu, max_q_len=1, window_left=3, causal=False)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_window_softcap_bf16_gpu(case, device):
    """bf16 on a GPU: the pointer kernel, and for decode the TMA kernel paged_attention picks."""
    q_lens, kv_lens, hq, hkv, d, page, splits, window, cap = case
    q, kp, vp, table, seq_lens, cu = _make_case(q_lens, kv_lens, hq=hq, hkv=hkv, d=d, page=max(page, 16),
                                                  dtype=torch.bfloat16, device=device, seed=11)
    scale = 1.0 / math.sqrt(d)
    ref = _reference(q, kp, vp, table, seq_lens, cu, scale=scale, window_left=window, softcap=cap)
    if window is not None:
        _poison_outside_windows(kp, vp, table, seq_lens, cu, window, whole_pages=True)
    for launch in (None, (64, 4, 2)):
        out = paged_attention(q, kp, vp, table, seq_lens, cu, max_q_len=max(q_lens), softmax_scale=scale,
                              num_splits=splits, launch=launch, window_left=window, softcap=cap)
        torch.testing.assert_close(out.double().cpu(), ref, atol=2e-2, rtol=2e-2)  # bf16 inputs
