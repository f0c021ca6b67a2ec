"""Long-context serving with a compressed KV cache (issue 20): 16 x 32k and 4 x 128k prompts
on one GPU, per KV page format, in one table.

    python benchmarks/bench_long_context.py --out long_context.json                # GPU, ~200 s on an H200
    python benchmarks/bench_long_context.py --out all.json --rows all --budget-s 600
    python benchmarks/bench_long_context.py --out smoke.json --quick               # CPU smoke run, tiny model

Model: the 1B Llama shape (random weights, bf16) with Llama 3.2's RoPE scaling to 128k
(``max_position_embeddings`` 131072). Workloads: ``32k`` = 16 prompts of 32768 random
tokens, ``128k`` = 4 prompts of 131072 - 64, each generating 64 tokens (EOS ignored), all
submitted at once to one ``LLMEngine`` whose KV pool has the same byte budget
(``--kv-gib``, default 8 GiB) in every format:

- ``bf16``: 16-bit pages (``kv_cache_dtype="auto"``);
- ``fp8``: e4m3 pages (``kv_cache_dtype="fp8"``); ``int8`` / ``int4``: quantized pages
  with per-token scales;
- ``hybrid4x``: ``kv_compression="hybrid"``, ``kv_compression_ratio=4``: int4 pages and
  heavy-hitter eviction down to a quarter of each sequence's tokens.

Each row's engine runs at most as many sequences as its pool holds to the end
(``max_num_seqs`` = ``fit``: whole prompt plus output for float/quantized pages; for
``hybrid4x`` a quarter of that plus one step's chunk, the sinks and the window), as an
operator would size it. With more (``--seqs all``), chunked prefill admits prompts the
pool cannot finish (admission needs room for one chunk, not the prompt), and the newest
is preempted once the pool fills, losing a prefill of up to 128k tokens that is then
recomputed: that measures the scheduler, not the page format.

Per row: wall time and throughput (output tokens/s, and prompt + output tokens/s, which a
prefill-bound workload is judged by), TTFT from submission (p50, max; later requests
wait for a sequence slot, so this is a serving TTFT) and of the first request, the
sequences that fit, the most that ran at once, preemptions, blocks evicted, and peak GPU
memory (in all: weights + pool + activations).

Rows are ``FORMAT:WORKLOAD`` pairs run in the order given, each on its own engine (the
format's kernels compile once, in its first row's warm-up). The default set is the most
informative that fits ~200 s on an H200: every format at 32k, and 128k for bf16, int4 and
hybrid4x (where capacity differs most); ``--rows all`` adds fp8 and int8 at 128k. A row
that would not fit the remaining ``--budget-s`` is skipped and reported as skipped.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_support as bs  # noqa: E402

from stream_attention.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from stream_attention.engine.kv_compression import KVPoolLayout  # noqa: E402

CONTEXT = 131072
GEN_TOKENS = 64
FORMATS: dict[str, dict[str, Any]] = {
    "bf16": {"kv_cache_dtype": "auto"},
    "fp8": {"kv_cache_dtype": "fp8"},
    "int8": {"kv_cache_dtype": "int8"},
    "int4": {"kv_cache_dtype": "int4"},
    "hybrid4x": {"kv_compression": "hybrid", "kv_compression_ratio": 4.0},
}
DEFAULT_ROWS = ("bf16:32k", "bf16:128k", "fp8:32k", "int8:32k", "int4:32k", "int4:128k", "hybrid4x:32k",
                "hybrid4x:128k")
ALL_ROWS = (*DEFAULT_ROWS, "fp8:128k", "int8:128k")


def workloads(quick: bool) -> dict[str, tuple[int, int]]:
    """Label -> (prompts, prompt tokens)."""
    if quick:
        return {"32k": (4, 192), "128k": (2, 1024 - GEN_TOKENS)}
    return {"32k": (16, 32768), "128k": (4, CONTEXT - GEN_TOKENS)}


def parse_rows(specs: list[str], names: dict[str, Any], loads: dict[str, Any]) -> list[tuple[str, str]]:
    """``["bf16:32k", "int4:128k"]`` -> ``[("bf16", "32k"), ("int4", "128k")]``; ``["all"]``
    is every row. ``ValueError`` names a spec with an unknown format or workload."""
    if specs == ["all"]:
        specs = list(ALL_ROWS)
    rows = []
    for spec in specs:
        fmt, sep, load = spec.partition(":")
        if not sep or fmt not in names or load not in loads:
            raise ValueError(f"row {spec!r}: expected FORMAT:WORKLOAD with FORMAT in {', '.join(names)} "
                             f"and WORKLOAD in {', '.join(loads)}")
        rows.append((fmt, load))
    return rows


def seqs_fit(blocks: int, block_size: int, tokens_per_seq: int) -> int:
    """Sequences of ``tokens_per_seq`` KV slots that a pool of ``blocks`` holds at once."""
    return blocks // -(-tokens_per_seq // block_size)


def kv_slots_per_seq(fmt: str, length: int, args: argparse.Namespace) -> int:
    """KV slots one sequence of ``length`` tokens holds at its largest: all of them, or
    under eviction its budget (a 1/ratio share, at least sinks + window) plus the step's
    chunk written before the step's eviction."""
    ratio = FORMATS[fmt].get("kv_compression_ratio")
    if ratio is None:
        return length
    cfg = EngineConfig()
    kept = max(-(-length // int(ratio)), cfg.kv_sink_tokens + cfg.kv_window_tokens + cfg.block_size)
    return min(length, kept + args.step_tokens + cfg.block_size)


def pool_blocks(fmt: str, model_cfg: Any, kv_bytes: int, dtype: torch.dtype, device: torch.device) -> int:
    """Blocks an engine of this page format gets from ``kv_bytes`` (what it will allocate)."""
    engine_cfg = EngineConfig(**FORMATS[fmt])
    layout = KVPoolLayout(model_cfg.num_hidden_layers, engine_cfg.block_size, model_cfg.num_key_value_heads,
                          model_cfg.head_dim, engine_cfg.kv_compression_config().page_format, dtype)
    return layout.blocks_for_budget(kv_bytes, device)


def build_engine(model: Any, tok: Any, fmt: str, max_num_seqs: int, args: argparse.Namespace,
                 device: torch.device) -> Any:
    return LLMEngine(
        model, tok, device=str(device), max_model_len=args.context, kv_cache_memory_bytes=args.kv_bytes,
        max_num_seqs=max_num_seqs, cuda_graph_max_batch=max_num_seqs, max_num_batched_tokens=args.step_tokens,
        enable_chunked_prefill=True, enable_prefix_caching=False, **FORMATS[fmt],
    )  # fmt: skip


def warm_up(engine: Any, vocab: int, step_tokens: int) -> float:
    """One prompt longer than a step (a fresh chunk, then one over cached pages) and a few
    decode steps: the format's kernels compile here, not in a timed row."""
    t0 = time.perf_counter()
    prompt = bs.random_prompts(1, min(step_tokens + 512, engine.max_model_len - 8), vocab, seed=999)[0]
    engine.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))
    return time.perf_counter() - t0


def run_workload(engine: Any, prompts: list[list[int]], device: torch.device, deadline: float) -> dict[str, Any]:
    """All ``prompts`` submitted at once; steps until every one has its ``GEN_TOKENS``.
    Past ``deadline`` (``time.perf_counter()``) it stops and raises ``TimeoutError``
    saying how far it got (the engine is then discarded)."""
    params = SamplingParams(max_tokens=GEN_TOKENS, ignore_eos=True)
    before = engine.stats()
    start_bytes = bs.reset_peak(device)
    t0 = time.perf_counter()
    ids = [engine.add_request(p, params, stream=False, bounded=False) for p in prompts]
    wanted, final, max_running, steps = set(ids), {}, 0, 0
    while len(final) < len(ids):
        for out in engine.step():
            if out.request_id in wanted and out.finished:
                final[out.request_id] = out
        steps += 1
        stats = engine.stats()
        max_running = max(max_running, stats.running)
        if time.perf_counter() > deadline:
            raise TimeoutError(
                f"cut at the time budget after {time.perf_counter() - t0:.0f} s: {len(final)} of {len(ids)} requests "
                f"done in {steps} steps, {max_running} running at most, "
                f"{stats.preemptions_total - before.preemptions_total} preemptions")
    bs.sync(device)
    wall = time.perf_counter() - t0
    after = engine.stats()
    outs = [final[i] for i in ids]
    if any(len(o.token_ids) != GEN_TOKENS for o in outs):
        raise RuntimeError(f"expected {GEN_TOKENS} tokens per request, got {[len(o.token_ids) for o in outs]}")
    ttft = [o.time_to_first_token for o in outs]
    prompt_tokens = sum(len(p) for p in prompts)
    output_tokens = GEN_TOKENS * len(prompts)
    return {
        "wall_s": wall, "steps": steps,
        "output_tok_s": output_tokens / wall, "total_tok_s": (prompt_tokens + output_tokens) / wall,
        "ttft_first_s": ttft[0], "ttft_p50_s": statistics.median(ttft), "ttft_max_s": max(ttft),
        "max_running": max_running,
        "preemptions": after.preemptions_total - before.preemptions_total,
        "kv_blocks_evicted": after.kv_blocks_evicted_total - before.kv_blocks_evicted_total,
        "kv_compression_ratio_end": after.kv_compression_ratio,
        **bs.peak_since(device, start_bytes),
    }  # fmt: skip


COLUMNS = [("format", "format", ""), ("load", "workload", ""), ("wall s", "wall_s", ".1f"),
           ("out tok/s", "output_tok_s", ".0f"), ("all tok/s", "total_tok_s", ".0f"),
           ("TTFT 1st s", "ttft_first_s", ".2f"), ("TTFT p50 s", "ttft_p50_s", ".2f"), ("TTFT max s", "ttft_max_s", ".2f"),
           ("fit", "seqs_fit", "d"), ("ran", "max_running", "d"), ("preempt", "preemptions", "d"),
           ("evicted", "kv_blocks_evicted", "d"), ("KV tokens", "kv_tokens", "d"), ("peak GiB", "peak_gib", ".1f")]


def estimate_s(load: str, fmt: str, measured: dict[str, float], quick: bool) -> float:
    """Seconds a row may take: bf16's measured time of the workload (or a guess from the
    H200's dense prefill rate) times a margin for slower compressed-page kernels."""
    if quick:
        return 1.0
    base = measured.get(load) or {"32k": 8.0, "128k": 20.0}[load]
    return base * (1.0 if fmt == "bf16" else 2.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON report to write")
    ap.add_argument("--quick", action="store_true", help="tiny model and prompts (a CPU smoke run)")
    ap.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS),
                    help=f"FORMAT:WORKLOAD pairs in order, or 'all' (default: {' '.join(DEFAULT_ROWS)})")
    ap.add_argument("--kv-gib", type=float, default=8.0, help="KV pool bytes, the same for every format (GiB)")
    ap.add_argument("--step-tokens", type=int, default=None, help="max_num_batched_tokens (default 16384; quick 128)")
    ap.add_argument("--seqs", choices=("fit", "all"), default="fit",
                    help="max_num_seqs: the sequences the pool holds to the end (fit), or every prompt (all)")
    ap.add_argument("--budget-s", type=float, default=195.0, help="skip rows that would not fit in this")
    args = ap.parse_args(argv)
    device = bs.pick_device()
    if device.type != "cuda" and not args.quick:
        print("bench_long_context.py needs a CUDA GPU (or --quick for a CPU smoke run)", file=sys.stderr)
        return 2
    budget = bs.Budget(args.budget_s)
    loads = workloads(args.quick)
    try:
        rows_todo = parse_rows(args.rows, FORMATS, loads)
    except ValueError as exc:
        ap.error(str(exc))
    args.context = 1024 if args.quick else CONTEXT
    args.step_tokens = args.step_tokens or (128 if args.quick else 16384)
    args.kv_bytes = (1 << 20) if args.quick else int(args.kv_gib * 2**30)
    report: dict[str, Any] = {"benchmark": "long_context_compression", **bs.environment(device, args)}
    cfg, model, tok, report["model"] = bs.scaled_llama(args.quick, args.context, device)
    report["workloads"] = {k: {"prompts": n, "prompt_tokens": t, "gen_tokens": GEN_TOKENS} for k, (n, t) in
                           loads.items()}
    report["formats"] = {f: FORMATS[f] for f, _ in rows_todo}
    prompts = {load: bs.random_prompts(n, t, cfg.vocab_size, seed=i) for i, (load, (n, t)) in enumerate(loads.items())}
    rows: list[dict[str, Any]] = []
    measured: dict[str, float] = {}
    dtype = next(model.parameters()).dtype
    warmed: set[str] = set()
    print(bs.format_table([], COLUMNS), flush=True)
    try:
        for fmt, load in rows_todo:
            n, length = loads[load]
            row: dict[str, Any] = {"format": fmt, "workload": load}
            start_up = 0.0 if args.quick else 10.0 if fmt in warmed else 25.0  # engine, warm-up (+ compiling)
            needed = estimate_s(load, fmt, measured, args.quick) + start_up
            if not budget.allows(needed):
                row["error"] = f"skipped: {budget.left():.0f} s of the budget left, ~{needed:.0f} s needed"
                rows.append(row)
                print(bs.format_table([row], COLUMNS).splitlines()[-1], flush=True)
                continue
            engine = None
            try:
                blocks = pool_blocks(fmt, cfg, args.kv_bytes, dtype, device)
                fit = seqs_fit(blocks, EngineConfig().block_size, kv_slots_per_seq(fmt, length + GEN_TOKENS, args))
                if fit < 1:
                    raise ValueError(f"one sequence of {length + GEN_TOKENS} tokens does not fit {blocks} blocks")
                max_seqs = min(n, fit) if args.seqs == "fit" else n
                row.update(seqs_fit=fit, max_num_seqs=max_seqs)
                t0 = time.perf_counter()
                engine = build_engine(model, tok, fmt, max_seqs, args, device)
                row["engine_init_s"] = time.perf_counter() - t0
                row["warmup_s"] = warm_up(engine, cfg.vocab_size, args.step_tokens)
                warmed.add(fmt)
                stats = engine.stats()
                row.update(kv_blocks=stats.kv_blocks_total, kv_tokens=stats.kv_blocks_total * engine.config.block_size)
                # A row may overrun its estimate, not the whole budget (by more than a little).
                row.update(run_workload(engine, prompts[load], device, budget.start + budget.seconds + 10.0))
                if fmt == "bf16":
                    measured[load] = row["wall_s"]
            except Exception as exc:  # noqa: BLE001 - one failed row (an OOM, a kernel) leaves the rest running
                row.update(bs.error_row(exc))
            finally:
                del engine
                bs.free_device_memory(device)
            rows.append(row)
            print(bs.format_table([row], COLUMNS).splitlines()[-1], flush=True)
            bs.write_report(args.out, {**report, "rows": rows}, final=False)
    finally:
        report["rows"] = rows
        report["total_s"] = budget.elapsed()
        bs.write_report(args.out, report)
    print()
    print(bs.format_table(rows, COLUMNS))
    print(f"KV pool {args.kv_bytes / 2**30:g} GiB per format; fit = sequences the pool holds to their end "
          f"(prompt + {GEN_TOKENS} tokens; hybrid: its eviction budget); ran = most running at once; "
          f"total {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
