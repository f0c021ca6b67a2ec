"""Timing and FLOP accounting shared by the modules' ``benchmark()`` and the CLIs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs: two matmuls of ``2·Tq·Tk·D`` each per head; halved when causal.

    The causal halving is the convention of FlashAttention's papers (exact for Tq = Tk
    in the limit); the backward is counted as 2.5× the forward.
    """
    flops = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim
    return flops / 2 if causal else flops


def attention_bytes(
    batch: int, heads_q: int, heads_kv: int, seqlen_q: int, seqlen_k: int, head_dim: int, elem: int
) -> int:
    """Fewest bytes a forward must move: Q, K, V read once, O written once."""
    return elem * head_dim * batch * (2 * heads_q * seqlen_q + 2 * heads_kv * seqlen_k)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 10, iterations: int = 50) -> float:
    """Median milliseconds per call of ``fn`` after ``warmup`` calls.

    On CUDA this is ``triton.testing.do_bench``'s median (CUDA events, L2 flushed
    between calls); elsewhere a host clock around each call.
    """
    if device.type == "cuda":
        import triton.testing

        fn()
        torch.cuda.synchronize(device)
        # do_bench takes milliseconds for warm-up and repetition; convert from counts
        # using one measured call so short kernels still get many repetitions.
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        one_ms = max((time.perf_counter() - start) * 1e3, 1e-3)
        return float(
            triton.testing.do_bench(
                fn, warmup=max(1, int(warmup * one_ms)), rep=max(5, int(iterations * one_ms)), return_mode="median"
            )
        )
    for _ in range(max(warmup, 0)):
        fn()
    samples = []
    for _ in range(max(iterations, 1)):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


_FLUSH: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
_FLUSH_KINDS = ("read", "zero")


def evict_l2(device: torch.device, how: str = "read") -> None:
    """Queue an eviction of ``device``'s L2 cache: a pass over 256 MiB that reads it
    (``"read"``: leaves clean lines) or zeroes it (``"zero"``, as ``triton.testing.do_bench``
    does: leaves ~50 MB of dirty lines for the next kernel to write back)."""
    if how not in _FLUSH_KINDS:
        raise ValueError(f"flush must be 'read' or 'zero', got {how!r}")
    key = str(device)
    if key not in _FLUSH:
        _FLUSH[key] = (torch.empty(64 * 2**20, dtype=torch.float32, device=device).uniform_(),
                       torch.empty((), dtype=torch.float32, device=device))
    buf, sink = _FLUSH[key]
    if how == "read":
        torch.sum(buf, 0, out=sink)
    else:
        buf.zero_()


def time_graph_ms(fn: Callable[[], object], device: torch.device | None = None, *, reps: int = 50,
                  flush: str = "read", warmup: int = 3) -> float:
    """Median milliseconds of one replay of ``fn`` captured in a CUDA graph, L2 evicted before each.

    For kernels whose host wrapper costs as much as the kernel (a decode step): between
    eager calls the GPU can idle while the host prepares the next launch, and the event
    pair around the call counts that idle time. A replay costs the host a few µs, and the
    256 MiB eviction queued before it keeps the GPU busy meanwhile, so only device time
    is measured (the decode engine replays graphs too). ``flush`` is :func:`evict_l2`'s.
    """
    if flush not in _FLUSH_KINDS:
        raise ValueError(f"flush must be 'read' or 'zero', got {flush!r}")
    device = device or torch.device("cuda", torch.cuda.current_device())
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    graph.replay()
    for start, end in zip(starts, ends, strict=True):
        evict_l2(device, flush)
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize(device)
    times = sorted(start.elapsed_time(end) for start, end in zip(starts, ends, strict=True))
    del graph
    return float(times[len(times) // 2])


def spin_up_gpu(device: torch.device | None = None, seconds: float = 1.0) -> None:
    """Keep the GPU busy with bf16 matrix products for ``seconds`` so its clocks have
    ramped before the first autotuning pass or timing (an idle GPU runs the first
    few hundred milliseconds of work at a low clock, which misleads the autotuner)."""
    if not torch.cuda.is_available():
        return
    import time

    a = torch.randn(4096, 4096, device=device or "cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize(device)


def tuned_configs() -> dict[str, dict]:
    """The config each autotuned Triton kernel of the package chose, per tuning key."""
    from ..kernels import attention_bwd, attention_fwd

    out: dict[str, dict] = {}
    for name, tuner in (
        ("fwd", attention_fwd._attn_fwd_tuned),
        ("bwd_dkdv", attention_bwd._bwd_dkdv_tuned),
        ("bwd_dq", attention_bwd._bwd_dq_tuned),
    ):
        for key, cfg in getattr(tuner, "cache", {}).items():
            out[f"{name}{tuple(key)}"] = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return out
