"""Hostile input and the security settings: whatever a client sends is a 4xx naming what
was wrong (never a 5xx), limits are settings, and keys, monitoring routes, CORS and
prompt logging behave as the README's Server section says.

Bodies are sent as raw bytes, so that what no JSON library would write (lone surrogates,
``NaN``, invalid UTF-8, absurd nesting) reaches the server as a hostile client sends it.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")

from stream_attention.server import ServerSettings, create_app  # noqa: E402
from stream_attention.server.errors import ErrorResponse  # noqa: E402
from stream_attention.server.settings import settings_from_args  # noqa: E402

from .test_server import LiveServer, shared_server  # noqa: E402

GEN_ROUTES = ("/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions")


def _with_prompt(path: str, prompt: Any, **extra: Any) -> tuple[dict[str, Any], str]:
    """A body for ``path`` carrying ``prompt`` as its text, and the field the text is in."""
    if path == "/v1/chat/completions":
        return {"messages": [{"role": "user", "content": prompt}], "max_tokens": 2, **extra}, "messages.0.content"
    return {"prompt": prompt, "max_tokens": 2, **extra}, "prompt"


def _raw(body: dict[str, Any]) -> bytes:
    # ensure_ascii writes "\ud800" as the escape a client would send; allow_nan writes NaN.
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()


def _post(client: httpx.Client, path: str, raw: bytes, content_type: str | None = "application/json") -> httpx.Response:
    headers = {"content-type": content_type} if content_type else {}
    return client.post(path, content=raw, headers=headers)


def _error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = ErrorResponse.model_validate_json(r.content).error
    if param is not None:
        assert err.param == param, err
        assert param in err.message, err
    if code is not None:
        assert err.code == code, err
    return err.model_dump()


@pytest.fixture(scope="module")
def http(request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    srv = shared_server("main", request.config)
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def engine(request: pytest.FixtureRequest) -> Any:
    return shared_server("main", request.config).engine


@pytest.fixture
def serve(engine: Any) -> Iterator[Any]:
    """Serve the shared engine with other server settings: ``serve(**settings) -> client``."""
    servers: list[LiveServer] = []
    clients: list[httpx.Client] = []

    def start(**overrides: Any) -> httpx.Client:
        settings = ServerSettings(_env_file=None, **{"log_level": "warning", **overrides})
        servers.append(LiveServer(create_app(settings, engine=engine)))
        clients.append(httpx.Client(base_url=servers[-1].url, timeout=60))
        return clients[-1]

    yield start
    for client in clients:
        client.close()
    for srv in servers:
        srv.stop()


# ----------------------------------------------------------------------------- text


@pytest.mark.parametrize("path", GEN_ROUTES)
def test_lone_surrogate_in_prompt_is_400_naming_the_field(http: httpx.Client, path: str) -> None:
    body, field = _with_prompt(path, "ok \ud800 then")
    err = _error(_post(http, path, _raw(body)), 400, field, "invalid_unicode")
    assert "surrogate" in err["message"]


@pytest.mark.parametrize("path", GEN_ROUTES)
def test_lone_surrogate_in_stop_string_is_400(http: httpx.Client, path: str) -> None:
    body, _ = _with_prompt(path, "x", stop=["fine", "\udfff"])
    _error(_post(http, path, _raw(body)), 400, "stop.1", "invalid_unicode")


@pytest.mark.parametrize("path", GEN_ROUTES)
def test_valid_unicode_and_escaped_surrogate_pairs_are_served(http: httpx.Client, path: str) -> None:
    body, _ = _with_prompt(path, "héllo wörld \U0001f642 ∑", stop=["\U0001f642"])
    assert b"\\ud83d\\ude42" in _raw(body)  # the pair arrives escaped, as two surrogates
    r = _post(http, path, _raw(body))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", (*GEN_ROUTES, "/benchmark"))
def test_body_not_utf8_is_400_saying_so(http: httpx.Client, path: str) -> None:
    err = _error(_post(http, path, b'{"prompt": "caf\xe9 \xff"}'), 400, code="invalid_encoding")
    assert "UTF-8" in err["message"]


@pytest.mark.parametrize("path", (*GEN_ROUTES, "/benchmark"))
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_wrong_content_type_is_415_naming_it(http: httpx.Client, path: str, content_type: str | None) -> None:
    body, _ = _with_prompt(path, "x")
    err = _error(_post(http, path, _raw(body), content_type), 415, code="unsupported_media_type")
    assert (content_type or "no Content-Type") in err["message"] and "application/json" in err["message"]


def test_json_content_type_with_parameters_is_accepted(http: httpx.Client) -> None:
    r = _post(http, "/generate", _raw({"prompt": "x", "max_tokens": 1}), "application/json; charset=utf-8")
    assert r.status_code == 200, r.text


# ----------------------------------------------------------------------------- numbers and structure


@pytest.mark.parametrize("path", GEN_ROUTES)
@pytest.mark.parametrize(
    ("literal", "field"),
    [("NaN", "temperature"), ("Infinity", "top_p"), ("-Infinity", "presence_penalty"), ("1e999", "top_p")],
)
def test_non_finite_numbers_are_400_naming_the_field(http: httpx.Client, path: str, literal: str, field: str) -> None:
    body, _ = _with_prompt(path, "x")
    raw = _raw(body)[:-1] + f', "{field}": {literal}}}'.encode()
    _error(_post(http, path, raw), 400, field, "invalid_value")


def test_non_finite_number_in_benchmark_is_400(http: httpx.Client) -> None:
    _error(_post(http, "/benchmark", b'{"kind": "generation", "temperature": NaN}'), 400, "temperature")


@pytest.mark.parametrize("path", (*GEN_ROUTES, "/benchmark"))
@pytest.mark.parametrize("depth", [40, 100_000])
def test_deeply_nested_json_is_400(http: httpx.Client, path: str, depth: int) -> None:
    raw = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    err = _error(_post(http, path, raw), 400, code="too_deep")
    assert "nested deeper than 32" in err["message"]


@pytest.mark.parametrize("path", GEN_ROUTES)
def test_thousands_of_stop_strings_are_400(http: httpx.Client, path: str) -> None:
    body, _ = _with_prompt(path, "x", stop=[f"s{i}" for i in range(5000)])
    err = _error(_post(http, path, _raw(body)), 400, "stop")
    assert "at most 16" in err["message"]


@pytest.mark.parametrize("path", GEN_ROUTES)
def test_overlong_stop_string_is_400(http: httpx.Client, path: str) -> None:
    body, _ = _with_prompt(path, "x", stop="z" * 10_000)
    _error(_post(http, path, _raw(body)), 400, "stop")


@pytest.mark.parametrize("path", GEN_ROUTES)
def test_prompt_longer_than_the_context_is_400(http: httpx.Client, path: str) -> None:
    body, field = _with_prompt(path, "hello " * 3000)  # ~3000 tokens; the context is 2048
    field = field.split(".")[0]  # chat names the messages as a whole
    _error(_post(http, path, _raw(body)), 400, field, "context_length_exceeded")


# ----------------------------------------------------------------------------- token ids and OpenAI fields


@pytest.mark.parametrize("path", ("/v1/completions", "/v1/chat/completions"))
@pytest.mark.parametrize(
    ("logit_bias", "message"),
    [
        ({str(i): 1.0 for i in range(100_000)}, "at most 300"),
        ({"-5": 1.0}, "not a token id"),
        ({"abc": 1.0}, "not a token id"),
        ({"5": 1000.0}, "outside [-100, 100]"),
    ],
    ids=["huge", "negative", "not-a-number", "bias-out-of-range"],
)
def test_logit_bias_is_bounded_and_checked(http: httpx.Client, path: str, logit_bias: dict, message: str) -> None:
    body, _ = _with_prompt(path, "x", logit_bias=logit_bias)
    err = _error(_post(http, path, _raw(body)), 400, "logit_bias")
    assert message in err["message"]


@pytest.mark.parametrize("ids", [[-1], [3, -7], [10**9], [10**30]], ids=["negative", "one-negative", "big", "huge"])
def test_out_of_range_prompt_token_ids_are_400(http: httpx.Client, ids: list[int]) -> None:
    _error(_post(http, "/generate", _raw({"prompt_token_ids": ids})), 400, "prompt_token_ids")
    _error(_post(http, "/v1/completions", _raw({"prompt": ids})), 400, "prompt")


@pytest.mark.parametrize("path", ("/v1/completions", "/v1/chat/completions"))
@pytest.mark.parametrize("n", [0, -1, 10**6, 10**30])
def test_oversized_n_is_400(http: httpx.Client, path: str, n: int) -> None:
    body, _ = _with_prompt(path, "x", n=n)
    _error(_post(http, path, _raw(body)), 400, "n")


@pytest.mark.parametrize("path", GEN_ROUTES)
def test_too_many_stop_token_ids_is_400(http: httpx.Client, path: str) -> None:
    body, _ = _with_prompt(path, "x", stop_token_ids=list(range(65)))
    _error(_post(http, path, _raw(body)), 400, "stop_token_ids")


# ----------------------------------------------------------------------------- limits are settings


def test_limits_come_from_settings(serve: Any) -> None:
    client = serve(max_stop_strings=2, max_stop_string_chars=3, max_json_depth=4, max_logit_bias=1)
    ok = {"prompt": "x", "max_tokens": 1, "stop": ["a", "bcd"]}
    assert _post(client, "/generate", _raw(ok)).status_code == 200
    err = _error(_post(client, "/generate", _raw({**ok, "stop": ["a", "b", "c"]})), 400, "stop")
    assert "at most 2" in err["message"]
    _error(_post(client, "/generate", _raw({**ok, "stop": ["abcd"]})), 400, "stop")
    _error(_post(client, "/generate", b'{"prompt": [[[["x"]]]]}'), 400, code="too_deep")
    body = {"prompt": "x", "logit_bias": {"1": 1.0, "2": 1.0}}
    assert "at most 1" in _error(_post(client, "/v1/completions", _raw(body)), 400, "logit_bias")["message"]


def test_error_schema_is_in_the_openapi_document(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    assert doc["components"]["schemas"]["ErrorResponse"]["required"] == ["error"]
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)  # validation errors are 400s
            for status in ("400", "401", "413", "415", "429", "500", "503"):
                content = responses[status]["content"]
                assert content == {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


# ----------------------------------------------------------------------------- security


def test_api_key_from_file_environment_or_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("file-key\n")
    assert settings_from_args(["--api-key-file", str(key_file)]).api_key_value() == "file-key"
    monkeypatch.setenv("STREAM_ATTENTION_API_KEY", "env-key")
    assert settings_from_args([]).api_key_value() == "env-key"
    # Two sources would leave one of them silently ignored.
    with pytest.raises(ValueError, match="api_key_file"):
        settings_from_args(["--api-key-file", str(key_file)])
    monkeypatch.delenv("STREAM_ATTENTION_API_KEY")
    key_file.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        settings_from_args(["--api-key-file", str(key_file)])
    with pytest.raises(ValueError, match="cannot read"):
        settings_from_args(["--api-key-file", str(tmp_path / "missing")])


def test_api_key_file_guards_the_routes(serve: Any, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("s3cret")
    client = serve(api_key_file=key_file)
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_api_key_is_compared_in_constant_time(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    client = serve(api_key="right-key")
    assert client.get("/ready", headers={"Authorization": "Bearer wrong-key"}).status_code == 401
    assert client.get("/ready", headers={"Authorization": "Bearer right-key"}).status_code == 200
    assert compared == [(b"wrong-key", b"right-key"), (b"right-key", b"right-key")]


def test_monitoring_routes_need_the_key_unless_public(serve: Any) -> None:
    private = serve(api_key="k")
    for path in ("/metrics", "/memory"):
        _error(private.get(path), 401, code="invalid_api_key")
    public = serve(api_key="k", public_metrics=True)
    assert public.get("/metrics").status_code == 200 and public.get("/memory").status_code == 200
    # Only monitoring opens up.
    _error(public.get("/v1/models"), 401, code="invalid_api_key")
    _error(public.post("/generate", json={"prompt": "x"}), 401, code="invalid_api_key")


def _preflight(client: httpx.Client, origin: str) -> httpx.Response:
    return client.options(
        "/v1/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_cors_is_off_unless_origins_are_configured(http: httpx.Client, serve: Any) -> None:
    origin = "https://ui.example"
    assert "access-control-allow-origin" not in _preflight(http, origin).headers
    assert "access-control-allow-origin" not in http.get("/health", headers={"Origin": origin}).headers

    client = serve(allowed_origins=f"{origin}, https://other.example", api_key="k")
    r = _preflight(client, origin)  # a preflight carries no key, and needs none
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = client.get("/v1/models", headers={"Origin": origin, "Authorization": "Bearer k"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    assert "access-control-allow-origin" not in _preflight(client, "https://evil.example").headers


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.seen: set[logging.LogRecord] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if record not in self.seen:  # one record reaches both loggers when it propagates
            self.seen.add(record)
            self.lines.append(record.getMessage())


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Every log line of the process while the test runs, at every level."""
    handler = _Records()
    loggers = [logging.getLogger(), logging.getLogger("stream_attention")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield handler.lines
    for lg, level in zip(loggers, levels, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)


def _send_marked_prompts(client: httpx.Client, marker: str) -> None:
    for path in GEN_ROUTES:
        body, _ = _with_prompt(path, f"secret {marker}")
        assert _post(client, path, _raw(body)).status_code == 200
        body, _ = _with_prompt(path, f"secret {marker} \ud800")  # refused: still not logged
        assert _post(client, path, _raw(body)).status_code == 400
    body, _ = _with_prompt("/generate", f"{marker} " * 3000)  # too long
    assert _post(client, "/generate", _raw(body)).status_code == 400


def test_prompts_are_never_logged_unless_asked(serve: Any, log_lines: list[str]) -> None:
    _send_marked_prompts(serve(), "quiet-marker-7f3a")
    assert log_lines, "nothing was logged at all: the capture is broken"
    assert not [line for line in log_lines if "quiet-marker-7f3a" in line]

    _send_marked_prompts(serve(log_prompts=True), "loud-marker-91c2")
    logged = [line for line in log_lines if "loud-marker-91c2" in line]
    assert len(logged) == len(GEN_ROUTES)  # one line per accepted request


def test_readme_limits_table_matches_the_settings() -> None:
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| `--([a-z-]+)`(?: / `--[a-z-]+`)? \| ([^|]+) \|", readme, flags=re.M)
    assert len(rows) >= 12
    fields = ServerSettings.model_fields
    for flag, default in rows:
        field = fields[flag.replace("-", "_")]
        if isinstance(field.default, int | float) and not isinstance(field.default, bool):
            assert float(default.strip()) == field.default, flag


# ----------------------------------------------------------------------------- engine refusals


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ("temperature=5.0 is out of range", "temperature"),
        ("prompt_token_ids contain ids outside [0, 4096)", "prompt_token_ids"),
        ("prompt (9 tokens) + max_tokens (99) = 108 exceeds the context length 64", "prompt"),
        ("prompt is empty", "prompt"),
        ("120 tokens exceed max_num_batched_tokens without chunked prefill", None),
        ("", None),
    ],
)
def test_request_errors_name_the_field_they_start_with(message: str, param: str | None) -> None:
    from stream_attention.server.errors import request_error

    err = request_error(ValueError(message))
    assert (err.status, err.param) == (400, param)
    assert err.message == (message or "ValueError")


@pytest.mark.slow
def test_engine_refusal_after_server_validation_is_a_400() -> None:
    # A KV cache of 4 blocks x 16 tokens: the server's context check (2048) passes the
    # request, the engine's capacity check refuses it.
    app = create_app(ServerSettings(_env_file=None, kv_cache_blocks=4, kv_block_size=16, log_level="warning"))
    srv = LiveServer(app)
    try:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            for path in GEN_ROUTES:
                body, _ = _with_prompt(path, "def f(x):", max_tokens=200)
                err = _error(_post(client, path, _raw(body)), 400, code="context_length_exceeded")
                assert "KV cache" in err["message"], err
            body, _ = _with_prompt("/generate", "def f(x):", max_tokens=8)
            assert _post(client, "/generate", _raw(body)).status_code == 200
    finally:
        srv.stop()
