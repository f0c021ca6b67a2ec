"""Key-padding masks, general bool/additive masks and in-kernel dropout (forward + backward)."""

from __future__ import annotations

import math

import pytest
import torch

from stream_attention.core.functional import fused_attention
from stream_attention.kernels.masks_dropout import dropout_keep_mask
from tests.attention_reference import grads, reference_attention, rel_err

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _qkv(device, dtype, b, tq, tk, hq, hkv, d):
    q = torch.randn(b, tq, hq, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, tk, hkv, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(b, tk, hkv, d, device=device, dtype=dtype, requires_grad=True)
    return q, k, v, torch.randn(b, tq, hq, d, device=device, dtype=dtype)


def _compare(q, k, v, dout, *, ref_mask, tol, extra_ref=(), keep=None, dropout_p=0.0, **kwargs):
    """Triton fwd+bwd against float64 with ``ref_mask``; ``extra_ref`` tensors also get grads."""
    out = fused_attention(q, k, v, backend="triton", dropout_p=dropout_p, **kwargs)
    inputs = (q, k, v, *extra_ref)
    got = grads((out.float() * dout.float()).sum(), *inputs)
    ref, _ = reference_attention(
        q,
        k,
        v,
        causal=kwargs.get("causal", True),
        window=kwargs.get("window"),
        mask=ref_mask,
        keep=keep,
        dropout_p=dropout_p,
    )
    want = grads((ref * dout.double()).sum(), *inputs)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= tol, rel_err(out, ref)
    for i, (g, r) in enumerate(zip(got, want, strict=True)):
        assert torch.isfinite(g).all()
        assert rel_err(g, r) <= tol, f"input {i}: {rel_err(g, r):.2e}"
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_key_padding_mask(device, dtype):
    b, t = 3, 37
    q, k, v, dout = _qkv(device, dtype, b, t, t, 4, 2, 24)
    kpm = torch.ones(b, t, dtype=torch.bool, device=device)
    kpm[0, 30:] = False  # right padding
    kpm[1, :9] = False  # left padding
    kpm[1, 20:23] = False  # a hole
    kpm[2] = False  # nothing to attend: zeros out, zero grads
    out = _compare(q, k, v, dout, ref_mask=kpm[:, None, None, :], tol=TOL[dtype], causal=False, attn_mask=kpm)
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_integer_key_padding_mask_equals_bool(device):
    q, k, v, _ = _qkv(device, torch.float32, 2, 20, 20, 2, 2, 16)
    kpm = torch.rand(2, 20, device=device) > 0.3
    a = fused_attention(q, k, v, causal=True, attn_mask=kpm, backend="triton")
    b = fused_attention(q, k, v, causal=True, attn_mask=kpm.to(torch.int64), backend="triton")
    c = fused_attention(q, k, v, causal=True, attn_mask=kpm[:, None, None, :], backend="triton")
    assert torch.equal(a, b) and torch.equal(a, c)


def test_padding_tiles_are_skipped(device):
    # Keys [128, 256) are padding and NaN: tiles wholly inside are never loaded for scores
    # (any tile size dividing 128), so NaN cannot leak into outputs or gradients.
    q, k, v, dout = _qkv(device, torch.float32, 1, 16, 256, 2, 2, 16)
    with torch.no_grad():
        k[:, 128:] = float("nan")
        v[:, 128:] = float("nan")
    kpm = torch.zeros(1, 256, dtype=torch.bool, device=device)
    kpm[:, :128] = True
    out = fused_attention(q, k, v, causal=False, attn_mask=kpm, backend="triton")
    dq, dk, dv = grads((out * dout).sum(), q, k, v)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert torch.isfinite(dk[:, :128]).all() and torch.isfinite(dv[:, :128]).all()
    assert torch.equal(dk[:, 128:], torch.zeros_like(dk[:, 128:]))
    ref, _ = reference_attention(q[:, :, :, :], k[:, :128], v[:, :128], causal=False)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize(
    "shape,causal,window",
    [((2, 1, 25, 31), True, None), ((25, 31), False, (6, 4)), ((1, 3, 1, 31), True, None)],
)
def test_general_bool_mask(device, shape, causal, window):
    q, k, v, dout = _qkv(device, torch.float32, 2, 25, 31, 3, 1, 16)
    mask = torch.rand(shape, device=device) > 0.35
    _compare(q, k, v, dout, ref_mask=mask, tol=1e-5, causal=causal, window=window, attn_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_additive_bias_with_gradient(device, dtype):
    q, k, v, dout = _qkv(device, dtype, 2, 22, 27, 4, 2, 32)
    bias = torch.randn(1, 4, 22, 27, device=device, dtype=dtype)
    bias[0, 1, :, 5:9] = float("-inf")
    bias.requires_grad_()
    _compare(q, k, v, dout, ref_mask=bias, tol=TOL[dtype], extra_ref=(bias,), causal=True, attn_mask=bias)


def test_additive_key_bias_2d_and_broadcast_gradient(device):
    # A float [B, Tk] mask is an additive per-key bias; its gradient sums over heads and queries.
    q, k, v, dout = _qkv(device, torch.float32, 2, 18, 18, 2, 2, 16)
    bias = torch.randn(2, 18, device=device, requires_grad=True)
    _compare(q, k, v, dout, ref_mask=bias[:, None, None, :], tol=1e-5, extra_ref=(bias,), causal=False, attn_mask=bias)


def test_mask_and_window_combined_with_gqa(device):
    q, k, v, dout = _qkv(device, torch.float32, 2, 30, 30, 4, 1, 24)
    kpm = torch.rand(2, 30, device=device) > 0.2
    _compare(q, k, v, dout, ref_mask=kpm[:, None, None, :], tol=1e-5, causal=True, window=(8, -1), attn_mask=kpm)


def test_sdpa_backend_applies_the_same_masks(device):
    q, k, v, _ = _qkv(device, torch.float32, 2, 16, 20, 2, 2, 16)
    kpm = torch.rand(2, 20, device=device) > 0.3
    bias = torch.randn(2, 1, 16, 20, device=device)
    for mask in (kpm, bias, kpm.to(torch.int32)):
        a = fused_attention(q, k, v, causal=True, attn_mask=mask, backend="triton")
        b = fused_attention(q, k, v, causal=True, attn_mask=mask, backend="sdpa")
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize(
    "mask,match",
    [
        (torch.ones(2, 3, 16, 20, dtype=torch.bool), r"attn_mask\(2, 3, 16, 20\) does not broadcast"),
        (torch.ones(7, 20, dtype=torch.bool), r"attn_mask\(7, 20\) does not broadcast"),
        (torch.ones(1, 1, 1, 1, 20, dtype=torch.bool), r"does not broadcast"),
        ([[True]], r"attn_mask must be a torch.Tensor"),
    ],
)
def test_mask_validation(device, mask, match):
    q, k, v, _ = _qkv(device, torch.float32, 2, 16, 20, 2, 2, 16)
    if isinstance(mask, torch.Tensor):
        mask = mask.to(device)
    with pytest.raises(ValueError, match=match):
        fused_attention(q, k, v, attn_mask=mask, backend="triton")


# --------------------------------------------------------------------------- dropout


def test_dropout_keep_rate_statistics(device):
    p, shape = 0.3, (2, 4, 48, 64)
    keep = dropout_keep_mask(7, *shape, p, device=device)
    n = keep.numel()
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) <= 4 * math.sqrt(p * (1 - p) / n)
    # Each head and each row is its own stream: no two heads share a mask, rows differ.
    flat = keep.flatten(0, 1)
    for i in range(flat.shape[0]):
        for j in range(i + 1, flat.shape[0]):
            assert not torch.equal(flat[i], flat[j])
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])
    # Neighbouring elements are uncorrelated.
    x = keep.float() - keep.float().mean()
    corr = (x[..., 1:] * x[..., :-1]).mean() / x.var()
    assert abs(corr.item()) < 0.05
    # Same seed, same mask; another seed or offset, another mask.
    assert torch.equal(keep, dropout_keep_mask(7, *shape, p, device=device))
    assert not torch.equal(keep, dropout_keep_mask(8, *shape, p, device=device))
    assert not torch.equal(keep, dropout_keep_mask(7, *shape, p, offset=1, device=device))


@pytest.mark.parametrize(
    "dtype,causal,window,hkv,use_mask",
    [
        (torch.float32, False, None, 2, False),
        (torch.float32, True, (9, -1), 1, True),
        (torch.float16, True, None, 2, False),
    ],
)
def test_dropout_exact_replay_forward_and_backward(device, dtype, causal, window, hkv, use_mask):
    b, tq, tk, hq, p, seed = 2, 26, 33, 4, 0.2, 1234
    q, k, v, dout = _qkv(device, dtype, b, tq, tk, hq, hkv, 16)
    keep = dropout_keep_mask(seed, b, hq, tq, tk, p, device=device)
    kpm = (torch.rand(b, tk, device=device) > 0.2) if use_mask else None
    _compare(
        q,
        k,
        v,
        dout,
        ref_mask=None if kpm is None else kpm[:, None, None, :],
        tol=TOL[dtype],
        keep=keep,
        dropout_p=p,
        dropout_seed=seed,
        causal=causal,
        window=window,
        attn_mask=kpm,
    )


def test_dropout_seed_reproducibility(device):
    q, k, v, _ = _qkv(device, torch.float32, 1, 20, 20, 2, 2, 16)
    a = fused_attention(q, k, v, dropout_p=0.5, dropout_seed=3, backend="triton")
    b = fused_attention(q, k, v, dropout_p=0.5, dropout_seed=3, backend="triton")
    c = fused_attention(q, k, v, dropout_p=0.5, dropout_seed=4, backend="triton")
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Without an explicit seed the draw follows torch's generator.
    torch.manual_seed(11)
    d = fused_attention(q, k, v, dropout_p=0.5, backend="triton")
    torch.manual_seed(11)
    e = fused_attention(q, k, v, dropout_p=0.5, backend="triton")
    assert torch.equal(d, e)


@pytest.mark.parametrize("p", [-0.1, 1.0, "x"])
def test_dropout_validation(device, p):
    q, k, v, _ = _qkv(device, torch.float32, 1, 8, 8, 1, 1, 16)
    with pytest.raises(ValueError, match="dropout_p"):
        fused_attention(q, k, v, dropout_p=p, backend="triton")


# --------------------------------------------------------------------------- GPU (bf16)


@pytest.mark.gpu
def test_masks_and_dropout_bf16_gpu():
    device = torch.device("cuda")
    b, t, hq, hkv, d, p, seed = 2, 777, 8, 2, 128, 0.1, 99
    q, k, v, dout = _qkv(device, torch.bfloat16, b, t, t, hq, hkv, d)
    kpm = torch.ones(b, t, dtype=torch.bool, device=device)
    kpm[0, 600:] = False
    kpm[1, :129] = False
    keep = dropout_keep_mask(seed, b, hq, t, t, p, device=device)
    out = fused_attention(q, k, v, causal=True, attn_mask=kpm, dropout_p=p, dropout_seed=seed, backend="triton")
    got = grads((out.float() * dout.float()).sum(), q, k, v)
    ref, _ = reference_attention(q, k, v, causal=True, mask=kpm[:, None, None, :], keep=keep, dropout_p=p)
    want = grads((ref * dout.double()).sum(), q, k, v)
    assert rel_err(out, ref) <= 1e-2
    for g, r in zip(got, want, strict=True):
        assert rel_err(g, r) <= 2e-2


@pytest.mark.gpu
def test_additive_bias_bf16_gpu():
    device = torch.device("cuda")
    q, k, v, dout = _qkv(device, torch.bfloat16, 2, 500, 640, 4, 4, 64)
    bias = torch.randn(2, 4, 500, 640, device=device, dtype=torch.bfloat16, requires_grad=True)
    out = fused_attention(q, k, v, causal=True, attn_mask=bias, backend="triton")
    got = grads((out.float() * dout.float()).sum(), q, k, v, bias)
    ref, _ = reference_attention(q, k, v, causal=True, mask=bias)
    want = grads((ref * dout.double()).sum(), q, k, v, bias)
    assert rel_err(out, ref) <= 1e-2
    for g, r in zip(got, want, strict=True):
        assert rel_err(g, r) <= 2e-2
