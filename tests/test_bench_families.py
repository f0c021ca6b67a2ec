"""benchmarks/bench_families.py --quick: the benchmark runs end to end on tiny fp32 models,
the engine takes its fused forward for both families, and its greedy tokens equal
transformers' static-cache ``generate`` (the GPU run reports the same fields in bf16)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_families_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_families", REPO / "benchmarks" / "bench_families.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "families.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"gemma2", "qwen3"}
    for name, row in report["models"].items():
        assert row["engine_fused_layers"], name
        assert row["tokens_identical"], (name, row["tokens_agree_mean_prefix"])
        assert row["engine_tok_s"] > 0 and row["hf_static_tok_s"] > 0
