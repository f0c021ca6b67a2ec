"""``FlashAttentionV3``: the seed's baseline name for PyTorch SDPA.

Despite the name this is *not* FlashAttention-3: it is
``torch.nn.functional.scaled_dot_product_attention`` pinned to one SDPA backend
(``"flash"`` = FlashAttention-2 kernels shipped with PyTorch, ``"cudnn"``,
``"efficient"``, ``"math"``), or PyTorch's own choice with ``sdpa_backend=None``.
The name is kept so that code written against the seed keeps working; every
benchmark row names the SDPA backend it actually measured.
"""

from __future__ import annotations

from typing import Any

import torch

from .fused_online_attention import _DeviceTracked
from .sdpa import sdpa_attention


def available_sdpa_backends(device: torch.device) -> list[str]:
    """SDPA backends that can run on ``device`` in this PyTorch build."""
    if device.type != "cuda":
        return ["math"]
    names = []
    if torch.backends.cuda.flash_sdp_enabled():
        names.append("flash")
    if hasattr(torch.backends.cuda, "cudnn_sdp_enabled") and torch.backends.cuda.cudnn_sdp_enabled():
        names.append("cudnn")
    if torch.backends.cuda.mem_efficient_sdp_enabled():
        names.append("efficient")
    return names


class FlashAttentionV3(_DeviceTracked):
    """PyTorch SDPA baseline on ``[batch, seq, heads, head_dim]`` tensors.

    Args:
        num_heads, head_dim: shape of the heads (``num_kv_heads`` for GQA).
        sdpa_backend: ``"flash"`` (default on CUDA), ``"cudnn"``, ``"efficient"``,
            ``"math"``, or ``None`` to let PyTorch choose. On CPU PyTorch always chooses.
    """

    def __init__(
        self,
        num_heads: int = 8,
        head_dim: int = 64,
        sdpa_backend: str | None = "flash",
        num_kv_heads: int | None = None,
        softmax_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads or num_heads
        self.sdpa_backend = sdpa_backend
        self.softmax_scale = softmax_scale

    @property
    def effective_backend(self) -> str:
        """The SDPA backend a call on the module's device uses (``"default"`` on CPU)."""
        return self.sdpa_backend if (self.device.type == "cuda" and self.sdpa_backend) else "default"

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """``[B, Tq, H, D]`` attention through SDPA (bottom-right causal when ``Tq != Tk``)."""
        backend = self.sdpa_backend if query.device.type == "cuda" else None
        return sdpa_attention(
            query, key, value, causal=causal, softmax_scale=self.softmax_scale, sdpa_backend=backend
        )

    def _benchmark_metadata(self) -> dict[str, Any]:
        return {"sdpa_backend": self.effective_backend}
