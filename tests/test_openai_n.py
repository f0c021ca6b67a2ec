"""``n > 1`` on the OpenAI routes through the official client, against the real app."""

from __future__ import annotations

import uuid

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from tests.test_server import LiveServer, shared_server, wait_idle  # noqa: E402

IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def srv(request: pytest.FixtureRequest) -> LiveServer:
    return shared_server("main", request.config)


@pytest.fixture(scope="module")
def client(srv: LiveServer):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def _fresh_prompt() -> str:
    # A prefix no earlier request shares, so no prefix-cache hit hides a prefill.
    return f"# {uuid.uuid4().hex}\ndef handler(event):"


def test_completions_n3_share_one_prefill_and_free_their_blocks(client, srv: LiveServer) -> None:
    before = wait_idle(srv.engine)
    generated = srv.state.metrics.request_generation_tokens._value.get()
    comp = client.completions.create(
        model=srv.state.model_name, prompt=_fresh_prompt(), max_tokens=6, n=3, temperature=1.0, seed=7,
        extra_body=IGNORE_EOS,
    )
    after = wait_idle(srv.engine)
    assert [c.index for c in comp.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in comp.choices)
    assert comp.usage.completion_tokens == 3 * 6
    assert comp.usage.total_tokens == comp.usage.prompt_tokens + 18
    assert after.prefill_tokens_total - before.prefill_tokens_total == comp.usage.prompt_tokens
    assert after.kv_blocks_used == 0
    # The request's generated-tokens metric counts every choice, as usage does.
    assert srv.state.metrics.request_generation_tokens._value.get() - generated == 18


def test_seeded_choices_equal_separate_requests_with_seed_plus_index(client, srv: LiveServer) -> None:
    prompt = "import json\n\ndef load(path):"
    kw = dict(model=srv.state.model_name, prompt=prompt, max_tokens=8, temperature=1.0, extra_body=IGNORE_EOS)
    together = client.completions.create(n=3, seed=100, **kw)
    alone = [client.completions.create(seed=100 + i, **kw).choices[0].text for i in range(3)]
    assert [c.text for c in together.choices] == alone


def test_stream_n3_interleaves_indexed_chunks_equal_to_the_non_stream_answer(client, srv: LiveServer) -> None:
    kw = dict(model=srv.state.model_name, prompt="class Queue:", max_tokens=7, n=3, temperature=1.0, seed=3,
              extra_body=IGNORE_EOS)
    whole = client.completions.create(**kw)
    texts, finish, order = ["", "", ""], [None] * 3, []
    usage = None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            order.append(c.index)
            if c.finish_reason:
                assert finish[c.index] is None  # one finish per choice
                finish[c.index] = c.finish_reason
    assert texts == [c.text for c in whole.choices]
    assert finish == ["length"] * 3
    assert set(order) == {0, 1, 2} and order != sorted(order)  # interleaved, not one after another
    assert usage.completion_tokens == 21 and usage.prompt_tokens == whole.usage.prompt_tokens
    assert wait_idle(srv.engine).kv_blocks_used == 0


def test_chat_n2_greedy_choices_are_identical_stream_and_not(client, srv: LiveServer) -> None:
    messages = [{"role": "user", "content": "Write a sort function."}]
    kw = dict(model=srv.state.model_name, messages=messages, max_tokens=8, n=2, temperature=0)
    chat = client.chat.completions.create(logprobs=True, **kw)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content
    assert chat.usage.completion_tokens == sum(len(c.logprobs.content) for c in chat.choices)
    roles, texts = [None, None], ["", ""]
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            roles[c.index] = c.delta.role or roles[c.index]
            texts[c.index] += c.delta.content or ""
    assert roles == ["assistant", "assistant"]
    assert texts == [chat.choices[0].message.content] * 2


def test_best_of_is_refused_and_n_is_bounded(client, srv: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=srv.state.model_name, prompt="x", max_tokens=2, n=2, best_of=4)
    assert "best_of" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:  # within --max-n (64 here), beyond the 32 sequence slots
        client.completions.create(model=srv.state.model_name, prompt="x", max_tokens=2, n=40)
    assert "n=40" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:  # beyond --max-n
        client.completions.create(model=srv.state.model_name, prompt="x", max_tokens=2, n=65)
    assert "at most 64 choices" in str(err.value)
