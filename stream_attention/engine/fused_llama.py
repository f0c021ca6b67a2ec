"""The engine's own forward pass for Llama-family models (Llama, Mistral, Qwen2, Qwen3;
sliding windows and Qwen3's per-head q/k norms included).

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

Attention goes through :func:`.attention.paged_attention_forward`, the same hook the
transformers path uses, so quantized pages, eviction scoring and the torch fallback all
apply unchanged. Rotary cos/sin come from the model's own ``rotary_emb`` (every RoPE
scaling variant transformers implements), once per step.

Any model this module does not recognise runs through transformers with the hook.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..kernels import layer_ops
from . import attention as attn_hook
from .attention_spec import LayerAttention, layer_attention

log = logging.getLogger("stream_attention.engine")

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def unsupported_reason(model: Any) -> str | None:
    """Why ``model`` cannot run through :class:`FusedLlamaForward` (None when it can)."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} (only SiLU-gated MLPs are fused)"
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
        head_norms = [getattr(attn, n, None) for n in ("q_norm", "k_norm")]
        if any(m is not None for m in head_norms) and not all(
                m is not None and hasattr(m, "variance_epsilon") and getattr(m, "weight", None) is not None
                and tuple(m.weight.shape) == (attn.head_dim,) for m in head_norms):
            return "q/k norms that are not per-head Llama-style RMSNorms"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not hasattr(norm, "variance_epsilon") or getattr(norm, "weight", None) is None:
                return f"{type(norm).__name__} is not a Llama-style RMSNorm"
    if not hasattr(base.norm, "variance_epsilon"):
        return f"{type(base.norm).__name__} is not a Llama-style RMSNorm"
    return None


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


class _Layer:
    def __init__(self, layer: nn.Module, spec: LayerAttention) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.attn = attn  # the hook reads ``layer_idx``
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.spec = spec  # sliding window (Mistral, Qwen2's windowed layers) and soft-cap
        self.qkv_w, self.qkv_b = _fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        self.q_size = attn.q_proj.out_features
        self.kv_size = attn.k_proj.out_features
        self.o_w, self.o_b = attn.o_proj.weight, attn.o_proj.bias
        self.gate_up_w, self.gate_up_b = _fuse_linears([mlp.gate_proj, mlp.up_proj])
        self.down_w, self.down_b = mlp.down_proj.weight, mlp.down_proj.bias
        self.norm1_w, self.norm1_eps = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
        self.norm2_w, self.norm2_eps = layer.post_attention_layernorm.weight, \
            layer.post_attention_layernorm.variance_epsilon
        # Qwen3: RMSNorm over each head of q and k, before RoPE.
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.q_norm = (q_norm.weight, q_norm.variance_epsilon) if q_norm is not None else None
        self.k_norm = (k_norm.weight, k_norm.variance_epsilon) if k_norm is not None else None


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
        base = model.model
        self.embed = base.embed_tokens
        self.rotary_emb = base.rotary_emb
        specs = layer_attention(model.config)
        self.layers = [_Layer(layer, spec) for layer, spec in
                       zip(base.layers[: model.config.num_hidden_layers], specs, strict=True)]
        self.norm_w, self.norm_eps = base.norm.weight, base.norm.variance_epsilon
        self.lm_head = model.lm_head
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

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        ctx = attn_hook.current_context()
        if ctx is None:
            raise RuntimeError("FusedLlamaForward runs inside an engine step (attention_context)")
        linear = nn.functional.linear
        tokens = input_ids.shape[0]
        residual = self.embed(input_ids)
        cos, sin = self.rotary_emb(residual[None], positions[None])
        cos, sin = cos[0], sin[0]
        h: torch.Tensor | None = None
        for layer in self.layers:
            if h is None:
                x = self._rms_norm(residual, layer.norm1_w, layer.norm1_eps)
            else:
                x = self._add_rms_norm(h, residual, layer.norm1_w, layer.norm1_eps)
            qkv = linear(x, layer.qkv_w, layer.qkv_b)
            d, nq, nkv = layer.head_dim, layer.q_size, layer.kv_size
            q = qkv[:, :nq].view(tokens, nq // d, d)
            k = qkv[:, nq:nq + nkv].view(tokens, nkv // d, d)
            v = qkv[:, nq + nkv:].view(tokens, nkv // d, d)
            if layer.q_norm is not None:
                q = self._rms_norm(q.reshape(-1, d), *layer.q_norm).view(tokens, nq // d, d)
                k = self._rms_norm(k.reshape(-1, d), *layer.k_norm).view(tokens, nkv // d, d)
            k_pages, v_pages = ctx.kv_caches[layer.attn.layer_idx]
            if isinstance(k_pages, torch.Tensor) and ctx.kv_scores is None:
                # Plain pages: the RoPE kernel also stores k and v into them.
                q, k = self._rotary(q, k, cos, sin, v=v, k_pages=k_pages, v_pages=v_pages,
                                    slot_mapping=ctx.slot_mapping)
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
            x = self._add_rms_norm(h, residual, layer.norm2_w, layer.norm2_eps)
            h = linear(self._silu_mul(linear(x, layer.gate_up_w, layer.gate_up_b)), layer.down_w, layer.down_b)
        if h is None:  # a model with no layers
            h = torch.zeros_like(residual)
        if isinstance(logits_to_keep, torch.Tensor):
            h, residual = h[logits_to_keep], residual[logits_to_keep]
        elif logits_to_keep:
            h, residual = h[-logits_to_keep:], residual[-logits_to_keep:]
        x = self._add_rms_norm(h.contiguous(), residual.contiguous(), self.norm_w, self.norm_eps)
        return self.lm_head(x)


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
