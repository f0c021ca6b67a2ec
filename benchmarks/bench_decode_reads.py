"""How fast can a Triton kernel *read* paged K/V at all? A ceiling for the paged decode kernels.

    python benchmarks/bench_decode_reads.py --out reads.json [--cases 16x4096 64x8192] [--budget-s 150]

The pointer paged decode kernel (``kernels/paged_attention.py``) ran at 0.93-0.98x cuDNN's
dense decode on an H100 (benchmarks/RESULTS.md v0.6). This separates the load scheme from
the attention math: ``_paged_read_kernel`` walks the same pages in the same order with the
same grid (one program per sequence x KV head x key split) and the same per-column page
look-up, but only sums the K/V tiles. If that read alone is not faster than cuDNN's whole
attention, no change to the attention math of a kernel built this way can close the gap.
The TMA kernel (``kernels/paged_decode_tma.py``), which loads a page per descriptor copy,
is timed over its launch x split grid in the same run.

Per case (GQA 32/8 layout, head_dim 128, pages of 16, bf16, pages scattered over the pool):
``read`` over a launch x split grid, ``read`` with each sequence's pages consecutive in the
pool, the shipped attention kernel, cuDNN dense decode on the same data, and a device copy of
the same bytes (eager: a captured copy may run on a copy engine). Kernel times are CUDA-graph
replays after a zeroing L2 flush, as elsewhere (``core.benchmarking.time_graph_ms``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HQ, HKV, D, PAGE = 32, 8, 128, 16
CASES = ((16, 4096), (16, 8192), (64, 4096), (64, 8192))
# (BLOCK_N, num_warps, num_stages) x split counts
READ_GRID = [((128, 4, 2), (2, 4, 8)), ((64, 2, 2), (4, 8, 16)), ((32, 2, 2), (16,))]
# The pointer attention kernel over the same kind of grid (explicit launches; its shipped one is (128, 4, 2)).
ATTENTION_GRID = [((128, 4, 2), (1, 2, 3)), ((64, 2, 2), (4,))]
# The TMA decode kernel (kernels/paged_decode_tma.py): (num_warps, num_stages) x splits.
TMA_GRID = [((1, 6), (1, 2, 3, 4, 6, 8)), ((1, 5), (3, 4)), ((1, 4), (4, 8)), ((1, 8), (2, 4)), ((2, 6), (1, 2, 4))]


@triton.jit
def _paged_read_kernel(K, V, block_tables, seq_lens, Out,
                       stride_kb, stride_ks, stride_kh, stride_bt, num_kv_heads, num_splits,
                       PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // num_kv_heads
    kvh = pid_bh % num_kv_heads
    kv_len = tl.load(seq_lens + b)
    tiles_per_split = tl.cdiv(tl.cdiv(kv_len, BLOCK_N), num_splits)
    lo = pid_s * tiles_per_split * BLOCK_N
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, kv_len)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    bt_row = block_tables + b.to(tl.int64) * stride_bt
    head = kvh.to(tl.int64) * stride_kh
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    # Lengths here are multiples of BLOCK_N: no masks, as in the attention kernel's bulk loop.
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        page = tl.load(bt_row + cols // PAGE_SIZE).to(tl.int64)
        off = head + page[:, None] * stride_kb + (cols % PAGE_SIZE).to(tl.int64)[:, None] * stride_ks + offs_d[None, :]
        k = tl.load(K + off)
        v = tl.load(V + off)
        acc += tl.sum(k.to(tl.float32) + v.to(tl.float32), axis=0)
    tl.store(Out + (pid_bh * num_splits + pid_s).to(tl.int64) * HEAD_DIM + offs_d, acc)


def paged_read(k_pages, v_pages, table, seq_lens, out, splits: int, launch: tuple[int, int, int]) -> torch.Tensor:
    block_n, warps, stages = launch
    batch = table.shape[0]
    hkv = k_pages.shape[2]
    _paged_read_kernel[(batch * hkv, splits)](
        k_pages, v_pages, table, seq_lens, out, k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        table.stride(0), hkv, splits, PAGE_SIZE=k_pages.shape[1], BLOCK_N=block_n, HEAD_DIM=k_pages.shape[3],
        num_warps=warps, num_stages=stages)
    return out


def run_case(batch: int, ctx: int, deadline: float) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from stream_attention.core.benchmarking import time_graph_ms
    from stream_attention.core.kernel_switches import KernelSwitches
    from stream_attention.kernels.paged_attention import choose_num_splits, paged_attention
    from stream_attention.kernels.paged_decode_tma import paged_decode_tma, tma_decode_supported

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    n_pages = batch * ctx // PAGE
    k = torch.randn(n_pages, PAGE, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(n_pages, PAGE, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
    scattered = torch.randperm(n_pages, device=dev, generator=g).view(batch, -1).to(torch.int32)
    consecutive = torch.arange(n_pages, device=dev, dtype=torch.int32).view(batch, -1)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16, generator=g)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    nbytes = 2 * k.numel() * k.element_size()
    max_splits = max(s for _, choices in READ_GRID for s in choices)
    out = torch.empty(batch * HKV * max_splits, D, device=dev, dtype=torch.float32)
    res: dict = {"batch": batch, "context": ctx, "kv_bytes": nbytes, "skipped": []}

    def timed(fn) -> dict:
        fn()
        torch.cuda.synchronize()
        ms = time_graph_ms(fn, reps=40, flush="zero")
        return {"ms": ms, "TBps": nbytes / ms / 1e9}

    # The read kernel's result checked once against torch (sum over keys of K + V per head).
    paged_read(k, v, scattered, seq_lens, out, 1, (128, 4, 2))
    want = (k[scattered[0].long()].float() + v[scattered[0].long()].float()).sum((0, 1))  # [HKV, D]
    res["read_check_max_rel_err"] = float((out[:HKV] - want).abs().max() / want.abs().max())
    def sweep(name: str, grid, make_fn, want=None, skip=lambda s, choices: False) -> list[dict]:
        """Time ``make_fn(splits, launch)`` over ``grid`` until the deadline; with ``want``,
        also its max difference from that output."""
        rows = []
        for launch, split_choices in grid:
            for s in split_choices:
                if skip(s, split_choices):
                    continue
                if time.perf_counter() > deadline:
                    res["skipped"].append(f"{name} {launch} x{s}")
                    continue
                fn = make_fn(s, launch)
                try:
                    row = timed(fn)
                    if want is not None:
                        row["max_abs_diff_vs_pointer_kernel"] = float((fn().float() - want).abs().max())
                except Exception as exc:  # a launch that does not fit
                    row = {"error": repr(exc)[:300]}
                rows.append({"launch": list(launch), "splits": s, **row})
        return rows

    def fastest(rows: list[dict]) -> dict:
        return min((r for r in rows if "ms" in r), key=lambda r: r["ms"])

    res["read"] = sweep("read", READ_GRID, lambda s, la: lambda: paged_read(k, v, scattered, seq_lens, out, s, la))
    best = res["read_best"] = fastest(res["read"])
    res["read_best_consecutive_pages"] = timed(
        lambda: paged_read(k, v, consecutive, seq_lens, out, best["splits"], tuple(best["launch"])))
    paged_tma = KernelSwitches.from_env().paged_tma
    splits = choose_num_splits(batch, HKV, ctx, dev, tma=None if paged_tma else False)
    # The engine's decode call: the TMA kernel where it runs.
    res["attention_shipped"] = timed(lambda: paged_attention(q, k, v, scattered, seq_lens, cu, max_q_len=1,
                                                             softmax_scale=D**-0.5, num_splits=splits,
                                                             tma=paged_tma))
    res["attention"] = sweep("attention", ATTENTION_GRID, lambda s, la: lambda: paged_attention(
        q, k, v, scattered, seq_lens, cu, max_q_len=1, softmax_scale=D**-0.5, num_splits=s, launch=la))
    res["attention_best"] = fastest(res["attention"])
    res["tma"] = []
    if tma_decode_supported(q, k, v, 1):
        want = paged_attention(q, k, v, scattered, seq_lens, cu, max_q_len=1, softmax_scale=D**-0.5,
                               num_splits=2, launch=(128, 4, 2)).float()  # the pointer kernel
        res["tma"] = sweep(
            "tma", TMA_GRID,
            lambda s, la: lambda: paged_decode_tma(q, k, v, scattered, seq_lens, cu, softmax_scale=D**-0.5,
                                                   num_splits=s, launch=la),
            want=want, skip=lambda s, choices: s * batch * HKV < 132 and s < max(choices))
        if any("ms" in r for r in res["tma"]):
            res["tma_best"] = fastest(res["tma"])
    kd = k[scattered.long()].reshape(batch, ctx, HKV, D).transpose(1, 2).contiguous()
    vd = v[scattered.long()].reshape(batch, ctx, HKV, D).transpose(1, 2).contiguous()

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kd, vd, scale=D**-0.5,
                                                                    enable_gqa=True)

    res["sdpa_cudnn"] = timed(cudnn)
    buf = torch.empty(2, nbytes // 2, dtype=torch.bfloat16, device=dev)
    t = triton.testing.do_bench(lambda: buf[1].copy_(buf[0]), warmup=10, rep=50, return_mode="median")
    res["copy_read_write_TBps"] = 2 * nbytes / t / 1e9
    res["read_best_vs_cudnn"] = res["sdpa_cudnn"]["ms"] / best["ms"]
    res["attention_best_vs_cudnn"] = res["sdpa_cudnn"]["ms"] / res["attention_best"]["ms"]
    res["attention_vs_read_best"] = best["ms"] / res["attention_shipped"]["ms"]
    print(json.dumps({"batch": batch, "context": ctx, "read_best": [best["launch"], best["splits"],
                      round(best["TBps"], 3)], "read_consecutive": round(res["read_best_consecutive_pages"]["TBps"], 3),
                      "attention": round(res["attention_shipped"]["TBps"], 3),
                      "attention_best": [res["attention_best"]["launch"], res["attention_best"]["splits"],
                                         round(res["attention_best"]["TBps"], 3)],
                      "tma_best": [res["tma_best"]["launch"], res["tma_best"]["splits"],
                                   round(res["tma_best"]["TBps"], 3)] if "tma_best" in res else None,
                      "cudnn": round(res["sdpa_cudnn"]["TBps"], 3), "copy": round(res["copy_read_write_TBps"], 3)}),
          flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--cases", nargs="+", default=[f"{b}x{c}" for b, c in CASES], help="BATCHxCONTEXT ...")
    p.add_argument("--budget-s", type=float, default=150.0, help="seconds after which grid points are skipped")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode_reads.py needs a CUDA GPU")
    from stream_attention.core.benchmarking import spin_up_gpu

    spin_up_gpu()
    deadline = time.perf_counter() + args.budget_s
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cases": []}
    for batch, ctx in (tuple(int(x) for x in case.split("x")) for case in args.cases):
        res["cases"].append(run_case(batch, ctx, deadline))
        torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
