"""Locate a device fault in the engine on a GPU: one engine configuration per process.

    python3 scripts/engine_probe.py CASE      (CASE: see CASES below)

Prints a traceback as soon as a step raises (a Triton kernel's fault surfaces at the next
checked CUDA call), then exits non-zero. Under ``compute-sanitizer`` the tiny cases name
the faulting kernel.
"""

from __future__ import annotations

import faulthandler
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

CASES = {
    # name: (model size, prompts, prompt len, gen, step token budget, cuda graphs[, KV GiB, vocab])
    "1b-exact": ("1b", 64, 512, 64, 16384, True, 8, 128256),
    "1b-exact-2g": ("1b", 64, 512, 64, 16384, True, 2, 128256),
    "tiny64": ("tiny", 64, 512, 16, 16384, True, 8, 32000),
    "tiny-mixed": ("tiny", 8, 512, 16, 1024, True),
    "tiny-mixed-eager": ("tiny", 8, 512, 16, 1024, False),
    "1b-eager": ("1b", 64, 512, 32, 16384, False),
    "1b-bigstep": ("1b", 64, 512, 32, 32768, True),
    "1b-default": ("1b", 64, 512, 32, 16384, True),
}


def main() -> int:
    faulthandler.enable()
    from bench_engine import _wordlevel_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from stream_attention.engine import LLMEngine, SamplingParams

    size, n, plen, gen, budget, graphs, kv_gib, vocab = (*CASES[sys.argv[1]], 2, 32000)[:8]
    hidden, layers, heads = (2048, 16, 32) if size == "1b" else (512, 2, 8)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads // 4, head_dim=64, vocab_size=vocab,
                      max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1,
                      pad_token_id=0)
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke test of this script
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if dev == "cuda" else torch.float32).eval()
    engine = LLMEngine(model, _wordlevel_tokenizer(cfg.vocab_size), kv_cache_memory_bytes=kv_gib << 30,
                       max_num_seqs=64, max_num_batched_tokens=budget, max_model_len=1024,
                       enable_prefix_caching=False, use_cuda_graphs=graphs)
    prompts = torch.randint(2, cfg.vocab_size, (n, plen), generator=torch.Generator().manual_seed(1)).tolist()
    for p in prompts:
        engine.add_request(p, SamplingParams(max_tokens=gen, ignore_eos=True))
    step = 0
    t0 = time.perf_counter()
    try:
        while engine.has_unfinished_requests():
            engine.step()
            if dev == "cuda":
                torch.cuda.synchronize()
            step += 1
    except Exception:
        running = [(s.num_computed_tokens, s.num_tokens) for s in engine.scheduler.running]
        print(f"FAULT at step {step}; running (computed, total): {running[:70]}", flush=True)
        traceback.print_exc()
        sys.stdout.flush()
        import os

        os._exit(3)
    print(f"OK {sys.argv[1]}: {step} steps in {time.perf_counter() - t0:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
