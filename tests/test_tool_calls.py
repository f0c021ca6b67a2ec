"""Tool calls on ``/v1/chat/completions`` through the official ``openai`` client, against the
real app and the embedded default model (a code model: it never calls tools on its own, so
``required`` and named calls are the grammar's doing, and ``auto`` falls back to content)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("xgrammar")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from stream_attention.server.tool_calls import content_prefix, parse_auto  # noqa: E402
from tests.test_server import LiveServer, shared_server, wait_idle  # noqa: E402

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Tokyo", "Lima"]},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 100},
                   "b": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris for the next three days?"}]


@pytest.fixture(scope="module")
def srv(request: pytest.FixtureRequest) -> LiveServer:
    return shared_server("main", request.config)


@pytest.fixture(scope="module")
def client(srv: LiveServer):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def _create(client, srv, **kw):
    args = dict(model=srv.state.model_name, messages=MESSAGES, tools=TOOLS, max_tokens=80, temperature=1.0, seed=9)
    return client.chat.completions.create(**{**args, **kw})


def _check_calls(calls) -> None:
    for call in calls:
        assert call.id.startswith("call_") and len(call.id) > 10
        assert call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _stream_calls(stream) -> tuple[dict[int, dict], list[str | None], str]:
    """Tool calls reassembled from the deltas, finish reasons, content."""
    calls: dict[int, dict] = {}
    finish, content = [], ""
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                if d.id is not None:  # the first delta of a call: id, type, name, no arguments yet
                    assert d.index not in calls and d.type == "function" and d.function.name
                    assert d.function.arguments == ""
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                else:
                    calls[d.index]["arguments"] += d.function.arguments
            if c.finish_reason:
                finish.append(c.finish_reason)
    return calls, finish, content


def test_named_function_is_called_with_valid_arguments(client, srv: LiveServer) -> None:
    choice = {"type": "function", "function": {"name": "add"}}
    out = _create(client, srv, tool_choice=choice)
    msg = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls"
    assert msg.content is None and len(msg.tool_calls) == 1 and msg.tool_calls[0].function.name == "add"
    _check_calls(msg.tool_calls)
    calls, finish, content = _stream_calls(_create(client, srv, tool_choice=choice, stream=True))
    assert finish == ["tool_calls"] and content == ""
    assert [c["name"] for c in calls.values()] == ["add"]
    assert calls[0]["arguments"] == msg.tool_calls[0].function.arguments  # same seed, same call
    assert wait_idle(srv.engine).kv_blocks_used == 0


@pytest.mark.parametrize("parallel", [False, True])
def test_required_calls_validate_stream_and_not(client, srv: LiveServer, parallel: bool) -> None:
    out = _create(client, srv, tool_choice="required", parallel_tool_calls=parallel, max_tokens=120)
    msg = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls", msg
    assert msg.tool_calls and (parallel or len(msg.tool_calls) == 1)
    _check_calls(msg.tool_calls)
    calls, finish, _ = _stream_calls(
        _create(client, srv, tool_choice="required", parallel_tool_calls=parallel, max_tokens=120, stream=True))
    assert finish == ["tool_calls"]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (t.function.name, t.function.arguments) for t in msg.tool_calls]


def test_auto_without_a_call_is_plain_content(client, srv: LiveServer) -> None:
    out = _create(client, srv, tool_choice="auto", temperature=0, max_tokens=24)
    msg = out.choices[0].message
    assert not msg.tool_calls and msg.content
    assert out.choices[0].finish_reason in ("stop", "length")
    calls, finish, content = _stream_calls(_create(client, srv, tool_choice="auto", temperature=0, max_tokens=24,
                                                   stream=True))
    assert calls == {} and content == msg.content and finish == [out.choices[0].finish_reason]
    plain = _create(client, srv, tool_choice="none", temperature=0, max_tokens=24)
    assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls


def test_tool_results_in_the_conversation_are_accepted(client, srv: LiveServer) -> None:
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius", "days": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    out = _create(client, srv, messages=history, max_tokens=4, temperature=0)
    assert out.choices[0].message.role == "assistant"


@pytest.mark.parametrize(
    ("kw", "param", "word"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice", "required"),
        ({"tool_choice": "sometimes"}, "tool_choice", None),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name", None),
        ({"tools": TOOLS + TOOLS[:1]}, "tools", "unique"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"not": {"type": "string"}}}}}}], "tool_choice": "required"},
         "tools", "'not'"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format", None),
    ],
)
def test_bad_tool_requests_are_400(client, srv: LiveServer, kw: dict, param: str, word: str | None) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        _create(client, srv, max_tokens=4, **kw)
    body = err.value.body
    assert body["param"] == param, body
    if word:
        assert word in body["message"], body


NAMES = {"get_weather", "add"}


def test_parse_auto_hermes_llama_and_fallbacks() -> None:
    content, calls = parse_auto('Let me check. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>',
                                NAMES)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("add", {"a": 1, "b": 2})]
    two = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n' \
          '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Lima\\"}"}</tool_call>'
    content, calls = parse_auto(two, NAMES)
    assert content is None and [c["function"]["name"] for c in calls] == ["add", "get_weather"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "Lima"}
    assert len(parse_auto(two, NAMES, parallel=False)[1]) == 1
    content, calls = parse_auto(' {"name": "get_weather", "parameters": {"city": "Tokyo"}}', NAMES)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Tokyo"}
    _, calls = parse_auto('[{"name": "add", "parameters": {"a": 1}}, {"name": "add", "arguments": {"b": 2}}]', NAMES)
    assert len(calls) == 2 and len({c["id"] for c in calls}) == 2
    for text in ('{"name": "rm_rf", "parameters": {}}', '<tool_call>{"name": "add", </tool_call>',
                 '{"a": 1}', "def f(x):\n    return {x: 1}", '{"name": "add", "parameters": [1]}'):
        assert parse_auto(text, NAMES) == (text, []), text


def test_content_prefix_holds_back_what_may_be_a_call() -> None:
    assert content_prefix("Hello there") == len("Hello there")
    assert content_prefix("  {\"name\"") == 0
    assert content_prefix("[") == 0
    assert content_prefix("Sure <tool") == len("Sure ")
    assert content_prefix("Sure <tool_call>{") == len("Sure ")
    assert content_prefix("a < b") == len("a < b")


def test_tool_call_parser_reads_only_its_format() -> None:
    hermes = 'Checking. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    llama = '{"name": "add", "parameters": {"a": 1, "b": 2}}'
    for parser, reads_hermes, reads_llama in [("auto", True, True), ("hermes", True, False),
                                              ("llama3_json", False, True)]:
        content, calls = parse_auto(hermes, NAMES, parser=parser)
        assert (len(calls) == 1) is reads_hermes and (content == hermes) is not reads_hermes, parser
        content, calls = parse_auto(llama, NAMES, parser=parser)
        assert (len(calls) == 1) is reads_llama and (content == llama) is not reads_llama, parser
        if calls:
            assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    # Streaming holds back only what the chosen parser could still read as a call.
    assert content_prefix('{"answer": 4}', "hermes") == len('{"answer": 4}')
    assert content_prefix('{"answer": 4}', "llama3_json") == 0
    assert content_prefix("Sure <tool_call>{", "llama3_json") == len("Sure <tool_call>{")
    assert content_prefix("Sure <tool_call>{", "hermes") == len("Sure ")
    with pytest.raises(ValueError, match="tool_call_parser='mistral'"):
        parse_auto(llama, NAMES, parser="mistral")


def test_vllm_tool_flags_are_accepted() -> None:
    from stream_attention.server.settings import settings_from_args

    s = settings_from_args(["--enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    assert s.tool_call_parser == "hermes"
    with pytest.raises(SystemExit):
        settings_from_args(["--tool-call-parser", "mistral"])
