"""Forward-kernel variants on a Hopper GPU against SDPA cuDNN, SDPA flash and FlexAttention,
all in one process on the same inputs.

    python benchmarks/bench_hopper.py --out hopper.json [--png hopper.png] [--budget-s 240]

1. Sweep (N = 4096, 16k tokens per batch): the TMA-descriptor kernel over tile configs,
   with and without Triton's warp specialization, beside the pointer kernel; each
   compiled variant's registers, spills and count of Hopper ``wgmma`` instructions in
   its PTX are recorded (a matrix kernel without ``wgmma`` is on the slow path).
2. Grid (bf16, 16k tokens per batch, hidden 2048, D = 64/128, causal and not, N = 1k..16k):
   the default path of ``fused_attention`` and the pointer kernel beside the baselines;
   TFLOP/s from FLOPs = 4·B·H·N²·D (half when causal); ratios to each baseline.
Medians of ``triton.testing.do_bench`` after warm-up, clocks spun up first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stream_attention.core.benchmarking import attention_flops, spin_up_gpu  # noqa: E402
from stream_attention.core.kernel_benchmark import flex_attention_fn  # noqa: E402
from stream_attention.core.kernel_switches import KernelSwitches  # noqa: E402
from stream_attention.core.sdpa import sdpa_attention  # noqa: E402
from stream_attention.kernels import attention_fwd, attention_fwd_tma  # noqa: E402

# Per head dim: the configs worth timing (v6 sweep winners first). Warp specialization
# compiled to identical code on triton 3.6 / Hopper in v6, so it is not swept again.
SWEEP_CONFIGS = {128: [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4), (64, 128, 4, 2)],
                 64: [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4)]}


def _bench(fn) -> float:
    import triton.testing

    fn()
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _inputs(n: int, d: int, seed: int = 0):
    b, h = max(16384 // n, 1), 2048 // d
    gen = torch.Generator(device="cuda").manual_seed(seed + n + d)
    return [torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3)]


def _pointer(q, k, v, causal):
    return attention_fwd.attention_forward(q, k, v, causal=causal, softmax_scale=q.shape[-1] ** -0.5, tma=False,
                                           autotune=KernelSwitches.from_env().autotune)[0]


def _compiled_info(jit_fn) -> list[dict]:
    """Registers, spills and wgmma count of every variant this JIT function compiled."""
    rows = []
    for caches in getattr(jit_fn, "device_caches", {}).values():
        cache = caches[0] if isinstance(caches, tuple) else caches
        for kernel in getattr(cache, "values", lambda: [])():
            try:
                ptx = kernel.asm.get("ptx", "")
                consts = getattr(getattr(kernel, "src", None), "constants", {}) or {}
                rows.append({
                    "constants": {str(k): v for k, v in consts.items() if isinstance(v, (int, bool, str))},
                    "num_warps": kernel.metadata.num_warps,
                    "num_stages": kernel.metadata.num_stages,
                    "n_regs": getattr(kernel, "n_regs", None),
                    "n_spills": getattr(kernel, "n_spills", None),
                    "wgmma": ptx.count("wgmma.mma_async"),
                    "mma_sync": ptx.count("mma.sync"),
                    "cp_async_bulk_tensor": ptx.count("cp.async.bulk.tensor"),
                    "ex2": ptx.count("ex2.approx"),
                })
            except Exception as exc:  # introspection differs across triton versions
                rows.append({"error": repr(exc)[:200]})
    return rows


def sweep(report: dict, deadline: float) -> None:
    out = []
    for d in (128, 64):
        for causal in (False, True):
            q, k, v = _inputs(4096, d)
            flops = attention_flops(q.shape[0], q.shape[2], 4096, 4096, d, causal)
            ref = sdpa_attention(q, k, v, causal=causal, sdpa_backend="cudnn")
            base = {"pointer": _bench(lambda q=q, k=k, v=v, c=causal: _pointer(q, k, v, c))}
            base["sdpa-cudnn"] = _bench(lambda q=q, k=k, v=v, c=causal: sdpa_attention(q, k, v, causal=c,
                                                                                      sdpa_backend="cudnn"))
            for i, cfg in enumerate(SWEEP_CONFIGS[d]):
                for la in (False, True) if i < 3 else (False,):
                    if time.perf_counter() > deadline:
                        continue
                    row = {"D": d, "causal": causal, "config": cfg, "lookahead": la}
                    try:
                        def fn(q=q, k=k, v=v, c=causal, cfg=cfg, la=la, d=d):
                            return attention_fwd_tma.attention_forward_tma(
                                q, k, v, causal=c, softmax_scale=d**-0.5, config=cfg, lookahead=la)[0]
                        err = ((fn().float() - ref.float()).norm() / ref.float().norm()).item()
                        ms = _bench(fn)
                        row.update(ms=ms, tflops=flops / ms / 1e9, rel_err_vs_cudnn=err,
                                   over_cudnn=base["sdpa-cudnn"] / ms, over_pointer=base["pointer"] / ms)
                    except Exception as exc:
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                    out.append(row)
                    print(json.dumps(row), flush=True)
            out.append({"D": d, "causal": causal, "baselines_ms": base,
                        "baselines_tflops": {n: flops / ms / 1e9 for n, ms in base.items()}})
            print(json.dumps(out[-1]), flush=True)
    report["sweep"] = out
    report["compiled_tma"] = _compiled_info(attention_fwd_tma._attn_fwd_tma_kernel)
    report["compiled_pointer"] = _compiled_info(attention_fwd._attn_fwd_kernel)


def grid(report: dict, deadline: float, flex: bool) -> None:
    rows = []
    for d in (128, 64):
        for causal in (False, True):
            flex_fn = flex_attention_fn(causal, 2048 // d, 2048 // d) if flex else None
            for n in (1024, 2048, 4096, 8192, 16384):
                if time.perf_counter() > deadline:
                    rows.append({"D": d, "causal": causal, "N": n, "skipped": "time budget"})
                    continue
                q, k, v = _inputs(n, d, seed=1)
                flops = attention_flops(q.shape[0], q.shape[2], n, n, d, causal)
                impls = {
                    "fused": lambda q, k, v, c=causal, d=d: attention_fwd.attention_forward(
                        q, k, v, causal=c, softmax_scale=d**-0.5, **KernelSwitches.from_env().dense())[0],
                    "pointer": lambda q, k, v, c=causal: _pointer(q, k, v, c),
                    "sdpa-cudnn": lambda q, k, v, c=causal: sdpa_attention(q, k, v, causal=c, sdpa_backend="cudnn"),
                    "sdpa-flash": lambda q, k, v, c=causal: sdpa_attention(q, k, v, causal=c, sdpa_backend="flash"),
                }
                if flex_fn is not None:
                    impls["flex"] = flex_fn
                row: dict = {"D": d, "causal": causal, "N": n, "B": q.shape[0], "H": q.shape[2]}
                for name, fn in impls.items():
                    try:
                        ms = _bench(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v))
                        row[name] = {"ms": ms, "tflops": flops / ms / 1e9}
                    except Exception as exc:
                        row[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                for base in ("sdpa-cudnn", "sdpa-flash", "flex", "pointer"):
                    if "ms" in row.get(base, {}) and "ms" in row["fused"]:
                        row[f"fused_over_{base}"] = row[base]["ms"] / row["fused"]["ms"]
                rows.append(row)
                cells = "  ".join(f"{k}={v['tflops']:.0f}" for k, v in row.items() if isinstance(v, dict) and "tflops" in v)
                print(f"D={d} causal={causal!s:5} N={n:5}  TFLOP/s {cells}", flush=True)
    report["grid"] = rows


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5), sharey=True)
    for ax, (d, causal) in zip(axes, [(128, False), (128, True), (64, False), (64, True)], strict=True):
        rows = [r for r in report["grid"] if r["D"] == d and r["causal"] == causal and "fused" in r]
        for name in ("fused", "sdpa-cudnn", "sdpa-flash", "flex"):
            pts = [(r["N"], r[name]["tflops"]) for r in rows if "tflops" in r.get(name, {})]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(f"fwd bf16 D={d} {'causal' if causal else 'non-causal'}")
        ax.set_xlabel("sequence length (16k tokens per batch)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("TFLOP/s")
    axes[0].legend()
    fig.suptitle(f"{report['device']}  ({report['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--png", default=None)
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--sweep-s", type=float, default=110.0, help="time for the variant sweep")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_hopper needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    t0 = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": time.strftime("%Y-%m-%d"), "dtype": "bf16"}
    spin_up_gpu()
    if not args.skip_sweep:
        sweep(report, t0 + args.sweep_s)
    Path(args.out).write_text(json.dumps(report, indent=1))
    grid(report, t0 + args.budget_s, not args.no_flex)
    report["elapsed_s"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(report, indent=1))
    if args.png:
        try:
            plot(report, args.png)
        except Exception as exc:
            print(f"plot failed: {exc!r}")
    print(f"wrote {args.out} in {report['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
