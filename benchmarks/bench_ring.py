"""Ring and star attention prefill on N devices against one, with correctness checks.

Multi-GPU (NCCL), one process per GPU::

    torchrun --nproc-per-node 4 benchmarks/bench_ring.py --out ring.json

or ``python benchmarks/bench_ring.py --world-size 4 --out ring.json`` (spawns the ranks
itself). Without either it runs as a ring of one. On CPU it uses gloo and SDPA (tiny
shapes only: ``--seqlens 256 --heads 2 --kv-heads 1 --dim 16 --dtype fp32``).

For each sequence length every rank builds the same random Q/K/V (seeded) and times:

* ``single``: the fused kernel on the whole causal sequence on its own GPU (every rank
  runs it at once, on its own device, which also gives each rank its reference shard);
* ``ring``: exact ring attention, zigzag shards, transfers overlapped (also without
  overlap and with contiguous shards, to show what each buys);
* ``star``: phase 1 over the context (blocks of ``--star-block`` tokens with a
  ``--star-anchor`` anchor) plus phase 2 for the last ``--query-len`` tokens.

Times are medians over ``--iters`` of the slowest rank. Scaling efficiency is
``t_single / (N * t_ring)``. Errors are against the single-device result in the run's
dtype: ``max_abs`` and ``rel_l2 = |a - b| / |b|``. Star's context rows are approximate by
design (random inputs are its worst case: no attention sink); its query rows are exact.
At ``--backward-seqlen`` the ring backward is checked against single-device autograd.

NVLink multicast stays off (``NCCL_NVLS_ENABLE=0`` and friends are forced below):
a program using it can take the host's shared GPUs out of service.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

# Set before torch (and NCCL) are imported, and inherited by every spawned rank.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(SAFE_ENV)
# Every (shape bucket, causal) key would autotune a dozen configs, and ring/star launch
# several new keys per length: one heuristic config keeps the run inside its time budget
# (the same policy for 1 and N devices, so the comparison stays fair). --autotune restores it.
if "--autotune" not in sys.argv:
    os.environ.setdefault("STREAM_ATTENTION_AUTOTUNE", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from stream_attention.core.distributed_utils import (  # noqa: E402
    group_info,
    launch_local,
    zigzag_shard,
)
from stream_attention.core.functional import fused_attention  # noqa: E402
from stream_attention.core.ring_attention import ring_attention  # noqa: E402
from stream_attention.core.star_attention import (  # noqa: E402
    star_attention_phase1,
    star_attention_phase2,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write the results as JSON here (rank 0)")
    p.add_argument("--world-size", type=int, default=1, help="spawn this many local ranks (when not under torchrun)")
    p.add_argument("--seqlens", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--query-len", type=int, default=256, help="star: tokens answered in phase 2")
    p.add_argument("--star-block", type=int, default=4096)
    p.add_argument("--star-anchor", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--backward-seqlen", type=int, default=32768, help="0 skips the backward check")
    p.add_argument("--no-variants", action="store_true", help="skip the no-overlap / contiguous ring timings")
    p.add_argument("--autotune", action="store_true", help="let the kernels autotune (slow first calls)")
    p.add_argument("--timeout", type=float, default=600.0, help="--world-size spawn: give up after this many s")
    return p


# ------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _align(device: torch.device) -> None:
    """Line the ranks up before a timed region (an all-reduce doubles as a barrier)."""
    _sync(device)
    if group_info(None)[0] > 1:
        dist.all_reduce(torch.zeros(1, device=device))
        _sync(device)


def _slowest(value: float, device: torch.device) -> float:
    if group_info(None)[0] == 1:
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _time_ms(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(1, iters)):
        _align(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return _slowest(statistics.median(samples), device)


def _errors(got: torch.Tensor, want: torch.Tensor, device: torch.device) -> dict[str, float]:
    """max |got - want| and the relative L2 error, over every rank's shard."""
    diff = (got.float() - want.float()).reshape(-1)
    stats = torch.tensor(
        [diff.abs().max().item(), diff.pow(2).sum().item(), want.float().pow(2).sum().item()],
        device=device,
        dtype=torch.float64,
    )
    if group_info(None)[0] > 1:
        parts = stats[1:].clone()
        dist.all_reduce(parts)
        peak = stats[:1].clone()
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        stats = torch.cat([peak, parts])
    return {"max_abs": float(stats[0]), "rel_l2": float((stats[1] / stats[2].clamp_min(1e-30)).sqrt())}


def _inputs(args: argparse.Namespace, seqlen: int, device: torch.device, dtype: torch.dtype, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)  # identical tensors on every rank
    shape_q = (args.batch, seqlen, args.heads, args.dim)
    shape_kv = (args.batch, seqlen, args.kv_heads, args.dim)
    q = torch.randn(shape_q, generator=gen, device=device, dtype=dtype)
    k = torch.randn(shape_kv, generator=gen, device=device, dtype=dtype)
    v = torch.randn(shape_kv, generator=gen, device=device, dtype=dtype)
    return q, k, v


def _attn_tflops(seqlen: int, args: argparse.Namespace, ms: float) -> float:
    flops = 4 * args.batch * args.heads * args.dim * seqlen * seqlen / 2  # causal: half the square
    return flops / (ms * 1e-3) / 1e12


# ------------------------------------------------------------------------ measuring


def _bench_seqlen(args: argparse.Namespace, seqlen: int, device: torch.device) -> dict[str, Any]:
    world, rank = group_info(None)
    dtype = DTYPES[args.dtype]
    row: dict[str, Any] = {"seqlen": seqlen}
    if seqlen % (2 * world):
        return {**row, "skipped": f"seqlen not divisible by 2 * world = {2 * world}"}
    q, k, v = _inputs(args, seqlen, device, dtype, seed=seqlen)
    with torch.no_grad():
        ref = fused_attention(q, k, v, causal=True)
        row["single_ms"] = _time_ms(lambda: fused_attention(q, k, v, causal=True), device, args.warmup, args.iters)
        row["single_tflops"] = _attn_tflops(seqlen, args, row["single_ms"])

        row.update(_bench_ring(args, q, k, v, ref, device, row["single_ms"]))
        row.update(_bench_star(args, q, k, v, ref, device))
    return row


def _bench_ring(args, q, k, v, ref, device, single_ms: float) -> dict[str, Any]:
    world, rank = group_info(None)
    ql, kl, vl = (zigzag_shard(t, rank, world) for t in (q, k, v))
    res: dict[str, Any] = {
        "ring_err": _errors(ring_attention(ql, kl, vl, causal=True), zigzag_shard(ref, rank, world), device)
    }
    res["ring_ms"] = _time_ms(lambda: ring_attention(ql, kl, vl, causal=True), device, args.warmup, args.iters)
    res["ring_efficiency"] = single_ms / (world * res["ring_ms"])
    res["ring_speedup"] = single_ms / res["ring_ms"]
    if world > 1 and not args.no_variants:
        res["ring_no_overlap_ms"] = _time_ms(
            lambda: ring_attention(ql, kl, vl, causal=True, overlap=False), device, args.warmup, args.iters
        )
        qc, kc, vc = (t.chunk(world, dim=1)[rank] for t in (q, k, v))
        res["ring_contiguous_ms"] = _time_ms(
            lambda: ring_attention(qc, kc, vc, causal=True, zigzag=False), device, args.warmup, args.iters
        )
    return res


def _bench_star(args, q, k, v, ref, device) -> dict[str, Any]:
    world, rank = group_info(None)
    seqlen = q.shape[1]
    t_ctx = seqlen - args.query_len
    if args.query_len <= 0 or t_ctx <= 0 or t_ctx % world:
        return {"star_skipped": f"context {t_ctx} not divisible by world {world}"}
    t_local = t_ctx // world
    mine = slice(rank * t_local, (rank + 1) * t_local)
    query = slice(t_ctx, seqlen)
    ctx = (q[:, mine], k[:, mine], v[:, mine])
    last = rank == world - 1
    k_cache = torch.cat([k[:, mine], k[:, query]], 1) if last else k[:, mine]
    v_cache = torch.cat([v[:, mine], v[:, query]], 1) if last else v[:, mine]
    q_query = q[:, query]

    def phase1() -> torch.Tensor:
        return star_attention_phase1(*ctx, anchor_size=args.star_anchor, block_size=args.star_block)

    def phase2() -> torch.Tensor:
        return star_attention_phase2(q_query, k_cache, v_cache)

    def both() -> None:
        phase1()
        phase2()

    res: dict[str, Any] = {
        "star_ctx_err": _errors(phase1(), ref[:, mine], device),
        "star_query_err": _errors(phase2(), ref[:, query], device),
    }
    res["star_phase1_ms"] = _time_ms(phase1, device, args.warmup, args.iters)
    res["star_phase2_ms"] = _time_ms(phase2, device, args.warmup, args.iters)
    res["star_ms"] = _time_ms(both, device, 0, args.iters)
    return res


def _bench_backward(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    world, rank = group_info(None)
    seqlen = args.backward_seqlen
    if seqlen % (2 * world):
        return {"skipped": f"seqlen {seqlen} not divisible by {2 * world}"}
    dtype = DTYPES[args.dtype]
    q, k, v = _inputs(args, seqlen, device, dtype, seed=7)
    dout = _inputs(args, seqlen, device, dtype, seed=8)[0]  # seeded: the same on every rank
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = fused_attention(*full, causal=True)
    ref.backward(dout)

    def shard(x: torch.Tensor) -> torch.Tensor:
        return zigzag_shard(x, rank, world)

    local = [shard(t).detach().clone().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, causal=True)
    out.backward(shard(dout))
    res: dict[str, Any] = {"seqlen": seqlen}
    for name, mine, theirs in zip(("dq", "dk", "dv"), local, full, strict=True):
        res[f"{name}_err"] = _errors(mine.grad, shard(theirs.grad), device)
    res["out_err"] = _errors(out.detach(), shard(ref.detach()), device)

    def ring_step() -> None:
        o = ring_attention(*local, causal=True)
        o.backward(shard(dout))

    def single_step() -> None:
        o = fused_attention(*full, causal=True)
        o.backward(dout)

    res["ring_fwd_bwd_ms"] = _time_ms(ring_step, device, args.warmup, args.iters)
    res["single_fwd_bwd_ms"] = _time_ms(single_step, device, args.warmup, args.iters)
    res["efficiency"] = res["single_fwd_bwd_ms"] / (world * res["ring_fwd_bwd_ms"])
    from stream_attention.core.ring_attention import _triton_backward

    res["triton_backward"] = _triton_backward() is not None and device.type == "cuda"
    return res


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Every rank runs this; rank 0's return value is the report."""
    world, rank = group_info(None)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    report: dict[str, Any] = {
        "benchmark": "ring_star_prefill",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "world_size": world,
        "dist_backend": dist.get_backend() if world > 1 else None,
        "dtype": args.dtype,
        "shape": {"batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads, "dim": args.dim},
        "star": {"block": args.star_block, "anchor": args.star_anchor, "query_len": args.query_len},
        "torch": torch.__version__,
        "env": {key: os.environ.get(key) for key in [*SAFE_ENV, "STREAM_ATTENTION_AUTOTUNE"]},
        "results": [],
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    for seqlen in args.seqlens:
        start = time.perf_counter()
        row = _bench_seqlen(args, seqlen, device)
        row["wall_s"] = time.perf_counter() - start
        report["results"].append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.backward_seqlen > 0:
        report["backward"] = _bench_backward(args, device)
        if rank == 0:
            print(json.dumps({"backward": report["backward"]}), flush=True)
    return report


def _spawned_rank(rank: int, world: int, argv: list[str]) -> dict[str, Any] | None:
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    report = run_benchmark(_parser().parse_args(argv))
    return report if rank == 0 else None


def _write(report: dict[str, Any], path: str | None) -> None:
    text = json.dumps(report, indent=2)
    if path:
        with open(path, "w") as fh:
            fh.write(text + "\n")
    print(text)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
        try:
            report = run_benchmark(args)
        finally:
            dist.destroy_process_group()
        if int(os.environ["RANK"]) == 0:
            _write(report, args.out)
    elif args.world_size > 1:
        reports = launch_local(
            _spawned_rank, args.world_size, (argv,), backend=backend, timeout_s=args.timeout, env=SAFE_ENV
        )
        _write(reports[0], args.out)
    else:
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        _write(run_benchmark(args), args.out)


if __name__ == "__main__":
    main()
