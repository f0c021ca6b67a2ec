"""Needle retrieval under KV-cache compression (RULER / kvpress style), for any causal LM.

A case is a held-out source file with one assignment inserted near its top (the needle:
``NAME = VALUE``, VALUE a number, an identifier or a string), cut to a context length,
followed by a question line that asks for the value (``NAME =`` by default). The greedy
continuation must start with VALUE.

Compression is question-agnostic, as kvpress evaluates it: the context is prefilled, its
cache is compressed by the engine's own eviction policies at the engine's block
granularity (:mod:`stream_attention.engine.kv_compression`: ``streaming``,
``heavy-hitter``, ``snapkv``, ``hybrid`` = heavy-hitter blocks stored as int4 per-token
codes, as the engine's int4 pages), and only then are the question and the answer fed
over the compressed cache. Scores come from the attention of the context's last
``observation_window`` queries (the model is asked for attention weights, so it must run
an attention implementation that returns them, e.g. transformers' ``eager``). RoPE
positions stay the true ones after eviction.

The model is driven through the transformers calling convention (``input_ids``,
``position_ids``, ``past_key_values`` as a ``DynamicCache``, ``use_cache``,
``output_attentions``; outputs ``logits``, ``past_key_values``, ``attentions``).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..integration.hf import cache_layers_kv, dynamic_cache_from
from ..utils.quantization import dequantize_codes, quantize_along
from .kv_compression import (
    EvictionPolicy,
    HeavyHitterPolicy,
    SnapKVPolicy,
    StreamingLLMPolicy,
    pool_token_scores,
)

__all__ = ["NeedleCase", "NeedleSettings", "make_needle_cases", "run_needles", "continuation_nll", "POLICIES"]

POLICIES = ("none", "streaming", "heavy-hitter", "snapkv", "hybrid")
# Restating the assignment: a small base code model copies the earlier value (induction);
# "assert NAME ==" reads more like a question but the default model never answers it.
QUESTIONS = ("{name} =",)
_WORDS = ("alpha", "bravo", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "indigo", "juniper", "kepler",
          "lumen", "marble", "nectar", "onyx", "pixel", "quartz", "raven", "sierra", "tundra", "umber", "velvet",
          "walnut", "xenon", "yonder", "zephyr")


@dataclass
class NeedleCase:
    """One retrieval prompt: ``context_ids`` (compressed) then ``question_ids``; answer ``value``."""

    kind: str
    name: str
    value: str
    context_ids: list[int]
    question_ids: list[int]
    needle_tokens: tuple[int, int]  # [start, end) of the needle line in context_ids


@dataclass
class NeedleSettings:
    """Eviction geometry of the harness (the engine's knobs, with a short recent window so
    that 8x is reachable within a 2k context)."""

    block_size: int = 16
    sink_tokens: int = 4
    window_tokens: int = 32
    observation_window: int = 32
    pool_kernel: int = 7
    pooling: str = "max"
    max_new_tokens: int = 8
    extra: dict = field(default_factory=dict)


def _needle(kind: str, rng: random.Random) -> tuple[str, str, str]:
    """(name, value as written, text the answer must start with)."""
    a, b = rng.sample(_WORDS, 2)
    if kind == "number":
        value = str(rng.randrange(10_000, 100_000))
        return f"{a.upper()}_{b.upper()}_CODE", value, value
    if kind == "identifier":
        c = rng.choice(_WORDS)
        value = f"{c}_{rng.choice(_WORDS)}_handler"
        return f"{a}_{b}_callback", value, value
    value = f'"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}-{rng.randrange(100, 1000)}"'
    return f"{a}_{b}_label", value, value


def make_needle_cases(tokenizer: Any, documents: Sequence[str], n_cases: int, context_tokens: int, *,
                      kinds: Sequence[str] = ("number", "identifier", "string"), depth: float = 0.1,
                      questions: Sequence[str] = QUESTIONS, seed: int = 0) -> list[NeedleCase]:
    """``n_cases`` cases cycling over ``kinds``, each from the next document long enough to fill
    ``context_tokens`` (BOS included); the needle line goes at the line boundary nearest
    ``depth`` of the context."""
    rng = random.Random(seed)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    cases: list[NeedleCase] = []
    doc_iter = iter(documents * max(1, n_cases))
    for i in range(n_cases):
        kind = kinds[i % len(kinds)]
        name, value, answer = _needle(kind, rng)
        for doc in doc_iter:
            lines = doc.splitlines(keepends=True)
            if len(tokenizer.encode(doc, add_special_tokens=False)) >= context_tokens:
                break
        else:
            raise ValueError(f"no document has {context_tokens} tokens")
        # The needle after the line at ~depth of the context, then the file up to the budget.
        head_chars = 0
        approx_chars = len(doc) * context_tokens / max(len(tokenizer.encode(doc, add_special_tokens=False)), 1)
        cut = 0
        while cut < len(lines) - 1 and head_chars + len(lines[cut]) < depth * approx_chars:
            head_chars += len(lines[cut])
            cut += 1
        head = "".join(lines[:cut])
        needle = f"{name} = {value}\n"
        head_ids = bos + tokenizer.encode(head, add_special_tokens=False)
        needle_ids = tokenizer.encode(needle, add_special_tokens=False)
        question = "\n" + questions[i % len(questions)].format(name=name)
        question_ids = tokenizer.encode(question, add_special_tokens=False)
        rest = tokenizer.encode("".join(lines[cut:]), add_special_tokens=False)
        room = context_tokens - len(head_ids) - len(needle_ids)
        context_ids = head_ids + needle_ids + rest[:max(room, 0)]
        cases.append(NeedleCase(kind, name, answer, context_ids, question_ids,
                                (len(head_ids), len(head_ids) + len(needle_ids))))
    return cases


# --------------------------------------------------------------------------------------
# Cache handling
# --------------------------------------------------------------------------------------


def _policy(name: str, ratio: float, s: NeedleSettings) -> EvictionPolicy | None:
    kwargs = dict(block_size=s.block_size, sink_tokens=s.sink_tokens, window_tokens=s.window_tokens, ratio=ratio)
    return {"streaming": StreamingLLMPolicy, "heavy-hitter": HeavyHitterPolicy, "hybrid": HeavyHitterPolicy,
            "snapkv": SnapKVPolicy}.get(name, lambda **_: None)(**kwargs)


def _block_scores(attentions: Sequence[torch.Tensor], num_kv_heads: int, n_tokens: int, policy: str,
                  s: NeedleSettings) -> torch.Tensor:
    """Per block: the observation window's attention mass (SnapKV: pooled along keys per
    KV head) summed over query heads of a group, heads and layers, as the engine scores."""
    n_blocks = math.ceil(n_tokens / s.block_size)
    total = torch.zeros(n_blocks, dtype=torch.float64)
    for att in attentions:  # [1, Hq, w, T]
        mass = att[0].double().sum(1)  # [Hq, T]
        mass = mass.view(num_kv_heads, -1, n_tokens).sum(1)  # [Hkv, T]
        if policy == "snapkv":
            mass = pool_token_scores(mass, s.pool_kernel, s.pooling)
        mass = F.pad(mass.sum(0), (0, n_blocks * s.block_size - n_tokens))
        total += mass.view(n_blocks, s.block_size).sum(-1).cpu()
    return total


def compress_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], attentions: Sequence[torch.Tensor], policy: str,
                   ratio: float, s: NeedleSettings) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float]:
    """The cache ``policy`` keeps at ``ratio`` (whole blocks dropped; hybrid: int4 codes), and
    the compression achieved against the same cache in 16-bit (bytes)."""
    n_tokens = kv[0][0].shape[2]
    pol = _policy(policy, ratio, s)
    keep = torch.arange(n_tokens)
    if pol is not None:
        scores = None
        if policy != "streaming":
            scores = _block_scores(attentions, kv[0][0].shape[1], n_tokens, policy, s).numpy()
        drop = set(pol.select(n_tokens, n_tokens, scores))
        keep = torch.tensor([t for t in range(n_tokens) if t // s.block_size not in drop], dtype=torch.long)
    out = []
    for k, v in kv:
        k, v = k[:, :, keep.to(k.device)], v[:, :, keep.to(v.device)]
        if policy == "hybrid":  # the engine's int4 pages: per-token (scale, zero) over head_dim
            k, v = (dequantize_codes(*quantize_along(x.float(), 4, dims=(-1,))).to(x.dtype) for x in (k, v))
        out.append((k, v))
    bits = 4 + 2 * 16 / kv[0][0].shape[-1] if policy == "hybrid" else 16  # int4 codes + fp16 (scale, zero)
    return out, n_tokens / len(keep) * 16 / bits


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


@torch.no_grad()
def _prefill(model: Any, ids: list[int], s: NeedleSettings):
    """Full cache of ``ids`` and the attention weights of its last ``observation_window`` queries."""
    from transformers.cache_utils import DynamicCache

    dev = next(model.parameters()).device
    t = len(ids)
    w = min(s.observation_window, t - 1)
    x = torch.tensor([ids], device=dev)
    pos = torch.arange(t, device=dev)[None]
    cache = DynamicCache()
    model(input_ids=x[:, :t - w], position_ids=pos[:, :t - w], past_key_values=cache, use_cache=True)
    out = model(input_ids=x[:, t - w:], position_ids=pos[:, t - w:], past_key_values=cache, use_cache=True,
                output_attentions=True)
    if not out.attentions or out.attentions[0] is None:
        raise ValueError("the model returned no attention weights: load it with attn_implementation='eager'")
    return [(k.clone(), v.clone()) for k, v in cache_layers_kv(out.past_key_values)], out.attentions


@torch.no_grad()
def _greedy(model: Any, cache: Any, first_pos: int, question: list[int], max_new_tokens: int) -> list[int]:
    dev = next(model.parameters()).device
    ids, pos, new = question, first_pos, []
    for _ in range(max_new_tokens):
        x = torch.tensor([ids], device=dev)
        p = torch.arange(pos, pos + len(ids), device=dev)[None]
        out = model(input_ids=x, position_ids=p, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        nxt = int(out.logits[0, -1].argmax())
        new.append(nxt)
        pos += len(ids)
        ids = [nxt]
    return new


def answer_correct(text: str, value: str) -> bool:
    """The continuation starts (after spaces) with ``value`` and the value ends there."""
    text = text.lstrip(" ")
    return text.startswith(value) and not re.match(r"[A-Za-z0-9_]", text[len(value):len(value) + 1])


def run_needles(model: Any, tokenizer: Any, cases: Sequence[NeedleCase], configs: Sequence[tuple[str, float]],
                settings: NeedleSettings | None = None, *, decode: Callable[[list[int]], str] | None = None
                ) -> dict[str, Any]:
    """Accuracy per ``(policy, ratio)`` config (``("none", 1.0)`` is the full cache), overall
    and per needle kind, with the compression achieved; each case is prefilled once."""
    s = settings or NeedleSettings()
    decode = decode or (lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    rows: dict[tuple[str, float], list[tuple[str, bool, float]]] = {c: [] for c in configs}
    for case in cases:
        kv, attentions = _prefill(model, case.context_ids, s)
        for policy, ratio in configs:
            kept, achieved = compress_cache(kv, attentions, policy, ratio, s)
            new = _greedy(model, dynamic_cache_from(kept), len(case.context_ids), case.question_ids, s.max_new_tokens)
            rows[(policy, ratio)].append((case.kind, answer_correct(decode(new), case.value), achieved))
    results = {}
    for (policy, ratio), got in rows.items():
        kinds = sorted({k for k, _, _ in got})
        results[f"{policy}@{ratio:g}"] = {
            "policy": policy, "target_ratio": ratio, "cases": len(got),
            "accuracy": sum(ok for _, ok, _ in got) / max(len(got), 1),
            "by_kind": {k: sum(ok for kk, ok, _ in got if kk == k) / sum(kk == k for kk, _, _ in got) for k in kinds},
            "achieved_ratio": sum(a for _, _, a in got) / max(len(got), 1),
        }
    return results


@torch.no_grad()
def continuation_nll(model: Any, windows: Sequence[list[int]], context_tokens: int, policy: str, ratio: float,
                     settings: NeedleSettings | None = None) -> dict[str, float]:
    """Perplexity of each window's tokens after ``context_tokens``, teacher-forced over the
    context's cache as ``policy`` compresses it at ``ratio``."""
    s = settings or NeedleSettings()
    dev = next(model.parameters()).device
    nll, count = 0.0, 0
    for ids in windows:
        kv, attentions = _prefill(model, ids[:context_tokens], s)
        kept, _ = compress_cache(kv, attentions, policy, ratio, s)
        # The continuation is fed over the compressed cache; its first token's prediction
        # came from the full prefill, so scoring starts at the second.
        cont = torch.tensor([ids[context_tokens:]], device=dev)
        pos = torch.arange(context_tokens, len(ids), device=dev)[None]
        out = model(input_ids=cont, position_ids=pos, past_key_values=dynamic_cache_from(kept), use_cache=True)
        logp = F.log_softmax(out.logits[0, :-1].float(), -1)
        target = cont[0, 1:]
        nll -= float(logp.gather(-1, target[:, None]).sum())
        count += target.numel()
    return {"nll_per_token": nll / max(count, 1), "perplexity": math.exp(nll / max(count, 1)), "tokens": count}
