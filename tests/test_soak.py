"""The soak benchmark (benchmarks/soak.py) against the live test server: a short run must
pass its own verdict (no 5xx, no unexpected answer, no KV block left in use, bounded RSS),
and the verdict must name each kind of failure."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")

REPO = Path(__file__).resolve().parents[1]


def _soak_module() -> Any:
    spec = importlib.util.spec_from_file_location("benchmarks_soak", REPO / "benchmarks" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


soak = _soak_module()


def test_short_soak_against_the_live_server_passes(request: pytest.FixtureRequest) -> None:
    from tests.test_server import shared_server

    srv = shared_server("main", request.config)
    cfg = soak.SoakConfig(url=srv.url, requests=24, concurrency=16, duration_s=120, max_prompt_tokens=64,
                          max_output_tokens=16, sample_interval_s=0.2, seed=3)
    report = asyncio.run(soak.soak(cfg))
    problems = soak.verdict(report)
    assert not problems, (problems, report["failure_examples"])
    assert report["requests_sent"] == 24
    kinds = {k.split(":")[0] for k in report["outcomes"]}
    assert {"bad", "disconnect", "generate"} <= kinds, kinds
    assert all(code.startswith("4") for k, v in report["outcomes"].items() if k.startswith("bad:") for code in v)
    assert report["kv_blocks_used_max"] > 0 and report["kv_blocks_used_idle"] == 0
    assert report["rss_first_bytes"] > 0 and len(report["samples"]) >= 3


def _report(**overrides: Any) -> dict[str, Any]:
    base = {"failures": {}, "kv_blocks_used_idle": 0.0, "idle_running": 0.0, "idle_waiting": 0.0,
            "rss_growth_pct": 1.0, "config": {"max_rss_growth_pct": 5.0}}
    return {**base, **overrides}


def test_verdict_names_each_failure() -> None:
    assert soak.verdict(_report()) == []
    assert soak.verdict(_report(failures={"server_error": 2})) == ["2 server_error"]
    assert "3 KV blocks still in use once idle" in soak.verdict(_report(kv_blocks_used_idle=3.0))
    assert "not idle" in soak.verdict(_report(idle_waiting=1.0))[0]
    assert "RSS grew 7.5%" in soak.verdict(_report(rss_growth_pct=7.5))[0]


def test_rss_growth_compares_late_load_with_warm_up() -> None:
    def s(t: float, rss: float) -> Any:
        return soak.Sample(t=t, rss_bytes=rss, cuda_allocated_bytes=0, kv_blocks_used=0, running=0, waiting=0)

    # Growth during warm-up (first 20%) is not counted; growth after it is.
    flat = [s(0, 100), s(1, 150), s(2, 200), s(5, 200), s(9, 201), s(10, 200)]
    assert soak.rss_growth(flat, 10.0, 0.2)["rss_growth_pct"] == pytest.approx(0.5)
    leak = [s(0, 100), s(2, 200), s(5, 230), s(9, 260), s(10, 270)]
    assert soak.rss_growth(leak, 10.0, 0.2)["rss_growth_pct"] == pytest.approx(35.0)
