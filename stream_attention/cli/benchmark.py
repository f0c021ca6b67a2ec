"""``stream-attention-benchmark``: the fused kernel beside every attention baseline.

For each sequence length it times the fused kernel and, in the same run on the same
random inputs, every SDPA backend that runs here (flash, cuDNN, efficient; PyTorch's
default on CPU) and FlexAttention where it compiles. Latency is the median of
``triton.testing.do_bench`` on CUDA (host clock elsewhere).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from ..core.benchmarking import spin_up_gpu
from ..core.kernel_benchmark import DTYPES, format_table, run_benchmark


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Write a PNG of TFLOP/s against sequence length, one line per implementation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'stream-attention[plot]'") from exc
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["impl"] for r in rows):
        pts = sorted((r["seq_len"], r["tflops"]) for r in rows if r["impl"] == name and "tflops" in r)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("TFLOP/s")
    r0 = rows[0]
    ax.set_title(f"attention fwd, {r0['dtype']}, D={r0['dim']}, causal={r0['causal']}, {r0['device']}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stream-attention-benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens-per-batch", type=int, default=None, help="batch = this // seq (overrides --batch)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); default = --heads")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a while)")
    p.add_argument("--impls", nargs="+", default=None, help="baselines to keep, e.g. sdpa-flash sdpa-cudnn flex")
    p.add_argument("--json", metavar="PATH", help="write all rows as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG plot of TFLOP/s")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch", "heads", "dim", "warmup", "iters"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            raise SystemExit(f"--{name} must be positive")
    if any(s < 1 for s in args.seq):
        raise SystemExit("--seq values must be positive")
    if not 16 <= args.dim <= 256:
        raise SystemExit(f"--dim {args.dim} unsupported (16..256)")
    if args.device is None or str(args.device).startswith("cuda"):
        spin_up_gpu(torch.device(args.device or "cuda"))
    rows = run_benchmark(
        args.seq,
        batch=args.batch,
        heads=args.heads,
        dim=args.dim,
        causal=args.causal,
        dtype=args.dtype,
        kv_heads=args.kv_heads,
        warmup=args.warmup,
        iters=args.iters,
        device=args.device,
        tokens_per_batch=args.tokens_per_batch,
        flex=not args.no_flex,
        progress=not args.no_progress,
        impls=args.impls,
    )
    print(format_table(rows))
    for r in rows:
        if "error" in r:
            print(f"  {r['impl']} @ {r['seq_len']}: {r['error']}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
