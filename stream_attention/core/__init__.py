"""Attention modules: the fused kernel's module wrappers, the SDPA baseline, config,
and the long-context variants on ``torch.distributed``."""

from .attention import StreamAttention
from .config import StreamAttentionConfig
from .flash_baseline import FlashAttentionV3
from .functional import fused_attention, fused_attention_fp8, fused_attention_varlen
from .fused_online_attention import FusedOnlineAttention
from .ring_attention import RingAttention, ring_attention
from .star_attention import StarAttention, star_attention

__all__ = [
    "StreamAttention",
    "StreamAttentionConfig",
    "FusedOnlineAttention",
    "FlashAttentionV3",
    "fused_attention",
    "fused_attention_varlen",
    "fused_attention_fp8",
    "RingAttention",
    "ring_attention",
    "StarAttention",
    "star_attention",
]
