"""Speculative decoding on an editing workload: tokens/s with and without n-gram proposals.

    python benchmarks/bench_spec.py --out spec.json            # GPU (< 150 s on an H200)
    python benchmarks/bench_spec.py --out spec.json --quick    # CPU smoke run

Model: the embedded default model (a Python-code base model), greedy decoding, so the
speculative outputs must equal the plain ones token for token (``identical``).

Workload ("rewrite this file"): each prompt holds a source file of this repository (its
first ``--prompt-tokens`` tokens), then a comment asking for the same file rewritten and
the file's first line; the continuation copies much of the prompt, which is what prompt
lookup exploits. ``--gen`` tokens per request (EOS ignored), batch 1 (each prompt alone,
one after another, the first four prompts) and batch 8 (all at once).

Per configuration (plain; ngram with each ``--k``): one engine, a warm-up generate, then
the timed runs. Reported per (configuration, batch): ``tokens_per_s`` (generated tokens /
wall time of ``generate``), ``acceptance_rate`` (accepted / proposed draft tokens),
``tokens_per_verify`` (1 + accepted / drafts: what a sequence gains per verify step),
``speedup`` over plain at the same batch, ``identical`` (outputs equal to plain). Each
timed run lasts a fraction of a second on a GPU, so it is repeated three times and the
median wall time counts (a profiled run is timed once).
On CUDA both replay CUDA graphs (verify steps their own, ``1 + K`` query tokens per row)
and both are pipelined (a step's text side overlaps the next step on the device).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from stream_attention.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402

SOURCES = [
    "stream_attention/engine/block_manager.py", "stream_attention/engine/scheduler.py",
    "stream_attention/engine/sampler.py", "stream_attention/engine/sequence.py",
    "stream_attention/engine/tokenizer.py", "stream_attention/engine/config.py",
    "stream_attention/engine/attention_spec.py", "stream_attention/engine/client.py",
]


BATCH1_REQUESTS = 4  # batch 1: this many requests, one after the other


def editing_prompts(tokenizer: Any, n: int, prompt_tokens: int) -> list[list[int]]:
    """``n`` prompts: a file's head, an instruction to rewrite it, and its first line."""
    prompts = []
    for path in SOURCES[:n]:
        text = (REPO / path).read_text()
        ids = tokenizer.encode(text)[:prompt_tokens]
        head = tokenizer.decode(ids)
        first_line = head.split("\n", 1)[0]
        prompt = f"# file: {path}\n{head}\n\n# The same file, rewritten with clearer names:\n{first_line}"
        prompts.append(tokenizer.encode(prompt))
    return prompts


def run_config(method: str, k: int, prompts: list[list[int]], gen: int, batches: list[int],
               device: str, dtype: str = "auto", profile: bool = False, repeats: int = 3,
               ) -> tuple[list[dict[str, Any]], dict[int, list[list[int]]]]:
    cfg = EngineConfig(device=device, dtype=dtype, speculative_method=method, num_speculative_tokens=k,
                       prompt_lookup_min=1, prompt_lookup_max=4, max_num_seqs=max(batches),
                       cuda_graph_max_batch=max(batches), enable_prefix_caching=False)
    t0 = time.perf_counter()
    engine = LLMEngine(config=cfg)
    load_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)
    rows, outputs = [], {}
    for batch in batches:
        # Warm-up: the same run untimed, so every kernel variant the verify steps meet (query
        # lengths, split counts) is compiled before the clock starts.
        generate(engine, prompts, params, batch)
        before = engine.stats()
        sync(device)
        prof = None
        if profile and batch == 1:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        walls = []
        for _ in range(repeats):  # each run is a fraction of a second: the median of a few
            t0 = time.perf_counter()
            outs = generate(engine, prompts, params, batch)
            sync(device)
            walls.append(time.perf_counter() - t0)
            if prof is not None:
                break
        wall = sorted(walls)[len(walls) // 2]
        if prof is not None:
            import pstats

            prof.disable()
            print(f"host profile, {method} k={k} batch 1 (top functions by own time, then by cumulative time):")
            pstats.Stats(prof).sort_stats("tottime").print_stats(28)
            pstats.Stats(prof).sort_stats("cumulative").print_stats("stream_attention", 28)
        after = engine.stats()
        tokens = sum(len(o.token_ids) for o in outs)  # per run (every run generates the same)
        runs = 1 if prof is not None else repeats
        drafts = after.spec_decode_num_drafts_total - before.spec_decode_num_drafts_total
        proposed = after.spec_decode_num_draft_tokens_total - before.spec_decode_num_draft_tokens_total
        accepted = after.spec_decode_num_accepted_tokens_total - before.spec_decode_num_accepted_tokens_total
        outputs[batch] = [list(o.token_ids) for o in outs]
        rows.append({
            "method": method, "k": k if method != "none" else 0, "batch": batch, "requests": len(outs),
            "generated_tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "runs": runs, "wall_s_all": [round(w, 4) for w in walls],
            "acceptance_rate": round(accepted / proposed, 3) if proposed else None,
            "tokens_per_verify": round(1 + accepted / drafts, 2) if drafts else None,
            "load_s": round(load_s, 1),
        })
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks, "KV blocks leaked"
    del engine
    return rows, outputs


def generate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, batch: int) -> list[Any]:
    """Batch 1: the first prompts one after another; otherwise ``batch`` prompts at once."""
    if batch == 1:
        return [o for p in prompts[:BATCH1_REQUESTS] for o in engine.generate([p], params)]
    return engine.generate(prompts[:batch], params)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--k", type=int, nargs="+", default=[4, 8], help="num_speculative_tokens values to run")
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=8, help="the batched run's size (at most 8 prompts)")
    ap.add_argument("--dtype", default="auto", help="model dtype (float32 separates rounding from logic "
                    "when checking that speculative greedy output equals plain)")
    ap.add_argument("--profile", action="store_true", help="print host profiles of the plain and the first ngram batch-1 runs")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: short prompts and outputs, batch 1 and 2")
    args = ap.parse_args()
    batches = [1, min(args.batch, len(SOURCES))]
    if args.quick:
        args.gen, args.prompt_tokens, args.k, batches = 24, 200, [4], [1, 2]
    t_start = time.perf_counter()
    from stream_attention.engine.tokenizer import load_tokenizer
    from stream_attention.models import default_model_dir

    tok = load_tokenizer(str(default_model_dir()))
    prompts = editing_prompts(tok, max(batches), args.prompt_tokens)

    results: list[dict[str, Any]] = []
    plain_rows, plain_out = run_config("none", 1, prompts, args.gen, batches, args.device, args.dtype,
                                       profile=args.profile)
    results += plain_rows
    base = {r["batch"]: r["tokens_per_s"] for r in plain_rows}
    for k in args.k:
        rows, out = run_config("ngram", k, prompts, args.gen, batches, args.device, args.dtype,
                               profile=args.profile and k == args.k[0])
        for r in rows:
            r["speedup"] = round(r["tokens_per_s"] / base[r["batch"]], 2)
            r["identical"] = out[r["batch"]] == plain_out[r["batch"]]
        results += rows

    report = {
        "benchmark": "bench_spec",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": "stream-attention-default",
        "workload": {"prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts], "gen": args.gen,
                     "greedy": True, "ignore_eos": True},
        "results": results,
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"{'method':<8}{'k':>3}{'batch':>6}{'tok/s':>10}{'accept':>8}{'tok/verify':>11}{'speedup':>9}{'same':>6}")
    for r in results:
        print(f"{r['method']:<8}{r['k']:>3}{r['batch']:>6}{r['tokens_per_s']:>10.1f}"
              f"{(r['acceptance_rate'] if r['acceptance_rate'] is not None else float('nan')):>8.2f}"
              f"{(r['tokens_per_verify'] or float('nan')):>11.2f}{r.get('speedup', 1.0):>9.2f}"
              f"{str(r.get('identical', '-')):>6}")
    print(f"wrote {args.out} in {report['total_s']} s")


if __name__ == "__main__":
    main()
