"""Fused decoder-layer element-wise kernels vs float64 references (Triton's interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from stream_attention.kernels import layer_ops


def _rms_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return w.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _tol(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [64, 96])
def test_rms_norm_and_fused_add(device, dtype, hidden):
    x = torch.randn(5, hidden, device=device).to(dtype)
    res = torch.randn(5, hidden, device=device).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    eps = 1e-5

    y = layer_ops.rms_norm(x, w, eps)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), _rms_ref(x, w, eps), atol=_tol(dtype), rtol=_tol(dtype))
    torch.testing.assert_close(y, layer_ops.rms_norm_torch(x, w, eps), atol=_tol(dtype), rtol=_tol(dtype))

    summed = (x.double() + res.double()).to(dtype)
    res_torch = res.clone()
    y2 = layer_ops.fused_add_rms_norm(x, res, w, eps)
    torch.testing.assert_close(res, summed, atol=0, rtol=0)  # residual updated in place, model dtype
    torch.testing.assert_close(y2.double(), _rms_ref(summed, w, eps), atol=_tol(dtype), rtol=_tol(dtype))
    y2_torch = layer_ops.fused_add_rms_norm_torch(x, res_torch, w, eps)
    torch.testing.assert_close(res_torch, res)
    torch.testing.assert_close(y2, y2_torch, atol=_tol(dtype), rtol=_tol(dtype))


@pytest.mark.parametrize("fused_add", [False, True])
def test_single_rounding_norm_matches_gemma_module_bit_for_bit(device, fused_add):
    """``round_normed=False`` is Gemma's RMSNorm: the float32 ``(1 + weight)`` product,
    rounded once to the input's dtype. In fp16 the Llama rounding (normalised activations
    rounded first) differs in the last bits for some entries, so exact equality with
    transformers' module is what tells the two apart."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    norm = GemmaRMSNorm(64, eps=1e-6).to(device)
    with torch.no_grad():
        norm.weight.normal_(std=0.5)
    x = (3 * torch.randn(9, 64, device=device)).half()
    res = torch.randn(9, 64, device=device).half()
    weight = 1.0 + norm.weight.detach().float()
    if fused_add:
        expected = norm(x + res)
        y = layer_ops.fused_add_rms_norm(x, res.clone(), weight, norm.eps, round_normed=False)
        y_torch = layer_ops.fused_add_rms_norm_torch(x, res.clone(), weight, norm.eps, round_normed=False)
    else:
        expected = norm(x)
        y = layer_ops.rms_norm(x, weight, norm.eps, round_normed=False)
        y_torch = layer_ops.rms_norm_torch(x, weight, norm.eps, round_normed=False)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
    torch.testing.assert_close(y_torch, expected, atol=0, rtol=0)


def test_rms_norm_matches_transformers_module(device):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(48, eps=1e-6).to(device)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(7, 48, device=device)
    torch.testing.assert_close(layer_ops.rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_and_mul(device, dtype):
    x = torch.randn(6, 2 * 80, device=device).to(dtype)  # 80: not a power of two
    y = layer_ops.silu_and_mul(x)
    gate, up = x.double().chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(y.double(), ref, atol=_tol(dtype), rtol=_tol(dtype))
    torch.testing.assert_close(layer_ops.silu_and_mul_torch(x).double(), ref, atol=_tol(dtype), rtol=_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_on_views_of_a_fused_projection(device, dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    tokens, hq, hk, d = 5, 4, 2, 16
    cfg = LlamaConfig(hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hk, head_dim=d)
    rotary = LlamaRotaryEmbedding(cfg).to(device)
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, device=device).to(dtype)
    q = qkv[:, :hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(tokens, hk, d)
    positions = torch.tensor([0, 3, 4, 17, 100], device=device)
    cos, sin = rotary(qkv[None].double(), positions[None])
    q_ref, k_ref = apply_rotary_pos_emb(q.double().transpose(0, 1)[None], k.double().transpose(0, 1)[None], cos, sin)
    cos_m, sin_m = rotary(qkv[None], positions[None])

    for fn in (layer_ops.rotary_qk, layer_ops.rotary_qk_torch):
        q_out, k_out = fn(q, k, cos_m[0], sin_m[0])
        assert q_out.is_contiguous() and q_out.dtype == dtype
        torch.testing.assert_close(q_out.double(), q_ref[0].transpose(0, 1), atol=_tol(dtype), rtol=_tol(dtype))
        torch.testing.assert_close(k_out.double(), k_ref[0].transpose(0, 1), atol=_tol(dtype), rtol=_tol(dtype))


def test_bad_shapes_raise_value_errors(device):
    x = torch.randn(4, 32, device=device)
    with pytest.raises(ValueError, match=r"expected 16 columns, got shape \(4, 32\)"):
        layer_ops.rms_norm(x, torch.ones(16, device=device), 1e-6)
    with pytest.raises(ValueError, match="residual shape"):
        layer_ops.fused_add_rms_norm(x, torch.randn(3, 32, device=device), torch.ones(32, device=device), 1e-6)
    with pytest.raises(ValueError, match=r"\(4, 31\)"):
        layer_ops.silu_and_mul(torch.randn(4, 31, device=device))
    q, k = torch.randn(3, 2, 8, device=device), torch.randn(3, 1, 8, device=device)
    with pytest.raises(ValueError, match="cos/sin"):
        layer_ops.rotary_qk(q, k, torch.randn(3, 4, device=device), torch.randn(3, 4, device=device))
    with pytest.raises(ValueError, match="does not match"):
        layer_ops.rotary_qk(q, torch.randn(2, 1, 8, device=device), torch.randn(3, 8, device=device),
                            torch.randn(3, 8, device=device))


@pytest.mark.gpu
def test_bf16_layer_ops_on_gpu():
    dev = torch.device("cuda")
    x = torch.randn(300, 2048, device=dev, dtype=torch.bfloat16)
    res = torch.randn_like(x)
    w = torch.randn(2048, device=dev, dtype=torch.bfloat16)
    res_ref = res.clone()
    y = layer_ops.fused_add_rms_norm(x, res, w, 1e-5)
    y_ref = layer_ops.fused_add_rms_norm_torch(x, res_ref, w, 1e-5)
    torch.testing.assert_close(res, res_ref, atol=0, rtol=0)
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=2e-2)
    gu = torch.randn(300, 2 * 8192, device=dev, dtype=torch.bfloat16)
    torch.testing.assert_close(layer_ops.silu_and_mul(gu), layer_ops.silu_and_mul_torch(gu), atol=2e-2, rtol=2e-2)
    # Gemma's single rounding, bit for bit in bf16 (the CPU interpreter truncates bf16 stores).
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    norm = GemmaRMSNorm(2048, eps=1e-6).to(dev)
    with torch.no_grad():
        norm.weight.normal_(std=0.5)
    weight = 1.0 + norm.weight.detach().float()
    torch.testing.assert_close(layer_ops.rms_norm(x, weight, norm.eps, round_normed=False), norm(x), atol=0, rtol=0)


@pytest.mark.parametrize("fn", [layer_ops.rotary_qk, layer_ops.rotary_qk_torch])
def test_rotary_also_writes_kv_pages(device, fn):
    tokens, hq, hk, d, blocks, bs = 4, 4, 2, 16, 6, 4
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, device=device, dtype=torch.float16)
    q = qkv[:, :hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(tokens, hk, d)
    v = qkv[:, (hq + hk) * d:].view(tokens, hk, d)
    cos, sin = torch.randn(tokens, d, device=device), torch.randn(tokens, d, device=device)
    k_pages = torch.zeros(blocks, bs, hk, d, device=device, dtype=torch.float16)
    v_pages = torch.zeros_like(k_pages)
    slots = torch.tensor([9, 2, 23, 10], device=device)  # scattered over pages, not in order
    q_out, k_out = fn(q, k, cos, sin, v=v, k_pages=k_pages, v_pages=v_pages, slot_mapping=slots)
    q_ref, k_ref = layer_ops.rotary_qk_torch(q, k, cos, sin)
    torch.testing.assert_close(q_out, q_ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(k_pages.view(-1, hk, d)[slots], k_out, atol=0, rtol=0)
    torch.testing.assert_close(v_pages.view(-1, hk, d)[slots], v, atol=0, rtol=0)
    untouched = torch.ones(blocks * bs, dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert (k_pages.view(-1, hk, d)[untouched.to(device)] == 0).all()
    with pytest.raises(ValueError, match="slot_mapping"):
        fn(q, k, cos, sin, v=v, k_pages=k_pages, v_pages=v_pages, slot_mapping=slots[:2])
