"""The Python clients, the client CLI and the load generator against the live server.

The server is the one ``tests/test_server.py`` starts (real uvicorn, default model, CPU);
only the retry tests use ``httpx.MockTransport``, to script 429/503 answers exactly.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")

from stream_attention.clients import APIError, AsyncClient, Client, loadgen, parse_metrics  # noqa: E402
from stream_attention.clients import cli as client_cli  # noqa: E402
from tests.test_server import LiveServer, shared_server, wait_idle  # noqa: E402


@pytest.fixture(scope="module")
def srv(request: pytest.FixtureRequest) -> LiveServer:
    return shared_server("main", request.config)


@pytest.fixture
def client(srv: LiveServer) -> Client:
    with Client(srv.url, timeout=120) as c:
        yield c


def test_client_generate_and_stream(client: Client) -> None:
    g = client.generate("Clients can", max_tokens=6, ignore_eos=True)
    assert g.finish_reason == "length" and len(g.token_ids) == 6 and g.usage["completion_tokens"] == 6
    assert g.request_id and g.timings["time_to_first_token_s"] > 0
    events = list(client.generate_stream("Clients can", max_tokens=6, ignore_eos=True))
    assert events[-1].finished and not any(e.finished for e in events[:-1])
    assert "".join(e.text for e in events) == g.text == events[-1].generated_text
    assert [t for e in events for t in e.token_ids] == g.token_ids
    by_ids = client.generate(prompt_token_ids=[7, 8, 9], max_tokens=2, ignore_eos=True)
    assert by_ids.usage["prompt_tokens"] == 3
    with pytest.raises(ValueError):
        client.generate()


def test_client_openai_routes(client: Client) -> None:
    comp = client.completions("Hello", max_tokens=4, temperature=0)
    chunks = list(client.completions_stream("Hello", max_tokens=4, temperature=0))
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == comp["choices"][0]["text"]
    chat = client.chat("Hi!", system="Be brief.", max_tokens=5, temperature=0)
    assert chat["object"] == "chat.completion"
    assert (
        "".join(client.chat_stream("Hi!", system="Be brief.", max_tokens=5, temperature=0))
        == chat["choices"][0]["message"]["content"]
    )
    assert client.models()[0]["id"] == chat["model"]


def test_client_operations(client: Client) -> None:
    assert client.health()["status"] == "ok" and client.ready()
    client.wait_ready(timeout=5)
    bench = client.benchmark(seq_lens=[32], heads=2, dim=32, iters=1, warmup=0)
    assert bench["kind"] == "kernel" and bench["rows"]
    metrics = client.metrics_dict()
    assert metrics["stream_attention_kv_cache_blocks_capacity"][0]["value"] > 0
    assert parse_metrics(client.metrics()).keys() == metrics.keys()
    mem = client.memory()
    assert mem["host"]["rss_bytes"] > 0 and "kv_cache" in mem


def test_client_errors_name_the_field(client: Client) -> None:
    with pytest.raises(APIError) as err:
        client.generate("x", temperature=-3)
    assert err.value.status == 400 and err.value.param == "temperature" and err.value.request_id
    with pytest.raises(APIError) as err:
        list(client.generate_stream("x", top_p=7))
    assert err.value.status == 400 and err.value.param == "top_p"


def test_async_client(srv: LiveServer) -> None:
    async def main() -> None:
        async with AsyncClient(srv.url, timeout=120) as c:
            assert (await c.health())["status"] == "ok" and await c.ready()
            results = await asyncio.gather(*(c.generate(f"async {i}", max_tokens=3, ignore_eos=True) for i in range(6)))
            assert all(len(r.token_ids) == 3 for r in results)
            events = [e async for e in c.generate_stream("async stream", max_tokens=4, ignore_eos=True)]
            assert events[-1].finished and events[-1].usage["completion_tokens"] == 4
            chat = "".join([p async for p in c.chat_stream("hey", max_tokens=3, temperature=0)])
            assert chat == (await c.chat("hey", max_tokens=3, temperature=0))["choices"][0]["message"]["content"]
            assert [ch async for ch in c.completions_stream("x", max_tokens=2)]
            assert "stream_attention_requests_running" in await c.metrics_dict()
            assert (await c.memory())["kv_cache"]["blocks_total"] > 0
            assert (await c.models())[0]["object"] == "model"
            with pytest.raises(APIError):
                await c.completions("x", max_tokens=0)

    asyncio.run(main())


def test_client_retries_through_overload(request: pytest.FixtureRequest) -> None:
    """Against the live overloaded server, retries on 429 turn a burst into all successes."""
    over = shared_server("overload", request.config)
    wait_idle(over.engine)

    async def main() -> list[Any]:
        async with AsyncClient(over.url, timeout=120, max_retries=30, max_backoff=1.0) as c:
            return await asyncio.gather(*(c.generate(f"burst {i}", max_tokens=16, ignore_eos=True) for i in range(40)))

    results = asyncio.run(main())
    assert len(results) == 40 and all(len(r.token_ids) == 16 for r in results)
    rejected = over.state.metrics.rejected.labels(reason="queue_full")._value.get()
    assert rejected > 0  # the burst did hit the queue bound and was retried


# ----------------------------------------------------------------------------- retry policy (scripted server)


def _scripted(statuses: list[int], calls: list[httpx.Request]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        status = statuses[min(len(calls) - 1, len(statuses) - 1)]
        if status == 200:
            return httpx.Response(
                200, json={"generated_text": "ok", "token_ids": [1], "finish_reason": "length", "usage": {}}
            )
        body = {"error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": "queue_full"}}
        return httpx.Response(status, json=body, headers={"Retry-After": "0"})

    return httpx.MockTransport(handler)


def test_retry_policy() -> None:
    calls: list[httpx.Request] = []
    with Client("http://127.0.0.1:1", transport=_scripted([429, 503, 200], calls), api_key="k") as c:
        assert c.generate("x").text == "ok"
    assert len(calls) == 3 and calls[0].headers["authorization"] == "Bearer k"

    calls.clear()
    with (
        Client("http://127.0.0.1:1", transport=_scripted([429], calls), max_retries=2) as c,
        pytest.raises(APIError) as err,
    ):
        c.generate("x")
    assert err.value.status == 429 and err.value.code == "queue_full" and len(calls) == 3

    calls.clear()
    with Client("http://127.0.0.1:1", transport=_scripted([400, 200], calls)) as c, pytest.raises(APIError):
        c.generate("x")
    assert len(calls) == 1  # client errors are not retried

    attempts = []

    def refuse(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    transport = httpx.MockTransport(refuse)
    with (
        Client("http://127.0.0.1:1", transport=transport, max_retries=2, backoff=0.001) as c,
        pytest.raises(httpx.ConnectError),
    ):
        c.health()
    assert len(attempts) == 3


# ----------------------------------------------------------------------------- CLI


def test_client_cli(srv: LiveServer, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    base = ["--url", srv.url]
    assert client_cli.main([*base, "generate", "Tell me", "--max-tokens", "5"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "tokens" in out.err and "first token" in out.err
    assert client_cli.main([*base, "generate", "Tell me", "--max-tokens", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["usage"]["completion_tokens"] <= 5
    assert client_cli.main([*base, "chat", "hello", "--max-tokens", "3", "--system", "terse"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert (
        client_cli.main(
            [*base, "benchmark", "--seq", "32", "--heads", "2", "--dim", "32", "--iters", "1", "--warmup", "0"]
        )
        == 0
    )
    assert "Fused(ms)" in capsys.readouterr().out
    assert client_cli.main([*base, "ready"]) == 0 and capsys.readouterr().out.strip() == "ready"
    assert client_cli.main([*base, "health"]) == 0 and json.loads(capsys.readouterr().out)["status"] == "ok"
    assert client_cli.main([*base, "metrics"]) == 0 and "stream_attention_" in capsys.readouterr().out
    assert client_cli.main([*base, "generate", "x", "--temperature", "-1"]) == 1
    assert "temperature" in capsys.readouterr().err
    assert client_cli.main(["--url", "http://127.0.0.1:9", "--retries", "0", "health"]) == 1


# ----------------------------------------------------------------------------- load generator


def test_loadgen_closed_loop_and_poisson(srv: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = loadgen.LoadConfig(url=srv.url, num_requests=16, concurrency=8, prompt_tokens=16, max_tokens=6)
    result = asyncio.run(loadgen.run_load(cfg))
    s = result["summary"]
    assert s["completed"] == 16 and s["failed"] == 0 and s["output_tokens"] == 16 * 6
    assert s["output_tokens_per_s"] > 0 and s["requests_per_s"] > 0
    for key in ("ttft_s", "itl_s", "e2e_s", "tpot_s"):
        assert s[key]["p50"] is not None and s[key]["p50"] <= s[key]["p90"] <= s[key]["p99"]
    assert s["ttft_s"]["p50"] <= s["e2e_s"]["p50"]
    table = loadgen.format_report(result)
    assert "TTFT" in table and "ITL" in table and "p99" in table

    for endpoint in ("completions", "chat"):
        r = asyncio.run(
            loadgen.run_load(
                loadgen.LoadConfig(
                    url=srv.url, endpoint=endpoint, num_requests=4, concurrency=2, prompt_tokens=8, max_tokens=4
                )
            )
        )
        assert r["summary"]["completed"] == 4 and r["summary"]["output_tokens"] == 16, endpoint

    out = tmp_path / "load.json"
    code = loadgen.main(
        ["--url", srv.url, "--rate", "20", "-n", "10", "--prompt-tokens", "8", "--max-tokens", "4", "--json", str(out)]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert data["summary"]["completed"] == 10 and data["config"]["rate"] == 20
    assert "Poisson" in capsys.readouterr().out


def test_loadgen_bounds_and_loopback() -> None:
    loadgen.check_loopback("http://127.0.0.1:8000")
    loadgen.check_loopback("http://localhost:8000")
    with pytest.raises(ValueError, match="allow-remote"):
        loadgen.check_loopback("http://10.1.2.3:8000")
    with pytest.raises(ValueError):
        asyncio.run(loadgen.run_load(loadgen.LoadConfig(url="http://192.0.2.1:8000")))
    assert loadgen.main(["--url", "http://192.0.2.1:8000", "-n", "1"]) == 2
    assert loadgen.percentiles([]) == {"p50": None, "p90": None, "p99": None, "mean": None}
    p = loadgen.percentiles([float(i) for i in range(1, 101)])
    assert (p["p50"], p["p90"], p["p99"]) == (50.0, 90.0, 99.0)


def test_loadgen_duration_bound(srv: LiveServer) -> None:
    cfg = loadgen.LoadConfig(
        url=srv.url, num_requests=10_000, duration=1.0, concurrency=4, prompt_tokens=8, max_tokens=4
    )
    result = asyncio.run(loadgen.run_load(cfg))
    assert 0 < result["summary"]["requests"] < 10_000
    assert result["summary"]["duration_s"] < 30


def test_loadgen_disconnects_leave_no_blocks(srv: LiveServer) -> None:
    cfg = loadgen.LoadConfig(
        url=srv.url, num_requests=24, concurrency=12, prompt_tokens=8, max_tokens=40, disconnect_fraction=0.5, seed=3
    )
    s = asyncio.run(loadgen.run_load(cfg))["summary"]
    assert s["disconnected"] > 0 and s["completed"] + s["disconnected"] == 24 and s["failed"] == 0
    stats = wait_idle(srv.engine)
    assert (stats.running, stats.kv_blocks_used) == (0, 0)


def test_loadgen_api_key_and_sse_framing(request: pytest.FixtureRequest) -> None:
    auth = shared_server("auth", request.config)
    cfg = loadgen.LoadConfig(url=auth.url, api_key="test-key", num_requests=3, concurrency=2, prompt_tokens=4,
                             max_tokens=3)  # fmt: skip
    s = asyncio.run(loadgen.run_load(cfg))["summary"]
    assert s["completed"] == 3 and s["output_tokens"] == 9 and s["client_cpu_s"] >= 0
    cfg.api_key = "wrong"
    s = asyncio.run(loadgen.run_load(cfg))["summary"]
    assert s["failed"] == 3 and s["errors"] == {"401": 3}
    assert loadgen._sse_data(b"data: {}") == b"{}"
    assert loadgen._sse_data(b": keep-alive\ndata:{\"a\":\ndata: 1}") == b'{"a":\n1}'
    assert loadgen._sse_data(b": only a comment") is None
