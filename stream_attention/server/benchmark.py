"""``POST /benchmark``: the kernel benchmark or a short generation burst, one at a time.

Bounds that keep live traffic served while a benchmark runs:

- one benchmark at a time (a second gets 429 with ``Retry-After``);
- the kernel benchmark runs in a worker thread, one sequence length per call, so the
  event loop keeps streaming tokens and the engine keeps stepping; on a GPU both share
  the device, so a decode step waits at most for one benchmark kernel;
- sizes are capped by settings, and a request whose estimated work exceeds what the
  device does in the time budget is refused up front; a run stops starting new sizes
  once the budget is spent (``truncated: true``);
- a generation benchmark is bounded in requests and tokens, goes through the engine's
  normal admission (so it queues behind, not ahead of, live requests), and is aborted
  when it overruns the time budget.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from typing import Any

from ..engine.types import QueueFullError, Request, SamplingParams
from . import engine_bridge as bridge
from .errors import APIError
from .schemas import GenerationBenchmarkRequest, KernelBenchmarkRequest
from .state import ServerState

log = logging.getLogger("stream_attention.server")

# Attention FLOP/s a device sustains, roughly: enough to refuse sizes that cannot finish
# within the budget (CPU through SDPA; any CUDA GPU within a factor of a few).
_FLOPS_PER_S = {"cpu": 2e10, "cuda": 2e14}


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def pct(q: float) -> float:
        k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
        return ordered[k]

    return {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "mean": statistics.fmean(ordered)}


class BenchmarkRunner:
    """Serialises ``/benchmark`` runs and enforces their bounds."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._lock = asyncio.Lock()

    async def run(self, spec: KernelBenchmarkRequest | GenerationBenchmarkRequest) -> dict[str, Any]:
        if self._lock.locked():
            raise APIError(
                429,
                "a benchmark is already running; retry when it finishes",
                code="benchmark_busy",
                headers=self.state.retry_headers(),
            )
        async with self._lock:
            metrics = self.state.metrics
            try:
                if isinstance(spec, KernelBenchmarkRequest):
                    result = await self._kernel(spec)
                else:
                    result = await self._generation(spec)
            except APIError:
                metrics.benchmark_runs.labels(kind=spec.kind, outcome="rejected").inc()
                raise
            except Exception:
                metrics.benchmark_runs.labels(kind=spec.kind, outcome="error").inc()
                raise
            metrics.benchmark_runs.labels(
                kind=spec.kind, outcome="truncated" if result.get("truncated") else "ok"
            ).inc()
            return result

    # --- kernel ---------------------------------------------------------------------

    def _kernel_device(self) -> str:
        dev = self.state.device
        return dev if dev.startswith(("cuda", "cpu")) else self.state.settings.resolved_device()

    def check_kernel(self, spec: KernelBenchmarkRequest) -> None:
        s = self.state.settings
        longest = max(spec.seq_lens)
        if longest > s.benchmark_max_seq_len:
            raise APIError(
                400,
                f"seq_lens: {longest} exceeds this server's limit of {s.benchmark_max_seq_len}",
                param="seq_lens",
                code="out_of_range",
            )
        elem = 4 if spec.dtype == "fp32" or self._kernel_device().startswith("cpu") else 2
        kv_heads = spec.kv_heads or spec.heads
        footprint = spec.batch * longest * (2 * spec.heads + 2 * kv_heads) * spec.dim * elem
        if footprint > s.benchmark_max_memory_bytes:
            # The serving device holds the model and the KV pool: a benchmark must not
            # take the memory live requests need.
            raise APIError(
                400,
                f"the largest size needs {footprint / 2**20:.0f} MiB for q, k, v and the output; this server allows "
                f"{s.benchmark_max_memory_bytes / 2**20:.0f} MiB (smaller batch, heads, dim or seq_lens)",
                param="seq_lens",
                code="too_large",
            )
        from ..core.benchmarking import attention_flops

        device_kind = self._kernel_device().split(":")[0]
        impls = 2 if device_kind == "cpu" else 4  # fused + the SDPA backends that run there
        work = sum(
            attention_flops(spec.batch, spec.heads, n, n, spec.dim, spec.causal) * (spec.warmup + spec.iters) * impls
            for n in spec.seq_lens
        )
        budget = _FLOPS_PER_S[device_kind] * s.benchmark_time_budget
        if work > budget:
            raise APIError(
                400,
                f"this benchmark is about {work:.3g} FLOPs, more than the {s.benchmark_time_budget:g} s budget allows on "
                f"{device_kind} (~{budget:.3g}); use fewer/shorter seq_lens, a smaller batch, or fewer iters",
                param="seq_lens",
                code="too_large",
            )

    async def _kernel(self, spec: KernelBenchmarkRequest) -> dict[str, Any]:
        self.check_kernel(spec)
        # Imported lazily: it pulls the baselines and FlexAttention, which serving never needs.
        from ..core.kernel_benchmark import format_table, run_benchmark

        device = self._kernel_device()
        deadline = time.monotonic() + self.state.settings.benchmark_time_budget
        start = time.perf_counter()
        rows: list[dict[str, Any]] = []
        truncated = False
        for n in spec.seq_lens:
            if time.monotonic() > deadline:
                truncated = True
                break
            rows += await asyncio.to_thread(
                run_benchmark,
                [n],
                batch=spec.batch,
                heads=spec.heads,
                dim=spec.dim,
                causal=spec.causal,
                dtype=spec.dtype,
                kv_heads=spec.kv_heads,
                warmup=spec.warmup,
                iters=spec.iters,
                device=device,
                flex=False,  # FlexAttention's compile would hold the worker for minutes
            )
        return {
            "kind": "kernel",
            "device": device,
            "elapsed_s": time.perf_counter() - start,
            "truncated": truncated,
            "rows": rows,
            "table": format_table(rows) if rows else "",
        }

    # --- generation -----------------------------------------------------------------

    async def _generation(self, spec: GenerationBenchmarkRequest) -> dict[str, Any]:
        state = self.state
        s = state.settings
        engine = state.require_engine()
        if spec.num_requests > s.benchmark_max_requests:
            raise APIError(
                400, f"num_requests: at most {s.benchmark_max_requests}", param="num_requests", code="out_of_range"
            )
        if spec.max_tokens > s.benchmark_max_tokens:
            raise APIError(
                400, f"max_tokens: at most {s.benchmark_max_tokens}", param="max_tokens", code="out_of_range"
            )
        if spec.prompt_tokens + spec.max_tokens > state.max_model_len:
            raise APIError(
                400,
                f"prompt_tokens + max_tokens exceeds the context length {state.max_model_len}",
                param="prompt_tokens",
                code="out_of_range",
            )
        vocab = bridge.vocab_size(engine) or 1000
        rng = random.Random(0)
        concurrency = min(spec.concurrency or spec.num_requests, spec.num_requests)
        gate = asyncio.Semaphore(concurrency)
        records: list[dict[str, Any]] = []
        ids_in_flight: set[str] = set()

        async def one(i: int) -> None:
            async with gate:
                rid = f"benchmark-{time.monotonic_ns()}-{i}"
                prompt = [rng.randrange(min(10, vocab - 1), vocab) for _ in range(spec.prompt_tokens)]
                params = SamplingParams(
                    max_tokens=spec.max_tokens, temperature=spec.temperature, ignore_eos=True, seed=i
                )
                t0 = time.perf_counter()
                first: float | None = None
                n = 0
                ids_in_flight.add(rid)
                try:
                    req = Request(request_id=rid, prompt_token_ids=prompt, params=params, arrival_time=time.time())
                    async for out in bridge.stream(engine, req):
                        if out.delta_token_ids and first is None:
                            first = time.perf_counter() - t0
                        n = len(out.token_ids)
                        if out.finished:
                            ids_in_flight.discard(rid)
                    records.append({"ttft_s": first, "e2e_s": time.perf_counter() - t0, "tokens": n})
                except QueueFullError:
                    ids_in_flight.discard(rid)
                    records.append({"error": "queue_full"})

        start = time.perf_counter()
        tasks = [asyncio.ensure_future(one(i)) for i in range(spec.num_requests)]
        done, pending = await asyncio.wait(tasks, timeout=s.benchmark_time_budget)
        for t in pending:
            t.cancel()
        for rid in list(ids_in_flight):
            await bridge.abort(engine, rid)
        await asyncio.gather(*tasks, return_exceptions=True)
        elapsed = time.perf_counter() - start
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()
        ok = [r for r in records if "error" not in r]
        tokens = sum(r["tokens"] for r in ok)
        tpot = [
            (r["e2e_s"] - r["ttft_s"]) / (r["tokens"] - 1) for r in ok if r["ttft_s"] is not None and r["tokens"] > 1
        ]
        return {
            "kind": "generation",
            "device": state.device,
            "model": state.model_name,
            "num_requests": spec.num_requests,
            "concurrency": concurrency,
            "prompt_tokens": spec.prompt_tokens,
            "max_tokens": spec.max_tokens,
            "completed": len(ok),
            "rejected": len(records) - len(ok),
            "truncated": bool(pending),
            "elapsed_s": elapsed,
            "output_tokens": tokens,
            "output_tokens_per_s": tokens / elapsed if elapsed > 0 else None,
            "requests_per_s": len(ok) / elapsed if elapsed > 0 else None,
            "ttft_s": _percentiles([r["ttft_s"] for r in ok if r["ttft_s"] is not None]),
            "tpot_s": _percentiles(tpot),
            "e2e_s": _percentiles([r["e2e_s"] for r in ok]),
        }
