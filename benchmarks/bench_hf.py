"""A 1B-shaped Llama in bf16 on ``attn_implementation="stream_attention"`` against ``"sdpa"``.

    python benchmarks/bench_hf.py --out hf.json [--budget-s 85]
    TRITON_INTERPRET=1 python benchmarks/bench_hf.py --out /tmp/hf.json --tiny \
        --prompt-len 12 --new-tokens 4 --prefill-batch 1 --prefill-len 32 --reps 1   # CPU smoke run

Random weights (no download): hidden 2048, 16 layers, 32 query / 8 KV heads (head_dim
64), intermediate 8192, vocab 128256. One model, switched between implementations with
``set_attn_implementation``, so both see identical weights. Three checks, written to
``--out`` as they finish (a check that would start past ``--budget-s`` is listed under
``skipped``):

* ``logits``: a left-padded batch (4 x 128, pads 0/16/40/77) through both; max and mean
  |logits diff| over real tokens and argmax agreement, next to the same numbers for
  ``eager`` vs ``sdpa`` (the bf16 noise floor any two correct implementations show);
* ``prefill``: batch 4 x 2048 tokens, ``use_cache=False``, ``logits_to_keep=1``; median of
  CUDA-event timings for each implementation and the ratio;
* ``greedy``: 32 greedy tokens from the ``logits`` batch; token agreement with ``sdpa`` and the
  first diverging step per row (random weights give flat logits, so near-ties can flip
  under bf16 noise; the ``eager`` vs ``sdpa`` agreement is the floor again).

The Triton backend is forced (``enable_stream_attention(model, backend="triton")``), and
the call routes are recorded from ``attention_stats()`` so a silent SDPA fallback shows.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

import stream_attention.integration.hf as sa_hf  # noqa: E402

# Left padding per row as a fraction of the prompt: 0/16/40/77 tokens of 128.
PAD_FRACTIONS = (0.0, 0.125, 0.3125, 0.6)


def llama_1b_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
    )


def tiny_config() -> LlamaConfig:
    """For a CPU smoke run of this script (``--tiny``): same code paths, seconds not minutes."""
    return LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
    )


def use(model: torch.nn.Module, impl: str) -> None:
    if impl == "stream_attention":
        sa_hf.enable_stream_attention(model, backend="triton")
    else:
        model.set_attn_implementation(impl)


def padded_batch(seq_len: int, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    pads = [round(f * seq_len) for f in PAD_FRACTIONS]
    ids = torch.randint(3, vocab, (len(pads), seq_len), device=device)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


@torch.no_grad()
def check_logits(model, ids, mask) -> dict:
    logits = {}
    for impl in ("sdpa", "stream_attention", "eager"):
        use(model, impl)
        logits[impl] = model(ids, attention_mask=mask).logits.float()
    valid = mask.bool()
    ref = logits["sdpa"][valid]

    def compare(name: str) -> dict:
        got = logits[name][valid]
        diff = (got - ref).abs()
        return {
            "max_abs_diff": diff.max().item(),
            "mean_abs_diff": diff.mean().item(),
            "argmax_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        }

    ours, floor = compare("stream_attention"), compare("eager")
    return {
        "shape": list(ids.shape),
        "pads": (mask == 0).sum(-1).tolist(),
        "ref_logits_abs_max": ref.abs().max().item(),
        "stream_attention_vs_sdpa": ours,
        "eager_vs_sdpa": floor,
        # Within a few times the noise two correct bf16 implementations show.
        "ok": ours["max_abs_diff"] <= max(4 * floor["max_abs_diff"], 1e-2) and ours["argmax_agreement"] >= 0.95,
    }


@torch.no_grad()
def check_greedy(model, ids, mask, new_tokens: int) -> dict:
    outs = {}
    for impl in ("sdpa", "stream_attention", "eager"):
        use(model, impl)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        outs[impl] = out[:, ids.shape[1] :]

    def compare(name: str) -> dict:
        same = outs[name] == outs["sdpa"]
        first = [int((~row).nonzero()[0]) if (~row).any() else new_tokens for row in same]
        return {"token_agreement": same.float().mean().item(), "first_divergence": first}

    return {
        "new_tokens": new_tokens,
        "stream_attention_vs_sdpa": compare("stream_attention"),
        "eager_vs_sdpa": compare("eager"),
    }


def time_prefill(model, ids, warmup: int, reps: int) -> dict:
    times = {}
    with torch.no_grad():
        for impl in ("sdpa", "stream_attention"):
            use(model, impl)
            for _ in range(warmup):
                model(ids, use_cache=False, logits_to_keep=1)
            samples = []
            for _ in range(reps):
                if ids.is_cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    model(ids, use_cache=False, logits_to_keep=1)
                    end.record()
                    torch.cuda.synchronize()
                    samples.append(start.elapsed_time(end))
                else:
                    started = time.perf_counter()
                    model(ids, use_cache=False, logits_to_keep=1)
                    samples.append((time.perf_counter() - started) * 1e3)
            times[impl] = {"median_ms": statistics.median(samples), "samples_ms": samples}
    ours, ref = times["stream_attention"]["median_ms"], times["sdpa"]["median_ms"]
    return {
        "shape": list(ids.shape),
        "ms": times,
        "ratio_stream_attention_over_sdpa": ours / ref,
        "speedup_vs_sdpa": ref / ours,
        "tokens_per_s_stream_attention": ids.numel() / (ours / 1e3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--budget-s", type=float, default=85.0, help="skip remaining checks past this")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prefill-batch", type=int, default=4)
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="smoke run: a 2-layer fp32 Llama, on CPU through Triton's interpreter when there is no GPU",
    )
    args = parser.parse_args(argv)
    from stream_attention.core.benchmarking import spin_up_gpu

    spin_up_gpu()
    if not args.tiny and not torch.cuda.is_available():
        print("bench_hf needs a CUDA GPU (or --tiny)", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    out_path = Path(args.out)
    import transformers
    import triton

    result: dict = {
        "meta": {
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (cpu)",
            "torch": torch.__version__,
            "triton": triton.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "dtype": "bfloat16",
            "model": "llama-1b-shaped random init (2048 hidden, 16 layers, 32/8 heads, 8192 mlp, 128256 vocab)",
        },
        "skipped": [],
    }

    def save() -> None:
        result["meta"]["elapsed_s"] = round(time.perf_counter() - t0, 2)
        result["attention_stats"] = sa_hf.attention_stats()
        out_path.write_text(json.dumps(result, indent=1))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config, dtype = (tiny_config(), torch.float32) if args.tiny else (llama_1b_config(), torch.bfloat16)
    if args.tiny:
        result["meta"].update(model="tiny llama smoke run", dtype="float32")
    torch.manual_seed(0)
    with device:  # initialise the weights where they will live
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    result["meta"]["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    result["meta"]["build_s"] = round(time.perf_counter() - t0, 2)
    save()

    ids, mask = padded_batch(args.prompt_len, model.config.vocab_size, device)
    checks = [
        ("logits", lambda: check_logits(model, ids, mask)),
        (
            "prefill",
            lambda: time_prefill(
                model,
                torch.randint(3, model.config.vocab_size, (args.prefill_batch, args.prefill_len), device=device),
                warmup=2,
                reps=args.reps,
            ),
        ),
        # last: decode autotunes one more kernel variant, the check most likely to meet the budget
        ("greedy", lambda: check_greedy(model, ids, mask, args.new_tokens)),
    ]
    for name, run in checks:
        if time.perf_counter() - t0 > args.budget_s:
            result["skipped"].append(name)
            continue
        sa_hf.reset_attention_stats()
        started = time.perf_counter()
        result[name] = run()
        result[name]["seconds"] = round(time.perf_counter() - started, 2)
        result[name]["routes"] = sa_hf.attention_stats()
        save()
        print(name, json.dumps(result[name])[:400], flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
