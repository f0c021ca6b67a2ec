"""The seed's public API: config, modules, examples exactly as its README shows them."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from stream_attention import FlashAttentionV3, FusedOnlineAttention, StreamAttention, StreamAttentionConfig
from stream_attention.kernels.runtime import interpreter_enabled
from tests.reference import reference_attention, rel_err

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_example_runs_verbatim(capsys):
    ns = runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out.split("\n")
    assert out[0] == "torch.Size([2, 1024, 4096])"
    assert out[1] == "torch.Size([2, 1024, 32, 128])"
    # The values too: the explicit Q, K, V path is causal attention of the example's inputs
    # (a few rows are enough for the float64 reference).
    q, k, v, y_qkv = ns["q"], ns["k"], ns["v"], ns["y_qkv"]
    ref, _ = reference_attention(q[:1, :64], k[:1, :64], v[:1, :64], causal=True)
    assert rel_err(y_qkv[:1, :64], ref) < (2e-3 if q.dtype == torch.float16 else 1e-5)


def test_config_defaults_and_validation():
    cfg = StreamAttentionConfig(num_heads=4, head_dim=32)
    assert cfg.num_kv_heads == 4 and cfg.hidden_size == 128
    with pytest.raises(ValueError, match="num_kv_heads"):
        StreamAttentionConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="head_dim"):
        StreamAttentionConfig(head_dim=8)
    with pytest.raises(ValueError, match="tile_size_q"):
        StreamAttentionConfig(tile_size_q=100)


def test_config_from_env(monkeypatch):
    monkeypatch.setenv("STREAM_ATTENTION_NUM_HEADS", "16")
    monkeypatch.setenv("STREAM_ATTENTION_HEAD_DIM", "64")
    monkeypatch.setenv("STREAM_ATTENTION_USE_LAYER_NORM", "true")
    monkeypatch.setenv("STREAM_ATTENTION_DROPOUT", "0.1")
    monkeypatch.setenv("STREAM_ATTENTION_NUM_KV_HEADS", "4")
    cfg = StreamAttentionConfig.from_env(max_sequence_length=4096)
    assert (cfg.num_heads, cfg.head_dim, cfg.num_kv_heads) == (16, 64, 4)
    assert cfg.use_layer_norm is True and cfg.dropout == 0.1 and cfg.max_sequence_length == 4096
    monkeypatch.setenv("STREAM_ATTENTION_QKV_BIAS", "maybe")
    with pytest.raises(ValueError, match="STREAM_ATTENTION_QKV_BIAS"):
        StreamAttentionConfig.from_env()


def test_env_example_lists_every_field():
    text = (ROOT / ".env.example").read_text()
    for name in StreamAttentionConfig.__dataclass_fields__:
        assert f"STREAM_ATTENTION_{name.upper()}" in text, name


def _manual_block(attn: StreamAttention, x: torch.Tensor, causal: bool) -> torch.Tensor:
    cfg = attn.config
    if attn.norm is not None:
        x = attn.norm(x)
    qkv = attn.qkv_proj(x)
    kv = cfg.num_kv_heads * cfg.head_dim
    q, k, v = qkv.split([cfg.hidden_size, kv, kv], -1)
    b, t, _ = x.shape
    out, _ = reference_attention(
        q.view(b, t, cfg.num_heads, cfg.head_dim),
        k.view(b, t, cfg.num_kv_heads, cfg.head_dim),
        v.view(b, t, cfg.num_kv_heads, cfg.head_dim),
        causal=causal,
    )
    return attn.out_proj(out.float().reshape(b, t, -1))


@pytest.mark.parametrize("layer_norm", [False, True])
def test_hidden_states_path_matches_manual_block(layer_norm):
    cfg = StreamAttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, use_layer_norm=layer_norm, qkv_bias=True)
    attn = StreamAttention(cfg)
    x = torch.randn(2, 11, cfg.hidden_size)
    with torch.no_grad():
        assert rel_err(attn(x), _manual_block(attn, x, causal=True)) < 1e-5
        assert rel_err(attn(x, causal=False), _manual_block(attn, x, causal=False)) < 1e-5


def test_kv_cache_decoding_equals_full_pass():
    cfg = StreamAttentionConfig(num_heads=4, num_kv_heads=1, head_dim=16)
    attn = StreamAttention(cfg)
    x = torch.randn(1, 9, cfg.hidden_size)
    with torch.no_grad():
        full = attn(x)
        out, cache = attn(x[:, :6], use_cache=True)
        steps = [out]
        for t in range(6, 9):
            step, cache = attn(x[:, t : t + 1], past_key_value=cache, use_cache=True)
            steps.append(step)
    assert cache[0].shape == (1, 9, 1, 16)
    assert rel_err(torch.cat(steps, 1), full) < 1e-5


def test_bad_hidden_states_shape():
    attn = StreamAttention(StreamAttentionConfig(num_heads=2, head_dim=16))
    with pytest.raises(ValueError, match=r"hidden_states\(2, 5, 31\)"):
        attn(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="max_sequence_length"):
        StreamAttention(StreamAttentionConfig(num_heads=2, head_dim=16, max_sequence_length=4))(torch.randn(1, 5, 32))


@pytest.mark.skipif(not (torch.cuda.is_available() or interpreter_enabled()), reason="needs the Triton kernel")
@pytest.mark.parametrize("causal", [True, False])
def test_fused_online_attention_and_baseline_agree(causal, device):
    # The fused module on the Triton kernel (under the interpreter on CPU), the SDPA baseline
    # module, and the float64 reference: three independent paths to the same numbers.
    fused = FusedOnlineAttention(num_heads=4, head_dim=32, num_kv_heads=2, backend="triton").to(device)
    base = FlashAttentionV3(num_heads=4, head_dim=32).to(device)
    q = torch.randn(2, 21, 4, 32, device=device)
    k, v = (torch.randn(2, 21, 2, 32, device=device) for _ in range(2))
    out, lse = fused(q, k, v, causal=causal, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, causal=causal)
    assert rel_err(out, ref) < 1e-5  # fp32 against float64
    assert (lse.double().cpu() - ref_lse.cpu()).abs().max() < 1e-4
    assert rel_err(base(q, k.repeat_interleave(2, 2), v.repeat_interleave(2, 2), causal=causal), ref) < 1e-5
    with pytest.raises(ValueError, match="query heads"):
        fused(torch.randn(1, 3, 5, 32, device=device), k, v)


@pytest.mark.skipif(not interpreter_enabled(), reason="exercises the interpreter")
def test_fused_online_attention_triton_backend():
    fused = FusedOnlineAttention(num_heads=2, head_dim=32, backend="triton")
    q, k, v = (torch.randn(1, 19, 2, 32) for _ in range(3))
    ref, _ = reference_attention(q, k, v, causal=True)
    assert rel_err(fused(q, k, v), ref) < 1e-5


def test_module_benchmarks_return_metrics():
    for module in (FusedOnlineAttention(num_heads=2, head_dim=32), FlashAttentionV3(num_heads=2, head_dim=32)):
        m = module.benchmark(seq_len=64, batch_size=3, warmup=1, iterations=2, causal=False)
        assert m["time_ms"] > 0 and (m["seq_len"], m["batch_size"], m["num_heads"]) == (64, 3, 2)
        seconds = m["time_ms"] * 1e-3
        # Rates from their definitions: 4*B*H*T*T*D FLOPs; Q, K, V read and O written once (fp32).
        assert m["tflops"] == pytest.approx(4 * 3 * 2 * 64 * 64 * 32 / seconds / 1e12, rel=1e-9)
        assert m["bandwidth_gb_s"] == pytest.approx(4 * 4 * 3 * 2 * 64 * 32 / seconds / 1e9, rel=1e-9)
        causal = module.benchmark(seq_len=64, batch_size=3, warmup=0, iterations=1, causal=True)
        assert causal["tflops"] * causal["time_ms"] == pytest.approx(m["tflops"] * m["time_ms"] / 2, rel=1e-9)
    assert FlashAttentionV3().benchmark(seq_len=32, warmup=0, iterations=1)["sdpa_backend"] == "default"


def test_device_follows_module_moves():
    m = FusedOnlineAttention(num_heads=2, head_dim=16)
    assert m.device.type == "cpu"
    assert StreamAttention(StreamAttentionConfig(num_heads=2, head_dim=16)).attention.device.type == "cpu"
