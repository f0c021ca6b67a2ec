"""``stream-attention-test``: the fused kernel against a float64 reference.

Exits 1 when the relative error (‖out − ref‖ / ‖ref‖) is over the dtype's tolerance.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ..core.functional import fused_attention
from ..core.sdpa import visibility_mask
from .benchmark import DTYPES

TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2}


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 attention and LSE on ``[B, T, H, D]`` tensors (GQA by repetition)."""
    hq, hkv = q.shape[2], k.shape[2]
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    kd, vd = kd.repeat_interleave(hq // hkv, 1), vd.repeat_interleave(hq // hkv, 1)
    scores = qd @ kd.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    mask = visibility_mask(q.shape[1], k.shape[1], causal, None, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return (probs @ vd).transpose(1, 2), lse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stream-attention-test", description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--seq-k", type=int, default=None, help="key length (default = --seq)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--backend", choices=["auto", "triton", "sdpa"], default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=None, help="relative error bound (default by dtype)")
    args = p.parse_args(argv)

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    kv_heads = args.kv_heads or args.heads
    seq_k = args.seq_k or args.seq
    q = torch.randn(args.batch, args.seq, args.heads, args.dim, device=dev, dtype=dtype)
    k = torch.randn(args.batch, seq_k, kv_heads, args.dim, device=dev, dtype=dtype)
    v = torch.randn(args.batch, seq_k, kv_heads, args.dim, device=dev, dtype=dtype)
    try:
        with torch.no_grad():
            out, lse = fused_attention(q, k, v, causal=args.causal, return_lse=True, backend=args.backend)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ref, ref_lse = reference_attention(q.cpu(), k.cpu(), v.cpu(), args.causal)
    diff = out.double().cpu() - ref
    rel = (diff.norm() / ref.norm()).item()
    max_abs = diff.abs().max().item()
    finite = torch.isfinite(ref_lse)
    lse_err = (lse.double().cpu()[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
    tol = args.tolerance if args.tolerance is not None else TOLERANCE[args.dtype]
    ok = rel <= tol and torch.isfinite(out).all().item()
    from ..core.backend import resolve_backend

    print(
        f"shape q{tuple(q.shape)} k{tuple(k.shape)} {args.dtype} causal={args.causal} "
        f"backend={resolve_backend(args.backend, dev)} device={dev}"
    )
    print(f"max_abs_error={max_abs:.3e} relative_error={rel:.3e} lse_max_abs_error={lse_err:.3e} tolerance={tol:.1e}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
