"""FP8 (e4m3) attention forward against our bf16 forward and SDPA cuDNN, on one GPU.

    python benchmarks/bench_fp8.py --out fp8.json [--quick] [--budget-s 80] [--no-autotune]

Grid: bf16 inputs, 16k tokens per batch (B = 16384 / N), hidden 2048 (H = 2048 / D),
D = 128 (and 64 unless --quick), non-causal then causal, N in 1k..16k. Every
implementation gets the same ``torch.randn`` ``[B, N, H, D]`` tensors:

* ``bf16``: our Triton forward, ``fused_attention(q, k, v, causal=..., backend="triton")``;
* ``fp8``: the fp8 kernel alone on pre-quantized inputs (``attention_forward_fp8``);
* ``fp8_quant``: quantization + kernel (``fused_attention_fp8``); ``quant``: quantization alone;
* ``cudnn``: SDPA with ``SDPBackend.CUDNN_ATTENTION`` on the transposed views (bf16).

Times are ``triton.testing.do_bench`` medians after a warm-up call (which also compiles
and autotunes); TFLOP/s with FLOPs = 4·B·H·N²·D, halved when causal. Accuracy on a slice
(batch 0, the first 2 heads): norm-wise relative error of each output against float64
attention of the same bf16 inputs, and for fp8 also against float64 attention of its
dequantized inputs (the kernel's own error: P's e4m3 rounding) with the LSE's max error.

Budget: under 90 s on an H100. Each new (D, causal, length bucket: N <= 4096 or not)
autotunes both Triton kernels (12 bf16 + 4 fp8 configs; cold compiles dominate), so rows
run in priority order (D=128 non-causal first) and a row is skipped (listed under
``skipped``) when the slowest row of its kind so far would end past ``--budget-s``. Split
the grid over several calls with ``--dims`` / ``--causal`` if needed (compiled kernels are
cached on disk between calls on the same machine). The JSON is rewritten after every row.
``--no-autotune`` launches the first config of each kernel (fast, not representative).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOKENS, HIDDEN, SLICE_HEADS = 16384, 2048, 2
IMPLS = ("bf16", "fp8", "fp8_quant", "quant", "cudnn")


def fwd_flops(batch: int, heads: int, n: int, d: int, causal: bool) -> float:
    flops = 4.0 * batch * heads * n * n * d
    return flops / 2 if causal else flops


def _bench(fn, warmup_ms: int, rep_ms: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def time_row(n: int, d: int, causal: bool, warmup_ms: int, rep_ms: int, device: str = "cuda") -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from stream_attention.core.functional import fused_attention, fused_attention_fp8
    from stream_attention.kernels import attention_fp8 as fp8

    dev = torch.device(device)
    batch, heads = TOKENS // n, HIDDEN // d
    scale = d**-0.5
    g = torch.Generator(device=dev).manual_seed(n * 1000 + d + int(causal))
    q, k, v = (torch.randn(batch, n, heads, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    row: dict = {"N": n, "D": d, "causal": causal, "B": batch, "H": heads}
    try:
        qkv = fp8.quantize_qkv_fp8(q, k, v)
    except Exception as exc:  # recorded; the fp8 cells below then fail and say so too
        qkv = None
        row["quant_error"] = f"{type(exc).__name__}: {str(exc)[:400]}"

    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=scale
            )
        return o.transpose(1, 2)

    fns = {
        "bf16": lambda: fused_attention(q, k, v, causal=causal, softmax_scale=scale, backend="triton"),
        "fp8": lambda: fp8.attention_forward_fp8(qkv, causal=causal, softmax_scale=scale)[0],
        "fp8_quant": lambda: fused_attention_fp8(q, k, v, causal=causal, softmax_scale=scale),
        "quant": lambda: fp8.quantize_qkv_fp8(q, k, v),
        "cudnn": cudnn,
    }
    flops = fwd_flops(batch, heads, n, d, causal)
    row["flops"] = flops
    outs = {}
    for name, fn in fns.items():
        try:
            with torch.no_grad():
                res = fn()  # compile / autotune outside the timing
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                ms = _bench(fn, warmup_ms, rep_ms)
            cell = {"ms": ms}
            if name != "quant":
                cell["tflops"] = flops / (ms * 1e-3) / 1e12
                outs[name] = res
            row[name] = cell
        except Exception as exc:  # keep the row (and the JSON) going; say what failed
            row[name] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
    for a, b in (("fp8", "bf16"), ("fp8", "cudnn"), ("fp8_quant", "bf16"), ("bf16", "cudnn")):
        ta, tb = row[a].get("tflops"), row[b].get("tflops")
        row[f"{a}/{b}"] = ta / tb if ta and tb else None

    # Accuracy on a slice: batch 0, the first SLICE_HEADS heads (K/V heads = Q heads here).
    sl = (slice(0, 1), slice(None), slice(0, SLICE_HEADS))
    chunk = 2048
    exact, _ = fp8.attention_ref_f64(q[sl], k[sl], v[sl], causal=causal, softmax_scale=scale, q_chunk=chunk)
    errors = {name: _rel(o[sl], exact) for name, o in outs.items()}
    row["rel_err_vs_f64"] = errors
    if qkv is None:
        return row
    qkv_slice = fp8.Fp8QKV(
        qkv.q[sl],
        qkv.q_scale[:1, :SLICE_HEADS],
        qkv.k[sl],
        qkv.k_scale[:1, :SLICE_HEADS],
        qkv.v_t[:1, :SLICE_HEADS],
        qkv.v_scale[:1, :SLICE_HEADS],
        qkv.block_m,
        qkv.block_n,
    )
    dq, dk, dv = fp8.dequantize_qkv(qkv_slice, torch.float64)
    deq_ref, deq_lse = fp8.attention_ref_f64(dq, dk, dv, causal=causal, softmax_scale=scale, q_chunk=chunk)
    try:
        out8, lse8 = fp8.attention_forward_fp8(qkv, causal=causal, softmax_scale=scale)
        errors["fp8_vs_dequant_ref"] = _rel(out8[sl], deq_ref)
        errors["fp8_lse_max_abs_vs_dequant_ref"] = float((lse8[:1, :SLICE_HEADS].double() - deq_lse).abs().max())
    except Exception as exc:
        errors["fp8_vs_dequant_ref"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return row


def main() -> int:
    t0 = time.perf_counter()  # the budget counts imports and CUDA start-up too
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="D=128 only, shorter timing")
    ap.add_argument("--dims", type=int, nargs="+", default=None, help="head dims (default 128 64; --quick: 128)")
    ap.add_argument("--causal", choices=("both", "no", "yes"), default="both", help="which masks to run")
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384], help="sequence lengths")
    ap.add_argument("--budget-s", type=float, default=80.0, help="skip rows that would end past this many seconds")
    ap.add_argument("--no-autotune", action="store_true", help="first config of each Triton kernel, no tuning")
    args = ap.parse_args()
    if args.no_autotune:
        os.environ["STREAM_ATTENTION_AUTOTUNE"] = "0"

    import torch

    if not torch.cuda.is_available():
        print("bench_fp8 needs a CUDA GPU", file=sys.stderr)
        return 2

    import triton

    from stream_attention.core.benchmarking import spin_up_gpu, tuned_configs
    from stream_attention.kernels import attention_fp8 as fp8
    from stream_attention.kernels.attention_fwd import _bucket

    seqs = args.seqs
    dims = args.dims or ([128] if args.quick else [128, 64])
    causals = {"both": (False, True), "no": (False,), "yes": (True,)}[args.causal]
    warmup_ms, rep_ms = (10, 30) if args.quick else (20, 60)
    report: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "inputs": "bf16 torch.randn [B, N, H, D], B = 16384 / N, H = 2048 / D",
        "flops": "4*B*H*N^2*D (/2 causal)",
        "fp8": f"e4m3; Q, K scales per 128-row block, V per channel; P scaled by {fp8.P_SCALE:g} before its cast",
        "autotune": not args.no_autotune,
        "quick": args.quick,
        "rows": [],
        "skipped": [],
    }
    out_path = Path(args.out)

    def flush() -> None:
        report["elapsed_s"] = time.perf_counter() - t0
        out_path.write_text(json.dumps(report, indent=1))

    spin_up_gpu()
    # A row that opens a new (D, causal, length bucket) autotunes (compiles) both kernels;
    # start a row only if the slowest row of its kind so far still fits in the budget.
    seen_keys: set = set()
    took: dict[str, list[float]] = {"tune": [], "plain": []}
    guess = {"tune": 25.0, "plain": 3.0}  # seconds, until a row of the kind has been measured
    for d in dims:
        for causal in causals:
            for n in seqs:
                key = (d, causal, _bucket(n))
                kind = "plain" if key in seen_keys or args.no_autotune else "tune"
                started = time.perf_counter()
                if started - t0 + max(took[kind], default=guess[kind]) > args.budget_s:
                    report["skipped"].append({"N": n, "D": d, "causal": causal})
                    continue
                row = time_row(n, d, causal, warmup_ms, rep_ms)
                seen_keys.add(key)
                took[kind].append(time.perf_counter() - started)
                row["t_s"] = time.perf_counter() - t0
                report["rows"].append(row)
                flush()
                tf = {name: row[name].get("tflops", float("nan")) for name in IMPLS if name != "quant"}
                print(
                    f"D={d} causal={causal!s:5} N={n:5}  TFLOP/s "
                    + "  ".join(f"{name}={val:.0f}" for name, val in tf.items())
                    + f"  fp8/bf16={row['fp8/bf16'] or float('nan'):.2f}  [{row['t_s']:.0f} s]",
                    flush=True,
                )
                torch.cuda.empty_cache()
    configs = tuned_configs()
    for key, cfg in getattr(fp8._attn_fwd_fp8_tuned, "cache", {}).items():
        configs[f"fp8{tuple(key)}"] = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    report["tuned_configs"] = configs
    flush()
    print_table(report)
    print(f"wrote {out_path} in {report['elapsed_s']:.0f} s", flush=True)
    return 0


def print_table(report: dict) -> None:
    def f(x, spec=".0f"):
        return format(x, spec) if isinstance(x, (int, float)) else "  -"

    head = (
        f"{'D':>4} {'causal':>6} {'N':>6} | {'bf16':>5} {'fp8':>5} {'fp8+q':>5} {'cuDNN':>5} TFLOP/s | "
        f"{'fp8/bf16':>8} {'fp8/cuDNN':>9} {'fp8+q/bf16':>10} | {'err fp8':>8} {'err bf16':>8} {'err cuDNN':>9} "
        f"{'fp8 vs deq':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in report["rows"]:
        e = r["rel_err_vs_f64"]
        print(
            f"{r['D']:>4} {r['causal']!s:>6} {r['N']:>6} | {f(r['bf16'].get('tflops')):>5} "
            f"{f(r['fp8'].get('tflops')):>5} {f(r['fp8_quant'].get('tflops')):>5} {f(r['cudnn'].get('tflops')):>5}"
            f"         | {f(r['fp8/bf16'], '.2f'):>8} {f(r['fp8/cudnn'], '.2f'):>9} {f(r['fp8_quant/bf16'], '.2f'):>10} | "
            f"{f(e.get('fp8'), '.4f'):>8} {f(e.get('bf16'), '.4f'):>8} {f(e.get('cudnn'), '.4f'):>9} "
            f"{f(e.get('fp8_vs_dequant_ref'), '.4f'):>10}"
        )
    for r in report["rows"]:
        for name in IMPLS:
            if "error" in r[name]:
                print(f"D={r['D']} causal={r['causal']} N={r['N']} {name}: {r[name]['error']}")
    if report["skipped"]:
        print(f"skipped (time budget): {report['skipped']}")


if __name__ == "__main__":
    raise SystemExit(main())
