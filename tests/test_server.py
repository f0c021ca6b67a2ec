"""The HTTP server end to end: real uvicorn on loopback, the embedded default model, CPU.

One engine is loaded per test session (by the first app, through its own startup path)
and shared by the other apps, which differ only in server settings (API key, queue
bound). ``tests/test_clients.py`` and ``tests/test_deploy.py`` reuse the same servers
through :func:`shared_server`.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import uvicorn  # noqa: E402

from stream_attention.engine.process_engine import EngineProcess  # noqa: E402
from stream_attention.engine.types import EngineStats, PromptTooLongError, QueueFullError, RequestOutput  # noqa: E402
from stream_attention.server import ServerSettings, create_app  # noqa: E402
from stream_attention.server.settings import build_parser, settings_from_args  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GEN_ROUTES = ("/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions")


# ----------------------------------------------------------------------------- harness


class LiveServer:
    """uvicorn serving ``app`` on a free loopback port, in a background thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (accepted
        # sockets inherit it); without it Nagle + delayed ACK hold SSE events back ~40 ms.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    @property
    def state(self) -> Any:
        return self.app.state.server

    @property
    def engine(self) -> Any:
        return self.state.engine

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.state.ready:
            if self.state.load_error:
                raise RuntimeError(self.state.load_error)
            if time.monotonic() > deadline:
                raise TimeoutError("engine did not load")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


_SERVERS: dict[str, LiveServer] = {}
_LOCK = threading.Lock()

# Small enough that 200 streams queue (exercising the waiting path) on 2 CPU cores.
MAIN_SETTINGS = {"max_num_seqs": 32, "max_queue": 512, "max_n": 64, "benchmark_time_budget": 20.0,
                 "log_level": "warning"}


def _settings(**overrides: Any) -> ServerSettings:
    return ServerSettings(_env_file=None, **{**MAIN_SETTINGS, **overrides})


def shared_server(kind: str = "main", config: pytest.Config | None = None) -> LiveServer:
    """The session's servers, started on first use and stopped when pytest finishes.

    ``main`` builds its engine from settings (the production path); ``auth`` (API key
    ``test-key``) and ``overload`` (queue bound 2) serve that same engine.
    """
    with _LOCK:
        if "main" not in _SERVERS:
            main = LiveServer(create_app(_settings()))
            _SERVERS["main"] = main
            # At interpreter exit the thread pools are gone and the engine could not
            # shut down cleanly: stop with the pytest session instead.
            if config is not None:
                config.add_cleanup(_stop_all)
            else:
                atexit.register(_stop_all)
            main.wait_ready()
        if kind not in _SERVERS:
            engine = _SERVERS["main"].engine
            if kind == "auth":
                app = create_app(_settings(api_key="test-key"), engine=engine)
            elif kind == "overload":
                app = create_app(_settings(max_queue=2, retry_after=1), engine=engine)
            else:
                raise KeyError(kind)
            _SERVERS[kind] = LiveServer(app)
        return _SERVERS[kind]


def _stop_all() -> None:
    while _SERVERS:
        _SERVERS.popitem()[1].stop()


def wait_idle(engine: Any, timeout: float = 30.0) -> EngineStats:
    """Wait until nothing runs or waits; returns the stats then."""
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if s.running == 0 and s.waiting == 0:
            return s
        if time.monotonic() > deadline:
            return s
        time.sleep(0.05)


def sse_events(lines: list[str]) -> list[Any]:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.fixture(scope="module")
def srv(request: pytest.FixtureRequest) -> LiveServer:
    return shared_server("main", request.config)


@pytest.fixture(scope="module")
def http(srv: LiveServer) -> httpx.Client:
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        yield client


# ----------------------------------------------------------------------------- settings


def test_settings_priority_flags_over_env_over_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / ".env"
    # Names of the attention modules' config share the prefix and must not be rejected.
    env_file.write_text("STREAM_ATTENTION_PORT=9100\nSTREAM_ATTENTION_MAX_QUEUE=7\nSTREAM_ATTENTION_NUM_HEADS=32\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STREAM_ATTENTION_MAX_QUEUE", "9")
    monkeypatch.setenv("STREAM_ATTENTION_KV_CACHE_DTYPE", "bfloat16")
    s = settings_from_args(["--host", "0.0.0.0", "--no-benchmark-enabled"])
    assert s.port == 9100  # .env
    assert s.max_waiting == 9  # env beats .env (--max-queue is the old name of --max-waiting)
    assert s.kv_cache_dtype == "bf16"  # alias normalised
    assert s.host == "0.0.0.0" and s.benchmark_enabled is False  # flags
    assert settings_from_args(["--max-queue", "3"]).max_waiting == 3  # flag beats env
    monkeypatch.setenv("STREAM_ATTENTION_API_KEY", "")
    assert settings_from_args([]).api_key is None
    with pytest.raises(Exception, match="device"):
        ServerSettings(_env_file=None, device="tpu")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--kv-cache-dtype", "int3"])
    help_text = build_parser().format_help()
    for flag in (
        "--model",
        "--dtype",
        "--kv-cache-dtype",
        "--kv-compression",
        "--max-queue",
        "--max-model-len",
        "--api-key",
    ):
        assert flag in help_text


def test_engine_config_from_settings() -> None:
    from stream_attention.server.engine_bridge import engine_config

    cfg = engine_config(_settings(max_queue=17, kv_block_size=32, kv_cache_blocks=100, device="cpu"))
    assert (cfg.max_waiting, cfg.block_size, cfg.num_kv_blocks, cfg.device, cfg.max_num_seqs) == (
        17,
        32,
        100,
        "cpu",
        32,
    )


def test_engine_settings_are_the_engine_config_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every EngineConfig field is a server setting of the same name, default and help; the
    old server names still work as flags and variables; out-of-range values name the field."""
    import dataclasses

    from stream_attention.engine import EngineConfig

    fields = ServerSettings.model_fields
    for f in dataclasses.fields(EngineConfig):
        assert f.name in fields, f.name
        assert fields[f.name].default == f.default, f.name
        assert fields[f.name].description == f.metadata["help"], f.name
    help_text = build_parser().format_help()
    for flag in ("--max-waiting", "--block-size", "--num-kv-blocks", "--gpu-memory-fraction", "--pipeline-steps"):
        assert flag in help_text
    monkeypatch.setenv("STREAM_ATTENTION_KV_BLOCK_SIZE", "64")
    monkeypatch.setenv("STREAM_ATTENTION_KV_CACHE_MEMORY_FRACTION", "0.5")
    s = settings_from_args(["--kv-cache-blocks", "0", "--no-pipeline-steps"])
    assert (s.block_size, s.gpu_memory_fraction, s.num_kv_blocks, s.pipeline_steps) == (64, 0.5, None, False)
    assert ServerSettings(_env_file=None).max_waiting == EngineConfig().max_waiting  # one default
    with pytest.raises(Exception, match="max_num_seqs"):
        ServerSettings(_env_file=None, max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0).validate()


# ----------------------------------------------------------------------------- basics


def test_health_ready_models_and_request_ids(http: httpx.Client, srv: LiveServer) -> None:
    r = http.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert len(r.headers["x-request-id"]) == 32
    r = http.get("/ready", headers={"X-Request-ID": "my-trace-1"})
    assert r.status_code == 200 and r.json()["status"] == "ready"
    assert r.headers["x-request-id"] == "my-trace-1"
    # An ID that could smuggle text into logs is replaced, not echoed (h11 lets it through to
    # the app, which answers with a fresh ID; httptools refuses the request itself).
    assert http.get("/health", headers={"X-Request-ID": "bad id\x7f"}).headers.get("x-request-id") != "bad id\x7f"
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    card = models["data"][0]
    assert card["id"] == srv.state.model_name and card["max_model_len"] == srv.state.max_model_len
    r = http.post("/generate", json={"prompt": "hi", "max_tokens": 2}, headers={"X-Request-ID": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42"
    assert r.json()["request_id"].startswith("trace-42-")  # unique engine id, client's as prefix


def test_generate_json(http: httpx.Client) -> None:
    body = {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0}
    a = http.post("/generate", json=body).json()
    b = http.post("/generate", json=body).json()
    assert a["generated_text"] == b["generated_text"] and a["token_ids"] == b["token_ids"]  # greedy
    assert a["finish_reason"] in ("length", "stop")
    assert a["usage"]["completion_tokens"] == len(a["token_ids"]) <= 12
    assert a["usage"]["total_tokens"] == a["usage"]["prompt_tokens"] + a["usage"]["completion_tokens"]
    assert a["timings"]["time_to_first_token_s"] > 0 and a["timings"]["e2e_s"] >= a["timings"]["time_to_first_token_s"]
    # TGI's request shape and token-id prompts reach the same engine call.
    tgi = http.post(
        "/generate", json={"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 12, "do_sample": False}}
    )
    assert tgi.json()["token_ids"] == a["token_ids"]
    ids = http.post("/generate", json={"prompt_token_ids": [5, 6, 7, 8], "max_tokens": 3, "ignore_eos": True}).json()
    assert ids["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    full = http.post("/generate", json={**body, "return_full_text": True}).json()
    assert full["generated_text"] == "The quick brown fox" + a["generated_text"]
    # Seeded sampling repeats; logprobs come back per token.
    s1 = http.post("/generate", json={**body, "temperature": 1.0, "seed": 7, "logprobs": 2}).json()
    s2 = http.post("/generate", json={**body, "temperature": 1.0, "seed": 7, "logprobs": 2}).json()
    assert s1["token_ids"] == s2["token_ids"]
    assert len(s1["logprobs"]) == len(s1["token_ids"]) and all(lp["logprob"] <= 0 for lp in s1["logprobs"])


def test_generate_stop_string(http: httpx.Client) -> None:
    base = http.post("/generate", json={"prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True}).json()
    text = base["generated_text"]
    if len(text.strip()) < 4:
        pytest.skip("model produced too little text to pick a stop string")
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = http.post(
        "/generate", json={"prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True, "stop": [stop]}
    ).json()
    assert cut["finish_reason"] == "stop"
    assert cut["generated_text"] == text[: text.index(stop)]


def test_generate_stream_sse(http: httpx.Client) -> None:
    body = {"prompt": "Streaming works when", "max_tokens": 10, "ignore_eos": True}
    whole = http.post("/generate", json=body).json()
    with http.stream("POST", "/generate_stream", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(list(r.iter_lines()))
    assert events and all(isinstance(e, dict) for e in events)
    assert [e["index"] for e in events] == list(range(len(events)))
    final = events[-1]
    assert final["generated_text"] == whole["generated_text"] and final["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == 10
    assert all(e["generated_text"] is None for e in events[:-1])
    assert "".join(e["token"]["text"] for e in events if e["token"]) == whole["generated_text"]
    assert [t for e in events for t in e["token_ids"]] == whole["token_ids"]


def test_openai_client_completions_and_chat(srv: LiveServer) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    comp = client.completions.create(model=model, prompt="Hello there", max_tokens=8, temperature=0)
    assert comp.choices[0].finish_reason in ("length", "stop") and comp.usage.completion_tokens <= 8
    chunks = list(
        client.completions.create(
            model=model,
            prompt="Hello there",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == comp.choices[0].text
    assert chunks[-1].usage.completion_tokens == comp.usage.completion_tokens

    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    text = chat.choices[0].message.content
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == text and finish == chat.choices[0].finish_reason
    assert usage.completion_tokens == chat.usage.completion_tokens
    lp = client.chat.completions.create(
        model=model, messages=messages, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    assert len(lp.choices[0].logprobs.content) == lp.usage.completion_tokens
    assert len(lp.choices[0].logprobs.content[0].top_logprobs) == 2

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=messages, temperature=3.5)
    assert "temperature" in str(err.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)


# ----------------------------------------------------------------------------- benchmark


def test_benchmark_kernel_generation_and_busy(http: httpx.Client, srv: LiveServer) -> None:
    small = {"seq_lens": [32, 64], "batch": 1, "heads": 2, "dim": 32, "iters": 2, "warmup": 1}
    r = http.post("/benchmark", json=small)
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["kind"] == "kernel" and not res["truncated"]
    impls = {row["impl"] for row in res["rows"]}
    assert "fused" in impls and any(i.startswith("sdpa") for i in impls)
    assert all("time_ms" in row for row in res["rows"]) and "Fused(ms)" in res["table"]

    gen = http.post(
        "/benchmark", json={"kind": "generation", "num_requests": 4, "prompt_tokens": 16, "max_tokens": 4}
    ).json()
    assert gen["completed"] == 4 and gen["output_tokens"] == 16 and gen["output_tokens_per_s"] > 0

    too_big = http.post("/benchmark", json={"seq_lens": [100000]})
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "seq_lens"
    too_wide = http.post("/benchmark", json={"seq_lens": [8192], "batch": 64, "heads": 128, "dim": 256})
    assert too_wide.status_code == 400 and "MiB" in too_wide.json()["error"]["message"]
    too_slow = http.post("/benchmark", json={"seq_lens": [4096], "batch": 2, "heads": 8, "dim": 128, "iters": 200})
    assert too_slow.status_code == 400 and "FLOPs" in too_slow.json()["error"]["message"]

    # A long benchmark runs in a worker thread: a second one is refused, and generation
    # keeps being served meanwhile.
    long = {"seq_lens": [512, 768, 1024], "heads": 8, "dim": 64, "iters": 12, "warmup": 2, "causal": False}
    with httpx.Client(base_url=srv.url, timeout=120) as other:
        worker = threading.Thread(target=lambda: other.post("/benchmark", json=long))
        worker.start()
        deadline = time.monotonic() + 10
        while not srv.app.state.benchmark._lock.locked() and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = http.post("/benchmark", json=small)
        t0 = time.perf_counter()
        live = http.post("/generate", json={"prompt": "still serving", "max_tokens": 4})
        live_s = time.perf_counter() - t0
        worker.join(120)
    assert busy.status_code == 429 and busy.headers["retry-after"] and busy.json()["error"]["code"] == "benchmark_busy"
    assert live.status_code == 200 and live_s < 15


# ----------------------------------------------------------------------------- metrics


REQUIRED_METRICS = [
    "stream_attention_http_requests_total",
    "stream_attention_time_to_first_token_seconds_bucket",
    "stream_attention_inter_token_latency_seconds_bucket",
    "stream_attention_e2e_request_latency_seconds_bucket",
    "stream_attention_prompt_tokens_total",
    "stream_attention_generation_tokens_total",
    "stream_attention_requests_running",
    "stream_attention_requests_waiting",
    "stream_attention_kv_cache_blocks_used",
    "stream_attention_kv_cache_blocks_capacity",
    "stream_attention_kv_cache_usage_ratio",
    "stream_attention_preemptions_total",
    "stream_attention_kv_compression_ratio",
    "stream_attention_kv_bytes_saved",
    "stream_attention_kv_blocks_evicted_total",
    "stream_attention_host_rss_bytes",
]
# Families that exist with no samples on a CPU server (no CUDA device touched).
CUDA_FAMILIES = [
    "stream_attention_cuda_memory_allocated_bytes",
    "stream_attention_cuda_memory_reserved_bytes",
    "stream_attention_cuda_memory_peak_allocated_bytes",
]


def scrape(http: httpx.Client) -> tuple[str, dict[str, list[Any]], set[str]]:
    from prometheus_client.parser import text_string_to_metric_families

    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples: dict[str, list[Any]] = {}
    families = set()
    for fam in text_string_to_metric_families(r.text):
        families.add(fam.name)
        for s in fam.samples:
            samples.setdefault(s.name, []).append(s)
    return r.text, samples, families


def test_metrics_exposition(http: httpx.Client) -> None:
    _, before, _ = scrape(http)
    http.post("/generate", json={"prompt": "count me", "max_tokens": 5, "ignore_eos": True})
    text, after, families = scrape(http)
    for name in REQUIRED_METRICS:
        assert name in after, name
    for name in CUDA_FAMILIES:
        assert name in families, name

    def total(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
        return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))

    assert (
        total(after, "stream_attention_generation_tokens_total")
        >= total(before, "stream_attention_generation_tokens_total") + 5
    )
    assert total(after, "stream_attention_time_to_first_token_seconds_count") > total(
        before, "stream_attention_time_to_first_token_seconds_count"
    )
    assert (
        total(after, "stream_attention_inter_token_latency_seconds_count")
        >= total(before, "stream_attention_inter_token_latency_seconds_count") + 4
    )
    assert total(after, "stream_attention_http_requests_total", route="/generate", status="200") >= 1
    assert total(after, "stream_attention_kv_cache_blocks_capacity") > 0
    # Raw paths never become labels: unknown URLs share one series.
    http.get("/no/such/path/12345")
    _, again, _ = scrape(http)
    routes = {s.labels["route"] for s in again["stream_attention_http_requests_total"]}
    assert "/no/such/path/12345" not in routes and "other" in routes

    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr


def test_memory_snapshot(http: httpx.Client) -> None:
    snap = http.get("/memory").json()
    assert snap["host"]["rss_bytes"] > 10_000_000
    assert snap["kv_cache"]["blocks_total"] > 0 and 0.0 <= snap["kv_cache"]["usage"] <= 1.0
    assert isinstance(snap["devices"], list) and snap["engine"]["kv_blocks_total"] == snap["kv_cache"]["blocks_total"]
    assert http.get("/memory", params={"reset_peak": "true"}).status_code == 200


# ----------------------------------------------------------------------------- bad input

LONG_IDS = [5] * 2100  # over the default model's 2048-token context

MALFORMED: list[tuple[str, str, Any, int, str | None]] = [
    # (method, path, JSON body or raw bytes, status, param named in the error)
    ("POST", "/generate", b"{not json", 400, None),
    ("POST", "/generate", b"[1, 2]", 400, None),
    ("POST", "/generate", b"", 400, None),
    ("POST", "/generate", {"prompt": "x", "temprature": 0.5}, 400, "temprature"),
    ("POST", "/generate", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("POST", "/generate", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("POST", "/generate", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("POST", "/generate", {"prompt": "x", "top_k": -5}, 400, "top_k"),
    ("POST", "/generate", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("POST", "/generate", {"prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    ("POST", "/generate", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("POST", "/generate", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("POST", "/generate", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("POST", "/generate", {"prompt": "x", "stop": ["s"] * 17}, 400, "stop"),
    ("POST", "/generate", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("POST", "/generate", {"max_tokens": 4}, 400, "prompt"),
    ("POST", "/generate", {"prompt": "x", "prompt_token_ids": [1]}, 400, "prompt"),
    ("POST", "/generate", {"prompt_token_ids": []}, 400, "prompt_token_ids"),
    ("POST", "/generate", {"prompt_token_ids": [-1]}, 400, "prompt_token_ids"),
    ("POST", "/generate", {"prompt_token_ids": [10**9]}, 400, "prompt_token_ids"),
    ("POST", "/generate", {"prompt_token_ids": LONG_IDS}, 400, "prompt"),
    ("POST", "/generate", {"prompt_token_ids": [5] * 2000, "max_tokens": 100}, 400, "max_tokens"),
    ("POST", "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2, "bogus": 1}}, 400, "bogus"),
    ("POST", "/generate_stream", {"prompt": "x", "temperature": 1000}, 400, "temperature"),
    ("POST", "/generate_stream", {"prompt_token_ids": LONG_IDS}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("POST", "/v1/completions", {"prompt": "x", "n": 2, "best_of": 3}, 400, "best_of"),
    ("POST", "/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1.0}}, 400, "logit_bias"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    ("POST", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "x", "foo": 1}, 400, "foo"),
    ("POST", "/v1/completions", {"prompt": "x", "model": "gpt-17"}, 404, "model"),
    ("POST", "/v1/completions", {"prompt": LONG_IDS}, 400, "prompt"),
    ("POST", "/v1/completions", {}, 400, "prompt"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        400,
        "tools.0.function",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 30},
        400,
        "top_logprobs",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "stream": "maybe"},
        400,
        "stream",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
        400,
        "max_completion_tokens",
    ),
    ("POST", "/benchmark", {"kind": "quantum"}, 400, "kind"),
    ("POST", "/benchmark", {"seq_lens": [64], "heads": 0}, 400, "heads"),
    ("POST", "/benchmark", {"seq_lens": [64], "warp": 4}, 400, "warp"),
    ("POST", "/benchmark", {"kind": "generation", "num_requests": 10**4}, 400, "num_requests"),
    ("GET", "/generate", None, 405, None),
    ("GET", "/no-such-route", None, 404, None),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param"), MALFORMED, ids=[f"{m[1]}-{i}" for i, m in enumerate(MALFORMED)]
)
def test_malformed_requests(
    http: httpx.Client, method: str, path: str, body: Any, status: int, param: str | None
) -> None:
    if isinstance(body, bytes):
        r = http.request(method, path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.request(method, path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param, err
        assert param.split(".")[0] in err["message"] or param in err["message"], err


def test_request_body_limit(srv: LiveServer) -> None:
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        big = {"prompt": "x" * (srv.state.settings.max_request_bytes + 10)}
        r = client.post("/generate", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"

        def chunks():  # no Content-Length: the limit is enforced while reading
            for _ in range(5):
                yield b" " * (srv.state.settings.max_request_bytes // 4)

        r = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413


# ----------------------------------------------------------------------------- disconnects and load


def test_disconnect_aborts_and_frees_blocks(srv: LiveServer) -> None:
    engine = srv.engine
    assert wait_idle(engine).kv_blocks_used == 0
    long_body = {"prompt": "a long story", "max_tokens": 1500, "ignore_eos": True}
    with (
        httpx.Client(base_url=srv.url, timeout=60) as client,
        client.stream("POST", "/generate_stream", json=long_body) as r,
    ):
        lines = r.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: "):
                got += 1
                if got == 3:
                    break
        assert engine.stats().running == 1 and engine.stats().kv_blocks_used > 0
    # Leaving the block closed the connection; 1500 tokens would take minutes here.
    s = wait_idle(engine, timeout=10)
    assert s.running == 0 and s.kv_blocks_used == 0

    # Non-streaming: the client gives up (read timeout) while the server generates.
    with (
        httpx.Client(base_url=srv.url, timeout=httpx.Timeout(1.0, connect=5.0)) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        client.post("/generate", json=long_body)
    s = wait_idle(engine, timeout=10)
    assert s.running == 0 and s.kv_blocks_used == 0


async def _stream_one(client: httpx.AsyncClient, i: int, rng: random.Random) -> dict[str, Any]:
    """One stream; about a third hang up early (before headers, or after a few events)."""
    kind = i % 3
    max_tokens = rng.randint(4, 12)
    if kind == 0:
        path, body = (
            "/generate_stream",
            {"prompt_token_ids": [rng.randrange(10, 4000) for _ in range(rng.randint(4, 40))]},
        )
    elif kind == 1:
        path, body = "/v1/completions", {"prompt": f"request {i}", "stream": True}
    else:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"hello {i}"}], "stream": True}
    body.update(max_tokens=max_tokens, ignore_eos=True, temperature=0.8, seed=i)
    hang_up = rng.random()
    result: dict[str, Any] = {
        "i": i,
        "status": None,
        "events": 0,
        "done": False,
        "dropped": False,
        "max_tokens": max_tokens,
    }

    async def run() -> None:
        async with client.stream("POST", path, json=body) as r:
            result["status"] = r.status_code
            if r.status_code != 200:
                await r.aread()
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                result["events"] += 1
                data = line[6:]
                if data == "[DONE]" or (path == "/generate_stream" and json.loads(data)["generated_text"] is not None):
                    if path == "/generate_stream":
                        result["tokens"] = json.loads(data)["usage"]["completion_tokens"]
                    result["done"] = True
                if hang_up < 0.2 and result["events"] >= 2:
                    result["dropped"] = True
                    return

    if hang_up > 0.85:
        # Give up before the first byte: the request may still be queued.
        try:
            await asyncio.wait_for(run(), timeout=rng.uniform(0.05, 1.0))
        except TimeoutError:
            result["dropped"] = True
    else:
        await run()
    return result


def test_many_concurrent_streams_with_random_disconnects(srv: LiveServer) -> None:
    engine = srv.engine
    wait_idle(engine)
    aborts_before = srv.state.metrics.finished.labels(finish_reason="abort")._value.get()
    n = 200
    rng = random.Random(1234)

    async def main() -> list[dict[str, Any]]:
        limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
        async with httpx.AsyncClient(base_url=srv.url, timeout=180, limits=limits) as client:
            return await asyncio.gather(*(_stream_one(client, i, rng) for i in range(n)))

    t0 = time.perf_counter()
    results = asyncio.run(main())
    elapsed = time.perf_counter() - t0
    statuses = [r["status"] for r in results if r["status"] is not None]
    assert not [s for s in statuses if s >= 500], statuses
    assert all(s == 200 for s in statuses), sorted(set(statuses))
    kept = [r for r in results if not r["dropped"]]
    dropped = [r for r in results if r["dropped"]]
    assert len(dropped) >= 20 and len(kept) >= 100
    assert all(r["done"] for r in kept), [r for r in kept if not r["done"]][:3]
    assert all(r["tokens"] == r["max_tokens"] for r in kept if "tokens" in r)
    s = wait_idle(engine, timeout=30)
    assert (s.running, s.waiting, s.kv_blocks_used) == (0, 0, 0), s
    assert srv.state.metrics.finished.labels(finish_reason="abort")._value.get() > aborts_before
    assert elapsed < 150


def test_overload_answers_429_with_retry_after(request: pytest.FixtureRequest) -> None:
    over = shared_server("overload", request.config)
    wait_idle(over.engine)

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=over.url, timeout=120, limits=httpx.Limits(max_connections=100)
        ) as client:
            return await asyncio.gather(
                *(
                    client.post("/generate", json={"prompt": f"load {i}", "max_tokens": 48, "ignore_eos": True})
                    for i in range(100)
                )
            )

    t0 = time.perf_counter()
    responses = asyncio.run(main())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    rejected = [r for r in responses if r.status_code == 429]
    # How many get in depends on how fast the engine drains the queue; both outcomes occur.
    assert rejected and codes.count(200) >= 2
    assert all(r.json()["usage"]["completion_tokens"] == 48 for r in responses if r.status_code == 200)
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full" for r in rejected)
    assert time.perf_counter() - t0 < 90
    s = wait_idle(over.engine)
    assert s.kv_blocks_used == 0


def test_api_key_on_every_route_but_health(request: pytest.FixtureRequest) -> None:
    auth = shared_server("auth", request.config)
    with httpx.Client(base_url=auth.url, timeout=60) as client:
        assert client.get("/health").status_code == 200
        for method, path in (
            ("GET", "/ready"),
            ("GET", "/metrics"),
            ("GET", "/memory"),
            ("GET", "/v1/models"),
            ("POST", "/generate"),
        ):
            r = client.request(method, path, json={"prompt": "x"} if method == "POST" else None)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"] == "Bearer" and r.json()["error"]["code"] == "invalid_api_key"
        bad = client.get("/ready", headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401
        good = {"Authorization": "Bearer test-key"}
        assert client.get("/ready", headers=good).status_code == 200
        assert client.post("/generate", json={"prompt": "x", "max_tokens": 2}, headers=good).status_code == 200
    openai = pytest.importorskip("openai")
    ok = openai.OpenAI(base_url=auth.url + "/v1", api_key="test-key", max_retries=0)
    assert (
        ok.completions.create(model=ok.models.list().data[0].id, prompt="x", max_tokens=2).usage.completion_tokens >= 1
    )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=auth.url + "/v1", api_key="nope", max_retries=0).models.list()


# ----------------------------------------------------------------------------- engine faults (fake engine)


class _FakeTokenizer:
    chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    all_special_ids: list[int] = []

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 100 for c in text]}

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool, add_generation_prompt: bool) -> str:
        return "".join(m["content"] for m in messages)

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(97 + i % 26) for i in ids)

    def __len__(self) -> int:
        return 100


class FaultyEngine:
    """An engine client (the ``EngineClient`` protocol) that fails in the ways the HTTP
    layer must map."""

    max_model_len = 64
    model_name = "faulty"
    device = "cpu"
    config = None

    def __init__(self, fault: str) -> None:
        self.fault = fault
        self.tokenizer = _FakeTokenizer()
        self.aborted: list[str] = []
        self.is_running = True
        self.failure: BaseException | None = None

    async def start(self) -> None:
        pass

    async def shutdown(self, *, drain: bool = True, timeout: float | None = 30.0) -> None:
        pass

    def memory_report(self) -> None:
        return None

    async def stream_batches(self, request: Any):
        async for out in self.stream(request):
            yield [out]

    async def stream(self, request: Any):
        if self.fault == "queue_full":
            raise QueueFullError("engine queue is full")
        if self.fault == "too_long":
            raise PromptTooLongError("prompt + max_tokens exceeds the KV cache (48 tokens)")
        if self.fault == "dead":
            from stream_attention.engine import EngineDeadError

            raise EngineDeadError("engine loop stopped")
        out = RequestOutput(request.request_id, request.prompt_token_ids, [1], "b", [1], "b", False)
        yield out
        raise RuntimeError("engine step failed: CUDA error")

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(kv_blocks_total=10)


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ("queue_full", 429, "queue_full"),
        ("too_long", 400, "context_length_exceeded"),
        ("dead", 503, "engine_unavailable"),
    ],
)
def test_engine_refusals_map_to_http_status(fault: str, status: int, code: str) -> None:
    srv = LiveServer(create_app(_settings(), engine=FaultyEngine(fault)))
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            for path, body in (
                ("/generate", {"prompt": "abc"}),
                ("/generate_stream", {"prompt": "abc"}),
                (
                    "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "abc"}], "stream": True, "max_tokens": 4},
                ),
            ):
                r = client.post(path, json=body)
                assert r.status_code == status, (path, r.text)
                assert r.json()["error"]["code"] == code
                if status in (429, 503):
                    assert r.headers["retry-after"] == "1"
    finally:
        srv.stop()


def test_engine_failure_mid_stream_becomes_error_event_and_not_ready_is_503() -> None:
    engine = FaultyEngine("mid_stream")
    srv = LiveServer(create_app(_settings(), engine=engine))
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            with client.stream("POST", "/generate_stream", json={"prompt": "abc", "max_tokens": 8}) as r:
                assert r.status_code == 200
                events = sse_events(list(r.iter_lines()))
            assert events[0]["token"]["text"] == "b"
            assert events[-1]["error"]["code"] == "engine_error"
            r = client.post("/generate", json={"prompt": "abc", "max_tokens": 8})
            assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
            # The engine ended both requests itself; they count as errors, not aborts.
            assert srv.state.metrics.finished.labels(finish_reason="error")._value.get() == 2
            assert engine.aborted == []
    finally:
        srv.stop()


def test_dead_engine_fails_health_and_readiness() -> None:
    from stream_attention.engine import EngineDeadError

    engine = FaultyEngine("dead")
    engine.is_running = False  # the engine has stopped for good
    engine.failure = EngineDeadError("engine loop stopped")
    srv = LiveServer(create_app(_settings(), engine=engine))
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            assert client.get("/health").status_code == 503
            r = client.get("/ready")
            assert r.status_code == 503 and r.json()["status"] == "failed"
    finally:
        srv.stop()


def test_not_ready_while_loading_and_load_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    from stream_attention.server import engine_bridge

    release = threading.Event()
    monkeypatch.setattr(engine_bridge, "build_engine", lambda settings, on_give_up=None: release.wait(60) and None)
    srv = LiveServer(create_app(_settings()))
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            assert client.get("/health").status_code == 200
            r = client.get("/ready")
            assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["retry-after"]
            r = client.post("/generate", json={"prompt": "x"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    finally:
        release.set()  # a model load cannot be interrupted: shutdown waits for it
        srv.stop()

    def broken(settings: ServerSettings, on_give_up: Any = None) -> None:
        raise OSError("no such model: /nowhere")

    monkeypatch.setattr(engine_bridge, "build_engine", broken)
    failures: list[BaseException] = []
    srv = LiveServer(create_app(_settings(), on_load_failure=failures.append))
    try:
        deadline = time.monotonic() + 10
        while not failures and time.monotonic() < deadline:
            time.sleep(0.02)
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            r = client.get("/ready")
            assert r.status_code == 503 and r.json()["status"] == "failed" and "/nowhere" in r.json()["error"]
        assert isinstance(failures[0], OSError)
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- batched delivery


class _StepEngine:
    """``LLMEngine``'s surface for :class:`AsyncEngine`: a step gives every running request
    one token, and runs only when the test releases it."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.config = SimpleNamespace(max_waiting=1 << 20)
        self.scheduler = SimpleNamespace(waiting=[])
        self.tokenizer = _FakeTokenizer()
        self.max_model_len = 1 << 10
        self.model_name = "steps"
        self.device = "cpu"
        self.running: dict[str, tuple[Any, list[int]]] = {}
        self._pending: list[Any] = []
        self.gate = threading.Semaphore(0)

    def validate(self, req: Any) -> None:
        pass

    def add_request(self, req: Any, stream: bool = True, bounded: bool = True) -> str:
        self.running[req.request_id] = (req, [])
        return req.request_id

    def abort(self, request_id: str) -> bool:
        return self.running.pop(request_id, None) is not None

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.running))

    def step(self) -> list[RequestOutput]:
        from stream_attention.engine.types import FinishReason

        if not self.gate.acquire(timeout=0.05):
            return []
        outs = []
        for rid, (req, ids) in list(self.running.items()):
            ids.append(len(ids) + 1)
            done = len(ids) >= req.params.max_tokens
            if done:
                del self.running[rid]
            text = "".join(chr(96 + t) for t in ids)
            outs.append(
                RequestOutput(rid, req.prompt_token_ids, list(ids), text, [ids[-1]], text[-1], done,
                              FinishReason.LENGTH if done else None)
            )  # fmt: skip
        return outs


def test_async_engine_hands_over_steps_in_batches() -> None:
    """Steps that finish while the event loop is busy reach the consumer as one batch (one
    wake-up), complete and in order; ``stream`` still yields them one by one."""
    from stream_attention.engine import AsyncEngine, Request, SamplingParams

    fake = _StepEngine()
    engine = AsyncEngine(engine=fake)

    async def run() -> tuple[list[list[str]], list[str], int]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        real = loop.call_soon_threadsafe

        def counting(callback: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal wakeups
            wakeups += 1
            return real(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        try:
            batched = engine.stream_batches(Request("a", [5], SamplingParams(max_tokens=6)))
            single = engine.stream(Request("b", [5], SamplingParams(max_tokens=6)))
            first = asyncio.ensure_future(batched.__anext__())
            second = asyncio.ensure_future(single.__anext__())
            await asyncio.sleep(0.1)  # both submitted
            fake.gate.release()
            got_a = [[o.delta_text for o in await first]]
            got_b = [(await second).delta_text]
            wakeups = 0
            # Four steps while this loop does not run: one wake-up brings them all.
            for _ in range(4):
                fake.gate.release()
            deadline = time.monotonic() + 30
            while sum(map(len, engine._outbox.values())) < 8 and time.monotonic() < deadline:
                time.sleep(0.01)  # 4 steps x 2 requests handed over, not yet taken by this loop
            burst = await batched.__anext__()
            got_a.append([o.delta_text for o in burst])
            for _ in range(4):
                got_b.append((await single.__anext__()).delta_text)
            woken = wakeups
            fake.gate.release()
            async for batch in batched:
                got_a.append([o.delta_text for o in batch])
                if batch[-1].finished:
                    break
                fake.gate.release()
            async for out in single:
                got_b.append(out.delta_text)
                if out.finished:
                    break
                fake.gate.release()
            return got_a, got_b, woken
        finally:
            loop.call_soon_threadsafe = real  # type: ignore[method-assign]
            await engine.shutdown()

    got_a, got_b, wakeups = asyncio.run(run())
    assert got_a[0] == ["a"] and got_a[1] == ["b", "c", "d", "e"], got_a
    assert [t for batch in got_a for t in batch] == list("abcdef")
    assert got_b == list("abcdef")
    assert wakeups == 1


class _BurstEngine(FaultyEngine):
    """Outputs arrive in bursts (the event loop behind the engine): ``stream_batches``."""

    def __init__(self) -> None:
        super().__init__("none")
        self.model_name = "burst"

    async def stream_batches(self, request: Any):
        from stream_attention.engine.types import FinishReason

        rid, prompt = request.request_id, request.prompt_token_ids
        texts = ['a"', "\\b", "\n", "é", "\x01", "z"]
        ids: list[int] = []
        text = ""

        def out(i: int, final: bool = False) -> RequestOutput:
            nonlocal text
            ids.append(10 + i)
            text += texts[i]
            return RequestOutput(rid, prompt, list(ids), text, [10 + i], texts[i], final,
                                 FinishReason.LENGTH if final else None)  # fmt: skip

        yield [out(0)]
        await asyncio.sleep(0.01)
        yield [out(1), out(2), out(3)]
        await asyncio.sleep(0.01)
        yield [out(4), out(5, final=True)]


def test_sse_bursts_become_one_event_per_delta_in_order() -> None:
    from stream_attention.server.routes_generate import _token_event
    from stream_attention.server.sse import event

    texts = ['a"', "\\b", "\n", "é", "\x01", "z"]
    # The per-token template writes exactly what the generic encoder writes.
    for i, t in enumerate(texts):
        for ids, special in (([7], set()), ([7], {7}), ([3, 4, 7], set())):
            data = {
                "index": i,
                "token": {"id": ids[-1], "text": t, "logprob": None, "special": ids[-1] in special},
                "token_ids": ids,
                "generated_text": None,
                "details": None,
            }
            assert _token_event(i, ids, t, special) == event(data)

    srv = LiveServer(create_app(_settings(), engine=_BurstEngine()))
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            with client.stream("POST", "/generate_stream", json={"prompt": "abc", "max_tokens": 6}) as r:
                assert r.status_code == 200
                events = sse_events(list(r.iter_lines()))
            assert [e["index"] for e in events] == list(range(6))
            assert [e["token"]["text"] for e in events] == texts
            assert [e["token_ids"] for e in events] == [[10 + i] for i in range(6)]
            assert all(e["generated_text"] is None for e in events[:-1])
            final = events[-1]
            assert final["generated_text"] == "".join(texts) and final["finish_reason"] == "length"
            assert final["usage"]["completion_tokens"] == 6

            body = {"prompt": "abc", "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}}
            with client.stream("POST", "/v1/completions", json=body) as r:
                chunks = sse_events(list(r.iter_lines()))
            assert chunks[-1] == "[DONE]" and chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] == 6
            texted = chunks[:-2]
            assert [c["choices"][0]["text"] for c in texted] == texts
            assert [c["choices"][0]["finish_reason"] for c in texted] == [None] * 5 + ["length"]
            assert all(c["usage"] is None and c["model"] == "burst" for c in texted)

            chat = {"messages": [{"role": "user", "content": "abc"}], "max_tokens": 6, "stream": True}
            with client.stream("POST", "/v1/chat/completions", json=chat) as r:
                chunks = sse_events(list(r.iter_lines()))
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]] == texts
            assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1] == "[DONE]"
            assert len({c["id"] for c in chunks[:-1]}) == 1
        # Six tokens in three bursts: six ITL/TTFT samples per request, whatever the bursts.
        m = srv.state.metrics
        assert m.itl.count == 3 * 5 and m.ttft._sum.get() > 0  # noqa: SLF001
    finally:
        srv.stop()


def test_token_histogram_exposition_matches_prometheus_histogram() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from stream_attention.server.metrics import ITL_BUCKETS, TokenHistogram

    plain, fast = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("x_seconds", "doc", buckets=ITL_BUCKETS, registry=plain)
    ours = TokenHistogram("x_seconds", "doc", ITL_BUCKETS)
    fast.register(ours)
    values = [0.0, 0.001, 0.0025, 0.004, 0.03, 0.2, 5.0, 7.5] + [random.random() * 0.3 for _ in range(100)]
    for v in values:
        reference.observe(v)
        ours.observe(v)
    for _ in range(3):
        reference.observe(0.012)
    ours.observe(0.012, 3)

    def lines(registry: CollectorRegistry) -> list[str]:
        return [ln for ln in generate_latest(registry).decode().splitlines() if "_created" not in ln and "_sum" not in ln]

    assert lines(plain) == lines(fast)
    assert ours.count == len(values) + 3 and abs(ours.sum - sum(values) - 0.036) < 1e-9


@pytest.mark.slow
def test_engine_in_a_process_of_its_own() -> None:
    """``engine_process``: the same routes, refusals, aborts and shutdown, with the engine
    stepping in a child process."""
    srv = LiveServer(create_app(_settings(engine_process=True, max_num_seqs=4, kv_cache_blocks=12)))
    try:
        srv.wait_ready(timeout=300)
        process = srv.engine.client
        assert isinstance(process, EngineProcess) and process._proc.is_alive()
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            body = {"prompt": "hello there", "max_tokens": 6, "ignore_eos": True}
            with client.stream("POST", "/generate_stream", json=body) as r:
                events = sse_events(list(r.iter_lines()))
            assert [e["index"] for e in events] == list(range(6))
            assert events[-1]["usage"]["completion_tokens"] == 6 and events[-1]["finish_reason"] == "length"
            r = client.post("/generate", json={**body, "max_tokens": 4, "logprobs": 2})
            assert r.status_code == 200, r.text
            assert len(r.json()["token_ids"]) == 4 and len(r.json()["logprobs"]) == 4
            # Refused by the engine itself (12 blocks of 16 tokens): 400 before any output.
            r = client.post("/generate", json={"prompt_token_ids": [5, 6], "max_tokens": 400})
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
            with client.stream("POST", "/generate_stream", json={**body, "max_tokens": 150}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        break  # hang up after the first token
            s = wait_idle(srv.engine, timeout=30)
            deadline = time.monotonic() + 30
            while s.kv_blocks_used and time.monotonic() < deadline:
                time.sleep(0.05)
                s = srv.engine.stats()
            assert (s.running, s.kv_blocks_used) == (0, 0)
            # Memory comes from the engine's process, which holds the model: its RSS adds in.
            deadline = time.monotonic() + 10
            while srv.engine.memory_report() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            report = srv.engine.memory_report()
            assert report is not None and report["rss_bytes"] > 0
            mem = client.get("/memory").json()
            assert mem["engine_process"]["host_rss_bytes"] > 0
            rss = [ln for ln in client.get("/metrics").text.splitlines()
                   if ln.startswith("stream_attention_host_rss_bytes ")]
            assert rss and float(rss[0].split()[1]) > report["rss_bytes"]
    finally:
        srv.stop()
    assert not process._proc.is_alive()


# ----------------------------------------------------------------------------- the CLI process


def test_serve_cli_subprocess_dotenv_and_graceful_drain(tmp_path: Path) -> None:
    """``python -m stream_attention.server`` reads .env and flags; SIGTERM drains a live stream."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    (tmp_path / ".env").write_text("STREAM_ATTENTION_API_KEY=dotenv-key\nSTREAM_ATTENTION_NUM_HEADS=8\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_ATTENTION_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stream_attention.server",
            "--port",
            str(port),
            "--max-num-seqs",
            "4",
            "--drain-timeout",
            "20",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    key = {"Authorization": "Bearer dotenv-key"}
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            deadline = time.monotonic() + 180
            while True:
                assert proc.poll() is None, proc.stdout.read()
                try:
                    if client.get("/ready", headers=key).status_code == 200:
                        break
                    assert client.get("/ready").status_code == 401  # the key came from .env
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server did not become ready"
                time.sleep(0.25)
            body = {"prompt": "drain me", "max_tokens": 24, "ignore_eos": True}
            with client.stream(
                "POST", "/generate_stream", json=body, headers={**key, "X-Request-ID": "drain-test"}
            ) as r:
                events = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
                        if len(events) == 2:
                            proc.send_signal(signal.SIGTERM)
            assert events[-1]["finish_reason"] == "length"
            assert events[-1]["usage"]["completion_tokens"] == 24
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown.
        assert proc.wait(60) in (0, -signal.SIGTERM)
        log = proc.stdout.read()
        assert "drain-test" in log  # request IDs reach the log lines
        assert "server stopped" in log  # the lifespan ran to its end: engine shut down
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_serve_cli_rejects_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    from stream_attention.server.cli import main

    assert main(["--max-queue", "-5"]) == 2
    assert "max_queue" in capsys.readouterr().err
    assert main(["--kv-block-size", "24"]) == 2  # the engine wants a power of two
    assert "block_size" in capsys.readouterr().err
