"""Prometheus metrics of one server: HTTP traffic, request latencies, engine and memory.

Each app owns a :class:`~prometheus_client.CollectorRegistry` (not the global one) so
several apps can live in one process, as the tests do. Engine gauges and memory are
read at scrape time by collectors, so a scrape always sees the current values and the
serving path pays nothing for them.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..engine.types import EngineStats
from . import engine_bridge as bridge
from .memory import cuda_rows, host_rss_bytes

PREFIX = "stream_attention"
log = logging.getLogger("stream_attention.server")

# Buckets span CPU test runs (seconds per token) to GPU serving (milliseconds).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
HTTP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class _EngineCollector(Collector):
    """Engine counters and gauges from :class:`EngineStats`, read at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        try:
            s = self._stats()
        except Exception:  # a scrape must not fail because the engine is mid-shutdown
            log.exception("engine stats unavailable for /metrics")
            s = None
        # Before the model loads the series still exist (at zero) so dashboards and
        # alert rules see a value rather than "no data".
        s = s if s is not None else EngineStats()
        gauges: list[tuple[str, str, float]] = [
            ("requests_running", "Requests being decoded.", s.running),
            ("requests_waiting", "Requests queued for admission.", s.waiting),
            ("kv_cache_blocks_capacity", "KV-cache blocks in the pool (used + free).", s.kv_blocks_total),
            ("kv_cache_blocks_used", "KV-cache blocks holding tokens.", s.kv_blocks_used),
            ("kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0..1).", s.kv_usage),
            (
                "kv_compression_ratio",
                "Uncompressed / stored KV bytes of live sequences (1 = uncompressed).",
                s.kv_compression_ratio,
            ),
            (
                "kv_bytes_saved",
                "KV bytes live sequences would need uncompressed minus what they use.",
                s.kv_bytes_saved,
            ),
        ]
        counters: list[tuple[str, str, float]] = [
            ("preemptions", "Sequences preempted to free KV blocks.", s.preemptions_total),
            ("prompt_tokens", "Prompt tokens prefilled.", s.prompt_tokens_total),
            ("generation_tokens", "Tokens generated.", s.generation_tokens_total),
            ("engine_requests_finished", "Requests the engine finished (any reason).", s.requests_finished_total),
            (
                "prefix_cache_queries",
                "Prompt tokens of newly admitted requests looked up in the prefix cache.",
                s.prefix_cache_queries_total,
            ),
            ("prefix_cache_hits", "Of those prompt tokens, the ones served from the prefix cache.",
             s.prefix_cache_hits_total),
            ("kv_blocks_evicted", "KV blocks freed by compression/eviction.", s.kv_blocks_evicted_total),
            ("engine_restarts", "Times the engine was rebuilt after it died.", s.engine_restarts_total),
            ("spec_decode_num_drafts", "Speculative decoding: sequences that verified a draft in a step.",
             s.spec_decode_num_drafts_total),
            ("spec_decode_num_draft_tokens", "Speculative decoding: draft tokens proposed.",
             s.spec_decode_num_draft_tokens_total),
            ("spec_decode_num_accepted_tokens", "Speculative decoding: draft tokens the target accepted "
             "(acceptance rate = accepted / draft tokens).", s.spec_decode_num_accepted_tokens_total),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=float(value))
        for name, doc, value in counters:
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=float(value))


class _EngineUpCollector(Collector):
    """``engine_up``: 1 while the engine serves, 0 while it loads, restarts or once it
    died (the test ``/ready`` makes)."""

    def __init__(self, engine: Callable[[], Any]) -> None:
        self._engine = engine

    def collect(self) -> Iterable[Metric]:
        engine = self._engine()
        up = engine is not None and bridge.is_ready(engine)
        yield GaugeMetricFamily(
            f"{PREFIX}_engine_up", "1 while the engine serves, 0 while it loads, restarts or after it stopped.",
            value=1.0 if up else 0.0,
        )


class TokenHistogram(Collector):
    """A histogram for per-token samples, exposed exactly like a ``Histogram``.

    ``prometheus_client.Histogram.observe`` takes a lock and scans the buckets per sample,
    a few microseconds that at thousands of tokens/s land on the event loop. Here a sample
    is a bisect and two additions, and ``n`` equal samples cost one. Only the event loop's
    thread observes; a scrape reads the counters as they are.
    """

    def __init__(self, name: str, documentation: str, buckets: Iterable[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = sorted(float(b) for b in buckets if b != math.inf) + [math.inf]
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n

    @property
    def count(self) -> int:
        return sum(self.counts)

    def describe(self) -> Iterable[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation)

    def collect(self) -> Iterable[Metric]:
        cumulative, buckets = 0, []
        for bound, count in zip(self.bounds, list(self.counts), strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self.sum)


class _MemoryCollector(Collector):
    """CUDA allocator figures per device and the host RSS, read at scrape time (from the
    engine process's last report when the engine runs in its own process)."""

    def __init__(self, engine: Callable[[], Any] | None = None) -> None:
        self._engine = engine or (lambda: None)

    def collect(self) -> Iterable[Metric]:
        engine = self._engine()
        families = {
            "allocated": GaugeMetricFamily(
                f"{PREFIX}_cuda_memory_allocated_bytes", "Bytes held by live CUDA tensors.", labels=["device"]
            ),
            "reserved": GaugeMetricFamily(
                f"{PREFIX}_cuda_memory_reserved_bytes",
                "Bytes reserved by PyTorch's CUDA caching allocator.",
                labels=["device"],
            ),
            "peak_allocated": GaugeMetricFamily(
                f"{PREFIX}_cuda_memory_peak_allocated_bytes",
                "Peak bytes held by CUDA tensors since start.",
                labels=["device"],
            ),
            "total": GaugeMetricFamily(
                f"{PREFIX}_cuda_memory_total_bytes", "Device memory capacity.", labels=["device"]
            ),
        }
        for dev in cuda_rows(engine):
            for key, fam in families.items():
                fam.add_metric([dev["device"]], float(dev[f"{key}_bytes"]))
        yield from families.values()
        yield GaugeMetricFamily(
            f"{PREFIX}_host_rss_bytes", "Resident set size of the server (and engine) process.",
            value=float(host_rss_bytes(engine)),
        )


class ServerMetrics:
    """The server's metric objects, in a registry of their own."""

    def __init__(self, stats: Callable[[], EngineStats | None], info: dict[str, str] | None = None,
                 engine: Callable[[], Any] | None = None) -> None:
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests answered, by route and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Time from request to the last byte of the response, by route.",
            ["route"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.http_in_progress = Gauge(f"{PREFIX}_http_requests_in_progress", "HTTP requests being served.", registry=r)
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from a generation request's arrival to its first token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = TokenHistogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
            ITL_BUCKETS,
        )
        r.register(self.itl)
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "Time from a generation request's arrival to its last token.",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.request_prompt_tokens = Counter(
            f"{PREFIX}_request_prompt_tokens", "Prompt tokens of generation requests served over HTTP.", registry=r
        )
        self.request_generation_tokens = Counter(
            f"{PREFIX}_request_generation_tokens", "Tokens generated for requests served over HTTP.", registry=r
        )
        self.finished = Counter(
            f"{PREFIX}_request_finished", "Generation requests finished, by reason.", ["finish_reason"], registry=r
        )
        self.rejected = Counter(
            f"{PREFIX}_requests_rejected",
            "Generation requests refused before running, by reason.",
            ["reason"],
            registry=r,
        )
        self.benchmark_runs = Counter(
            f"{PREFIX}_benchmark_runs", "POST /benchmark runs, by kind and outcome.", ["kind", "outcome"], registry=r
        )
        build = Gauge(
            f"{PREFIX}_build_info", "Server build and configuration (value 1).", list((info or {}).keys()), registry=r
        )
        if info:
            build.labels(**info).set(1)
        for reason in ("stop", "length", "abort", "error"):
            self.finished.labels(finish_reason=reason)
        for reason in ("queue_full", "prompt_too_long", "not_ready"):
            self.rejected.labels(reason=reason)
        r.register(_EngineCollector(stats))
        r.register(_MemoryCollector(engine))
        r.register(_EngineUpCollector(engine or (lambda: None)))
        ProcessCollector(registry=r)

    def observe_tokens(self, gap: float, n: int) -> None:
        """``n`` tokens arrived ``gap`` seconds after the previous delta: n ITL samples."""
        self.itl.observe(gap / n, n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
