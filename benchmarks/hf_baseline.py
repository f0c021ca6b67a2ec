"""The transformers baseline the engine benchmarks compare against, shared by the
benchmark scripts: greedy ``generate`` with a static KV cache (``cache_implementation=
"static"``, transformers' fastest built-in decode path without ``torch.compile``), every
sequence generating its full length, timed after a warm-up call of the same shape.
"""

from __future__ import annotations

import time

import torch


def wordlevel_tokenizer(vocab: int):
    """An offline tokenizer covering every id of a random model (the text is irrelevant)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", pad_token="t0")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_hf_static_generate(model, prompts: torch.Tensor, gen: int) -> tuple[dict, torch.Tensor]:
    """Greedy ``model.generate`` over ``prompts [n, prompt_len]`` (no padding) for exactly
    ``gen`` new tokens with a static cache: a warm-up call, then a timed one.

    Returns ``({"hf_static_s", "hf_static_tok_s", "hf_warmup_s"}, new_tokens [n, gen])``.
    """
    device = next(model.parameters()).device
    model.generation_config.eos_token_id = None
    ids = prompts.to(device)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=gen, min_new_tokens=gen, do_sample=False,
                  cache_implementation="static", pad_token_id=0)
    result = {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, **kwargs)  # warm-up: cache allocation, kernel selection
    _sync(device)
    result["hf_warmup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, **kwargs)
    _sync(device)
    seconds = time.perf_counter() - t0
    if out.shape[1] != ids.shape[1] + gen:
        raise RuntimeError(f"HF generate returned {out.shape[1] - ids.shape[1]} new tokens, expected {gen}")
    result["hf_static_s"] = seconds
    result["hf_static_tok_s"] = ids.shape[0] * gen / seconds
    return result, out[:, ids.shape[1]:].cpu()
