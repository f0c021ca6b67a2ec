"""GPU benchmark of quantized KV pages: decode speed against the bf16 paged kernel, and capacity.

    python benchmarks/bench_kv_quant.py --out kv_quant.json [--batch 16 64] [--contexts 4096 8192]
                                        [--extra] [--no-sweep]

(a) Paged decode attention, GQA 32/8, head_dim 128, pages of 16 tokens scattered over the
    pool, one bf16 query per sequence, for every batch x context:
    * ``bf16``: the engine's decode kernel (``paged_attention`` without a launch: the TMA
      kernel ``kernels/paged_decode_tma.py`` on Hopper) at its own split policy: the
      baseline of every ratio; the pointer kernel's launches are timed beside it.
    * ``int8`` / ``int4`` (per-token scales): ``kv_attention``'s fp16-code kernel at
      ``kv_attention.decode_launch`` (the engine's schedule), with its split policy, and ``int8@engine-splits``
      / ``int4@engine-splits`` with the split count the engine gives quantized pages.
    * ``fp8``: e4m3 pages with per-head scales (the engine's ``--kv-cache-dtype fp8``) through
      the same fp16-code kernel, as the engine calls it (``paged_attention_fp8`` with
      ``kv_attention.DEFAULT_LAUNCH`` and the split count the engine gives compressed
      pages); ``fp8@int8-schedule``: at int8's ``decode_launch`` and split policy.
    * ``int8-generic``: the dequantizing kernel (``fast_kernel=False``), i.e. before.
    * ``int8-deferred-sums``: row sums kept per key column until the end
      (``defer_sums=True``: two cross-warp reductions fewer per tile, more
      registers; the default rows defer where ``kv_attention.defer_row_sums`` says so).
    * a launch sweep, ``(BLOCK_N, num_warps, num_stages)``, for int8 (and two for int4).
    * ``--extra``: int8 and fp8 with the portable conversions instead of inline PTX
      (``inline_asm=False``), fp8 through the generic kernel, KIVI per-channel
      keys, bf16 pages through kv_attention.
    Rows without a variant of their own launch the kernels as the ``STREAM_ATTENTION_*``
    switches of the environment say, like the engine.
    Median time of a CUDA-graph replay (L2 zeroed before each, as do_bench does), TB/s of page bytes
    read (scales included), ``speedup_vs_bf16`` = bf16 ms / row ms, and the max error
    against float64 attention over the dequantized pages (first sequences).
(b) Capacity: concurrent 4k-token sequences whose KV cache fits 8 GiB for a 1B-shaped Llama
    (16 layers, 8 KV heads, head_dim 64), per page format; pools really allocated, the
    engine's formats through the engine's own sizing and allocation (``KVPoolLayout``: one
    buffer, scratch block and scales counted), KIVI (per-channel keys, not an engine
    format) as one buffer of its bytes; ``fits_budget`` compares ``memory_allocated``.

The summary (``summary`` in the JSON, printed last) lists per case the bf16 time, int8 and
int4 times and ratios, and the best int8 launch. Budget: ~2 minutes on an H100, compiles
included; ``--time-budget`` seconds after which optional parts are skipped (noted in JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_attention.core.kernel_switches import KernelSwitches  # noqa: E402
from stream_attention.engine.kv_compression import KVPoolLayout  # noqa: E402
from stream_attention.kernels import kv_attention as kva  # noqa: E402
from stream_attention.kernels import kv_pages as kvp  # noqa: E402
from stream_attention.kernels import paged_attention as pa  # noqa: E402
from stream_attention.kernels import paged_decode_tma as pdt  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
LAUNCH_KEYS = ("BLOCK_N", "num_warps", "num_stages")
# Alternatives to kv_attention.decode_launch (timed first, at both split policies; a schedule
# in kv_attention.FAST_DECODE_MAXNREG gets its register cap): (BLOCK_N, num_warps,
# num_stages[, maxnreg]), where a 4th entry None means no register cap.
INT8_SWEEP = [(128, 4, 2, 128), (128, 4, 3, 128), (64, 4, 3, 128), (64, 4, 4, 128), (128, 4, 3, None), (32, 4, 4),
              (128, 2, 2)]
INT4_SWEEP = [(128, 4, 3, 128), (64, 4, 3)]
BF16_ALT_LAUNCHES = [(128, 4, 2), (128, 4, 3), (64, 4, 3)]  # the pointer kernel (shipped launch first)


def _bench(fn, warmup: int = 10, rep: int = 60) -> float:
    """Median ms of a CUDA-graph replay of ``fn`` with L2 zeroed before each, as do_bench
    evicts it. Eager calls would time the host: the wrapper costs about what a batch-16
    decode kernel runs, and the GPU idles in between (seen as 2x run-to-run swings)."""
    from stream_attention.core.benchmarking import time_graph_ms

    return time_graph_ms(fn, reps=rep, flush="zero", warmup=2)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _pages_read(bits: int, per_channel: bool, batch: int, ctx: int) -> int:
    """Bytes of K/V pages (with scales) one decode step reads."""
    return int(kvp.kv_bytes_per_token(HKV, D, bits, block_size=PAGE, key_per_channel=per_channel) * batch * ctx)


class Case:
    """Random bf16 K/V for ``batch`` sequences of ~``ctx`` keys, their quantized pages on demand."""

    def __init__(self, batch: int, ctx: int, dev: torch.device):
        g = torch.Generator(device=dev).manual_seed(0)
        self.batch, self.ctx, self.dev = batch, ctx, dev
        self.n_blocks = batch * ctx // PAGE + 1
        k = torch.randn(self.n_blocks, PAGE, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
        # Real keys carry per-channel offsets and a few outlier channels; values do not.
        k += torch.randn(D, device=dev, generator=g).to(torch.bfloat16) * 2
        k[..., :4] *= 8
        self.k = k
        self.v = torch.randn(self.n_blocks, PAGE, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
        table = torch.randperm(self.n_blocks - 1, device=dev, generator=g)[: batch * (ctx // PAGE)]
        self.table = table.view(batch, ctx // PAGE).to(torch.int32)
        # Ragged lengths near ctx: the last page of most sequences is partly filled.
        self.seq_lens = (ctx - torch.randint(0, PAGE, (batch,), device=dev, generator=g)).to(torch.int32)
        self.seq_lens[0] = ctx
        self.avg_ctx = int(self.seq_lens.sum()) // batch
        self.cu = torch.arange(batch + 1, dtype=torch.int32, device=dev)
        self.q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16, generator=g)
        self.scale = 1.0 / math.sqrt(D)
        self.kq_splits = kva.choose_num_splits(batch, HKV, ctx, dev)
        self.engine_splits = pa.choose_num_splits(batch, HKV, ctx, dev)
        # What the engine gives kv_attention's kernel (ModelRunner._decode_splits for quantized pages).
        self.engine_quant_splits = pa.choose_num_splits(batch, HKV, ctx, dev, tma=False)
        self._pages: dict = {}

    def fp8_pages(self):
        if "fp8" not in self._pages:
            slots = torch.arange(self.n_blocks * PAGE, device=self.dev)
            kp = kvp.Fp8Pages.empty(self.n_blocks, PAGE, HKV, D, device=self.dev)
            vp = kvp.Fp8Pages.empty(self.n_blocks, PAGE, HKV, D, device=self.dev)
            kvp.write_tokens_fp8(self.k.view(-1, HKV, D), slots, kp)
            kvp.write_tokens_fp8(self.v.view(-1, HKV, D), slots, vp)
            self._pages["fp8"] = (kp, vp)
        return self._pages["fp8"]

    def fp8_error(self, out: torch.Tensor, n_ref: int = 2) -> float:
        """Max |out - float64 attention over the dequantized e4m3 pages| on the first sequences."""
        if "fp8-ref" not in self._pages:
            kp, vp = self.fp8_pages()
            self._pages["fp8-ref"] = kva.paged_attention_fp8_ref(
                self.q[:n_ref], kp, vp, self.table[:n_ref], self.seq_lens[:n_ref], dtype=torch.float64)[0]
        return float((out[:n_ref].double() - self._pages["fp8-ref"]).abs().max())

    def pages(self, bits: int, per_channel: bool = False):
        if bits == 16:
            return self.k, self.v
        key = (bits, per_channel)
        if key not in self._pages:
            ids = torch.arange(self.n_blocks, device=self.dev)
            full = torch.full((self.n_blocks,), PAGE, dtype=torch.int32, device=self.dev)
            kp = kvp.QuantizedPages.empty(self.n_blocks, PAGE, HKV, D, bits, per_channel=per_channel, device=self.dev)
            vp = kvp.QuantizedPages.empty(self.n_blocks, PAGE, HKV, D, bits, device=self.dev)
            kvp.write_blocks_to_pages(self.k, ids, full, kp)
            kvp.write_blocks_to_pages(self.v, ids, full, vp)
            self._pages[key] = (kp, vp)
        return self._pages[key]

    def kernel_error(self, out: torch.Tensor, bits: int, per_channel: bool = False, n_ref: int = 2) -> float:
        """Max |out - float64 attention over the dequantized pages| on the first sequences."""
        key = ("ref", bits, per_channel)
        if key not in self._pages:
            kp, vp = self.pages(bits, per_channel)
            self._pages[key] = kva.paged_attention_ref(self.q[:n_ref], kp, vp, self.table[:n_ref],
                                                      self.seq_lens[:n_ref])[0]
        return float((out[:n_ref].double() - self._pages[key]).abs().max())


def _time_kq(case: Case, name: str, bits: int, *, per_channel: bool = False, launch=None, splits=None,
             variant: dict | None = None, check: bool = True, fp8: bool = False) -> dict:
    """``variant``: kernel-variant arguments of ``paged_attention_quantized`` over the
    environment's (``fast_kernel``, ``inline_asm``, ``defer_sums``)."""
    kp, vp = case.fp8_pages() if fp8 else case.pages(bits, per_channel)
    splits = splits or case.kq_splits
    # Default: the schedule the engine launches for this format and launch size.
    launch = tuple(launch or kva.decode_launch(bits, case.batch * HKV * splits, case.dev))
    ld = dict(zip(LAUNCH_KEYS, launch[:3], strict=True))
    if len(launch) > 3:
        ld["maxnreg"] = launch[3]
    variant = variant or {}
    kernel_args = {**KernelSwitches.from_env().compressed(), **variant}
    fast = (bits != 16 and kernel_args["fast_kernel"]
            and kva._fast_views(case.q, kp, vp, bits, per_channel, D) is not None)
    if fast and "maxnreg" not in ld:  # the default cap paged_attention_quantized applies
        ld["maxnreg"] = kva.FAST_DECODE_MAXNREG.get(launch[:3])

    def fn():
        return kva.paged_attention_quantized(case.q, kp, vp, case.table, case.seq_lens, case.cu, max_q_len=1,
                                            softmax_scale=case.scale, num_splits=splits, launch=ld, **kernel_args)

    out = fn()  # compiles outside the timing
    _sync(case.dev)
    ms = _bench(fn)
    read = HKV * D * 2 * case.batch * case.avg_ctx if fp8 else _pages_read(bits, per_channel, case.batch, case.avg_ctx)
    row = {"format": name, "bits": bits, "key_per_channel": per_channel, "kernel": "f16-codes" if fast else "generic",
           "launch": [*launch[:3], ld.get("maxnreg")], "num_splits": splits, "ms": ms, "tb_per_s": read / (ms * 1e-3) / 1e12,
           "variant": variant}
    if check:
        err = case.fp8_error(out) if fp8 else case.kernel_error(out, bits, per_channel)
        row["max_abs_err_vs_fp64_on_dequantized"] = err
    return row


def _time_fp8(case: Case, launch=None, splits: int | None = None) -> dict:
    """e4m3 pages through ``kva.paged_attention_fp8`` as the engine calls it (its launch
    tuple gets the fp16-code kernel's register cap inside, as in the engine)."""
    kp, vp = case.fp8_pages()
    splits = splits or case.engine_quant_splits
    switches = KernelSwitches.from_env().compressed()
    launch = tuple(launch or kva.DEFAULT_LAUNCH["decode"])

    def fn():
        return kva.paged_attention_fp8(case.q, kp, vp, case.table, case.seq_lens, case.cu, max_q_len=1,
                                          softmax_scale=case.scale, num_splits=splits, launch=launch, **switches)

    out = fn()
    _sync(case.dev)
    ms = _bench(fn)
    read = HKV * D * 2 * case.batch * case.avg_ctx  # one byte per K and V element
    fast = switches["fast_kernel"] and kva._fast_views(case.q, kp, vp, 8, False, D) is not None
    cap = kva.FAST_DECODE_MAXNREG.get(launch[:3]) if fast else None
    return {"format": "fp8", "bits": 8, "kernel": "f16-codes" if fast else "generic", "launch": [*launch[:3], cap],
            "num_splits": splits,
            "ms": ms, "tb_per_s": read / (ms * 1e-3) / 1e12, "max_abs_err_vs_fp64_on_dequantized": case.fp8_error(out)}


def _time_engine(case: Case, launch=None, splits: int | None = None) -> dict:
    """The engine's bf16 decode: the TMA kernel where it runs (``launch`` None), else the
    pointer kernel at ``launch``."""
    launch = tuple(launch) if launch else None
    splits = splits or case.engine_splits
    paged_tma = KernelSwitches.from_env().paged_tma

    def fn():
        return pa.paged_attention(case.q, case.k, case.v, case.table, case.seq_lens, case.cu, max_q_len=1,
                                  softmax_scale=case.scale, num_splits=splits, launch=launch, tma=paged_tma)

    out = fn()
    _sync(case.dev)
    ms = _bench(fn)
    read = _pages_read(16, False, case.batch, case.avg_ctx)
    tma = launch is None and paged_tma and pa.tma_decode_supported(case.q, case.k, case.v, 1)
    return {"format": "bf16", "bits": 16, "kernel": "paged_decode_tma.py" if tma else "paged_attention.py",
            "launch": list(pdt.DEFAULT_TMA_DECODE_LAUNCH if tma else launch or pa.DEFAULT_LAUNCH["decode"]),
            "num_splits": splits, "ms": ms, "tb_per_s": read / (ms * 1e-3) / 1e12,
            "max_abs_err_vs_fp64_on_dequantized": case.kernel_error(out, 16)}


# --grid: (launch, split counts) for the bf16 kernel; (launch, split counts, deferred row
# sums) for int8. A 4th launch entry is a register cap (None: none) for more programs per SM.
BF16_GRID = [((128, 4, 2, None), (1, 2)), ((128, 4, 2, 168), (1, 2, 3)), ((128, 4, 2, 128), (1, 2, 3, 4)),
             ((64, 4, 2, 128), (1, 2, 4)), ((128, 8, 2, None), (1, 2))]
INT8_GRID = [((128, 4, 2, 128), (1, 2, 4), False), ((128, 4, 3, None), (1, 2), False),
             ((128, 4, 3, None), (1, 2), True), ((128, 2, 2, None), (1, 2, 4), False),
             ((128, 2, 2, None), (1, 2), True), ((128, 2, 3, None), (1, 2), False),
             ((256, 4, 2, None), (1, 2), False), ((64, 2, 2, None), (1, 2, 4), False)]


def grid_case(batch: int, ctx: int, deadline: float, dev: torch.device | None = None) -> dict:
    """Launch x split-count x deferred-sums grid for bf16 and int8 pages, one case."""
    case = Case(batch, ctx, dev or torch.device("cuda"))
    rows, skipped = [], []
    for launch, split_choices in BF16_GRID:
        for splits in split_choices:
            if time.perf_counter() > deadline:
                skipped.append(f"bf16 {launch} x{splits}")
                continue
            try:
                row = _time_engine(case, launch, splits=splits)
            except Exception as exc:  # a launch that does not compile or fit
                row = {"format": "bf16", "launch": list(launch), "num_splits": splits, "error": repr(exc)[:200]}
            rows.append(row)
    for launch, split_choices, defer in INT8_GRID:
        for splits in split_choices:
            if time.perf_counter() > deadline:
                skipped.append(f"int8 {launch} x{splits} defer={defer}")
                continue
            try:
                row = _time_kq(case, "int8-deferred-sums" if defer else "int8", 8, launch=launch, splits=splits,
                               variant={"defer_sums": bool(defer)}, check=False)
            except Exception as exc:
                row = {"format": "int8", "launch": list(launch), "num_splits": splits, "error": repr(exc)[:200]}
            rows.append(row)
    ok = [r for r in rows if "ms" in r]
    best = {fmt: min((r for r in ok if r["format"].startswith(fmt)), key=lambda r: r["ms"], default=None)
            for fmt in ("bf16", "int8")}
    res = {"batch": batch, "context": ctx, "rows": rows, "skipped": skipped, "best": best}
    if best["bf16"] and best["int8"]:
        res["best_int8_vs_best_bf16"] = best["bf16"]["ms"] / best["int8"]["ms"]
    print(json.dumps({"batch": batch, "context": ctx, "best": {k: (v["launch"], v["num_splits"], round(v["ms"] * 1e3, 1))
                      for k, v in best.items() if v}, "ratio": res.get("best_int8_vs_best_bf16")}), flush=True)
    del case
    torch.cuda.empty_cache()
    return res


def decode_case(batch: int, ctx: int, deadline: float, *, sweep: bool, extra: bool,
                dev: torch.device | None = None) -> dict:
    case = Case(batch, ctx, dev or torch.device("cuda"))
    res = {"batch": batch, "context": ctx, "kq_num_splits": case.kq_splits,
           "engine_num_splits": case.engine_splits, "engine_quant_num_splits": case.engine_quant_splits, "rows": [], "sweep": [], "skipped": []}
    rows, sw = res["rows"], res["sweep"]

    def over() -> bool:
        return time.perf_counter() > deadline

    rows.append(_time_engine(case))
    # The pointer kernel at its own split policy: the int8 ratio is also given against the fastest bf16.
    pointer_splits = pa.choose_num_splits(batch, HKV, ctx, case.dev, tma=False)
    bf16_alt = [_time_engine(case, launch, splits=pointer_splits) for launch in BF16_ALT_LAUNCHES]
    rows.append(_time_kq(case, "int8", 8))
    if case.engine_quant_splits != case.kq_splits:
        rows.append(_time_kq(case, "int8@engine-splits", 8, splits=case.engine_quant_splits))
    rows.append(_time_kq(case, "int4", 4))
    if case.engine_quant_splits != case.kq_splits:
        rows.append(_time_kq(case, "int4@engine-splits", 4, splits=case.engine_quant_splits))
    rows.append(_time_fp8(case))
    rows.append(_time_kq(case, "fp8@int8-schedule", 8, fp8=True))
    rows.append(_time_kq(case, "int8-generic", 8, variant={"fast_kernel": False}))
    if not over():
        rows.append(_time_kq(case, "int8-deferred-sums", 8, variant={"defer_sums": True}))
    else:
        res["skipped"].append("int8-deferred-sums: time budget")
    if sweep:
        for bits, configs in ((8, INT8_SWEEP), (4, INT4_SWEEP)):
            for launch in configs:
                if over():
                    res["skipped"].append(f"sweep int{bits} {launch}: time budget")
                    continue
                sw.append(_time_kq(case, f"int{bits}", bits, launch=launch))
    if extra:
        for name, bits, pc, variant in (("int8-portable", 8, False, {"inline_asm": False}),
                                        ("fp8-portable", 8, False, {"inline_asm": False}),
                                        ("fp8-generic", 8, False, {"fast_kernel": False}),
                                        ("bf16-kv_attention-kernel", 16, False, {}),
                                        ("int8-kivi", 8, True, {}), ("int4-kivi", 4, True, {})):
            if over():
                res["skipped"].append(f"{name}: time budget")
                continue
            rows.append(_time_kq(case, name, bits, per_channel=pc, variant=variant, fp8=name.startswith("fp8")))

    base = rows[0]["ms"]
    best_bf16 = min([rows[0], *bf16_alt], key=lambda r: r["ms"])
    res["bf16_alt"] = bf16_alt
    for row in rows + sw:
        row["speedup_vs_bf16"] = base / row["ms"]
        row["speedup_vs_best_bf16"] = best_bf16["ms"] / row["ms"]
    best8 = min([r for r in rows + sw if r["format"] == "int8"], key=lambda r: r["ms"])
    best4 = min([r for r in rows + sw if r["format"] == "int4"], key=lambda r: r["ms"])
    by = {r["format"]: r for r in rows}
    res["summary"] = {
        "batch": batch, "context": ctx, "bf16_ms": base, "bf16_tb_per_s": rows[0]["tb_per_s"],
        "int8_ms": by["int8"]["ms"], "int8_speedup": by["int8"]["speedup_vs_bf16"],
        "int8_tb_per_s": by["int8"]["tb_per_s"],
        "int8_engine_splits_speedup": by.get("int8@engine-splits", by["int8"])["speedup_vs_bf16"],
        "int8_best_launch": best8["launch"], "int8_best_ms": best8["ms"], "int8_best_speedup": best8["speedup_vs_bf16"],
        "int4_ms": by["int4"]["ms"], "int4_speedup": by["int4"]["speedup_vs_bf16"],
        "int4_best_launch": best4["launch"], "int4_best_speedup": best4["speedup_vs_bf16"],
        "int8_generic_speedup": by["int8-generic"]["speedup_vs_bf16"],
        "fp8_ms": by["fp8"]["ms"], "fp8_speedup": by["fp8"]["speedup_vs_bf16"],
        "fp8_best_speedup": max(r["speedup_vs_bf16"] for r in rows if r["format"].startswith("fp8")),
        "bf16_best_launch": best_bf16["launch"], "bf16_best_ms": best_bf16["ms"],
        "int8_best_speedup_vs_best_bf16": best8["speedup_vs_best_bf16"],
    }
    del case
    torch.cuda.empty_cache()
    return res


def capacity(budget_gib: float, seq_tokens: int) -> dict:
    """Concurrent ``seq_tokens``-token sequences whose pages fit ``budget_gib`` for a 1B Llama."""
    layers, hkv, d = 16, 8, 64
    dev = torch.device("cuda")
    budget = int(budget_gib * 2**30)
    blocks_per_seq = math.ceil(seq_tokens / PAGE)
    rows = []
    for name, fmt, bits, per_channel in [("bf16", None, 16, False), ("fp8", "fp8", 8, False),
                                         ("int8", "int8", 8, False), ("int4", "int4", 4, False),
                                         ("int8-kivi", None, 8, True), ("int4-kivi", None, 4, True)]:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(dev)
        if not per_channel:  # the engine's sizing and allocation: usable blocks + the scratch block
            layout = KVPoolLayout(layers, PAGE, hkv, d, fmt, torch.bfloat16)
            n_blocks = layout.blocks_for_budget(budget, dev)
            pools = layout.allocate(n_blocks + 1, dev)
            per_block = layout.pool_bytes(2) - layout.pool_bytes(1)
        else:
            per_block = kvp.kv_bytes_per_token(hkv, d, bits, block_size=PAGE, key_per_channel=True) * PAGE * layers
            granule = 2 * 2**20  # the caching allocator's rounding of large requests
            n_blocks = int((budget // granule * granule) // per_block)
            pools = torch.empty(int(n_blocks * per_block), dtype=torch.uint8, device=dev)
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
            "budget_bytes": budget, "sequence_tokens": seq_tokens, "page_size": PAGE, "rows": rows}


def _launch_str(launch) -> str:
    """``BLOCK_NxWARPSxSTAGES`` with ``/rN`` for a register cap."""
    cap = launch[3] if len(launch) > 3 else None
    return "x".join(str(x) for x in launch[:3]) + (f"/r{cap}" if cap else "")


def _print(res: dict) -> None:
    for case in res["decode"]:
        print(f"\nbatch {case['batch']} context {case['context']} (splits: kv_attention {case['kq_num_splits']}, "
              f"engine {case['engine_num_splits']})")
        print(f"{'format':<22}{'kernel':<20}{'launch':<16}{'spl':>4}{'ms':>10}{'TB/s':>7}{'x bf16':>8}{'err':>10}")
        for r in case["rows"] + case["sweep"]:
            launch = _launch_str(r["launch"])
            print(f"{r['format']:<22}{r['kernel']:<20}{launch:<16}{r['num_splits']:>4}{r['ms']:>10.4f}"
                  f"{r['tb_per_s']:>7.2f}{r['speedup_vs_bf16']:>8.2f}"
                  f"{r.get('max_abs_err_vs_fp64_on_dequantized', float('nan')):>10.1e}")
        for s in case["skipped"]:
            print(f"  skipped {s}")
    cap = res.get("capacity")
    if cap:
        print(f"\n{cap['model']}: {cap['sequence_tokens']}-token sequences in {cap['budget_gib']} GiB")
        for r in cap["rows"]:
            print(f"{r['format']:<12} {r['bytes_per_token_all_layers']:>8.0f} B/token  "
                  f"{r['concurrent_sequences']:>5} seqs  ({r['vs_bf16']:.2f}x)  "
                  f"allocated {r['allocated_bytes'] / 2**30:.3f} GiB  fits_budget: {r['fits_budget']}")
    print("\nsummary: fp8 / int8 / int4 (fp16-code kernel) vs the bf16 paged kernel, same context")
    print(f"{'batch':>6}{'ctx':>6}{'bf16 ms':>10}{'TB/s':>6}{'int8 ms':>10}{'x':>6}{'x@eng':>6}{'best x':>7}"
          f"{'best launch':>16}{'int4 x':>8}{'generic x':>10}{'fp8 ms':>10}{'fp8 x':>7}")
    for s in res["summary"]:
        print(f"{s['batch']:>6}{s['context']:>6}{s['bf16_ms']:>10.4f}{s['bf16_tb_per_s']:>6.2f}{s['int8_ms']:>10.4f}"
              f"{s['int8_speedup']:>6.2f}{s['int8_engine_splits_speedup']:>6.2f}{s['int8_best_speedup']:>7.2f}"
              f"{_launch_str(s['int8_best_launch']):>16}{s['int4_speedup']:>8.2f}"
              f"{s['int8_generic_speedup']:>10.2f}{s['fp8_ms']:>10.4f}{s['fp8_speedup']:>7.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write results as JSON here")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--no-sweep", action="store_true", help="skip the launch sweep")
    p.add_argument("--extra", action="store_true", help="also portable conversions, fp8 generic, KIVI, bf16 via kv_attention")
    p.add_argument("--no-capacity", action="store_true")
    p.add_argument("--grid", action="store_true", help="only the launch x splits grid (BF16_GRID, INT8_GRID)")
    p.add_argument("--budget-gib", type=float, default=8.0)
    p.add_argument("--seq-tokens", type=int, default=4096)
    p.add_argument("--time-budget", type=float, default=150.0, help="seconds after which optional parts are skipped")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kv_quant.py needs a CUDA GPU")
    from stream_attention.core.benchmarking import spin_up_gpu

    spin_up_gpu()
    t0 = time.perf_counter()
    deadline = t0 + args.time_budget
    import triton

    res: dict = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "shape": {"hq": HQ, "hkv": HKV, "head_dim": D, "page": PAGE},
        "defaults": {"kv_attention": kva.DEFAULT_LAUNCH["decode"], "paged_attention": pa.DEFAULT_LAUNCH["decode"],
                     "kv_attention_fast_maxnreg": {str(k): v for k, v in kva.FAST_DECODE_MAXNREG.items()}},
        "env": {k: v for k, v in os.environ.items() if k.startswith("STREAM_ATTENTION_")},
        "decode": [], "summary": [], "notes": [],
    }
    if args.grid:
        res["grid"] = [grid_case(batch, ctx, deadline) for batch in args.batch for ctx in args.contexts]
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
        return
    for batch in args.batch:
        for ctx in args.contexts:
            case = decode_case(batch, ctx, deadline, sweep=not args.no_sweep, extra=args.extra)
            res["decode"].append(case)
            res["summary"].append(case.pop("summary"))
            took = time.perf_counter() - t0
            print(f"[{took:6.1f} s] batch {batch} ctx {ctx}: int8 x{res['summary'][-1]['int8_speedup']:.2f}", flush=True)
            if args.out:  # partial results survive a time-out
                Path(args.out).write_text(json.dumps(res, indent=1))
    if not args.no_capacity:
        res["capacity"] = capacity(args.budget_gib, args.seq_tokens)
    res["int8_min_speedup_vs_bf16"] = min(s["int8_speedup"] for s in res["summary"])
    res["int8_best_min_speedup_vs_bf16"] = min(s["int8_best_speedup"] for s in res["summary"])
    res["wall_s"] = time.perf_counter() - t0
    _print(res)
    print(f"\nint8 vs bf16, worst case: x{res['int8_min_speedup_vs_bf16']:.2f} at the default launch, "
          f"x{res['int8_best_min_speedup_vs_bf16']:.2f} at each case's best; wall {res['wall_s']:.1f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
