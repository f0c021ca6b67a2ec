"""Choosing between the Triton kernels and PyTorch SDPA.

``STREAM_ATTENTION_BACKEND=triton|sdpa|auto`` overrides every ``backend="auto"`` choice
in the package (modules, HF models, the engine, the server), so a test can push the
Triton kernels through a whole model on CPU under ``TRITON_INTERPRET=1``. An explicit
``backend="triton"`` or ``"sdpa"`` argument always wins over the environment.
"""

from __future__ import annotations

from typing import Literal

import torch

from .. import envs
from ..kernels.runtime import TritonUnavailableError, triton_runs_on, why_triton_cannot_run

Backend = Literal["auto", "triton", "sdpa"]
_VALID = envs.BACKENDS
ENV_VAR = envs.BACKEND.name


def env_backend() -> str:
    """The backend named by ``STREAM_ATTENTION_BACKEND`` (``"auto"`` when unset)."""
    return envs.backend()


def resolve_backend(
    requested: str, device: torch.device, *, needs_grad: bool = False, grad_supported: bool = True
) -> str:
    """Return ``"triton"`` or ``"sdpa"`` for a call on ``device``.

    ``needs_grad``/``grad_supported`` let a caller whose Triton path has no backward
    fall back to SDPA under ``auto`` while autograd is recording.
    """
    if requested not in _VALID:
        raise ValueError(f"backend={requested!r}: expected one of {', '.join(_VALID)}")
    choice = requested if requested != "auto" else env_backend()
    if choice == "triton":
        if not triton_runs_on(device):
            raise TritonUnavailableError(f"backend='triton' cannot run: {why_triton_cannot_run(device)}")
        if needs_grad and not grad_supported:
            raise TritonUnavailableError("backend='triton' has no backward for this call")
        return "triton"
    if choice == "sdpa":
        return "sdpa"
    if device.type == "cuda" and triton_runs_on(device) and (grad_supported or not needs_grad):
        return "triton"
    return "sdpa"
