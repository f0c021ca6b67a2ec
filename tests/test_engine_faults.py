"""Engine faults: a dying engine fails its requests at once and is restarted; running out
of device memory fails only the step's requests; nothing leaks across any of it.

Faults are real: a step raises inside the engine (``EngineConfig.fault_file``, which works
in the engine's own process too) or the engine process is killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")

from stream_attention.engine import (  # noqa: E402
    EngineConfig,
    EngineDeadError,
    LLMEngine,
    SamplingParams,
    StepFailedError,
    build_engine_client,
)
from stream_attention.engine.supervisor import SupervisedEngine  # noqa: E402
from stream_attention.server import ServerSettings, create_app  # noqa: E402

from .test_server import LiveServer, sse_events  # noqa: E402

LONG = SamplingParams(max_tokens=400, ignore_eos=True)


def _config(tmp_path: Path, **overrides: Any) -> EngineConfig:
    return EngineConfig(device="cpu", max_num_seqs=4, num_kv_blocks=64, max_model_len=512,
                        fault_file=str(tmp_path / "fault"), **overrides)  # fmt: skip


async def _first_token_then_fault(client: Any, fault_file: Path, kind: str, n: int = 2) -> list[BaseException | None]:
    """Start ``n`` long streams; once each has a token, inject ``kind``; return how each ended."""
    started = asyncio.Event()
    got = 0

    async def one(i: int) -> BaseException | None:
        nonlocal got
        try:
            async for _ in client.stream(f"def f{i}(x):", LONG):
                if got < n:
                    got += 1
                    if got == n:
                        started.set()
        except (EngineDeadError, StepFailedError) as exc:
            return exc
        return None

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await asyncio.wait_for(started.wait(), 120)
    t0 = time.monotonic()
    fault_file.write_text(kind)
    ends = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert time.monotonic() - t0 < 10, "the failed requests did not end promptly"
    return ends


async def _wait_until(pred: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_step_exception_fails_requests_and_the_engine_restarts(tmp_path: Path, mode: str) -> None:
    config = _config(tmp_path)
    client = build_engine_client(config, mode=mode, restart_backoff_s=0.1)
    assert isinstance(client, SupervisedEngine)

    async def main() -> None:
        await client.start()
        first = client.client
        ends = await _first_token_then_fault(client, Path(config.fault_file), "error")
        assert all(isinstance(e, EngineDeadError) for e in ends), ends
        await _wait_until(lambda: client.is_running and client.client is not first, 240)
        assert client.restarts == 1 and client.failure is None
        out = await client.generate("def g(y):", SamplingParams(max_tokens=5, ignore_eos=True))
        assert len(out.token_ids) == 5
        await _wait_until(lambda: client.stats().kv_blocks_used == 0, 10)
        stats = client.stats()
        assert (stats.running, stats.waiting, stats.engine_restarts_total) == (0, 0, 1)
        await client.shutdown()

    asyncio.run(main())


@pytest.mark.slow
def test_out_of_memory_fails_the_step_and_the_engine_serves_on(tmp_path: Path) -> None:
    config = _config(tmp_path)
    client = build_engine_client(config, mode="thread", restart_backoff_s=0.1)

    async def main() -> None:
        await client.start()
        first = client.client
        ends = await _first_token_then_fault(client, Path(config.fault_file), "oom")
        assert all(isinstance(e, StepFailedError) for e in ends), ends
        assert client.is_running and client.client is first and client.restarts == 0
        out = await client.generate("def g(y):", SamplingParams(max_tokens=5, ignore_eos=True))
        assert len(out.token_ids) == 5
        assert client.stats().kv_blocks_used == 0
        await client.shutdown()

    asyncio.run(main())


def test_supervisor_gives_up_after_its_restart_budget() -> None:
    """A client that keeps dying: restarts are spaced by a doubling backoff, then the
    supervisor gives up, reports the failure once, and refuses requests with EngineDeadError."""
    built: list[float] = []

    class Dying:
        """An engine client whose loop stops right after it starts."""

        config = tokenizer = None
        max_model_len = 16
        model_name = "dying"
        device = "cpu"
        is_running = False

        def __init__(self) -> None:
            built.append(time.monotonic())
            self.failure: BaseException | None = None

        async def start(self) -> None:
            self.failure = RuntimeError("died on start")

        async def shutdown(self, **_: Any) -> None:
            pass

    gave_up: list[BaseException] = []
    sup = SupervisedEngine(Dying, max_restarts=3, backoff_s=0.05, max_backoff_s=1.0, on_give_up=gave_up.append,
                           poll_s=0.01)  # fmt: skip

    async def main() -> None:
        await sup.start()
        await _wait_until(lambda: sup.failure is not None, 10)
        with pytest.raises(EngineDeadError):
            await sup.stream_batches("x").__anext__()
        await sup.shutdown()

    asyncio.run(main())
    assert sup.restarts == 3 and len(built) == 4 and len(gave_up) == 1
    gaps = [b - a for a, b in zip(built, built[1:], strict=False)]
    assert min(gaps) >= 0.05, gaps


def test_restart_backoff_doubles_within_the_window_and_resets_after_it() -> None:
    sup = SupervisedEngine(lambda: None, client=object(), max_restarts=4, window_s=60.0, backoff_s=0.5,
                           max_backoff_s=3.0)  # type: ignore[arg-type]  # fmt: skip
    waits = []
    for _ in range(5):
        waits.append(sup._next_backoff())
        sup._recent.append(time.monotonic())
    assert waits == [0.5, 1.0, 2.0, 3.0, None]
    sup._recent = type(sup._recent)(t - 61.0 for t in sup._recent)  # the restarts fall out of the window
    assert sup._next_backoff() == 0.5


def test_supervisor_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_restarts"):
        SupervisedEngine(lambda: None, client=object(), max_restarts=-1)  # type: ignore[arg-type]


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.slow
def test_killed_engine_process_gives_503_then_ready_again_without_leaks(tmp_path: Path) -> None:
    """Over HTTP: SIGKILL the engine process while a stream runs. The stream ends with an
    error event, new requests get 503 with Retry-After until the engine is back, /health
    stays 200 (recovering, not dead), /ready returns to 200, and /metrics shows no blocks or
    requests left behind."""
    client = build_engine_client(_config(tmp_path), mode="process", restart_backoff_s=0.2)
    settings = ServerSettings(_env_file=None, max_num_seqs=4)
    app = create_app(settings, engine=client)
    srv = LiveServer(app)
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as http:
            deadline = time.monotonic() + 120
            while http.get("/ready").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            pid = client.client.pid
            body = {"prompt": "def f(x):", "max_tokens": 400, "ignore_eos": True}
            with http.stream("POST", "/generate_stream", json=body) as r:
                assert r.status_code == 200
                lines: list[str] = []
                killed_at = None
                for line in r.iter_lines():
                    lines.append(line)
                    if killed_at is None and line.startswith("data: "):
                        os.kill(pid, signal.SIGKILL)
                        killed_at = time.monotonic()
            events = sse_events(lines)
            assert killed_at is not None and time.monotonic() - killed_at < 10
            assert events[-1]["error"]["code"] == "engine_unavailable", events[-1]
            r = http.post("/generate", json={"prompt": "x", "max_tokens": 2})
            if r.status_code != 200:  # still restarting
                assert r.status_code == 503 and r.headers["retry-after"], r.text
                assert http.get("/health").status_code == 200
                assert http.get("/ready").json()["status"] in ("restarting", "ready")
            deadline = time.monotonic() + 240
            while http.get("/ready").status_code != 200:
                assert time.monotonic() < deadline, "engine did not come back"
                time.sleep(0.1)
            assert client.client.pid != pid
            r = http.post("/generate", json={"prompt": "def g(y):", "max_tokens": 4, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
            time.sleep(0.1)  # the engine process's idle counters reach the server
            text = http.get("/metrics").text
            assert _metric(text, "stream_attention_kv_cache_blocks_used") == 0
            assert _metric(text, "stream_attention_requests_running") == 0
    finally:
        srv.stop()
        asyncio.run(client.shutdown(drain=False, timeout=0))


@pytest.mark.slow
def test_parallel_choices_cross_the_process_pipe(tmp_path: Path) -> None:
    """n > 1 through the engine process (the default on CUDA): each choice's tokens and text
    arrive under its own index and add up to that choice's totals; greedy choices agree."""
    from stream_attention.engine.process_engine import EngineProcess

    engine = EngineProcess(_config(tmp_path))

    async def main() -> dict[int, Any]:
        await engine.start()
        got: dict[int, list[Any]] = {}
        last: dict[int, Any] = {}
        async for out in engine.stream("def f(x):", SamplingParams(n=3, max_tokens=6, ignore_eos=True)):
            got.setdefault(out.index, []).append(out)
            last[out.index] = out
        await engine.shutdown()
        return {i: (outs, last[i]) for i, outs in got.items()}

    per_choice = asyncio.run(main())
    assert sorted(per_choice) == [0, 1, 2]
    for outs, final in per_choice.values():
        assert [t for o in outs for t in o.delta_token_ids] == list(final.token_ids)
        assert "".join(o.delta_text for o in outs) == final.text
        assert len(final.token_ids) == 6 and final.finish_reason is not None
    texts = {final.text for _, final in per_choice.values()}
    assert len(texts) == 1  # greedy: every choice is the same continuation


@pytest.mark.slow
def test_out_of_memory_over_http_is_a_503_and_nothing_leaks(tmp_path: Path) -> None:
    """Over HTTP: an out-of-memory step ends the streams it served with a 503 error event,
    the server stays ready (no restart), and /metrics shows no block or request left."""
    config = _config(tmp_path)
    client = build_engine_client(config, mode="thread", restart_backoff_s=0.1)
    srv = LiveServer(create_app(ServerSettings(_env_file=None, max_num_seqs=4), engine=client))
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as http:
            deadline = time.monotonic() + 120
            while http.get("/ready").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            body = {"prompt": "def f(x):", "max_tokens": 400, "ignore_eos": True}
            with http.stream("POST", "/generate_stream", json=body) as r:
                lines: list[str] = []
                for line in r.iter_lines():
                    lines.append(line)
                    if line.startswith("data: ") and not Path(config.fault_file).exists() and len(lines) < 3:
                        Path(config.fault_file).write_text("oom")
            error = sse_events(lines)[-1]["error"]
            assert error["code"] == "engine_unavailable" and "out of device memory" in error["message"], error
            assert http.get("/ready").status_code == 200
            r = http.post("/generate", json={"prompt": "def g(y):", "max_tokens": 4, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
            text = http.get("/metrics").text
            assert _metric(text, "stream_attention_kv_cache_blocks_used") == 0
            assert _metric(text, "stream_attention_requests_running") == 0
            assert _metric(text, "stream_attention_engine_restarts_total") == 0
    finally:
        srv.stop()
        asyncio.run(client.shutdown(drain=False, timeout=0))


@pytest.mark.slow
def test_prompt_logprobs_cross_the_process_pipe(tmp_path: Path) -> None:
    """prompt_logprobs come with every streamed output of every choice through the engine
    process (the first output of a choice included: streams send them there), as in-process."""
    from stream_attention.engine.process_engine import EngineProcess

    params = SamplingParams(max_tokens=3, prompt_logprobs=2, ignore_eos=True, n=2, temperature=1.0, seed=1)
    expected = LLMEngine(config=_config(tmp_path)).generate(["def f(x):\n    return x"], params)[0].prompt_logprobs
    engine = EngineProcess(_config(tmp_path))

    async def main() -> list[Any]:
        await engine.start()
        outs = [out async for out in engine.stream("def f(x):\n    return x", params)]
        await engine.shutdown()
        return outs

    outs = asyncio.run(main())
    assert {out.index for out in outs} == {0, 1} and len(outs) > 2
    for out in outs:
        got = out.prompt_logprobs
        assert got is not None and got[0] is None and len(got) == len(expected)
        assert [lp.token_id for lp in got[1:]] == [lp.token_id for lp in expected[1:]]
        # fp32 on CPU, the same prompt in another process and batch: summation order may differ.
        assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(got[1:], expected[1:], strict=True))
