"""The TMA-descriptor forward (Hopper fast path) against a float64 reference.

On CPU it runs through Triton's interpreter, which implements host tensor descriptors;
on a GPU the same cases run in bf16 and against SDPA.
"""

from __future__ import annotations

import pytest
import torch

from stream_attention import fused_attention
from stream_attention.kernels import attention_fwd_tma
from stream_attention.kernels.attention_fwd import attention_forward
from stream_attention.kernels.attention_fwd_tma import attention_forward_tma, tma_supported
from stream_attention.kernels.runtime import interpreter_enabled
from tests.reference import reference_attention, rel_err

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreter_enabled()), reason="needs CUDA or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(b, tq, tk, hq, hkv, d, dtype, layout="bthd"):
    if layout == "bhtd":
        shapes = [(b, hq, tq, d), (b, hkv, tk, d), (b, hkv, tk, d)]
        return [torch.randn(s, dtype=dtype, device=DEVICE).transpose(1, 2) for s in shapes]
    if layout == "fused":  # q, k, v slices of one [B, T, Hq + 2 Hkv, D] projection (MHA)
        qkv = torch.randn(b, tq, 3 * hq, d, dtype=dtype, device=DEVICE)
        return list(qkv.split(hq, dim=2))
    shapes = [(b, tq, hq, d), (b, tk, hkv, d), (b, tk, hkv, d)]
    return [torch.randn(s, dtype=dtype, device=DEVICE) for s in shapes]


CASES = [
    # b, tq, tk, hq, hkv, d, causal, window, layout
    (2, 37, 37, 4, 2, 32, True, None, "bthd"),
    (1, 50, 70, 2, 1, 64, False, None, "bhtd"),
    (2, 45, 45, 2, 2, 32, True, (8, 0), "bthd"),
    (1, 20, 83, 2, 2, 32, True, None, "bthd"),  # chunk against a longer cache
    (1, 33, 33, 2, 2, 32, False, None, "fused"),
]


@pytest.mark.parametrize("lookahead", [False, True])
@pytest.mark.parametrize("b,tq,tk,hq,hkv,d,causal,window,layout", CASES)
def test_tma_forward_matches_reference(b, tq, tk, hq, hkv, d, causal, window, layout, lookahead):
    torch.manual_seed(tq * 7 + tk)
    q, k, v = _qkv(b, tq, tk, hq, hkv, d, torch.float16, layout)
    assert tma_supported(q, k, v)
    out, lse = attention_forward_tma(q, k, v, causal=causal, softmax_scale=d**-0.5, window=window,
                                     lookahead=lookahead)
    ref, ref_lse = reference_attention(q, k, v, causal=causal, window=window)
    assert rel_err(out, ref) < 2e-3
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite.cpu())
    assert (lse.double().cpu()[finite.cpu()] - ref_lse.cpu()[finite.cpu()]).abs().max() < 1e-3


def test_unsupported_layouts_are_refused():
    q, k, v = _qkv(1, 16, 16, 2, 2, 32, torch.float16)
    assert not tma_supported(q.float(), k.float(), v.float())  # fp32 takes the pointer kernel
    assert not tma_supported(q[..., ::2], k[..., ::2], v[..., ::2])  # strided head dim
    q40, k40, v40 = _qkv(1, 16, 16, 2, 2, 40, torch.float16)
    assert not tma_supported(q40, k40, v40)  # non power-of-two head dim


def _count_tma_launches(monkeypatch) -> list[int]:
    """Calls of the TMA forward from here on (a spy: the kernel still runs)."""
    calls: list[int] = []
    real = attention_fwd_tma.attention_forward_tma
    monkeypatch.setattr(attention_fwd_tma, "attention_forward_tma", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def test_fused_attention_routes_through_tma_with_gradients(monkeypatch):
    """``fused_attention`` takes the TMA forward when ``STREAM_ATTENTION_TMA`` enables it
    (core reads the variable and passes it to the kernel); the backward consumes its
    output and LSE exactly as it does the pointer kernel's."""
    torch.manual_seed(3)
    q, k, v = (t.requires_grad_() for t in _qkv(2, 40, 40, 4, 2, 32, torch.float16))
    dout = torch.randn_like(q)
    tma_calls = _count_tma_launches(monkeypatch)
    grads = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("STREAM_ATTENTION_TMA", setting)
        out = fused_attention(q, k, v, causal=True, backend="triton")
        grads[setting] = (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))
        assert len(tma_calls) == int(setting)
    for a, b in zip(grads["0"], grads["1"], strict=True):
        assert rel_err(b, a) < 2e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto takes TMA on Hopper GPUs")
def test_tma_argument_decides_without_the_environment(monkeypatch):
    """``attention_forward(tma=...)`` alone picks the kernel: the variable is not read there."""
    monkeypatch.delenv("STREAM_ATTENTION_TMA", raising=False)
    q, k, v = _qkv(1, 32, 32, 2, 2, 32, torch.float16)
    tma_calls = _count_tma_launches(monkeypatch)
    auto, _ = attention_forward(q, k, v, causal=True, softmax_scale=0.2)
    assert tma_calls == []  # auto: GPUs only
    forced, _ = attention_forward(q, k, v, causal=True, softmax_scale=0.2, tma=True)
    assert tma_calls == [1]
    monkeypatch.setenv("STREAM_ATTENTION_TMA", "1")
    attention_forward(q, k, v, causal=True, softmax_scale=0.2, tma=False)
    assert tma_calls == [1]
    assert rel_err(forced, auto) < 2e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("d,causal", [(64, False), (128, True), (128, False)])
def test_tma_bf16_matches_sdpa_on_gpu(d, causal):
    if not tma_supported(*_qkv(1, 16, 16, 1, 1, d, torch.bfloat16)):
        pytest.skip("no TMA on this GPU")
    torch.manual_seed(d)
    q, k, v = _qkv(2, 1000, 1000, 8, 2, d, torch.bfloat16)
    out, _ = attention_forward_tma(q, k, v, causal=causal, softmax_scale=d**-0.5)
    ref, _ = reference_attention(q.float(), k.float(), v.float(), causal=causal)
    assert rel_err(out, ref) < 1e-2
