"""``stream-attention-eval``: held-out perplexity of any model (``models/eval.py``), and with
``--kv-compression POLICY --ratio R`` needle-retrieval accuracy and continuation perplexity of
the engine's KV-compression policies against the full cache (``engine/needle.py``)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch

from ..engine import needle
from ..models import eval as model_eval


def evaluate_kv_compression(args: argparse.Namespace) -> dict[str, Any]:
    """Needle accuracy and continuation perplexity, full cache vs ``--kv-compression`` at ``--ratio``."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    # Eager attention: the harness reads the observation window's attention weights.
    model, tok, info = model_eval.load_model(args.model, device, dtype, "eager")
    tok.model_max_length = 1 << 30  # whole documents are tokenized, then cut
    docs = [d.text for d in model_eval.load_documents(args.text)]
    ctx = args.needle_context or int(getattr(model.config, "max_position_embeddings", 2048)) - 64
    settings = needle.NeedleSettings(window_tokens=args.kv_window_tokens)
    configs = [("none", 1.0), (args.kv_compression, args.ratio)]
    cases = needle.make_needle_cases(tok, docs, args.needles, ctx, depth=args.needle_depth, seed=args.seed)
    result: dict[str, Any] = {"model": info, "device": str(device), "context_tokens": ctx,
                              "needle_depth": args.needle_depth, "settings": vars(settings)}
    result["needle"] = needle.run_needles(model, tok, cases, configs, settings)
    windows, span = [], args.ppl_context + args.ppl_tokens
    for d in docs:
        ids = tok.encode(d, add_special_tokens=False)
        if len(ids) >= span:
            windows.append(([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids[:span - 1])
        if len(windows) == args.ppl_windows:
            break
    result["perplexity"] = {f"{p}@{r:g}": needle.continuation_nll(model, windows, args.ppl_context, p, r, settings)
                            for p, r in configs}
    return result


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``stream-attention-eval``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = model_eval.parse_args(argv)
    result = evaluate_kv_compression(args) if args.kv_compression else model_eval.evaluate(args)
    model_eval.write_result(result, args.out)


if __name__ == "__main__":
    main()
