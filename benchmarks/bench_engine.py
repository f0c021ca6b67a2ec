"""GPU benchmark of the engine: paged decode bandwidth and offline generation throughput.

    python benchmarks/bench_engine.py --out engine.json [--quick]

(a) Paged decode attention, GQA 32/8, head_dim 128, pages of 16, bf16: bytes of K/V
    read per second for batch 16/64 and context 4k/8k, against SDPA (cuDNN and flash
    backends) on the same keys/values laid out densely, plus a plain copy of the same
    bytes as the ceiling. ``paged`` is the engine's decode call (the TMA kernel on Hopper); the
    sweep of launch shapes and split counts is the pointer kernel's.
(b) Offline throughput of a 1B-shaped Llama with random weights (hidden 2048, 16 layers,
    32/8 heads, intermediate 8192, vocab 128256, bf16): 64 prompts of 512 random tokens,
    256 generated tokens each with EOS ignored, for this engine and for HF ``generate``
    with a static cache on the same GPU. Without ``--only`` both run in this process, one
    after the other; ``scripts/gpu_run.sh`` runs them as separate processes
    (``--only hf``, ``--only engine``), so neither inherits the other's allocations.
(c) ``--only anatomy``: paged decode (bf16 and int8 pages) and cuDNN time vs context (1k-16k)
    at batch 16 and 64, fitted as ``ms = F + bytes / BW``: a fixed per-call cost and a
    marginal read rate; each timed as a graph replay after a zeroing L2 flush and after a
    read-only one (no dirty write-back), as eager do_bench calls, and by the profiler.

Kernel times are CUDA-graph replays with L2 evicted (zeroed, as ``do_bench`` does) before
each (``stream_attention.core.benchmarking.time_graph_ms``): eager calls of the decode
wrappers cost the host about as long as the kernels run, and do_bench then times GPU idle.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _do_bench(fn, warmup: int = 10, rep: int = 50) -> float:
    """Median ms of eager calls, L2 zeroed between them (triton's do_bench): counts any GPU
    idle time while the host prepares a launch."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _bench(fn, warmup: int = 10, rep: int = 50, flush: str = "zero") -> float:
    """Median ms of a CUDA-graph replay of ``fn``, L2 evicted before each (zeroed, as
    do_bench does, unless ``flush="read"``); eager do_bench if ``fn`` cannot be captured."""
    from stream_attention.core.benchmarking import time_graph_ms

    try:
        return time_graph_ms(fn, reps=rep, flush=flush)
    except Exception as exc:  # noqa: BLE001 - a backend that cannot be captured is still timed
        print(f"graph capture failed ({exc!r:.120}); eager do_bench", file=sys.stderr)
        torch.cuda.synchronize()
        return _do_bench(fn, warmup=warmup, rep=rep)


def _kernel_span_read_flush(fn, reps: int = 20) -> dict:
    """GPU-side time of ``fn`` from the profiler (CUPTI), L2 evicted by a read between calls.

    ``span_us``: first kernel start to last kernel end of one call (launch latency and the
    event pair excluded, the gap between a split kernel and its combine included);
    ``busy_us``: the kernels' summed durations. Medians over ``reps`` calls.
    """
    from torch.profiler import ProfilerActivity, profile

    from stream_attention.core.benchmarking import evict_l2

    def cuda_kernels(prof) -> list:
        return sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                      key=lambda e: e.time_range.start)

    dev = torch.device("cuda", torch.cuda.current_device())
    evict_l2(dev)  # allocates the flush buffer outside the profile
    fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.name for e in cuda_kernels(prof)}
    per_call = len(cuda_kernels(prof))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            evict_l2(dev)
            fn()
        torch.cuda.synchronize()
    ours = [e for e in cuda_kernels(prof) if e.name in names]
    calls = [ours[i:i + per_call] for i in range(0, len(ours) - per_call + 1, per_call)]
    spans = sorted(c[-1].time_range.end - c[0].time_range.start for c in calls)
    busy = sorted(sum(e.time_range.elapsed_us() for e in c) for c in calls)
    return {"span_us": float(spans[len(spans) // 2]), "busy_us": float(busy[len(busy) // 2]),
            "kernels_per_call": per_call}


DECODE_HQ, DECODE_HKV, DECODE_D, DECODE_PAGE = 32, 8, 128, 16


def _decode_data(batch: int, ctx: int, dev: torch.device | None = None) -> dict:
    """Random bf16 decode inputs, paged (pages scattered over the pool) and the same data dense."""
    dev = dev or torch.device("cuda")
    hq, hkv, d, page = DECODE_HQ, DECODE_HKV, DECODE_D, DECODE_PAGE
    torch.manual_seed(0)
    n_pages = batch * ctx // page
    k_pages = torch.randn(n_pages, page, hkv, d, device=dev, dtype=torch.bfloat16)
    v_pages = torch.randn_like(k_pages)
    # Pages of a sequence scattered over the pool, as after a while of serving.
    table = torch.randperm(n_pages, device=dev).view(batch, ctx // page).to(torch.int32)
    q = torch.randn(batch, hq, d, device=dev, dtype=torch.bfloat16)
    return {
        "dev": dev, "k_pages": k_pages, "v_pages": v_pages, "table": table, "q": q,
        "seq_lens": torch.full((batch,), ctx, dtype=torch.int32, device=dev),
        "cu": torch.arange(batch + 1, dtype=torch.int32, device=dev),
        "kv_bytes": 2 * batch * ctx * hkv * d * k_pages.element_size(),
        # [B, Hkv, ctx, D]
        "k_dense": k_pages[table.long()].reshape(batch, ctx, hkv, d).transpose(1, 2).contiguous(),
        "v_dense": v_pages[table.long()].reshape(batch, ctx, hkv, d).transpose(1, 2).contiguous(),
        "q_dense": q[:, :, None, :],
    }


def _decode_case(batch: int, ctx: int, quick: bool) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from stream_attention.core.kernel_switches import KernelSwitches
    from stream_attention.kernels.paged_attention import choose_num_splits, paged_attention

    switches = KernelSwitches.from_env()

    hq, hkv, d = DECODE_HQ, DECODE_HKV, DECODE_D
    scale = 1.0 / math.sqrt(d)
    data = _decode_data(batch, ctx)
    dev, k_pages, v_pages, table, q = data["dev"], data["k_pages"], data["v_pages"], data["table"], data["q"]
    seq_lens, cu, kv_bytes = data["seq_lens"], data["cu"], data["kv_bytes"]
    k_dense, v_dense, q_dense = data["k_dense"], data["v_dense"], data["q_dense"]

    row = {"batch": batch, "context": ctx, "kv_bytes": kv_bytes}
    default_splits = choose_num_splits(batch, hkv, ctx, dev)
    row["default_splits"] = default_splits

    def run_paged(splits=default_splits, launch=None):
        return paged_attention(q, k_pages, v_pages, table, seq_lens, cu, max_q_len=1, softmax_scale=scale,
                               num_splits=splits, launch=launch, **switches.paged())

    # Checked on two sequences: a float32 reference over the whole batch (GBs, seconds of
    # math-kernel work) left the next timings 15-20% slow in one run (clocks, presumably).
    ref = torch.nn.functional.scaled_dot_product_attention(
        q_dense[:2].float(), k_dense[:2].float(), v_dense[:2].float(), scale=scale, enable_gqa=True)[:, :, 0]
    row["paged_max_abs_err"] = float((run_paged()[:2].float() - ref).abs().max())
    del ref
    buffers = torch.empty(2, kv_bytes // 2, dtype=torch.bfloat16, device=dev)
    # Eager: a copy captured in a graph may become a copy-engine transfer (measured
    # 2.41-2.44 TB/s that way where the copy kernel ran 2.95).
    t = _do_bench(lambda: buffers[1].copy_(buffers[0]))
    # A copy reads and writes; the ceiling for a read-only kernel is the copy's traffic rate.
    row["copy_read_write_TBps"] = 2 * kv_bytes / t / 1e9

    ms = _bench(run_paged)
    row["paged_ms"] = ms
    row["paged_TBps"] = kv_bytes / ms / 1e9

    sweep = []
    split_choices = sorted({1, 2, 3, 4, default_splits})
    # Triton 3.6 single-buffers these tiles (each tile's K/V address waits on its page-id
    # load, so the pipeliner cannot run ahead); resident programs per SM (registers, shared
    # memory; scripts/sass_count.py offline): (128,4,2) 2, (128,4,3) 2, (64,4,3) 3, (32,4,4) 5.
    launches = [(64, 4, 3)] if quick else [(128, 4, 2), (128, 4, 3), (64, 4, 3), (64, 4, 4), (32, 4, 4),
                                           (64, 8, 3), (128, 8, 3)]
    for launch in launches:
        for splits in split_choices:
            try:
                t = _bench(lambda s=splits, la=launch: run_paged(s, la), warmup=5, rep=20)
                sweep.append({"launch": launch, "splits": splits, "ms": t, "TBps": kv_bytes / t / 1e9})
            except Exception as exc:  # a launch shape that does not fit
                sweep.append({"launch": launch, "splits": splits, "error": repr(exc)[:200]})
    ok = [s for s in sweep if "ms" in s]
    row["sweep_best"] = min(ok, key=lambda s: s["ms"]) if ok else None
    row["sweep"] = sweep

    for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
        entry = {}
        for gqa in (True, False):
            kd = k_dense if gqa else k_dense.repeat_interleave(hq // hkv, dim=1)
            vd = v_dense if gqa else v_dense.repeat_interleave(hq // hkv, dim=1)

            def run_sdpa(kd=kd, vd=vd, gqa=gqa, backend=backend):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(
                        q_dense, kd, vd, scale=scale, enable_gqa=gqa)
            try:
                run_sdpa()
                t = _bench(run_sdpa)
                # Without GQA support the dense K/V are repeated per query head; the rate
                # is still counted on the unique K/V bytes, the same work as ours.
                entry = {"ms": t, "TBps": kv_bytes / t / 1e9, "enable_gqa": gqa}
                break
            except Exception as exc:
                entry = {"error": repr(exc)[:300]}
        row[name] = entry
    for base in ("sdpa_cudnn", "sdpa_flash"):
        if "ms" in row[base]:
            row[f"speedup_vs_{base}"] = row[base]["ms"] / row["paged_ms"]
    return row


def _fit_fixed_cost(points: list[tuple[int, float]]) -> dict:
    """Least squares ``ms = F + bytes / BW`` over ``(bytes, ms)`` points: F in µs, BW in TB/s."""
    n = len(points)
    mx = sum(b for b, _ in points) / n
    my = sum(t for _, t in points) / n
    sxx = sum((b - mx) ** 2 for b, _ in points)
    slope = sum((b - mx) * (t - my) for b, t in points) / sxx  # ms per byte
    fixed = my - slope * mx
    resid = max(abs(t - (fixed + slope * b)) for b, t in points)
    return {"fixed_us": fixed * 1e3, "marginal_TBps": 1e-9 / slope, "max_residual_us": resid * 1e3}


def decode_anatomy(batches=(16, 64), contexts=(1024, 2048, 4096, 8192, 16384), dev: torch.device | None = None,
                   bench=None, do_bench=None, kernel_span=None) -> dict:
    """Time vs context at batch 16 and 64, for the paged kernel (shipped launch and split
    policy) and cuDNN on the same data dense, fitted as a fixed per-call cost plus a rate.
    (``dev``/``bench*`` let a CPU smoke run drive the same code.)"""
    bench, do_bench = bench or _bench, do_bench or _do_bench
    kernel_span = kernel_span or _kernel_span_read_flush
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from stream_attention.core.kernel_switches import KernelSwitches
    from stream_attention.kernels import kv_attention as kva
    from stream_attention.kernels import kv_pages as kvp
    from stream_attention.kernels.paged_attention import choose_num_splits, paged_attention

    switches = KernelSwitches.from_env()

    scale = 1.0 / math.sqrt(DECODE_D)
    out: dict = {}
    for batch in batches:
        names = ("paged", "paged_1split", "paged_int8", "sdpa_cudnn")
        sfxs = ("", "_read_flush", "_eager_do_bench")
        pts: dict[str, list] = {n + sfx: [] for n in names for sfx in sfxs}
        spans: dict[str, list] = {}
        for ctx in contexts:
            data = _decode_data(batch, ctx, dev)
            splits = choose_num_splits(batch, DECODE_HKV, ctx, data["dev"])
            # The engine's split count and schedule for int8 pages (ModelRunner._decode_splits).
            splits8 = choose_num_splits(batch, DECODE_HKV, ctx, data["dev"], tma=False)
            int8_launch = dict(zip(("BLOCK_N", "num_warps", "num_stages"),
                                   kva.decode_launch(8, batch * DECODE_HKV * splits8, data["dev"]), strict=True))

            def paged(data=data, splits=splits):
                return paged_attention(data["q"], data["k_pages"], data["v_pages"], data["table"], data["seq_lens"],
                                       data["cu"], max_q_len=1, softmax_scale=scale, num_splits=splits,
                                       **switches.paged())

            # The same keys/values as int8 pages (per-token scales), read by kv_attention's decode kernel.
            n_blocks = data["k_pages"].shape[0]
            ids = torch.arange(n_blocks, device=data["dev"])
            full = torch.full((n_blocks,), DECODE_PAGE, dtype=torch.int32, device=data["dev"])
            kq8, vq8 = (kvp.QuantizedPages.empty(n_blocks, DECODE_PAGE, DECODE_HKV, DECODE_D, 8, device=data["dev"])
                        for _ in range(2))
            kvp.write_blocks_to_pages(data["k_pages"], ids, full, kq8)
            kvp.write_blocks_to_pages(data["v_pages"], ids, full, vq8)
            # Page bytes read: codes plus one fp16 (scale, zero) pair per token and head.
            int8_bytes = data["kv_bytes"] // 2 + 2 * batch * ctx * DECODE_HKV * 4

            def paged_int8(data=data, kq8=kq8, vq8=vq8, splits=splits8, int8_launch=int8_launch):
                return kva.paged_attention_quantized(data["q"], kq8, vq8, data["table"], data["seq_lens"], data["cu"],
                                                    max_q_len=1, softmax_scale=scale, num_splits=splits,
                                                    launch=int8_launch, **switches.compressed())

            def cudnn(data=data):
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(
                        data["q_dense"], data["k_dense"], data["v_dense"], scale=scale, enable_gqa=True)

            cases = [("paged", paged, data["kv_bytes"]), ("paged_int8", paged_int8, int8_bytes),
                     ("sdpa_cudnn", cudnn, data["kv_bytes"])]
            if splits > 1:  # the same kernel without split-K
                cases.append(("paged_1split", lambda data=data: paged(data, 1), data["kv_bytes"]))
            for name, fn, nbytes in cases:
                try:
                    fn()
                    times = (bench(fn), bench(fn, flush="read"), do_bench(fn))
                    span = kernel_span(fn)
                    for sfx, t in zip(sfxs, times, strict=True):
                        pts[name + sfx].append((nbytes, t, ctx))
                    spans.setdefault(name, []).append({"context": ctx, **span})
                except Exception as exc:
                    out.setdefault("errors", []).append(f"{name} b{batch} ctx{ctx}: {exc!r}"[:300])
            del data, kq8, vq8
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        for name, rows in pts.items():
            entry = {"points": [{"context": c, "ms": t, "TBps": b / t / 1e9} for b, t, c in rows]}
            if len(rows) >= 2:
                entry.update(_fit_fixed_cost([(b, t) for b, t, _ in rows]))
            out[f"batch{batch}_{name}"] = entry
        for name, rows in spans.items():
            span_pts = [(b, r["span_us"] * 1e-3) for (b, _, _), r in zip(pts[name], rows, strict=True)]
            out[f"batch{batch}_{name}_profiler"] = {"points": rows, **(
                _fit_fixed_cost(span_pts) if len(span_pts) >= 2 else {})}
        print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "points"} for k, v in out.items()
                          if k.startswith(f"batch{batch}_")}), flush=True)
    return out


def decode_layout(batches=(16, 64), contexts=(4096, 8192), dev: torch.device | None = None,
                  bench=None, kernel_span=None) -> dict:
    """Does the page layout or placement cost bandwidth? The shipped layout is token-major
    (``[blocks, page, Hkv, D]``: one head's 16 rows of a page lie 2 KiB apart for bf16,
    1 KiB for int8 codes) with pages scattered over the pool. Variants: head-major pages
    (``[blocks, Hkv, page, D]`` storage passed as a strided view: each head's page
    contiguous) and the same pages stored in table order, for bf16 and int8 pages; cuDNN
    dense beside."""
    bench, kernel_span = bench or _bench, kernel_span or _kernel_span_read_flush
    rows = []
    for batch in batches:
        for ctx in contexts:
            row = _layout_case(batch, ctx, dev, bench, kernel_span)
            print(json.dumps({k: (round(v["ms"] * 1e3, 1) if isinstance(v, dict) and "ms" in v else v)
                              for k, v in row.items()}), flush=True)
            rows.append(row)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return {"rows": rows}


def _layout_case(batch: int, ctx: int, dev, bench, kernel_span) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from stream_attention.core.kernel_switches import KernelSwitches
    from stream_attention.kernels import kv_attention as kva
    from stream_attention.kernels import kv_pages as kvp
    from stream_attention.kernels.paged_attention import choose_num_splits, paged_attention

    switches = KernelSwitches.from_env()

    def head_major(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)

    scale = 1.0 / math.sqrt(DECODE_D)
    data = _decode_data(batch, ctx, dev)
    d = data["dev"]
    splits = choose_num_splits(batch, DECODE_HKV, ctx, d)
    n_blocks = data["k_pages"].shape[0]
    ids = torch.arange(n_blocks, device=d)
    full = torch.full((n_blocks,), DECODE_PAGE, dtype=torch.int32, device=d)

    def quantized(src: torch.Tensor) -> kvp.QuantizedPages:
        pages = kvp.QuantizedPages.empty(n_blocks, DECODE_PAGE, DECODE_HKV, DECODE_D, 8, device=d)
        kvp.write_blocks_to_pages(src, ids, full, pages)
        return pages

    q8 = [quantized(data["k_pages"]), quantized(data["v_pages"])]
    q8_hm = [kvp.QuantizedPages(head_major(p.data), head_major(p.scales), 8, DECODE_D) for p in q8]
    bf_hm = [head_major(data["k_pages"]), head_major(data["v_pages"])]
    # The same pages stored in table order, so a sequence's pages are consecutive.
    order = data["table"].reshape(-1).long()
    bf_seq = [data["k_pages"][order], data["v_pages"][order]]
    q8_seq = [quantized(bf_seq[0]), quantized(bf_seq[1])]
    contiguous = torch.arange(n_blocks, device=d, dtype=torch.int32).view(batch, -1)
    launch8 = dict(zip(("BLOCK_N", "num_warps", "num_stages"),
                       kva.decode_launch(8, batch * DECODE_HKV * splits, d), strict=True))

    def bf16(k, v, table):
        return lambda: paged_attention(data["q"], k, v, table, data["seq_lens"], data["cu"], max_q_len=1,
                                       softmax_scale=scale, num_splits=splits, **switches.paged())

    def int8(k, v, table):
        return lambda: kva.paged_attention_quantized(data["q"], k, v, table, data["seq_lens"], data["cu"],
                                                    max_q_len=1, softmax_scale=scale, num_splits=splits,
                                                    launch=launch8, **switches.compressed())

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(
                data["q_dense"], data["k_dense"], data["v_dense"], scale=scale, enable_gqa=True)

    tab = data["table"]
    cases = {
        "bf16": bf16(data["k_pages"], data["v_pages"], tab),
        "bf16_contiguous_table": bf16(*bf_seq, contiguous),
        "bf16_head_major": bf16(*bf_hm, tab),
        "int8": int8(*q8, tab),
        "int8_contiguous_table": int8(*q8_seq, contiguous),
        "int8_head_major": int8(*q8_hm, tab),
        "sdpa_cudnn": cudnn,
    }
    row = {"batch": batch, "context": ctx, "splits": splits, "int8_launch": launch8}
    ref = cases["bf16"]().float()
    for name, fn in cases.items():
        try:
            out = fn().float().reshape(ref.shape)
            row[name] = {"ms": bench(fn), **kernel_span(fn), "max_abs_diff_vs_bf16_paged": float((out - ref).abs().max())}
        except Exception as exc:
            row[name] = {"error": repr(exc)[:300]}
    base = row["bf16"].get("ms")
    for name in cases:
        if base and "ms" in row[name]:
            row[name]["speedup_vs_bf16"] = base / row[name]["ms"]
    return row


def decode_bandwidth(quick: bool) -> dict:
    shapes = [(16, 4096)] if quick else [(16, 4096), (16, 8192), (64, 4096), (64, 8192)]
    rows = []
    for batch, ctx in shapes:
        row = _decode_case(batch, ctx, quick)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "sweep"}), flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    return {"rows": rows}


def _wordlevel_tokenizer(vocab: int):
    """An offline tokenizer covering every id of the random model (text is irrelevant here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", pad_token="t0")


def _model(quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = torch.device("cuda")
    n_prompts, prompt_len, gen = (16, 512, 64) if quick else (64, 512, 256)
    n_prompts, prompt_len, gen = WORKLOAD.get("prompts", n_prompts), WORKLOAD.get("prompt_len", prompt_len), \
        WORKLOAD.get("gen", gen)
    cfg = LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=max(2048, prompt_len + gen),
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    prompts = torch.randint(2, cfg.vocab_size, (n_prompts, prompt_len), generator=torch.Generator().manual_seed(1))
    result = {"model_params_B": sum(p.numel() for p in model.parameters()) / 1e9, "prompts": n_prompts,
              "prompt_len": prompt_len, "gen_tokens": gen}
    return model, cfg, prompts, gen, result


def hf_static(quick: bool) -> dict:
    """HF ``generate`` with a static cache, greedy, every sequence the full length."""
    model, cfg, prompts, gen, result = _model(quick)
    n_prompts, prompt_len = prompts.shape
    model.generation_config.eos_token_id = None
    ids = prompts.to("cuda")
    mask = torch.ones_like(ids)
    hf_kwargs = dict(attention_mask=mask, max_new_tokens=gen, min_new_tokens=gen, do_sample=False,
                     cache_implementation="static", pad_token_id=0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, **hf_kwargs)  # warm-up (and compilation, if transformers compiles)
    torch.cuda.synchronize()
    result["hf_warmup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, **hf_kwargs)
    torch.cuda.synchronize()
    hf_s = time.perf_counter() - t0
    assert out.shape[1] == prompt_len + gen
    result["hf_static_s"] = hf_s
    result["hf_static_tok_s"] = n_prompts * gen / hf_s
    with torch.inference_mode():
        ref = model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=8, min_new_tokens=8, do_sample=False,
                             pad_token_id=0)[:, prompt_len:].tolist()
    result["hf_first8"] = ref
    print(json.dumps(result), flush=True)
    return result


ENGINE_KV_BYTES = 8 << 30
ENGINE_STEP_TOKENS = 16384
ENGINE_FUSED = True
ENGINE_PROFILE = False
ENGINE_KV_DTYPE = "auto"
ENGINE_ASYNC: bool | None = None
WORKLOAD: dict[str, int] = {}  # --prompts / --prompt-len / --gen overrides


def _kernel_times(run) -> dict[str, float]:
    """GPU microseconds per kernel name over ``run()`` (torch.profiler, CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            times[evt.name] = times.get(evt.name, 0.0) + evt.time_range.elapsed_us()
    return times


def _decode_kernel_profile(engine, plist, steps: int = 32) -> dict:
    """Per-kernel GPU time of one decode step: a ``steps + 1``-token run minus a 1-token
    (prefill-only) run of the same prompts, divided by ``steps``."""
    from stream_attention.engine import SamplingParams

    prefill = _kernel_times(lambda: engine.generate(plist, SamplingParams(max_tokens=1, ignore_eos=True)))
    full = _kernel_times(lambda: engine.generate(plist, SamplingParams(max_tokens=steps + 1, ignore_eos=True)))
    per_step = {k: (v - prefill.get(k, 0.0)) / steps for k, v in full.items()}
    top = sorted(per_step.items(), key=lambda kv: -kv[1])[:30]
    return {"us_per_step_total": sum(v for v in per_step.values() if v > 0),
            "top_kernels_us_per_step": [[k[:120], round(v, 2)] for k, v in top]}


def _step_gpu_times(engine, run) -> dict:
    """GPU time of each model step (CUDA events around ``runner.execute``) during ``run()``,
    summarised for decode-only steps; wall time per step minus it is the host's share."""
    runner = engine.runner
    plain = runner.execute
    marks: list[tuple[int, bool, torch.cuda.Event, torch.cuda.Event]] = []

    def timed(scheduled, fed=None):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = plain(scheduled, fed)
        end.record()
        marks.append((len(scheduled), all(s.num_new_tokens == 1 for s in scheduled), start, end))
        return out

    runner.execute = timed
    try:
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    finally:
        runner.execute = plain
    decode = sorted(s.elapsed_time(e) for n, dec, s, e in marks if dec)
    prefill = sum(s.elapsed_time(e) for n, dec, s, e in marks if not dec)
    return {
        "steps": len(marks),
        "decode_steps": len(decode),
        "decode_gpu_ms_p50": decode[len(decode) // 2] if decode else None,
        "decode_gpu_ms_sum": sum(decode),
        "prefill_gpu_ms_sum": prefill,
        "wall_ms": 1e3 * wall,
        "host_ms_per_step": (1e3 * wall - sum(decode) - prefill) / max(len(marks), 1),
    }


def engine_throughput(quick: bool) -> dict:
    """Our engine on the same model, prompts and lengths (greedy, ignore EOS)."""
    from stream_attention.engine import LLMEngine, SamplingParams

    model, cfg, prompts, gen, result = _model(quick)
    n_prompts = prompts.shape[0]
    tok = _wordlevel_tokenizer(cfg.vocab_size)
    t0 = time.perf_counter()
    engine = LLMEngine(
        model, tok, kv_cache_memory_bytes=ENGINE_KV_BYTES, max_num_seqs=n_prompts,
        max_num_batched_tokens=ENGINE_STEP_TOKENS,
        max_model_len=max(1024, prompts.shape[1] + gen), enable_prefix_caching=False, fused_layers=ENGINE_FUSED,
        kv_cache_dtype=ENGINE_KV_DTYPE, async_scheduling=ENGINE_ASYNC,
    )
    result["kv_cache_dtype"] = ENGINE_KV_DTYPE
    result["async_scheduling"] = engine.async_scheduling
    result["engine_kv_blocks"] = engine.stats().kv_blocks_total
    result["engine_fused_layers"] = engine.runner.fused is not None
    result["engine_init_s"] = time.perf_counter() - t0
    result["engine_kv_bytes"], result["engine_step_tokens"] = ENGINE_KV_BYTES, ENGINE_STEP_TOKENS
    result["engine_graph_sizes"] = sorted(engine.runner.graphs)
    sp = SamplingParams(max_tokens=gen, ignore_eos=True)
    plist = [p.tolist() for p in prompts]
    t0 = time.perf_counter()
    # The full batch once (every graph size the timed runs replay), then three timed runs:
    # the median is reported (the first replays of a graph and allocator growth cost more).
    engine.generate(plist, SamplingParams(max_tokens=8, ignore_eos=True))
    result["engine_warmup_s"] = time.perf_counter() - t0
    runs = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = engine.generate(plist, sp)
        torch.cuda.synchronize()
        runs.append(time.perf_counter() - t0)
        assert all(len(o.token_ids) == gen for o in outs)
    eng_s = sorted(runs)[1]
    result["engine_s"] = eng_s
    result["engine_s_runs"] = runs
    result["engine_tok_s"] = n_prompts * gen / eng_s
    ttft = sorted(o.time_to_first_token for o in outs)
    result["engine_ttft_p50_s"] = ttft[len(ttft) // 2]
    result["engine_first8"] = [outs[i].token_ids[:8] for i in range(2)]
    # Where the time goes: prefill alone, then decode steps alone.
    t0 = time.perf_counter()
    engine.generate(plist, SamplingParams(max_tokens=1, ignore_eos=True))
    torch.cuda.synchronize()
    result["engine_prefill_only_s"] = time.perf_counter() - t0
    result["engine_decode_step_ms"] = 1e3 * (eng_s - result["engine_prefill_only_s"]) / max(gen - 1, 1)
    result["preemptions"] = engine.stats().preemptions_total
    result["steps_launched_ahead"] = engine.num_steps_launched_ahead
    result["engine_step_profile"] = _step_gpu_times(engine, lambda: engine.generate(plist, sp))
    if ENGINE_PROFILE:
        try:
            result["engine_decode_kernels"] = _decode_kernel_profile(engine, plist)
        except Exception as exc:  # the profiler is a diagnostic; never lose the numbers above
            result["engine_decode_kernels"] = {"error": repr(exc)[:500]}
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run)")
    ap.add_argument("--only", choices=["decode", "anatomy", "layout", "hf", "engine"], default=None,
                    help="one part only (the GPU script runs each part in its own process)")
    ap.add_argument("--kv-gib", type=float, default=8.0, help="engine KV cache size")
    ap.add_argument("--step-tokens", type=int, default=16384, help="engine max_num_batched_tokens")
    ap.add_argument("--no-fused", action="store_true", help="run transformers' layers (engine fused_layers=False)")
    ap.add_argument("--profile", action="store_true", help="add a per-kernel GPU time table of one decode step")
    ap.add_argument("--kv-cache-dtype", default="auto", help="engine page format: auto (bf16) / int8 / int4")
    ap.add_argument("--prompts", type=int, default=None, help="workload: number of prompts (default 64)")
    ap.add_argument("--prompt-len", type=int, default=None, help="workload: prompt tokens (default 512)")
    ap.add_argument("--gen", type=int, default=None, help="workload: generated tokens (default 256)")
    ap.add_argument("--async-scheduling", choices=["on", "off"], default=None,
                    help="engine async_scheduling (default: the engine's own default)")
    args = ap.parse_args(argv)
    global ENGINE_KV_BYTES, ENGINE_STEP_TOKENS, ENGINE_FUSED, ENGINE_PROFILE, ENGINE_KV_DTYPE, ENGINE_ASYNC
    ENGINE_ASYNC = None if args.async_scheduling is None else args.async_scheduling == "on"
    ENGINE_KV_DTYPE = args.kv_cache_dtype
    WORKLOAD.update({k: v for k, v in (("prompts", args.prompts), ("prompt_len", args.prompt_len), ("gen", args.gen))
                     if v is not None})
    ENGINE_KV_BYTES, ENGINE_STEP_TOKENS = int(args.kv_gib * 2**30), args.step_tokens
    ENGINE_FUSED = not args.no_fused
    ENGINE_PROFILE = args.profile
    from stream_attention.core.benchmarking import spin_up_gpu

    spin_up_gpu()
    if not torch.cuda.is_available():
        print("bench_engine needs a CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "quick": args.quick,
    }
    try:
        import transformers
        import triton

        report["triton"] = triton.__version__
        report["transformers"] = transformers.__version__
    except ImportError:
        pass
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import faulthandler

    faulthandler.enable()
    if args.only in (None, "decode"):
        try:
            report["decode"] = decode_bandwidth(args.quick)
        except Exception as exc:
            report["decode"] = {"error": repr(exc)[:1000]}
        gc.collect()
        torch.cuda.empty_cache()
    if args.only == "anatomy":  # not part of the default run
        report["anatomy"] = decode_anatomy()
    if args.only == "layout":  # not part of the default run
        report["layout"] = decode_layout()
    for part, fn in (("hf", hf_static), ("engine", engine_throughput)):
        if args.only in (None, part):
            try:
                report[part] = fn(args.quick)
            except Exception as exc:
                import traceback

                traceback.print_exc()  # first: a device fault may abort the process while unwinding
                sys.stderr.flush()
                report[part] = {"error": repr(exc)[:1000], "trace": traceback.format_exc()[-3000:]}
            gc.collect()
            torch.cuda.empty_cache()
    report["total_s"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out} in {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
