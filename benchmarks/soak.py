"""Soak test of the HTTP server: many concurrent streams, disconnects, aborts and bad requests.

    python benchmarks/soak.py --model default --duration-s 600 --concurrency 200 --out soak.json
    python benchmarks/soak.py --url http://127.0.0.1:8000 --requests 2000 --concurrency 256

A closed loop of ``--concurrency`` workers sends requests until ``--requests`` were sent or
``--duration-s`` passed (whichever comes first). Each request is drawn from a mix:

- ``generate``: ``POST /generate`` with random token ids (1..``--max-prompt-tokens``) and
  ``max_tokens`` (1..``--max-output-tokens``);
- ``stream``: ``POST /generate_stream``, read to the end;
- ``completions`` / ``chat``: the OpenAI routes, streamed or not;
- ``disconnect``: a stream the client drops after a few events (the server must abort it);
- ``abort``: a non-streamed request the client gives up on after a random delay;
- ``bad``: malformed JSON, wrong types, missing or out-of-range fields, an oversized prompt,
  token ids outside any vocabulary. These must be answered 4xx.

While it runs, a sampler reads ``/metrics`` every ``--sample-interval-s``: the server's
resident memory (``stream_attention_host_rss_bytes``, which covers the engine process too),
CUDA memory per device, KV blocks in use, running and waiting requests. Once the load stops
it waits for the server to go idle and reads the KV blocks still in use.

Verdict (exit status 1 when any fails): no 5xx (as a status or as an error event in a
stream), no unexpected answer (a good request refused with anything but 429, a bad request
accepted), no transport error the client did not cause, 0 KV blocks in use once idle, and
resident memory after warm-up (the first ``--warmup-frac`` of the run) grown by at most
``--max-rss-growth-pct``.

``--model`` starts ``python -m stream_attention.server`` in a child process (``default``:
the embedded default model) so the RSS is the server's alone, not the load generator's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

MIX = {"generate": 20, "stream": 15, "completions": 12, "chat": 12, "disconnect": 15, "abort": 10, "bad": 16}
WORDS = ("the", "of", "and", "to", "in", "is", "for", "def", "return", "class", "import", "self", "value", "list",
         "print", "while", "if", "else")


@dataclass
class SoakConfig:
    """What to run; the defaults are a short smoke run."""

    url: str
    duration_s: float = 60.0
    requests: int | None = None
    concurrency: int = 64
    max_prompt_tokens: int = 200
    max_output_tokens: int = 48
    sample_interval_s: float = 1.0
    warmup_frac: float = 0.2
    max_rss_growth_pct: float = 5.0
    idle_timeout_s: float = 60.0
    progress_every: int = 10  # samples between progress lines on stderr
    request_timeout_s: float = 600.0
    seed: int = 0
    mix: dict[str, int] = field(default_factory=lambda: dict(MIX))


@dataclass
class Sample:
    t: float
    rss_bytes: float
    cuda_allocated_bytes: float
    kv_blocks_used: float
    running: float
    waiting: float


# ----------------------------------------------------------------------------- /metrics


def read_metrics(text: str) -> dict[str, float]:
    """Sum of each sample name's values (over labels) in an exposition."""
    out: dict[str, float] = defaultdict(float)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] += s.value
    return out


async def sample(client: httpx.AsyncClient, t0: float, attempts: int = 3) -> Sample:
    """One /metrics reading. A transport error is retried on a fresh connection: under load
    the server may close an idle keep-alive socket just as a request is sent on it."""
    for attempt in range(attempts):
        try:
            text = (await client.get("/metrics")).text
            break
        except httpx.TransportError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.2 * (attempt + 1))
    m = read_metrics(text)
    rss = m.get("stream_attention_host_rss_bytes") or m.get("process_resident_memory_bytes", 0.0)
    return Sample(
        t=time.monotonic() - t0,
        rss_bytes=rss,
        cuda_allocated_bytes=m.get("stream_attention_cuda_memory_allocated_bytes", 0.0),
        kv_blocks_used=m.get("stream_attention_kv_cache_blocks_used", 0.0),
        running=m.get("stream_attention_requests_running", 0.0),
        waiting=m.get("stream_attention_requests_waiting", 0.0),
    )


# ----------------------------------------------------------------------------- requests


class Outcomes:
    """Outcome counts by request kind, and the failures (with a few examples)."""

    def __init__(self) -> None:
        self.by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        self.failures: Counter[str] = Counter()
        self.examples: list[str] = []

    def ok(self, kind: str, outcome: str) -> None:
        self.by_kind[kind][outcome] += 1

    def fail(self, kind: str, outcome: str, failure: str, detail: str) -> None:
        self.by_kind[kind][outcome] += 1
        self.failures[failure] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{kind}: {outcome}: {detail[:300]}")


def _status_outcome(out: Outcomes, kind: str, r: httpx.Response, *, bad: bool) -> None:
    code = r.status_code
    if code >= 500:
        out.fail(kind, str(code), "server_error", r.text)
    elif bad:
        if 400 <= code < 500:
            out.ok(kind, str(code))
        else:
            out.fail(kind, str(code), "unexpected_status", f"malformed request accepted: {r.text}")
    elif code == 200 or code == 429:  # 429: queue full, the documented back-pressure
        out.ok(kind, str(code))
    else:
        out.fail(kind, str(code), "unexpected_status", r.text)


def _event(line: str) -> Any:
    """The JSON of an SSE data line (``"[DONE]"`` as is; None for other lines)."""
    if not line.startswith("data: "):
        return None
    data = line[len("data: "):]
    if data == "[DONE]":
        return data
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        return {"error": {"type": "server_error", "message": f"undecodable event {data[:100]!r}"}}


class Workload:
    def __init__(self, cfg: SoakConfig, client: httpx.AsyncClient, out: Outcomes, model: str,
                 max_model_len: int) -> None:
        self.cfg = cfg
        self.model = model
        self.client = client
        self.out = out
        self.max_model_len = max_model_len
        self.rng = random.Random(cfg.seed)
        kinds, weights = zip(*cfg.mix.items(), strict=True)
        self.kinds = list(kinds)
        self.weights = list(weights)
        self.handlers: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
            "generate": self.generate, "stream": self.stream, "completions": self.completions, "chat": self.chat,
            "disconnect": self.disconnect, "abort": self.abort, "bad": self.bad,
        }

    def pick(self) -> str:
        return self.rng.choices(self.kinds, self.weights)[0]

    def _lengths(self) -> tuple[list[int], int]:
        out_len = self.rng.randint(1, self.cfg.max_output_tokens)
        prompt_len = self.rng.randint(1, max(1, min(self.cfg.max_prompt_tokens, self.max_model_len - out_len)))
        return [self.rng.randrange(10, 1000) for _ in range(prompt_len)], out_len

    def _text(self) -> tuple[str, int]:
        ids, out_len = self._lengths()
        return " ".join(WORDS[i % len(WORDS)] for i in ids[: max(1, len(ids) // 2)]), out_len

    async def run_one(self, kind: str) -> None:
        try:
            await self.handlers[kind]()
        except (httpx.TransportError, httpx.StreamError) as exc:
            self.out.fail(kind, type(exc).__name__, "transport_error", repr(exc))

    async def generate(self) -> None:
        ids, n = self._lengths()
        r = await self.client.post("/generate", json={"prompt_token_ids": ids, "max_tokens": n, "ignore_eos": True})
        _status_outcome(self.out, "generate", r, bad=False)

    async def _read_stream(self, kind: str, path: str, body: dict[str, Any], stop_after: int | None = None) -> None:
        async with self.client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                _status_outcome(self.out, kind, r, bad=False)
                return
            events = 0
            finished = False
            async for line in r.aiter_lines():
                event = _event(line)
                if event is None:
                    continue
                events += 1
                if isinstance(event, dict) and "error" in event:
                    err = event["error"]
                    failure = "server_error" if err.get("type") == "server_error" else "unexpected_status"
                    self.out.fail(kind, f"error_event:{err.get('code') or err.get('type')}", failure, json.dumps(err))
                    return
                # OpenAI streams end with [DONE]; /generate_stream with the full text.
                finished = finished or event == "[DONE]" or (
                    isinstance(event, dict) and event.get("generated_text") is not None)
                if stop_after is not None and events >= stop_after and not finished:
                    self.out.ok(kind, "disconnected")
                    return  # leaving the block closes the connection mid-stream
            if finished:
                self.out.ok(kind, "200")
            else:
                self.out.fail(kind, "truncated_stream", "unexpected_status", f"stream ended after {events} events")

    async def stream(self) -> None:
        ids, n = self._lengths()
        await self._read_stream("stream", "/generate_stream", {"prompt_token_ids": ids, "max_tokens": n,
                                                               "ignore_eos": True})

    async def completions(self) -> None:
        ids, n = self._lengths()
        body = {"model": self.model, "prompt": ids, "max_tokens": n, "ignore_eos": True}
        if self.rng.random() < 0.5:
            r = await self.client.post("/v1/completions", json=body)
            _status_outcome(self.out, "completions", r, bad=False)
        else:
            await self._read_stream("completions", "/v1/completions", {**body, "stream": True})

    async def chat(self) -> None:
        text, n = self._text()
        body = {"model": self.model, "messages": [{"role": "user", "content": text}], "max_tokens": n}
        if self.rng.random() < 0.5:
            r = await self.client.post("/v1/chat/completions", json=body)
            _status_outcome(self.out, "chat", r, bad=False)
        else:
            await self._read_stream("chat", "/v1/chat/completions", {**body, "stream": True,
                                                                     "stream_options": {"include_usage": True}})

    async def disconnect(self) -> None:
        ids, n = self._lengths()
        body = {"prompt_token_ids": ids, "max_tokens": max(n, 8), "ignore_eos": True}
        await self._read_stream("disconnect", "/generate_stream", body, stop_after=self.rng.randint(1, 4))

    async def abort(self) -> None:
        ids, n = self._lengths()
        body = {"prompt_token_ids": ids, "max_tokens": n, "ignore_eos": True}
        try:
            r = await asyncio.wait_for(self.client.post("/generate", json=body), self.rng.uniform(0.0, 0.5))
        except TimeoutError:
            self.out.ok("abort", "aborted")
            return
        _status_outcome(self.out, "abort", r, bad=False)  # finished before the client gave up

    def bad_requests(self) -> tuple[tuple[str, str, Any], ...]:
        """(name, route, body): JSON bodies, raw bytes for what is not JSON at all."""
        return (
            ("malformed_json", "/generate", b'{"prompt": "x", "max_tokens": 4'),
            ("not_an_object", "/v1/completions", b"[1, 2, 3]"),
            ("wrong_type", "/generate", {"prompt": "x", "max_tokens": "ten"}),
            ("wrong_type_prompt", "/v1/completions", {"model": self.model, "prompt": {"a": 1}}),
            ("missing_prompt", "/generate", {"max_tokens": 4}),
            ("missing_messages", "/v1/chat/completions", {"model": self.model}),
            ("negative_max_tokens", "/generate", {"prompt": "x", "max_tokens": -3}),
            ("temperature_out_of_range", "/v1/completions", {"model": self.model, "prompt": "x", "temperature": -1}),
            ("token_id_out_of_vocab", "/generate", {"prompt_token_ids": [10**9], "max_tokens": 2}),
            ("negative_token_id", "/generate", {"prompt_token_ids": [-1], "max_tokens": 2}),
            ("empty_messages", "/v1/chat/completions", {"model": self.model, "messages": []}),
            ("bad_role", "/v1/chat/completions", {"model": self.model, "messages": [{"role": "robot", "content": "x"}]}),
            ("unknown_model", "/v1/completions", {"model": "no-such-model", "prompt": "x"}),
            ("prompt_too_long", "/generate", {"prompt_token_ids": [11] * (self.max_model_len + 1), "max_tokens": 1}),
        )

    async def bad(self) -> None:
        name, path, body = self.rng.choice(self.bad_requests())
        if isinstance(body, bytes):
            r = await self.client.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = await self.client.post(path, json=body)
        _status_outcome(self.out, f"bad:{name}", r, bad=True)


# ----------------------------------------------------------------------------- the run


def _pct(samples: list[float], q: float) -> float:
    if not samples:
        return 0.0
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def rss_growth(samples: list[Sample], load_end: float, warmup_frac: float) -> dict[str, float]:
    """Largest RSS in the last fifth of the load (and once idle) against the largest in the
    warm-up window: memory that keeps growing once warm is what a leak looks like."""
    warm_end = warmup_frac * load_end
    warm = [s.rss_bytes for s in samples if s.t <= warm_end] or [samples[0].rss_bytes]
    late = [s.rss_bytes for s in samples if s.t >= 0.8 * load_end] or [samples[-1].rss_bytes]
    base, end = max(warm), max(late)
    return {"warmup_end_s": warm_end, "rss_warm_bytes": base, "rss_late_bytes": end,
            "rss_growth_pct": 100.0 * (end - base) / base if base else 0.0}


async def soak(cfg: SoakConfig) -> dict[str, Any]:
    """Run the load against ``cfg.url``; returns the report (see :func:`verdict`)."""
    limits = httpx.Limits(max_connections=cfg.concurrency + 8, max_keepalive_connections=cfg.concurrency + 8)
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=30.0)
    out = Outcomes()
    samples: list[Sample] = []
    async with httpx.AsyncClient(base_url=cfg.url, limits=limits, timeout=timeout) as client, \
            httpx.AsyncClient(base_url=cfg.url, timeout=30.0,
                              limits=httpx.Limits(max_keepalive_connections=0)) as monitor:
        models = (await monitor.get("/v1/models")).json()["data"]
        max_model_len = int(models[0].get("max_model_len") or 2048)
        work = Workload(cfg, client, out, models[0]["id"], max_model_len)
        t0 = time.monotonic()
        samples.append(await sample(monitor, t0))
        stop = asyncio.Event()

        async def sampler() -> None:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), cfg.sample_interval_s)
                except TimeoutError:
                    try:
                        samples.append(await sample(monitor, t0))
                    except httpx.TransportError as exc:
                        out.failures[f"monitor {type(exc).__name__}"] += 1
                    if len(samples) % cfg.progress_every == 0:
                        # A run cut short from outside still leaves a trace of how it went.
                        last = samples[-1]
                        print(f"[{last.t:6.0f} s] sent {sent}, failures {dict(out.failures)}, "
                              f"RSS {last.rss_bytes / 2**20:.0f} MiB, KV blocks {last.kv_blocks_used:.0f}, "
                              f"running {last.running:.0f}, waiting {last.waiting:.0f}", file=sys.stderr, flush=True)

        sent = 0

        async def worker() -> None:
            nonlocal sent
            while time.monotonic() - t0 < cfg.duration_s and (cfg.requests is None or sent < cfg.requests):
                sent += 1
                await work.run_one(work.pick())

        sampling = asyncio.ensure_future(sampler())
        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        load_end = time.monotonic() - t0
        # Idle: nothing running or waiting, and the KV pool given back (aborts land a step later).
        idle_deadline = time.monotonic() + cfg.idle_timeout_s
        while True:
            last = await sample(monitor, t0)
            if (last.running == 0 and last.waiting == 0 and last.kv_blocks_used == 0) or (
                    time.monotonic() > idle_deadline):
                break
            await asyncio.sleep(0.2)
        stop.set()
        await sampling
        samples.append(last)
    growth = rss_growth(samples, load_end, cfg.warmup_frac)
    total = sum(sum(c.values()) for c in out.by_kind.values())
    return {
        "config": asdict(cfg),
        "load_s": load_end,
        "requests_sent": total,
        "requests_per_s": total / load_end if load_end else 0.0,
        "outcomes": {k: dict(v) for k, v in sorted(out.by_kind.items())},
        "failures": dict(out.failures),
        "failure_examples": out.examples,
        "kv_blocks_used_idle": last.kv_blocks_used,
        "idle_running": last.running,
        "idle_waiting": last.waiting,
        **growth,
        "rss_first_bytes": samples[0].rss_bytes,
        "rss_max_bytes": max(s.rss_bytes for s in samples),
        "rss_final_bytes": last.rss_bytes,
        "cuda_allocated_first_bytes": samples[0].cuda_allocated_bytes,
        "cuda_allocated_max_bytes": max(s.cuda_allocated_bytes for s in samples),
        "cuda_allocated_final_bytes": last.cuda_allocated_bytes,
        "kv_blocks_used_p50": _pct([s.kv_blocks_used for s in samples], 0.5),
        "kv_blocks_used_max": max(s.kv_blocks_used for s in samples),
        "waiting_max": max(s.waiting for s in samples),
        "running_max": max(s.running for s in samples),
        "samples": [asdict(s) for s in samples],
    }


def verdict(report: dict[str, Any]) -> list[str]:
    """Why the run failed (empty: it passed)."""
    problems = [f"{n} {kind}" for kind, n in sorted(report["failures"].items())]
    if report["kv_blocks_used_idle"]:
        problems.append(f"{report['kv_blocks_used_idle']:.0f} KV blocks still in use once idle")
    if report["idle_running"] or report["idle_waiting"]:
        problems.append(f"not idle after the load: {report['idle_running']:.0f} running, "
                        f"{report['idle_waiting']:.0f} waiting")
    limit = report["config"]["max_rss_growth_pct"]
    if report["rss_growth_pct"] > limit:
        problems.append(f"RSS grew {report['rss_growth_pct']:.1f}% after warm-up (limit {limit}%)")
    return problems


def summary(report: dict[str, Any], problems: list[str]) -> str:
    mib = 1 << 20
    lines = [
        f"soak: {report['requests_sent']} requests in {report['load_s']:.0f} s "
        f"({report['requests_per_s']:.1f}/s), concurrency {report['config']['concurrency']}",
        "outcomes: " + "; ".join(f"{k} {dict(v)}" for k, v in report["outcomes"].items()),
        f"RSS: first {report['rss_first_bytes'] / mib:.0f} MiB, warm {report['rss_warm_bytes'] / mib:.0f} MiB, "
        f"late {report['rss_late_bytes'] / mib:.0f} MiB ({report['rss_growth_pct']:+.2f}%), "
        f"final {report['rss_final_bytes'] / mib:.0f} MiB",
        f"CUDA allocated: first {report['cuda_allocated_first_bytes'] / mib:.0f} MiB, "
        f"max {report['cuda_allocated_max_bytes'] / mib:.0f} MiB, final {report['cuda_allocated_final_bytes'] / mib:.0f} MiB",
        f"KV blocks used: p50 {report['kv_blocks_used_p50']:.0f}, max {report['kv_blocks_used_max']:.0f}, "
        f"idle {report['kv_blocks_used_idle']:.0f}; max waiting {report['waiting_max']:.0f}",
        "verdict: " + ("PASS" if not problems else "FAIL: " + "; ".join(problems)),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- own server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m stream_attention.server`` in a child process, stopped on exit."""

    def __init__(self, model: str, device: str, extra: list[str], ready_timeout_s: float = 600.0) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "stream_attention.server", "--host", "127.0.0.1", "--port", str(port),
               "--device", device, "--log-level", "warning", *extra]
        if model != "default":
            cmd += ["--model", model]
        # Open for the server's whole life (closed in stop()), so no context manager.
        self.log = tempfile.NamedTemporaryFile("w+", prefix="soak-server-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}): {self.tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    print(f"server ready in {time.monotonic() - deadline + ready_timeout_s:.0f} s",
                          file=sys.stderr, flush=True)
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server not ready after {ready_timeout_s} s: {self.tail()}")
            time.sleep(0.5)

    def tail(self, n: int = 3000) -> str:
        return Path(self.log.name).read_text()[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.close()
        os.unlink(self.log.name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server")
    where.add_argument("--model", help="start a server for this model ('default': the embedded one)")
    ap.add_argument("--device", default="auto", help="device of the started server")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra flag for the started server (repeatable), e.g. --server-arg=--max-num-seqs=64")
    ap.add_argument("--duration-s", type=float, default=60.0)
    ap.add_argument("--requests", type=int, default=None, help="stop after this many requests")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-prompt-tokens", type=int, default=200)
    ap.add_argument("--max-output-tokens", type=int, default=48)
    ap.add_argument("--sample-interval-s", type=float, default=1.0)
    ap.add_argument("--warmup-frac", type=float, default=0.2)
    ap.add_argument("--max-rss-growth-pct", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the JSON report here")
    args = ap.parse_args(argv)
    from stream_attention.server.cli import raise_open_file_limit

    raise_open_file_limit()  # the client holds one socket per stream too
    server = ServerProcess(args.model, args.device, args.server_arg) if args.model else None
    try:
        cfg = SoakConfig(
            url=server.url if server else args.url.rstrip("/"), duration_s=args.duration_s,
            requests=args.requests, concurrency=args.concurrency, max_prompt_tokens=args.max_prompt_tokens,
            max_output_tokens=args.max_output_tokens, sample_interval_s=args.sample_interval_s,
            warmup_frac=args.warmup_frac, max_rss_growth_pct=args.max_rss_growth_pct, seed=args.seed,
        )
        report = asyncio.run(soak(cfg))
        if server is not None and server.proc.poll() is not None:
            report["failures"][f"server exited with {server.proc.returncode}"] = 1
    except BaseException:
        if server is not None:
            print("server log tail:\n" + server.tail(), file=sys.stderr)
        raise
    finally:
        if server is not None:
            server.stop()
    problems = verdict(report)
    report["verdict"] = {"passed": not problems, "problems": problems}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    print(summary(report, problems))
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
