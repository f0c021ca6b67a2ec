"""Make ``attn_implementation="stream_attention"`` available to ``transformers`` models.

The package's own registration lives in ``stream_attention.integration.hf``; when that
module is importable it is used. Otherwise a minimal equivalent is registered here so
that training and evaluation of the default model never depend on its arrival: causal,
unmasked calls (training, scoring, chunked prefill) go to ``fused_attention`` and
anything with an explicit mask goes to transformers' SDPA path.
"""

from __future__ import annotations

import importlib
import logging

import torch

logger = logging.getLogger(__name__)

NAME = "stream_attention"
_REGISTRARS = ("register_stream_attention", "register", "register_attention")


def _fallback_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention callable: ``[B, H, T, D]`` in, ``[B, T, H, D]`` out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ..core.functional import fused_attention

    if attention_mask is not None or (dropout and module.training) or not getattr(module, "is_causal", True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # Causal is bottom-right aligned in the kernel, which is also right for decode
    # steps and chunked prefill against a longer cache.
    out = fused_attention(query, key, value, causal=True, softmax_scale=scaling, layout="bhtd")
    return out.transpose(1, 2), None


def _autocast_safe(fn):
    """Give q, k, v one dtype before ``fn``: under autocast the rotary embedding leaves
    q/k in fp32 while v is bf16, which SDPA casts silently and ``fused_attention`` rejects."""
    if getattr(fn, "_stream_attention_autocast_safe", False):
        return fn

    def wrapped(module, query, key, value, attention_mask, *args, **kwargs):
        dev = query.device.type
        if torch.is_autocast_enabled(dev):
            dtype = torch.get_autocast_dtype(dev)
            query, key, value = (t.to(dtype) for t in (query, key, value))
        return fn(module, query, key, value, attention_mask, *args, **kwargs)

    wrapped._stream_attention_autocast_safe = True
    wrapped.__wrapped__ = fn
    return wrapped


def ensure_registered() -> str:
    """Register ``"stream_attention"`` with transformers (idempotent); return whose function serves it.

    The package's ``stream_attention.integration.hf`` registration is preferred; either
    way the registered function is wrapped to be safe under ``torch.autocast``.
    """
    from transformers import AttentionInterface

    source = "stream_attention.models.hf_attention (fallback)"
    try:
        mod = importlib.import_module("stream_attention.integration.hf")
    except ImportError:
        mod = None
    if mod is not None:
        for fn_name in _REGISTRARS:
            fn = getattr(mod, fn_name, None)
            if callable(fn):
                fn()
                source = f"stream_attention.integration.hf.{fn_name}"
                break
    if NAME not in AttentionInterface._global_mapping:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        AttentionInterface.register(NAME, _fallback_forward)
        # Without a mask function transformers drops padding masks for unknown implementations.
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
        source = "stream_attention.models.hf_attention (fallback)"
        logger.info("registered the fallback %r attention (stream_attention.integration.hf not available)", NAME)
    AttentionInterface.register(NAME, _autocast_safe(AttentionInterface._global_mapping[NAME]))
    return source
