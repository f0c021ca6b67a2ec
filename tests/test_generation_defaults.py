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


def test_auto_follows_the_served_engine_not_the_embedded_model(tmp_path: Path) -> None:
    """A server handed an engine built from a model object (no ``--model``) must not apply
    the embedded default model's repetition penalty to it; a checkpoint directory it was
    loaded from is read, and the embedded model keeps its own file."""
    from stream_attention.server.generation_defaults import served_model_source

    assert served_model_source(None, "LlamaForCausalLM") == (None, False)
    assert served_model_source(None, "stream-attention-default") == (None, True)
    assert served_model_source(None, None) == (None, True)
    assert served_model_source("org/model", "LlamaForCausalLM") == ("org/model", True)
    (tmp_path / "generation_config.json").write_text('{"top_k": 7}')
    assert served_model_source(None, str(tmp_path)) == (str(tmp_path), True)
    assert load_sampling_defaults("auto", str(tmp_path)) == {"top_k": 7}


def test_server_state_reads_the_defaults_of_the_engine_it_serves() -> None:
    from types import SimpleNamespace

    from stream_attention.models.default import load_tokenizer
    from stream_attention.server.settings import ServerSettings
    from stream_attention.server.state import ServerState

    def engine(name: str) -> SimpleNamespace:
        return SimpleNamespace(tokenizer=load_tokenizer(), max_model_len=64, model_name=name, device="cpu")

    state = ServerState(ServerSettings())
    state.attach(engine("LlamaForCausalLM"))  # a model object handed to the engine
    assert state.sampling_defaults == {}
    state.attach(engine("stream-attention-default"))
    assert state.sampling_defaults == {"repetition_penalty": 1.2}
    state = ServerState(ServerSettings(generation_config="none"))
    state.attach(engine("stream-attention-default"))
    assert state.sampling_defaults == {}
