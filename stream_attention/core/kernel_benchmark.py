"""The fused kernel beside every attention baseline, timed on the same inputs.

For each sequence length :func:`run_benchmark` times the fused kernel and every SDPA
backend that runs here (flash, cuDNN, efficient; PyTorch's default on CPU) and
FlexAttention where it compiles. ``stream-attention-benchmark`` and the server's
``POST /benchmark`` both run it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from .benchmarking import attention_bytes, attention_flops, time_ms
from .flash_baseline import available_sdpa_backends
from .functional import fused_attention
from .sdpa import sdpa_attention

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def flex_attention_fn(causal: bool, hq: int, hkv: int) -> Callable | None:
    """A compiled FlexAttention callable on [B, T, H, D] tensors, or None if unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception:
        return None
    compiled = torch.compile(flex_attention, dynamic=False)
    masks: dict[tuple[int, int], Any] = {}

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        block_mask = None
        if causal:
            key = (q.shape[1], k.shape[1])
            if key not in masks:
                offset = k.shape[1] - q.shape[1]
                masks[key] = create_block_mask(
                    lambda b, h, qi, ki: qi + offset >= ki, None, None, q.shape[1], k.shape[1], device=q.device
                )
            block_mask = masks[key]
        out = compiled(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, enable_gqa=hq != hkv
        )
        return out.transpose(1, 2)

    return run


def implementations(device: torch.device, causal: bool, hq: int, hkv: int, flex: bool = True) -> dict[str, Callable]:
    """Name -> callable(q, k, v) for the fused kernel and every baseline runnable here."""
    impls: dict[str, Callable] = {"fused": lambda q, k, v: fused_attention(q, k, v, causal=causal)}
    if device.type == "cuda":
        for name in available_sdpa_backends(device):
            impls[f"sdpa-{name}"] = lambda q, k, v, _n=name: sdpa_attention(q, k, v, causal=causal, sdpa_backend=_n)
        fn = flex_attention_fn(causal, hq, hkv) if flex else None
        if fn is not None:
            impls["flex"] = fn
    else:
        impls["sdpa"] = lambda q, k, v: sdpa_attention(q, k, v, causal=causal)
    return impls


def fused_backend_name(device: torch.device) -> str:
    from .backend import resolve_backend

    return resolve_backend("auto", device)


def run_benchmark(
    seq_lens: list[int],
    batch: int = 1,
    heads: int = 8,
    dim: int = 64,
    causal: bool = False,
    dtype: str = "fp16",
    kv_heads: int | None = None,
    warmup: int = 10,
    iters: int = 50,
    device: str | torch.device | None = None,
    tokens_per_batch: int | None = None,
    flex: bool = True,
    progress: bool = False,
    impls: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Time every implementation at each sequence length; one dict per (length, impl).

    ``tokens_per_batch`` overrides ``batch`` with ``tokens_per_batch // seq_len``;
    ``impls`` keeps only the named baselines (the fused kernel always runs).
    Implementations that fail (unsupported shape/dtype for a backend) are recorded
    with an ``error`` field instead of a time.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    if dev.type == "cpu" and torch_dtype != torch.float32:
        torch_dtype = torch.float32  # CPU SDPA computes in fp32 anyway; time what runs
    kv_heads = kv_heads or heads
    if heads % kv_heads:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
    only = impls
    impls = implementations(dev, causal, heads, kv_heads, flex=flex)
    if only:
        impls = {name: fn for name, fn in impls.items() if name in only or name == "fused"}
    fused_backend = fused_backend_name(dev)
    rows: list[dict[str, Any]] = []
    work = [(n, name) for n in seq_lens for name in impls]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(work), desc="benchmark", unit="run", file=sys.stderr)
    for n in seq_lens:
        b = max(1, tokens_per_batch // n) if tokens_per_batch else batch
        gen = torch.Generator(device=dev).manual_seed(n)
        q = torch.randn(b, n, heads, dim, device=dev, dtype=torch_dtype, generator=gen)
        k = torch.randn(b, n, kv_heads, dim, device=dev, dtype=torch_dtype, generator=gen)
        v = torch.randn(b, n, kv_heads, dim, device=dev, dtype=torch_dtype, generator=gen)
        flops = attention_flops(b, heads, n, n, dim, causal)
        nbytes = attention_bytes(b, heads, kv_heads, n, n, dim, q.element_size())
        for name, fn in impls.items():
            row: dict[str, Any] = {
                "impl": name,
                "seq_len": n,
                "batch": b,
                "heads": heads,
                "kv_heads": kv_heads,
                "dim": dim,
                "causal": causal,
                "dtype": str(torch_dtype).replace("torch.", ""),
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            }
            if name == "fused":
                row["backend"] = fused_backend
            try:
                with torch.no_grad():
                    ms = time_ms(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v), dev, warmup=warmup, iterations=iters)
                row.update(time_ms=ms, tflops=flops / (ms * 1e-3) / 1e12, gb_s=nbytes / (ms * 1e-3) / 1e9)
            except Exception as exc:  # a backend that rejects this shape is a result, not a crash
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            rows.append(row)
            if bar is not None:
                bar.update(1)
        del q, k, v
    if bar is not None:
        bar.close()
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The seed's table: fused latency/TFLOP/s, then each baseline and its ratio to fused."""
    seqs = sorted({r["seq_len"] for r in rows})
    names = [n for n in dict.fromkeys(r["impl"] for r in rows) if n != "fused"]
    by = {(r["seq_len"], r["impl"]): r for r in rows}
    header = f"{'SeqLen':>7} {'Fused(ms)':>10} {'Fused(TF)':>10}"
    for n in names:
        header += f" {n + '(ms)':>17} {n + '(TF)':>17} {n + '/Fused(ms)':>20}"
    lines = [header]
    for s in seqs:
        fused = by.get((s, "fused"), {})
        line = f"{s:>7} {_fmt(fused.get('time_ms'), 10, 3)} {_fmt(fused.get('tflops'), 10, 2)}"
        for n in names:
            r = by.get((s, n), {})
            ratio = r["time_ms"] / fused["time_ms"] if "time_ms" in r and "time_ms" in fused else None
            line += f" {_fmt(r.get('time_ms'), 17, 3)} {_fmt(r.get('tflops'), 17, 2)} {_fmt(ratio, 20, 2)}"
        lines.append(line)
    fused_backends = {r.get("backend") for r in rows if r["impl"] == "fused"}
    lines.append(f"fused ran on: {', '.join(sorted(b for b in fused_backends if b))}")
    return "\n".join(lines)


def _fmt(value: float | None, width: int, digits: int) -> str:
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'n/a':>{width}}"
