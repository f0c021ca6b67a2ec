"""``StreamAttention``: the drop-in transformer attention block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import StreamAttentionConfig
from .fused_online_attention import FusedOnlineAttention

KVCache = tuple[torch.Tensor, torch.Tensor]


class StreamAttention(nn.Module):
    """Multi-head (GQA-capable) attention backed by the fused online-softmax kernel.

    Two calling conventions:

    * ``attn(hidden_states)`` with ``hidden_states [B, T, H*D]`` (needs
      ``use_qkv_projections=True``): projects Q/K/V, attends, projects back, returns
      ``[B, T, H*D]``; with ``use_cache=True`` returns ``(output, (k, v))`` where
      ``k, v [B, T_past + T, Hkv, D]`` can be passed back as ``past_key_value``.
    * ``attn(query, key, value)`` with ``[B, T, H, D]`` tensors: returns ``[B, Tq, H, D]``.

    Weights are kept in their dtype; a 16-bit input on a module with fp32 weights (the
    seed's ``StreamAttention(cfg).cuda()`` then fp16 inputs) is projected with the
    weights cast to the input dtype.
    """

    def __init__(self, config: StreamAttentionConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        kv_hidden = config.num_kv_heads * config.head_dim
        self.attention = FusedOnlineAttention(
            num_heads=config.num_heads,
            head_dim=config.head_dim,
            tile_size_q=config.tile_size_q,
            tile_size_k=config.tile_size_k,
            dropout=config.dropout,
            backend=config.backend,
            num_kv_heads=config.num_kv_heads,
        )
        self.norm = nn.LayerNorm(hidden) if config.use_layer_norm else None
        if config.use_qkv_projections:
            self.qkv_proj = nn.Linear(hidden, hidden + 2 * kv_hidden, bias=config.qkv_bias)
            self.out_proj = nn.Linear(hidden, hidden, bias=config.qkv_bias)
        else:
            self.qkv_proj = None
            self.out_proj = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        past_key_value: KVCache | None = None,
        use_cache: bool = False,
        causal: bool | None = None,
        window: tuple[int, int] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
        """Attend; see the class docstring for the two conventions.

        ``attention_mask``: key-padding mask ``[B, Tk]`` (True/1 = attend) or a mask
        broadcastable to ``[B, H, Tq, Tk]``. ``causal`` defaults to ``config.causal``.
        """
        causal = self.config.causal if causal is None else causal
        if key is not None or value is not None:
            if key is None or value is None:
                raise ValueError("pass both key and value, or neither (hidden-states mode)")
            if past_key_value is not None:
                key = torch.cat([past_key_value[0], key], dim=1)
                value = torch.cat([past_key_value[1], value], dim=1)
            self._check_length(key.shape[1])
            out = self.attention(hidden_states, key, value, causal=causal, attention_mask=attention_mask, window=window)
            return (out, (key, value)) if use_cache else out

        x = hidden_states
        if self.qkv_proj is None:
            raise ValueError("hidden-states input needs use_qkv_projections=True; pass (query, key, value) instead")
        if x.dim() != 3 or x.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"hidden_states must be [batch, seq, {self.config.hidden_size}], got hidden_states{tuple(x.shape)}"
            )
        if self.norm is not None:
            x = F.layer_norm(x, self.norm.normalized_shape, *self._params_as(x, self.norm))
        batch, seqlen, _ = x.shape
        cfg = self.config
        qkv = F.linear(x, *self._params_as(x, self.qkv_proj))
        q, k, v = qkv.split([cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim], -1)
        q = q.view(batch, seqlen, cfg.num_heads, cfg.head_dim)
        k = k.view(batch, seqlen, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(batch, seqlen, cfg.num_kv_heads, cfg.head_dim)
        if past_key_value is not None:
            k = torch.cat([past_key_value[0].to(k.dtype), k], dim=1)
            v = torch.cat([past_key_value[1].to(v.dtype), v], dim=1)
        self._check_length(k.shape[1])
        attn = self.attention(q, k, v, causal=causal, attention_mask=attention_mask, window=window)
        out = F.linear(attn.reshape(batch, seqlen, cfg.hidden_size), *self._params_as(x, self.out_proj))
        return (out, (k, v)) if use_cache else out

    def _check_length(self, total: int) -> None:
        if total > self.config.max_sequence_length:
            raise ValueError(f"sequence length {total} exceeds max_sequence_length={self.config.max_sequence_length}")

    @staticmethod
    def _params_as(x: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = layer.weight, layer.bias
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
            bias = bias.to(x.dtype) if bias is not None else None
        return weight, bias
