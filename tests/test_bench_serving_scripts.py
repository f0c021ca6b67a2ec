"""The pure parts of the serving benchmarks (benchmarks/bench_long_prompt.py, bench_sweep.py,
bench_long_context.py and their bench_support.py): tables, row specs, capacity arithmetic,
ratios and the load generator command line. The scripts' GPU runs are checked by their
``--quick`` CPU smoke runs, not here."""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> Any:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the scripts import bench_support as a sibling
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bs = _load("bench_support")
long_prompt = _load("bench_long_prompt")
long_context = _load("bench_long_context")
sweep = _load("bench_sweep")


def test_format_table_aligns_columns_prints_missing_values_and_errors() -> None:
    rows = [{"name": "a", "x": 1.23456, "n": 7}, {"name": "bb", "x": None}, {"name": "c", "error": "boom"}]
    text = bs.format_table(rows, [("name", "name", ""), ("x", "x", ".2f"), ("count", "n", "d")])
    assert text.splitlines() == [
        "name     x  count",
        "   a  1.23      7",
        "  bb     -      -",
        "   c  ERROR boom",
    ]


def test_random_prompts_are_seeded_in_range_and_never_special_ids() -> None:
    prompts = bs.random_prompts(3, 500, 16, seed=5)
    assert [len(p) for p in prompts] == [500, 500, 500]
    flat = [t for p in prompts for t in p]
    assert min(flat) == 2 and max(flat) == 15  # 1500 draws over 14 values reach both ends
    assert prompts == bs.random_prompts(3, 500, 16, seed=5)
    assert prompts != bs.random_prompts(3, 500, 16, seed=6)
    with pytest.raises(ValueError, match="length=0"):
        bs.random_prompts(1, 0, 16, seed=0)


def test_llama_config_scales_rope_as_llama_3_2() -> None:
    cfg = bs.llama_config(False, 131072, rope_scaled=True)
    rope = bs.rope_description(cfg)
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0
    assert rope["original_max_position_embeddings"] == 8192
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.vocab_size) == (2048, 16, 8, 128256)
    assert bs.rope_description(bs.llama_config(True, 2048, rope_scaled=False))["rope_type"] == "default"


def test_parse_rows_keeps_order_expands_all_and_names_a_bad_spec() -> None:
    loads = long_context.workloads(quick=False)
    assert long_context.parse_rows(["int4:128k", "bf16:32k"], long_context.FORMATS, loads) == [
        ("int4", "128k"), ("bf16", "32k")]
    every = long_context.parse_rows(["all"], long_context.FORMATS, loads)
    assert len(every) == len(set(every)) == len(long_context.FORMATS) * len(loads)
    for bad in ("bf16", "bf16:64k", "fp16:32k"):
        with pytest.raises(ValueError, match=f"row '{bad}'"):
            long_context.parse_rows([bad], long_context.FORMATS, loads)


def test_workloads_fit_the_context_with_their_output() -> None:
    for _prompts, length in long_context.workloads(quick=False).values():
        assert length + long_context.GEN_TOKENS <= long_context.CONTEXT
    assert long_context.workloads(quick=False)["32k"] == (16, 32768)
    assert long_context.workloads(quick=False)["128k"][0] == 4


def test_seqs_fit_counts_whole_blocks_per_sequence() -> None:
    # 32832 slots = 2052 blocks of 16; 16384 blocks hold 7 such sequences (7 * 2052 = 14364).
    assert long_context.seqs_fit(16384, 16, 32832) == 7
    assert long_context.seqs_fit(2052, 16, 32832) == 1
    assert long_context.seqs_fit(2051, 16, 32832) == 0
    # A partly filled last block still takes a whole block: 33 slots = 3 blocks.
    assert long_context.seqs_fit(100, 16, 33) == 33


def test_kv_slots_per_seq_under_eviction_is_the_budget_plus_one_chunk() -> None:
    args = type("Args", (), {"step_tokens": 16384})()
    assert long_context.kv_slots_per_seq("int4", 131136, args) == 131136
    # ratio 4: ceil(131136 / 4) = 32784 kept, plus a 16384-token chunk and one block.
    assert long_context.kv_slots_per_seq("hybrid4x", 131136, args) == 32784 + 16384 + 16
    # Short sequences keep at least sinks (4) + window (256) + a block, never more than they have.
    assert long_context.kv_slots_per_seq("hybrid4x", 200, args) == 200


def _tiny_engine(fmt: str) -> tuple[Any, Any]:
    cfg = bs.llama_config(True, 1024, rope_scaled=True)
    model = bs.build_model(cfg, torch.device("cpu"))
    args = type("Args", (), {"context": 1024, "kv_bytes": 1 << 20, "step_tokens": 128})()
    engine = long_context.build_engine(model, bs.wordlevel_tokenizer(cfg.vocab_size), fmt, 2, args,
                                       torch.device("cpu"))
    return cfg, engine


@pytest.mark.parametrize("fmt", ["bf16", "int8", "hybrid4x"])
def test_pool_blocks_predicts_the_engines_pool(fmt: str) -> None:
    """The fit column is computed before the engine exists: it must match the engine's pool."""
    cfg, engine = _tiny_engine(fmt)
    predicted = long_context.pool_blocks(fmt, cfg, 1 << 20, torch.float32, torch.device("cpu"))
    assert predicted == engine.stats().kv_blocks_total > 0


def test_run_workload_generates_every_token_and_stops_at_its_deadline() -> None:
    cfg, engine = _tiny_engine("bf16")
    prompts = bs.random_prompts(3, 40, cfg.vocab_size, seed=1)
    row = long_context.run_workload(engine, prompts, torch.device("cpu"), deadline=time.perf_counter() + 600)
    assert row["max_running"] == 2  # max_num_seqs of _tiny_engine
    assert row["output_tok_s"] * row["wall_s"] == pytest.approx(3 * long_context.GEN_TOKENS)
    assert row["total_tok_s"] * row["wall_s"] == pytest.approx(3 * (40 + long_context.GEN_TOKENS))
    assert 0 < row["ttft_first_s"] <= row["ttft_max_s"] < row["wall_s"]
    assert row["ttft_p50_s"] <= row["ttft_max_s"]
    with pytest.raises(TimeoutError, match=r"0 of 3 requests done in 1 steps"):
        long_context.run_workload(engine, prompts, torch.device("cpu"), deadline=time.perf_counter() - 1)


def test_add_ratios_divides_by_the_best_dense_time_of_the_same_prompt() -> None:
    rows = [
        {"kind": "dense", "prompt": "8k", "variant": "sdpa-cudnn", "ttft_s": 0.30},
        {"kind": "dense", "prompt": "8k", "variant": "sdpa-flash", "ttft_s": 0.20},
        {"kind": "engine", "prompt": "8k", "variant": "chunk 8192", "ttft_s": 0.25},
        {"kind": "engine", "prompt": "32k", "variant": "chunk 8192", "ttft_s": 1.0},  # no dense row: no ratio
        {"kind": "engine", "prompt": "8k", "variant": "chunk 16384", "error": "OOM"},
    ]
    long_prompt.add_ratios(rows)
    assert rows[2]["ratio_vs_best_dense"] == pytest.approx(1.25)
    assert rows[2]["ratio_vs_cudnn"] == pytest.approx(0.25 / 0.30)
    assert rows[0]["ratio_vs_best_dense"] == pytest.approx(1.5)
    assert "ratio_vs_best_dense" not in rows[3] and "ratio_vs_best_dense" not in rows[4]


def test_prompt_lengths_leave_room_for_the_http_output() -> None:
    lengths = long_prompt.prompt_lengths(quick=False)
    assert lengths["8k"] == 8192 and lengths["32k"] == 32768
    assert lengths["128k"] + long_prompt.HTTP_GEN_TOKENS == long_prompt.CONTEXT == 131072


def _sweep_args(**overrides: Any) -> Any:
    values = {"endpoint": "generate", "random_input_len": 220, "random_output_len": 200, "random_sigma": 1.0,
              "request_timeout_s": 120.0, "issue_s": 30.0, "shared_prefix_fraction": 0.0, "slo_ttft_ms": 500.0,
              "slo_tpot_ms": 20.0, "slo_itl_ms": None, "slo_e2el_ms": None}
    values.update(overrides)
    return type("Args", (), values)()


def test_loadgen_command_parses_with_the_loadgen_parser() -> None:
    from stream_attention.clients import loadgen

    cmd = sweep.loadgen_command("http://127.0.0.1:1234", math.inf, _sweep_args(shared_prefix_fraction=0.25),
                                seed=3, num_requests=80, json_path=Path("/tmp/x.json"))
    assert cmd[1:3] == ["-m", "stream_attention.clients.loadgen"]
    cfg = loadgen.config_from_args(loadgen.build_parser().parse_args(cmd[3:]))
    assert (cfg.url, cfg.dataset_name, cfg.num_requests, cfg.seed) == ("http://127.0.0.1:1234", "random", 80, 3)
    assert (cfg.random_input_len, cfg.random_output_len, cfg.duration) == (220, 200, 30.0)
    assert cfg.shared_prefix_fraction == 0.25
    assert cfg.slo_ms == {"ttft": 500.0, "tpot": 20.0}
    assert loadgen.build_parser().parse_args(cmd[3:]).request_rate == [math.inf]


def _run(rate: Any, completed: int) -> dict[str, Any]:
    pct = {"p50": 0.01, "p90": 0.02, "p99": 0.03, "mean": 0.015}
    summary = {"requests": 4, "completed": completed, "requests_per_s": 2.0, "goodput_requests_per_s": 1.0,
               "output_tokens_per_s": 100.0, "ttft_s": pct, "itl_s": pct, "tpot_s": pct, "e2e_s": pct}
    return {"config": {"url": "u", "rate": rate, "endpoint": "generate"}, "request_rate": rate, "summary": summary}


def test_sweep_keeps_error_rows_out_of_the_loadgen_shape_and_in_the_table() -> None:
    runs = [_run(4.0, 4), {"request_rate": "8", "error": "loadgen timed out after 60 s"}, _run("inf", 4)]
    shaped = sweep.as_loadgen_sweep(runs)
    assert [r["request_rate"] for r in shaped["runs"]] == [4.0, "inf"]
    assert shaped["config"]["request_rates"] == [4.0, "inf"] and shaped["config"]["rate"] is None
    lines = sweep.sweep_table(runs).splitlines()
    assert len(lines) == 4
    assert lines[1].split()[:5] == ["4", "4/4", "2.00", "1.00", "100"]
    assert "ERROR loadgen timed out" in lines[2]
    assert lines[3].split()[0] == "inf"
    assert sweep.as_loadgen_sweep([runs[1]]) == {"config": {}, "runs": []}
