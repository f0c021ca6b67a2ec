"""``/tokenize`` and ``/detokenize`` over HTTP against the real app and the embedded model."""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("fastapi")

from tests.test_server import LiveServer, shared_server  # noqa: E402

MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A stack class, please."}]


@pytest.fixture(scope="module")
def srv(request: pytest.FixtureRequest) -> LiveServer:
    return shared_server("main", request.config)


@pytest.fixture(scope="module")
def http(srv: LiveServer) -> httpx.Client:
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        yield client


def test_prompt_round_trip(http: httpx.Client, srv: LiveServer) -> None:
    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)"
    r = http.post("/tokenize", json={"model": srv.state.model_name, "prompt": text})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = srv.state.tokenizer(text)["input_ids"]
    assert body["tokens"] == expected
    assert body["count"] == len(expected)
    assert body["max_model_len"] == srv.state.max_model_len
    back = http.post("/detokenize", json={"model": srv.state.model_name, "tokens": body["tokens"]})
    assert back.status_code == 200, back.text
    assert back.json() == {"prompt": text}


def test_token_strs(http: httpx.Client, srv: LiveServer) -> None:
    body = http.post("/tokenize", json={"prompt": "import os", "return_token_strs": True}).json()
    assert body["token_strs"] == srv.state.tokenizer.convert_ids_to_tokens(body["tokens"])
    assert "token_strs" not in http.post("/tokenize", json={"prompt": "import os"}).json()


def test_messages_use_the_chat_template_like_the_chat_route(http: httpx.Client, srv: LiveServer) -> None:
    body = http.post("/tokenize", json={"messages": MESSAGES}).json()
    expected = srv.state.tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert body["tokens"] == list(expected)
    without = http.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert without["count"] < body["count"]
    # The chat route sees exactly these ids: its usage counts them.
    chat = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == body["count"]
    text = http.post("/detokenize", json={"tokens": body["tokens"]}).json()["prompt"]
    assert text == srv.state.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize(
    ("route", "payload", "status", "param"),
    [
        ("/tokenize", {"prompt": "x", "messages": MESSAGES}, 400, None),
        ("/tokenize", {}, 400, None),
        ("/tokenize", {"prompt": "x", "model": "no-such-model"}, 404, "model"),
        ("/tokenize", {"prompt": "x", "bogus": 1}, 400, "bogus"),
        ("/detokenize", {"tokens": [1, 10**9]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {}, 400, "tokens"),
    ],
)
def test_bad_requests(http: httpx.Client, route: str, payload: dict, status: int, param: str | None) -> None:
    r = http.post(route, json=payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"]
    if param is not None:
        assert err["param"] == param
