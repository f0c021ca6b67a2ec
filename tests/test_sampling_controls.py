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


def _reference_prompt_logprobs(engine: LLMEngine, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, from transformers directly."""
    with torch.inference_mode():
        logp = torch.log_softmax(engine.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def test_prompt_logprobs_score_every_prompt_token_across_chunks_and_cache_hits() -> None:
    # An 8-token step budget: a 20-token prompt is prefilled in three chunks.
    engine = LLMEngine(config=EngineConfig(num_kv_blocks=64, max_num_batched_tokens=8))
    ids = engine.tokenizer.encode("import os\nimport sys\n\ndef main(argv: list[str]) -> int:\n    return len(argv)")
    assert len(ids) > 16
    expected = _reference_prompt_logprobs(engine, ids)
    for _ in range(2):  # the second time the prompt's blocks are in the prefix cache: still scored
        out = engine.generate([ids], SamplingParams(max_tokens=2, prompt_logprobs=3))[0]
        scores = out.prompt_logprobs
        assert len(scores) == len(ids) and scores[0] is None
        assert [lp.token_id for lp in scores[1:]] == ids[1:]
        # fp32 on CPU; the engine's chunked paged attention sums in another order than SDPA.
        got = torch.tensor([lp.logprob for lp in scores[1:]])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        for lp in scores[1:]:
            assert len(lp.top) == 3 and max(lp.top.values()) >= lp.logprob - 1e-4
    plain = engine.generate([ids], SamplingParams(max_tokens=2))[0]
    assert plain.prompt_logprobs is None
    single = engine.generate([ids[:1]], SamplingParams(max_tokens=2, prompt_logprobs=0))[0]
    assert single.prompt_logprobs == [None]
    with pytest.raises(ValueError, match="n > 1"):
        engine.generate([ids], SamplingParams(max_tokens=2, n=2, prompt_logprobs=1))


def test_echo_with_logprobs_scores_the_prompt_over_http(request: pytest.FixtureRequest) -> None:
    """What evaluation harnesses send to score a text (lm-eval's local-completions):
    ``echo`` + ``logprobs`` + ``max_tokens: 1`` through the official client."""
    openai = pytest.importorskip("openai")
    from tests.test_server import shared_server

    srv = shared_server("main", request.config)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    text = "def add(a, b):\n    return a + b"
    res = client.completions.create(model=srv.state.model_name, prompt=text, max_tokens=1, temperature=0,
                                    logprobs=1, echo=True)
    lp = res.choices[0].logprobs
    ids = srv.state.tokenizer.encode(text)
    assert res.choices[0].text.startswith(text)
    assert len(lp.tokens) == len(ids) + 1 and len(lp.token_logprobs) == len(lp.tokens)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens[:len(ids)]) == text
    engine = LLMEngine(config=EngineConfig(num_kv_blocks=16))
    expected = _reference_prompt_logprobs(engine, ids)
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:len(ids)]), expected, rtol=0, atol=1e-4)
    with pytest.raises(openai.BadRequestError, match="without stream"):
        client.completions.create(model=srv.state.model_name, prompt=text, max_tokens=1, logprobs=1, echo=True,
                                  stream=True)


def test_vllm_prompt_logprobs_field_with_ranks(request: pytest.FixtureRequest) -> None:
    httpx = pytest.importorskip("httpx")
    from tests.test_server import shared_server

    srv = shared_server("main", request.config)
    text = "def add(a, b):\n    return a + b"
    ids = srv.state.tokenizer.encode(text)
    engine = LLMEngine(config=EngineConfig(num_kv_blocks=16))
    with torch.inference_mode():
        logp = torch.log_softmax(engine.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        res = http.post("/v1/completions", json={"prompt": text, "max_tokens": 1, "prompt_logprobs": 2}).json()
        chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 1, "prompt_logprobs": 0}).json()
        refused = http.post("/v1/completions", json={"prompt": text, "prompt_logprobs": 1, "stream": True})
    scores = res["choices"][0]["prompt_logprobs"]
    assert len(scores) == len(ids) and scores[0] is None
    for i, entry in enumerate(scores[1:], start=1):
        token = ids[i]
        mine = entry[str(token)]
        assert abs(mine["logprob"] - logp[i - 1, token].item()) < 1e-4
        assert mine["rank"] == 1 + int((logp[i - 1] > logp[i - 1, token]).sum())  # ties aside (fp32)
        others = [e for t, e in entry.items() if t != str(token)]
        assert len(entry) <= 3 and all(e["rank"] in (1, 2) for e in others)
        assert mine["decoded_token"] == srv.state.tokenizer.decode([token])
    assert chat["prompt_logprobs"][0] is None and all(len(e) == 1 for e in chat["prompt_logprobs"][1:])
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream"
