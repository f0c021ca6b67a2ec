"""Triton attention backward: gradients against a float64 reference, strides, LSE gradient,
determinism, and a short training run against SDPA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stream_attention.core.functional import fused_attention
from stream_attention.kernels.attention_bwd import attention_backward
from stream_attention.kernels.attention_fwd import attention_forward
from tests.attention_reference import grads, nan_poisoned_allocations, reference_attention, rel_err

# Rows that see no key take log2(0) = -inf on purpose; numpy (the interpreter) warns.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")

FP32_TOL = 1e-5
FP16_TOL = 2e-3

# (batch, Tq, Tk, Hq, Hkv, D, causal, window)
CASES = {
    "full_mha": (2, 40, 40, 2, 2, 32, False, None),
    "causal_gqa_bottom_right": (1, 33, 47, 4, 2, 24, True, None),
    "causal_more_queries_than_keys": (1, 40, 23, 2, 1, 16, True, None),
    "sliding_window_mqa": (1, 45, 45, 3, 1, 40, True, (6, -1)),
    "two_sided_window": (2, 29, 35, 2, 2, 16, False, (5, 3)),
    "head_dim_80": (1, 21, 26, 2, 2, 80, True, None),
}


def _inputs(device, dtype, batch, tq, tk, hq, hkv, d):
    q = torch.randn(batch, tq, hq, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, tk, hkv, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, tk, hkv, d, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn(batch, tq, hq, d, device=device, dtype=dtype)
    return q, k, v, dout


def _check_against_reference(q, k, v, dout, *, causal, window, tol, scale=None):
    out = fused_attention(q, k, v, causal=causal, window=window, softmax_scale=scale, backend="triton")
    got = grads((out.float() * dout.float()).sum(), q, k, v)
    ref, _ = reference_attention(q, k, v, causal=causal, window=window, scale=scale)
    want = grads((ref * dout.double()).sum(), q, k, v)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= tol
    for name, g, r in zip("qkv", got, want, strict=True):
        assert torch.isfinite(g).all(), f"d{name} has non-finite values"
        assert rel_err(g, r) <= tol, f"d{name}: rel err {rel_err(g, r):.2e} > {tol:.0e}"


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_fp32_match_float64(case, device):
    batch, tq, tk, hq, hkv, d, causal, window = CASES[case]
    q, k, v, dout = _inputs(device, torch.float32, batch, tq, tk, hq, hkv, d)
    _check_against_reference(q, k, v, dout, causal=causal, window=window, tol=FP32_TOL)


@pytest.mark.parametrize("case", ["causal_gqa_bottom_right", "sliding_window_mqa"])
def test_gradients_fp16_match_float64_of_same_values(case, device):
    batch, tq, tk, hq, hkv, d, causal, window = CASES[case]
    q, k, v, dout = _inputs(device, torch.float16, batch, tq, tk, hq, hkv, d)
    _check_against_reference(q, k, v, dout, causal=causal, window=window, tol=FP16_TOL)


def test_rows_without_keys_get_zero_gradients(device):
    # Tq > Tk with bottom-right causal: the first Tq - Tk queries see nothing.
    q, k, v, dout = _inputs(device, torch.float32, 1, 30, 12, 2, 2, 16)
    out = fused_attention(q, k, v, causal=True, backend="triton")
    dq, dk, dv = grads((out * dout).sum(), q, k, v)
    assert torch.equal(out[:, :18], torch.zeros_like(out[:, :18]))
    assert torch.equal(dq[:, :18], torch.zeros_like(dq[:, :18]))
    assert dq[:, 18:].abs().sum() > 0 and dk.abs().sum() > 0 and dv.abs().sum() > 0


def test_low_level_backward_writes_every_output_element(device):
    # NaN-filled allocations: any dq/dk/dv/out/lse element a kernel skips stays NaN.
    batch, tq, tk, hq, hkv, d = 2, 37, 29, 4, 2, 24
    q, k, v, dout = (t.detach() for t in _inputs(device, torch.float32, batch, tq, tk, hq, hkv, d))
    kwargs = dict(causal=True, softmax_scale=0.3, window=(9, -1))
    with nan_poisoned_allocations():
        out, lse = attention_forward(q, k, v, **kwargs)
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, **kwargs)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(t).any(), f"{name} has unwritten elements"
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref, _ = reference_attention(qr, kr, vr, causal=True, window=(9, -1), scale=0.3)
    want = grads((ref * dout.double()).sum(), qr, kr, vr)
    for g, r in zip((dq, dk, dv), want, strict=True):
        assert rel_err(g, r) <= FP32_TOL


def test_any_strides_and_bhtd_layout(device):
    batch, t, h, d = 2, 26, 2, 32
    # Views with padding between heads and a transposed layout: read in place.
    big = torch.randn(batch, h, t, 3 * d, device=device)
    q = big[..., :d].detach().requires_grad_()
    k = torch.randn(batch, h, t, d, device=device).requires_grad_()
    v = torch.randn(batch, t, h, d, device=device).transpose(1, 2).detach().requires_grad_()
    dout = torch.randn(batch, t, h, d, device=device).transpose(1, 2)
    out = fused_attention(q, k, v, causal=True, layout="bhtd", backend="triton")
    got = grads((out * dout).sum(), q, k, v)
    ref, _ = reference_attention(*(x.transpose(1, 2) for x in (q, k, v)), causal=True)
    want = grads((ref.transpose(1, 2) * dout.double()).sum(), q, k, v)
    assert rel_err(out, ref.transpose(1, 2)) <= FP32_TOL
    for g, r in zip(got, want, strict=True):
        assert rel_err(g, r) <= FP32_TOL


def test_lse_gradient(device):
    q, k, v, dout = _inputs(device, torch.float32, 1, 24, 31, 4, 2, 16)
    dlse = torch.randn(1, 4, 24, device=device)
    out, lse = fused_attention(q, k, v, causal=True, return_lse=True, backend="triton")
    got = grads((out * dout).sum() + (lse * dlse).sum(), q, k, v)
    ref, ref_lse = reference_attention(q, k, v, causal=True)
    want = grads((ref * dout.double()).sum() + (ref_lse * dlse.double()).sum(), q, k, v)
    assert rel_err(lse, ref_lse) <= FP32_TOL
    for g, r in zip(got, want, strict=True):
        assert rel_err(g, r) <= FP32_TOL


def test_backward_is_bitwise_deterministic(device):
    q, k, v, dout = _inputs(device, torch.float32, 1, 40, 40, 4, 1, 32)
    runs = []
    for _ in range(2):
        out = fused_attention(q, k, v, causal=True, backend="triton")
        runs.append(grads((out * dout).sum(), q, k, v))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_auto_backend_keeps_triton_under_autograd(device, monkeypatch):
    from stream_attention.core import functional

    monkeypatch.setenv("STREAM_ATTENTION_BACKEND", "triton")
    called = []
    real = functional.sdpa_attention
    monkeypatch.setattr(functional, "sdpa_attention", lambda *a, **kw: called.append(1) or real(*a, **kw))
    q, k, v, dout = _inputs(device, torch.float32, 1, 16, 16, 2, 2, 16)
    out = fused_attention(q, k, v, causal=True, backend="auto")
    assert out.grad_fn is not None and "TritonAttention" in type(out.grad_fn).__name__
    grads((out * dout).sum(), q, k, v)
    assert not called


# --------------------------------------------------------------------------- training


class _TinyLM(nn.Module):
    """Pre-norm transformer blocks whose attention is ``fused_attention``."""

    def __init__(self, backend: str, vocab: int = 32, dim: int = 32, heads: int = 2, layers: int = 1):
        super().__init__()
        self.backend, self.heads = backend, heads
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm1": nn.LayerNorm(dim),
                    "qkv": nn.Linear(dim, 3 * dim),
                    "proj": nn.Linear(dim, dim),
                    "norm2": nn.LayerNorm(dim),
                    "mlp": nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)),
                }
            )
            for _ in range(layers)
        )
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        b, t, dim = x.shape
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["norm1"](x)).view(b, t, 3, self.heads, dim // self.heads).unbind(2)
            attn = fused_attention(q, k, v, causal=True, backend=self.backend)
            x = x + blk["proj"](attn.reshape(b, t, dim))
            x = x + blk["mlp"](blk["norm2"](x))
        return self.head(x)


def _train(backend: str, steps: int, data: torch.Tensor, init: dict) -> list[float]:
    model = _TinyLM(backend)
    model.load_state_dict(init)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        batch = data[step % data.shape[0]]
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_loop_matches_sdpa():
    # A learnable sequence (each token is the previous plus one, mod vocab, with noise).
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 32, (3, 2, 1), generator=g)
    data = (start + torch.arange(17)) % 32
    init = _TinyLM("sdpa").state_dict()
    ours = _train("triton", 5, data, init)
    ref = _train("sdpa", 5, data, init)
    assert ours[-1] < ours[0]
    for a, b in zip(ours, ref, strict=True):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (ours, ref)


# --------------------------------------------------------------------------- GPU (bf16)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case",
    [
        (2, 512, 512, 8, 8, 128, True, None),
        (2, 384, 640, 8, 2, 64, True, None),
        (1, 700, 700, 4, 4, 96, False, (128, 0)),
        (2, 1000, 1000, 4, 1, 128, False, None),
    ],
)
def test_gradients_bf16_gpu(case):
    batch, tq, tk, hq, hkv, d, causal, window = case
    q, k, v, dout = _inputs(torch.device("cuda"), torch.bfloat16, batch, tq, tk, hq, hkv, d)
    out = fused_attention(q, k, v, causal=causal, window=window, backend="triton")
    got = grads((out.float() * dout.float()).sum(), q, k, v)
    ref, _ = reference_attention(q, k, v, causal=causal, window=window)
    want = grads((ref * dout.double()).sum(), q, k, v)
    # bf16 rounds P and dS to 8 bits of mantissa before the products, as FlashAttention does.
    assert rel_err(out, ref) <= 1e-2
    for name, g, r in zip("qkv", got, want, strict=True):
        assert rel_err(g, r) <= 2e-2, f"d{name}: {rel_err(g, r):.2e}"
