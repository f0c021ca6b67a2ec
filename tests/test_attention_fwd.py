"""Forward kernel against a float64 reference, through Triton's interpreter on CPU."""

from __future__ import annotations

import pytest
import torch

from stream_attention import fused_attention
from stream_attention.kernels.runtime import TritonUnavailableError, interpreter_enabled
from tests.reference import reference_attention, rel_err

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}

needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreter_enabled()), reason="needs CUDA or TRITON_INTERPRET=1"
)


def _qkv(b, tq, tk, hq, hkv, d, dtype, device, layout="bthd"):
    q = torch.randn(b, tq, hq, d, dtype=dtype, device=device)
    k = torch.randn(b, tk, hkv, d, dtype=dtype, device=device)
    v = torch.randn(b, tk, hkv, d, dtype=dtype, device=device)
    if layout == "bhtd":  # a real [B, H, T, D] allocation, viewed as [B, T, H, D]
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return q, k, v


CASES = [
    # b, tq, tk, hq, hkv, d, causal
    (2, 37, 37, 4, 4, 64, True),
    (1, 50, 50, 4, 2, 64, False),
    (1, 1, 45, 4, 1, 32, True),  # decode: one query against a cache, MQA
    (1, 17, 64, 2, 2, 128, True),  # chunked prefill: Tq < Tk, bottom-right causal
    (1, 70, 30, 2, 1, 40, True),  # Tq > Tk: early rows see nothing
    (2, 33, 47, 6, 2, 80, False),  # odd lengths, non power-of-two head dim
    (1, 40, 40, 2, 2, 96, True),
    (1, 24, 24, 2, 1, 16, False),
    (1, 20, 20, 1, 1, 256, True),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_forward_matches_reference(case, dtype, device):
    b, tq, tk, hq, hkv, d, causal = case
    q, k, v = _qkv(b, tq, tk, hq, hkv, d, dtype, device)
    out, lse = fused_attention(q, k, v, causal=causal, return_lse=True, backend="triton")
    ref, ref_lse = reference_attention(q, k, v, causal=causal)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= TOL[dtype]
    assert lse.dtype == torch.float32 and lse.shape == (b, hq, tq)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse.cpu()), ~finite)
    assert (lse.double().cpu()[finite] - ref_lse[finite]).abs().max() <= 1e-4
    assert (out.cpu()[(~finite).transpose(1, 2)] == 0).all()


@needs_triton
@pytest.mark.parametrize("causal", [True, False])
def test_bhtd_layout_reads_strides_without_copies(causal, device):
    q, k, v = _qkv(2, 29, 29, 4, 2, 64, torch.float32, device, layout="bhtd")
    q_bhtd, k_bhtd, v_bhtd = (t.transpose(1, 2) for t in (q, k, v))
    assert q_bhtd.is_contiguous()
    out = fused_attention(q_bhtd, k_bhtd, v_bhtd, causal=causal, backend="triton", layout="bhtd")
    assert out.shape == q_bhtd.shape
    assert out.is_contiguous()  # written in the caller's layout
    ref, _ = reference_attention(q, k, v, causal=causal)
    assert rel_err(out.transpose(1, 2), ref) <= 1e-5


@needs_triton
def test_every_output_element_is_written(device):
    # Poison through a pre-filled buffer the kernel must overwrite entirely.
    q, k, v = _qkv(1, 45, 45, 2, 2, 48, torch.float32, device)
    from stream_attention.kernels import attention_fwd

    orig_empty_like = torch.empty_like
    try:
        torch.empty_like = lambda t, **kw: orig_empty_like(t, **kw).fill_(float("nan"))
        out, lse = attention_fwd.attention_forward(q, k, v, causal=True, softmax_scale=48**-0.5)
    finally:
        torch.empty_like = orig_empty_like
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@needs_triton
@pytest.mark.parametrize("window", [(8, 0), (5, 7), (0, 0), (-1, 3)])
def test_sliding_window(window, device):
    q, k, v = _qkv(1, 40, 40, 2, 1, 32, torch.float32, device)
    causal = window[1] == 0
    out, lse = fused_attention(q, k, v, causal=causal, window=window, return_lse=True, backend="triton")
    ref, ref_lse = reference_attention(q, k, v, causal=causal, window=window)
    assert rel_err(out, ref) <= 1e-5
    assert (lse.double() - ref_lse).abs().max() <= 1e-4


@needs_triton
def test_softmax_scale(device):
    q, k, v = _qkv(1, 20, 20, 2, 2, 32, torch.float32, device)
    out = fused_attention(q, k, v, causal=False, softmax_scale=0.3, backend="triton")
    ref, _ = reference_attention(q, k, v, causal=False, scale=0.3)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_backend_matches_reference(causal):
    q, k, v = _qkv(2, 19, 31, 4, 2, 32, torch.float32, torch.device("cpu"))
    out, lse = fused_attention(q, k, v, causal=causal, return_lse=True, backend="sdpa")
    ref, ref_lse = reference_attention(q, k, v, causal=causal)
    assert rel_err(out, ref) <= 1e-5
    finite = torch.isfinite(ref_lse)
    assert (lse.double()[finite] - ref_lse[finite]).abs().max() <= 1e-4


def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(TritonUnavailableError, match="CUDA"):
        fused_attention(q, q, q, backend="triton")


def test_env_var_overrides_auto(monkeypatch):
    from stream_attention.core.backend import resolve_backend

    monkeypatch.setenv("STREAM_ATTENTION_BACKEND", "sdpa")
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    monkeypatch.setenv("STREAM_ATTENTION_BACKEND", "bogus")
    with pytest.raises(ValueError, match="STREAM_ATTENTION_BACKEND"):
        resolve_backend("auto", torch.device("cpu"))


BAD_INPUTS = [
    ("q must be 4-D", lambda: (torch.randn(2, 3, 16), torch.randn(2, 3, 1, 16), torch.randn(2, 3, 1, 16)), {}),
    ("batch sizes differ", lambda: (torch.randn(2, 3, 2, 16), torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16)), {}),
    ("multiple of key/value heads", lambda: (torch.randn(1, 3, 3, 16), torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16)), {}),
    ("head_dim of q and k differ", lambda: (torch.randn(1, 3, 2, 32), torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16)), {}),
    ("head_dim 8 unsupported", lambda: (torch.randn(1, 3, 2, 8),) * 3, {}),
    ("head_dim 512 unsupported", lambda: (torch.randn(1, 3, 1, 512),) * 3, {}),
    ("dtypes differ", lambda: (torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16).half(), torch.randn(1, 3, 2, 16)), {}),
    ("unsupported dtype", lambda: (torch.randn(1, 3, 2, 16).double(),) * 3, {}),
    ("k and v shapes differ", lambda: (torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16), torch.randn(1, 4, 2, 16)), {}),
    ("layout=", lambda: (torch.randn(1, 3, 2, 16),) * 3, {"layout": "tbhd"}),
    ("window", lambda: (torch.randn(1, 3, 2, 16),) * 3, {"window": (-5, 0)}),
    ("backend=", lambda: (torch.randn(1, 3, 2, 16),) * 3, {"backend": "cuda"}),
]


@pytest.mark.parametrize("message,make,kwargs", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_shapes(message, make, kwargs):
    with pytest.raises(ValueError, match=message):
        fused_attention(*make(), **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [64, 128, 80])
def test_gpu_forward_16bit(dtype, causal, d):
    q, k, v = _qkv(2, 1000, 1000, 8, 2, d, dtype, torch.device("cuda"))
    out, lse = fused_attention(q, k, v, causal=causal, return_lse=True, backend="triton")
    ref, ref_lse = reference_attention(q, k, v, causal=causal)
    assert rel_err(out, ref) <= (1e-2 if dtype == torch.bfloat16 else 2e-3)
    assert (lse.double().cpu() - ref_lse.cpu()).abs().max() <= 1e-3


@pytest.mark.gpu
def test_gpu_forward_fp32_is_ieee():
    q, k, v = _qkv(1, 513, 700, 4, 4, 64, torch.float32, torch.device("cuda"))
    out = fused_attention(q, k, v, causal=True, backend="triton")
    ref, _ = reference_attention(q, k, v, causal=True)
    assert rel_err(out, ref) <= 1e-5
