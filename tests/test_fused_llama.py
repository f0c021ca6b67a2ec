"""The engine's fused Llama-family forward: token-exact with transformers, weights shared,
unsupported models fall back to transformers' layers."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Olmo2Config, Qwen2Config, Qwen3Config

from stream_attention.engine import LLMEngine, SamplingParams
from stream_attention.engine.fused_llama import FusedLlamaForward, unsupported_reason
from stream_attention.models.default import load_tokenizer

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=4100, max_position_embeddings=128,
              initializer_range=0.5)


def _model(config):
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    ref = AutoModelForCausalLM.from_config(config).eval()
    ref.load_state_dict(model.state_dict())
    return model, ref


def _greedy(ref, prompt, n):
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                       eos_token_id=None)
    return out[0, len(prompt):].tolist()


CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON, use_sliding_window=False),  # q/k/v biases
    "qwen3": lambda: Qwen3Config(**COMMON, use_sliding_window=False),  # per-head q/k RMSNorms
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_fused_engine_matches_transformers_greedy(family, backend):
    model, ref = _model(CONFIGS[family]())
    if family == "qwen2":
        with torch.no_grad():
            model.model.layers[0].self_attn.k_proj.bias.normal_()
        ref.load_state_dict(model.state_dict())
    eng = LLMEngine(model, load_tokenizer(), num_kv_blocks=48, block_size=8, max_num_batched_tokens=16,
                    use_cuda_graphs=False, attention_backend=backend)
    assert isinstance(eng.runner.fused, FusedLlamaForward)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 4000, (n,), generator=g).tolist() for n in (5, 19, 11)]
    outs = eng.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    for out, p in zip(outs, prompts, strict=True):
        assert out.token_ids == _greedy(ref, p, 6)


def test_fused_weights_are_shared_and_the_model_still_generates():
    model, ref = _model(LlamaConfig(**COMMON))
    ids = torch.tensor([[5, 9, 200, 31]])
    before = model(ids).logits
    fused = FusedLlamaForward(model, use_triton=False)
    attn = model.model.layers[1].self_attn
    qkv = fused.layers[1].qkv_w
    assert attn.q_proj.weight.data_ptr() == qkv.data_ptr()
    assert attn.v_proj.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=0, rtol=0)


def test_fused_layers_can_be_switched_off():
    model, ref = _model(LlamaConfig(**COMMON))
    eng = LLMEngine(model, load_tokenizer(), num_kv_blocks=32, block_size=8, use_cuda_graphs=False,
                    attention_backend="sdpa", fused_layers=False)
    assert eng.runner.fused is None
    out = eng.generate([[7, 8, 9, 10]], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert out.token_ids == _greedy(ref, [7, 8, 9, 10], 5)


def test_unsupported_models_say_why():
    olmo2, _ = _model(Olmo2Config(**COMMON))  # post-norm layers: no input norm
    assert "model type" in unsupported_reason(olmo2)
    qwen3, _ = _model(Qwen3Config(**COMMON))
    qwen3.model.layers[0].pre_feedforward_layernorm = qwen3.model.layers[0].input_layernorm
    assert "pre/post feed-forward norms" in unsupported_reason(qwen3)
    qwen3, _ = _model(Qwen3Config(**COMMON))
    qwen3.model.layers[1].self_attn.k_norm = torch.nn.LayerNorm(16)  # not an RMSNorm
    assert "q/k norms" in unsupported_reason(qwen3)
    with pytest.raises(ValueError, match="cannot use the fused forward"):
        FusedLlamaForward(qwen3, use_triton=False)


@pytest.mark.parametrize("use_triton", [False, True])
def test_gemma_norms_round_as_transformers_in_bf16(use_triton):
    """Gemma's ``(1 + weight)`` RMSNorm rounds once, after the float product: the norm (and
    add+norm) a fused Gemma-2 forward picks must give transformers' bits exactly. The Triton
    kernels run in float16 here: Triton's CPU interpreter truncates float32 to bfloat16
    where GPUs round to nearest (the bf16 kernel is checked on the GPU in test_layer_ops)."""
    from transformers import Gemma2Config
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    from stream_attention.engine.fused_llama import _norm_params

    gemma, _ = _model(Gemma2Config(**COMMON, query_pre_attn_scalar=16))
    fused = FusedLlamaForward(gemma, use_triton=use_triton)
    g = torch.Generator().manual_seed(0)
    ref = Gemma2RMSNorm(96, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(96, generator=g))
    dtype = torch.float16 if use_triton else torch.bfloat16
    ref = ref.to(dtype)
    x = (3 * torch.randn(7, 96, generator=g)).to(dtype)
    h = torch.randn(7, 96, generator=g).to(dtype)
    torch.testing.assert_close(fused._rms_norm(x, *_norm_params(ref, True)), ref(x), atol=0, rtol=0)
    residual = x.clone()
    out = fused._add_rms_norm(h, residual, *_norm_params(ref, True))
    torch.testing.assert_close(residual, x + h, atol=0, rtol=0)
    torch.testing.assert_close(out, ref(x + h), atol=0, rtol=0)
