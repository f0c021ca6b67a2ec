"""``stream-attention-loadgen``: load a server with streaming requests and report latencies.

Arrivals are closed-loop (``--concurrency C``: C streams, each starting the next request
when its previous one ends) or open-loop at ``--request-rate`` requests/s (several rates
make a sweep; ``inf`` sends all requests at once): gamma-distributed gaps whose shape is
``--burstiness`` (1.0 = Poisson), as vLLM's ``benchmark_serving``, optionally capped at
``--max-concurrency`` streams in flight (later arrivals wait for a free slot). ``--rate R``
is the single-rate form of the same. A run stops after ``--num-requests`` requests or
``--duration`` seconds, whichever comes first.

What each request asks for comes from ``--dataset-name``: ``fixed`` (every request
``--prompt-tokens`` random token ids, or ``--prompt TEXT``, and ``--max-tokens``),
``random`` (log-normal lengths with ShareGPT-like means, clipped to the server's context) or
``sharegpt`` (``--dataset-path``: a JSON or JSONL file of ShareGPT conversations). Dataset
prompts are counted with ``--tokenizer`` when given, else with the server's ``/tokenize``
when it answers, else at four characters a token. ``--shared-prefix-fraction`` puts one of
a few system prompts before that share of requests, so prefix caching shows.
``ignore_eos`` makes every request generate exactly its output length.

Every request streams, so the report has time to first token (TTFT), inter-token latency
(ITL), time per output token (TPOT), end-to-end latency, throughput and, under
``--slo-*-ms`` limits, goodput: p50/p90/p99 and mean in a table, everything with ``--json``,
latencies and throughput against request rate as a PNG with ``--plot``
(:mod:`.loadgen_stats` has the definitions, :mod:`.workload` the sampling). Targets must be
loopback addresses unless ``--allow-remote`` is given, so a typo cannot load someone else's
server.

The streams themselves go over a small HTTP/1.1 client of this module (keep-alive
connections, chunked bodies, SSE split on the raw bytes) rather than httpx: httpx spends
~100 us of CPU per SSE event, which at thousands of tokens/s would make the load
generator, not the server, the bottleneck it measures. Its own CPU time is reported as
``client_cpu_s`` (it should stay well below ``duration_s``).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import random
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from .client import DEFAULT_URL, AsyncClient
from .loadgen_stats import SLO_KEYS, RequestRecord, check_slo, percentiles, summarize
from .workload import (
    CharCounter,
    SampledRequest,
    TokenCounter,
    add_shared_prefixes,
    arrival_offsets,
    load_sharegpt,
    make_prefixes,
    random_ids,
    random_requests,
    sample_sharegpt,
)

__all__ = [
    "LoadConfig",
    "RequestRecord",
    "check_loopback",
    "dispatch",
    "format_report",
    "format_sweep",
    "main",
    "percentiles",
    "plot_sweep",
    "run_load",
    "run_sweep",
    "summarize",
]

ENDPOINTS = {"generate": "/generate_stream", "completions": "/v1/completions", "chat": "/v1/chat/completions"}
DATASETS = ("fixed", "random", "sharegpt")
RUN_SEED_STRIDE = 1_000_003  # run i of a sweep samples with seed + i * stride: fresh prompts per rate


@dataclass
class LoadConfig:
    """One load-generation run (``rate`` None: closed loop at ``concurrency``)."""

    url: str = DEFAULT_URL
    api_key: str | None = None
    endpoint: str = "generate"
    num_requests: int = 100
    duration: float | None = None
    concurrency: int = 8
    rate: float | None = None  # requests/s, math.inf = all at once; None = closed loop
    burstiness: float = 1.0  # shape of the gamma-distributed gaps; 1.0 = Poisson
    max_concurrency: int | None = None  # open loop: cap on streams in flight
    dataset_name: str = "fixed"
    dataset_path: str | None = None
    prompt_tokens: int = 128  # fixed
    prompt: str | None = None  # fixed
    max_tokens: int = 64  # fixed
    random_input_len: int = 220  # random: mean prompt tokens
    random_output_len: int = 200  # random: mean output tokens
    random_sigma: float = 1.0  # random: log-normal spread (0 = every request the mean)
    tokenizer: str | None = None  # counts dataset prompts; default: the server's /tokenize
    shared_prefix_fraction: float = 0.0
    shared_prefix_len: int = 256
    num_shared_prefixes: int = 4
    slo_ms: dict[str, float] = field(default_factory=dict)  # ttft/itl/tpot/e2el limits for goodput
    temperature: float = 0.0
    ignore_eos: bool = True
    vocab_size: int | None = None  # default: the server's, from /v1/models
    max_model_len: int | None = None  # default: the server's, from /v1/models
    seed: int = 0
    timeout: float = 300.0
    allow_remote: bool = False
    disconnect_fraction: float = 0.0  # drop this share of streams after their first token


def _jsonable_rate(rate: float | None) -> float | str | None:
    return "inf" if rate is not None and math.isinf(rate) else rate


def _config_json(cfg: LoadConfig) -> dict[str, Any]:
    return asdict(cfg) | {"api_key": "***" if cfg.api_key else None, "rate": _jsonable_rate(cfg.rate)}


def check_loopback(url: str) -> None:
    """Raise ``ValueError`` unless every address ``url``'s host resolves to is loopback."""
    host = urlsplit(url).hostname
    if not host:
        raise ValueError(f"{url!r} has no host")
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from exc
    bad = sorted(a for a in addrs if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if bad:
        raise ValueError(f"{host!r} resolves to non-loopback {', '.join(bad)}; pass --allow-remote to load it anyway")


def _body(cfg: LoadConfig, req: SampledRequest) -> dict[str, Any]:
    common = {"max_tokens": req.output_len, "temperature": cfg.temperature, "ignore_eos": cfg.ignore_eos}
    if cfg.endpoint == "chat":
        system = [{"role": "system", "content": req.prefix}] if req.prefix is not None else []
        return {
            "messages": [*system, {"role": "user", "content": req.prompt}],
            "stream": True,
            "stream_options": {"include_usage": True},
            **common,
        }
    prompt: str | list[int] = req.prompt
    if isinstance(prompt, list) and isinstance(req.prefix, list):
        prompt = req.prefix + prompt
    elif req.prefix is not None:
        prompt = f"{req.prefix}\n\n{prompt}"
    if cfg.endpoint == "generate":
        return {("prompt_token_ids" if isinstance(prompt, list) else "prompt"): prompt, **common}
    return {"prompt": prompt, "stream": True, "stream_options": {"include_usage": True}, **common}


def _tokens_in(endpoint: str, data: dict[str, Any]) -> tuple[int, bool, dict[str, int] | None]:
    """(tokens this event brought, whether it is the last, usage if it carries it)."""
    if endpoint == "generate":
        return len(data.get("token_ids") or []), data.get("generated_text") is not None, data.get("usage")
    usage = data.get("usage")
    choices = data.get("choices") or []
    if not choices:
        return 0, False, usage
    choice = choices[0]
    piece = choice.get("text") if endpoint == "completions" else (choice.get("delta") or {}).get("content")
    # OpenAI chunks carry text, not ids; one chunk per engine delta counts as one token
    # unless the final usage says otherwise (the total is corrected from usage).
    return (1 if piece else 0), choice.get("finish_reason") is not None, usage


class _HTTPError(Exception):
    """A malformed or cut-short HTTP response."""


class _Conn:
    """One keep-alive HTTP/1.1 connection (the load generator's hot path)."""

    __slots__ = ("reader", "writer", "reusable", "reused")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reusable = True
        self.reused = False

    def close(self) -> None:
        self.reusable = False
        self.writer.transport.abort()  # no FIN handshake to wait for; the server sees a disconnect


class _Pool:
    """Idle connections to one origin, and the fixed head of every request."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        self.ssl = ssl.create_default_context() if self.https else None
        host = self.host if ":" not in self.host else f"[{self.host}]"
        if parts.port:
            host += f":{parts.port}"
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.headers = (
            f"Host: {host}\r\nAccept: text/event-stream\r\nContent-Type: application/json\r\n{extra}"
            "User-Agent: stream-attention-loadgen\r\n"
        )
        self.idle: list[_Conn] = []

    async def get(self, fresh: bool = False) -> _Conn:
        while self.idle and not fresh:
            conn = self.idle.pop()
            if not conn.writer.is_closing() and not conn.reader.at_eof():
                return conn
            conn.writer.transport.abort()
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl, limit=1 << 22)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(reader, writer)

    def put(self, conn: _Conn) -> None:
        if conn.reusable:
            conn.reused = True
            self.idle.append(conn)
        else:
            conn.writer.transport.abort()

    def close(self) -> None:
        for conn in self.idle:
            conn.writer.transport.abort()
        self.idle.clear()

    def request(self, path: str, body: bytes) -> bytes:
        return (
            f"POST {self.prefix}{path} HTTP/1.1\r\n{self.headers}Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )


async def _response_head(conn: _Conn) -> tuple[int, dict[str, str]]:
    head = await conn.reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    try:
        status = int(rest[:3])
    except ValueError as exc:
        raise _HTTPError(f"bad status line {lines[0]!r}") from exc
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if version == "HTTP/1.0" or "close" in headers.get("connection", "").lower():
        conn.reusable = False
    return status, headers


async def _body_parts(conn: _Conn, headers: dict[str, str]) -> Any:
    """The body as it arrives: chunk by chunk (chunked), or read by read."""
    reader = conn.reader
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            data = await reader.read(min(left, 1 << 16))
            if not data:
                raise _HTTPError("connection closed mid-body")
            left -= len(data)
            yield data
    else:  # delimited by the end of the connection
        conn.reusable = False
        while data := await reader.read(1 << 16):
            yield data


def _sse_data(block: bytes) -> bytes | None:
    """The ``data`` field of one SSE event block (lines joined by newlines), if any."""
    if block.startswith(b"data: ") and b"\n" not in block:
        return block[6:]  # the common case: one data line
    data = []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
    return b"\n".join(data) if data else None


async def _one(pool: _Pool, cfg: LoadConfig, req: SampledRequest, drop: bool) -> RequestRecord:
    rec = RequestRecord(ok=False, start=time.perf_counter())
    usage: dict[str, int] | None = None
    endpoint = cfg.endpoint
    request = pool.request(ENDPOINTS[endpoint], json.dumps(_body(cfg, req)).encode())
    conn: _Conn | None = None
    done = False
    try:
        async with asyncio.timeout(cfg.timeout):
            for fresh in (False, True):
                conn = await pool.get(fresh)
                conn.writer.write(request)
                try:
                    status, headers = await _response_head(conn)
                    break
                except (ConnectionError, asyncio.IncompleteReadError):
                    # A kept-alive connection the server closed just as it was reused
                    # (its idle timeout): the request never started; retry it once.
                    conn.close()
                    if fresh or not conn.reused:
                        raise
            rec.status = status
            if status >= 400:
                body = b"".join([part async for part in _body_parts(conn, headers)])
                rec.error = f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"
                return rec
            pending = b""
            # Read to the end of the body even after the last event (the terminating
            # chunk follows it at once), so the connection can carry the next request.
            async for part in _body_parts(conn, headers):
                if done:
                    continue
                pending = pending + part if pending else part
                if b"\r" in pending:
                    pending = pending.replace(b"\r\n", b"\n")
                if b"\n\n" not in pending:
                    continue
                *blocks, pending = pending.split(b"\n\n")
                now = time.perf_counter()
                for block in blocks:
                    data = _sse_data(block)
                    if data is None:
                        continue
                    if data == b"[DONE]":
                        done = True
                        break
                    obj = json.loads(data)
                    if "error" in obj and "choices" not in obj and "token" not in obj:
                        rec.error = f"stream error: {obj['error'].get('message')}"
                        conn.reusable = False
                        return rec
                    n, final, u = _tokens_in(endpoint, obj)
                    usage = u or usage
                    if n:
                        rec.tokens_arrived(now, n)
                        if drop:
                            conn.close()  # hang up mid-stream
                            rec.disconnected = True
                            rec.finished(now)
                            return rec
                    if final and endpoint == "generate":
                        done = True
                        break
    except (OSError, EOFError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
            _HTTPError) as exc:  # fmt: skip
        if conn is not None:
            conn.reusable = False
        rec.error = f"{type(exc).__name__}: {exc}"
        return rec
    finally:
        if conn is not None:
            pool.put(conn)
    rec.finished(time.perf_counter())
    rec.output_tokens = (usage or {}).get("completion_tokens", rec.output_tokens)
    rec.prompt_tokens = (usage or {}).get("prompt_tokens", req.prefix_len + req.prompt_len)
    return rec


# ----------------------------------------------------------------------------- token counting


class ServerTokenCounter:
    """Counts through the server's ``POST /tokenize`` (vLLM's shape: ``{prompt}`` → ``{count}``)."""

    name = "server /tokenize"

    def __init__(self, http: httpx.AsyncClient, parallel: int = 16) -> None:
        self.http = http
        self.gate = asyncio.Semaphore(parallel)

    async def _one(self, text: str) -> int:
        async with self.gate:
            response = await self.http.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
        response.raise_for_status()
        return int(response.json()["count"])

    async def count(self, texts: Sequence[str]) -> list[int]:
        try:
            return list(await asyncio.gather(*(self._one(t) for t in texts)))
        except (httpx.HTTPError, KeyError, TypeError) as exc:
            raise ValueError(f"counting dataset tokens through /tokenize failed: {exc}") from exc

    async def answers(self) -> bool:
        """Whether the route exists and counts (older servers have no ``/tokenize``)."""
        try:
            return (await self.count(["hello"]))[0] > 0
        except ValueError:
            return False


class HFTokenCounter:
    """Counts with a Hugging Face tokenizer (``--tokenizer NAME_OR_PATH``)."""

    def __init__(self, name_or_path: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise ValueError("--tokenizer needs transformers (pip install 'stream-attention[hf]')") from exc
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--tokenizer {name_or_path!r}: {exc}") from exc
        self.name = f"tokenizer {name_or_path}"

    async def count(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


async def _token_counter(cfg: LoadConfig, http: httpx.AsyncClient) -> TokenCounter:
    if cfg.tokenizer:
        return HFTokenCounter(cfg.tokenizer)
    server = ServerTokenCounter(http)
    return server if await server.answers() else CharCounter()


@lru_cache(maxsize=4)
def _sharegpt_cached(path: str, mtime_ns: int, size: int) -> list[tuple[str, str]]:
    return load_sharegpt(path)


def _load_dataset(path: str) -> list[tuple[str, str]]:
    """Parsed once per file version: every rate of a sweep samples the same file."""
    try:
        st = Path(path).stat()
    except OSError as exc:
        raise ValueError(f"--dataset-path {path!r}: {exc.strerror or exc}") from exc
    return _sharegpt_cached(path, st.st_mtime_ns, st.st_size)


# ----------------------------------------------------------------------------- workload and arrivals


@dataclass
class _ServerInfo:
    vocab_size: int
    max_model_len: int | None


async def _server_info(http: httpx.AsyncClient) -> _ServerInfo:
    try:
        response = await http.get("/v1/models")
        if response.status_code == 200:
            card = response.json()["data"][0]
            return _ServerInfo(int(card.get("vocab_size") or 1000), card.get("max_model_len"))
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        pass
    return _ServerInfo(1000, None)


async def _workload(
    cfg: LoadConfig, info: _ServerInfo, http: httpx.AsyncClient, rng: random.Random
) -> tuple[list[SampledRequest], str | None]:
    """The run's requests, and how dataset prompts were counted (``None`` if not needed)."""
    n = cfg.num_requests
    vocab = info.vocab_size
    ids = cfg.endpoint != "chat" and cfg.prompt is None and cfg.dataset_name != "sharegpt"
    context = cfg.max_model_len or info.max_model_len or 1 << 30
    prefixed = cfg.shared_prefix_fraction > 0
    budget = context - (cfg.shared_prefix_len if prefixed else 0)
    if budget < 2:
        raise ValueError(f"shared-prefix-len {cfg.shared_prefix_len} leaves no room in the context of {context}")
    counted_by = None
    if cfg.dataset_name == "fixed":
        text = cfg.prompt if cfg.prompt is not None else " ".join(["hello"] * cfg.prompt_tokens)
        requests = [
            SampledRequest(
                random_ids(cfg.prompt_tokens, vocab, rng) if ids else text,
                cfg.prompt_tokens if cfg.prompt is None else 0,  # a user's text: the server's usage counts it
                cfg.max_tokens,
            )
            for _ in range(n)
        ]
    elif cfg.dataset_name == "random":
        requests = random_requests(
            n, cfg.random_input_len, cfg.random_output_len, cfg.random_sigma, budget, rng, vocab if ids else None
        )
    else:
        pairs = _load_dataset(cfg.dataset_path or "")
        counter = await _token_counter(cfg, http)
        counted_by = counter.name
        requests = await sample_sharegpt(pairs, n, counter, budget, rng)
    if prefixed:
        # The same system prompts in every run of a sweep: later rates find them cached, as a
        # server in production would.
        prefix_rng = random.Random(f"shared-prefix/{cfg.seed}")
        prefixes = make_prefixes(cfg.num_shared_prefixes, cfg.shared_prefix_len, prefix_rng, vocab if ids else None)
        requests = add_shared_prefixes(requests, cfg.shared_prefix_fraction, prefixes, cfg.shared_prefix_len, rng)
    return requests, counted_by


def _describe_workload(cfg: LoadConfig, requests: list[SampledRequest], counted_by: str | None) -> dict[str, Any]:
    def mean(xs: list[int]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    return {
        "dataset": cfg.dataset_name,
        "token_counter": counted_by,
        "requests": len(requests),
        "shared_prefix_requests": sum(r.prefix is not None for r in requests),
        "mean_prompt_tokens": mean([r.prefix_len + r.prompt_len for r in requests]),
        "mean_output_tokens": mean([r.output_len for r in requests]),
    }


async def dispatch(
    offsets: Sequence[float],
    send: Callable[[int], Awaitable[None]],
    *,
    max_concurrency: int | None = None,
    deadline: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> int:
    """Start ``send(i)`` at ``offsets[i]`` seconds after the call; returns how many were started.

    With ``max_concurrency`` an arrival waits for a free slot before it is sent (its latencies
    count from then, as in vLLM); arrivals ``deadline`` seconds or more after the start are
    not sent. ``clock`` and ``sleep`` are injectable so schedules can be checked on a fake clock.
    """
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def gated(i: int) -> None:
        if gate is None:
            await send(i)
            return
        async with gate:
            await send(i)

    start = clock()
    tasks: list[asyncio.Task[None]] = []
    for i, offset in enumerate(offsets):
        delay = start + offset - clock()
        if delay > 0:
            await sleep(delay)
        if deadline is not None and clock() - start >= deadline:
            break
        tasks.append(asyncio.ensure_future(gated(i)))
    await asyncio.gather(*tasks)
    return len(tasks)


def _check(cfg: LoadConfig) -> None:
    if cfg.endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint={cfg.endpoint!r}: expected one of {', '.join(ENDPOINTS)}")
    if cfg.dataset_name not in DATASETS:
        raise ValueError(f"dataset_name={cfg.dataset_name!r}: expected one of {', '.join(DATASETS)}")
    if cfg.dataset_name == "sharegpt" and not cfg.dataset_path:
        raise ValueError("dataset_name=sharegpt needs --dataset-path")
    if cfg.num_requests < 1 or cfg.concurrency < 1 or cfg.max_tokens < 1 or cfg.prompt_tokens < 1:
        raise ValueError("num_requests, concurrency, max_tokens and prompt_tokens must be >= 1")
    if cfg.random_input_len < 1 or cfg.random_output_len < 1 or not cfg.random_sigma >= 0:
        raise ValueError("random_input_len and random_output_len must be >= 1, random_sigma >= 0")
    if cfg.rate is not None and not cfg.rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {cfg.rate}")
    if not (cfg.burstiness > 0 and math.isfinite(cfg.burstiness)):
        raise ValueError(f"burstiness must be a finite number > 0, got {cfg.burstiness}")
    if cfg.max_concurrency is not None and cfg.max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {cfg.max_concurrency}")
    if not 0.0 <= cfg.shared_prefix_fraction <= 1.0:
        raise ValueError(f"shared_prefix_fraction must be in [0, 1], got {cfg.shared_prefix_fraction}")
    if cfg.shared_prefix_len < 1 or cfg.num_shared_prefixes < 1:
        raise ValueError("shared_prefix_len and num_shared_prefixes must be >= 1")
    if not 0.0 <= cfg.disconnect_fraction <= 1.0:
        raise ValueError(f"disconnect_fraction must be in [0, 1], got {cfg.disconnect_fraction}")
    check_slo(cfg.slo_ms)


async def run_load(cfg: LoadConfig, run_index: int = 0) -> dict[str, Any]:
    """Run ``cfg``: ``{"config", "workload", "summary"}`` (times in seconds).

    ``run_index`` > 0 (later rates of a sweep) draws other prompts of the same distribution,
    so an earlier run's prompts do not sit in the server's prefix cache.
    """
    _check(cfg)
    if not cfg.allow_remote:
        check_loopback(cfg.url)
    rng = random.Random(cfg.seed + RUN_SEED_STRIDE * run_index)
    drops = random.Random(cfg.seed)
    client = AsyncClient(cfg.url, api_key=cfg.api_key, timeout=cfg.timeout)  # /v1/models, /tokenize
    pool = _Pool(client.base_url, client.headers)  # the streams (API key included)
    records: list[RequestRecord] = []
    try:
        info = await _server_info(client.http)
        if cfg.vocab_size:
            info.vocab_size = cfg.vocab_size
        requests, counted_by = await _workload(cfg, info, client.http, rng)

        start = time.perf_counter()
        cpu_start = time.process_time()
        deadline = start + cfg.duration if cfg.duration else None

        async def send(i: int) -> None:
            drop = drops.random() < cfg.disconnect_fraction
            records.append(await _one(pool, cfg, requests[i], drop))

        if cfg.rate is None:
            issued = 0

            async def worker() -> None:
                nonlocal issued
                while issued < len(requests) and (deadline is None or time.perf_counter() < deadline):
                    issued += 1
                    await send(issued - 1)

            await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        else:
            offsets = arrival_offsets(len(requests), cfg.rate, cfg.burstiness, rng)
            await dispatch(offsets, send, max_concurrency=cfg.max_concurrency, deadline=cfg.duration)
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
    finally:
        pool.close()
        await client.aclose()
    summary = summarize(records, elapsed, cfg.slo_ms)
    summary["client_cpu_s"] = cpu  # the load generator's own CPU time: it must stay far below duration_s
    return {"config": _config_json(cfg), "workload": _describe_workload(cfg, requests, counted_by), "summary": summary}


async def run_sweep(
    cfg: LoadConfig, rates: Sequence[float], progress: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """One :func:`run_load` per request rate, in order: ``{"config", "runs": [...]}``."""
    if not rates:
        raise ValueError("give at least one request rate")
    runs = []
    for i, rate in enumerate(rates):
        run = await run_load(replace(cfg, rate=rate), run_index=i)
        run["request_rate"] = _jsonable_rate(rate)
        runs.append(run)
        if progress is not None:
            progress(run)
    config = _config_json(cfg) | {"rate": None, "request_rates": [_jsonable_rate(r) for r in rates]}
    return {"config": config, "runs": runs}


# ----------------------------------------------------------------------------- reports


def _mode(c: dict[str, Any]) -> str:
    rate = c.get("rate")
    if rate is None:
        return f"closed loop x{c['concurrency']}"
    if rate == "inf":
        mode = "all at once"
    elif c.get("burstiness", 1.0) == 1.0:
        mode = f"Poisson {rate:g} req/s"
    else:
        mode = f"gamma arrivals {rate:g} req/s, burstiness {c['burstiness']:g}"
    return mode + (f", max concurrency {c['max_concurrency']}" if c.get("max_concurrency") else "")


def _workload_line(c: dict[str, Any], w: dict[str, Any] | None) -> str:
    if c.get("dataset_name", "fixed") == "fixed" or not w:
        return f"prompt {c['prompt_tokens']} tok, max_tokens {c['max_tokens']}"
    line = f"{w['dataset']}: mean prompt {w['mean_prompt_tokens']:.0f} tok, output {w['mean_output_tokens']:.0f} tok"
    if w.get("token_counter"):
        line += f", counted by {w['token_counter']}"
    if w.get("shared_prefix_requests"):
        line += f", {w['shared_prefix_requests']} with a shared {c['shared_prefix_len']}-token prefix"
    return line


def format_report(result: dict[str, Any]) -> str:
    """One run's summary as a fixed-width table (latencies in milliseconds)."""
    s = result["summary"]
    c = result["config"]
    lines = [
        f"{c['endpoint']} @ {c['url']}  ({_mode(c)}; {_workload_line(c, result.get('workload'))})",
        f"requests: {s['requests']}  completed: {s['completed']}  failed: {s['failed']}  disconnected: {s['disconnected']}"
        + (f"  errors: {s['errors']}" if s["errors"] else ""),
        f"duration: {s['duration_s']:.2f} s  throughput: {s['requests_per_s']:.2f} req/s, "
        f"{s['output_tokens_per_s']:.1f} output tok/s, {s['total_tokens_per_s']:.1f} total tok/s",
    ]
    if "goodput_requests_per_s" in s:
        slo = ", ".join(f"{k} <= {v:g} ms" for k, v in s["slo_ms"].items())
        lines.append(
            f"goodput: {s['goodput_requests_per_s']:.2f} req/s ({s['good_requests']} of {s['completed']} within {slo})"
        )
    lines.append(f"{'latency (ms)':<14}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}")
    for name, key in (("TTFT", "ttft_s"), ("ITL", "itl_s"), ("TPOT", "tpot_s"), ("end-to-end", "e2e_s")):
        row = s[key]
        cells = "".join(
            f"{row[q] * 1e3:>10.1f}" if row[q] is not None else f"{'n/a':>10}" for q in ("p50", "p90", "p99", "mean")
        )
        lines.append(f"{name:<14}{cells}")
    return "\n".join(lines)


def _ms(x: float | None) -> str:
    return f"{x * 1e3:.1f}" if x is not None else "n/a"


def format_sweep(sweep: dict[str, Any]) -> str:
    """One line per request rate: throughputs, goodput and the headline latencies (ms)."""
    cols = ("rate", "req/s", "goodput", "out tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "TPOT p50",
            "E2E p50")  # fmt: skip
    lines = ["".join(f"{c:>10}" for c in cols)]
    for run in sweep["runs"]:
        s = run["summary"]
        rate = run["request_rate"]
        good = s.get("goodput_requests_per_s")
        cells = (
            rate if isinstance(rate, str) else f"{rate:g}",
            f"{s['requests_per_s']:.2f}",
            f"{good:.2f}" if good is not None else "n/a",
            f"{s['output_tokens_per_s']:.1f}",
            _ms(s["ttft_s"]["p50"]), _ms(s["ttft_s"]["p99"]), _ms(s["itl_s"]["p50"]), _ms(s["itl_s"]["p99"]),
            _ms(s["tpot_s"]["p50"]), _ms(s["e2e_s"]["p50"]),
        )  # fmt: skip
        lines.append("".join(f"{c:>10}" for c in cells))
    return "\n".join(lines)


def plot_sweep(sweep: dict[str, Any], path: str | Path) -> None:
    """A PNG: TTFT and ITL p50/p99 (left) and throughput/goodput (right) against request rate.

    Rates sit at evenly spaced positions labelled with their values, so ``inf`` has a place.
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise ValueError("--plot needs matplotlib (pip install 'stream-attention[plot]')") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    runs = sweep["runs"]
    x = list(range(len(runs)))
    labels = [str(r["request_rate"]) if isinstance(r["request_rate"], str) else f"{r['request_rate']:g}" for r in runs]

    def series(key: str, q: str) -> list[float]:
        return [v * 1e3 if (v := r["summary"][key][q]) is not None else math.nan for r in runs]

    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, name, color in (("ttft_s", "TTFT", "tab:blue"), ("itl_s", "ITL", "tab:orange")):
        lat.plot(x, series(key, "p50"), "o-", color=color, label=f"{name} p50")
        lat.plot(x, series(key, "p99"), "s--", color=color, label=f"{name} p99")
    lat.set_yscale("log")
    for axis in (lat.yaxis.set_major_formatter, lat.yaxis.set_minor_formatter):
        axis(FormatStrFormatter("%g"))
    lat.set_ylabel("latency (ms)")
    lat.set_title("Latency percentiles")
    thr.plot(x, [r["summary"]["requests_per_s"] for r in runs], "o-", label="throughput")
    if all("goodput_requests_per_s" in r["summary"] for r in runs):
        slo = ", ".join(f"{k}<={v:g}ms" for k, v in runs[0]["summary"]["slo_ms"].items())
        thr.plot(x, [r["summary"]["goodput_requests_per_s"] for r in runs], "s--", label=f"goodput ({slo})")
    thr.set_ylabel("requests/s")
    thr.set_ylim(bottom=0)
    thr.set_title("Throughput and goodput")
    tokens = thr.twinx()
    tokens.plot(x, [r["summary"]["output_tokens_per_s"] for r in runs], "^:", color="tab:green", label="output tok/s")
    tokens.set_ylabel("output tokens/s")
    tokens.set_ylim(bottom=0)
    for ax in (lat, thr):
        ax.set_xticks(x, labels)
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
    lat.legend(fontsize=8)
    handles = thr.get_legend_handles_labels()
    more = tokens.get_legend_handles_labels()
    thr.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="upper left")
    c = sweep["config"]
    fig.suptitle(f"{c['endpoint']} @ {c['url']}: {c['num_requests']} requests per rate, dataset {c['dataset_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a rate > 0 or 'inf', got {text!r}")
    return value


def _slo_pair(text: str) -> tuple[str, float]:
    key, sep, value = text.partition(":")
    try:
        ms = float(value)
    except ValueError:
        ms = math.nan
    if not sep or key not in SLO_KEYS or not ms > 0:
        raise argparse.ArgumentTypeError(f"expected KEY:MS with KEY in {', '.join(SLO_KEYS)} and MS > 0, got {text!r}")
    return key, ms


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stream-attention-loadgen",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = LoadConfig()
    p.add_argument("--url", default=d.url)
    p.add_argument("--api-key", default=None)
    p.add_argument("--endpoint", choices=sorted(ENDPOINTS), default=d.endpoint)
    p.add_argument("--num-requests", "--num-prompts", "-n", type=int, default=d.num_requests, help="per rate")
    p.add_argument("--duration", type=float, default=None, help="stop issuing requests after this many seconds")

    arrivals = p.add_argument_group("arrivals")
    arrivals.add_argument("--concurrency", "-c", type=int, default=d.concurrency, help="closed loop: streams in flight")
    arrivals.add_argument(
        "--request-rate", type=_rate, nargs="+", metavar="RATE",
        help="open loop: requests/s, 'inf' = all at once; several values make a sweep",
    )  # fmt: skip
    arrivals.add_argument("--rate", type=_rate, default=None, help="open loop at one rate (legacy JSON shape)")
    arrivals.add_argument(
        "--burstiness", type=float, default=d.burstiness,
        help="shape of the gamma-distributed gaps: 1.0 = Poisson, < 1 burstier, > 1 more regular",
    )  # fmt: skip
    arrivals.add_argument(
        "--max-concurrency", "--max-in-flight", dest="max_concurrency", type=int, default=None,
        help="open loop: cap on streams in flight (later arrivals wait)",
    )  # fmt: skip

    data = p.add_argument_group("requests")
    data.add_argument(
        "--dataset-name", choices=DATASETS, default=None,
        help="fixed lengths (default), log-normal random lengths, or a ShareGPT file (default with --dataset-path)",
    )  # fmt: skip
    data.add_argument("--dataset-path", default=None, help="ShareGPT JSON or JSONL file")
    data.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens, help="fixed: prompt length")
    data.add_argument("--prompt", default=None, help="fixed: this text prompt instead of random token ids")
    data.add_argument("--max-tokens", type=int, default=d.max_tokens, help="fixed: output length")
    data.add_argument("--random-input-len", type=int, default=d.random_input_len, help="random: mean prompt tokens")
    data.add_argument("--random-output-len", type=int, default=d.random_output_len, help="random: mean output tokens")
    data.add_argument(
        "--random-sigma", type=float, default=d.random_sigma, help="random: log-normal spread (0 = fixed at the mean)"
    )
    data.add_argument(
        "--tokenizer", default=None,
        help="Hugging Face tokenizer counting dataset prompts (default: the server's /tokenize, else 4 chars/token)",
    )  # fmt: skip
    data.add_argument(
        "--shared-prefix-fraction", type=float, default=0.0, help="share of requests starting with a shared prompt"
    )
    data.add_argument("--shared-prefix-len", type=int, default=d.shared_prefix_len, help="shared prompt tokens")
    data.add_argument("--num-shared-prefixes", type=int, default=d.num_shared_prefixes, help="distinct shared prompts")
    data.add_argument("--temperature", type=float, default=d.temperature)
    data.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    data.add_argument("--vocab-size", type=int, default=None)
    data.add_argument("--max-model-len", type=int, default=None, help="context to clip lengths to (default: server's)")
    data.add_argument("--seed", type=int, default=d.seed)
    data.add_argument(
        "--disconnect-fraction", type=float, default=0.0, help="hang up this share of streams after their first token"
    )

    slo = p.add_argument_group("goodput (requests meeting every given SLO, per second)")
    for key, what in (("ttft", "time to first token"), ("itl", "largest inter-token gap"),
                      ("tpot", "time per output token"), ("e2el", "end-to-end latency")):  # fmt: skip
        slo.add_argument(f"--slo-{key}-ms", type=float, default=None, help=f"SLO on the request's {what}")
    slo.add_argument("--goodput", type=_slo_pair, nargs="+", metavar="KEY:MS", default=[], help="vLLM's spelling")

    p.add_argument("--timeout", type=float, default=d.timeout)
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
    p.add_argument("--json", metavar="PATH", help="write config and summaries as JSON ('-' = stdout)")
    p.add_argument("--plot", metavar="PATH", help="PNG of latencies and throughput against request rate")
    return p


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    slo_ms = dict(args.goodput)
    for key in SLO_KEYS:
        if (value := getattr(args, f"slo_{key}_ms")) is not None:
            slo_ms[key] = value
    return LoadConfig(
        url=args.url,
        api_key=args.api_key,
        endpoint=args.endpoint,
        num_requests=args.num_requests,
        duration=args.duration,
        concurrency=args.concurrency,
        rate=args.rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        dataset_name=args.dataset_name or ("sharegpt" if args.dataset_path else "fixed"),
        dataset_path=args.dataset_path,
        prompt_tokens=args.prompt_tokens,
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        random_input_len=args.random_input_len,
        random_output_len=args.random_output_len,
        random_sigma=args.random_sigma,
        tokenizer=args.tokenizer,
        shared_prefix_fraction=args.shared_prefix_fraction,
        shared_prefix_len=args.shared_prefix_len,
        num_shared_prefixes=args.num_shared_prefixes,
        slo_ms=slo_ms,
        temperature=args.temperature,
        ignore_eos=not args.no_ignore_eos,
        vocab_size=args.vocab_size,
        max_model_len=args.max_model_len,
        seed=args.seed,
        timeout=args.timeout,
        allow_remote=args.allow_remote,
        disconnect_fraction=args.disconnect_fraction,
    )


def _as_sweep(run: dict[str, Any]) -> dict[str, Any]:
    """A single run in the sweep shape, for the plot (closed loop plots at 'closed')."""
    rate = run["config"]["rate"]
    return {"config": run["config"], "runs": [run | {"request_rate": "closed" if rate is None else rate}]}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rate is not None and args.request_rate:
        parser.error("give --request-rate or --rate, not both")
    cfg = config_from_args(args)
    quiet = args.json == "-"
    try:
        if args.request_rate:

            def progress(run: dict[str, Any]) -> None:
                if not quiet:
                    print(format_report(run) + "\n", flush=True)

            result = asyncio.run(run_sweep(cfg, args.request_rate, progress))
            runs = result["runs"]
        else:
            result = asyncio.run(run_load(cfg))
            runs = [result]
            if not quiet:
                print(format_report(result))
        if args.plot:
            plot_sweep(result if args.request_rate else _as_sweep(result), args.plot)
    except ValueError as exc:
        print(f"stream-attention-loadgen: {exc}", file=sys.stderr)
        return 2
    if quiet:
        print(json.dumps(result, indent=2))
    else:
        if args.request_rate and len(runs) > 1:
            print(format_sweep(result))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=2)
    return 0 if all(run["summary"]["completed"] for run in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
