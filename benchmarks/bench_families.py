"""Offline throughput of the engine against transformers, per model family.

    python benchmarks/bench_families.py --out families.json [--models gemma2,qwen3] [--quick]

Two random-weight models in the shapes people serve, bf16 on the GPU:

- ``gemma2``: Gemma-2-2B-shaped (hidden 2304, 26 layers, 8 query / 4 KV heads of 256,
  intermediate 9216, GeLU-tanh, vocab 256000, alternating 4096-token windows, attention
  soft-cap 50 and final-logit soft-cap 30, ``query_pre_attn_scalar`` 256).
- ``qwen3``: Qwen3-1.7B-shaped (hidden 2048, 28 layers, 16 query / 8 KV heads of 128,
  per-head q/k RMSNorms, intermediate 6144, vocab 151936, tied embeddings).

For each, in the same process on the same weights and prompts: transformers' greedy
``generate`` with a static cache (``benchmarks/hf_baseline.py``), then the engine
(``LLMEngine``, CUDA graphs, its fused forward where the family has one). Workload: 32
prompts of 512 random tokens, 128 generated tokens each, EOS ignored. Reported per
model: tokens/s of both, the ratio, whether the engine ran its fused forward, and how
many of the generated tokens agree with transformers' (the common prefix per prompt: in
bf16 two correct implementations part at the first near-tie of a random model, so this
is a sanity figure, not a correctness test; the fp32 CPU tests compare exactly).

``--quick``: tiny shapes (2 layers, hidden 64), 4 prompts of 24 tokens, 8 new tokens, in
fp32 on whatever device there is (a CPU smoke run: there the tokens must agree exactly).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_baseline import time_hf_static_generate, wordlevel_tokenizer  # noqa: E402

MODELS = {
    "gemma2": ("Gemma2Config", dict(
        hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, vocab_size=256000, sliding_window=4096, query_pre_attn_scalar=256,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6, tie_word_embeddings=True,
    ), "eager"),  # transformers' SDPA path has no soft-cap: Gemma 2 runs eager there
    "qwen3": ("Qwen3Config", dict(
        hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6, tie_word_embeddings=True,
        use_sliding_window=False,
    ), "sdpa"),
}
QUICK_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=256)
WORKLOAD = dict(prompts=32, prompt_len=512, gen=128)
QUICK_WORKLOAD = dict(prompts=4, prompt_len=24, gen=8)
ENGINE_KV_BYTES = 8 << 30
QUICK_KV_BYTES = 64 << 20


def build_model(name: str, quick: bool, device: torch.device, max_len: int):
    """The random-weight model ``name`` (seeded), on ``device``, bf16 on CUDA (fp32 in ``--quick``)."""
    import transformers

    cls, shape, attn = MODELS[name]
    overrides = dict(QUICK_SHAPE, sliding_window=8) if quick and name == "gemma2" else (
        QUICK_SHAPE if quick else {})
    if quick and name == "gemma2":
        overrides.update(query_pre_attn_scalar=16)
    cfg = getattr(transformers, cls)(**{**shape, **overrides, "max_position_embeddings": max(max_len, 256),
                                        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0})
    dtype = torch.float32 if quick or device.type != "cuda" else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=attn,
                                                              dtype=dtype).eval()
    return model, cfg


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def bench_model(name: str, quick: bool, device: torch.device) -> dict:
    """transformers' static-cache ``generate``, then the engine, on one model and workload."""
    from stream_attention.engine import LLMEngine, SamplingParams

    work = QUICK_WORKLOAD if quick else WORKLOAD
    n, prompt_len, gen = work["prompts"], work["prompt_len"], work["gen"]
    model, cfg = build_model(name, quick, device, prompt_len + gen)
    prompts = torch.randint(3, cfg.vocab_size, (n, prompt_len), generator=torch.Generator().manual_seed(1))
    result: dict = {"model": name, "params_B": sum(p.numel() for p in model.parameters()) / 1e9,
                    "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                    "prompts": n, "prompt_len": prompt_len, "gen_tokens": gen}

    hf, hf_tokens = time_hf_static_generate(model, prompts, gen)
    result.update(hf)
    print(json.dumps({"model": name, **hf}), flush=True)

    t0 = time.perf_counter()
    kv_bytes = QUICK_KV_BYTES if quick else ENGINE_KV_BYTES
    engine = LLMEngine(model, wordlevel_tokenizer(cfg.vocab_size), kv_cache_memory_bytes=kv_bytes,
                       max_num_seqs=n, max_num_batched_tokens=16384, max_model_len=prompt_len + gen,
                       enable_prefix_caching=False)
    result["engine_init_s"] = time.perf_counter() - t0
    result["engine_fused_layers"] = engine.runner.fused is not None
    result["engine_attention_backend"] = engine.runner.backend
    plist = prompts.tolist()
    params = SamplingParams(max_tokens=gen, ignore_eos=True)
    t0 = time.perf_counter()
    engine.generate(plist[: max(2, n // 4)], SamplingParams(max_tokens=4, ignore_eos=True))
    result["engine_warmup_s"] = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    outs = engine.generate(plist, params)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if any(len(o.token_ids) != gen for o in outs):
        raise RuntimeError("the engine stopped a sequence early with ignore_eos")
    result["engine_s"] = seconds
    result["engine_tok_s"] = n * gen / seconds
    result["engine_over_hf"] = result["engine_tok_s"] / result["hf_static_tok_s"]
    prefixes = [common_prefix(o.token_ids, ref) for o, ref in zip(outs, hf_tokens.tolist(), strict=True)]
    result["tokens_agree_mean_prefix"] = sum(prefixes) / len(prefixes)
    result["tokens_identical"] = all(p == gen for p in prefixes)
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("engine", "tokens"))}), flush=True)
    del engine, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="tiny fp32 shapes (a CPU smoke run)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    args = ap.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        ap.error(f"--models: unknown {', '.join(unknown)} (choose from {', '.join(MODELS)})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.quick:
        print("bench_families needs a CUDA GPU without --quick", file=sys.stderr)
        return 2
    from stream_attention.core.benchmarking import spin_up_gpu

    spin_up_gpu()
    import transformers

    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "python": platform.python_version(), "quick": args.quick, "models": {}}
    t0 = time.perf_counter()
    for name in names:
        try:
            report["models"][name] = bench_model(name, args.quick, device)
        except Exception as exc:  # one model's failure must not lose the other's numbers
            import traceback

            traceback.print_exc()
            report["models"][name] = {"error": repr(exc)[:1000], "trace": traceback.format_exc()[-3000:]}
    report["total_s"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out} in {report['total_s']:.0f} s")
    return 0 if all("error" not in r for r in report["models"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
