"""Quantized KV pages: round-trip bounds, and paged attention over them against float64."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from stream_attention.kernels import kv_attention as kva
from stream_attention.kernels import kv_pages as kvp
from stream_attention.kernels import kv_scoring as kvs
from stream_attention.utils import quantization as qz

D, HKV, HQ, BS = 32, 2, 8, 16
# The kernels fold scales and zero points into fp32 dot products; with K/V-like offsets and
# outlier channels, scores reach a few hundred, so fp32 rounding alone is ~1e-5 absolute.
TOL = dict(atol=1e-4, rtol=1e-4)


def _bound(pages: kvp.QuantizedPages, ids: torch.Tensor) -> torch.Tensor:
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
    pages = kvp.QuantizedPages.empty(nb, BS, HKV, D, bits, device=device)
    ref = kvp.QuantizedPages.empty(nb, BS, HKV, D, bits, device=device)
    n = 40
    x = _kv_sample((n, HKV, D), g).to(device)
    slots = torch.randperm(nb * BS, generator=g)[:n].to(device)
    slots[::7] = -1  # padding rows are skipped
    kvp.write_tokens_to_pages(x, slots, pages)
    kvp.write_tokens_to_pages_ref(x, slots, ref)
    # A code may differ by one where (x - zero) / scale lands on a rounding tie.
    diff = qz.unpack_codes(pages.data, bits).int() - qz.unpack_codes(ref.data, bits).int()
    assert diff.abs().le(1).all()
    assert torch.equal(pages.scales, ref.scales)
    keep = slots >= 0
    page, row = slots[keep] // BS, slots[keep] % BS
    deq = kvp.dequantize_pages(pages)[page, row]
    bound = pages.scales[page, row, :, 0:1].float() / 2
    assert ((deq - x[keep]).abs() <= bound + 4e-7 * (x[keep].abs() + 1)).all()
    untouched = torch.ones(nb * BS, dtype=torch.bool, device=device)
    untouched[slots[keep]] = False
    assert (pages.data.view(nb * BS, -1)[untouched] == 0).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_block_writes_per_channel_round_trip(bits, device):
    g = torch.Generator().manual_seed(10 + bits)
    nb = 5
    pages = kvp.QuantizedPages.empty(nb, BS, HKV, D, bits, per_channel=True, device=device)
    ref = kvp.QuantizedPages.empty(nb, BS, HKV, D, bits, per_channel=True, device=device)
    x = _kv_sample((4, BS, HKV, D), g).to(device)
    ids = torch.tensor([3, 0, 4, 1], device=device)
    valid = torch.tensor([BS, 7, 0, 1], dtype=torch.int32, device=device)
    kvp.write_blocks_to_pages(x, ids, valid, pages)
    kvp.write_blocks_to_pages_ref(x, ids, valid, ref)
    assert torch.equal(pages.scales, ref.scales)
    deq = kvp.dequantize_pages(pages, ids)
    assert torch.allclose(deq, kvp.dequantize_pages_ref(ref, ids), atol=1e-6, rtol=0)
    rows = torch.arange(BS, device=device)[None, :] < valid[:, None]
    err = (deq - x).abs()[rows]
    assert (err <= _bound(pages, ids)[rows] + 4e-7 * (x.abs()[rows] + 1)).all()
    assert (pages.data[ids][~rows] == 0).all()


def _cache(lens: list[int], bits: int, per_channel: bool, device, seed: int = 0, d: int = D):
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
    k = _kv_sample((nb, BS, HKV, d), g)
    v = torch.randn((nb, BS, HKV, d), generator=g)
    if bits == 16:
        kp, vp = k.to(device), v.to(device)
    else:
        kp = kvp.QuantizedPages.empty(nb, BS, HKV, d, bits, per_channel=per_channel, device=device)
        vp = kvp.QuantizedPages.empty(nb, BS, HKV, d, bits, device=device)
        full = torch.full((nb,), BS, dtype=torch.int32, device=device)
        ids = torch.arange(nb, device=device)
        # The writers have their own tests; the torch reference fills pages faster on CPU.
        kvp.write_blocks_to_pages_ref(k.to(device), ids, full, kp)
        kvp.write_blocks_to_pages_ref(v.to(device), ids, full, vp)
    return kp, vp, table.to(device), torch.tensor(lens, dtype=torch.int32, device=device), k, v


# (bits, key scales per channel, split-K factor): every format, both split paths.
DECODE_CASES = [(16, False, 3), (8, False, 1), (8, False, 4), (8, True, 2), (4, False, 3), (4, True, 1)]


def test_default_splits_come_from_the_table_width(device):
    """num_splits=None sizes the split from the block table (no read of seq_lens on the
    host): a table far wider than the sequences leaves some splits empty, which must not
    change the result."""
    lens = [20, 3, 33]
    kp, vp, table, seq_lens, _, _ = _cache(lens, 8, False, device, seed=4)
    wide = torch.cat([table, torch.zeros(len(lens), 40, dtype=table.dtype, device=device)], dim=1)
    q = torch.randn(len(lens), HQ, D, device=device)
    out = kva.paged_attention_quantized(q, kp, vp, wide, seq_lens)
    ref, _ = kva.paged_attention_ref(q, kp, vp, table, seq_lens)
    torch.testing.assert_close(out.double(), ref, **TOL)


@pytest.mark.parametrize("bits,per_channel,splits", DECODE_CASES)
def test_paged_decode_matches_float64_on_dequantized_pages(bits, per_channel, splits, device):
    lens = [37, 53, 5, 16]  # ragged, one exact multiple of the block size
    kp, vp, table, seq_lens, _, _ = _cache(lens, bits, per_channel, device, seed=bits + splits)
    q = torch.randn(len(lens), HQ, D, device=device)
    out, lse = kva.paged_attention_quantized(q, kp, vp, table, seq_lens, num_splits=splits, return_lse=True)
    ref, ref_lse = kva.paged_attention_ref(q, kp, vp, table, seq_lens)
    torch.testing.assert_close(out.double(), ref, **TOL)
    torch.testing.assert_close(lse.double(), ref_lse, **TOL)


@pytest.mark.parametrize("bits,per_channel", [(4, False), (8, True)])
def test_paged_prefill_chunks_are_causal_over_the_cache(bits, per_channel, device):
    lens = [40, 9, 12]
    kp, vp, table, seq_lens, _, _ = _cache(lens, bits, per_channel, device, seed=3)
    q_lens = [6, 1, 12]  # a chunk after a cached prefix, a decode token, a whole prompt
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), HQ, D, device=device)
    out, lse = kva.paged_attention_quantized(q, kp, vp, table, seq_lens, cu, max_q_len=max(q_lens), num_splits=2,
                                            return_lse=True)
    ref, ref_lse = kva.paged_attention_ref(q, kp, vp, table, seq_lens, cu)
    torch.testing.assert_close(out.double(), ref, **TOL)
    torch.testing.assert_close(lse.double(), ref_lse, **TOL)


def test_empty_sequences_give_zeros_and_minus_inf_lse(device):
    kp, vp, table, _, _, _ = _cache([20, 3], 8, False, device)
    seq_lens = torch.tensor([0, 3], dtype=torch.int32, device=device)
    q = torch.randn(2, HQ, D, device=device)
    out, lse = kva.paged_attention_quantized(q, kp, vp, table, seq_lens, num_splits=2, return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isinf(lse[:, 0]).all()
    ref, _ = kva.paged_attention_ref(q, kp, vp, table, seq_lens)
    torch.testing.assert_close(out[1].double(), ref[1], **TOL)


def test_float_pages_agree_with_engine_paged_kernel(device):
    paged = pytest.importorskip("stream_attention.kernels.paged_attention")
    lens = [50, 17]
    kp, vp, table, seq_lens, _, _ = _cache(lens, 16, False, device, seed=5)
    q = torch.randn(2, HQ, D, device=device)
    cu = torch.arange(3, dtype=torch.int32, device=device)
    ours = kva.paged_attention_quantized(q, kp, vp, table, seq_lens, num_splits=2)
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
    exact, _ = kva.paged_attention_ref(q, k, v, table, seq_lens)
    ids = torch.arange(k.shape[0], device=device)
    full = torch.full_like(ids, BS, dtype=torch.int32)
    errors = {}
    for per_channel in (False, True):
        kp = kvp.QuantizedPages.empty(k.shape[0], BS, HKV, D, bits, per_channel=per_channel, device=device)
        vp = kvp.QuantizedPages.empty(k.shape[0], BS, HKV, D, bits, device=device)
        kvp.write_blocks_to_pages_ref(k, ids, full, kp)
        kvp.write_blocks_to_pages_ref(v, ids, full, vp)
        out, _ = kva.paged_attention_ref(q, kp, vp, table, seq_lens)
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
    _, lse = kva.paged_attention_quantized(q, kp, vp, table, seq_lens, cu, max_q_len=3, num_splits=1,
                                          return_lse=True)
    mass = kvs.paged_token_attention_mass(q, kp, table, seq_lens, lse, cu)
    ref = kvs.paged_token_attention_mass_ref(q, kp, table, seq_lens, cu)
    assert mass.shape == (2, HKV, 37)
    torch.testing.assert_close(mass.double(), ref, **TOL)
    # Every query row distributes a probability mass of one over its visible keys.
    torch.testing.assert_close(mass.sum(dim=(1, 2)).double(), torch.tensor([3.0, 1.0], dtype=torch.float64,
                               device=device) * (HQ // HKV) * HKV, atol=1e-4, rtol=0)


def test_bytes_per_token_and_validation():
    assert kvp.kv_bytes_per_token(8, 64, 16) == 2048
    assert kvp.kv_bytes_per_token(8, 64, 8) == 2 * 8 * 64 + 2 * 8 * 4
    assert kvp.kv_bytes_per_token(8, 64, 4) == 2 * 8 * 32 + 2 * 8 * 4
    assert kvp.kv_bytes_per_token(8, 64, 4, block_size=64, key_per_channel=True) == 2 * 8 * 32 + 8 * 4 + 8 * 64 * 4 / 64
    p = kvp.QuantizedPages.empty(4, BS, HKV, D, 4)
    assert p.data.shape == (4, BS, HKV, D // 2) and p.nbytes == p.data.numel() + p.scales.numel() * 2
    with pytest.raises(ValueError, match="bits"):
        kvp.QuantizedPages.empty(4, BS, HKV, D, 3)
    k8 = kvp.QuantizedPages.empty(4, BS, HKV, D, 8)
    with pytest.raises(ValueError, match="different bit widths"):
        kva.paged_attention_quantized(torch.zeros(1, HQ, D), k8, p, torch.zeros(1, 1, dtype=torch.int32),
                                     torch.ones(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="per-token"):
        kva.paged_attention_quantized(torch.zeros(1, HQ, D), k8, kvp.QuantizedPages.empty(4, BS, HKV, D, 8,
                                     per_channel=True), torch.zeros(1, 1, dtype=torch.int32),
                                     torch.ones(1, dtype=torch.int32))


# --------------------------------------------------------------------------------------
# Fast path: fp16 code tiles (int8/int4 pages, per-token scales, 16-bit queries)
# --------------------------------------------------------------------------------------

# (bits, head_dim): the smallest head_dim each width takes (V planes of 16 channels) and a larger one.
FAST_SHAPES = [(8, 32), (8, 64), (4, 64), (4, 128)]
# 16-bit dots round p * s_v to fp16 (2^-11 relative per key, as the generic kernel does with
# fp16 queries): outputs of magnitude ~3 carry ~5e-4; scores of a few hundred, ~5e-5.
TOL16 = dict(atol=2e-3, rtol=2e-3)
LSE_TOL16 = dict(atol=2e-4, rtol=1e-5)


def _fp32_out(q: torch.Tensor) -> torch.Tensor:
    """An fp32 output buffer: kernel exactness is then not hidden by 16-bit output rounding."""
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


@pytest.mark.parametrize("bits,d", FAST_SHAPES)
@pytest.mark.parametrize("splits,defer", [(1, False), (3, False), (3, True)])
def test_fast_decode_matches_float64(bits, d, splits, defer, device):
    """Both row-sum schedules (per tile, or deferred per key column to the end)."""
    lens = [37, 53, 5, 16, 0]  # ragged, a full page, an empty sequence
    kp, vp, table, seq_lens, _, _ = _cache(lens, bits, False, device, seed=20 + bits + d + splits, d=d)
    q = torch.randn(len(lens), HQ, d, device=device).half()
    assert kva._fast_views(q, kp, vp, bits, False, d) is not None
    out, lse = kva.paged_attention_quantized(q, kp, vp, table, seq_lens, num_splits=splits, return_lse=True,
                                            out=_fp32_out(q), defer_sums=defer)
    ref, ref_lse = kva.paged_attention_ref(q, kp, vp, table, seq_lens)
    torch.testing.assert_close(out.double(), ref, **TOL16)
    torch.testing.assert_close(lse.double(), ref_lse, **LSE_TOL16)
    assert torch.equal(out[-1], torch.zeros_like(out[-1])) and torch.isinf(lse[:, -1]).all()
    # The same call with q's own (fp16) output.
    out16 = kva.paged_attention_quantized(q, kp, vp, table, seq_lens, num_splits=splits, defer_sums=defer)
    assert out16.dtype == torch.float16
    torch.testing.assert_close(out16.double(), ref, **TOL16)


@pytest.mark.parametrize("bits,d", [(8, 32), (4, 64)])
def test_fast_prefill_chunks_are_causal(bits, d, device):
    lens = [40, 9, 12, 33]
    kp, vp, table, seq_lens, _, _ = _cache(lens, bits, False, device, seed=30 + bits, d=d)
    q_lens = [6, 1, 12, 0]
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), HQ, d, device=device).half()
    out, lse = kva.paged_attention_quantized(q, kp, vp, table, seq_lens, cu, max_q_len=max(q_lens), num_splits=2,
                                            return_lse=True, out=_fp32_out(q))
    ref, ref_lse = kva.paged_attention_ref(q, kp, vp, table, seq_lens, cu)
    torch.testing.assert_close(out.double(), ref, **TOL16)
    torch.testing.assert_close(lse.double(), ref_lse, **LSE_TOL16)


@pytest.mark.parametrize("bits,d", [(8, 32), (4, 64)])
def test_fast_path_exact_for_extreme_query_rows(bits, d, device):
    """q16 rescales each row by a power of two: rows near fp16's top and bottom stay exact."""
    lens = [29, 18]
    kp, vp, table, seq_lens, _, _ = _cache(lens, bits, False, device, seed=40 + bits, d=d)
    q = torch.randn(2, HQ, d, device=device)
    q[0, 0] *= 2e4       # max |q| ~ 6e4, close to fp16's 65504
    q[0, 1] *= 1e-4      # ~1e-4: fp16 subnormals start at 6e-5
    q[1, 2, : d // 2] *= 1e3  # one row mixing scales
    q = q.half()
    scale = 1e-3
    out, lse = kva.paged_attention_quantized(q, kp, vp, table, seq_lens, softmax_scale=scale, num_splits=1,
                                            return_lse=True, out=_fp32_out(q))
    ref, ref_lse = kva.paged_attention_ref(q, kp, vp, table, seq_lens, softmax_scale=scale)
    torch.testing.assert_close(out.double(), ref, **TOL16)
    torch.testing.assert_close(lse.double(), ref_lse, **LSE_TOL16)


@contextlib.contextmanager
def launched_kernels():
    """Names of the attention kernels ``kv_attention`` launches inside the block, in order
    (a spy on its one launch helper: the kernels still run)."""
    names: list[str] = []
    real = kva._launch

    def spy(kernel, *args, **kwargs):
        names.append(kernel.fn.__name__)
        return real(kernel, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kva, "_launch", spy)
        yield names


@pytest.mark.parametrize("bits", [8, 4])
def test_fast_and_generic_kernels_agree(bits, device):
    d = 64
    lens = [45, 70]
    kp, vp, table, seq_lens, _, _ = _cache(lens, bits, False, device, seed=50 + bits, d=d)
    q = torch.randn(2, HQ, d, device=device).half()
    assert kva._fast_views(q, kp, vp, bits, False, d) is not None
    with launched_kernels() as kernels:
        fast = kva.paged_attention_quantized(q, kp, vp, table, seq_lens, num_splits=2, out=_fp32_out(q))
        generic = kva.paged_attention_quantized(q, kp, vp, table, seq_lens, num_splits=2, out=_fp32_out(q),
                                                fast_kernel=False)
    assert kernels == ["_paged_attn_f16_kernel", "_paged_attn_kernel"]
    # Same roundings (fp16 q, fp16 p * s_v, exact codes): equal up to fp32 summation order.
    torch.testing.assert_close(fast, generic, atol=2e-5, rtol=2e-5)


def test_fast_path_applies_only_where_it_can(device):
    kp8, vp8, *_ = _cache([20], 8, False, device, d=32)
    q16 = torch.zeros(1, HQ, 32, dtype=torch.float16, device=device)
    assert kva._fast_views(q16, kp8, vp8, 8, False, 32) is not None
    assert kva._fast_views(q16.float(), kp8, vp8, 8, False, 32) is None  # fp32 queries: generic kernel
    assert kva._fast_views(q16.bfloat16(), kp8, vp8, 8, False, 32) is not None
    kp4, vp4, *_ = _cache([20], 4, False, device, d=32)
    assert kva._fast_views(q16, kp4, vp4, 4, False, 32) is None  # int4 V planes of 8 channels: too narrow
    kpc, vpc, *_ = _cache([20], 8, True, device, d=32)
    assert kva._fast_views(q16, kpc, vpc, 8, True, 32) is None  # per-channel (KIVI) keys: generic kernel


def test_fast_decode_launch_gets_its_register_cap(device, monkeypatch):
    """The default decode schedule of the fp16-code kernel carries FAST_DECODE_MAXNREG's cap;
    other schedules, prefill and an explicit ``maxnreg`` are left alone."""
    seen = []

    def record(kernel, tuned, grid, args, meta, launch, device, max_q_len, autotune, *, block_n=None):
        seen.append(launch)

    monkeypatch.setattr(kva, "_launch", record)
    kp, vp, table, seq_lens, _, _ = _cache([20, 9], 8, False, device, d=32)
    q = torch.zeros(2, HQ, 32, dtype=torch.float16, device=device)
    default = dict(zip(("BLOCK_N", "num_warps", "num_stages"), kva.DEFAULT_LAUNCH["decode"], strict=True))
    for launch in (default, {**default, "maxnreg": None}, {**default, "BLOCK_N": 64}):
        kva.paged_attention_quantized(q, kp, vp, table, seq_lens, num_splits=1, launch=launch)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    kva.paged_attention_quantized(q, kp, vp, table, seq_lens, cu, max_q_len=4, num_splits=1, launch=default)
    cap = kva.FAST_DECODE_MAXNREG.get(kva.DEFAULT_LAUNCH["decode"])
    assert [s.get("maxnreg") for s in seen] == [cap, None, None, None]


# A few PTX instructions, emulated bit-exactly, to check the inline-asm conversions (which
# only run on a GPU) against the portable integer ops the interpreter tests above.

def _prmt(a: int, b: int, sel: int) -> int:
    pool = (b << 32) | a
    out = 0
    for i in range(4):
        s = (sel >> (4 * i)) & 0xF
        byte = (pool >> (8 * (s & 7))) & 0xFF
        if s & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


def _f16x2(x: int) -> tuple[float, float]:
    h = torch.tensor([x & 0xFFFF, x >> 16], dtype=torch.int32).to(torch.int16).view(torch.float16)
    return float(h[0]), float(h[1])


def _sub_f16x2(a: int, b: int) -> int:
    fa, fb = _f16x2(a), _f16x2(b)
    r = torch.tensor([fa[0] - fb[0], fa[1] - fb[1]], dtype=torch.float16).view(torch.int16).to(torch.int32)
    return (int(r[0]) & 0xFFFF) | ((int(r[1]) & 0xFFFF) << 16)


def _e4m3x2_to_f16x2(x: int) -> int:
    """``cvt.rn.f16x2.e4m3x2``: the low byte to the low half, the high byte to the high half
    (torch's own e4m3 decoding; every e4m3 value is an fp16 value)."""
    e = torch.tensor([x & 0xFF, (x >> 8) & 0xFF], dtype=torch.uint8).view(torch.float8_e4m3fn)
    h = e.to(torch.float16).view(torch.int16).to(torch.int32)
    return (int(h[0]) & 0xFFFF) | ((int(h[1]) & 0xFFFF) << 16)


def _run_ptx(asm: str, regs: dict[str, int]) -> dict[str, int]:
    """Execute the straight-line PTX subset the fast kernel's conversions use."""
    body = asm.replace("{\n", " ").replace("\n\t}", " ").replace("\t}", " ")
    body = body.strip().removeprefix("{").removesuffix("}")
    for stmt in (s.strip() for s in body.split(";")):
        if not stmt or stmt.startswith(".reg"):
            continue
        op, args = stmt.split(None, 1)
        if args.startswith("{"):  # vector unpack: mov.b32 {lo, hi}, src
            dst, src = args[1:].split("}")
            lo, hi = (a.strip() for a in dst.split(","))
            word = regs[src.strip(" ,")]
            regs[lo], regs[hi] = word & 0xFFFF, word >> 16
            continue
        names = [a.strip() for a in args.split(",")]

        def val(tok: str) -> int:
            return int(tok, 16) if tok.startswith("0x") else (int(tok) if tok.isdigit() else regs[tok])

        x = [val(t) for t in names[1:]]
        if op == "cvt.rn.f16x2.e4m3x2":
            r = _e4m3x2_to_f16x2(x[0])
        elif op == "mov.b32":
            r = x[0]
        elif op == "prmt.b32":
            r = _prmt(x[0], x[1], x[2])
        elif op == "lop3.b32":
            r = _lop3(x[0], x[1], x[2], x[3])
        elif op == "shr.b32":
            r = x[0] >> x[1]
        elif op == "shl.b32":
            r = (x[0] << x[1]) & 0xFFFFFFFF
        elif op == "sub.f16x2":
            r = _sub_f16x2(x[0], x[1])
        else:
            raise AssertionError(f"unexpected PTX op {op}")
        regs[names[0]] = r
    return regs


def _e4m3_values(codes: list[int]) -> list[float]:
    return torch.tensor(codes, dtype=torch.uint8).view(torch.float8_e4m3fn).float().tolist()


@pytest.mark.parametrize("name", ["_ASM_K8", "_ASM_K4", "_ASM_V8", "_ASM_V4", "_ASM_K_FP8", "_ASM_V_FP8"])
def test_inline_asm_conversions_match_portable_ops(name):
    asm = getattr(kva, name).value
    g = torch.Generator().manual_seed(0)
    # e4m3 codes 0x7F / 0xFF are NaN, which pages never hold (writes saturate at 448).
    finite = [c for c in range(256) if c & 0x7F != 0x7F]
    for _ in range(64):
        if name == "_ASM_K_FP8":
            elems = [finite[i] for i in torch.randint(0, len(finite), (4,), generator=g).tolist()]
            regs = _run_ptx(asm, {"$2": sum(e << (8 * i) for i, e in enumerate(elems))})
            got = [*_f16x2(regs["$0"]), *_f16x2(regs["$1"])]
            want = _e4m3_values(elems)
        elif name == "_ASM_V_FP8":
            # pack=2 16-bit units (two e4m3 codes of one key) -> planes of bytes 0 and 1.
            units = [[finite[i] for i in torch.randint(0, len(finite), (2,), generator=g).tolist()] for _ in range(2)]
            packed = units[0][0] | (units[0][1] << 8) | (units[1][0] << 16) | (units[1][1] << 24)
            regs = _run_ptx(asm, {"$2": packed})
            got = [list(_f16x2(regs["$0"])), list(_f16x2(regs["$1"]))]
            want = [_e4m3_values([units[0][j], units[1][j]]) for j in range(2)]
            elems = units
        elif name.startswith("_ASM_K"):
            # pack=4 uint8 codes -> per output 2 registers of fp16 pairs.
            elems = torch.randint(0, 256, (4,), generator=g).tolist()
            n_out = 1 if name == "_ASM_K8" else 2
            packed = sum(e << (8 * i) for i, e in enumerate(elems))
            regs = _run_ptx(asm, {f"${2 * n_out}": packed})
            got = [[*_f16x2(regs[f"${2 * o}"]), *_f16x2(regs[f"${2 * o + 1}"])] for o in range(n_out)]
            if name == "_ASM_K8":
                want = [[float(e) for e in elems]]
            else:
                want = [[float(e & 15) for e in elems], [float(e & 240) for e in elems]]
        else:
            # pack=2 16-bit units (two bytes of one key) -> per output plane 1 register.
            elems = torch.randint(0, 65536, (2,), generator=g).tolist()
            n_out = 2 if name == "_ASM_V8" else 4
            regs = _run_ptx(asm, {f"${n_out}": elems[0] | (elems[1] << 16)})
            got = [list(_f16x2(regs[f"${o}"])) for o in range(n_out)]
            planes = [(0, "byte"), (1, "byte")] if name == "_ASM_V8" else [(0, "lo"), (1, "lo"), (0, "hi"), (1, "hi")]
            want = []
            for j, part in planes:
                bytes_ = [(e >> (8 * j)) & 255 for e in elems]
                if part == "byte":
                    want.append([1024.0 + b for b in bytes_])
                elif part == "lo":
                    want.append([1024.0 + 16 * (b & 15) for b in bytes_])
                else:
                    want.append([1024.0 + (b & 240) for b in bytes_])
        assert got == want, (name, elems)


def _scattered_table(lens: list[int], block_size: int, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """A block table giving each sequence (at least one page even when empty) distinct pages
    scattered over a pool with 5 spare pages; returns ``(table, pool_pages)``."""
    need = [max(1, math.ceil(n / block_size)) for n in lens]
    nb = sum(need) + 5
    table = torch.zeros(len(lens), max(need), dtype=torch.int32)
    perm, nxt = torch.randperm(nb, generator=gen), 0
    for b, n in enumerate(need):
        table[b, :n] = perm[nxt:nxt + n].int()
        nxt += n
    return table, nb


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("asm", ["1", "0"])
def test_fast_decode_gpu(bits, dtype, asm, monkeypatch):
    """The fp16-code kernel on a GPU (inline PTX and portable conversions), bf16 and fp16
    queries, against float64 on the dequantized pages and against the generic kernel."""
    monkeypatch.setenv("STREAM_ATTENTION_KV_ASM", asm)
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(1)
    hq, hkv, d, bs = 32, 8, 128, 16
    lens = [4096, 1000, 3, 2049, 0, 17]
    table, nb = _scattered_table(lens, bs, g)
    kp = kvp.QuantizedPages.empty(nb, bs, hkv, d, bits, device=dev)
    vp = kvp.QuantizedPages.empty(nb, bs, hkv, d, bits, device=dev)
    full = torch.full((nb,), bs, dtype=torch.int32, device=dev)
    ids = torch.arange(nb, device=dev)
    k = torch.randn(nb, bs, hkv, d, generator=g) * 2 + torch.randn(d, generator=g)
    kvp.write_blocks_to_pages(k.to(dev, dtype), ids, full, kp)
    kvp.write_blocks_to_pages(torch.randn(nb, bs, hkv, d, generator=g).to(dev, dtype), ids, full, vp)
    table, seq_lens = table.to(dev), torch.tensor(lens, dtype=torch.int32, device=dev)
    q = torch.randn(len(lens), hq, d, generator=g).to(dev, dtype)
    assert kva._fast_views(q, kp, vp, bits, False, d) is not None
    ref, ref_lse = kva.paged_attention_ref(q, kp, vp, table, seq_lens)
    for splits in (None, 1):
        out, lse = kva.paged_attention_quantized(q, kp, vp, table, seq_lens, num_splits=splits, return_lse=True,
                                                out=_fp32_out(q))
        torch.testing.assert_close(out.double(), ref, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-4)
        out16 = kva.paged_attention_quantized(q, kp, vp, table, seq_lens, num_splits=splits)
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
        torch.testing.assert_close(out16.double(), ref, atol=tol, rtol=tol)
    # Other schedules (benchmarks/bench_kv_quant.py checks its whole sweep the same way).
    for launch in ({"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}, {"BLOCK_N": 256, "num_warps": 8, "num_stages": 2}):
        out = kva.paged_attention_quantized(q, kp, vp, table, seq_lens, launch=launch, out=_fp32_out(q))
        torch.testing.assert_close(out.double(), ref, atol=1e-3, rtol=1e-3)
    cu = torch.tensor([0, 5, 6, 9, 9, 10, 14], dtype=torch.int32, device=dev)
    q2 = torch.randn(14, hq, d, generator=g).to(dev, dtype)
    out = kva.paged_attention_quantized(q2, kp, vp, table, seq_lens, cu, max_q_len=5, num_splits=2,
                                       out=_fp32_out(q2))
    ref, _ = kva.paged_attention_ref(q2, kp, vp, table, seq_lens, cu)
    # Prefill steps take the generic kernel on GPUs (see paged_attention_quantized), whose
    # dots run in the query dtype: bf16 queries get bf16 tolerances.
    ptol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.double(), ref, atol=ptol, rtol=ptol)
    monkeypatch.setenv("STREAM_ATTENTION_KV_FAST", "0")
    generic = kva.paged_attention_quantized(q2, kp, vp, table, seq_lens, cu, max_q_len=5, num_splits=2,
                                           out=_fp32_out(q2))
    torch.testing.assert_close(out, generic, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("bits,per_channel", [(8, False), (4, False), (8, True), (4, True)])
def test_quantized_decode_bf16_gpu(bits, per_channel):
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    hq, hkv, d, bs = 32, 8, 128, 16
    lens = [4096, 1000, 3, 2049]
    table, nb = _scattered_table(lens, bs, g)
    kp = kvp.QuantizedPages.empty(nb, bs, hkv, d, bits, per_channel=per_channel, device=dev)
    vp = kvp.QuantizedPages.empty(nb, bs, hkv, d, bits, device=dev)
    full = torch.full((nb,), bs, dtype=torch.int32, device=dev)
    ids = torch.arange(nb, device=dev)
    kvp.write_blocks_to_pages(torch.randn(nb, bs, hkv, d, generator=g).to(dev, torch.bfloat16), ids, full, kp)
    kvp.write_blocks_to_pages(torch.randn(nb, bs, hkv, d, generator=g).to(dev, torch.bfloat16), ids, full, vp)
    q = torch.randn(len(lens), hq, d, generator=g).to(dev, torch.bfloat16)
    table, seq_lens = table.to(dev), torch.tensor(lens, dtype=torch.int32, device=dev)
    ref, _ = kva.paged_attention_ref(q, kp, vp, table, seq_lens)
    for splits in (None, 1):
        out = kva.paged_attention_quantized(q, kp, vp, table, seq_lens, num_splits=splits)
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    cu = torch.tensor([0, 5, 6, 9, 10], dtype=torch.int32, device=dev)
    q2 = torch.randn(10, hq, d, generator=g).to(dev, torch.bfloat16)
    out = kva.paged_attention_quantized(q2, kp, vp, table, seq_lens, cu, max_q_len=5, num_splits=1)
    ref, _ = kva.paged_attention_ref(q2, kp, vp, table, seq_lens, cu)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
