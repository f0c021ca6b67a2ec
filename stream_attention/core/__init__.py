"""Attention modules: the fused kernel's module wrappers, the SDPA baseline, config."""

from .attention import StreamAttention
from .config import StreamAttentionConfig
from .flash_baseline import FlashAttentionV3
from .functional import fused_attention
from .fused_online_attention import FusedOnlineAttention

__all__ = [
    "StreamAttention",
    "StreamAttentionConfig",
    "FusedOnlineAttention",
    "FlashAttentionV3",
    "fused_attention",
]
