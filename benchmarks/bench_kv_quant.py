"""GPU benchmark of quantized KV pages: decode speed and how many sequences fit.

    python benchmarks/bench_kv_quant.py --out kv_quant.json [--batch 16 32] [--contexts 4096 8192]

(a) Paged decode attention, GQA 32/8, head_dim 128, pages of 16 tokens scattered over
    the pool, one query per sequence: the same kernel reading bf16 pages, int8 pages and
    int4 pages (per-token scales, and KIVI per-channel key scales), plus the engine's
    own bf16 paged kernel (``kernels/paged_attention.py``) when present. Median latency
    (``triton.testing.do_bench``, L2 flushed between calls), bytes of pages read per
    second, speed-up over both bf16 kernels, and accuracy: the max error against a
    float64 reference on the dequantized pages (kernel exactness) and the relative error
    of the output against exact bf16 attention (quantization loss).
(b) Capacity: concurrent 4k-token sequences whose KV cache fits in a fixed budget
    (8 GiB) for a 1B-shaped Llama (16 layers, hidden 2048 / 32 heads = head_dim 64,
    8 KV heads), for each page format; the pools are really allocated on the GPU and
    measured with the CUDA allocator.

Budget: under 90 s on an H100 (compiles included). A time guard skips the optional
parts (KIVI, a second batch size) when compiling takes longer than planned, and says so
in the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_attention.kernels import kv_quant as kq  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
# (name, bits, key scales per channel); bf16 first: every speed-up is against it.
FORMATS = [("bf16", 16, False), ("int8", 8, False), ("int4", 4, False), ("int8-kivi", 8, True),
           ("int4-kivi", 4, True)]


def _bench(fn, warmup: int = 10, rep: int = 50) -> float:
    """Median milliseconds per call, with L2 flushed between calls."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _tuned(bits: int, per_channel: bool) -> str | None:
    tuner = kq._paged_attn_tuned_page if per_channel else kq._paged_attn_tuned_tokens
    best = getattr(tuner, "best_config", None)
    return str(best) if best is not None else None


def _pages_read(bits: int, per_channel: bool, batch: int, ctx: int) -> int:
    """Bytes of K/V pages (with scales) one decode step reads."""
    return int(kq.kv_bytes_per_token(HKV, D, bits, block_size=PAGE, key_per_channel=per_channel) * batch * ctx)


def decode_case(batch: int, ctx: int, formats: list[tuple[str, int, bool]], deadline: float,
                dev: torch.device | None = None) -> dict:
    dev = dev or torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    n_blocks = batch * ctx // PAGE + 1
    k = torch.randn(n_blocks, PAGE, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
    # Real keys carry per-channel offsets and a few outlier channels; values do not.
    k = k + torch.randn(D, device=dev, generator=g).to(torch.bfloat16) * 2
    k[..., :4] *= 8
    v = torch.randn(n_blocks, PAGE, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
    table = torch.randperm(n_blocks - 1, device=dev, generator=g)[: batch * (ctx // PAGE)]
    table = table.view(batch, ctx // PAGE).to(torch.int32)
    # Ragged lengths near ctx: the last page of most sequences is partly filled.
    seq_lens = (ctx - torch.randint(0, PAGE, (batch,), device=dev, generator=g)).to(torch.int32)
    seq_lens[0] = ctx
    cu = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16, generator=g)
    splits = kq.choose_num_splits(batch, HKV, ctx, dev)
    scale = 1.0 / math.sqrt(D)
    ids = torch.arange(n_blocks, device=dev)
    full = torch.full((n_blocks,), PAGE, dtype=torch.int32, device=dev)

    # Exact bf16 attention of the first sequences, for the quantization loss.
    n_ref = 2
    exact, _ = kq.paged_attention_ref(q[:n_ref], k, v, table[:n_ref], seq_lens[:n_ref], dtype=torch.float32)

    rows, results = [], {}
    for name, bits, per_channel in formats:
        if per_channel and time.perf_counter() > deadline:  # KIVI rows are the optional ones
            rows.append({"format": name, "skipped": "time budget"})
            continue
        if bits == 16:
            kp, vp = k, v
        else:
            kp = kq.QuantizedPages.empty(n_blocks, PAGE, HKV, D, bits, per_channel=per_channel, device=dev)
            vp = kq.QuantizedPages.empty(n_blocks, PAGE, HKV, D, bits, device=dev)
            kq.write_blocks_to_pages(k, ids, full, kp)
            kq.write_blocks_to_pages(v, ids, full, vp)

        def fn(kp=kp, vp=vp):
            return kq.paged_attention_quantized(q, kp, vp, table, seq_lens, cu, max_q_len=1, softmax_scale=scale,
                                                num_splits=splits)

        out = fn()  # compiles and autotunes outside the timing
        _sync(dev)
        ms = _bench(fn)
        ref, _ = kq.paged_attention_ref(q[:n_ref], kp, vp, table[:n_ref], seq_lens[:n_ref], dtype=torch.float64)
        kernel_err = float((out[:n_ref].double() - ref).abs().max())
        quant_err = float((out[:n_ref].float() - exact).norm() / exact.norm())
        read = _pages_read(bits, per_channel, batch, int(seq_lens.sum()) // batch)
        row = {
            "format": name, "bits": bits, "key_per_channel": per_channel, "ms": ms,
            "pages_bytes_read": read, "tb_per_s": read / (ms * 1e-3) / 1e12,
            "max_abs_err_vs_fp64_on_dequantized": kernel_err, "rel_err_vs_exact_bf16": quant_err,
            "autotuned": _tuned(bits, per_channel),
        }
        results[name] = ms
        rows.append(row)
        del kp, vp

    engine_ms = None
    try:
        from stream_attention.kernels.paged_attention import choose_num_splits, paged_attention

        e_splits = choose_num_splits(batch, HKV, ctx, dev)

        def efn():
            return paged_attention(q, k, v, table, seq_lens, cu, max_q_len=1, softmax_scale=scale,
                                   num_splits=e_splits)

        efn()
        _sync(dev)
        engine_ms = _bench(efn)
        read = _pages_read(16, False, batch, int(seq_lens.sum()) // batch)
        rows.append({"format": "bf16-engine-kernel", "bits": 16, "ms": engine_ms, "num_splits": e_splits,
                     "tb_per_s": read / (engine_ms * 1e-3) / 1e12})
    except ImportError as exc:  # pragma: no cover - the engine kernel is optional
        rows.append({"format": "bf16-engine-kernel", "skipped": str(exc)})

    base = results.get("bf16")
    for row in rows:
        if "ms" in row and base:
            row["speedup_vs_bf16_same_kernel"] = base / row["ms"]
            if engine_ms:
                row["speedup_vs_bf16_engine_kernel"] = engine_ms / row["ms"]
    return {"batch": batch, "context": ctx, "num_splits": splits, "rows": rows}


def capacity(budget_gib: float, seq_tokens: int) -> dict:
    """Concurrent ``seq_tokens``-token sequences whose pages fit ``budget_gib`` for a 1B Llama."""
    layers, hkv, d = 16, 8, 64
    dev = torch.device("cuda")
    budget = int(budget_gib * 2**30)
    blocks_per_seq = math.ceil(seq_tokens / PAGE)
    rows = []
    for name, bits, per_channel in FORMATS:
        per_block = kq.kv_bytes_per_token(hkv, d, bits, block_size=PAGE, key_per_channel=per_channel) * PAGE * layers
        n_blocks = int(budget // per_block)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(dev)
        if bits == 16:
            pools = [torch.empty(n_blocks, PAGE, hkv, d, dtype=torch.bfloat16, device=dev) for _ in range(2 * layers)]
        else:
            pools = [kq.QuantizedPages.empty(n_blocks, PAGE, hkv, d, bits, per_channel=pc, device=dev)
                     for _ in range(layers) for pc in (per_channel, False)]
        torch.cuda.synchronize()
        used = torch.cuda.memory_allocated(dev) - before
        del pools
        torch.cuda.empty_cache()
        rows.append({
            "format": name, "bytes_per_token_all_layers": per_block / PAGE, "blocks": n_blocks,
            "allocated_bytes": int(used), "fits_budget": used <= budget,
            "concurrent_sequences": n_blocks // blocks_per_seq,
        })
    base = rows[0]["concurrent_sequences"]
    for row in rows:
        row["vs_bf16"] = row["concurrent_sequences"] / base if base else None
    return {"model": "Llama-1B shape: 16 layers, 8 KV heads, head_dim 64", "budget_gib": budget_gib,
            "sequence_tokens": seq_tokens, "page_size": PAGE, "rows": rows}


def _print(res: dict) -> None:
    for case in res["decode"]:
        print(f"\nbatch {case['batch']} context {case['context']} (splits {case['num_splits']})")
        print(f"{'format':<20}{'ms':>9}{'TB/s':>7}{'x bf16':>8}{'x engine':>9}{'kernel err':>12}{'quant err':>11}")
        for r in case["rows"]:
            if "ms" not in r:
                print(f"{r['format']:<20} skipped: {r.get('skipped')}")
                continue
            print(f"{r['format']:<20}{r['ms']:>9.4f}{r['tb_per_s']:>7.2f}"
                  f"{r.get('speedup_vs_bf16_same_kernel', float('nan')):>8.2f}"
                  f"{r.get('speedup_vs_bf16_engine_kernel', float('nan')):>9.2f}"
                  f"{r.get('max_abs_err_vs_fp64_on_dequantized', float('nan')):>12.2e}"
                  f"{r.get('rel_err_vs_exact_bf16', float('nan')):>11.2e}")
    cap = res["capacity"]
    print(f"\n{cap['model']}: {cap['sequence_tokens']}-token sequences in {cap['budget_gib']} GiB")
    for r in cap["rows"]:
        print(f"{r['format']:<12} {r['bytes_per_token_all_layers']:>8.0f} B/token  {r['concurrent_sequences']:>5} seqs"
              f"  ({r['vs_bf16']:.2f}x)  allocated {r['allocated_bytes'] / 2**30:.2f} GiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write results as JSON here")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 32])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--budget-gib", type=float, default=8.0)
    p.add_argument("--seq-tokens", type=int, default=4096)
    p.add_argument("--time-budget", type=float, default=75.0, help="seconds before optional parts are skipped")
    args = p.parse_args()
    from stream_attention.core.benchmarking import spin_up_gpu

    spin_up_gpu()
    if not torch.cuda.is_available():
        sys.exit("bench_kv_quant.py needs a CUDA GPU")
    t0 = time.perf_counter()
    deadline = t0 + 0.6 * args.time_budget
    import triton

    res: dict = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "shape": {"hq": HQ, "hkv": HKV, "head_dim": D, "page": PAGE},
        "decode": [], "notes": [],
    }
    for bi, batch in enumerate(args.batch):
        for ctx in args.contexts:
            if bi > 0 and time.perf_counter() > t0 + 0.75 * args.time_budget:
                res["notes"].append(f"skipped batch {batch} context {ctx}: time budget")
                continue
            res["decode"].append(decode_case(batch, ctx, FORMATS, deadline))
            torch.cuda.empty_cache()
    res["capacity"] = capacity(args.budget_gib, args.seq_tokens)
    int8 = [r.get("speedup_vs_bf16_same_kernel") for c in res["decode"] for r in c["rows"] if r["format"] == "int8"]
    res["int8_min_speedup_vs_bf16"] = min((s for s in int8 if s), default=None)
    res["wall_s"] = time.perf_counter() - t0
    _print(res)
    print(f"\nint8 vs bf16 (same kernel), worst case: {res['int8_min_speedup_vs_bf16']}; wall {res['wall_s']:.1f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
