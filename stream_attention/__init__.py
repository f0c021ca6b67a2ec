"""StreamAttention: fused online-softmax attention in Triton, and an inference server on it.

Public API::

    from stream_attention import StreamAttention, StreamAttentionConfig
    from stream_attention import FusedOnlineAttention, FlashAttentionV3
    from stream_attention import fused_attention, fused_attention_varlen
"""

from .core.attention import StreamAttention
from .core.config import StreamAttentionConfig
from .core.flash_baseline import FlashAttentionV3
from .core.functional import fused_attention, fused_attention_varlen
from .core.fused_online_attention import FusedOnlineAttention

__version__ = "0.1.0"

__all__ = [
    "StreamAttention",
    "StreamAttentionConfig",
    "FusedOnlineAttention",
    "FlashAttentionV3",
    "fused_attention",
    "fused_attention_varlen",
    "__version__",
]
