"""``logit_bias`` and ``min_tokens`` through the engine, against the model's own logits."""

from __future__ import annotations

import pytest
import torch

from stream_attention.engine import EngineConfig, LLMEngine, SamplingParams

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(config=EngineConfig(num_kv_blocks=64))


def _tokens(engine: LLMEngine, **kw) -> list[int]:
    return list(engine.generate([PROMPT], SamplingParams(**kw))[0].token_ids)


def test_a_negative_bias_gives_the_runner_up_and_a_positive_one_forces(engine: LLMEngine) -> None:
    plain = _tokens(engine, max_tokens=4, ignore_eos=True)
    # Reference: the model's next-token logits on the prompt, straight from transformers.
    ids = torch.tensor([engine.tokenizer.encode(PROMPT)])
    with torch.inference_mode():
        logits = engine.model(input_ids=ids).logits[0, -1]
    best, second = logits.topk(2).indices.tolist()
    assert plain[0] == best
    banned = _tokens(engine, max_tokens=4, ignore_eos=True, logit_bias={best: -100.0})
    assert banned[0] == second
    forced = 7 if best != 7 else 8
    for temperature in (0.0, 1.0):
        got = _tokens(engine, max_tokens=5, ignore_eos=True, temperature=temperature, seed=3,
                      logit_bias={forced: 100.0})
        assert got == [forced] * 5
    # Keys past the model's vocabulary are refused, not ignored.
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([PROMPT], SamplingParams(logit_bias={10**6: 1.0}))


def test_min_tokens_holds_stop_tokens_and_stop_strings_back(engine: LLMEngine) -> None:
    plain = _tokens(engine, max_tokens=12, ignore_eos=True)
    j = next(j for j in range(1, len(plain)) if plain[j] not in plain[:j])  # a token's first appearance
    stop_id = plain[j]
    assert _tokens(engine, max_tokens=12, stop_token_ids=[stop_id]) == plain[:j + 1]
    held = engine.generate([PROMPT], SamplingParams(max_tokens=12, stop_token_ids=[stop_id], min_tokens=j + 4))[0]
    assert len(held.token_ids) >= j + 4 and stop_id not in held.token_ids[:j + 4]
    # A stop string seen before min_tokens does not end the request.
    text = engine.generate([PROMPT], SamplingParams(max_tokens=12, ignore_eos=True))[0].text
    stop = text[:3]
    early = engine.generate([PROMPT], SamplingParams(max_tokens=12, ignore_eos=True, stop=[stop]))[0]
    late = engine.generate([PROMPT], SamplingParams(max_tokens=12, ignore_eos=True, stop=[stop], min_tokens=8))[0]
    assert len(early.token_ids) < 8 <= len(late.token_ids)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5).validate()
