"""Helpers shared by the kernel gradient tests; the reference itself lives in tests/reference.py."""

from __future__ import annotations

import contextlib

import torch

from tests.reference import reference_attention, rel_err

__all__ = ["grads", "nan_poisoned_allocations", "reference_attention", "rel_err"]


def grads(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


@contextlib.contextmanager
def nan_poisoned_allocations():
    """Make ``torch.empty``/``torch.empty_like`` return NaN-filled floats, so any output
    element a kernel forgets to write shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty = lambda *a, **kw: poison(empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poison(empty_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like
