"""Held-out perplexity and bits per byte of a causal LM (``stream-attention-eval``).

Any model (the embedded default or a Hugging Face directory) under any attention or
KV-cache configuration, against classical compressors on the same bytes.

Scoring: every held-out document is ``<|bos|>`` + its tokens; windows of ``--ctx``
tokens advance by ``--stride`` and each token is scored once, with at least
``ctx - stride`` tokens of context once past the first window. The end-of-document
token is not scored, so bits per byte = (sum of token NLLs in bits) / (document UTF-8
bytes) is directly comparable with a compressor's output size on those bytes.

``--prefill-chunk N`` feeds each window through the KV cache N tokens at a time (cache
built by ``--cache module:factory`` or a ``DynamicCache``), so KV-cache compression
and chunked-prefill variants show up in the score; ``--model-hook module:function``
may wrap or modify the loaded model (e.g. star attention) before scoring.

``--kv-compression POLICY --ratio R`` evaluates a compressed KV cache instead
(:mod:`stream_attention.engine.needle`, through ``stream-attention-eval``): needle retrieval accuracy (a value assigned near
the top of a held-out file, asked for at the end of the context) and the perplexity of
held-out continuations, each with the full cache and with the context's cache compressed
by the engine's policy (``streaming``, ``heavy-hitter``, ``snapkv``, ``hybrid``).

Examples::

    stream-attention-eval --out heldout.json                       # the default model
    stream-attention-eval --kv-compression snapkv --ratio 4        # needle accuracy + perplexity
    stream-attention-eval --model path/to/hf_dir --attn stream_attention --backend triton
    stream-attention-eval --max-bytes 20000 --anchors none         # a quick slice
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import importlib
import json
import logging
import lzma
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .data import DOC_MARKER, HELDOUT_PATH, Document, read_heldout

LN2 = math.log(2.0)
logger = logging.getLogger("stream_attention.eval")


def load_documents(path: Path | str | None = None, max_docs: int = 0, max_bytes: int = 0) -> list[Document]:
    """Held-out documents (``<|file|>``-separated file, or any text file as one document).

    ``max_bytes`` keeps whole documents in order while they fit (at least one, cut to
    ``max_bytes`` if the first alone is larger): the CI slice is the same on every machine.
    """
    path = Path(path or HELDOUT_PATH)
    raw = path.read_text(encoding="utf-8")
    docs = read_heldout(path) if raw.startswith(DOC_MARKER) else [Document(path.name, raw)]
    if max_docs:
        docs = docs[:max_docs]
    if max_bytes:
        kept, used = [], 0
        for d in docs:
            n = len(d.text.encode())
            if used + n > max_bytes:
                if not kept:
                    kept.append(Document(d.name, d.text.encode()[:max_bytes].decode("utf-8", "ignore")))
                break
            kept.append(d)
            used += n
        docs = kept
    return docs


# --------------------------------------------------------------------------------------
# Classical anchors
# --------------------------------------------------------------------------------------


def _zstd19(data: bytes) -> tuple[int, str] | None:
    try:
        import zstandard

        return len(zstandard.ZstdCompressor(level=19).compress(data)), f"zstandard {zstandard.__version__} level 19"
    except ImportError:
        pass
    try:  # Python 3.14+
        from compression import zstd

        return len(zstd.compress(data, level=19)), "compression.zstd level 19"
    except ImportError:
        pass
    exe = shutil.which("zstd")
    if exe:
        out = subprocess.run([exe, "-19", "-c", "-q"], input=data, capture_output=True, check=True).stdout
        version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
        return len(out), f"{exe} -19 ({version})"
    return None


RECORDED_ANCHORS_PATH = HELDOUT_PATH.with_name("heldout_anchors.json")


def _recorded_anchor(data: bytes, name: str) -> dict[str, Any] | None:
    """A compressor result recorded for exactly these bytes on the development machine.

    The GPU machine has no zstd; the held-out text is committed, so the number measured
    where zstd exists is the number for these bytes everywhere.
    """
    if not RECORDED_ANCHORS_PATH.is_file():
        return None
    table = json.loads(RECORDED_ANCHORS_PATH.read_text())
    entry = table.get(hashlib.sha256(data).hexdigest(), {}).get(name)
    return {**entry, "tool": f"recorded: {entry['tool']}"} if entry else None


def compressor_anchors(data: bytes) -> dict[str, dict[str, Any]]:
    """Bits per byte of ``xz -9`` (lzma preset 9), ``zstd -19``, ``bzip2 -9``, ``gzip -9`` on ``data``.

    A compressor missing here is taken from ``heldout_anchors.json`` when it recorded these exact bytes.
    """
    results: dict[str, dict[str, Any]] = {}
    runs: list[tuple[str, Callable[[], tuple[int, str] | None]]] = [
        ("xz -9", lambda: (len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9)), "python lzma preset 9")),
        ("zstd -19", lambda: _zstd19(data)),
        ("bzip2 -9", lambda: (len(bz2.compress(data, 9)), "python bz2 level 9")),
        ("gzip -9", lambda: (len(gzip.compress(data, 9, mtime=0)), "python gzip level 9")),
    ]
    for name, fn in runs:
        try:
            res = fn()
        except Exception as exc:  # an anchor that cannot run is reported, not fatal
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        if res is None and (rec := _recorded_anchor(data, name)):
            results[name] = rec
            continue
        if res is None:
            results[name] = {"error": "not available (no zstandard module, compression.zstd or zstd binary)"}
            continue
        size, tool = res
        results[name] = {"bytes": size, "bits_per_byte": 8.0 * size / max(1, len(data)), "tool": tool}
    return results


# --------------------------------------------------------------------------------------
# Model scoring
# --------------------------------------------------------------------------------------


def plan_windows(n_tokens: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, first_scored)`` windows over positions ``0..n_tokens-1`` of one document.

    Position 0 is ``<|bos|>`` and is never a target; every other position is a target
    exactly once, scored in the window where it has the most context.
    """
    # Window k ends `stride` targets after window k-1; its first input must be the token
    # before its first target, hence stride <= ctx - 1.
    stride = max(1, min(stride, ctx - 1))
    windows = []
    first, end = 1, min(ctx, n_tokens)
    while first < n_tokens:
        windows.append((max(0, end - ctx), end, first))
        first, end = end, min(end + stride, n_tokens)
    return windows


def _load_factory(spec: str | None) -> Callable | None:
    if not spec:
        return None
    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), attr)


@torch.no_grad()
def _window_logprobs(model, ids: torch.Tensor, prefill_chunk: int, cache_factory: Callable | None) -> torch.Tensor:
    """Log-probabilities ``[B, T-1]`` of ``ids[:, 1:]`` given the prefix."""
    if prefill_chunk and prefill_chunk < ids.shape[1]:
        if cache_factory is not None:
            cache = cache_factory(model)
        else:
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
        pieces = []
        inputs = ids[:, :-1]
        for s in range(0, inputs.shape[1], prefill_chunk):
            chunk = inputs[:, s : s + prefill_chunk]
            pos = torch.arange(s, s + chunk.shape[1], device=ids.device).unsqueeze(0).expand(ids.shape[0], -1)
            out = model(input_ids=chunk, past_key_values=cache, use_cache=True, position_ids=pos)
            cache = out.past_key_values
            pieces.append(out.logits.float().log_softmax(-1))
        logp = torch.cat(pieces, dim=1)
    else:
        logp = model(input_ids=ids[:, :-1], use_cache=False).logits.float().log_softmax(-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def score_documents(
    model,
    tokenizer,
    docs: Sequence[Document],
    *,
    ctx: int = 2048,
    stride: int | None = None,
    batch_size: int = 8,
    autocast: torch.dtype | None = None,
    prefill_chunk: int = 0,
    cache_factory: Callable | None = None,
) -> dict[str, Any]:
    """Sum of next-token NLLs over ``docs``; returns tokens, bytes, perplexity and bits per byte."""
    device = next(model.parameters()).device
    stride = max(1, min(stride or ctx, ctx - 1))
    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    items: list[tuple[list[int], int]] = []
    n_bytes = n_tokens = 0
    encodings = tokenizer([d.text for d in docs], add_special_tokens=False, verbose=False)["input_ids"]
    for doc, enc in zip(docs, encodings, strict=True):
        ids = [bos, *enc]
        n_bytes += len(doc.text.encode())
        n_tokens += len(enc)
        for start, end, first in plan_windows(len(ids), ctx, stride):
            items.append((ids[start:end], first - start))
    # Longest first keeps padding small; right padding never reaches earlier positions
    # under causal attention, so no attention mask is needed (and the kernel path stays unmasked).
    items.sort(key=lambda it: -len(it[0]))
    nll = 0.0
    scored = 0
    model.eval()
    t0 = time.time()
    for b in range(0, len(items), batch_size):
        group = items[b : b + batch_size]
        width = len(group[0][0])
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        for i, (w, _) in enumerate(group):
            ids[i, : len(w)] = torch.tensor(w)
        ids = ids.to(device)
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            logp = _window_logprobs(model, ids, prefill_chunk, cache_factory)
        if (b // batch_size) % 10 == 0:
            logger.info("scored %d/%d windows (width %d) in %.1f s", b + len(group), len(items), width,
                        time.time() - t0)
        for i, (w, first) in enumerate(group):
            # target position p (in the window) is logp[:, p - 1]
            part = logp[i, first - 1 : len(w) - 1]
            nll -= float(part.double().sum())
            scored += part.numel()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.time() - t0
    assert scored == n_tokens, (scored, n_tokens)
    per_token = nll / max(1, n_tokens)
    return {
        "docs": len(docs),
        "bytes": n_bytes,
        "tokens": n_tokens,
        "bytes_per_token": n_bytes / max(1, n_tokens),
        "nll_nats_per_token": per_token,
        "perplexity": math.exp(per_token),
        "bits_per_token": per_token / LN2,
        "bits_per_byte": nll / LN2 / max(1, n_bytes),
        "ctx": ctx,
        "stride": stride,
        "prefill_chunk": prefill_chunk,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(n_tokens / max(1e-9, seconds)),
    }


# Prompts stop before the line break: the tokenizer merges "\n" with the indentation that
# follows, so a prompt ending in a bare "\n" tells the model the next line is not indented.
SAMPLE_PROMPTS = (
    "import os\n",
    "def fibonacci(n):",
    "class Stack:\n    \"\"\"A last-in, first-out container.\"\"\"\n\n    def __init__(self):",
)


@torch.no_grad()
def generate_samples(
    model, tokenizer, prompts: Sequence[str] = SAMPLE_PROMPTS, max_new_tokens: int = 160, seed: int = 0
) -> list[dict[str, str]]:
    """Greedy and sampled (T=0.8, top-p 0.95) continuations of ``prompts``, for the README."""
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]],
                           device=device)
        row: dict[str, str] = {"prompt": prompt}
        for mode, kwargs in (("greedy", {"do_sample": False}),
                             ("sampled", {"do_sample": True, "temperature": 0.8, "top_p": 0.95})):
            torch.manual_seed(seed)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kwargs)
            row[mode] = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        out.append(row)
    return out


def load_model(
    model: str, device: torch.device, dtype: torch.dtype, attn: str | None
) -> tuple[Any, Any, dict[str, Any]]:
    """``"default"`` (the embedded model) or a Hugging Face directory / hub id available offline."""
    info: dict[str, Any] = {"model": model, "attn_implementation": attn or "transformers default"}
    if attn == "stream_attention":
        from ..integration.hf import register

        register()
        info["registered_by"] = "stream_attention.integration.hf"
    if model == "default":
        from .default import default_model_dir, load_default_model

        m, tok = load_default_model(device=device, dtype=dtype, attn_implementation=attn)
        info["model_dir"] = str(default_model_dir())
        info["untrained"] = bool(getattr(m.config, "stream_attention_untrained", False))
        return m, tok, info
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"attn_implementation": attn} if attn else {}
    m = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, **extra).to(device).eval()
    tok = AutoTokenizer.from_pretrained(model)
    if tok.bos_token_id is None:  # a model without BOS conditions its first token on nothing
        tok.bos_token = tok.eos_token
    return m, tok, info


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation described by parsed command-line ``args``."""
    if args.backend:
        os.environ["STREAM_ATTENTION_BACKEND"] = args.backend
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.autocast == "auto":
        amp = torch.bfloat16 if device.type == "cuda" and dtype == torch.float32 else None
    else:
        amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]
    docs = load_documents(args.text, args.max_docs, args.max_bytes)
    text_bytes = "".join(d.text for d in docs).encode()
    result: dict[str, Any] = {
        "text": {"path": str(args.text or HELDOUT_PATH), "docs": len(docs), "bytes": len(text_bytes),
                 "sha256": hashlib.sha256(text_bytes).hexdigest()},
    }
    if args.model != "none":
        model, tok, info = load_model(args.model, device, dtype, args.attn)
        hook = _load_factory(args.model_hook)
        if hook is not None:
            model = hook(model) or model
            info["model_hook"] = args.model_hook
        from ..core.backend import env_backend

        info.update({"backend": env_backend(), "device": str(device), "dtype": args.dtype, "autocast": str(amp),
                     "cache": args.cache or ("DynamicCache" if args.prefill_chunk else "none")})
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
        result["model"] = info
        ctx = args.ctx or int(getattr(model.config, "max_position_embeddings", 2048))
        result["score"] = score_documents(
            model, tok, docs, ctx=ctx, stride=args.stride or None, batch_size=args.batch_size, autocast=amp,
            prefill_chunk=args.prefill_chunk, cache_factory=_load_factory(args.cache),
        )
        if args.samples:
            logger.info("generating samples")
            result["samples"] = generate_samples(model, tok, max_new_tokens=args.samples)
        try:
            from ..integration.hf import attention_stats

            result["model"]["attention_calls"] = attention_stats()
        except ImportError:
            pass
    if args.anchors != "none":
        result["anchors"] = compressor_anchors(text_bytes)
        xz = result["anchors"].get("xz -9", {}).get("bits_per_byte")
        if "score" in result and xz is not None:
            result["beats_xz_9"] = result["score"]["bits_per_byte"] < xz
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Held-out perplexity / bits per byte vs xz and zstd.")
    ap.add_argument("--model", default="default", help="'default', a Hugging Face model dir, or 'none' (anchors only)")
    ap.add_argument("--text", type=Path, default=None, help="held-out file (default: the packaged held-out split)")
    ap.add_argument("--max-docs", type=int, default=0)
    ap.add_argument("--max-bytes", type=int, default=0, help="score only the first documents fitting in this many bytes")
    ap.add_argument("--attn", default=None, help="attn_implementation: sdpa, eager, stream_attention, ...")
    ap.add_argument("--backend", default=None, choices=["auto", "triton", "sdpa"], help="STREAM_ATTENTION_BACKEND")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype")
    ap.add_argument("--autocast", default="auto", choices=["auto", "none", "bf16", "fp16"],
                    help="auto: bf16 autocast on CUDA with fp32 weights, none on CPU")
    ap.add_argument("--ctx", type=int, default=0, help="window length (default: the model's max positions)")
    ap.add_argument("--stride", type=int, default=0, help="targets per window after the first (default: ctx - 1, no overlap)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--prefill-chunk", type=int, default=0, help="feed windows through the KV cache in chunks")
    ap.add_argument("--cache", default=None, help="module:factory(model) -> transformers Cache, for --prefill-chunk")
    ap.add_argument("--model-hook", default=None, help="module:function(model) -> model, applied after loading")
    ap.add_argument("--samples", type=int, default=0, help="also generate greedy/sampled continuations of N tokens")
    ap.add_argument("--anchors", default="all", choices=["all", "none"])
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    kv = ap.add_argument_group("KV-cache compression (needle retrieval + continuation perplexity)")
    kv.add_argument("--kv-compression", default=None, choices=["streaming", "heavy-hitter", "snapkv", "hybrid", "none"],
                    help="evaluate this eviction policy against the full cache instead of held-out perplexity")
    kv.add_argument("--ratio", type=float, default=4.0, help="compression ratio of the context's cache")
    kv.add_argument("--needles", type=int, default=12, help="needle cases (numbers, identifiers, strings in turn)")
    kv.add_argument("--needle-context", type=int, default=0, help="context tokens (default: max positions - 64)")
    kv.add_argument("--needle-depth", type=float, default=0.1, help="where the needle goes, as a share of the context")
    kv.add_argument("--kv-window-tokens", type=int, default=32, help="recent tokens eviction never drops")
    kv.add_argument("--ppl-windows", type=int, default=4, help="held-out windows for the continuation perplexity")
    kv.add_argument("--ppl-context", type=int, default=1024, help="compressed context before the scored tokens")
    kv.add_argument("--ppl-tokens", type=int, default=256, help="scored continuation tokens per window")
    kv.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.ratio < 1.0:
        ap.error(f"--ratio must be >= 1, got {args.ratio}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Held-out perplexity only; ``stream-attention-eval`` (``cli/eval.py``) adds ``--kv-compression``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if args.kv_compression:
        raise SystemExit("--kv-compression needs the engine's policies: run stream-attention-eval")
    write_result(evaluate(args), args.out)


def write_result(result: dict[str, Any], out: Path | None) -> None:
    """Print ``result`` as JSON, and write it to ``out`` when given."""
    text = json.dumps(result, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
