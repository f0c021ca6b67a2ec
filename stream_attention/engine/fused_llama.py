"""The engine's own forward pass for Llama-style decoder models: Llama, Mistral, Qwen2,
Qwen3, and Gemma 1/2/3 (text); sliding windows, soft-capping and per-head q/k norms included.

transformers' eager decoder layer launches ~35 kernels per layer at decode time, most of
them element-wise ops on a few hundred kilobytes (RMSNorm's six, RoPE's ten, SiLU and the
product, residual adds, q/k/v as three matmuls): for a 1B Llama at batch 64 on an H100,
about half the decode step even inside a CUDA graph. This forward runs the same weights
with nine kernels per layer:

    add+RMSNorm → QKV matmul → RoPE of q and k, storing k and v into the pages
    → paged attention → O matmul → add+RMSNorm → gate|up matmul → SiLU·up → down matmul

The residual add of one layer is folded into the next layer's input norm. q/k/v and
gate/up are fused by concatenating their weights once; the model's own ``Linear``
weights become views into the concatenation, so no weight memory is duplicated and the
transformers model keeps working (``model.generate``) on the same storage.

Gemma's differences fit the same pipeline:

- RMSNorms scale by ``1 + weight`` and round once, after the float32 product: the norm
  kernel keeps that sum in float32 (computed once at load, a few vectors per layer) and
  skips the Llama rounding of the normalised activations (``round_normed=False``), one
  kernel with the residual add folded in as for Llama, and the same bits as transformers
  in bf16 (rounding the normalised activations to bf16 first, as the Llama kernel does,
  changes greedy tokens at near-ties).
- Gemma 2/3 also normalise the attention and MLP outputs before the residual add (two
  more RMSNorm kernels per layer); the MLP activation is the model's own module
  (GeLU-tanh), applied to the gate half of the fused matmul.
- The embedding is scaled by sqrt(hidden) (the model's own embedding module does it),
  the softmax scale is the layer's ``scaling`` (``query_pre_attn_scalar``), attention
  scores are soft-capped in the paged kernels (``attn_logit_softcapping``) and the
  logits after the LM head (``final_logit_softcapping``).
- Gemma 3's local layers rotate with their own RoPE base: cos/sin are computed once per
  step for each distinct rotary table and each layer reads its own.

Attention goes through :func:`.attention.paged_attention_forward`, the same hook the
transformers path uses, so quantized pages, eviction scoring and the torch fallback all
apply unchanged. Rotary cos/sin come from the model's own ``rotary_emb`` (every RoPE
scaling variant transformers implements).

Any model this module does not recognise runs through transformers with the hook; the
reason is logged once.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..kernels import layer_ops
from . import attention as attn_hook
from .attention_spec import LayerAttention, layer_attention

log = logging.getLogger("stream_attention.engine")

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
# Families whose RMSNorms scale by ``1 + weight`` (and keep their epsilon in ``eps``).
UNIT_OFFSET_NORM_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
SILU_ACTIVATIONS = ("SiLU", "SiLUActivation")

NormParams = tuple[torch.Tensor, float]


def _norm_reason(norm: Any, unit_offset: bool, width: int | None = None) -> str | None:
    """Why ``norm`` is not an RMSNorm of the family's convention (None when it is)."""
    weight = getattr(norm, "weight", None)
    eps_attr = "eps" if unit_offset else "variance_epsilon"
    if norm is None or weight is None or not type(norm).__name__.endswith("RMSNorm") or not hasattr(norm, eps_attr):
        style = "Gemma-style (1 + weight)" if unit_offset else "Llama-style"
        return f"{type(norm).__name__} is not a {style} RMSNorm"
    if width is not None and tuple(weight.shape) != (width,):
        return f"{type(norm).__name__} of shape {tuple(weight.shape)} where ({width},) is expected"
    return None


def unsupported_reason(model: Any) -> str | None:
    """Why ``model`` cannot run through :class:`FusedLlamaForward` (None when it can)."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    unit_offset = model_type in UNIT_OFFSET_NORM_MODEL_TYPES
    if getattr(cfg, "partial_rotary_factor", 1.0) not in (None, 1.0):
        return "partial rotary embeddings"
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "the model does not have the Llama module layout (model.embed_tokens/layers/norm/rotary_emb)"
    if not isinstance(getattr(model, "lm_head", None), nn.Linear):
        return "lm_head is not a plain Linear"
    for layer in base.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(type(m) is not nn.Linear for m in linears):
            return "a projection is not a plain nn.Linear (quantized or adapted weights)"
        if not isinstance(getattr(mlp, "act_fn", None), nn.Module):
            return "the MLP has no activation module (act_fn)"
        head_norms = [getattr(attn, n, None) for n in ("q_norm", "k_norm")]
        if any(m is not None for m in head_norms) and any(
                _norm_reason(m, unit_offset, attn.head_dim) for m in head_norms):
            return "q/k norms that are not per-head RMSNorms of the family's convention"
        sandwich = [getattr(layer, n, None) for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm")]
        if any(m is not None for m in sandwich) and not all(m is not None for m in sandwich):
            return "a decoder layer with only one of the pre/post feed-forward norms"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, *(m for m in sandwich if m is not None)):
            reason = _norm_reason(norm, unit_offset)
            if reason is not None:
                return reason
    return _norm_reason(base.norm, unit_offset)


def _fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several projections of the same input; the modules'
    parameters are re-pointed at row slices of it, so memory is not duplicated."""
    weight = torch.cat([m.weight.detach() for m in linears])
    has_bias = [m.bias is not None for m in linears]
    bias = None
    if any(has_bias):
        bias = torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                          for m in linears])
    row = 0
    for m in linears:
        n = m.out_features
        m.weight.data = weight[row:row + n]
        if m.bias is not None:
            m.bias.data = bias[row:row + n]
        row += n
    return weight, bias


def _norm_params(norm: nn.Module, unit_offset: bool) -> NormParams:
    """(weight, eps) for the norm kernels: Gemma's ``1 + weight`` is summed here once,
    in float32, and the norm kernels multiply by it in float32 and round once
    (``round_normed=False``)."""
    if unit_offset:
        return 1.0 + norm.weight.detach().float(), float(norm.eps)
    return norm.weight, float(norm.variance_epsilon)


def _rotary_tables(base: nn.Module, layer_types: list[str]) -> tuple[list[str], dict[str, Callable]]:
    """Per layer, the key of its rotary table, and per key the function ``(x, positions)
    -> (cos, sin)``. One table for most models; Gemma 3's local layers have their own
    RoPE base (a ``layer_type`` argument of the rotary module, or a ``rotary_emb_local``
    module in older transformers)."""
    rotary = base.rotary_emb
    local = getattr(base, "rotary_emb_local", None)
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        tables: dict[str, Callable] = {t: (lambda x, pos, t=t: rotary(x, pos, t)) for t in set(layer_types)}
        return list(layer_types), tables
    if local is not None:
        keys = ["local" if t == "sliding_attention" else "global" for t in layer_types]
        return keys, {"local": local, "global": rotary}
    return ["global"] * len(layer_types), {"global": rotary}


class _Layer:
    def __init__(self, layer: nn.Module, spec: LayerAttention, rope_key: str, unit_offset: bool) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.attn = attn  # the hook reads ``layer_idx``
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling  # Gemma: query_pre_attn_scalar ** -0.5
        self.spec = spec  # sliding window and soft-cap
        self.rope_key = rope_key
        self.qkv_w, self.qkv_b = _fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        self.q_size = attn.q_proj.out_features
        self.kv_size = attn.k_proj.out_features
        self.o_w, self.o_b = attn.o_proj.weight, attn.o_proj.bias
        self.gate_up_w, self.gate_up_b = _fuse_linears([mlp.gate_proj, mlp.up_proj])
        self.inter = mlp.gate_proj.out_features
        self.act_fn = None if type(mlp.act_fn).__name__ in SILU_ACTIVATIONS else mlp.act_fn
        self.down_w, self.down_b = mlp.down_proj.weight, mlp.down_proj.bias
        self.input_norm = _norm_params(layer.input_layernorm, unit_offset)
        if getattr(layer, "pre_feedforward_layernorm", None) is not None:
            # Gemma 2/3: post_attention_layernorm normalises the attention output; the MLP
            # has its own input norm and an output norm.
            self.attn_out_norm: NormParams | None = _norm_params(layer.post_attention_layernorm, unit_offset)
            self.mlp_in_norm = _norm_params(layer.pre_feedforward_layernorm, unit_offset)
            self.mlp_out_norm: NormParams | None = _norm_params(layer.post_feedforward_layernorm, unit_offset)
        else:
            self.attn_out_norm = None
            self.mlp_in_norm = _norm_params(layer.post_attention_layernorm, unit_offset)
            self.mlp_out_norm = None
        # Qwen3, Gemma 3: RMSNorm over each head of q and k, before RoPE.
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.q_norm = _norm_params(q_norm, unit_offset) if q_norm is not None else None
        self.k_norm = _norm_params(k_norm, unit_offset) if k_norm is not None else None


class FusedLlamaForward:
    """Callable ``(input_ids [T], positions [T], logits_to_keep) -> logits`` for one packed
    engine step; ``logits_to_keep`` is 0 (every row) or an index tensor of rows.

    ``use_triton`` picks the Triton element-wise kernels (GPU, or CPU under the
    interpreter) or their PyTorch twins. Must be called inside an engine step (an
    :func:`.attention.attention_context`).
    """

    def __init__(self, model: Any, *, use_triton: bool) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"{type(model).__name__} cannot use the fused forward: {reason}")
        cfg = model.config
        unit_offset = cfg.model_type in UNIT_OFFSET_NORM_MODEL_TYPES
        base = model.model
        self.embed = base.embed_tokens
        # Gemma scales the embedding by sqrt(hidden): inside its embedding module in current
        # transformers, in the model's forward (rounded to the dtype first) in older ones.
        self.embed_scale = (cfg.hidden_size ** 0.5 if unit_offset and not hasattr(self.embed, "embed_scale")
                            else None)
        specs = layer_attention(cfg)
        layer_types = list(getattr(cfg, "layer_types", None) or [])[: cfg.num_hidden_layers] or [
            "full_attention" if s.sliding_window is None else "sliding_attention" for s in specs]
        rope_keys, self.rotary = _rotary_tables(base, layer_types)
        self.layers = [_Layer(layer, spec, key, unit_offset) for layer, spec, key in
                       zip(base.layers[: cfg.num_hidden_layers], specs, rope_keys, strict=True)]
        self.norm = _norm_params(base.norm, unit_offset)
        self.lm_head = model.lm_head
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None) or None
        if use_triton:
            self._rms_norm = layer_ops.rms_norm
            self._add_rms_norm = layer_ops.fused_add_rms_norm
            self._rotary = layer_ops.rotary_qk
            self._silu_mul = layer_ops.silu_and_mul
        else:
            self._rms_norm = layer_ops.rms_norm_torch
            self._add_rms_norm = layer_ops.fused_add_rms_norm_torch
            self._rotary = layer_ops.rotary_qk_torch
            self._silu_mul = layer_ops.silu_and_mul_torch
        if unit_offset:
            # Gemma's rounding: the (1 + weight) product in float32, rounded once.
            self._rms_norm = functools.partial(self._rms_norm, round_normed=False)
            self._add_rms_norm = functools.partial(self._add_rms_norm, round_normed=False)

    def _act_mul(self, layer: _Layer, gate_up: torch.Tensor) -> torch.Tensor:
        if layer.act_fn is None:
            return self._silu_mul(gate_up)
        # The model's own activation (Gemma's GeLU-tanh), rounded as its MLP rounds.
        return layer.act_fn(gate_up[:, :layer.inter]) * gate_up[:, layer.inter:]

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        ctx = attn_hook.current_context()
        if ctx is None:
            raise RuntimeError("FusedLlamaForward runs inside an engine step (attention_context)")
        linear = nn.functional.linear
        tokens = input_ids.shape[0]
        residual = self.embed(input_ids)
        if self.embed_scale is not None:
            residual = residual * torch.tensor(self.embed_scale, dtype=residual.dtype)
        rope = {}
        for key, table in self.rotary.items():
            cos, sin = table(residual[None], positions[None])
            rope[key] = (cos[0], sin[0])
        h: torch.Tensor | None = None
        for layer in self.layers:
            if h is None:
                x = self._rms_norm(residual, *layer.input_norm)
            else:
                x = self._add_rms_norm(h, residual, *layer.input_norm)
            qkv = linear(x, layer.qkv_w, layer.qkv_b)
            d, nq, nkv = layer.head_dim, layer.q_size, layer.kv_size
            q = qkv[:, :nq].view(tokens, nq // d, d)
            k = qkv[:, nq:nq + nkv].view(tokens, nkv // d, d)
            v = qkv[:, nq + nkv:].view(tokens, nkv // d, d)
            if layer.q_norm is not None:
                q = self._rms_norm(q.reshape(-1, d), *layer.q_norm).view(tokens, nq // d, d)
                k = self._rms_norm(k.reshape(-1, d), *layer.k_norm).view(tokens, nkv // d, d)
            cos, sin = rope[layer.rope_key]
            k_pages, v_pages = ctx.kv_caches[layer.attn.layer_idx]
            if isinstance(k_pages, torch.Tensor) and ctx.kv_scores is None:
                # Plain pages: the RoPE kernel also stores k and v into them (at the slots of
                # the layer's group, with the hybrid KV allocator).
                slots = ctx.slot_mapping if ctx.groups is None else ctx.groups[layer.attn.layer_idx].slot_mapping
                q, k = self._rotary(q, k, cos, sin, v=v, k_pages=k_pages, v_pages=v_pages, slot_mapping=slots)
                written = True
            else:
                q, k = self._rotary(q, k, cos, sin)
                written = False
            # The hook takes transformers' [1, heads, tokens, dim] views.
            out, _ = attn_hook.paged_attention_forward(
                layer.attn, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None,
                scaling=layer.scaling, sliding_window=layer.spec.sliding_window, softcap=layer.spec.softcap,
                kv_written=written,
            )
            h = linear(out.reshape(tokens, nq), layer.o_w, layer.o_b)
            if layer.attn_out_norm is not None:
                h = self._rms_norm(h, *layer.attn_out_norm)
            x = self._add_rms_norm(h, residual, *layer.mlp_in_norm)
            h = linear(self._act_mul(layer, linear(x, layer.gate_up_w, layer.gate_up_b)), layer.down_w, layer.down_b)
            if layer.mlp_out_norm is not None:
                h = self._rms_norm(h, *layer.mlp_out_norm)
        if h is None:  # a model with no layers
            h = torch.zeros_like(residual)
        if isinstance(logits_to_keep, torch.Tensor):
            h, residual = h[logits_to_keep], residual[logits_to_keep]
        elif logits_to_keep:
            h, residual = h[-logits_to_keep:], residual[-logits_to_keep:]
        x = self._add_rms_norm(h.contiguous(), residual.contiguous(), *self.norm)
        logits = self.lm_head(x)
        if self.final_softcap is not None:
            # Gemma 2: as transformers does it, in the logits' dtype.
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


def build(model: Any, *, use_triton: bool, enabled: bool = True) -> FusedLlamaForward | None:
    """The fused forward for ``model`` when it is supported and ``enabled``, else None
    (logged once, and the runner uses transformers' forward with the attention hook)."""
    if not enabled:
        return None
    reason = unsupported_reason(model)
    if reason is not None:
        log.info("fused decoder layers off: %s; running transformers' layers", reason)
        return None
    return FusedLlamaForward(model, use_triton=use_triton)
