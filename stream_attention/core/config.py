"""``StreamAttentionConfig``: the knobs of the attention modules.

A plain dataclass rather than a pydantic model so that the kernel modules import with
nothing but torch and triton (the server's settings use pydantic-settings).
``from_env()`` reads ``STREAM_ATTENTION_<FIELD>`` variables; see ``.env.example``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from .. import envs

ENV_PREFIX = "STREAM_ATTENTION_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass
class StreamAttentionConfig:
    """Configuration of :class:`StreamAttention` and its long-context variants.

    Attributes:
        num_heads: query heads.
        head_dim: per-head dimension (16..256).
        num_kv_heads: key/value heads for GQA/MQA; ``None`` means ``num_heads``.
        tile_size_q, tile_size_k: preferred query/key tile sizes. On CUDA the kernel
            autotunes its tiles per GPU and shape; these are accepted (the seed's
            configs set them) and recorded in benchmark metadata.
        use_fp16: on CUDA, run the hidden-states path in fp16 when inputs are fp32.
        use_qkv_projections: build Q/K/V and output projections (hidden-states input).
        qkv_bias: bias on those projections.
        use_layer_norm: pre-attention LayerNorm on the hidden states.
        dropout: attention-probability dropout, applied in training mode only.
        enable_distributed: let ring/star attention use ``torch.distributed`` groups.
        max_sequence_length: longest sequence the module accepts.
        causal: default masking of ``forward`` when the caller does not say.
        backend: ``"auto"``, ``"triton"`` or ``"sdpa"`` (``STREAM_ATTENTION_BACKEND``
            overrides ``"auto"`` at call time).
        ring_attention_block_size: per-rank tokens above which the distributed engine
            prefills a prompt with ring attention (threshold = world size × this).
        ring_attention_overlap: overlap K/V transfers with compute.
        ring_attention_zigzag: zigzag sharding to balance causal work across ranks.
        star_attention_block_size: context tokens per rank in star attention.
        star_attention_anchor_size: anchor (first-block) tokens prepended in phase 1.
        star_attention_num_hosts: ranks taking part (0 = the whole world).
    """

    num_heads: int = 32
    head_dim: int = 128
    num_kv_heads: int | None = None
    tile_size_q: int = 128
    tile_size_k: int = 64
    use_fp16: bool = True
    use_qkv_projections: bool = True
    qkv_bias: bool = False
    use_layer_norm: bool = False
    dropout: float = 0.0
    enable_distributed: bool = False
    max_sequence_length: int = 131072
    causal: bool = True
    backend: str = "auto"
    ring_attention_block_size: int = 4096
    ring_attention_overlap: bool = True
    ring_attention_zigzag: bool = True
    star_attention_block_size: int = 4096
    star_attention_anchor_size: int = 4096
    star_attention_num_hosts: int = 0

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        problems = []
        if self.num_heads < 1:
            problems.append(f"num_heads={self.num_heads} must be >= 1")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if not 16 <= self.head_dim <= 256:
            problems.append(f"head_dim={self.head_dim} must be in 16..256")
        for name in ("tile_size_q", "tile_size_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                problems.append(f"{name}={value} must be a power of two >= 16")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} must be in [0, 1)")
        if self.backend not in ("auto", "triton", "sdpa"):
            problems.append(f"backend={self.backend!r} must be 'auto', 'triton' or 'sdpa'")
        if self.max_sequence_length < 1:
            problems.append(f"max_sequence_length={self.max_sequence_length} must be >= 1")
        if problems:
            raise ValueError("invalid StreamAttentionConfig: " + "; ".join(problems))

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_env(cls, prefix: str = ENV_PREFIX, **overrides: Any) -> StreamAttentionConfig:
        """Build a config from ``STREAM_ATTENTION_<FIELD>`` variables (then ``overrides``).

        Unparseable values raise ``ValueError`` naming the variable.
        """
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {
            name: _parse(prefix + name.upper(), raw, types[name])
            for name, raw in envs.family_values(types, prefix).items()
        }
        values.update(overrides)
        return cls(**values)


def _parse(var: str, raw: str, type_name: Any) -> Any:
    kind = str(type_name)
    text = raw.strip()
    try:
        if kind.startswith("bool"):
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(raw)
        if kind.startswith("int"):
            if "None" in kind and text.lower() in ("", "none"):
                return None
            return int(text)
        if kind.startswith("float"):
            return float(text)
        return text
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a valid {kind}") from None
