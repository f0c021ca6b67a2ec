"""``logit_bias`` and ``min_tokens`` through the engine, against the model's own logits."""

from __future__ import annotations

from typing import Any

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
    # n > 1: the prompt is scored once, before the choices fork; each choice carries the scores.
    choices = engine.generate([ids], SamplingParams(max_tokens=2, n=2, prompt_logprobs=1, temperature=1.0, seed=5))
    assert [c.index for c in choices] == [0, 1]
    assert choices[0].prompt_logprobs == choices[1].prompt_logprobs
    got = torch.tensor([lp.logprob for lp in choices[1].prompt_logprobs[1:]])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_prompt_logprobs_survive_preemption() -> None:
    # 8 blocks of 16 tokens for three requests of ~60 tokens each: some are preempted and
    # recomputed; a prompt already scored keeps its scores, one not yet scored starts over.
    engine = LLMEngine(config=EngineConfig(num_kv_blocks=8, max_num_seqs=4))
    prompts = ["import os\nimport sys\n\ndef main(argv):", "class Stack:\n    def push(self, x):",
               "def add(a, b):\n    return a"]
    outs = engine.generate(prompts, SamplingParams(max_tokens=40, prompt_logprobs=1, ignore_eos=True))
    assert engine.stats().preemptions_total > 0
    for prompt, out in zip(prompts, outs, strict=True):
        ids = engine.tokenizer.encode(prompt)
        scores = out.prompt_logprobs
        assert len(scores) == len(ids) and scores[0] is None
        assert [lp.token_id for lp in scores[1:]] == ids[1:]
        # fp32 on CPU; the engine's paged attention sums in another order than SDPA.
        got = torch.tensor([lp.logprob for lp in scores[1:]])
        torch.testing.assert_close(got, _reference_prompt_logprobs(engine, ids), rtol=0, atol=1e-4)


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
    # Streamed, the first chunk echoes the prompt with its tokens' scores; the completion follows.
    chunks = list(client.completions.create(model=srv.state.model_name, prompt=text, max_tokens=3, temperature=0,
                                            logprobs=1, echo=True, stream=True, extra_body={"ignore_eos": True}))
    first = chunks[0].choices[0]
    assert first.text == text and "".join(first.logprobs.tokens) == text
    assert first.logprobs.token_logprobs[0] is None and first.logprobs.top_logprobs[0] is None
    assert first.logprobs.text_offset == [sum(len(t) for t in first.logprobs.tokens[:i]) for i in range(len(ids))]
    torch.testing.assert_close(torch.tensor(first.logprobs.token_logprobs[1:]), expected, rtol=0, atol=1e-4)
    rest = [c.choices[0] for c in chunks[1:] if c.choices]
    assert rest and all(len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) <= 1 for c in rest)
    assert rest[0].logprobs.text_offset == [len(text)]
    assert sum(len(c.logprobs.tokens) for c in rest) == 3


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


def _sse(http: Any, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks of a streamed request, ``[DONE]`` checked and left out."""
    from tests.test_server import sse_events

    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(list(r.iter_lines()))
    assert events[-1] == "[DONE]"
    return events[:-1]


def _assert_same_scores(got: list[Any], want: list[Any]) -> None:
    """vLLM ``prompt_logprobs`` entries alike: the same tokens, ranks and texts, logprobs
    within 1e-4 (fp32 on CPU: a prompt scored in another batch, or beside other choices,
    can be summed in another order)."""
    assert len(got) == len(want) and got[0] is None and want[0] is None
    for g, w in zip(got[1:], want[1:], strict=True):
        assert g.keys() == w.keys()
        for tid in g:
            assert (g[tid]["rank"], g[tid]["decoded_token"]) == (w[tid]["rank"], w[tid]["decoded_token"])
            assert abs(g[tid]["logprob"] - w[tid]["logprob"]) < 1e-4


def test_streams_send_prompt_logprobs_once_in_the_first_chunk(request: pytest.FixtureRequest) -> None:
    httpx = pytest.importorskip("httpx")
    from tests.test_server import shared_server

    srv = shared_server("main", request.config)
    text = "def add(a, b):\n    return a + b"
    n_prompt = len(srv.state.tokenizer.encode(text))
    body = {"prompt": text, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "prompt_logprobs": 2}
    chat_body = {"messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0,
                 "ignore_eos": True, "prompt_logprobs": 1}
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        whole = http.post("/v1/completions", json=body).json()["choices"][0]
        chunks = _sse(http, "/v1/completions", body)
        chat_whole = http.post("/v1/chat/completions", json=chat_body).json()
        chat_chunks = _sse(http, "/v1/chat/completions", chat_body)
        tool_body = {**chat_body, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
                     "tool_choice": "auto"}
        tool_whole = http.post("/v1/chat/completions", json=tool_body).json()
        tool_chunks = _sse(http, "/v1/chat/completions", tool_body)
    # Completions: on the first chunk's choice (where the response has it), then never again.
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert len(whole["prompt_logprobs"]) == n_prompt
    _assert_same_scores(choices[0]["prompt_logprobs"], whole["prompt_logprobs"])
    assert all("prompt_logprobs" not in c for c in choices[1:]) and len(choices) > 1
    assert "".join(c["text"] for c in choices) == whole["text"]
    # Chat: on the first chunk (where the response has it), then never again.
    assert chat_chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    _assert_same_scores(chat_chunks[0]["prompt_logprobs"], chat_whole["prompt_logprobs"])
    assert all("prompt_logprobs" not in c for c in chat_chunks[1:]) and len(chat_chunks) > 1
    # The same with tools (their own stream: calls are held back until they parse).
    _assert_same_scores(tool_chunks[0]["prompt_logprobs"], tool_whole["prompt_logprobs"])
    assert all("prompt_logprobs" not in c for c in tool_chunks[1:]) and len(tool_chunks) > 1


def test_every_choice_gets_the_same_prompt_logprobs(request: pytest.FixtureRequest) -> None:
    httpx = pytest.importorskip("httpx")
    from tests.test_server import shared_server

    srv = shared_server("main", request.config)
    body = {"prompt": "class Stack:\n    def push(self, x):", "max_tokens": 3, "temperature": 1.0, "seed": 11,
            "ignore_eos": True, "prompt_logprobs": 1}
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        single = http.post("/v1/completions", json=body).json()["choices"][0]["prompt_logprobs"]
        pair = http.post("/v1/completions", json={**body, "n": 2}).json()["choices"]
        chunks = _sse(http, "/v1/completions", {**body, "n": 2, "echo": True, "logprobs": 1})
        chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "n": 2,
                                                        "max_tokens": 2, "prompt_logprobs": 0}).json()
    assert [c["index"] for c in pair] == [0, 1]
    assert pair[0]["prompt_logprobs"] == pair[1]["prompt_logprobs"]  # one scoring, shared: equal exactly
    _assert_same_scores(pair[0]["prompt_logprobs"], single)
    # Streamed with echo: each choice opens with the prompt, its scores, and prompt_logprobs.
    by_index: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for c in chunks:
        for choice in c["choices"]:
            by_index[choice["index"]].append(choice)
    firsts = [by_index[i][0] for i in (0, 1)]
    assert all(f["text"] == body["prompt"] for f in firsts)
    assert firsts[0]["prompt_logprobs"] == firsts[1]["prompt_logprobs"]
    assert firsts[0]["logprobs"] == firsts[1]["logprobs"]
    _assert_same_scores(firsts[0]["prompt_logprobs"], single)
    echoed = firsts[0]["logprobs"]["token_logprobs"]  # the echo's scores are the prompt's own
    assert echoed[1:] == [e[next(iter(e))]["logprob"] for e in firsts[0]["prompt_logprobs"][1:]]
    assert all("prompt_logprobs" not in c for i in (0, 1) for c in by_index[i][1:])
    assert len(chat["choices"]) == 2 and len(chat["prompt_logprobs"]) > 1
