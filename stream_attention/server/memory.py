"""Memory profiling of the serving process, on :class:`stream_attention.utils.memory.MemoryProfiler`.

Feeds both ``GET /memory`` (the profiler's snapshot plus the KV-cache pool) and the
``/metrics`` memory gauges. The profiler never creates a CUDA context on a device the
process has not touched, so a CPU server is never slowed by being scraped.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ..engine.types import EngineStats
from ..utils.memory import MemoryProfiler, cuda_memory, host_memory

_PROFILER = MemoryProfiler("server", reset_peak=False)


def cuda_rows(engine: Any = None) -> list[dict[str, Any]]:
    """Allocator figures per CUDA device, each with a ``device`` label (``cuda:N``).

    With an engine running in its own process (``--engine-process``), the figures are that
    process's (its last report), since the CUDA allocations are all there.
    """
    report = _engine_report(engine)
    if report is not None:
        return list(report["cuda"])
    return [{**row, "device": f"cuda:{row['index']}"} for row in cuda_memory()]


def host_rss_bytes(engine: Any = None) -> int:
    """Resident set size of the serving processes: this one, plus the engine process if any."""
    own = int(host_memory().get("rss_bytes") or 0)
    report = _engine_report(engine)
    return own + (int(report["rss_bytes"]) if report is not None else 0)


def _engine_report(engine: Any) -> dict[str, Any] | None:
    report = getattr(engine, "memory_report", None)
    return report() if callable(report) else None


def snapshot(stats: EngineStats | None, *, reset_peak: bool = False, engine: Any = None) -> dict[str, Any]:
    """What ``GET /memory`` returns: the profiler's snapshot (host, CUDA devices) plus the
    KV-cache pool and the engine's counters.

    ``reset_peak`` restarts the CUDA peak counters after reading them, so the next
    snapshot's peak covers only the interval between the two.
    """
    snap = _PROFILER.snapshot("server")
    if reset_peak:
        _PROFILER.reset_peak()
    kv: dict[str, Any] = {}
    if stats is not None:
        kv = {
            "blocks_total": stats.kv_blocks_total,
            "blocks_used": stats.kv_blocks_used,
            "usage": stats.kv_usage,
            "compression_ratio": stats.kv_compression_ratio,
            "bytes_saved": stats.kv_bytes_saved,
            "blocks_evicted_total": stats.kv_blocks_evicted_total,
        }
    report = _engine_report(engine)
    if report is not None:  # the engine's own process holds the model and the cache
        snap = {**snap, "engine_process": {"host_rss_bytes": report["rss_bytes"], "devices": report["cuda"]}}
    return {**snap, "kv_cache": kv, "engine": asdict(stats) if stats is not None else None}
