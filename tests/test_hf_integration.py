"""The ``"stream_attention"`` transformers implementation against ``"sdpa"`` on tiny random models.

Every model test forces ``STREAM_ATTENTION_BACKEND=triton`` (the kernels run through
Triton's interpreter on CPU, see conftest) and counts kernel launches, so a test
cannot pass on a silent fallback to SDPA.
"""

from __future__ import annotations

import contextlib
import copy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    Qwen2Config,
    masking_utils,  # noqa: E402
)

import stream_attention.integration.hf as hf  # noqa: E402
from stream_attention import StreamAttentionConfig  # noqa: E402
from stream_attention.kernels import attention_bwd, attention_fwd  # noqa: E402

VOCAB = 128
# Larger than transformers' 0.02 so attention is far from uniform: a wrong mask then
# moves the logits by much more than the tolerance.
INIT = 0.2
COMMON = dict(vocab_size=VOCAB, initializer_range=INIT, pad_token_id=0, bos_token_id=1, eos_token_id=2)

FAMILIES = {
    # Few heads keep the interpreter fast (it runs one program per row and head); Llama
    # keeps a real GQA grouping (4 query heads over 2 KV heads), the others use 2 over 1.
    "llama": lambda: LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **COMMON,
    ),
    # sliding window (5) shorter than prompt + generation: decode steps slide past the padding.
    "mistral": lambda: MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=5,
        **COMMON,
    ),
    # one full and one sliding layer: two mask types in one forward.
    "qwen2": lambda: Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_sliding_window=True,
        sliding_window=6,
        max_window_layers=1,
        **COMMON,
    ),
    # an explicit head_dim that is not hidden / heads, nor a power of two.
    "gemma": lambda: GemmaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=48,
        **COMMON,
    ),
    "phi": lambda: PhiConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        partial_rotary_factor=0.5,
        **COMMON,
    ),
    # learned absolute positions, no GQA, layer-dependent scaling.
    "gpt2": lambda: GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=2,
        n_positions=64,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        scale_attn_by_inverse_layer_idx=True,
        **COMMON,
    ),
    "gpt_neox": lambda: GPTNeoXConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        **COMMON,
    ),
}


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("STREAM_ATTENTION_BACKEND", "triton")
    hf.reset_attention_stats()


@contextlib.contextmanager
def count_calls(owner, name: str):
    """Count calls of ``owner.name`` (a kernel launcher), wherever the package imported it."""
    original = getattr(owner, name)
    calls: list[tuple[int, ...]] = []

    def counting(q, *args, **kwargs):
        calls.append(tuple(q.shape))
        return original(q, *args, **kwargs)

    patched = [
        mod
        for mod_name, mod in list(sys.modules.items())
        if mod_name.startswith("stream_attention") and getattr(mod, name, None) is original
    ]
    for mod in patched:
        setattr(mod, name, counting)
    try:
        yield calls
    finally:
        for mod in patched:
            setattr(mod, name, original)


def count_kernel_launches():
    """Launches of the Triton forward; each entry is the ``[B, Tq, Hq, D]`` shape of q."""
    return count_calls(attention_fwd, "attention_forward")


def make_pair(family: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(sdpa reference, ours) with identical weights, fp32, eval mode."""
    torch.manual_seed(0)
    config = FAMILIES[family]()
    # from_config writes the implementation into the config object: one copy each.
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="stream_attention")
    ours.load_state_dict(ref.state_dict())
    assert ref.config._attn_implementation == "sdpa"
    assert ours.config._attn_implementation == "stream_attention"
    return ref.eval(), ours.eval()


def left_padded_batch(seq_len: int = 10, pads: tuple[int, ...] = (0, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (len(pads), seq_len))
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


def test_registered_with_transformers():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    hf.register()
    hf.register()
    assert hf.is_registered()
    assert AttentionInterface._global_mapping["stream_attention"] is hf.stream_attention_forward
    assert AttentionMaskInterface._global_mapping["stream_attention"] is hf.stream_attention_mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_sdpa(family):
    ref, ours = make_pair(family)
    assert hf.enable_stream_attention(ours) == 2  # both layers' attention modules
    ids, mask = left_padded_batch()
    with torch.no_grad(), count_kernel_launches() as launches:
        got = ours(ids, attention_mask=mask).logits
    want = ref(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)
    assert launches, "the Triton kernel never ran"
    assert not any(k.startswith("fallback") for k in hf.attention_stats()), hf.attention_stats()

    gen = dict(max_new_tokens=16, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    hf.reset_attention_stats()
    with count_kernel_launches() as launches:
        out = ours.generate(ids, attention_mask=mask, **gen)
    expected = ref.generate(ids, attention_mask=mask, **gen)
    assert torch.equal(out.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(out.scores, expected.scores, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, s=step: f"decode step {s}: {m}")
    decode_launches = [shape for shape in launches if shape[1] == 1]
    assert decode_launches, "cached decode steps did not reach the kernel"
    assert not any(k.startswith("fallback") for k in hf.attention_stats()), hf.attention_stats()


def test_sliding_window_semantics_match_transformers():
    """transformers keeps key j for query i iff i - sw < j <= i: window (sw - 1, 0)."""
    sw = 4
    mask_fn = masking_utils.sliding_window_causal_mask_function(sw)
    keep = hf.stream_attention_mask(
        batch_size=2, q_length=9, kv_length=9, mask_function=mask_fn, local_size=sw, attention_mask=None
    )
    info = getattr(keep, hf.MASK_INFO_ATTR)
    assert keep.shape == (2, 9) and keep.all()
    assert info.causal and info.window_left == sw - 1 and not info.has_padding

    dense = masking_utils.sdpa_mask(
        batch_size=1, q_length=9, kv_length=9, mask_function=mask_fn, allow_is_causal_skip=False
    )[0, 0]
    rel = torch.arange(9)[None, :] - torch.arange(9)[:, None]
    assert torch.equal(dense, (rel <= 0) & (rel >= -(sw - 1)))


def test_mask_function_cached_decode_offsets():
    """A sliding cache that dropped old keys: offsets shift, the keys stay bottom-right aligned."""
    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10], dtype=torch.bool)
    keep = hf.stream_attention_mask(
        batch_size=2,
        q_length=1,
        kv_length=5,
        q_offset=9,
        kv_offset=5,
        local_size=5,
        mask_function=masking_utils.sliding_window_causal_mask_function(5),
        attention_mask=padding,
    )
    info = getattr(keep, hf.MASK_INFO_ATTR)
    assert torch.equal(keep, padding[:, 5:10]) and not info.has_padding and info.window_left == 4

    keep = hf.stream_attention_mask(batch_size=2, q_length=1, kv_length=10, q_offset=9, attention_mask=padding)
    info = getattr(keep, hf.MASK_INFO_ATTR)
    assert torch.equal(keep, padding) and info.has_padding and info.causal and info.window_left is None


def test_unrecognised_patterns_get_the_exact_sdpa_mask():
    chunked = masking_utils.chunked_causal_mask_function(4, torch.zeros(2, dtype=torch.long))
    args = dict(batch_size=2, q_length=10, kv_length=10, mask_function=chunked, local_size=4)
    got = hf.stream_attention_mask(**args)
    want = masking_utils.sdpa_mask(**args, allow_is_causal_skip=False)
    assert got.dim() == 4 and torch.equal(got, want)
    # A static cache (more slots than tokens) is not bottom-right aligned.
    got = hf.stream_attention_mask(batch_size=1, q_length=3, kv_length=8, q_offset=2)
    assert got.dim() == 4 and torch.equal(
        got, masking_utils.sdpa_mask(batch_size=1, q_length=3, kv_length=8, q_offset=2, allow_is_causal_skip=False)
    )


def test_right_padding_and_holes():
    """Padding anywhere (training batches pad on the right) goes to the kernel as key padding."""
    ref, ours = make_pair("llama")
    ids = torch.randint(3, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    mask[1, 4:6] = 0
    with torch.no_grad(), count_kernel_launches() as launches:
        got = ours(ids, attention_mask=mask).logits
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)
    assert len(launches) == 2 and hf.attention_stats() == {"fused": 2}


def test_packed_sequences_get_the_materialised_mask():
    """position_ids restarting inside a row (packing) give a block-diagonal 4D mask."""
    ref, ours = make_pair("llama")
    ids = torch.randint(3, VOCAB, (1, 12))
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad(), count_kernel_launches() as launches:
        got = ours(ids, position_ids=position_ids).logits
    with torch.no_grad():
        want = ref(ids, position_ids=position_ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert len(launches) == 2 and hf.attention_stats() == {"fused": 2}


def test_static_cache_generation():
    """A static cache is not bottom-right aligned (empty slots at the end): 4D masks, same tokens."""
    ref, ours = make_pair("llama")
    ids, mask = left_padded_batch(seq_len=8)
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    with count_kernel_launches() as launches:
        got = ours.generate(ids, attention_mask=mask, **gen)
    assert torch.equal(got, ref.generate(ids, attention_mask=mask, **gen))
    assert len(launches) == 2 * 4 and set(hf.attention_stats()) == {"fused"}


def test_unsupported_head_dim_falls_back_exactly():
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        **COMMON,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    with pytest.raises(hf.UnsupportedModelError, match="head_dim 8"):
        hf.enable_stream_attention(ref)
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="stream_attention").eval()
    ours.load_state_dict(ref.state_dict())
    ids, mask = left_padded_batch(seq_len=8)
    with torch.no_grad(), count_kernel_launches() as launches:
        got = ours(ids, attention_mask=mask).logits
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)
    assert launches == [] and hf.attention_stats() == {"fallback:shape": 2}


def test_bidirectional_attention():
    config = FAMILIES["gemma"]()
    config.use_bidirectional_attention = True
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="stream_attention").eval()
    ours.load_state_dict(ref.state_dict())
    ids, mask = left_padded_batch(seq_len=8, pads=(0, 3))
    with torch.no_grad(), count_kernel_launches() as launches:
        got = ours(ids, attention_mask=mask).logits
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)
    assert launches


def test_set_attn_implementation_and_enable():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES["llama"](), attn_implementation="sdpa").eval()
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        want = model(ids).logits
    model.set_attn_implementation("stream_attention")
    with torch.no_grad(), count_kernel_launches() as launches:
        got = model(ids).logits
    assert len(launches) == 2
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    model.set_attn_implementation("sdpa")
    assert hf.enable_stream_attention(model) == 2
    assert model.config._attn_implementation == "stream_attention"
    model.set_attn_implementation("sdpa")
    cfg = StreamAttentionConfig(num_heads=4, head_dim=16)
    assert hf.replace_llama_attention(model, cfg) == 2
    with pytest.raises(ValueError, match="head_dim"):
        hf.replace_llama_attention(model, StreamAttentionConfig(num_heads=4, head_dim=32))


def test_seed_readme_helper_on_a_base_model():
    """The seed README: ``AutoModel`` + ``replace_llama_attention(model, StreamAttentionConfig(...))``."""
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(FAMILIES["llama"]()).eval()
    cfg = StreamAttentionConfig(
        num_heads=model.config.num_attention_heads,
        head_dim=model.config.hidden_size // model.config.num_attention_heads,
    )
    ids = torch.randint(3, VOCAB, (1, 7))
    with torch.no_grad():
        want = model(ids).last_hidden_state
    assert hf.replace_llama_attention(model, cfg) == 2
    with torch.no_grad(), count_kernel_launches() as launches:
        got = model(ids).last_hidden_state
    assert len(launches) == 2
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_backend_pinned_per_model():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES["llama"](), attn_implementation="sdpa").eval()
    hf.enable_stream_attention(model, backend="sdpa")
    with torch.no_grad(), count_kernel_launches() as launches:
        model(torch.randint(3, VOCAB, (1, 6)))
    assert launches == [] and hf.attention_stats() == {"fused": 2}


def test_softcapping_is_refused():
    from transformers import Gemma2Config

    config = Gemma2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=VOCAB,
        attn_logit_softcapping=50.0,
    )
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    with pytest.raises(hf.UnsupportedModelError, match="soft-capping"):
        hf.enable_stream_attention(model)
    # Reached without the up-front check, the call itself refuses rather than ignoring softcap.
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="stream_attention")
    with pytest.raises(ValueError, match="soft-capping"):
        model(torch.randint(3, VOCAB, (1, 5)))


def test_dropout_is_never_silently_dropped():
    """Attention dropout in training mode reaches the kernel (dropout_p)."""
    config = FAMILIES["gpt2"]()
    config.attn_pdrop = 0.5
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="stream_attention").train()
    ids = torch.randint(3, VOCAB, (1, 8))
    with torch.no_grad(), count_kernel_launches() as launches:
        a, b = model(ids).logits, model(ids).logits
    assert len(launches) == 4
    assert not torch.allclose(a, b), "dropout had no effect"
    assert hf.attention_stats() == {"fused": 4}


def _train_step(model, ids, mask):
    model.zero_grad(set_to_none=True)
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare_training(ref, ours, ids, mask):
    ref.train()
    ours.train()
    want_loss, want = _train_step(ref, ids, mask)
    got_loss, got = _train_step(ours, ids, mask)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_training_gradients_match_sdpa(family):
    """loss.backward() through the Triton forward and backward kernels (mistral: windowed)."""
    ref, ours = make_pair(family)
    ids, mask = left_padded_batch(seq_len=10, pads=(0, 4))
    with count_kernel_launches() as forward, count_calls(attention_bwd, "attention_backward") as backward:
        _compare_training(ref, ours, ids, mask)
    assert len(forward) == 2 and len(backward) == 2, (forward, backward)


def test_training_plumbing_through_sdpa_backend(monkeypatch):
    """Gradients through our routing (GQA views, key padding, mixed layers) on fused_attention's SDPA path."""
    monkeypatch.setenv("STREAM_ATTENTION_BACKEND", "sdpa")
    ref, ours = make_pair("qwen2")
    ids, mask = left_padded_batch(seq_len=10, pads=(0, 4))
    _compare_training(ref, ours, ids, mask)
    assert hf.attention_stats() == {"fused": 2}


def test_autocast_mixed_dtypes_are_cast_like_sdpa():
    """Under autocast rotary leaves q/k in fp32 and v in bf16; SDPA casts all three, so do we."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal = True
    module._stream_attention_backend = "sdpa"  # bf16 dots are unreliable in Triton's CPU interpreter
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 4, 6, 16)
    v = torch.randn(2, 4, 6, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = hf.stream_attention_forward(module, q, k, v, None)
        want, _ = sdpa_attention_forward(module, q, k, v, None)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="dtypes differ"):
        hf.stream_attention_forward(module, q, k, v, None)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_bf16_on_gpu_within_the_bf16_noise_floor(family, monkeypatch):
    """bf16 on CUDA: our logits differ from sdpa's no more than eager's do, forward and backward run Triton."""
    monkeypatch.setenv("STREAM_ATTENTION_BACKEND", "auto")
    torch.manual_seed(0)
    config = FAMILIES[family]()
    models = {}
    for impl in ("sdpa", "eager", "stream_attention"):
        models[impl] = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impl)
        if impl != "sdpa":
            models[impl].load_state_dict(models["sdpa"].state_dict())
        models[impl] = models[impl].to("cuda", torch.bfloat16).eval()
    ids, mask = left_padded_batch(seq_len=40, pads=(0, 7, 19))
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad(), count_kernel_launches() as launches:
        logits = {impl: m(ids, attention_mask=mask).logits.float() for impl, m in models.items()}
    valid = mask.bool()
    ours = (logits["stream_attention"] - logits["sdpa"])[valid].abs().max().item()
    floor = (logits["eager"] - logits["sdpa"])[valid].abs().max().item()
    assert ours <= 4 * floor + 1e-2, (ours, floor)
    assert len(launches) == 2

    ours_model = models["stream_attention"].train()
    with count_calls(attention_bwd, "attention_backward") as backward:
        ours_model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    assert len(backward) == 2
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in ours_model.parameters())
