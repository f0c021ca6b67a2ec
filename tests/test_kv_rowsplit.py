"""The row-split decode kernel (``paged_attention_quantized(row_splits=...)``): key
sub-tiles packed into the query rows, against float64 attention over the dequantized pages."""

from __future__ import annotations

import pytest
import torch

from stream_attention.kernels import kv_attention as kva
from stream_attention.kernels import kv_pages as kvp

from .test_kv_quant import HQ, TOL16, _cache, _fp32_out, _scattered_table, launched_kernels

# Scores keep the codes' 1024 offset in their fp32 dot (see "Row-split decode" in
# kv_attention): ~3 bits of fp32's 24 on terms ~8x the codes' own. With these tests' keys
# (channel offsets ~4, an outlier channel x25: scores of a few hundred), the measured LSE
# error reaches 2.7e-4 where the fp16-code kernel stays below 2e-5; 1e-3 is ~2^-18 of the
# score range, far below a bf16 query's own rounding (2^-9 of each product).
ROWSPLIT_LSE_TOL = dict(atol=1e-3, rtol=1e-5)
LENS = [37, 53, 5, 16, 0, 130]  # partial last pages, a full page, an empty sequence, several tiles


def _check(q, kp, vp, table, seq_lens, *, splits, row_splits, window_left=None, softcap=None):
    with launched_kernels() as names:
        out, lse = kva.paged_attention_quantized(q, kp, vp, table, seq_lens, num_splits=splits, return_lse=True,
                                                out=_fp32_out(q), row_splits=row_splits,
                                                window_left=window_left, softcap=softcap)
    assert names == ["_paged_attn_rowsplit_kernel"]
    ref, ref_lse = kva.paged_attention_ref(q, kp, vp, table, seq_lens, window_left=window_left, softcap=softcap)
    torch.testing.assert_close(out.double(), ref, **TOL16)
    torch.testing.assert_close(lse.double(), ref_lse, **ROWSPLIT_LSE_TOL)
    empty = seq_lens == 0
    assert torch.equal(out[empty], torch.zeros_like(out[empty])) and torch.isinf(lse[:, empty]).all()
    return out


@pytest.mark.parametrize("bits,d,splits,row_splits", [(8, 32, 1, 4), (8, 64, 3, 2), (4, 64, 3, 4), (4, 128, 1, 4),
                                                      (4, 64, 2, 2)])
def test_rowsplit_decode_matches_float64(bits, d, splits, row_splits, device):
    kp, vp, table, seq_lens, _, _ = _cache(LENS, bits, False, device, seed=60 + bits + d + splits, d=d)
    q = torch.randn(len(LENS), HQ, d, device=device).half()
    _check(q, kp, vp, table, seq_lens, splits=splits, row_splits=row_splits)
    # q's own (fp16) output.
    out16 = kva.paged_attention_quantized(q, kp, vp, table, seq_lens, num_splits=splits, row_splits=row_splits)
    ref, _ = kva.paged_attention_ref(q, kp, vp, table, seq_lens)
    assert out16.dtype == torch.float16
    torch.testing.assert_close(out16.double(), ref, **TOL16)


@pytest.mark.parametrize("group", [1, 3, 8])
def test_rowsplit_gqa_groups(group, device):
    """Row blocks hold a padded GQA group: 4 blocks of 4 rows for groups 1 and 3 (padding
    rows), and 2 blocks of 8 for a group of 8 (row_splits=4 capped to 2)."""
    lens = [70, 21, 1]
    kp, vp, table, seq_lens, _, _ = _cache(lens, 8, False, device, seed=70 + group, d=32)
    q = torch.randn(len(lens), 2 * group, 32, device=device).half()  # 2 KV heads
    assert kva._row_split_factor(4, 16, group) == (2 if group == 8 else 4)
    _check(q, kp, vp, table, seq_lens, splits=2, row_splits=4)


def test_rowsplit_fp8_pages(device):
    g = torch.Generator().manual_seed(5)
    d, hkv = 64, 2
    table, nb = _scattered_table(LENS, 16, g)
    kp = kvp.Fp8Pages.empty(nb, 16, hkv, d, device=device)
    vp = kvp.Fp8Pages.empty(nb, 16, hkv, d, device=device)
    slots = torch.arange(nb * 16, device=device)
    k = torch.randn(nb * 16, hkv, d, generator=g) * 3 + torch.randn(d, generator=g) * 2
    kvp.write_tokens_fp8_ref(k.to(device), slots, kp)
    kvp.write_tokens_fp8_ref(torch.randn(nb * 16, hkv, d, generator=g).to(device), slots, vp)
    q = torch.randn(len(LENS), HQ, d, generator=g).to(device).half()
    _check(q, kp, vp, table.to(device), torch.tensor(LENS, dtype=torch.int32, device=device), splits=2,
           row_splits=4)


@pytest.mark.parametrize("bits,d,window_left,softcap", [(8, 32, 19, None), (4, 64, 40, 2.0), (8, 32, 0, 30.0)])
def test_rowsplit_window_and_softcap(bits, d, window_left, softcap, device):
    """Sliding windows (keys left of the window masked, whole pages there never read) and
    logit soft-caps, across splits."""
    lens = [37, 130, 5, 100]
    kp, vp, table, seq_lens, _, _ = _cache(lens, bits, False, device, seed=80 + bits + window_left, d=d)
    q = torch.randn(len(lens), HQ, d, device=device).half()
    _check(q, kp, vp, table, seq_lens, splits=2, row_splits=4, window_left=window_left, softcap=softcap)


def test_rowsplit_applies_only_to_fast_decode(device):
    kp, vp, table, seq_lens, _, _ = _cache([20, 9], 8, False, device, seed=90, d=32)
    q = torch.randn(2, HQ, 32, device=device).half()
    with pytest.raises(ValueError, match="power of two"):
        kva.paged_attention_quantized(q, kp, vp, table, seq_lens, row_splits=3)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32, device=device)
    q2 = torch.randn(5, HQ, 32, device=device).half()
    with launched_kernels() as names:
        kva.paged_attention_quantized(q2, kp, vp, table, seq_lens, cu, max_q_len=3, row_splits=4)  # prefill
        kva.paged_attention_quantized(q.float(), kp, vp, table, seq_lens, row_splits=4)  # fp32 queries
        kva.paged_attention_quantized(q, kp, vp, table, seq_lens, row_splits=1)
    assert names == ["_paged_attn_f16_kernel", "_paged_attn_kernel", "_paged_attn_f16_kernel"]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("launch", [None, (64, 4, 3), (128, 4, 2)])
def test_rowsplit_decode_gpu(fmt, launch):
    """The engine's shape on a GPU (GQA 32/8, hd128, bf16 queries), inline PTX, against
    float64 on the dequantized pages; launches as bench_kv_quant.py times them."""
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(3)
    hq, hkv, d, bs = 32, 8, 128, 16
    lens = [4096, 1000, 3, 2049, 0, 17]
    table, nb = _scattered_table(lens, bs, g)
    k = torch.randn(nb, bs, hkv, d, generator=g) * 2 + torch.randn(d, generator=g)
    v = torch.randn(nb, bs, hkv, d, generator=g)
    if fmt == "fp8":
        kp = kvp.Fp8Pages.empty(nb, bs, hkv, d, device=dev)
        vp = kvp.Fp8Pages.empty(nb, bs, hkv, d, device=dev)
        slots = torch.arange(nb * bs, device=dev)
        kvp.write_tokens_fp8(k.view(-1, hkv, d).to(dev, torch.bfloat16), slots, kp)
        kvp.write_tokens_fp8(v.view(-1, hkv, d).to(dev, torch.bfloat16), slots, vp)
    else:
        bits = int(fmt[3:])
        kp = kvp.QuantizedPages.empty(nb, bs, hkv, d, bits, device=dev)
        vp = kvp.QuantizedPages.empty(nb, bs, hkv, d, bits, device=dev)
        full = torch.full((nb,), bs, dtype=torch.int32, device=dev)
        ids = torch.arange(nb, device=dev)
        kvp.write_blocks_to_pages(k.to(dev, torch.bfloat16), ids, full, kp)
        kvp.write_blocks_to_pages(v.to(dev, torch.bfloat16), ids, full, vp)
    table, seq_lens = table.to(dev), torch.tensor(lens, dtype=torch.int32, device=dev)
    q = torch.randn(len(lens), hq, d, generator=g).to(dev, torch.bfloat16)
    ref, ref_lse = kva.paged_attention_ref(q, kp, vp, table, seq_lens)
    ld = None if launch is None else dict(zip(("BLOCK_N", "num_warps", "num_stages"), launch, strict=True))
    for splits in (None, 1):
        out, lse = kva.paged_attention_quantized(q, kp, vp, table, seq_lens, num_splits=splits, return_lse=True,
                                                out=_fp32_out(q), row_splits=4, launch=ld)
        torch.testing.assert_close(out.double(), ref, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-4)
