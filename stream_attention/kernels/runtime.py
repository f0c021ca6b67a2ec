"""Where Triton kernels can run, decided once and shared by every launcher.

Triton compiles for CUDA devices; with ``TRITON_INTERPRET=1`` (read by Triton when
a kernel is decorated, so it must be set before this package is imported) the same
kernels run on CPU tensors through Triton's interpreter. That is how CI tests them.

Whether the interpreter is on is a fact about the running Triton, not a launch choice, so
it is asked of Triton itself rather than passed in; the launch choices (autotuning, TMA,
the quantized kernels' variants) are keyword arguments of the launchers, which the layers
above read from the environment and pass down.
"""

from __future__ import annotations

import functools

import torch

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
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``).

    Triton's own reading of the variable (``triton.knobs.runtime.interpret``, Triton >= 3.4),
    so the answer is the one Triton acts on; older Triton, without knobs, shows its choice
    only in what ``triton.jit`` returns.
    """
    if not triton_available():
        return False
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return _jit_returns_interpreted_functions()


@functools.cache
def _jit_returns_interpreted_functions() -> bool:  # pragma: no cover - Triton < 3.4
    import triton

    def probe():
        pass

    return type(triton.jit(probe)).__name__ == "InterpretedFunction"


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
