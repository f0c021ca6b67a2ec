"""Quantized KV pages: round-trip bounds, and paged attention over them against float64."""

from __future__ import annotations

import math

import pytest
import torch

from stream_attention.kernels import kv_quant as kq
from stream_attention.utils import quantization as qz

D, HKV, HQ, BS = 32, 2, 8, 16
# The kernels fold scales and zero points into fp32 dot products; with K/V-like offsets and
# outlier channels, scores reach a few hundred, so fp32 rounding alone is ~1e-5 absolute.
TOL = dict(atol=1e-4, rtol=1e-4)


def _bound(pages: kq.QuantizedPages, ids: torch.Tensor) -> torch.Tensor:
    """Per-element ``scale / 2`` of pages ``ids``, shaped like their dequantization."""
    sc = pages.scales[ids.long()].float()
    half = sc[:, None, :, 0, :] / 2 if pages.per_channel else sc[..., 0:1] / 2
    return half.expand(len(ids), pages.block_size, pages.num_heads, pages.head_dim)


def _kv_sample(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """K/V-like data: channel offsets, a few outlier channels, mixed magnitudes."""
    x = torch.randn(shape, generator=g)
    x = x * torch.rand(shape[-1], generator=g).mul(3).add(0.1) + torch.randn(shape[-1], generator=g) * 4
    x[..., 3] *= 25.0
    return x


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_reference_quantization_bound_and_packing(bits):
    g = torch.Generator().manual_seed(0)
    x = _kv_sample((5, 7, 64), g)
    # Adversarial groups: large offset with a tiny range (fp16 rounding of the zero point
    # alone would break the bound), constants, zeros, subnormals, negatives.
    x[0, 0] = 1000.0 + torch.rand(64, generator=g) * 1e-3
    x[0, 1] = -3.25
    x[0, 2] = 0.0
    x[0, 3] = torch.randn(64, generator=g) * 1e-7
    x[0, 4] = -500.0 - torch.rand(64, generator=g)
    codes, scale, zero = qz.quantize_along(x, bits, dims=(-1,))
    assert int(codes.max()) <= qz.QMAX[bits]
    assert torch.equal(scale, scale.half().float()) and torch.equal(zero, zero.half().float())
    err = (qz.dequantize_codes(codes, scale, zero) - x).abs()
    assert (err <= scale / 2 + 4e-7 * (x.abs() + 1)).all()
    packed = qz.pack_codes(codes, bits)
    assert packed.shape[-1] == 64 * bits // 8 and packed.dtype == torch.uint8
    assert torch.equal(qz.unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", [8, 4])
def test_token_writes_round_trip_within_half_scale(bits, device):
    g = torch.Generator().manual_seed(bits)
    nb = 6
    pages = kq.QuantizedPages.empty(nb, BS, HKV, D, bits, device=device)
    ref = kq.QuantizedPages.empty(nb, BS, HKV, D, bits, device=device)
    n = 40
    x = _kv_sample((n, HKV, D), g).to(device)
    slots = torch.randperm(nb * BS, generator=g)[:n].to(device)
    slots[::7] = -1  # padding rows are skipped
    kq.write_tokens_to_pages(x, slots, pages)
    kq.write_tokens_to_pages_ref(x, slots, ref)
    # A code may differ by one where (x - zero) / scale lands on a rounding tie.
    diff = qz.unpack_codes(pages.data, bits).int() - qz.unpack_codes(ref.data, bits).int()
    assert diff.abs().le(1).all()
    assert torch.equal(pages.scales, ref.scales)
    keep = slots >= 0
    page, row = slots[keep] // BS, slots[keep] % BS
    deq = kq.dequantize_pages(pages)[page, row]
    bound = pages.scales[page, row, :, 0:1].float() / 2
    assert ((deq - x[keep]).abs() <= bound + 4e-7 * (x[keep].abs() + 1)).all()
    untouched = torch.ones(nb * BS, dtype=torch.bool, device=device)
    untouched[slots[keep]] = False
    assert (pages.data.view(nb * BS, -1)[untouched] == 0).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_block_writes_per_channel_round_trip(bits, device):
    g = torch.Generator().manual_seed(10 + bits)
    nb = 5
    pages = kq.QuantizedPages.empty(nb, BS, HKV, D, bits, per_channel=True, device=device)
    ref = kq.QuantizedPages.empty(nb, BS, HKV, D, bits, per_channel=True, device=device)
    x = _kv_sample((4, BS, HKV, D), g).to(device)
    ids = torch.tensor([3, 0, 4, 1], device=device)
    valid = torch.tensor([BS, 7, 0, 1], dtype=torch.int32, device=device)
    kq.write_blocks_to_pages(x, ids, valid, pages)
    kq.write_blocks_to_pages_ref(x, ids, valid, ref)
    assert torch.equal(pages.scales, ref.scales)
    deq = kq.dequantize_pages(pages, ids)
    assert torch.allclose(deq, kq.dequantize_pages_ref(ref, ids), atol=1e-6, rtol=0)
    rows = torch.arange(BS, device=device)[None, :] < valid[:, None]
    err = (deq - x).abs()[rows]
    assert (err <= _bound(pages, ids)[rows] + 4e-7 * (x.abs()[rows] + 1)).all()
    assert (pages.data[ids][~rows] == 0).all()


def _cache(lens: list[int], bits: int, per_channel: bool, device, seed: int = 0):
    """Random K/V written into a shuffled page pool; returns pages, block table, lengths."""
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil(n / BS) for n in lens]
    nb = sum(need) + 3
    perm = torch.randperm(nb, generator=g)
    table = torch.zeros(len(lens), max(need), dtype=torch.int32)
    nxt = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[nxt:nxt + n].int()
        nxt += n
    k = _kv_sample((nb, BS, HKV, D), g)
    v = torch.randn((nb, BS, HKV, D), generator=g)
    if bits == 16:
        kp, vp = k.to(device), v.to(device)
    else:
        kp = kq.QuantizedPages.empty(nb, BS, HKV, D, bits, per_channel=per_channel, device=device)
        vp = kq.QuantizedPages.empty(nb, BS, HKV, D, bits, device=device)
        full = torch.full((nb,), BS, dtype=torch.int32, device=device)
        ids = torch.arange(nb, device=device)
        # The writers have their own tests; the torch reference fills pages faster on CPU.
        kq.write_blocks_to_pages_ref(k.to(device), ids, full, kp)
        kq.write_blocks_to_pages_ref(v.to(device), ids, full, vp)
    return kp, vp, table.to(device), torch.tensor(lens, dtype=torch.int32, device=device), k, v


# (bits, key scales per channel, split-K factor): every format, both split paths.
DECODE_CASES = [(16, False, 3), (8, False, 1), (8, False, 4), (8, True, 2), (4, False, 3), (4, True, 1)]


@pytest.mark.parametrize("bits,per_channel,splits", DECODE_CASES)
def test_paged_decode_matches_float64_on_dequantized_pages(bits, per_channel, splits, device):
    lens = [37, 53, 5, 16]  # ragged, one exact multiple of the block size
    kp, vp, table, seq_lens, _, _ = _cache(lens, bits, per_channel, device, seed=bits + splits)
    q = torch.randn(len(lens), HQ, D, device=device)
    out, lse = kq.paged_attention_quantized(q, kp, vp, table, seq_lens, num_splits=splits, return_lse=True)
    ref, ref_lse = kq.paged_attention_ref(q, kp, vp, table, seq_lens)
    torch.testing.assert_close(out.double(), ref, **TOL)
    torch.testing.assert_close(lse.double(), ref_lse, **TOL)


@pytest.mark.parametrize("bits,per_channel", [(4, False), (8, True)])
def test_paged_prefill_chunks_are_causal_over_the_cache(bits, per_channel, device):
    lens = [40, 9, 12]
    kp, vp, table, seq_lens, _, _ = _cache(lens, bits, per_channel, device, seed=3)
    q_lens = [6, 1, 12]  # a chunk after a cached prefix, a decode token, a whole prompt
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), HQ, D, device=device)
    out, lse = kq.paged_attention_quantized(q, kp, vp, table, seq_lens, cu, max_q_len=max(q_lens), num_splits=2,
                                            return_lse=True)
    ref, ref_lse = kq.paged_attention_ref(q, kp, vp, table, seq_lens, cu)
    torch.testing.assert_close(out.double(), ref, **TOL)
    torch.testing.assert_close(lse.double(), ref_lse, **TOL)


def test_empty_sequences_give_zeros_and_minus_inf_lse(device):
    kp, vp, table, _, _, _ = _cache([20, 3], 8, False, device)
    seq_lens = torch.tensor([0, 3], dtype=torch.int32, device=device)
    q = torch.randn(2, HQ, D, device=device)
    out, lse = kq.paged_attention_quantized(q, kp, vp, table, seq_lens, num_splits=2, return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isinf(lse[:, 0]).all()
    ref, _ = kq.paged_attention_ref(q, kp, vp, table, seq_lens)
    torch.testing.assert_close(out[1].double(), ref[1], **TOL)


def test_float_pages_agree_with_engine_paged_kernel(device):
    paged = pytest.importorskip("stream_attention.kernels.paged_attention")
    lens = [50, 17]
    kp, vp, table, seq_lens, _, _ = _cache(lens, 16, False, device, seed=5)
    q = torch.randn(2, HQ, D, device=device)
    cu = torch.arange(3, dtype=torch.int32, device=device)
    ours = kq.paged_attention_quantized(q, kp, vp, table, seq_lens, num_splits=2)
    theirs = paged.paged_attention(q, kp, vp, table, seq_lens, cu, max_q_len=1, softmax_scale=D**-0.5)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits,max_rel", [(8, 1e-2), (4, 1e-1)])
def test_per_channel_keys_beat_per_token_on_outlier_channels(bits, max_rel, device):
    """KIVI's observation: key outliers live in fixed channels, so per-channel key scales
    lose far less than per-token ones; attention over them stays close to exact."""
    lens = [64, 48]
    _, _, table, seq_lens, k, v = _cache(lens, 16, False, device, seed=7)
    k, v = k.to(device), v.to(device)
    q = torch.randn(2, HQ, D, device=device)
    exact, _ = kq.paged_attention_ref(q, k, v, table, seq_lens)
    ids = torch.arange(k.shape[0], device=device)
    full = torch.full_like(ids, BS, dtype=torch.int32)
    errors = {}
    for per_channel in (False, True):
        kp = kq.QuantizedPages.empty(k.shape[0], BS, HKV, D, bits, per_channel=per_channel, device=device)
        vp = kq.QuantizedPages.empty(k.shape[0], BS, HKV, D, bits, device=device)
        kq.write_blocks_to_pages_ref(k, ids, full, kp)
        kq.write_blocks_to_pages_ref(v, ids, full, vp)
        out, _ = kq.paged_attention_ref(q, kp, vp, table, seq_lens)
        errors[per_channel] = float((out - exact).norm() / exact.norm())
    assert errors[True] < max_rel
    assert errors[True] < 0.5 * errors[False]


@pytest.mark.parametrize("bits", [16, 4])
def test_token_attention_mass_matches_reference(bits, device):
    lens = [37, 21]
    kp, vp, table, seq_lens, _, _ = _cache(lens, bits, False, device, seed=11)
    q_lens = [3, 1]
    cu = torch.tensor([0, 3, 4], dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), HQ, D, device=device)
    _, lse = kq.paged_attention_quantized(q, kp, vp, table, seq_lens, cu, max_q_len=3, num_splits=1,
                                          return_lse=True)
    mass = kq.paged_token_attention_mass(q, kp, table, seq_lens, lse, cu)
    ref = kq.paged_token_attention_mass_ref(q, kp, table, seq_lens, cu)
    assert mass.shape == (2, HKV, 37)
    torch.testing.assert_close(mass.double(), ref, **TOL)
    # Every query row distributes a probability mass of one over its visible keys.
    torch.testing.assert_close(mass.sum(dim=(1, 2)).double(), torch.tensor([3.0, 1.0], dtype=torch.float64,
                               device=device) * (HQ // HKV) * HKV, atol=1e-4, rtol=0)


def test_bytes_per_token_and_validation():
    assert kq.kv_bytes_per_token(8, 64, 16) == 2048
    assert kq.kv_bytes_per_token(8, 64, 8) == 2 * 8 * 64 + 2 * 8 * 4
    assert kq.kv_bytes_per_token(8, 64, 4) == 2 * 8 * 32 + 2 * 8 * 4
    assert kq.kv_bytes_per_token(8, 64, 4, block_size=64, key_per_channel=True) == 2 * 8 * 32 + 8 * 4 + 8 * 64 * 4 / 64
    p = kq.QuantizedPages.empty(4, BS, HKV, D, 4)
    assert p.data.shape == (4, BS, HKV, D // 2) and p.nbytes == p.data.numel() + p.scales.numel() * 2
    with pytest.raises(ValueError, match="bits"):
        kq.QuantizedPages.empty(4, BS, HKV, D, 3)
    k8 = kq.QuantizedPages.empty(4, BS, HKV, D, 8)
    with pytest.raises(ValueError, match="different bit widths"):
        kq.paged_attention_quantized(torch.zeros(1, HQ, D), k8, p, torch.zeros(1, 1, dtype=torch.int32),
                                     torch.ones(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="per-token"):
        kq.paged_attention_quantized(torch.zeros(1, HQ, D), k8, kq.QuantizedPages.empty(4, BS, HKV, D, 8,
                                     per_channel=True), torch.zeros(1, 1, dtype=torch.int32),
                                     torch.ones(1, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("bits,per_channel", [(8, False), (4, False), (8, True), (4, True)])
def test_quantized_decode_bf16_gpu(bits, per_channel):
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    hq, hkv, d, bs = 32, 8, 128, 16
    lens = [4096, 1000, 3, 2049]
    need = [math.ceil(n / bs) for n in lens]
    nb = sum(need) + 5
    table = torch.zeros(len(lens), max(need), dtype=torch.int32)
    perm, nxt = torch.randperm(nb, generator=g), 0
    for b, n in enumerate(need):
        table[b, :n] = perm[nxt:nxt + n].int()
        nxt += n
    kp = kq.QuantizedPages.empty(nb, bs, hkv, d, bits, per_channel=per_channel, device=dev)
    vp = kq.QuantizedPages.empty(nb, bs, hkv, d, bits, device=dev)
    full = torch.full((nb,), bs, dtype=torch.int32, device=dev)
    ids = torch.arange(nb, device=dev)
    kq.write_blocks_to_pages(torch.randn(nb, bs, hkv, d, generator=g).to(dev, torch.bfloat16), ids, full, kp)
    kq.write_blocks_to_pages(torch.randn(nb, bs, hkv, d, generator=g).to(dev, torch.bfloat16), ids, full, vp)
    q = torch.randn(len(lens), hq, d, generator=g).to(dev, torch.bfloat16)
    table, seq_lens = table.to(dev), torch.tensor(lens, dtype=torch.int32, device=dev)
    ref, _ = kq.paged_attention_ref(q, kp, vp, table, seq_lens)
    for splits in (None, 1):
        out = kq.paged_attention_quantized(q, kp, vp, table, seq_lens, num_splits=splits)
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    cu = torch.tensor([0, 5, 6, 9, 10], dtype=torch.int32, device=dev)
    q2 = torch.randn(10, hq, d, generator=g).to(dev, torch.bfloat16)
    out = kq.paged_attention_quantized(q2, kp, vp, table, seq_lens, cu, max_q_len=5, num_splits=1)
    ref, _ = kq.paged_attention_ref(q2, kp, vp, table, seq_lens, cu)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
