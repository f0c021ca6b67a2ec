"""Where Triton kernels can run, decided once and shared by every launcher.

Triton compiles for CUDA devices; with ``TRITON_INTERPRET=1`` (read by Triton when
a kernel is decorated, so it must be set before this package is imported) the same
kernels run on CPU tensors through Triton's interpreter. That is how CI tests them.
"""

from __future__ import annotations

import functools

import torch

from .. import envs

__all__ = [
    "triton_available",
    "interpreter_enabled",
    "triton_runs_on",
    "TritonUnavailableError",
]


class TritonUnavailableError(RuntimeError):
    """Raised when the Triton backend is forced but cannot run on the given tensors."""


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return envs.triton_interpret()


def triton_runs_on(device: torch.device) -> bool:
    """Whether a Triton kernel can be launched on tensors living on ``device``."""
    if not triton_available():
        return False
    if interpreter_enabled():
        return device.type == "cpu"
    return device.type == "cuda"


def why_triton_cannot_run(device: torch.device) -> str:
    """A human-readable reason for ``triton_runs_on(device) == False``."""
    if not triton_available():
        return "the 'triton' package is not installed"
    if interpreter_enabled():
        return f"TRITON_INTERPRET=1 runs kernels on CPU tensors only, got tensors on {device}"
    return (
        f"Triton kernels need CUDA tensors, got tensors on {device} "
        "(set TRITON_INTERPRET=1 to run them on CPU through Triton's interpreter)"
    )


def autotune_enabled() -> bool:
    """Whether GPU launches autotune (``STREAM_ATTENTION_AUTOTUNE=1``) or take the
    measured default config of their shape class (the default).

    Autotuning compiles and times every candidate config for each new shape key, tens of
    seconds that would land on a server's first requests or a model's first steps; the
    defaults are the configs autotuning picked on an H100 (benchmarks/RESULTS.md).
    """
    return envs.autotune()


def first_config(configs, prune, named_args, prefer=None):
    """``prefer`` (a ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` tuple) if the pruning
    function keeps it, else the first config of the preference-ordered list it keeps."""
    kept = prune(configs, named_args)
    if prefer is not None:
        for cfg in kept:
            if (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages) == tuple(prefer):
                return cfg
    return kept[0]


def launch_kwargs(cfg) -> dict:
    """Meta-parameters and launch options of a ``triton.Config`` for a direct launch."""
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
