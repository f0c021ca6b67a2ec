"""Hugging Face transformers integration: the ``"stream_attention"`` attention implementation.

Importing this module registers an attention function and a mask function under the
name ``"stream_attention"`` in transformers' ``AttentionInterface`` and
``AttentionMaskInterface`` (:func:`register` does it again, idempotently). Any model
whose modeling code dispatches through ``ALL_ATTENTION_FUNCTIONS`` (Llama, Mistral,
Qwen2, Gemma, Phi, GPT-2, GPT-NeoX and most decoder LMs of transformers 5.x) then runs
every attention call through :func:`stream_attention.core.functional.fused_attention`::

    import stream_attention.integration.hf  # noqa: F401  (registers "stream_attention")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="stream_attention")
    model = AutoModelForCausalLM.from_config(config, attn_implementation="stream_attention")
    model.set_attn_implementation("stream_attention")        # on a loaded model

    # or, with up-front validation and a count of the attention modules served:
    from stream_attention.integration.hf import enable_stream_attention, replace_llama_attention
    n = enable_stream_attention(model)          # any supported architecture
    n = replace_llama_attention(model, cfg)     # the seed README's helper, same mechanism

What is served by the fused kernel (``[B, H, T, D]`` tensors are read in place through
``layout="bhtd"``; K/V are never repeated for GQA/MQA; forward and backward):

* prefill and cached decode, ``Tq != Tk`` aligned bottom-right (the last query is the
  newest cached key), the alignment every transformers dynamic cache produces;
* sliding windows: transformers keeps key ``j`` for query ``i`` when ``i - sw < j <= i``,
  i.e. ``window=(sliding_window - 1, 0)``;
* padding (left padding from batched generation, right padding in training): the mask
  function hands the kernel a ``[B, Tk]`` key-padding mask instead of a
  ``[B, 1, Tq, Tk]`` one, and skips it entirely (one host sync per forward, as SDPA's
  own mask does) when nothing is padded;
* everything transformers has to materialise (packed sequences, chunked attention,
  static caches, mask overlays, user-supplied 4D masks): the exact 4D mask that
  ``"sdpa"`` would get, as ``fused_attention(attn_mask=...)``;
* ``dropout`` (``dropout_p``), ``scaling`` (``softmax_scale``), ``is_causal`` /
  ``module.is_causal`` (non-causal attention for bidirectional models), and mixed
  q/k/v dtypes under ``torch.autocast`` (cast to the autocast dtype, as SDPA does).

Documented fallback (exact, counted in :func:`attention_stats` as ``"fallback:shape"``
and logged once): head dims outside 16..256, a value head dim different from the key
head dim, or float64 go to PyTorch SDPA.

Refused with :class:`UnsupportedModelError` (by :func:`enable_stream_attention`) or
``ValueError`` (at call time): attention logit soft-capping (Gemma 2), attention sinks
(gpt-oss), ALiBi / T5-style position biases, encoder-decoder models.

The backend is chosen per call by ``fused_attention(backend="auto")``: Triton on CUDA,
SDPA on CPU; ``STREAM_ATTENTION_BACKEND=triton|sdpa`` overrides it globally, and
``enable_stream_attention(model, backend=...)`` pins it per model.

Notes: ``from_config(config, attn_implementation=...)`` writes the implementation into
the ``config`` object it is given, so build a reference model from a copy. The mask
function reads on the host whether anything is padded (once per forward), so a
``torch.compile(fullgraph=True)`` graph breaks there, as it does on SDPA's mask.
"""

from __future__ import annotations

import inspect
import logging
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core import functional as _functional
from ..core.config import StreamAttentionConfig
from ..core.sdpa import sdpa_attention

try:
    from transformers import AttentionInterface, PreTrainedModel
    from transformers import masking_utils as _masking
    from transformers.integrations.sdpa_attention import sdpa_attention_forward as _hf_sdpa_attention_forward
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("stream_attention.integration.hf needs transformers: pip install 'stream-attention[hf]'") from exc

__all__ = [
    "ATTN_IMPLEMENTATION",
    "UnsupportedModelError",
    "register",
    "is_registered",
    "stream_attention_forward",
    "stream_attention_mask",
    "enable_stream_attention",
    "replace_llama_attention",
    "check_model_supported",
    "attention_stats",
    "reset_attention_stats",
    "cache_layers_kv",
    "dynamic_cache_from",
]

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "stream_attention"
MASK_INFO_ATTR = "_stream_attention_mask_info"

_STATS: Counter[str] = Counter()
_WARNED: set[str] = set()


class UnsupportedModelError(ValueError):
    """The model uses an attention feature the fused kernel cannot compute exactly."""


def attention_stats() -> dict[str, int]:
    """Counts of attention calls since the last reset, by route.

    ``"fused"``: calls that went to ``fused_attention``; ``"fallback:<reason>"``: calls
    sent to PyTorch SDPA instead. ``fused_attention`` itself runs its SDPA path where
    Triton cannot run (CPU under ``backend="auto"``): count kernel launches for that.
    """
    return dict(_STATS)


def reset_attention_stats() -> None:
    """Zero the counters of :func:`attention_stats`."""
    _STATS.clear()


def _fallback(reason: str, detail: str) -> None:
    _STATS[f"fallback:{reason}"] += 1
    if reason not in _WARNED:
        _WARNED.add(reason)
        logger.warning("stream_attention: %s; this call (and similar ones) runs PyTorch SDPA instead", detail)


# --------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MaskInfo:
    """What the mask function learned once per forward, read by every layer's call.

    ``window_left`` counts keys strictly before the query (``None`` = unbounded).
    """

    causal: bool
    window_left: int | None
    has_padding: bool


def _matches_pattern(
    mask_function: Callable,
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int,
    kv_offset: int,
    window_left: int | None,
    device: torch.device,
) -> bool:
    """Whether ``mask_function`` is exactly causal (optionally windowed) on this grid.

    transformers composes mask functions out of closures (sliding windows, chunks,
    packed sequences), so identity cannot tell them apart; evaluating the index-based
    function once per forward on the real grid can, and costs one ``[B, Tq, Tk]`` bool
    pass, which SDPA's own mask would cost on every padded call anyway.
    """
    b = torch.arange(batch_size, device=device)[:, None, None, None]
    h = torch.zeros(1, dtype=torch.long, device=device)[None, :, None, None]
    q = (torch.arange(q_length, device=device) + q_offset)[None, None, :, None]
    kv = (torch.arange(kv_length, device=device) + kv_offset)[None, None, None, :]
    expected = kv <= q
    if window_left is not None:
        expected = expected & (kv >= q - window_left)
    try:
        got = mask_function(b, h, q, kv)
        return bool((torch.as_tensor(got, device=device) == expected).all())
    except Exception:  # a function that only works under vmap: not recognisable here
        return False


def _has_padding(keep: torch.Tensor) -> bool:
    """Whether a ``[B, Tk]`` keep-mask drops any key (one host sync)."""
    return not bool(keep.all())


def stream_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable = _masking.causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> torch.Tensor:
    """The ``AttentionMaskInterface`` entry for ``"stream_attention"``.

    For the patterns the kernel computes natively (causal or bidirectional, optionally a
    causal sliding window, with bottom-right aligned offsets) it returns the ``[B, Tk]``
    boolean keep-mask of the keys this call sees, carrying a :class:`_MaskInfo` as the
    ``_stream_attention_mask_info`` attribute; no ``[B, 1, Tq, Tk]`` mask is built.
    Anything else (packed sequences, chunked attention, overlays, static caches) gets
    exactly the 4D boolean mask transformers builds for ``"sdpa"``.
    """
    device = torch.device(device)
    aligned = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset + q_length == kv_offset + kv_length
    pattern: tuple[bool, int | None] | None = None
    if mask_function is _masking.bidirectional_mask_function:
        pattern = (False, None)
    elif aligned and mask_function is _masking.causal_mask_function:
        pattern = (True, None)
    elif aligned and not use_vmap:
        window_left = local_size - 1 if local_size is not None else None
        if _matches_pattern(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, window_left, device):
            pattern = (True, window_left)

    if pattern is None:
        kwargs.pop("allow_is_causal_skip", None)
        kwargs.pop("allow_is_bidirectional_skip", None)
        return _masking.sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            local_size=local_size,
            allow_is_causal_skip=False,
            allow_is_bidirectional_skip=False,
            use_vmap=use_vmap,
            device=device,
            **kwargs,
        )

    if attention_mask is None:
        keep = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
        has_padding = False
    else:
        padded = _masking.prepare_padding_mask(attention_mask.to(device=device, dtype=torch.bool), kv_length, kv_offset)
        keep = padded[:, kv_offset : kv_offset + kv_length].expand(batch_size, kv_length)
        has_padding = _has_padding(keep)
    causal, window_left = pattern
    setattr(keep, MASK_INFO_ATTR, _MaskInfo(causal, window_left, has_padding))
    return keep


# --------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------


def _backend_of(module: nn.Module) -> str:
    return getattr(module, "_stream_attention_backend", "auto")


def _reject_unsupported(module: nn.Module, softcap: float | None, kwargs: dict[str, Any]) -> None:
    if softcap is not None:
        raise ValueError(
            f"stream_attention: {type(module).__name__} uses attention logit soft-capping (softcap={softcap}), "
            "which the fused kernel does not compute; use attn_implementation='eager'"
        )
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError(
            f"stream_attention: {type(module).__name__} uses attention sinks, which the fused kernel does not "
            "compute; use attn_implementation='eager'"
        )
    if kwargs.get("position_bias") is not None:
        raise ValueError(
            f"stream_attention: {type(module).__name__} adds a position bias to the attention logits, which the "
            "fused kernel does not compute; use attn_implementation='sdpa'"
        )


def _shape_supported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str | None:
    d = query.shape[-1]
    if not _functional.MIN_HEAD_DIM <= d <= _functional.MAX_HEAD_DIM:
        return f"head_dim {d} is outside {_functional.MIN_HEAD_DIM}..{_functional.MAX_HEAD_DIM}"
    if value.shape[-1] != d or key.shape[-1] != d:
        return f"q/k/v head dims differ ({d}, {key.shape[-1]}, {value.shape[-1]})"
    if query.dtype not in _functional.SUPPORTED_DTYPES:
        return f"dtype {query.dtype} is not supported"
    return None


def _common_dtype(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cast q, k, v the way SDPA does under ``torch.autocast``.

    Rotary embeddings upcast q and k to fp32 under autocast while v stays in the
    autocast dtype; SDPA is on autocast's low-precision list and casts all three, and the
    kernel needs one dtype. Outside autocast mixed dtypes are an error, as for SDPA.
    """
    if query.dtype == key.dtype == value.dtype:
        return query, key, value
    device = query.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return query.to(dtype), key.to(dtype), value.to(dtype)
    raise ValueError(f"stream_attention: q, k, v dtypes differ ({query.dtype}, {key.dtype}, {value.dtype})")


def _fused(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    causal: bool,
    scale: float | None,
    window: tuple[int, int] | None,
    backend: str,
    attn_mask: torch.Tensor | None,
    dropout: float,
) -> torch.Tensor:
    """``fused_attention`` on ``[B, H, T, D]`` views; returns ``[B, H, Tq, D]``."""
    _STATS["fused"] += 1
    return _functional.fused_attention(
        query,
        key,
        value,
        causal=causal,
        softmax_scale=scale,
        backend=backend,
        layout="bhtd",
        window=window,
        attn_mask=attn_mask,
        dropout_p=dropout,
    )


def _sdpa_bhtd(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    causal: bool,
    scale: float | None,
    window: tuple[int, int] | None,
    attn_mask: torch.Tensor | None,
    dropout: float,
) -> torch.Tensor:
    """The SDPA twin (same bottom-right/window semantics as the kernel) on ``[B, H, T, D]``."""
    out = sdpa_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        causal=causal,
        softmax_scale=scale,
        window=window,
        attn_mask=attn_mask,
        dropout_p=dropout,
    )
    return out.transpose(1, 2)


def stream_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` entry for ``"stream_attention"``.

    Args:
        module: the calling attention module (``is_causal`` and an optional
            ``_stream_attention_backend`` are read from it).
        query: ``[B, Hq, Tq, D]``; key, value: ``[B, Hkv, Tk, D]``, ``Hq % Hkv == 0``.
        attention_mask: ``None``, the ``[B, Tk]`` keep-mask of :func:`stream_attention_mask`,
            a ``[B, Tk]`` key-padding mask (1 = keep), or a 4D bool/additive mask
            broadcastable to ``[B, Hq, Tq, Tk]`` (which already encodes causality, as for SDPA).
        dropout: attention-probability dropout (transformers passes 0 in eval mode).
        scaling: softmax scale, ``D ** -0.5`` when ``None``.
        is_causal: overrides ``module.is_causal`` when not ``None``.
        sliding_window: the layer's window in transformers' convention (key ``j`` visible
            to query ``i`` iff ``i - sliding_window < j <= i``).
        softcap: must be ``None`` (soft-capping is refused, not approximated).

    Returns:
        ``(attn_output [B, Tq, Hq, D] contiguous, None)``: attention weights are never
        materialised.
    """
    _reject_unsupported(module, softcap, kwargs)
    if kwargs.get("output_attentions") and "output_attentions" not in _WARNED:
        _WARNED.add("output_attentions")
        logger.warning("stream_attention does not return attention weights (output_attentions=True is ignored)")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"stream_attention: unsupported attention_mask type {type(attention_mask).__name__}")

    query, key, value = _common_dtype(query, key, value)
    backend = _backend_of(module)
    shape_problem = _shape_supported(query, key, value)
    dropout = float(dropout or 0.0)

    if attention_mask is not None and attention_mask.dim() == 4:
        # A materialised mask already holds causality and windows, and SDPA reads it alone.
        if shape_problem is not None:
            _fallback("shape", shape_problem)
            return _hf_sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal
            )
        out = _fused(
            query,
            key,
            value,
            causal=False,
            scale=scaling,
            window=None,
            backend=backend,
            attn_mask=attention_mask,
            dropout=dropout,
        )
        return out.transpose(1, 2).contiguous(), None

    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    window_left: int | None = sliding_window - 1 if sliding_window else None
    batch, _, q_len, _ = query.shape
    k_len = key.shape[2]
    pad_mask = None
    if attention_mask is None:
        if causal and 1 < q_len < k_len:
            # SDPA's is_causal is top-left aligned and transformers crops the keys to the
            # queries for it (empty static-cache prefill); reproduce that exactly.
            key, value = key[:, :, :q_len], value[:, :, :q_len]
    elif attention_mask.dim() == 2:
        keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask.bool()
        if tuple(keep.shape) != (batch, k_len):
            raise ValueError(
                f"stream_attention: 2D attention_mask{tuple(keep.shape)} does not match batch {batch} x keys {k_len}"
            )
        info: _MaskInfo | None = getattr(attention_mask, MASK_INFO_ATTR, None)
        if info is not None:
            # transformers' SDPA path obeys the mask, not the module flags: so do we.
            causal, window_left = info.causal, info.window_left
            pad_mask = keep if info.has_padding else None
        else:
            pad_mask = keep if _has_padding(keep) else None
    else:
        raise ValueError(f"stream_attention: attention_mask must be 2D or 4D, got {tuple(attention_mask.shape)}")
    if window_left is not None and not causal:
        raise ValueError(
            "stream_attention: a sliding window on non-causal attention needs a materialised mask "
            "(transformers' bidirectional windows are symmetric and inclusive)"
        )
    window = (window_left, 0) if window_left is not None else None

    if shape_problem is not None:
        _fallback("shape", shape_problem)
        out = _sdpa_bhtd(
            query,
            key,
            value,
            causal=causal,
            scale=scaling,
            window=window,
            attn_mask=pad_mask[:, None, None, :] if pad_mask is not None else None,
            dropout=dropout,
        )
    else:
        out = _fused(
            query,
            key,
            value,
            causal=causal,
            scale=scaling,
            window=window,
            backend=backend,
            attn_mask=pad_mask,
            dropout=dropout,
        )
    return out.transpose(1, 2).contiguous(), None


# --------------------------------------------------------------------------------------
# Registration and model helpers
# --------------------------------------------------------------------------------------


def register() -> None:
    """Register ``"stream_attention"`` with transformers (idempotent; done on import)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, stream_attention_forward)
    _masking.AttentionMaskInterface.register(ATTN_IMPLEMENTATION, stream_attention_mask)


def is_registered() -> bool:
    """Whether both the attention and the mask function are registered under our name."""
    # Other code may wrap our function (functools.wraps-style ``__wrapped__``) and re-register it.
    fn = AttentionInterface._global_mapping.get(ATTN_IMPLEMENTATION)
    while fn is not None and fn is not stream_attention_forward and hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return (
        fn is stream_attention_forward
        and _masking.AttentionMaskInterface._global_mapping.get(ATTN_IMPLEMENTATION) is stream_attention_mask
    )


def _head_dim(config: Any) -> int | None:
    head_dim = getattr(config, "head_dim", None)
    if head_dim:
        return int(head_dim)
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if hidden and heads:
        return int(hidden) // int(heads)
    return None


_SINK_MODEL_TYPES = {"gpt_oss"}
_ALIBI_MODEL_TYPES = {"bloom", "mpt", "baichuan", "jais"}


def check_model_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless every attention of ``model`` can be served exactly."""
    if not isinstance(model, PreTrainedModel):
        raise UnsupportedModelError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} is an encoder-decoder model; stream_attention serves decoder-only LMs"
        )
    if not type(model)._can_set_attn_implementation():
        raise UnsupportedModelError(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface"
        )
    if not (getattr(model, "_supports_sdpa", False) or getattr(model, "_supports_flash_attn", False)):
        # Models opt out of both fused backends when their attention adds something to the
        # scores (soft-capping, biases) or needs the weights: the same holds for ours.
        raise UnsupportedModelError(
            f"{type(model).__name__} supports neither sdpa nor flash attention, so its attention is not plain softmax"
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for cfg in {id(c): c for c in (config, text)}.values():
        model_type = getattr(cfg, "model_type", "")
        if getattr(cfg, "attn_logit_softcapping", None) is not None:
            raise UnsupportedModelError(
                f"{model_type}: attention logit soft-capping ({cfg.attn_logit_softcapping}) is not supported"
            )
        if model_type in _SINK_MODEL_TYPES:
            raise UnsupportedModelError(f"{model_type}: attention sinks are not supported")
        if model_type in _ALIBI_MODEL_TYPES or getattr(cfg, "alibi", False):
            raise UnsupportedModelError(f"{model_type}: ALiBi position biases are not supported")
        head_dim = _head_dim(cfg)
        if head_dim is not None and not _functional.MIN_HEAD_DIM <= head_dim <= _functional.MAX_HEAD_DIM:
            raise UnsupportedModelError(
                f"{model_type}: head_dim {head_dim} is outside {_functional.MIN_HEAD_DIM}..{_functional.MAX_HEAD_DIM}"
            )
    for name, _ in model.named_parameters():
        if name.endswith(".sinks"):
            raise UnsupportedModelError(f"{type(model).__name__}: attention sinks ({name}) are not supported")


_SOURCE_USES_INTERFACE: dict[str, bool] = {}


def _dispatches_through_interface(module: nn.Module) -> bool:
    name = type(module).__module__
    if name not in _SOURCE_USES_INTERFACE:
        try:
            source = inspect.getsource(sys.modules[name])
        except (KeyError, OSError, TypeError):
            source = ""
        _SOURCE_USES_INTERFACE[name] = "ALL_ATTENTION_FUNCTIONS.get_interface(" in source
    return _SOURCE_USES_INTERFACE[name]


def _served_attention_modules(model: nn.Module) -> list[nn.Module]:
    """Attention modules that will call our function: they read the shared config's implementation."""
    served = []
    for module in model.modules():
        if isinstance(module, PreTrainedModel) or not re.search("Attention", type(module).__name__):
            continue
        config = getattr(module, "config", None)
        if config is None or getattr(config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            continue
        if hasattr(module, "is_causal") and _dispatches_through_interface(module):
            served.append(module)
    return served


def enable_stream_attention(model: nn.Module, backend: str = "auto") -> int:
    """Switch ``model`` (and its sub-models) to the ``"stream_attention"`` implementation.

    Validates the model first (:func:`check_model_supported`), so features the kernel
    cannot compute exactly raise :class:`UnsupportedModelError` instead of producing
    wrong outputs. ``backend`` (``"auto"``, ``"triton"`` or ``"sdpa"``) is pinned on this
    model's attention modules; ``"auto"`` defers to ``STREAM_ATTENTION_BACKEND``.

    Returns:
        The number of attention modules now served by ``fused_attention``.
    """
    if backend not in ("auto", "triton", "sdpa"):
        raise ValueError(f"backend={backend!r}: expected 'auto', 'triton' or 'sdpa'")
    check_model_supported(model)
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    served = _served_attention_modules(model)
    if not served:
        raise UnsupportedModelError(f"{type(model).__name__}: no attention module dispatches through the registry")
    for module in served:
        module._stream_attention_backend = backend
    return len(served)


def replace_llama_attention(model: nn.Module, cfg: StreamAttentionConfig | None = None) -> int:
    """The seed README's helper: serve ``model``'s attention with StreamAttention.

    A thin wrapper over :func:`enable_stream_attention` (the attention registry, no
    module surgery; any supported architecture works, not only Llama). ``cfg``, when
    given, must agree with the model's head count and head size; its ``backend`` is
    pinned on the model.

    Returns:
        The number of attention modules now served by the fused kernel.
    """
    backend = "auto"
    if cfg is not None:
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads, head_dim = getattr(text, "num_attention_heads", None), _head_dim(text)
        if heads is not None and cfg.num_heads != heads:
            raise ValueError(f"cfg.num_heads={cfg.num_heads} but the model has {heads} attention heads")
        if head_dim is not None and cfg.head_dim != head_dim:
            raise ValueError(f"cfg.head_dim={cfg.head_dim} but the model's head_dim is {head_dim}")
        backend = cfg.backend
    return enable_stream_attention(model, backend=backend)


def cache_layers_kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(k, v)`` ``[B, Hkv, T, D]`` of a transformers cache (4.x and 5.x layouts)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def dynamic_cache_from(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A transformers ``DynamicCache`` holding per-layer ``(k, v)`` ``[B, Hkv, T, D]`` (e.g. a
    compressed copy of another cache's tensors)."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k.contiguous(), v.contiguous(), i)
    return cache


register()
