"""FP8 (e4m3) KV pages: calibration, writes, and paged attention over them against float64
attention of the dequantized values (computed here from the definition)."""

from __future__ import annotations

import math

import pytest
import torch

from stream_attention.kernels import kv_attention as kva
from stream_attention.kernels import kv_pages as kvp
from stream_attention.kernels import kv_scoring as kvs

D, HKV, HQ, BS = 32, 2, 6, 16
E4M3_MAX = 448.0
HEADROOM = 16.0


def _kv_sample(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """K/V-like data: per-channel offsets and scales, an outlier channel."""
    x = torch.randn(shape, generator=g)
    x = x * torch.rand(shape[-1], generator=g).mul(3).add(0.1) + torch.randn(shape[-1], generator=g) * 2
    x[..., 3] *= 10.0
    return x


def _expected_scale(x: torch.Tensor) -> torch.Tensor:
    """Per head: the smallest power of two >= amax * 16 / 448 (the documented scheme)."""
    amax = x.abs().amax(dim=(0, 2)).double()
    return torch.tensor([2.0 ** math.ceil(math.log2(a * HEADROOM / E4M3_MAX)) for a in amax.tolist()])


def _dequant(pages: kvp.Fp8Pages) -> torch.Tensor:
    return pages.data.double() * pages.scale.double()[:, None]


@pytest.mark.parametrize("writer", ["triton", "torch"])
def test_first_write_calibrates_power_of_two_scales_and_rounds_to_nearest(writer, device):
    g = torch.Generator().manual_seed(0)
    nb, n = 5, 40
    pages = kvp.Fp8Pages.empty(nb, BS, HKV, D, device=device)
    x = _kv_sample((n, HKV, D), g)
    slots = torch.randperm(nb * BS, generator=g)[:n]
    slots[::7] = -1  # skipped, and not part of the calibration
    x[::7] *= 1000.0
    write = kvp.write_tokens_fp8 if writer == "triton" else kvp.write_tokens_fp8_ref
    write(x.to(device), slots.to(device), pages)
    keep = slots >= 0
    scale = _expected_scale(x[keep])
    assert torch.equal(pages.scale.cpu().double(), scale)
    # x / 2^e is exact, so the stored value is e4m3's round-to-nearest-even of it.
    want = (x[keep].double() / scale[:, None]).float().to(torch.float8_e4m3fn)
    got = pages.data.cpu().view(nb * BS, HKV, D)
    assert torch.equal(got[slots[keep]].view(torch.uint8), want.view(torch.uint8))
    untouched = torch.ones(nb * BS, dtype=torch.bool)
    untouched[slots[keep]] = False
    assert (got[untouched].float() == 0).all()
    # Relative error of e4m3 (3 mantissa bits): at most 2^-4 for normal values, and the
    # headroom keeps the largest values far from saturation.
    deq = _dequant(pages).cpu().view(nb * BS, HKV, D)[slots[keep]]
    big = x[keep].abs() > 2.0 ** -6 * scale[:, None].float()
    assert ((deq - x[keep].double()).abs()[big] <= x[keep].double().abs()[big] * 2.0 ** -4).all()


def test_scales_stay_fixed_and_later_outliers_saturate(device):
    g = torch.Generator().manual_seed(1)
    pages = kvp.Fp8Pages.empty(2, BS, HKV, D, device=device)
    first = _kv_sample((4, HKV, D), g)
    kvp.write_tokens_fp8(first.to(device), torch.arange(4, device=device), pages)
    scale = pages.scale.clone()
    huge = torch.full((1, HKV, D), 1e6)
    huge[0, 0, 0] = -1e6
    kvp.write_tokens_fp8(huge.to(device), torch.tensor([5], device=device), pages)
    assert torch.equal(pages.scale, scale)
    stored = pages.data[0, 5].float()
    assert torch.isfinite(stored).all() and stored.abs().max() == E4M3_MAX and stored[0, 0] == -E4M3_MAX
    pages.reset_scales()
    assert not pages.calibrated and (pages.scale == 0).all()
    kvp.write_tokens_fp8(huge.to(device), torch.tensor([6], device=device), pages)
    assert (pages.scale.cpu() == _expected_scale(huge).float()).all()


def test_all_zero_first_write_gets_the_default_scale(device):
    pages = kvp.Fp8Pages.empty(1, BS, HKV, D, device=device)
    kvp.write_tokens_fp8(torch.zeros(3, HKV, D, device=device), torch.arange(3, device=device), pages)
    assert (pages.scale == 1.0).all()


def test_bad_pages_and_inputs_raise():
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        kvp.Fp8Pages(torch.zeros(1, BS, HKV, D), torch.zeros(HKV))
    with pytest.raises(ValueError, match="scale"):
        kvp.Fp8Pages(torch.zeros(1, BS, HKV, D, dtype=torch.float8_e4m3fn), torch.zeros(HKV + 1))
    pages = kvp.Fp8Pages.empty(1, BS, HKV, D)
    with pytest.raises(ValueError, match="tokens"):
        kvp.write_tokens_fp8(torch.zeros(2, HKV + 1, D), torch.arange(2), pages)
    with pytest.raises(ValueError, match="multiple"):
        kva.paged_attention_fp8(torch.zeros(1, 3, D), pages, pages, torch.zeros(1, 1, dtype=torch.int32),
                                   torch.ones(1, dtype=torch.int32))


def _paged_case(q_lens: list[int], kv_lens: list[int], dtype: torch.dtype, device, seed: int = 0):
    """Pages holding each sequence's keys at scattered blocks, and packed queries."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(math.ceil(n / BS) for n in kv_lens)
    nb = len(kv_lens) * max_blocks + 1
    k_pages = kvp.Fp8Pages.empty(nb, BS, HKV, D, device=device)
    v_pages = kvp.Fp8Pages.empty(nb, BS, HKV, D, device=device)
    perm = torch.randperm(nb, generator=g)
    tables = perm[: len(kv_lens) * max_blocks].view(len(kv_lens), max_blocks).to(torch.int32)
    k_all = [_kv_sample((n, HKV, D), g) for n in kv_lens]
    v_all = [torch.randn(n, HKV, D, generator=g) for n in kv_lens]
    slots = torch.cat([tables[b, torch.arange(n) // BS].long() * BS + torch.arange(n) % BS
                       for b, n in enumerate(kv_lens)])
    kvp.write_tokens_fp8(torch.cat(k_all).to(device), slots.to(device), k_pages)
    kvp.write_tokens_fp8(torch.cat(v_all).to(device), slots.to(device), v_pages)
    q = torch.randn(sum(q_lens), HQ, D, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q.to(device), k_pages, v_pages, tables.to(device), torch.tensor(kv_lens, dtype=torch.int32).to(device), \
        cu.to(device)


def _reference(q, k_pages, v_pages, tables, seq_lens, cu, scale):
    """float64 causal attention over ``data * scale`` of each sequence's pages."""
    k_all, v_all = _dequant(k_pages).cpu(), _dequant(v_pages).cpu()
    q, tables, cu = q.double().cpu(), tables.cpu().long(), cu.cpu().tolist()
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64)
    for b, n_kv in enumerate(seq_lens.cpu().tolist()):
        n_q = cu[b + 1] - cu[b]
        k = k_all[tables[b]].reshape(-1, HKV, D)[:n_kv].repeat_interleave(HQ // HKV, 1)
        v = v_all[tables[b]].reshape(-1, HKV, D)[:n_kv].repeat_interleave(HQ // HKV, 1)
        s = torch.einsum("qhd,khd->hqk", q[cu[b]:cu[b + 1]], k) * scale
        visible = torch.arange(n_kv)[None, :] <= torch.arange(n_q)[:, None] + (n_kv - n_q)
        s = s.masked_fill(~visible, float("-inf"))
        lse[:, cu[b]:cu[b + 1]] = torch.logsumexp(s, -1)
        out[cu[b]:cu[b + 1]] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)
    return out, lse


# fp32 queries: products are exact fp32 (ieee dots), so only accumulation order differs
# from float64 (~1e-6 relative at scores of ~100). fp16 queries round q to fp16 in the
# caller already; the kernel's own extra rounding is p -> fp16 before P.V (2^-11 relative).
TOLS = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_float64_over_dequantized_pages(dtype, num_splits, device):
    kv_lens = [1, 37, 70]
    q, kp, vp, tables, lens, _ = _paged_case([1, 1, 1], kv_lens, dtype, device)
    scale = D ** -0.5
    out, lse = kva.paged_attention_fp8(q, kp, vp, tables, lens, softmax_scale=scale, num_splits=num_splits,
                                          return_lse=True)
    cu = torch.arange(4, dtype=torch.int32)
    ref_out, ref_lse = _reference(q, kp, vp, tables, lens, cu, scale)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double().cpu(), ref_out, **TOLS[dtype])
    torch.testing.assert_close(lse.double().cpu(), ref_lse, **TOLS[dtype])


@pytest.mark.parametrize("num_splits", [1, 2])
def test_prefill_chunks_match_float64_over_dequantized_pages(num_splits, device):
    """Chunks over cached keys (causal, bottom-right), a fresh prompt, and a decode row in one call."""
    q_lens, kv_lens = [9, 20, 1], [40, 20, 33]
    q, kp, vp, tables, lens, cu = _paged_case(q_lens, kv_lens, torch.float32, device, seed=3)
    scale = 0.2
    out, lse = kva.paged_attention_fp8(q, kp, vp, tables, lens, cu, max_q_len=20, softmax_scale=scale,
                                          num_splits=num_splits, return_lse=True)
    ref_out, ref_lse = _reference(q, kp, vp, tables, lens, cu, scale)
    torch.testing.assert_close(out.double().cpu(), ref_out, **TOLS[torch.float32])
    torch.testing.assert_close(lse.double().cpu(), ref_lse, **TOLS[torch.float32])
    # The engine's torch path (no Triton) computes the same.
    ref32, _ = kva.paged_attention_fp8_ref(q, kp, vp, tables, lens, cu, softmax_scale=scale)
    torch.testing.assert_close(ref32.double().cpu(), ref_out, **TOLS[torch.float32])


def test_token_attention_mass_matches_definition(device):
    q_lens, kv_lens = [4, 1], [30, 50]
    q, kp, _, tables, lens, cu = _paged_case(q_lens, kv_lens, torch.float32, device, seed=5)
    scale = D ** -0.5
    _, lse = kva.paged_attention_fp8(q, kp, kp, tables, lens, cu, max_q_len=4, softmax_scale=scale,
                                        return_lse=True)
    mass = kvs.paged_token_attention_mass_fp8(q, kp, tables, lens, lse, cu, softmax_scale=scale).cpu()
    k_all, tables_c = _dequant(kp).cpu(), tables.cpu().long()
    qd, cu_l = q.double().cpu(), cu.cpu().tolist()
    for b, n_kv in enumerate(kv_lens):
        n_q = cu_l[b + 1] - cu_l[b]
        k = k_all[tables_c[b]].reshape(-1, HKV, D)[:n_kv]
        qb = qd[cu_l[b]:cu_l[b + 1]].view(n_q, HKV, HQ // HKV, D)
        s = torch.einsum("qhgd,khd->hgqk", qb, k) * scale
        visible = torch.arange(n_kv)[None, :] <= torch.arange(n_q)[:, None] + (n_kv - n_q)
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1).sum(dim=(1, 2))
        torch.testing.assert_close(mass[b, :, :n_kv].double(), p, atol=1e-5, rtol=1e-5)
        assert (mass[b, :, n_kv:] == 0).all()


@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp16_queries_run_the_shared_fp16_code_kernel(num_splits, device, monkeypatch):
    """fp8 pages are a page format of the int8/int4 fp16-code kernel (codes converted in
    registers, per-head scales folded into the softmax scale and the output): decode and
    prefill chunks (the interpreter runs both through it) against float64 attention over
    the dequantized values, and the generic kernel (``fast_kernel=False``) agrees."""
    q_lens, kv_lens = [1, 6, 1], [37, 40, 70]
    q, kp, vp, tables, lens, cu = _paged_case(q_lens, kv_lens, torch.float16, device, seed=13)
    assert kva._fast_views(q, kp, vp, 8, False, D) is not None
    scale = D ** -0.5
    out, lse = kva.paged_attention_quantized(q, kp, vp, tables, lens, cu, max_q_len=max(q_lens),
                                             softmax_scale=scale, num_splits=num_splits, return_lse=True)
    ref_out, ref_lse = _reference(q, kp, vp, tables, lens, cu, scale)
    torch.testing.assert_close(out.double().cpu(), ref_out, **TOLS[torch.float16])
    torch.testing.assert_close(lse.double().cpu(), ref_lse, **TOLS[torch.float16])
    generic = kva.paged_attention_quantized(q, kp, vp, tables, lens, cu, max_q_len=max(q_lens),
                                            softmax_scale=scale, num_splits=num_splits, fast_kernel=False)
    torch.testing.assert_close(generic.double().cpu(), out.double().cpu(), **TOLS[torch.float16])


@pytest.mark.gpu
def test_bf16_decode_and_prefill_on_gpu():
    """bf16 queries (tl.dot in bf16 is unreliable under the interpreter): GPU only."""
    dev = torch.device("cuda")
    q, kp, vp, tables, lens, cu = _paged_case([7, 1, 1], [300, 1000, 17], torch.bfloat16, dev, seed=7)
    scale = D ** -0.5
    ref_out, _ = _reference(q, kp, vp, tables, lens, cu, scale)
    out = kva.paged_attention_fp8(q, kp, vp, tables, lens, cu, max_q_len=7, softmax_scale=scale, num_splits=4)
    # bf16 output and P rounding (2^-9 relative) on outputs of magnitude ~1.
    torch.testing.assert_close(out.double().cpu(), ref_out, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("scoring", [False, True])
def test_engine_step_over_fp8_pages_triton_and_torch_paths_agree(scoring, device):
    """The engine's attention step (write, then attend; with a score collector on scoring
    steps) over fp8 pages: the Triton kernels and the torch path compute the same."""
    from types import SimpleNamespace

    from stream_attention.engine.kv_compression import BlockScoreCollector, compressed_attention_step

    g = torch.Generator().manual_seed(11)
    q_lens, kv_lens = [5, 1], [21, 40]
    results = {}
    for backend in ("triton", "torch"):
        _, kp, vp, tables, lens, cu = _paged_case(q_lens, kv_lens, torch.float32, device, seed=9)
        q = torch.randn(sum(q_lens), HQ, D, generator=g.manual_seed(1)).to(device)
        k = _kv_sample((sum(q_lens), HKV, D), g.manual_seed(2)).to(device)
        v = torch.randn(sum(q_lens), HKV, D, generator=g.manual_seed(3)).to(device)
        slots = torch.cat([tables[b, (torch.arange(n - m, n, device=device) // BS)].long() * BS
                           + torch.arange(n - m, n, device=device) % BS
                           for b, (m, n) in enumerate(zip(q_lens, kv_lens, strict=True))])
        ctx = SimpleNamespace(slot_mapping=slots, block_tables=tables, seq_lens=lens, cu_seqlens_q=cu,
                              max_q_len=max(q_lens), num_splits=2, backend=backend, fresh_prefill=False)
        collector = BlockScoreCollector(["a", "b"], BS, observation_window=3) if scoring else None
        out = compressed_attention_step(q, k, v, kp, vp, ctx, D ** -0.5, collector=collector)
        results[backend] = (out, collector.mass if scoring else None, kp.data.clone())
    (out_t, mass_t, data_t), (out_r, mass_r, data_r) = results["triton"], results["torch"]
    assert torch.equal(data_t.view(torch.uint8), data_r.view(torch.uint8))  # same writes
    torch.testing.assert_close(out_t, out_r, atol=2e-5, rtol=1e-5)  # fp32 accumulation order
    if scoring:
        torch.testing.assert_close(mass_t, mass_r, atol=1e-5, rtol=1e-5)
