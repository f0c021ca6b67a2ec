"""The model families people serve, through LLMEngine with the Triton kernels (interpreter
on CPU): greedy tokens identical to transformers' ``generate`` (fp32, eager/SDPA
attention), with prompts and generations longer than the sliding windows.

Each family is a tiny random model (2 layers, hidden 64, vocab 128, window 8, pages of 4
tokens). Tiny random models tend to repeat their last token whatever attention says, so
their q/k projections (or q/k norms, or Gemma's ``query_pre_attn_scalar``) are sharpened
until attention decides the output; the logprob of every generated token is also
compared, which a wrong window, cap or scale moves by far more than the tolerance. Models
with attention the kernels lack are refused at load time, by name.
"""

from __future__ import annotations

import copy

import pytest
import torch

from stream_attention.engine import LLMEngine, SamplingParams
from stream_attention.engine.attention_spec import layer_attention, unsupported_attention

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.05,
              tie_word_embeddings=False)
WINDOW = 8
MOE = dict(num_experts_per_tok=2)

# family: (config class, config overrides, transformers attention, runs through the fused forward)
FAMILIES = {
    "llama": ("LlamaConfig", {}, "sdpa", True),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW), "sdpa", True),
    # max_window_layers=1: layer 0 full, layer 1 windowed.
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1), "sdpa", True),
    # Per-head q/k norms in the fused forward; layer 1 windowed.
    "qwen3": ("Qwen3Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1), "sdpa", True),
    # Alternating local/global layers, soft-capped logits (attention and final), scale from query_pre_attn_scalar.
    "gemma2": ("Gemma2Config", dict(sliding_window=WINDOW, attn_logit_softcapping=5.0, final_logit_softcapping=2.0,
                                    query_pre_attn_scalar=1), "eager", True),
    # Local layers rotate with their own RoPE base (10k against the global layers' 1M).
    "gemma3": ("Gemma3TextConfig", dict(sliding_window=WINDOW, sliding_window_pattern=2, query_pre_attn_scalar=1),
               "sdpa", True),
    "gemma": ("GemmaConfig", {}, "sdpa", True),
    "phi3": ("Phi3Config", dict(sliding_window=WINDOW, pad_token_id=0), "sdpa", False),
    "olmo2": ("Olmo2Config", {}, "sdpa", False),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, sliding_window=WINDOW, **MOE), "sdpa", False),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                         use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2, **MOE),
                  "sdpa", False),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, moe_intermediate_size=32, **MOE), "sdpa", False),
}
# Fast by default: the families that exercise windows, soft-capping and both forwards.
FAST = {"mistral", "gemma2"}

PROMPT_LENGTHS = (21, 5, 14)
MAX_TOKENS = 12
# fp32 on both sides, attention summed in another order: logprobs agree to ~1e-6; a window,
# cap or scale mistake moves them by more than 1e-2 (checked by breaking each on purpose).
LOGPROB_ATOL = 1e-3


def _sharpen(model: torch.nn.Module) -> None:
    """Scale q and k (their projections, or the q/k norms that would undo that) so that
    attention, not the last token's embedding, decides the next token; and give every
    norm random weights (initialised to ones, or to Gemma's zeros for ``1 + weight``) so
    that a norm applied with the wrong convention changes the tokens."""
    gemma_norms = model.config.model_type.startswith("gemma")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                p.mul_(8.0)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(8.0 * (1.0 + p) - 1.0 if gemma_norms else 8.0 * p)


def _build(family: str):
    cls, overrides, attn, _ = FAMILIES[family]
    cfg = getattr(transformers, cls)(**{**COMMON, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=attn).eval()
    _sharpen(ref)
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=attn).eval()
    model.load_state_dict(ref.state_dict())
    ref.generation_config.eos_token_id = None
    return model, ref


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def _hf_greedy(ref, prompt: list[int]) -> tuple[list[int], list[float]]:
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0,
                       output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens, strict=True)]
    return tokens, logprobs


def _check_family(family: str, backend: str, on_layer_call=None) -> tuple[LLMEngine, torch.nn.Module]:
    model, ref = _build(family)
    from stream_attention.models.default import load_tokenizer

    if on_layer_call is not None:
        for layer in model.model.layers:
            layer.register_forward_pre_hook(lambda module, args: on_layer_call(module))

    # 16-token steps: the 21-token prompt is prefilled in chunks beside other rows' decode.
    eng = LLMEngine(model, load_tokenizer(), num_kv_blocks=64, block_size=4, max_num_batched_tokens=16,
                    use_cuda_graphs=False, attention_backend=backend)
    prompts = _prompts()
    outs = eng.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0))
    for out, prompt in zip(outs, prompts, strict=True):
        tokens, logprobs = _hf_greedy(ref, prompt)
        assert out.token_ids == tokens, (family, len(prompt))
        got = [lp.logprob for lp in out.logprobs]
        assert max(abs(a - b) for a, b in zip(got, logprobs, strict=True)) < LOGPROB_ATOL, (family, got, logprobs)
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    return eng, ref


@pytest.mark.parametrize("family", [f if f in FAST else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_family_matches_transformers_greedy(family):
    layer_calls = []
    eng, _ = _check_family(family, "triton", on_layer_call=layer_calls.append)
    fused = FAMILIES[family][3]
    assert (eng.runner.fused is not None) == fused, family
    # The fused forward never calls transformers' decoder layers; the hooked path does.
    assert (len(layer_calls) == 0) == fused, (family, len(layer_calls))


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_family_on_the_torch_fallback(family):
    eng, ref = _check_family(family, "sdpa")
    # Outside engine steps the lent model still generates as transformers does (soft-capped
    # layers through the model's own eager attention, windows through transformers' masks).
    prompt = _prompts()[0]
    lent = eng.model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0,
                              eos_token_id=None)
    assert lent[0, len(prompt):].tolist() == _hf_greedy(ref, prompt)[0]


def test_layer_attention_reads_windows_and_caps_per_layer():
    def spec(family):
        cls, overrides, _, _ = FAMILIES[family]
        return [(s.sliding_window, s.softcap) for s in layer_attention(getattr(transformers, cls)(**{**COMMON,
                                                                                                   **overrides}))]

    assert spec("llama") == [(None, None)] * 2
    assert spec("mistral") == [(WINDOW, None)] * 2
    assert spec("qwen2") == [(None, None), (WINDOW, None)]
    assert spec("gemma2") == [(WINDOW, 5.0), (None, 5.0)]
    assert spec("gemma3") == [(WINDOW, None), (None, None)]
    qwen2_off = transformers.Qwen2Config(**{**COMMON, "use_sliding_window": False, "sliding_window": WINDOW})
    assert [s.sliding_window for s in layer_attention(qwen2_off)] == [None, None]


def _tiny(cls: str, **overrides):
    base = COMMON if cls not in ("FalconConfig", "BloomConfig") else dict(vocab_size=128, hidden_size=64)
    cfg = getattr(transformers, cls)(**{**base, **overrides})
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("cls, overrides, feature", [
    ("Gemma3TextConfig", dict(use_bidirectional_attention=True), "bidirectional"),
    ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, layer_types=None), "attention sinks"),
    ("DeepseekV3Config", dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                              v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
                              moe_intermediate_size=32, n_group=1, topk_group=1), "latent attention"),
    ("FalconConfig", dict(alibi=True, num_hidden_layers=2, num_attention_heads=4), "ALiBi"),
    ("BloomConfig", dict(n_head=4, n_layer=2), "ALiBi"),
])
def test_unsupported_attention_is_refused_by_name(cls, overrides, feature):
    model = _tiny(cls, **overrides)
    reason = unsupported_attention(model)
    assert reason is not None and feature in reason, reason
    from stream_attention.models.default import load_tokenizer

    with pytest.raises(ValueError, match=feature):
        LLMEngine(model, load_tokenizer(), num_kv_blocks=8, block_size=4, use_cuda_graphs=False,
                  attention_backend="triton")


def test_eviction_with_windows_is_refused():
    model, _ = _build("mistral")
    from stream_attention.models.default import load_tokenizer

    with pytest.raises(ValueError, match="sliding window"):
        LLMEngine(model, load_tokenizer(), num_kv_blocks=16, block_size=4, use_cuda_graphs=False,
                  kv_compression="streaming", kv_budget_tokens=12)


@pytest.mark.slow
def test_quantized_pages_follow_windows_and_caps():
    """int8 pages: the Triton kernels and the torch fallback read the same codes, so a
    windowed, soft-capped model gives the same greedy tokens on both."""
    from stream_attention.models.default import load_tokenizer

    model, _ = _build("gemma2")
    prompts = _prompts()
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    runs = {}
    for backend in ("triton", "sdpa"):
        eng = LLMEngine(model, load_tokenizer(), num_kv_blocks=64, block_size=4, max_num_batched_tokens=16,
                        use_cuda_graphs=False, attention_backend=backend, kv_cache_dtype="int8")
        runs[backend] = eng.generate(prompts, params)
    for a, b in zip(runs["triton"], runs["sdpa"], strict=True):
        assert a.token_ids == b.token_ids
        # fp32 math over identical dequantized values, summed in another order.
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < LOGPROB_ATOL


def test_blocks_behind_the_window_return_to_the_pool():
    """Mistral (every layer windowed): blocks no query can read again are freed as the
    sequence moves on, so a sequence holds about window + one step of blocks whatever its
    length, and the tokens stay transformers' (checked by _check_family). Gemma 2's global
    layers read everything: nothing is freed there."""
    from stream_attention.engine.scheduler import Scheduler

    peak: dict[str, int] = {}
    commit = Scheduler.commit

    def watching(self, scheduled, collector=None):
        commit(self, scheduled, collector)
        for s in scheduled:
            peak[s.seq.request_id] = max(peak.get(s.seq.request_id, 0), len(s.seq.block_table))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Scheduler, "commit", watching)
        eng, _ = _check_family("mistral", "triton")
        assert eng.scheduler.kv_reach == WINDOW - 1
        assert eng.block_manager.blocks_dropped > 0
        # block 4, reach 7, at most 16 new tokens a step: 7 + 16 slots over 4-slot blocks, +1 partial.
        assert max(peak.values()) <= -(-(WINDOW - 1 + 16) // 4) + 1, peak
        peak.clear()
        eng, _ = _check_family("gemma2", "triton")
        assert eng.scheduler.kv_reach is None and eng.block_manager.blocks_dropped == 0
