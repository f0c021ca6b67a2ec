"""Quality of KV-cache compression on a real model: attention error, next-token KL, greedy agreement.

    python benchmarks/kv_quality.py --out kv_quality.json --md kv_quality.md [--prompts 8] [--device cuda]

For each prompt (a held-out text window of ``--prompt-tokens`` tokens) the model prefills
the prompt, then each policy compresses every layer's cached K/V to 2x, 4x and 8x, and the
next ``--continuation`` tokens of the real text are fed (teacher forcing) once with the
full cache and once with the compressed one. Reported per policy and ratio, averaged over
prompts:

* ``attn_rel_err``: relative L2 error of each layer's attention output over the prompt's
  cache, for the continuation's real (RoPE-rotated) queries, averaged over layers;
* ``kl``: mean KL(full || compressed) of the next-token distributions, in nats;
* ``greedy_agree``: share of positions where both caches give the same argmax token;
* ``ratio``: the compression ratio achieved against a bf16 cache (bytes, counting scales).

New tokens are appended in full precision (as KIVI keeps its residual); RoPE positions stay
the true ones after eviction. The model is the project's default model
(``stream_attention.models.default``): with trained weights when they are installed, else
randomly initialised, which the output says in capitals because its numbers then
describe noise. No pretrained third-party model is available offline here.

Policies: ``streaming`` (sinks + recent window), ``importance`` (SnapKV: the prompt's last
32 queries score the keys), ``importance-keynorm`` (no queries: low key norm = important),
``chunk`` (ChunkKV, chunks of 8 shared by heads), ``blocks16`` (chunks of 16 tokens: the
engine's block-granular eviction), ``quantized`` (KIVI: int8/4/2, keys per channel),
``quantized-per-token`` (the engine's page format: keys per token too), ``hybrid``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_attention.integration.hf import cache_layers_kv, dynamic_cache_from  # noqa: E402
from stream_attention.utils.memory import create_kv_compressor  # noqa: E402

CACHE_DTYPE = torch.bfloat16
POLICIES: dict[str, tuple[str, dict[str, Any], bool]] = {
    # name: (compressor, kwargs, uses the prompt's queries)
    "streaming": ("streaming", {}, False),
    "importance": ("importance", {}, True),
    "importance-keynorm": ("importance", {}, False),
    "chunk": ("chunk", {}, True),
    "blocks16": ("chunk", {"chunk_size": 16}, True),
    "quantized": ("quantized", {}, False),
    "quantized-per-token": ("quantized", {"key_per_channel": False}, False),
    "hybrid": ("hybrid", {}, True),
}


def _cache_kwarg(model: Any) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


class _QueryTap:
    """Captures every layer's RoPE-rotated queries ``[B, T, Hq, D]`` during a forward pass."""

    def __init__(self, model: Any) -> None:
        self.model = model
        cfg = model.config
        self.hq = cfg.num_attention_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.hq
        self.raw: dict[int, torch.Tensor] = {}
        self.handles = [
            layer.self_attn.q_proj.register_forward_hook(self._hook(i))
            for i, layer in enumerate(model.model.layers)
        ]

    def _hook(self, i: int):
        def fn(module, inputs, output):
            self.raw[i] = output.detach()

        return fn

    def rotated(self, positions: torch.Tensor) -> list[torch.Tensor]:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        out = []
        for i in sorted(self.raw):
            q = self.raw[i]
            b, t, _ = q.shape
            q = q.view(b, t, self.hq, self.d).transpose(1, 2)  # [B, Hq, T, D]
            cos, sin = self.model.model.rotary_emb(q, positions)
            q_rot, _ = apply_rotary_pos_emb(q, q, cos, sin)
            out.append(q_rot.transpose(1, 2).float())  # [B, T, Hq, D]
        self.raw.clear()
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _prompts(tokenizer: Any, n: int, prompt_tokens: int, continuation: int) -> list[torch.Tensor]:
    text = (Path(__file__).resolve().parents[1] / "stream_attention/models/data/heldout.txt").read_text()
    tokenizer.model_max_length = 1 << 30  # the whole file at once; windows are cut below
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    span = prompt_tokens + continuation
    if len(ids) < span:
        raise SystemExit(f"held-out text has {len(ids)} tokens, fewer than {span}")
    starts = [round(i * (len(ids) - span) / max(n - 1, 1)) for i in range(n)]
    return [torch.tensor(ids[s:s + span]) for s in starts]


@torch.no_grad()
def evaluate(model: Any, tokens: torch.Tensor, prompt_tokens: int, ratios: list[float],
             policies: dict[str, tuple[str, dict[str, Any], bool]]) -> dict[str, dict[float, dict[str, float]]]:
    dev = next(model.parameters()).device
    kw = _cache_kwarg(model)
    tap = _QueryTap(model)
    try:
        prompt = tokens[:prompt_tokens][None].to(dev)
        cont = tokens[prompt_tokens:][None].to(dev)
        t, n = prompt.shape[1], cont.shape[1]
        pos_p = torch.arange(t, device=dev)[None]
        pos_c = torch.arange(t, t + n, device=dev)[None]
        out = model(input_ids=prompt, position_ids=pos_p, use_cache=True)
        q_prompt = tap.rotated(pos_p)
        # The cache as a server would hold it (bf16): ratios count against 16-bit pages, and
        # the uncompressed reference carries the same rounding.
        full_kv = [(k.to(CACHE_DTYPE).to(k.dtype), v.to(CACHE_DTYPE).to(v.dtype))
                   for k, v in cache_layers_kv(out.past_key_values)]
        ref = model(input_ids=cont, position_ids=pos_c, use_cache=True, **{kw: dynamic_cache_from(full_kv)})
        q_cont = tap.rotated(pos_c)
        logp_full = F.log_softmax(ref.logits[0].float(), dim=-1)
        res: dict[str, dict[float, dict[str, float]]] = {}
        for name, (kind, kwargs, with_queries) in policies.items():
            comp = create_kv_compressor(kind, **kwargs)
            res[name] = {}
            for ratio in ratios:
                kv, errs, ratio_got = [], [], []
                for layer, (k, v) in enumerate(full_kv):
                    kb, vb = k.transpose(1, 2).to(CACHE_DTYPE), v.transpose(1, 2).to(CACHE_DTYPE)  # [B, T, Hkv, D]
                    ck, cv, st = comp.compress(kb, vb, ratio, queries=q_prompt[layer] if with_queries else None,
                                               probe_queries=q_cont[layer])
                    dk, dv = comp.decompress(ck, cv)
                    kv.append((dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype)))
                    errs.append(st["attention_rel_error"])
                    ratio_got.append(st["compression_ratio"])
                got = model(input_ids=cont, position_ids=pos_c, use_cache=True, **{kw: dynamic_cache_from(kv)})
                logp = F.log_softmax(got.logits[0].float(), dim=-1)
                kl = (logp_full.exp() * (logp_full - logp)).sum(-1)
                res[name][ratio] = {
                    "attn_rel_err": sum(errs) / len(errs),
                    "kl": float(kl.mean()),
                    "greedy_agree": float((logp.argmax(-1) == logp_full.argmax(-1)).float().mean()),
                    "ratio": sum(ratio_got) / len(ratio_got),
                    "bits": st.get("bits"),
                }
        return res
    finally:
        tap.close()


def _markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"Model: {summary['model']}; {summary['prompts']} prompts x {summary['prompt_tokens']} tokens, "
        f"{summary['continuation']} teacher-forced continuation tokens; device {summary['device']}.",
        "",
        "| policy | target | achieved | bits | attn rel err | KL (nats) | greedy agree |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_ratio in summary["results"].items():
        for ratio, m in by_ratio.items():
            lines.append(f"| {name} | {float(ratio):g}x | {m['ratio']:.2f}x | {m['bits'] or '-'} | "
                         f"{m['attn_rel_err']:.4f} | {m['kl']:.4f} | {m['greedy_agree']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="JSON results")
    p.add_argument("--md", default=None, help="markdown table")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--continuation", type=int, default=32)
    p.add_argument("--ratios", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    from stream_attention.models.default import has_trained_weights, load_default_model

    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    t0 = time.perf_counter()
    # fp32 so that the differences measured are the compression's, not bf16 rounding's.
    model, tokenizer = load_default_model(device=dev, dtype=torch.float32)
    model.eval()
    trained = has_trained_weights()
    label = ("stream_attention default model (trained, 6 layers, 6/2 heads, head_dim 64)" if trained else
             "stream_attention default model, UNTRAINED RANDOM WEIGHTS: the numbers describe noise")
    policies = {k: POLICIES[k] for k in args.policies}
    per_prompt = []
    for tokens in _prompts(tokenizer, args.prompts, args.prompt_tokens, args.continuation):
        per_prompt.append(evaluate(model, tokens, args.prompt_tokens, args.ratios, policies))
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name in policies:
        results[name] = {}
        for ratio in args.ratios:
            rows = [r[name][ratio] for r in per_prompt]
            agg = {key: sum(r[key] for r in rows) / len(rows) for key in ("attn_rel_err", "kl", "greedy_agree",
                                                                           "ratio")}
            agg["bits"] = rows[0]["bits"]
            agg["kl_max_prompt"] = max(r["kl"] for r in rows)
            results[name][str(ratio)] = agg
    summary = {
        "model": label, "trained": trained, "prompts": len(per_prompt), "prompt_tokens": args.prompt_tokens,
        "continuation": args.continuation, "device": str(dev), "torch": torch.__version__,
        "python": platform.python_version(), "results": results, "wall_s": time.perf_counter() - t0,
    }
    md = _markdown(summary)
    print(md)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    if args.md:
        Path(args.md).write_text(md + "\n")
    if not all(math.isfinite(m["kl"]) for by in results.values() for m in by.values()):
        sys.exit("non-finite KL: a compressed cache broke the model")


if __name__ == "__main__":
    main()
