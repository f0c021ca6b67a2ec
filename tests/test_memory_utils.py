"""MemoryProfiler and the gradient-checkpointing helpers."""

from __future__ import annotations

import builtins
import json

import pytest
import torch
from torch import nn

from stream_attention.utils import profiler
from stream_attention.utils.memory import (
    CheckpointedSequential,
    MemoryProfiler,
    checkpoint_sequential_modules,
    format_bytes,
    segment_bounds,
)


def test_profiler_snapshot_is_json_and_sensible():
    prof = MemoryProfiler("unit")
    snap = prof.snapshot()
    json.dumps(snap)
    host = snap["host"]
    assert host["rss_bytes"] > 10 * 2**20  # a Python process with torch loaded
    assert host["peak_rss_bytes"] >= host["rss_bytes"] * 0.5
    assert snap["cuda_available"] == torch.cuda.is_available()
    assert len(snap["devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_profiler_context_sees_a_host_allocation():
    with MemoryProfiler("alloc") as prof:
        blob = torch.ones(16 * 2**20)  # 64 MiB, written so the pages are resident
        prof.mark("after ones")
    delta = prof.delta()
    assert delta["host_rss_bytes"] > 32 * 2**20
    report = prof.report()
    assert "Memory report [alloc]" in report and "host: rss" in report and "after ones" in report
    del blob


def test_host_memory_without_psutil(monkeypatch):
    real_import = builtins.__import__

    def no_psutil(name, *args, **kwargs):
        if name == "psutil":
            raise ImportError("psutil hidden by the test")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_psutil)
    info = profiler.host_memory()
    assert info["source"] in ("procfs", "resource") and info["rss_bytes"] > 0


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 2**30) == "3.00 GiB"
    assert format_bytes(-2048) == "-2.00 KiB"
    assert format_bytes(None) == "n/a"


@pytest.mark.gpu
def test_profiler_tracks_cuda_peaks():
    torch.cuda.init()
    x = torch.empty(1, device="cuda")
    with MemoryProfiler("gpu") as prof:
        y = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
        del y
    d = prof.delta()["devices"][torch.cuda.current_device()]
    assert d["peak_allocated_increase_bytes"] >= 256 * 2**20
    assert prof.end["devices"][0]["free_bytes"] is not None
    del x


# ----------------------------------------------------------------- checkpointing


class _Counting(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.drop(torch.tanh(self.lin(x)))


def _chain(n: int = 6, dim: int = 32) -> list[_Counting]:
    torch.manual_seed(0)
    return [_Counting(dim) for _ in range(n)]


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while ``fn`` runs (what checkpointing saves)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_segment_bounds():
    assert segment_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert segment_bounds(2, 5) == [(0, 1), (1, 2)]
    assert segment_bounds(0, 2) == []


def test_checkpointing_matches_plain_gradients_and_recomputes():
    mods = _chain()
    x = torch.randn(8, 32, requires_grad=True)
    torch.manual_seed(1)
    plain = x
    for m in mods:
        plain = m(plain)
    plain.square().sum().backward()
    grads = [m.lin.weight.grad.clone() for m in mods]
    gx = x.grad.clone()
    for m in mods:
        m.zero_grad()
        m.calls = 0
    x.grad = None

    torch.manual_seed(1)  # same dropout masks: RNG state is replayed for the recomputation
    out = checkpoint_sequential_modules(mods, x, segments=3)
    torch.testing.assert_close(out, plain)
    out.square().sum().backward()
    torch.testing.assert_close(x.grad, gx)
    for m, g in zip(mods, grads, strict=True):
        torch.testing.assert_close(m.lin.weight.grad, g)
    # Segments 1 and 2 ran twice (forward + recompute); the last one once.
    assert [m.calls for m in mods] == [2, 2, 2, 2, 1, 1]


def test_checkpointing_saves_activation_memory():
    mods = _chain(8, 256)
    x = torch.randn(64, 256, requires_grad=True)

    def plain():
        y = x
        for m in mods:
            y = m(y)
        return y

    full = _saved_bytes(plain)
    ckpt = _saved_bytes(lambda: checkpoint_sequential_modules(mods, x, segments=4))
    assert ckpt < 0.5 * full


def test_checkpointed_sequential_modes():
    seq = CheckpointedSequential(*_chain(4), segments=2)
    plain = nn.Sequential(*_chain(4))
    assert seq.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(3, 32, requires_grad=True)
    seq.train()
    seq(x).sum().backward()
    assert [m.calls for m in seq] == [2, 2, 1, 1]
    seq.eval()
    for m in seq:
        m.calls = 0
    with torch.no_grad():
        seq(x)
    assert [m.calls for m in seq] == [1, 1, 1, 1]
    wrapped = CheckpointedSequential.wrap(plain, segments=4)
    assert wrapped[0] is plain[0]
