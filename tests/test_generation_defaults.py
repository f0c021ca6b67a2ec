"""Sampling defaults from the model's generation_config.json (``--generation-config``)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

from stream_attention.server.generation_defaults import load_sampling_defaults  # noqa: E402

from .test_server import LiveServer, shared_server  # noqa: E402

README_PROMPT = "def fibonacci(n):"


def test_defaults_come_from_the_models_generation_config(tmp_path: Path) -> None:
    assert load_sampling_defaults("auto", None) == {"repetition_penalty": 1.2}  # the embedded model's file
    assert load_sampling_defaults("none", None) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 0.9, "temperature": 0.7, "top_k": 20}))
    # Temperature stays with each route's documented default; the knobs are taken.
    assert load_sampling_defaults(str(tmp_path), None) == {"top_p": 0.9, "top_k": 20}
    assert load_sampling_defaults("auto", str(tmp_path)) == {"top_p": 0.9, "top_k": 20}
    with pytest.raises(ValueError, match="generation_config="):
        load_sampling_defaults(str(tmp_path / "missing"), None)


@pytest.fixture(scope="module")
def srv(request: pytest.FixtureRequest) -> LiveServer:
    return shared_server("main", request.config)


def test_a_request_without_the_knob_gets_the_models_value_and_an_explicit_one_wins(srv: LiveServer) -> None:
    with httpx.Client(base_url=srv.url, timeout=120) as http:
        plain = http.post("/generate", json={"prompt": README_PROMPT, "max_tokens": 64}).json()["generated_text"]
        neutral = http.post("/generate", json={"prompt": README_PROMPT, "max_tokens": 64,
                                               "repetition_penalty": 1.0}).json()["generated_text"]
        chat = http.post("/v1/completions", json={"prompt": README_PROMPT, "max_tokens": 64,
                                                   "temperature": 0}).json()["choices"][0]["text"]
    assert plain != neutral
    assert chat == plain  # the OpenAI route takes the same defaults
    # The README's example: greedy with the model's penalty does not loop on one line.
    lines = [ln.strip() for ln in plain.splitlines() if ln.strip()]
    assert max(Counter(lines).values()) < 3, plain
    loops = [ln.strip() for ln in neutral.splitlines() if ln.strip()]
    assert max(Counter(loops).values()) >= 3, neutral  # what the penalty is there for
