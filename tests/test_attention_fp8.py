"""FP8 (e4m3) attention forward: quantizer and kernel, through Triton's interpreter on CPU.

Triton 3.9's interpreter loads and stores float8_e4m3fn tensors and runs ``tl.dot`` on
e4m3 operands exactly (it widens them to fp16, then multiplies in fp32), but its own
fp32 -> e4m3 cast is wrong (subnormals truncated, halves rounded up, a rounding carry can
land in the wrong exponent bit). The kernels therefore round onto the e4m3 grid
themselves under the interpreter (``EMULATE``), which ``test_e4m3_cast_matches_torch``
pins bit-for-bit against torch; on a GPU the same test checks the hardware cast.

What the kernel computes differs from float64 attention of the dequantized inputs only by
the e4m3 rounding of the probabilities (3 mantissa bits: ~2% norm-wise on random inputs).
So the tight checks are the LSE (computed from fp32 probabilities) and a case whose
probabilities are exactly representable (all scores equal: the output is the mean of the
visible dequantized values); the output itself gets a 3% bound against that reference and
a looser one against exact attention of the unquantized inputs. Both load paths run: pointer
loads and TMA descriptors (the interpreter emulates descriptors; on a GPU, Hopper only).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from stream_attention.core import fused_attention_fp8
from stream_attention.kernels.attention_fp8 import (
    E4M3_MAX,
    V_PAD,
    _to_e4m3,
    attention_forward_fp8,
    attention_fp8_ref,
    attention_ref_f64,
    dequantize_qkv,
    fp8_tma_supported,
    quantize_qkv_fp8,
    quantize_qkv_fp8_torch,
)
from stream_attention.kernels.runtime import interpreter_enabled

needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreter_enabled()), reason="needs CUDA or TRITON_INTERPRET=1"
)

# Norm-wise relative error of the output against float64 attention of the dequantized
# inputs (P's e4m3 rounding only; measured 1.4-2.2% here) and against exact attention of
# the unquantized inputs (Q/K/V and P rounding; measured 3.7-5.0%).
TOL_VS_DEQUANT = 0.03
TOL_VS_EXACT = 0.08
# LSE and the exactly representable case: fp32 accumulation in the interpreter; Hopper's
# fp8 MMAs accumulate with fewer bits, hence the looser GPU bounds.
TOL_LSE = 1e-5 if interpreter_enabled() else 1e-2
TOL_EXACT_P = 1e-5 if interpreter_enabled() else 2e-3


def _qkv(b, tq, tk, hq, hkv, d, dtype, device, layout="bthd"):
    q = torch.randn(b, tq, hq, d, dtype=dtype, device=device)
    k = torch.randn(b, tk, hkv, d, dtype=dtype, device=device)
    v = torch.randn(b, tk, hkv, d, dtype=dtype, device=device)
    if layout == "bhtd":  # a real [B, H, T, D] allocation, viewed as [B, T, H, D]
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return q, k, v


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@triton.jit
def _cast_kernel(X, Y, n, BLOCK: tl.constexpr, EMULATE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n)
    tl.store(Y + offs, _to_e4m3(x, EMULATE), mask=offs < n)


@triton.jit
def _dot_kernel(A, B, C):
    m, kk, n = tl.arange(0, 32), tl.arange(0, 64), tl.arange(0, 32)
    x = tl.load(A + m[:, None] * 64 + kk[None, :])
    y = tl.load(B + kk[:, None] * 32 + n[None, :])
    tl.store(C + m[:, None] * 32 + n[None, :], tl.dot(x, y))


@needs_triton
def test_e4m3_cast_matches_torch(device):
    x = torch.randn(1 << 14, device=device) * torch.exp(torch.randn(1 << 14, device=device) * 4)
    edges = [0.0, 448.0, -448.0, 2**-6, 2**-7, 2**-9, 2**-10, 3 * 2**-10, 1.5 * 2**-9, 2.5 * 2**-9, 1.0625, 1.1875]
    edges += [239.9, 240.0, 247.99, 248.0, 0.0155, 2**-6 - 2**-11, 15.5, 7.75, 1e-30]
    x = torch.cat([x.clamp(-E4M3_MAX, E4M3_MAX), torch.tensor(edges, device=device)])
    y = torch.empty(x.numel(), dtype=torch.float8_e4m3fn, device=device)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024, EMULATE=interpreter_enabled())
    assert torch.equal(y.float(), x.to(torch.float8_e4m3fn).float())


@needs_triton
def test_fp8_dot_is_exact(device):
    # The kernel relies on e4m3 loads and e4m3 x e4m3 -> fp32 dots (checked here for the interpreter).
    a = torch.randn(32, 64, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(64, 32, device=device).to(torch.float8_e4m3fn)
    c = torch.empty(32, 32, device=device)
    _dot_kernel[(1,)](a, b, c)
    ref = a.double() @ b.double()
    tol = 1e-5 if interpreter_enabled() else 2e-3  # Hopper's fp8 MMAs accumulate with fewer bits
    assert (c.double() - ref).abs().max().item() <= tol * ref.abs().max().item()


QUANT_CASES = [
    # b, tq, tk, hq, hkv, d, block_m, block_n, dtype, layout
    (2, 100, 100, 4, 2, 64, 32, 16, torch.float32, "bthd"),
    (1, 77, 130, 4, 1, 128, 128, 128, torch.bfloat16, "bhtd"),
    (2, 33, 17, 2, 2, 32, 16, 64, torch.float16, "bthd"),
    (1, 40, 300, 2, 1, 64, 32, 16, torch.float32, "bhtd"),  # V's channel amax spans several chunks
]


@needs_triton
@pytest.mark.parametrize("case", QUANT_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_quantizer_matches_torch_twin(case, device):
    b, tq, tk, hq, hkv, d, bm, bn, dtype, layout = case
    q, k, v = _qkv(b, tq, tk, hq, hkv, d, dtype, device, layout)
    got = quantize_qkv_fp8(q, k, v, block_m=bm, block_n=bn)
    want = quantize_qkv_fp8_torch(q, k, v, block_m=bm, block_n=bn)
    for name in ("q_scale", "k_scale", "v_scale"):
        a, w = getattr(got, name), getattr(want, name)
        assert a.shape == w.shape and a.dtype == torch.float32
        torch.testing.assert_close(a, w, rtol=1e-6, atol=0)
    for name in ("q", "k", "v_t"):
        a, w = getattr(got, name), getattr(want, name)
        assert a.shape == w.shape and a.dtype == torch.float8_e4m3fn
        if interpreter_enabled():  # same fp32 arithmetic, same rounding: bit for bit
            assert torch.equal(a.float(), w.float()), name
        else:  # GPU: a scale may differ by an ulp, flipping a rare rounding
            assert (a.float() != w.float()).float().mean().item() < 1e-3, name


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizer_layout_and_round_trip(dtype, device):
    b, tq, tk, hq, hkv, d, bm, bn = 2, 70, 45, 4, 2, 64, 32, 16
    q, k, v = _qkv(b, tq, tk, hq, hkv, d, dtype, device)
    q[0, 32:64, 1] = 0  # an all-zero quantization block of Q
    k[1, :, 0, 5] *= 30  # an outlier channel of K: its blocks get larger scales
    qkv = quantize_qkv_fp8(q, k, v, block_m=bm, block_n=bn)
    t_pad = -(-tk // V_PAD) * V_PAD
    assert qkv.q.shape == (b, tq, hq, d) and qkv.q.is_contiguous()
    assert qkv.k.shape == (b, tk, hkv, d)
    assert qkv.q_scale.shape == (b, hq, 3) and qkv.k_scale.shape == (b, hkv, 3)
    assert qkv.v_t.shape == (b, hkv, d, t_pad) and t_pad == 48 and qkv.v_t.stride(-1) == 1
    assert qkv.v_scale.shape == (b, hkv, d)
    assert (qkv.v_t[..., tk:].float() == 0).all()  # zero padding past Tk
    assert qkv.q_scale[0, 1, 1].item() == 1.0 and (qkv.q[0, 32:64, 1].float() == 0).all()
    # V transposed: v_t[b, h, d, t] * v_scale[b, h, d] approximates v[b, t, h, d].
    v_back = (qkv.v_t[..., :tk].double() * qkv.v_scale.double()[..., None]).permute(0, 3, 1, 2)
    assert ((v_back - v.double()).abs() <= v.double().abs() * 2**-4 + qkv.v_scale.double()[:, None] * 2**-10).all()
    # Each block's largest element maps to +-448; every element is within half an e4m3 step.
    deq = dequantize_qkv(qkv, torch.float64)
    for name, x, xd, scale, block in (("q", q, deq[0], qkv.q_scale, bm), ("k", k, deq[1], qkv.k_scale, bn)):
        s = scale.double().repeat_interleave(block, dim=2)[:, :, : x.shape[1]].transpose(1, 2)[..., None]
        units = x.double() / s  # the value in code units
        err = (xd - x.double()).abs() / s
        assert (err <= torch.maximum(units.abs() * 2**-4, torch.full_like(units, 2**-10)) + 1e-6).all(), name
        amax = units.abs().amax(dim=-1)  # [B, T, H]
        for blk in range(scale.shape[2]):
            m = amax[:, blk * block : (blk + 1) * block].amax(dim=1)
            nonzero = m > 0
            assert torch.allclose(m[nonzero], torch.full_like(m[nonzero], E4M3_MAX), rtol=1e-6), name
    vunits = v.double() / qkv.v_scale.double()[:, None]
    assert torch.allclose(vunits.abs().amax(dim=1), torch.full((b, hkv, d), E4M3_MAX, dtype=torch.float64))
    verr = (deq[2] - v.double()).abs() / qkv.v_scale.double()[:, None]
    assert (verr <= torch.maximum(vunits.abs() * 2**-4, torch.full_like(vunits, 2**-10)) + 1e-6).all()
    # Norm-wise round trip: e4m3 keeps ~2.5% per element on Gaussian data.
    for x, xd in zip((q, k, v), deq, strict=True):
        assert _rel(xd, x) < 0.04


CASES = [
    # b, tq, tk, hq, hkv, d, causal, block_m, block_n
    (2, 100, 100, 4, 2, 64, False, 32, 16),  # GQA, T not a multiple of either block
    (2, 100, 100, 4, 2, 64, True, 32, 16),
    (1, 77, 130, 4, 1, 128, True, 128, 128),  # Tq < Tk: bottom-right causal, MQA, default blocks
    (1, 70, 30, 2, 1, 64, True, 32, 32),  # Tq > Tk: the first rows see nothing
    (1, 48, 40, 2, 2, 32, False, 16, 64),
]


@needs_triton
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_matches_references(case, tma, device):
    b, tq, tk, hq, hkv, d, causal, bm, bn = case
    q, k, v = _qkv(b, tq, tk, hq, hkv, d, torch.float32, device)
    scale = d**-0.5
    qkv = quantize_qkv_fp8(q, k, v, block_m=bm, block_n=bn)
    if tma and not fp8_tma_supported(qkv):
        pytest.skip("TMA descriptors need Hopper or newer")
    out, lse = attention_forward_fp8(qkv, causal=causal, softmax_scale=scale, out_dtype=torch.float32, tma=tma)
    ref, ref_lse = attention_fp8_ref(qkv, causal, scale)
    exact, _ = attention_ref_f64(q, k, v, causal=causal, softmax_scale=scale)
    assert out.shape == (b, tq, hq, d) and lse.shape == (b, hq, tq) and lse.dtype == torch.float32
    assert torch.isfinite(out).all()
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse).cpu(), (~seen).cpu())
    assert (lse.double() - ref_lse)[seen].abs().max().item() <= TOL_LSE
    assert (out[(~seen).transpose(1, 2)] == 0).all()
    assert _rel(out, ref) <= TOL_VS_DEQUANT
    assert _rel(out, exact) <= TOL_VS_EXACT


@needs_triton
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_exact_when_probabilities_are_representable(causal, tma, device):
    # k = 0: every visible score is 0, every probability 1 (exact in e4m3), so the output
    # is the mean of the visible dequantized values; checks V's path, masks and GQA tightly.
    b, tq, tk, hq, hkv, d = 1, 50, 75, 4, 2, 64
    q, k, v = _qkv(b, tq, tk, hq, hkv, d, torch.float32, device)
    k.zero_()
    qkv = quantize_qkv_fp8(q, k, v, block_m=32, block_n=16)
    if tma and not fp8_tma_supported(qkv):
        pytest.skip("TMA descriptors need Hopper or newer")
    out, lse = attention_forward_fp8(qkv, causal=causal, softmax_scale=0.125, out_dtype=torch.float32, tma=tma)
    ref, ref_lse = attention_fp8_ref(qkv, causal, 0.125)
    assert (out.double() - ref).abs().max().item() <= TOL_EXACT_P * ref.abs().max().item()
    assert (lse.double() - ref_lse).abs().max().item() <= TOL_LSE


@needs_triton
def test_public_wrapper(device):
    q, k, v = _qkv(1, 40, 40, 4, 2, 64, torch.bfloat16, device)
    out, lse = fused_attention_fp8(q, k, v, causal=True, return_lse=True)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape and lse.shape == (1, 4, 40)
    exact, exact_lse = attention_ref_f64(q, k, v, causal=True, softmax_scale=64**-0.5)
    assert _rel(out, exact) <= TOL_VS_EXACT
    assert (lse.double() - exact_lse).abs().max().item() < 0.1  # Q/K rounding moves the scores a little
    assert fused_attention_fp8(q, k, v).shape == q.shape


def test_public_wrapper_validates(device):
    q, k, v = _qkv(1, 8, 8, 4, 2, 48, torch.float32, device)
    with pytest.raises(ValueError, match=r"head_dim .*q\(1, 8, 4, 48\)"):
        fused_attention_fp8(q, k, v)
    q, k, v = _qkv(1, 8, 8, 3, 2, 64, torch.float32, device)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        fused_attention_fp8(q, k, v)
    q, k, v = _qkv(1, 8, 8, 2, 2, 64, torch.float32, device)
    with pytest.raises(ValueError, match="dtypes differ"):
        fused_attention_fp8(q, k.half(), v)
    with pytest.raises(ValueError, match="4-D"):
        fused_attention_fp8(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="block_m"):
        quantize_qkv_fp8(q, k, v, block_m=96)
    if torch.cuda.is_available() or interpreter_enabled():
        with pytest.raises(ValueError, match="no backward"):
            fused_attention_fp8(q.requires_grad_(), k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_bf16_long(d, causal, tma):
    dev = torch.device("cuda")
    b, t, h = 2, 1000, 4
    q, k, v = _qkv(b, t, t, h, h // 2, d, torch.bfloat16, dev)
    qkv = quantize_qkv_fp8(q, k, v)
    if tma and not fp8_tma_supported(qkv):
        pytest.skip("TMA descriptors need Hopper or newer")
    out, lse = attention_forward_fp8(qkv, causal=causal, softmax_scale=d**-0.5, tma=tma)
    ref, ref_lse = attention_fp8_ref(qkv, causal, d**-0.5)
    exact, _ = attention_ref_f64(q, k, v, causal=causal, softmax_scale=d**-0.5)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (lse.double() - ref_lse).abs().max().item() <= TOL_LSE
    assert _rel(out, ref) <= TOL_VS_DEQUANT
    assert _rel(out, exact) <= TOL_VS_EXACT
