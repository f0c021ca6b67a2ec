"""Memory profiling of the serving process: CUDA allocator per device, host RSS, KV pool.

Feeds both ``GET /memory`` (a JSON snapshot) and the ``/metrics`` memory gauges. CUDA is
queried only once this process has initialised it, so a CPU server never creates a
CUDA context by being scraped.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import asdict
from typing import Any

from ..engine.types import EngineStats


def cuda_memory() -> list[dict[str, Any]]:
    """Allocator figures of every CUDA device this process has touched."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    out = []
    for index in range(torch.cuda.device_count()):
        stats = torch.cuda.memory_stats(index)
        if not stats:  # device never used by this process
            continue
        try:
            free, total = torch.cuda.mem_get_info(index)
        except RuntimeError:
            free, total = 0, torch.cuda.get_device_properties(index).total_memory
        out.append(
            {
                "device": f"cuda:{index}",
                "name": torch.cuda.get_device_name(index),
                "allocated_bytes": int(torch.cuda.memory_allocated(index)),
                "reserved_bytes": int(torch.cuda.memory_reserved(index)),
                "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(index)),
                "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(index)),
                "free_bytes": int(free),
                "total_bytes": int(total),
            }
        )
    return out


def host_rss_bytes() -> int:
    """Current resident set size of this process (psutil, else /proc, else peak RSS)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        # ru_maxrss is the peak, in KiB on Linux: better than nothing where /proc is absent.
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def host_peak_rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def snapshot(stats: EngineStats | None, *, reset_peak: bool = False) -> dict[str, Any]:
    """What ``GET /memory`` returns: host, CUDA devices and the KV-cache pool.

    ``reset_peak`` restarts the CUDA peak counters after reading them, so the next
    snapshot's peak covers only the interval between the two.
    """
    devices = cuda_memory()
    if reset_peak and devices:
        import torch

        for dev in devices:
            torch.cuda.reset_peak_memory_stats(int(dev["device"].split(":")[1]))
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
    return {
        "time": time.time(),
        "host": {"rss_bytes": host_rss_bytes(), "peak_rss_bytes": host_peak_rss_bytes(), "pid": os.getpid()},
        "cuda": devices,
        "kv_cache": kv,
        "engine": asdict(stats) if stats is not None else None,
    }
