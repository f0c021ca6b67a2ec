"""Request-rate sweep of the HTTP server (issue 18 part 3): ``stream-attention-loadgen`` at
several Poisson request rates against ``stream-attention-serve`` on the 1B Llama shape.

    python benchmarks/bench_sweep.py --out sweep.json [--plot sweep.png]     # GPU, < 200 s on an H200
    python benchmarks/bench_sweep.py --out smoke.json --quick                # CPU smoke run, tiny model
    python benchmarks/bench_sweep.py --from sweep.json --plot sweep.png      # the PNG later, on any machine

The model (random weights, bf16, the shape of ``bench_engine.py``) is saved to a temporary
directory and served by ``python -m stream_attention.server`` in a child process, in its
default engine mode. After a warm-up run, each rate is one ``python -m
stream_attention.clients.loadgen --request-rate R`` process (a failed or timed-out rate
becomes an error row; the others still run) with ShareGPT-like random lengths
(``--dataset-name random``: log-normal, mean 220 prompt / 200 output tokens), a fresh seed
per rate (so the server's prefix cache does not serve one rate's prompts to the next) and
goodput SLOs on TTFT and TPOT. Per rate: throughput, goodput, TTFT/ITL/TPOT/end-to-end
p50/p90/p99. The JSON holds the loadgen sweep (``sweep``: the shape ``loadgen --json``
writes for several rates), which ``--plot`` draws with the loadgen's own plot.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_support as bs  # noqa: E402


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def loadgen_command(url: str, rate: float, args: argparse.Namespace, seed: int, num_requests: int,
                    json_path: Path) -> list[str]:
    """The ``stream-attention-loadgen`` command line of one rate."""
    cmd = [sys.executable, "-m", "stream_attention.clients.loadgen", "--url", url, "--endpoint", args.endpoint,
           "--dataset-name", "random", "--random-input-len", str(args.random_input_len),
           "--random-output-len", str(args.random_output_len), "--random-sigma", str(args.random_sigma),
           "--request-rate", rate_label(rate), "--num-requests", str(num_requests), "--seed", str(seed),
           "--timeout", str(args.request_timeout_s), "--json", str(json_path)]  # fmt: skip
    if args.issue_s:
        cmd += ["--duration", str(args.issue_s)]
    if args.shared_prefix_fraction:
        cmd += ["--shared-prefix-fraction", str(args.shared_prefix_fraction)]
    for key in ("ttft", "itl", "tpot", "e2el"):
        if (ms := getattr(args, f"slo_{key}_ms")) is not None:
            cmd += [f"--slo-{key}-ms", str(ms)]
    return cmd


def run_rate(url: str, rate: float, args: argparse.Namespace, seed: int, num_requests: int, work: Path,
             timeout_s: float) -> dict[str, Any]:
    """One loadgen process at ``rate``: its run (``runs[0]`` of its JSON) or an error row."""
    json_path = work / f"rate-{rate_label(rate)}-{seed}.json"
    cmd = loadgen_command(url, rate, args, seed, num_requests, json_path)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=bs.REPO)
    except subprocess.TimeoutExpired as exc:
        return {"request_rate": rate_label(rate), "error": f"loadgen timed out after {timeout_s:.0f} s",
                "output_tail": str(exc.stdout or "")[-1500:]}
    wall = time.perf_counter() - start
    print(proc.stdout[-3000:], flush=True)
    if not json_path.exists():
        return {"request_rate": rate_label(rate), "error": f"loadgen exited {proc.returncode} without a report",
                "output_tail": (proc.stdout + proc.stderr)[-2000:]}
    run = json.loads(json_path.read_text())["runs"][0]
    run["loadgen_exit_code"] = proc.returncode
    run["loadgen_wall_s"] = wall
    return run


def sweep_table(runs: list[dict[str, Any]]) -> str:
    """Per rate: throughputs, goodput and latency percentiles (ms) in one table."""
    rows = []
    for run in runs:
        if "error" in run:
            rows.append({"rate": str(run["request_rate"]), "error": run["error"]})
            continue
        s = run["summary"]
        rate = run["request_rate"]
        row = {"rate": rate if isinstance(rate, str) else f"{rate:g}", "done": f"{s['completed']}/{s['requests']}", "req_s": s["requests_per_s"],
               "good_s": s.get("goodput_requests_per_s"), "out_tok_s": s["output_tokens_per_s"]}
        for name in ("ttft", "itl", "tpot", "e2e"):
            for q in ("p50", "p90", "p99"):
                value = s[f"{name}_s"][q]
                row[f"{name}_{q}"] = None if value is None else value * 1e3
        rows.append(row)
    columns = [("rate", "rate", ""), ("done", "done", ""), ("req/s", "req_s", ".2f"), ("goodput", "good_s", ".2f"),
               ("out tok/s", "out_tok_s", ".0f")]
    columns += [(f"{n.upper()} {q}", f"{n}_{q}", ".1f") for n in ("ttft", "itl", "tpot") for q in ("p50", "p90", "p99")]
    columns += [("E2E p50", "e2e_p50", ".0f")]
    return bs.format_table(rows, columns)


def as_loadgen_sweep(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The successful runs in the shape ``loadgen --json`` writes for a sweep (what
    ``loadgen.plot_sweep`` and ``loadgen.format_sweep`` read)."""
    ok = [r for r in runs if "summary" in r]
    if not ok:
        return {"config": {}, "runs": []}
    config = {**ok[0]["config"], "rate": None, "request_rates": [r["request_rate"] for r in ok]}
    return {"config": config, "runs": ok}


def plot(report: dict[str, Any], png: str) -> None:
    """The loadgen's latency/goodput PNG of the sweep (needs matplotlib; a message if absent)."""
    from stream_attention.clients.loadgen import plot_sweep

    sweep = report.get("sweep") or {}
    if not sweep.get("runs"):
        print("no successful rate to plot", file=sys.stderr)
        return
    try:
        plot_sweep(sweep, png)
        print(f"wrote {png}")
    except ValueError as exc:  # matplotlib missing: make the PNG later from the JSON
        print(f"no plot: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON report to write (required unless --from)")
    ap.add_argument("--from", dest="from_json", metavar="JSON", help="no run: table (and --plot) of a saved report")
    ap.add_argument("--plot", metavar="PNG", help="latency and goodput against request rate (needs matplotlib)")
    ap.add_argument("--quick", action="store_true", help="tiny model and few short requests (a CPU smoke run)")
    ap.add_argument("--rates", nargs="+", type=float, default=None,
                    help="requests/s, 'inf' = all at once (default 4 8 16 32 64 inf; quick: 8 inf)")
    ap.add_argument("--num-requests", type=int, default=None, help="per rate (default 80; quick 4)")
    ap.add_argument("--issue-s", type=float, default=30.0, help="per rate: stop issuing requests after this long")
    ap.add_argument("--random-input-len", type=int, default=None, help="mean prompt tokens (default 220; quick 32)")
    ap.add_argument("--random-output-len", type=int, default=None, help="mean output tokens (default 200; quick 8)")
    ap.add_argument("--random-sigma", type=float, default=1.0, help="log-normal spread of the lengths")
    ap.add_argument("--shared-prefix-fraction", type=float, default=0.0, help="share of requests with a system prompt")
    ap.add_argument("--endpoint", choices=("generate", "completions"), default="generate")
    ap.add_argument("--slo-ttft-ms", type=float, default=500.0, help="goodput SLO on time to first token")
    ap.add_argument("--slo-tpot-ms", type=float, default=20.0, help="goodput SLO on time per output token")
    ap.add_argument("--slo-itl-ms", type=float, default=None, help="goodput SLO on the largest inter-token gap")
    ap.add_argument("--slo-e2el-ms", type=float, default=None, help="goodput SLO on end-to-end latency")
    ap.add_argument("--max-model-len", type=int, default=None, help="the server's context (default 4096; quick 512)")
    ap.add_argument("--kv-gib", type=float, default=16.0, help="the server's KV pool on CUDA (0: its default)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable)")
    ap.add_argument("--server-ready-s", type=float, default=120.0, help="wait at most this long for the server's /ready")
    ap.add_argument("--request-timeout-s", type=float, default=120.0, help="per request (loadgen --timeout)")
    ap.add_argument("--budget-s", type=float, default=190.0, help="skip rates that would not fit in this")
    args = ap.parse_args(argv)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        print(sweep_table(report["runs"]))
        if args.plot:
            plot(report, args.plot)
        return 0
    if not args.out:
        ap.error("--out is required (or --from a saved report)")
    budget = bs.Budget(args.budget_s)
    device = bs.pick_device()
    if device.type != "cuda" and not args.quick:
        print("bench_sweep.py needs a CUDA GPU (or --quick for a CPU smoke run)", file=sys.stderr)
        return 2
    q = args.quick
    rates = args.rates or ([8.0, math.inf] if q else [4.0, 8.0, 16.0, 32.0, 64.0, math.inf])
    args.num_requests = args.num_requests or (4 if q else 80)
    args.random_input_len = args.random_input_len or (32 if q else 220)
    args.random_output_len = args.random_output_len or (8 if q else 200)
    args.max_model_len = args.max_model_len or (512 if q else 4096)
    args.rates = [rate_label(r) for r in rates]  # "inf", not JSON's non-standard Infinity
    report: dict[str, Any] = {"benchmark": "request_rate_sweep", **bs.environment(device, args)}
    runs: list[dict[str, Any]] = []
    work = bs.temp_dir("bench-sweep-")
    work_dir = Path(work.name)
    server = None
    try:
        cfg = bs.llama_config(q, args.max_model_len, rope_scaled=False)
        model = bs.build_model(cfg, device)
        report["model"] = {"shape": bs.TINY if q else bs.LLAMA_1B, "dtype": str(next(model.parameters()).dtype),
                           "params_B": sum(p.numel() for p in model.parameters()) / 1e9}
        model_dir = bs.save_model(model, bs.wordlevel_tokenizer(cfg.vocab_size), work_dir / "model")
        del model
        bs.free_device_memory(device)
        flags = ["--model", str(model_dir), "--device", device.type, "--max-model-len", str(args.max_model_len),
                 *args.server_arg]
        if device.type == "cuda" and args.kv_gib > 0:
            flags += ["--kv-cache-memory-bytes", str(int(args.kv_gib * 2**30))]
        report["server_flags"] = flags
        ready_s = max(30.0, min(args.server_ready_s, budget.left() - 40.0))
        server = bs.ServerProcess(flags, ready_timeout_s=ready_s, log_dir=work_dir)
        report["server_startup_s"] = server.startup_s
        print(f"server ready in {server.startup_s:.1f} s at {server.url}", flush=True)

        # Warm-up: kernels, CUDA graphs and allocator pools before the first measured rate.
        warm = run_rate(server.url, math.inf, args, seed=10_000, num_requests=min(16, 4 * args.num_requests),
                        work=work_dir, timeout_s=max(30.0, min(90.0, budget.left() - 30.0)))
        report["warmup"] = {k: warm.get(k) for k in ("error", "loadgen_wall_s")} | {
            "completed": warm.get("summary", {}).get("completed")}
        for i, rate in enumerate(rates):
            issue_s = min(args.issue_s or math.inf, args.num_requests / rate) if rate > 0 else 0.0
            # Issue time, then the long-tailed outputs' drain (a request of a few thousand
            # tokens at ~10 ms a token), then the process's start-up.
            needed = issue_s + 15.0
            if not budget.allows(needed):
                runs.append({"request_rate": rate_label(rate),
                             "error": f"skipped: {budget.left():.0f} s of the budget left, ~{needed:.0f} s needed"})
                print(runs[-1]["error"], flush=True)
                continue
            runs.append(run_rate(server.url, rate, args, seed=i + 1, num_requests=args.num_requests, work=work_dir,
                                 timeout_s=max(30.0, min(budget.left(), issue_s + 3 * args.request_timeout_s))))
            bs.write_report(args.out, {**report, "runs": runs, "sweep": as_loadgen_sweep(runs)}, final=False)
    except Exception as exc:  # noqa: BLE001 - a server that does not start: the report says why
        report["error"] = bs.error_row(exc)
    finally:
        if server is not None:
            report["server_log_tail"] = server.tail(2000)
            server.stop()
        report["runs"] = runs
        report["sweep"] = as_loadgen_sweep(runs)
        report["total_s"] = budget.elapsed()
        bs.write_report(args.out, report)
        work.cleanup()
    print(sweep_table(runs))
    if args.plot:
        plot(report, args.plot)
    print(f"total {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
