"""FP8 (e4m3) attention forward against our bf16 forward and SDPA cuDNN, on one GPU.

    python benchmarks/bench_fp8.py --out fp8.json [--quick] [--budget-s 80] [--dims 128] [--causal no]

Grid: bf16 inputs, 16k tokens per batch (B = 16384 / N), hidden 2048 (H = 2048 / D),
D = 128 (and 64 unless --quick), non-causal then causal, N in 1k..16k. Every
implementation gets the same ``torch.randn`` ``[B, N, H, D]`` tensors:

* ``bf16``: our Triton forward as shipped, ``fused_attention(q, k, v, causal=...,
  backend="triton")`` (TMA kernel on Hopper, measured default configs; ``--autotune-bf16``
  autotunes it instead);
* ``fp8``: the fp8 kernel alone on pre-quantized inputs (``attention_forward_fp8``, TMA
  loads on Hopper), its 4 configs autotuned (``--no-fp8-autotune``: the default config);
* ``fp8_ptr``: the same kernel with pointer loads (``tma=False``);
* ``fp8_quant``: quantization + the ``fp8`` kernel; ``quant``: quantization alone;
* ``cudnn``: SDPA with ``SDPBackend.CUDNN_ATTENTION`` on the transposed views (bf16).

Times are ``triton.testing.do_bench`` medians after a warm-up call (which also compiles
and autotunes); TFLOP/s with FLOPs = 4·B·H·N²·D, halved when causal. Accuracy on a slice
(batch 0, the first 2 heads): norm-wise relative error of each output against float64
attention of the same bf16 inputs, and for fp8 also against float64 attention of its
dequantized inputs (the kernel's own error: P's e4m3 rounding) with the LSE's max error.

Budget: under 90 s on an H100. Each new (D, causal, length bucket: N <= 4096 or not)
compiles the bf16 kernel once and autotunes both fp8 paths (4 configs each; cold compiles
dominate), so rows run in priority order (D=128 non-causal first) and a row is skipped
(listed under ``skipped``) when the slowest row of its kind so far would end past
``--budget-s``. Split the grid over several calls with ``--dims`` / ``--causal`` if needed
(compiled kernels are cached on disk between calls on the same machine). The JSON is
rewritten after every row; ``tuned_configs`` records what the fp8 autotuner chose.
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
IMPLS = ("bf16", "fp8", "fp8_ptr", "fp8_quant", "quant", "cudnn")


def fwd_flops(batch: int, heads: int, n: int, d: int, causal: bool) -> float:
    flops = 4.0 * batch * heads * n * n * d
    return flops / 2 if causal else flops


def _bench(fn, warmup_ms: int, rep_ms: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def time_row(
    n: int, d: int, causal: bool, warmup_ms: int, rep_ms: int, device: str = "cuda", fp8_autotune: bool = True
) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from stream_attention.core.functional import fused_attention
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

    def run_fp8(x, tma=None):
        return fp8.attention_forward_fp8(x, causal=causal, softmax_scale=scale, tma=tma, autotune=fp8_autotune)[0]

    fns = {
        "bf16": lambda: fused_attention(q, k, v, causal=causal, softmax_scale=scale, backend="triton"),
        "fp8": lambda: run_fp8(qkv),
        "fp8_ptr": lambda: run_fp8(qkv, tma=False),
        "fp8_quant": lambda: run_fp8(fp8.quantize_qkv_fp8(q, k, v)),
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
    for a, b in (("fp8", "bf16"), ("fp8_ptr", "bf16"), ("fp8", "cudnn"), ("fp8_quant", "bf16"), ("bf16", "cudnn")):
        ta, tb = row[a].get("tflops"), row[b].get("tflops")
        row[f"{a}/{b}"] = ta / tb if ta and tb else None
    best = max((row[x].get("tflops") or 0.0 for x in ("fp8", "fp8_ptr")), default=0.0)
    row["best_fp8/bf16"] = best / row["bf16"]["tflops"] if best and row["bf16"].get("tflops") else None

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
    for name, tma in (("fp8", None), ("fp8_ptr", False)):
        try:
            out8, lse8 = fp8.attention_forward_fp8(qkv, causal=causal, softmax_scale=scale, tma=tma)
            errors[f"{name}_vs_dequant_ref"] = _rel(out8[sl], deq_ref)
            lse_err = (lse8[:1, :SLICE_HEADS].double() - deq_lse).abs().max()
            errors[f"{name}_lse_max_abs_vs_dequant_ref"] = float(lse_err)
        except Exception as exc:
            errors[f"{name}_vs_dequant_ref"] = f"{type(exc).__name__}: {str(exc)[:200]}"
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
    ap.add_argument("--autotune-bf16", action="store_true", help="autotune the bf16 kernel (default: shipped configs)")
    ap.add_argument("--no-fp8-autotune", action="store_true", help="the fp8 kernel's default config, no tuning")
    args = ap.parse_args()
    if args.autotune_bf16:
        os.environ["STREAM_ATTENTION_AUTOTUNE"] = "1"

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
        "bf16_autotune": args.autotune_bf16,
        "fp8_autotune": not args.no_fp8_autotune,
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
                kind = "plain" if key in seen_keys else "tune"
                started = time.perf_counter()
                if started - t0 + max(took[kind], default=guess[kind]) > args.budget_s:
                    report["skipped"].append({"N": n, "D": d, "causal": causal})
                    continue
                row = time_row(n, d, causal, warmup_ms, rep_ms, fp8_autotune=not args.no_fp8_autotune)
                seen_keys.add(key)
                took[kind].append(time.perf_counter() - started)
                row["t_s"] = time.perf_counter() - t0
                report["rows"].append(row)
                flush()
                tf = {name: row[name].get("tflops", float("nan")) for name in IMPLS if name != "quant"}
                print(
                    f"D={d} causal={causal!s:5} N={n:5}  TFLOP/s "
                    + "  ".join(f"{name}={val:.0f}" for name, val in tf.items())
                    + f"  best fp8/bf16={row['best_fp8/bf16'] or float('nan'):.2f}  [{row['t_s']:.0f} s]",
                    flush=True,
                )
                torch.cuda.empty_cache()
    report["tuned_configs"] = {**tuned_configs(), **fp8.tuned_fp8_configs()}
    flush()
    print_table(report)
    print(f"wrote {out_path} in {report['elapsed_s']:.0f} s", flush=True)
    return 0


def print_table(report: dict) -> None:
    def cell(x, spec):
        return format(x, spec) if isinstance(x, (int, float, str)) else "-"

    # (header, getter, format)
    cols = [
        ("D", lambda r: r["D"], "d"),
        ("causal", lambda r: "yes" if r["causal"] else "no", "s"),
        ("N", lambda r: r["N"], "d"),
        *[(f"{name} TF/s", lambda r, n=name: r[n].get("tflops"), ".0f") for name in IMPLS if name != "quant"],
        ("quant ms", lambda r: r["quant"].get("ms"), ".3f"),
        ("fp8/bf16", lambda r: r["fp8/bf16"], ".2f"),
        ("ptr/bf16", lambda r: r["fp8_ptr/bf16"], ".2f"),
        ("fp8/cuDNN", lambda r: r["fp8/cudnn"], ".2f"),
        ("fp8+q/bf16", lambda r: r["fp8_quant/bf16"], ".2f"),
        ("err fp8", lambda r: r["rel_err_vs_f64"].get("fp8"), ".4f"),
        ("err bf16", lambda r: r["rel_err_vs_f64"].get("bf16"), ".4f"),
        ("err cuDNN", lambda r: r["rel_err_vs_f64"].get("cudnn"), ".4f"),
        ("fp8 vs deq", lambda r: r["rel_err_vs_f64"].get("fp8_vs_dequant_ref"), ".4f"),
    ]
    table = [[h for h, _, _ in cols]] + [[cell(get(r), spec) for _, get, spec in cols] for r in report["rows"]]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    for k, line in enumerate(table):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    for r in report["rows"]:
        for name in IMPLS:
            if "error" in r[name]:
                print(f"D={r['D']} causal={r['causal']} N={r['N']} {name}: {r[name]['error']}")
        if "quant_error" in r:
            print(f"D={r['D']} causal={r['causal']} N={r['N']} quantize: {r['quant_error']}")
    if report["skipped"]:
        print(f"skipped (time budget): {report['skipped']}")


if __name__ == "__main__":
    raise SystemExit(main())
