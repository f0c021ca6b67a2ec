"""``FusedOnlineAttention``: the low-level module over ``fused_attention``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .benchmarking import attention_bytes, attention_flops, time_ms
from .functional import fused_attention


class _DeviceTracked(nn.Module):
    """Base of the attention modules on ``[B, T, H, D]`` tensors.

    Keeps an empty buffer so ``.device`` follows ``.to()``/``.cuda()`` moves, and gives
    every module the same ``benchmark()``. Subclasses set ``num_heads``, ``num_kv_heads``
    and ``head_dim``.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_device_probe", torch.empty(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    def _benchmark_metadata(self) -> dict[str, Any]:
        return {}

    def benchmark(
        self,
        seq_len: int,
        batch_size: int = 1,
        warmup: int = 10,
        iterations: int = 100,
        causal: bool = True,
        dtype: torch.dtype | None = None,
    ) -> dict[str, Any]:
        """Time the forward on random inputs; returns latency, TFLOP/s and GB/s."""
        return benchmark_attention(
            lambda q, k, v: self.forward(q, k, v, causal=causal),
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            seq_len=seq_len,
            batch_size=batch_size,
            warmup=warmup,
            iterations=iterations,
            causal=causal,
            device=self.device,
            dtype=dtype,
            extra=self._benchmark_metadata(),
        )


class FusedOnlineAttention(_DeviceTracked):
    """Fused online-softmax attention on ``[batch, seq, heads, head_dim]`` tensors.

    Runs the Triton kernel where it can (CUDA, or CPU under ``TRITON_INTERPRET=1``
    with ``backend="triton"``), PyTorch SDPA otherwise.

    Args:
        num_heads: query heads (checked against the inputs).
        head_dim: per-head dimension.
        tile_size_q, tile_size_k: preferred tiles (see ``StreamAttentionConfig``).
        dropout: attention dropout in training mode.
        softmax_scale: defaults to ``head_dim ** -0.5``.
        backend: ``"auto"``, ``"triton"`` or ``"sdpa"``.
        num_kv_heads: key/value heads for GQA (default ``num_heads``).
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        tile_size_q: int = 128,
        tile_size_k: int = 64,
        dropout: float = 0.0,
        softmax_scale: float | None = None,
        backend: str = "auto",
        num_kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads or num_heads
        self.tile_size_q = tile_size_q
        self.tile_size_k = tile_size_k
        self.dropout = dropout
        self.softmax_scale = softmax_scale
        self.backend = backend

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        causal: bool = True,
        return_lse: bool = False,
        attention_mask: torch.Tensor | None = None,
        window: tuple[int, int] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend ``query [B, Tq, H, D]`` over ``key, value [B, Tk, Hkv, D]``.

        ``attention_mask``: optional key-padding mask ``[B, Tk]`` (True/1 = attend) or a
        boolean/additive mask broadcastable to ``[B, H, Tq, Tk]``.
        Returns ``[B, Tq, H, D]`` (and the fp32 LSE ``[B, H, Tq]`` when ``return_lse``).
        """
        if query.dim() == 4 and query.shape[2] != self.num_heads:
            raise ValueError(f"expected {self.num_heads} query heads, got query{tuple(query.shape)}")
        return fused_attention(
            query,
            key,
            value,
            causal=causal,
            softmax_scale=self.softmax_scale,
            return_lse=return_lse,
            backend=self.backend,
            window=window,
            **_mask_and_dropout_kwargs(attention_mask, self.dropout if self.training else 0.0, key),
        )


def _mask_and_dropout_kwargs(attention_mask: torch.Tensor | None, dropout_p: float, key: torch.Tensor) -> dict:
    """Forward masks/dropout to ``fused_attention`` only when used, so the plain call stays minimal."""
    kwargs: dict[str, Any] = {}
    if attention_mask is not None:
        kwargs["attn_mask"] = attention_mask
    if dropout_p > 0.0:
        kwargs["dropout_p"] = dropout_p
    return kwargs


def default_dtype_for(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def benchmark_attention(
    fn,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    seq_len: int,
    batch_size: int,
    warmup: int,
    iterations: int,
    causal: bool,
    device: torch.device,
    dtype: torch.dtype | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Shared body of the modules' ``benchmark()``: random inputs, median time, rates."""
    dtype = dtype or default_dtype_for(device)
    q = torch.randn(batch_size, seq_len, num_heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch_size, seq_len, num_kv_heads, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    with torch.no_grad():
        ms = time_ms(lambda: fn(q, k, v), device, warmup=warmup, iterations=iterations)
    flops = attention_flops(batch_size, num_heads, seq_len, seq_len, head_dim, causal)
    nbytes = attention_bytes(batch_size, num_heads, num_kv_heads, seq_len, seq_len, head_dim, q.element_size())
    result = {
        "seq_len": seq_len,
        "batch_size": batch_size,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "causal": causal,
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "time_ms": ms,
        "tflops": flops / (ms * 1e-3) / 1e12,
        "bandwidth_gb_s": nbytes / (ms * 1e-3) / 1e9,
    }
    result.update(extra or {})
    return result
