"""Forward kernel against a float64 reference, through Triton's interpreter on CPU."""

from __future__ import annotations

import pytest
import torch

from stream_attention import fused_attention
from stream_attention.kernels.runtime import TritonUnavailableError, interpreter_enabled
from tests.attention_reference import nan_poisoned_allocations
from tests.reference import reference_attention, rel_err, visible_keys, visible_keys_by_loop

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
@pytest.mark.parametrize("tq,tk", [(45, 45), (40, 25)], ids=["square", "early-rows-see-nothing"])
def test_every_output_element_is_written(tq, tk, device):
    # Output and LSE buffers start as NaN; every element must be overwritten, including
    # rows that see no key (zeros and -inf).
    q, k, v = _qkv(1, tq, tk, 2, 2, 48, torch.float32, device)
    from stream_attention.kernels import attention_fwd

    with nan_poisoned_allocations():
        out, lse = attention_fwd.attention_forward(q, k, v, causal=True, softmax_scale=48**-0.5)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    ref, ref_lse = reference_attention(q, k, v, causal=True)
    assert rel_err(out, ref) <= 1e-5
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(ref_lse))


@pytest.mark.parametrize(
    "tq,tk,causal,window",
    [(5, 5, True, None), (3, 7, True, None), (7, 3, True, None), (6, 6, False, (2, 1)), (4, 9, True, (3, 0)),
     (9, 4, False, (1, -1)), (5, 8, False, (-1, 0))],
)
def test_reference_mask_matches_index_loop(tq, tk, causal, window):
    # The vectorised reference mask equals the definition checked one index pair at a time.
    assert torch.equal(visible_keys(tq, tk, causal, window), visible_keys_by_loop(tq, tk, causal, window))


def test_reference_matches_per_row_softmax():
    # One row at a time from the definition: GQA head h reads K/V head h // (Hq / Hkv).
    q, k, v = _qkv(1, 5, 8, 4, 2, 16, torch.float64, torch.device("cpu"))
    out, lse = reference_attention(q, k, v, causal=True, window=(2, 0))
    for h in range(4):
        for i in range(5):
            pos = i + 3
            keys = [j for j in range(8) if pos - 2 <= j <= pos]
            s = torch.stack([q[0, i, h] @ k[0, j, h // 2] for j in keys]) / 4.0
            p = torch.softmax(s, 0)
            expect = sum(p[n] * v[0, j, h // 2] for n, j in enumerate(keys))
            assert torch.allclose(out[0, i, h], expect, atol=1e-12)
            assert abs(lse[0, h, i].item() - torch.logsumexp(s, 0).item()) < 1e-12


@needs_triton
@pytest.mark.parametrize(
    "tq,tk,window,causal",
    [(40, 40, (8, 0), True), (40, 40, (5, 7), False), (40, 40, (0, 0), True), (40, 40, (-1, 3), False),
     (13, 40, (6, 0), True), (13, 40, (4, 2), False), (30, 12, (3, 1), False), (30, 12, (5, 0), True)],
)
def test_sliding_window(tq, tk, window, causal, device):
    # Tq != Tk rows check the bottom-right alignment of the window; Hq=4/Hkv=2 the head mapping.
    q, k, v = _qkv(1, tq, tk, 4, 2, 32, torch.float32, device)
    out, lse = fused_attention(q, k, v, causal=causal, window=window, return_lse=True, backend="triton")
    ref, ref_lse = reference_attention(q, k, v, causal=causal, window=window)
    assert rel_err(out, ref) <= 1e-5
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse.cpu()), ~finite)
    assert (lse.double().cpu()[finite] - ref_lse[finite]).abs().max() <= 1e-4


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


SDPA_CASES = [
    # tq, tk, hq, hkv, causal, window, mask kind
    (19, 31, 4, 2, True, None, None),  # bottom-right causal through a dense mask (GQA)
    (19, 31, 4, 4, True, None, None),  # the same through causal_lower_right (no GQA)
    (24, 24, 2, 2, True, None, None),  # is_causal
    (31, 19, 2, 1, True, None, None),  # Tq > Tk: early rows see nothing
    (20, 20, 4, 2, False, (3, 2), None),
    (13, 29, 2, 1, True, (5, 0), None),
    (29, 13, 2, 2, False, (2, 1), None),  # windows leave early rows empty
    (17, 17, 4, 2, False, None, "bool"),
    (17, 23, 2, 2, True, (6, 0), "bool"),
    (17, 23, 2, 1, False, None, "additive"),
    (15, 15, 2, 2, True, None, "additive"),
]


@pytest.mark.parametrize("case", SDPA_CASES, ids=lambda c: "-".join(map(str, c)))
def test_sdpa_backend_masks_and_windows_match_reference(case):
    # The SDPA fallback builds its own band and mask combination: check it like the kernel.
    tq, tk, hq, hkv, causal, window, mask_kind = case
    q, k, v = _qkv(2, tq, tk, hq, hkv, 32, torch.float32, torch.device("cpu"))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, tq, tk) > 0.3
        mask[0, 0, 3] = False  # one row that sees nothing
    elif mask_kind == "additive":
        mask = torch.randn(2, hq, tq, tk)
    out, lse = fused_attention(q, k, v, causal=causal, window=window, attn_mask=mask, return_lse=True,
                               backend="sdpa")
    ref, ref_lse = reference_attention(q, k, v, causal=causal, window=window, mask=mask)
    assert rel_err(out, ref) <= 1e-5
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), ~finite)
    assert (lse.double()[finite] - ref_lse[finite]).abs().max() <= 1e-4
    assert (out[(~finite).transpose(1, 2)] == 0).all()
    assert torch.equal(fused_attention(q, k, v, causal=causal, window=window, attn_mask=mask, backend="sdpa"), out)


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
