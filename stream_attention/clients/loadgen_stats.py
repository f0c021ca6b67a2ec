"""The load generator's measurements: per-request timings, percentiles, throughput, goodput.

Definitions follow vLLM's ``benchmark_serving``:

- TTFT: request sent → first token received; E2E: request sent → last event.
- ITL: each gap between token-bearing events, shared among the tokens the later event brought.
- TPOT: ``(e2e - ttft) / (output_tokens - 1)``, for requests of more than one token.
- Goodput: completed requests that meet every given SLO, per second of the run. An SLO on
  TTFT, TPOT or E2E compares that request's value; an SLO on ITL compares the request's
  largest inter-token gap (one stall fails it). A request of one token has no TPOT or ITL
  and meets those SLOs (vLLM counts its TPOT as 0).

Timestamps come in from the caller (the HTTP driver passes ``time.perf_counter()``), so
everything here runs on a fake clock in tests.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

SLO_KEYS = ("ttft", "itl", "tpot", "e2el")  # vLLM's --goodput keys, plus itl


@dataclass
class RequestRecord:
    """One request's outcome and timings (seconds, relative to ``start``)."""

    ok: bool
    status: int | None = None
    error: str | None = None
    start: float = 0.0
    ttft: float | None = None
    e2e: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    disconnected: bool = False
    last_token_at: float | None = None

    def tokens_arrived(self, now: float, n: int) -> None:
        """``n`` tokens came in one event at ``now``: the first sets TTFT, later ones add ITLs."""
        if n <= 0:
            return
        if self.last_token_at is None:
            self.ttft = now - self.start
        else:
            self.itl.extend([(now - self.last_token_at) / n] * n)
        self.last_token_at = now
        self.output_tokens += n

    def finished(self, now: float) -> None:
        self.e2e = now - self.start
        self.ok = True


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99 (nearest rank) and mean; ``None`` when there are no values."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "mean": statistics.fmean(ordered)}


def time_per_output_token(r: RequestRecord) -> float | None:
    """``(e2e - ttft) / (output_tokens - 1)``; ``None`` below two tokens or without timings."""
    if r.ttft is None or r.e2e is None or r.output_tokens < 2:
        return None
    return (r.e2e - r.ttft) / (r.output_tokens - 1)


def check_slo(slo_ms: dict[str, float]) -> dict[str, float]:
    """``slo_ms`` validated: keys among ttft/itl/tpot/e2el, values > 0 milliseconds."""
    for key, value in slo_ms.items():
        if key not in SLO_KEYS:
            raise ValueError(f"SLO {key!r}: expected one of {', '.join(SLO_KEYS)}")
        if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
            raise ValueError(f"SLO {key}: expected a positive number of milliseconds, got {value!r}")
    return dict(slo_ms)


def meets_slo(r: RequestRecord, slo_ms: dict[str, float]) -> bool:
    """Whether a completed request meets every SLO in ``slo_ms`` (milliseconds)."""
    if not r.ok or r.disconnected or r.ttft is None or r.e2e is None:
        return False
    measured = {
        "ttft": r.ttft,
        "itl": max(r.itl, default=0.0),
        "tpot": time_per_output_token(r) or 0.0,
        "e2el": r.e2e,
    }
    return all(measured[key] * 1e3 <= limit for key, limit in slo_ms.items())


def summarize(records: list[RequestRecord], elapsed: float, slo_ms: dict[str, float] | None = None) -> dict[str, Any]:
    """Counts, throughputs, latency percentiles and (given SLOs) goodput of one run."""
    ok = [r for r in records if r.ok and not r.disconnected]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = str(r.status) if r.status and r.status >= 400 else (r.error or "error").split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    out_tokens = sum(r.output_tokens for r in records if r.ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)

    def per_s(x: float) -> float:
        return x / elapsed if elapsed > 0 else 0.0

    summary: dict[str, Any] = {
        "requests": len(records),
        "completed": len(ok),
        "disconnected": sum(r.disconnected for r in records),
        "failed": sum(not r.ok for r in records),
        "errors": errors,
        "duration_s": elapsed,
        "requests_per_s": per_s(len(ok)),
        "input_tokens": prompt_tokens,
        "output_tokens": out_tokens,
        "output_tokens_per_s": per_s(out_tokens),
        "total_tokens_per_s": per_s(out_tokens + prompt_tokens),
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": percentiles([x for r in ok for x in r.itl]),
        "tpot_s": percentiles([t for r in ok if (t := time_per_output_token(r)) is not None]),
        "e2e_s": percentiles([r.e2e for r in ok if r.e2e is not None]),
    }
    if slo_ms:
        good = sum(meets_slo(r, slo_ms) for r in ok)
        summary |= {"slo_ms": dict(slo_ms), "good_requests": good, "goodput_requests_per_s": per_s(good)}
    return summary
