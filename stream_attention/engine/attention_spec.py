"""What each attention layer of a transformers causal LM asks of the paged kernels.

Read once at load time from the model's config (and checked against its attention
modules): per layer a sliding window (Mistral, Qwen2 with ``use_sliding_window``, the
local layers of Gemma 2 / Gemma 3, ...) and a logit soft-cap (Gemma 2's
``attn_logit_softcapping``). The softmax scale needs nothing here: every transformers
attention layer hands its own ``scaling`` (Gemma's ``query_pre_attn_scalar ** -0.5``)
to the attention function.

:func:`unsupported_attention` audits the config attributes and module parameters that
change attention in ways the paged kernels do not implement (non-causal or cross
attention, ALiBi, attention sinks, latent attention, chunked attention, value heads of
another width, unknown layer types), so such a model is refused at load time by name
rather than served with wrong tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

# transformers' ``config.layer_types`` values the kernels implement.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
# Architectures whose attention always adds ALiBi biases (no config flag says so).
ALIBI_MODEL_TYPES = ("bloom",)


@dataclass(frozen=True)
class LayerAttention:
    """One layer's attention variant.

    ``sliding_window``: the number of keys a query sees, itself included
    (transformers' and vLLM's convention; ``None`` for full causal attention).
    ``softcap``: scores become ``softcap * tanh(score / softcap)`` before the softmax.
    """

    sliding_window: int | None = None
    softcap: float | None = None

    @property
    def window_left(self) -> int | None:
        """The kernels' bound: keys ``pos - window_left .. pos`` are visible."""
        return None if self.sliding_window is None else self.sliding_window - 1


def text_config(config: Any) -> Any:
    """The decoder's config (the text part of a multimodal config)."""
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def layer_attention(config: Any) -> list[LayerAttention]:
    """Per-layer window and soft-cap, as transformers' masks apply them: a layer is
    windowed when ``layer_types`` says ``sliding_attention``, or, for configs without
    ``layer_types`` (Mistral, Mixtral, Phi-3), whenever ``sliding_window`` is set."""
    cfg = text_config(config)
    n = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None) or None  # Qwen2-MoE writes 0 for "no window"
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None
    softcap = getattr(cfg, "attn_logit_softcapping", None) or None
    layer_types = getattr(cfg, "layer_types", None) or ["sliding_attention"] * n
    windows = [window if t == "sliding_attention" else None for t in layer_types[:n]]
    return [LayerAttention(w, float(softcap) if softcap is not None else None) for w in windows]


def kv_reach(layers: list[LayerAttention]) -> int | None:
    """How far back (in positions) any layer's queries still read keys: the largest
    ``window_left`` when every layer is windowed, None when some layer reads the whole
    context. Keys further back than this can leave the cache."""
    if not layers or any(layer.window_left is None for layer in layers):
        return None
    return max(layer.window_left for layer in layers)


@dataclass(frozen=True)
class KVGroups:
    """How the hybrid KV allocator lays a model's layers out over one page pool (vLLM's
    KV cache groups), for models that mix full-attention and sliding-window layers.

    The pool holds ``num_slots`` page tensors (K and V each), ``num_slots`` = the number of
    full-attention layers; a page (one block id) holds ``block_size`` tokens of every slot.
    A full-attention layer owns one slot and reads the sequence's ``block_table``; the
    windowed layers are dealt out over the slots in ``window_pages`` rounds (the last one
    padded when ``num_slots`` does not divide their number), so one logical block of the
    windowed group takes ``window_pages`` pages, one per round, listed in the sequence's
    ``window_table``. Both groups draw pages from one free list: short sequences spend the
    pool as they would without groups (plus any padding), and a long sequence's windowed
    group holds only its window.

    ``slot_of_layer[l]``: the page tensor layer ``l`` reads and writes;
    ``group_of_layer[l]``: ``-1`` for the full-attention group, else the round ``r`` of
    a windowed layer (its pages are ``window_table[r::window_pages]``);
    ``window_reach``: how far back any windowed layer reads (largest ``window_left``).
    """

    slot_of_layer: tuple[int, ...]
    group_of_layer: tuple[int, ...]
    num_slots: int
    window_pages: int
    window_reach: int

    @property
    def padded_slots(self) -> int:
        """Slots of the last windowed round that no layer uses (memory the layout wastes)."""
        windowed = sum(1 for g in self.group_of_layer if g >= 0)
        return self.window_pages * self.num_slots - windowed


def kv_groups(layers: list[LayerAttention]) -> KVGroups | None:
    """The hybrid layout of a model whose layers mix full and windowed attention, or None
    (one block table for every layer) when all layers are alike, or when full-attention
    layers outnumber windowed ones (their pages would need several ids per block; the
    saving is small there and short sequences would pay for the padding)."""
    full = [i for i, layer in enumerate(layers) if layer.window_left is None]
    windowed = [i for i, layer in enumerate(layers) if layer.window_left is not None]
    if not full or not windowed or len(full) > len(windowed):
        return None
    slots = len(full)
    slot_of = [0] * len(layers)
    group_of = [-1] * len(layers)
    for i, layer_idx in enumerate(full):
        slot_of[layer_idx] = i
    for w, layer_idx in enumerate(windowed):
        slot_of[layer_idx] = w % slots
        group_of[layer_idx] = w // slots
    return KVGroups(tuple(slot_of), tuple(group_of), slots, -(-len(windowed) // slots),
                    max(layers[i].window_left for i in windowed))


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's self-attention modules (transformers' ``*Attention`` with a ``layer_idx``)."""
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]


def unsupported_attention(model: nn.Module) -> str | None:
    """The first attention feature of ``model`` the paged kernels lack, named; None when
    every layer is causal self-attention with at most a sliding window and a soft-cap."""
    cfg = text_config(model.config)
    if getattr(cfg, "is_encoder_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return "cross-attention (an encoder-decoder model)"
    if getattr(cfg, "use_bidirectional_attention", False):
        return "bidirectional (non-causal) attention (use_bidirectional_attention)"
    attn_config = getattr(cfg, "attn_config", None)
    alibi_in_attn_config = (attn_config.get("alibi") if isinstance(attn_config, dict)
                            else getattr(attn_config, "alibi", False))
    if (getattr(cfg, "alibi", False) or alibi_in_attn_config or getattr(cfg, "position_embedding_type", None) == "alibi"
            or getattr(cfg, "model_type", None) in ALIBI_MODEL_TYPES):
        return "ALiBi attention biases"
    if getattr(cfg, "kv_lora_rank", None):
        return "multi-head latent attention (kv_lora_rank)"
    if getattr(cfg, "attention_chunk_size", None):
        return "chunked local attention (attention_chunk_size)"
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    v_head_dim = getattr(cfg, "v_head_dim", None)
    if v_head_dim not in (None, head_dim):
        return f"value heads of width {v_head_dim} beside key heads of {head_dim} (v_head_dim)"
    for t in getattr(cfg, "layer_types", None) or []:
        if t not in SUPPORTED_LAYER_TYPES:
            return f"layer type {t!r} (only {' and '.join(SUPPORTED_LAYER_TYPES)} are implemented)"
    window = getattr(cfg, "sliding_window", None) or None
    if window is not None and (not isinstance(window, int) or window < 1):
        return f"sliding_window={window!r} (a positive number of keys is expected)"
    specs = layer_attention(cfg)
    for module in attention_modules(model):
        if getattr(module, "is_causal", True) is False:
            return f"non-causal attention ({type(module).__name__}.is_causal is False)"
        if getattr(module, "sinks", None) is not None:
            return "attention sinks (learned per-head sink logits)"
        idx = module.layer_idx
        if not isinstance(idx, int) or not 0 <= idx < len(specs):
            continue
        # Layers that carry their own window / cap must agree with the config's reading,
        # which the fused forward and the masks use.
        own_window = getattr(module, "sliding_window", specs[idx].sliding_window)
        if own_window != specs[idx].sliding_window:
            return (f"layer {idx}: its attention module has sliding_window={own_window} where the config's "
                    f"layer types give {specs[idx].sliding_window}")
        own_cap = getattr(module, "attn_logit_softcapping", specs[idx].softcap) or None
        if own_cap != specs[idx].softcap:
            return f"layer {idx}: attn_logit_softcapping={own_cap} differs from the config's {specs[idx].softcap}"
    return None
