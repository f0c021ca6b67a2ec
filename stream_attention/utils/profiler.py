"""``MemoryProfiler``: CUDA allocator and host memory snapshots, as dicts and as a report.

Used three ways: as a context manager around a workload (peaks are reset on entry, so the
report shows what the block itself needed), as a long-lived object whose
:meth:`MemoryProfiler.snapshot` the server returns from ``/memory`` and exports as
Prometheus gauges, and through :meth:`MemoryProfiler.mark` to label points of a run.

Host numbers come from ``psutil`` when installed, else from ``/proc/self/statm`` and
``resource``. The host peak is the process lifetime's (``ru_maxrss``): the OS offers no
way to reset it. Devices whose CUDA context does not exist yet are reported from the
allocator only; nothing here creates a context on an untouched GPU.
"""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType
from typing import Any

import torch

__all__ = ["MemoryProfiler", "host_memory", "cuda_memory", "format_bytes"]


def format_bytes(n: float | None) -> str:
    """``1536 -> '1.50 KiB'``; ``None`` -> ``'n/a'``."""
    if n is None:
        return "n/a"
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    return f"{sign}{n:.2f} TiB"  # pragma: no cover - loop always returns


def _peak_rss() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def host_memory() -> dict[str, Any]:
    """``{"rss_bytes", "peak_rss_bytes", "available_bytes", "total_bytes", "source"}`` of this process/host."""
    info: dict[str, Any] = {"rss_bytes": None, "peak_rss_bytes": _peak_rss(), "available_bytes": None,
                            "total_bytes": None, "source": None}
    try:
        import psutil

        info["rss_bytes"] = int(psutil.Process().memory_info().rss)
        vm = psutil.virtual_memory()
        info["available_bytes"], info["total_bytes"] = int(vm.available), int(vm.total)
        info["source"] = "psutil"
        return info
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            info["rss_bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        info["source"] = "procfs"
    except (OSError, ValueError, AttributeError):
        info["rss_bytes"] = info["peak_rss_bytes"]
        info["source"] = "resource"
    return info


def _context_exists(index: int) -> bool:
    return torch.cuda.is_initialized() and torch.cuda.memory_reserved(index) > 0


def cuda_memory(devices: list[int] | None = None) -> list[dict[str, Any]]:
    """Allocator statistics per CUDA device (empty list without CUDA)."""
    if not torch.cuda.is_available():
        return []
    if devices is None:
        devices = list(range(torch.cuda.device_count()))
    rows = []
    for i in devices:
        props = torch.cuda.get_device_properties(i)
        row: dict[str, Any] = {
            "index": i,
            "name": props.name,
            "total_bytes": int(props.total_memory),
            "allocated_bytes": int(torch.cuda.memory_allocated(i)),
            "reserved_bytes": int(torch.cuda.memory_reserved(i)),
            "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(i)),
            "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(i)),
            "free_bytes": None,
        }
        if _context_exists(i):
            free, _ = torch.cuda.mem_get_info(i)
            row["free_bytes"] = int(free)
            stats = torch.cuda.memory_stats(i)
            row["num_alloc_retries"] = int(stats.get("num_alloc_retries", 0))
            row["num_ooms"] = int(stats.get("num_ooms", 0))
        rows.append(row)
    return rows


class MemoryProfiler:
    """Peak/current memory of the CUDA devices and the host process.

    >>> with MemoryProfiler("prefill") as prof:
    ...     run_workload()
    >>> print(prof.report())
    """

    def __init__(self, name: str = "", *, devices: list[int] | None = None, reset_peak: bool = True) -> None:
        self.name = name
        self.devices = devices
        self.reset_on_enter = reset_peak
        self.start: dict[str, Any] | None = None
        self.end: dict[str, Any] | None = None
        self.marks: list[dict[str, Any]] = []

    # ------------------------------------------------------------ snapshots
    def snapshot(self, label: str | None = None) -> dict[str, Any]:
        """Current numbers as a JSON-serialisable dict."""
        return {
            "label": label if label is not None else self.name,
            "time": time.time(),
            "host": host_memory(),
            "cuda_available": torch.cuda.is_available(),
            "devices": cuda_memory(self.devices),
        }

    def reset_peak(self) -> None:
        """Restart CUDA peak tracking (the host peak cannot be reset)."""
        if not torch.cuda.is_available():
            return
        for row in cuda_memory(self.devices):
            if _context_exists(row["index"]):
                torch.cuda.reset_peak_memory_stats(row["index"])

    def mark(self, label: str) -> dict[str, Any]:
        """Record a labelled snapshot (kept in ``self.marks``) and return it."""
        snap = self.snapshot(label)
        self.marks.append(snap)
        return snap

    # ------------------------------------------------------ context manager
    def __enter__(self) -> MemoryProfiler:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        if self.reset_on_enter:
            self.reset_peak()
        self.start = self.snapshot("start")
        self.end = None
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.end = self.snapshot("end")

    def delta(self) -> dict[str, Any]:
        """End minus start: host RSS and each device's allocated/reserved bytes, plus peaks."""
        if self.start is None:
            raise RuntimeError("delta() needs a finished `with MemoryProfiler(...)` block")
        end = self.end or self.snapshot("now")
        out: dict[str, Any] = {"host_rss_bytes": None, "devices": []}
        if self.start["host"]["rss_bytes"] is not None and end["host"]["rss_bytes"] is not None:
            out["host_rss_bytes"] = end["host"]["rss_bytes"] - self.start["host"]["rss_bytes"]
        before = {d["index"]: d for d in self.start["devices"]}
        for d in end["devices"]:
            b = before.get(d["index"])
            if b is None:
                continue
            out["devices"].append({
                "index": d["index"],
                "allocated_bytes": d["allocated_bytes"] - b["allocated_bytes"],
                "reserved_bytes": d["reserved_bytes"] - b["reserved_bytes"],
                "peak_allocated_bytes": d["peak_allocated_bytes"],
                # What the block needed above what was already allocated when it began.
                "peak_allocated_increase_bytes": d["peak_allocated_bytes"] - b["allocated_bytes"],
                "peak_reserved_bytes": d["peak_reserved_bytes"],
            })
        return out

    # --------------------------------------------------------------- report
    def report(self) -> str:
        """A human-readable table of the latest numbers (and the block's deltas when profiled)."""
        snap = self.end or self.snapshot()
        title = f"Memory report{f' [{self.name}]' if self.name else ''}"
        lines = [title, "=" * len(title)]
        host = snap["host"]
        lines.append(
            f"host: rss {format_bytes(host['rss_bytes'])}, peak rss {format_bytes(host['peak_rss_bytes'])}"
            f" (process lifetime), available {format_bytes(host['available_bytes'])} of "
            f"{format_bytes(host['total_bytes'])} [{host['source']}]"
        )
        delta = self.delta() if self.start is not None else None
        if not snap["devices"]:
            lines.append("cuda: not available")
        for d in snap["devices"]:
            lines.append(
                f"cuda:{d['index']} {d['name']}: allocated {format_bytes(d['allocated_bytes'])} "
                f"(peak {format_bytes(d['peak_allocated_bytes'])}), reserved {format_bytes(d['reserved_bytes'])} "
                f"(peak {format_bytes(d['peak_reserved_bytes'])}), free {format_bytes(d['free_bytes'])} of "
                f"{format_bytes(d['total_bytes'])}"
            )
        if delta is not None:
            lines.append(f"block: host rss {format_bytes(delta['host_rss_bytes'])}")
            for d in delta["devices"]:
                lines.append(
                    f"block cuda:{d['index']}: allocated {format_bytes(d['allocated_bytes'])}, peak above start "
                    f"{format_bytes(d['peak_allocated_increase_bytes'])}, reserved {format_bytes(d['reserved_bytes'])}"
                )
        for m in self.marks:
            dev = ", ".join(f"cuda:{d['index']} {format_bytes(d['allocated_bytes'])}" for d in m["devices"])
            lines.append(f"mark {m['label']!r}: host rss {format_bytes(m['host']['rss_bytes'])}"
                         + (f", {dev}" if dev else ""))
        return "\n".join(lines)
