"""Long prompts on one GPU (issue 18 part 4): time to first token of 8k/32k/128k-token
prompts through the engine's chunked prefill, against one dense SDPA prefill in the same run.

    python benchmarks/bench_long_prompt.py --out long_prompt.json       # GPU, < 240 s on an H200
    python benchmarks/bench_long_prompt.py --out smoke.json --quick     # CPU smoke run, tiny model

Model: the 1B Llama shape of ``bench_engine.py`` (random weights, bf16) with Llama 3.2's
RoPE scaling (``rope_type="llama3"``, factor 32 from 8k) and ``max_position_embeddings``
131072. Prompts: random token ids; the "128k" prompt is 131072 - 16 tokens, so that the
HTTP request's 16 generated tokens fit the context.

- ``dense``: one forward of the whole prompt through transformers with
  ``attn_implementation="sdpa"``, per SDPA backend (cuDNN, flash), ``use_cache=False``
  and ``logits_to_keep=1`` (the 128k x vocab logits are never materialised).
- ``engine``: ``LLMEngine.generate(prompt, max_tokens=1)`` with chunked prefill at each
  ``--chunks`` size of ``max_num_batched_tokens`` (the engine's default is 8192); every
  chunk re-reads the K/V of the chunks before it, so the gap to dense at 128k should
  shrink with larger chunks if that is where it comes from. Prefix caching off, so every
  repeat computes the whole prompt.
- ``http``: the same model saved to a temporary directory and served by
  ``python -m stream_attention.server --max-model-len 131072`` (its default engine mode)
  in a child process; one 128k prompt streamed through ``/generate_stream`` by the
  library's load generator, twice (the first may include compilation start-up left), recording
  that it completes and its TTFT.

Times: a warm-up call, then repeated calls each between ``torch.cuda.synchronize()``
(median reported, every sample kept). Peak memory: ``torch.cuda.max_memory_allocated``
over the timed calls, in all and above what was allocated before them (the engine's
KV pool is allocated up front: it is in the first figure, not the second).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_support as bs  # noqa: E402

CONTEXT = 131072
HTTP_GEN_TOKENS = 16
SDPA_BACKENDS = ("cudnn", "flash", "efficient", "math")


def prompt_lengths(quick: bool) -> dict[str, int]:
    if quick:
        return {"128": 128, "512": 512, "2k": 2048 - HTTP_GEN_TOKENS}
    return {"8k": 8192, "32k": 32768, "128k": CONTEXT - HTTP_GEN_TOKENS}


def repeats_for(length: int, quick: bool) -> int:
    """Fewer repeats for longer prompts: a 128k prefill takes seconds."""
    if quick:
        return 2
    return 5 if length <= 8192 else 3 if length <= 32768 else 2


def kv_bytes_per_token(cfg: Any, elem: int) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem


@contextlib.contextmanager
def sdpa_backend(name: str):
    """Restrict SDPA to one backend (``default``: torch's own choice)."""
    if name == "default":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    with sdpa_kernel([backend]):
        yield


@contextlib.contextmanager
def kv_repeated_for_sdpa():
    """transformers' SDPA path without ``enable_gqa`` (K/V repeated per query head), for
    a backend that rejects grouped K/V."""
    from unittest import mock

    import transformers.integrations.sdpa_attention as hf_sdpa

    with mock.patch.object(hf_sdpa, "use_gqa_in_sdpa", lambda *args, **kwargs: False):
        yield


def dense_row(model: Any, prompt: list[int], label: str, backend: str, device: torch.device, quick: bool) -> dict:
    """One dense prefill of ``prompt`` through transformers' SDPA path (grouped K/V; with
    K/V repeated per head if ``backend`` rejects the grouped call)."""
    model.set_attn_implementation("sdpa")  # an engine built on this model switches it to its hook
    ids = torch.tensor([prompt], device=device)
    repeat_kv = False

    def run() -> None:
        with torch.inference_mode(), sdpa_backend(backend), \
                kv_repeated_for_sdpa() if repeat_kv else contextlib.nullcontext():
            out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
        assert out.logits.shape[1] == 1

    try:
        run()  # the warm-up
    except RuntimeError as exc:
        print(f"sdpa-{backend} with grouped K/V failed ({exc!s:.120}); retrying with K/V repeated", flush=True)
        repeat_kv = True
    if repeat_kv:
        run()
    start = bs.reset_peak(device)
    timing = bs.time_calls(run, device, repeats_for(len(prompt), quick), warmup=0)
    return {"kind": "dense", "prompt": label, "prompt_tokens": len(prompt), "variant": f"sdpa-{backend}",
            "kv_repeated": repeat_kv, "ttft_s": timing["median_s"], **timing, **bs.peak_since(device, start)}


def build_engine(model: Any, tok: Any, chunk: int, kv_bytes: int, device: torch.device) -> Any:
    from stream_attention.engine import LLMEngine

    return LLMEngine(
        model, tok, device=str(device), max_model_len=model.config.max_position_embeddings,
        kv_cache_memory_bytes=kv_bytes, max_num_seqs=2, max_num_batched_tokens=chunk, enable_chunked_prefill=True,
        enable_prefix_caching=False, use_cuda_graphs=False,  # one prompt at a time: no decode batches to replay
    )  # fmt: skip


def engine_rows(engine: Any, prompts: dict[str, list[int]], chunk: int, device: torch.device, quick: bool,
                warm_prompt: list[int]) -> list[dict]:
    """TTFT of each prompt through ``engine`` (``max_tokens=1``: the time to first token)."""
    from stream_attention.engine import SamplingParams

    one = SamplingParams(max_tokens=1, ignore_eos=True)
    engine.generate([warm_prompt], one)  # kernels compiled before any timed prompt
    rows = []
    for label, prompt in prompts.items():
        def row(label: str = label, prompt: list[int] = prompt) -> dict:
            reported: list[float] = []

            def run() -> None:
                out = engine.generate([prompt], one)[0]
                assert len(out.token_ids) == 1
                reported.append(out.time_to_first_token)

            start = bs.reset_peak(device)
            timing = bs.time_calls(run, device, repeats_for(len(prompt), quick))
            return {"kind": "engine", "prompt": label, "prompt_tokens": len(prompt), "variant": f"chunk {chunk}",
                    "chunk": chunk, "chunks_per_prompt": -(-len(prompt) // chunk), "ttft_s": timing["median_s"],
                    "engine_reported_ttft_s": reported[-1] if reported else None, **timing,
                    **bs.peak_since(device, start)}  # fmt: skip
        rows.append(bs.guarded(row, device))
        rows[-1].setdefault("prompt", label)
        rows[-1].setdefault("variant", f"chunk {chunk}")
        print(bs.format_table([rows[-1]], COLUMNS).splitlines()[-1], flush=True)
    return rows


def serve_over_http(model_dir: Path, prompt_tokens: int, vocab: int, device: torch.device, args: argparse.Namespace,
                    log_dir: Path, seconds_left: float) -> dict:
    """Serve one long prompt over HTTP (the server in a child process): completes? TTFT?
    Waiting for the server and for each request is bounded by ``seconds_left`` too."""
    from stream_attention.clients.loadgen import LoadConfig, run_load

    flags = ["--model", str(model_dir), "--device", device.type, "--max-model-len", str(args.context),
             "--max-num-batched-tokens", str(args.http_chunk), *args.server_arg]
    if device.type == "cuda":
        flags += ["--kv-cache-memory-bytes", str(int(args.http_kv_gib * 2**30))]
    result: dict[str, Any] = {"server_flags": flags}
    ready_s = max(30.0, min(args.server_ready_s, seconds_left - 20.0))
    server = bs.ServerProcess(flags, ready_timeout_s=ready_s, log_dir=log_dir)
    result["server_startup_s"] = server.startup_s
    request_s = max(20.0, min(args.http_timeout_s, (seconds_left - server.startup_s) / 2))
    try:
        runs = []
        for i, name in enumerate(("first", "second")):  # the first may compile what start-up did not
            cfg = LoadConfig(url=server.url, endpoint="generate", num_requests=1, concurrency=1,
                             prompt_tokens=prompt_tokens, max_tokens=HTTP_GEN_TOKENS, vocab_size=vocab,
                             seed=100 + i, timeout=request_s)  # fmt: skip
            s = asyncio.run(run_load(cfg))["summary"]
            runs.append({"run": name, "completed": s["completed"], "errors": s["errors"],
                         "ttft_s": s["ttft_s"]["p50"], "e2e_s": s["e2e_s"]["p50"], "itl_p50_s": s["itl_s"]["p50"],
                         "output_tokens": s["output_tokens"]})  # fmt: skip
            print(f"http {name}: {runs[-1]}", flush=True)
        result["runs"] = runs
        result["completed"] = all(r["completed"] == 1 for r in runs)
    finally:
        result["server_log_tail"] = server.tail(2000)
        server.stop()
    return result


COLUMNS = [("prompt", "prompt", ""), ("tokens", "prompt_tokens", "d"), ("path", "variant", ""),
           ("TTFT s", "ttft_s", ".3f"), ("min s", "min_s", ".3f"), ("vs dense", "ratio_vs_best_dense", ".2f"),
           ("vs cuDNN", "ratio_vs_cudnn", ".2f"), ("peak GiB", "peak_gib", ".2f"),
           ("+GiB", "peak_over_start_gib", ".2f")]  # fmt: skip


def add_ratios(rows: list[dict]) -> None:
    """Each row's TTFT over the best dense TTFT of the same prompt (and over cuDNN's)."""
    for row in rows:
        same = [r for r in rows if r.get("kind") == "dense" and r.get("prompt") == row.get("prompt") and "ttft_s" in r]
        if "ttft_s" not in row or not same:
            continue
        row["ratio_vs_best_dense"] = row["ttft_s"] / min(r["ttft_s"] for r in same)
        cudnn = [r for r in same if r["variant"] == "sdpa-cudnn"]
        if cudnn:
            row["ratio_vs_cudnn"] = row["ttft_s"] / cudnn[0]["ttft_s"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON report to write")
    ap.add_argument("--quick", action="store_true", help="tiny model and prompts (a CPU smoke run)")
    ap.add_argument("--chunks", type=int, nargs="+", default=None,
                    help="engine max_num_batched_tokens values, in order of interest (default 8192 131072 32768 16384: "
                    "the default, one step for the whole prompt, then between; quick: 64 2048 256)")
    ap.add_argument("--dense-backends", nargs="+", default=None, choices=("default", *SDPA_BACKENDS),
                    help="SDPA backends of the dense baseline (default: cudnn flash on CUDA, default on CPU)")
    ap.add_argument("--no-http", dest="http", action="store_false", help="skip the 128k prompt over HTTP")
    ap.add_argument("--http-chunk", type=int, default=8192, help="the server's --max-num-batched-tokens")
    ap.add_argument("--http-kv-gib", type=float, default=8.0, help="the server's KV pool (CUDA)")
    ap.add_argument("--http-timeout-s", type=float, default=60.0, help="per HTTP request (at most)")
    ap.add_argument("--server-ready-s", type=float, default=90.0, help="wait at most this long for the server's /ready")
    ap.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable)")
    ap.add_argument("--budget-s", type=float, default=225.0,
                    help="skip engine chunk sizes that would not leave time for the rest")
    args = ap.parse_args(argv)
    budget = bs.Budget(args.budget_s)
    device = bs.pick_device()
    if device.type != "cuda" and not args.quick:
        print("bench_long_prompt.py needs a CUDA GPU (or --quick for a CPU smoke run)", file=sys.stderr)
        return 2
    chunks = args.chunks or ([64, 2048, 256] if args.quick else [8192, 131072, 32768, 16384])
    backends = args.dense_backends or (["cudnn", "flash"] if device.type == "cuda" else ["default"])
    args.context = 2048 if args.quick else CONTEXT
    report: dict[str, Any] = {"benchmark": "long_prompt", **bs.environment(device, args)}
    cfg, model, tok, report["model"] = bs.scaled_llama(args.quick, args.context, device)
    lengths = prompt_lengths(args.quick)
    prompts = {label: bs.random_prompts(1, n, cfg.vocab_size, seed=i)[0] for i, (label, n) in enumerate(lengths.items())}
    report["prompt_tokens"] = lengths
    rows: list[dict] = []
    work = bs.temp_dir("bench-long-prompt-")
    work_dir = Path(work.name)
    try:
        model_dir = None
        if args.http:
            # Before any engine: the engine re-points q/k/v and gate/up at fused weights,
            # which save_pretrained would refuse as shared storage.
            t0 = time.perf_counter()
            model_dir = bs.save_model(model, tok, work_dir / "model")
            report["model_save_s"] = time.perf_counter() - t0

        print(bs.format_table([], COLUMNS), flush=True)
        for backend in backends:
            for label, prompt in prompts.items():
                rows.append(bs.guarded(lambda b=backend, lab=label, p=prompt: dense_row(model, p, lab, b, device,
                                                                                        args.quick), device))
                rows[-1].setdefault("prompt", label)
                rows[-1].setdefault("variant", f"sdpa-{backend}")
                print(bs.format_table([rows[-1]], COLUMNS).splitlines()[-1], flush=True)

        # What one engine configuration costs, from the dense times: every prompt
        # (1 warm-up + repeats) at up to 1.6x dense, plus start-up.
        dense_s = {r["prompt"]: r["ttft_s"] for r in rows if "ttft_s" in r}
        per_engine = 10.0 + sum(1.6 * dense_s.get(lab, 1.0) * (1 + repeats_for(n, args.quick))
                                for lab, n in lengths.items())
        http_reserve = 75.0 if args.http else 0.0
        elem = 2 if device.type == "cuda" else 4
        kv_bytes = kv_bytes_per_token(cfg, elem) * (args.context + 256) + (64 << 20)
        warm = bs.random_prompts(1, min(lengths.values()), cfg.vocab_size, seed=99)[0]
        report["skipped"] = []
        for i, chunk in enumerate(chunks):
            if i > 0 and not budget.allows(per_engine + http_reserve):
                report["skipped"].append({"chunk": chunk, "reason": f"budget: {budget.left():.0f} s left, "
                                          f"~{per_engine:.0f} s needed + {http_reserve:.0f} s for HTTP"})
                print(f"skipping chunk {chunk}: {report['skipped'][-1]['reason']}", flush=True)
                continue
            engine = None
            try:
                t0 = time.perf_counter()
                engine = build_engine(model, tok, chunk, kv_bytes, device)
                init_s = time.perf_counter() - t0
                for row in engine_rows(engine, prompts, chunk, device, args.quick, warm):
                    rows.append({**row, "engine_init_s": init_s})
            except Exception as exc:  # noqa: BLE001 - the engine did not build or warm up: one error row
                rows.append({"prompt": "all", "variant": f"chunk {chunk}", **bs.error_row(exc)})
            finally:
                del engine
                bs.free_device_memory(device)
            bs.write_report(args.out, {**report, "rows": rows}, final=False)
        add_ratios(rows)
        report["rows"] = rows
        bs.write_report(args.out, report, final=False)

        if args.http:
            del model
            bs.free_device_memory(device)
            report["http"] = bs.guarded(
                lambda: serve_over_http(model_dir, lengths[list(lengths)[-1]], cfg.vocab_size, device, args, work_dir,
                                        budget.left() + 15.0),
                device)  # fmt: skip
    finally:
        report.setdefault("rows", rows)
        report["total_s"] = budget.elapsed()
        bs.write_report(args.out, report)
        work.cleanup()
    add_ratios(rows)
    print()
    print(bs.format_table(rows, COLUMNS))
    if "http" in report:
        h = report["http"]
        print("http:", {k: h.get(k) for k in ("completed", "server_startup_s", "error")},
              [(r["run"], r["ttft_s"]) for r in h.get("runs", [])])
    print(f"total {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
