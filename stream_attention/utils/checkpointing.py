"""Gradient checkpointing for chains of modules.

Checkpointing a segment keeps only its input during the forward pass and recomputes its
activations during backward: activation memory drops from the sum over all modules to
one segment's worth plus the segment boundaries, for about one extra forward pass. With
``n`` modules, ``segments ~ sqrt(n)`` balances the two (Chen et al. 2016).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["segment_bounds", "checkpoint_sequential_modules", "CheckpointedSequential"]


def segment_bounds(num_modules: int, segments: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges splitting ``num_modules`` into ``segments`` near-equal runs."""
    if num_modules == 0:
        return []
    segments = max(1, min(int(segments), num_modules))
    base, extra = divmod(num_modules, segments)
    bounds, start = [], 0
    for i in range(segments):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _run(modules: Sequence[nn.Module], start: int, end: int):
    def forward(x: Any) -> Any:
        for m in modules[start:end]:
            x = m(x)
        return x

    return forward


def checkpoint_sequential_modules(
    modules: Iterable[nn.Module],
    x: Any,
    segments: int = 2,
    *,
    use_reentrant: bool = False,
    preserve_rng_state: bool = True,
    checkpoint_last: bool = False,
) -> Any:
    """Run ``x`` through ``modules`` in order, checkpointing ``segments`` runs of them.

    Without autograd (``torch.no_grad()`` / inference) the modules simply run. The last
    segment is not checkpointed unless ``checkpoint_last``: backward needs its
    activations right away, so recomputing them would only cost time. RNG state is
    restored for the recomputation so dropout masks match (``preserve_rng_state``).
    """
    mods = list(modules)
    if not torch.is_grad_enabled():
        return _run(mods, 0, len(mods))(x)
    bounds = segment_bounds(len(mods), segments)
    for i, (start, end) in enumerate(bounds):
        fn = _run(mods, start, end)
        if i == len(bounds) - 1 and not checkpoint_last:
            x = fn(x)
        else:
            x = checkpoint(fn, x, use_reentrant=use_reentrant, preserve_rng_state=preserve_rng_state)
    return x


class CheckpointedSequential(nn.Sequential):
    """``nn.Sequential`` whose forward checkpoints ``segments`` runs of its children while training.

    ``enabled`` toggles it at runtime; in eval mode or without autograd it is a plain
    ``nn.Sequential``. State dicts are interchangeable with ``nn.Sequential``'s.
    """

    def __init__(self, *modules: nn.Module, segments: int = 2, enabled: bool = True, use_reentrant: bool = False,
                 checkpoint_last: bool = False) -> None:
        super().__init__(*modules)
        self.segments = segments
        self.enabled = enabled
        self.use_reentrant = use_reentrant
        self.checkpoint_last = checkpoint_last

    @classmethod
    def wrap(cls, seq: nn.Sequential, **kwargs: Any) -> CheckpointedSequential:
        """The same child modules (shared, not copied) behind a checkpointing forward."""
        return cls(*seq.children(), **kwargs)

    def forward(self, x: Any) -> Any:
        if self.enabled and self.training and torch.is_grad_enabled():
            return checkpoint_sequential_modules(
                list(self), x, self.segments, use_reentrant=self.use_reentrant, checkpoint_last=self.checkpoint_last,
            )
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"segments={self.segments}, enabled={self.enabled}"
