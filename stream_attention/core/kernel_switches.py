"""The kernels' launch switches as the environment sets them, read in one place.

The Triton launchers in :mod:`stream_attention.kernels` take every launch choice as a
keyword argument and never read the environment. Users still steer them with the
``STREAM_ATTENTION_*`` variables of the README's table: the layers that call the kernels
(``fused_attention`` here, the engine's model runner) read :meth:`KernelSwitches.from_env`
and pass the values down. A field's default is what an unset variable means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import envs

__all__ = ["KernelSwitches"]


@dataclass(frozen=True)
class KernelSwitches:
    """Launch switches shared by the kernel families.

    ``autotune``: autotune GPU launches instead of taking the measured configs
    (``STREAM_ATTENTION_AUTOTUNE``); ``tma``: dense forward through TMA descriptors, None =
    on Hopper GPUs (``STREAM_ATTENTION_TMA``); ``paged_tma``: paged decode may take the TMA
    kernel (``STREAM_ATTENTION_PAGED_TMA``); ``kv_fast``, ``kv_asm``, ``kv_defer_sums``: the
    compressed-page kernel's fp16-code path, its inline PTX, and its row-sum schedule
    (``STREAM_ATTENTION_KV_FAST`` / ``_KV_ASM`` / ``_KV_DEFER_SUMS``).
    """

    autotune: bool = False
    tma: bool | None = None
    paged_tma: bool = True
    kv_fast: bool = True
    kv_asm: bool = True
    kv_defer_sums: bool | None = None

    @classmethod
    def from_env(cls) -> KernelSwitches:
        """The switches the ``STREAM_ATTENTION_*`` variables set now."""
        return cls(
            autotune=envs.autotune(),
            tma=envs.tma(),
            paged_tma=envs.paged_tma(),
            kv_fast=envs.kv_fast(),
            kv_asm=envs.kv_asm(),
            kv_defer_sums=envs.kv_defer_sums(),
        )

    def dense(self) -> dict[str, Any]:
        """Keyword arguments of ``attention_forward``."""
        return {"tma": self.tma, "autotune": self.autotune}

    def paged(self) -> dict[str, Any]:
        """Keyword arguments of ``paged_attention``."""
        return {"tma": self.paged_tma}

    def compressed(self) -> dict[str, Any]:
        """Keyword arguments of ``paged_attention_quantized`` / ``paged_attention_fp8``."""
        return {
            "fast_kernel": self.kv_fast,
            "inline_asm": self.kv_asm,
            "defer_sums": self.kv_defer_sums,
            "autotune": self.autotune,
        }
