"""Compare a Hugging Face causal LM on StreamAttention with the same model on PyTorch SDPA.

    # a local checkpoint or a hub id (needs the weights and a tokenizer)
    python examples/hf_compare.py meta-llama/Llama-3.2-1B --dtype bf16 --prompt "The capital of France is"
    # no download: a tiny random model of one family (llama, mistral, qwen2, gpt2)
    python examples/hf_compare.py --tiny llama

It loads the model once with ``attn_implementation="sdpa"``, runs a left-padded batch,
switches the same weights to ``"stream_attention"`` (``enable_stream_attention``), runs it
again and prints the max |logits diff| over real tokens, greedy-generation agreement, and
prefill latency of both implementations. On CPU, set ``STREAM_ATTENTION_BACKEND=triton``
(and ``TRITON_INTERPRET=1``) to push the Triton kernel itself through the model;
otherwise the CPU path of ``fused_attention`` is SDPA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

from stream_attention.integration.hf import attention_stats, enable_stream_attention, reset_attention_stats

_TINY_COMMON = dict(vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
TINY = {
    "llama": lambda: LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        **_TINY_COMMON,
    ),
    "mistral": lambda: MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=8, **_TINY_COMMON,
    ),
    "qwen2": lambda: Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        **_TINY_COMMON,
    ),
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **_TINY_COMMON),
}  # fmt: skip
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """``(model on sdpa, input_ids, attention_mask)`` for a checkpoint or a tiny random config."""
    if args.tiny:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(TINY[args.tiny](), dtype=dtype, attn_implementation="sdpa")
        ids = torch.randint(3, model.config.vocab_size, (3, 16))
        mask = torch.ones_like(ids)
        for row, pad in enumerate((0, 5, 9)):
            ids[row, :pad], mask[row, :pad] = 0, 0
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        prompts = args.prompt or [
            "The capital of France is",
            "Attention is all",
            "Once upon a time, in a land far away,",
        ]
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        ids, mask = batch["input_ids"], batch["attention_mask"]
    return model.to(device).eval(), ids.to(device), mask.to(device)


def time_prefill(model, ids: torch.Tensor, reps: int) -> float:
    """Median milliseconds of one forward over ``ids`` (no cache, last logits only)."""
    samples = []
    with torch.no_grad():
        for i in range(reps + 1):
            if ids.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(ids, use_cache=False, logits_to_keep=1)
            if ids.is_cuda:
                torch.cuda.synchronize()
            if i:  # the first run compiles / autotunes
                samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="local path or hub id of a causal LM")
    parser.add_argument("--tiny", choices=sorted(TINY), help="use a tiny random model of this family instead")
    parser.add_argument("--prompt", action="append", help="prompt (repeatable); a padded batch is built from them")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--prefill-batch", type=int, default=1)
    parser.add_argument("--prefill-len", type=int, default=None, help="default: 2048 on CUDA, 64 on CPU")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if bool(args.model) == bool(args.tiny):
        parser.error("give a model path / hub id, or --tiny FAMILY")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    model, ids, mask = load(args, device, dtype)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=model.config.pad_token_id or 0)
    prefill_len = args.prefill_len or (2048 if device.type == "cuda" else 64)
    prefill_len = min(prefill_len, getattr(model.config, "max_position_embeddings", prefill_len))
    prefill_ids = torch.randint(3, model.config.vocab_size, (args.prefill_batch, prefill_len), device=device)

    with torch.no_grad():
        ref_logits = model(ids, attention_mask=mask).logits.float()
    ref_tokens = model.generate(ids, attention_mask=mask, **gen)[:, ids.shape[1] :]
    ref_ms = time_prefill(model, prefill_ids, args.reps)

    served = enable_stream_attention(model)
    reset_attention_stats()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits.float()
    tokens = model.generate(ids, attention_mask=mask, **gen)[:, ids.shape[1] :]
    ours_ms = time_prefill(model, prefill_ids, args.reps)

    valid = mask.bool()
    diff = (logits - ref_logits)[valid].abs()
    result = {
        "model": args.model or f"tiny-{args.tiny}",
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "attention_modules_served": served,
        "max_abs_logits_diff": diff.max().item(),
        "mean_abs_logits_diff": diff.mean().item(),
        "ref_logits_abs_max": ref_logits[valid].abs().max().item(),
        "argmax_agreement": (logits.argmax(-1) == ref_logits.argmax(-1))[valid].float().mean().item(),
        "greedy_token_agreement": (tokens == ref_tokens).float().mean().item(),
        "greedy_identical": bool(torch.equal(tokens, ref_tokens)),
        "prefill_shape": list(prefill_ids.shape),
        "prefill_ms_sdpa": ref_ms,
        "prefill_ms_stream_attention": ours_ms,
        "prefill_speedup": ref_ms / ours_ms,
        "routes": attention_stats(),
    }
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
