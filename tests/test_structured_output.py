"""Structured output (xgrammar) through the official ``openai`` client and ``/generate``,
against the real app and the embedded default model (a code model that knows nothing of
these schemas: every valid answer below is the grammar's doing)."""

from __future__ import annotations

import json
import re
import uuid

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("xgrammar")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from stream_attention.engine.structured_output import check_json_schema  # noqa: E402
from stream_attention.server import create_app  # noqa: E402
from tests.test_server import LiveServer, _settings, shared_server, wait_idle  # noqa: E402

# Nesting, enums, numeric bounds, arrays; strings bounded so a small model cannot ramble.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "floor": {"type": "integer", "minimum": -2, "maximum": 40},
            },
            "required": ["zip", "floor"],
            "additionalProperties": False,
        },
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 10}, "minItems": 1,
                   "maxItems": 4},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "scores", "active"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a user of the system as JSON."}]


@pytest.fixture(scope="module")
def srv(request: pytest.FixtureRequest) -> LiveServer:
    return shared_server("main", request.config)


@pytest.fixture(scope="module")
def client(srv: LiveServer):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(srv: LiveServer) -> httpx.Client:
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        yield c


def _schema_format(schema: dict, name: str = "person") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chat_json_schema_outputs_validate(client, srv: LiveServer, temperature: float) -> None:
    chat = client.chat.completions.create(
        model=srv.state.model_name, messages=MESSAGES, max_tokens=160, temperature=temperature, seed=11, n=2,
        response_format=_schema_format(PERSON),
    )
    for choice in chat.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert wait_idle(srv.engine).kv_blocks_used == 0


def test_chat_json_schema_stream_is_the_same_valid_json(client, srv: LiveServer) -> None:
    kw = dict(model=srv.state.model_name, messages=MESSAGES, max_tokens=160, temperature=0.8, seed=5,
              response_format=_schema_format(PERSON))
    whole = client.chat.completions.create(**kw).choices[0].message.content
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                   if c.choices)
    assert text == whole
    jsonschema.validate(json.loads(text), PERSON)


def test_completions_json_object_and_schema(client, srv: LiveServer) -> None:
    comp = client.completions.create(
        model=srv.state.model_name, prompt="data = ", max_tokens=120, temperature=0.7, seed=2,
        extra_body={"response_format": {"type": "json_object"}},  # not a parameter of the SDK's completions
    )
    assert comp.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(comp.choices[0].text), dict)
    tags = {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 2, "maxItems": 3}
    comp = client.completions.create(
        model=srv.state.model_name, prompt="colors = ", max_tokens=40, temperature=1.0, seed=3,
        extra_body={"response_format": _schema_format(tags, "tags")},
    )
    jsonschema.validate(json.loads(comp.choices[0].text), tags)


def test_unconstrained_output_is_not_json(client, srv: LiveServer) -> None:
    # The reference for the tests above: without the grammar this model writes Python.
    chat = client.chat.completions.create(model=srv.state.model_name, messages=MESSAGES, max_tokens=60, temperature=0)
    with pytest.raises(ValueError):
        jsonschema.validate(json.loads(chat.choices[0].message.content), PERSON)


def test_generate_regex_and_ebnf(http: httpx.Client) -> None:
    pattern = r"\(\d{3}\) \d{3}-\d{4}"
    for seed in (1, 2):
        r = http.post("/generate", json={"prompt": "phone = ", "max_tokens": 30, "temperature": 1.0, "seed": seed,
                                         "regex": pattern})
        assert r.status_code == 200, r.text
        assert re.fullmatch(pattern, r.json()["generated_text"]), r.json()
        assert r.json()["finish_reason"] == "stop"
    grammar = 'root ::= answer ("," answer)?\nanswer ::= "yes" | "no" | "maybe " [0-9] [0-9]?'
    allowed = re.compile(r"(yes|no|maybe \d\d?)(,(yes|no|maybe \d\d?))?")
    r = http.post("/generate_stream", json={"prompt": "ok = ", "max_tokens": 20, "temperature": 1.0, "seed": 4,
                                            "grammar": grammar})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    final = events[-1]
    assert final["finish_reason"] == "stop" and allowed.fullmatch(final["generated_text"]), final
    assert "".join(e["token"]["text"] for e in events if e["token"]) == final["generated_text"]


def test_compiled_once_per_spec(http: httpx.Client, srv: LiveServer) -> None:
    compiler = srv.engine.client.engine.grammar_compiler
    pattern = f"id-{uuid.uuid4().hex[:8]}-[a-f]{{4}}"  # a spec no other test used
    before = compiler.compiles
    for seed in (1, 2, 3):
        r = http.post("/generate", json={"prompt": "x = ", "max_tokens": 30, "temperature": 1.0, "seed": seed,
                                         "regex": pattern})
        assert re.fullmatch(pattern, r.json()["generated_text"])
    assert compiler.compiles == before + 1


@pytest.mark.parametrize(
    ("route", "body", "param", "words"),
    [
        ("/v1/chat/completions", {"messages": MESSAGES, "response_format": _schema_format(
            {"type": "object", "properties": {"a": {"not": {"type": "string"}}}})}, "response_format", ["'not'"]),
        ("/v1/chat/completions", {"messages": MESSAGES, "response_format": _schema_format(
            {"allOf": [{"type": "integer"}, {"minimum": 3}]})}, "response_format", ["allOf"]),
        ("/v1/completions", {"prompt": "x", "response_format": _schema_format({"type": "integr"})},
         "response_format", ["integr"]),
        ("/v1/completions", {"prompt": "x", "response_format": _schema_format(
            {"$ref": "#/$defs/missing"})}, "response_format", ["$defs"]),
        ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_schema"}},
         "response_format", ["json_schema"]),
        ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "xml"}},
         "response_format.type", []),
        ("/generate", {"prompt": "x", "regex": "(unclosed"}, "regex", []),
        ("/generate", {"prompt": "x", "grammar": "root ::= undefined_rule"}, "grammar", ["undefined_rule"]),
        ("/generate", {"prompt": "x", "regex": "a", "grammar": 'root ::= "a"'}, None, ["at most one"]),
        ("/generate", {"prompt": "x", "json_schema": {"type": "array", "uniqueItems": True}}, "json_schema",
         ["uniqueItems"]),
    ],
)
def test_bad_constraints_are_400_naming_the_problem(
    http: httpx.Client, route: str, body: dict, param: str | None, words: list[str]
) -> None:
    r = http.post(route, json={"max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    if param is not None:
        assert err["param"] == param, err
    for word in words:
        assert word in err["message"], err


def test_compile_timeout_is_400(srv: LiveServer) -> None:
    impatient = LiveServer(create_app(_settings(grammar_compile_timeout=1e-6), engine=srv.engine))
    try:
        schema = {"type": "object", "properties": {f"k{uuid.uuid4().hex[:6]}": {"type": "integer"}}}
        r = httpx.post(impatient.url + "/generate", json={"prompt": "x", "max_tokens": 4, "json_schema": schema},
                       timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "grammar_timeout"
    finally:
        impatient.stop()


def test_schema_keyword_check_walks_every_subschema() -> None:
    check_json_schema(PERSON)
    nested = {"type": "object", "properties": {"a": {"type": "array", "items": {"anyOf": [
        {"type": "string"}, {"type": "object", "properties": {"b": {"if": {}}}}]}}}}
    with pytest.raises(ValueError, match=r"'if' \(at #/properties/a/items/anyOf/1/properties/b\)"):
        check_json_schema(nested)
    with pytest.raises(ValueError, match="'contains'"):
        check_json_schema({"$defs": {"x": {"contains": {}}}, "$ref": "#/$defs/x"})


def test_masker_warm_up_compiles_without_touching_later_masks() -> None:
    """The engine warms the masker at start-up on CUDA (the device kernel compiles per
    row-count class); the warm-up's all-allowed mask must not leak into a real step."""
    import torch

    from stream_attention.engine import StructuredOutputsParams
    from stream_attention.engine.structured_output import GrammarCompiler, TokenMasker
    from stream_attention.engine.tokenizer import load_tokenizer
    from stream_attention.models import default_model_dir

    tok = load_tokenizer(str(default_model_dir()))
    vocab = len(tok)
    masker = TokenMasker(vocab, torch.device("cpu"))
    masker.warm_up(torch.float32)
    matcher = GrammarCompiler(tok, vocab).matcher(StructuredOutputsParams(regex="ab"))
    logits = torch.zeros(2, vocab)
    masker.apply(logits, [(1, matcher)])
    allowed = [tok.decode([t]) for t in torch.isfinite(logits[1]).nonzero().flatten().tolist()]
    assert allowed and all(text in ("a", "ab") for text in allowed), allowed
    assert torch.isfinite(logits[0]).all()  # an unconstrained row stays untouched
