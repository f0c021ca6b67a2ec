"""``stream-attention-loadgen``: load a server with streaming requests and report latencies.

Arrivals are closed-loop (``--concurrency C``: C streams, each starting the next request
when its previous one ends) or open-loop Poisson (``--rate R`` requests/s, capped at
``--max-in-flight``). A run stops after ``--num-requests`` requests or ``--duration``
seconds, whichever comes first. Every request streams, so the report has time to first
token (TTFT), inter-token latency (ITL, each gap between events shared among the tokens
it brought), end-to-end latency and throughput, as p50/p90/p99 in a table and as JSON.

Prompts are random token ids of ``--prompt-tokens`` length (``/generate_stream`` and
``/v1/completions`` take ids), or ``--prompt TEXT``; ``ignore_eos`` makes every request
generate exactly ``--max-tokens``. Targets must be loopback addresses unless
``--allow-remote`` is given, so a typo cannot load someone else's server.

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
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from .client import DEFAULT_URL, AsyncClient

ENDPOINTS = {"generate": "/generate_stream", "completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class LoadConfig:
    """One load-generation run."""

    url: str = DEFAULT_URL
    api_key: str | None = None
    endpoint: str = "generate"
    num_requests: int = 100
    duration: float | None = None
    concurrency: int = 8
    rate: float | None = None  # requests/s (Poisson); None = closed loop at ``concurrency``
    max_in_flight: int = 256
    prompt_tokens: int = 128
    prompt: str | None = None
    max_tokens: int = 64
    temperature: float = 0.0
    ignore_eos: bool = True
    vocab_size: int | None = None  # default: the server's, from /v1/models
    seed: int = 0
    timeout: float = 300.0
    allow_remote: bool = False
    disconnect_fraction: float = 0.0  # drop this share of streams after their first token


@dataclass
class RequestRecord:
    ok: bool
    status: int | None = None
    error: str | None = None
    start: float = 0.0
    ttft: float | None = None
    e2e: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    disconnected: bool = False


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99 (nearest rank) and mean; ``None`` when there are no values."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "mean": statistics.fmean(ordered)}


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


def _body(cfg: LoadConfig, prompt_ids: list[int] | None) -> dict[str, Any]:
    common = {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "ignore_eos": cfg.ignore_eos}
    if cfg.endpoint == "generate":
        return {**({"prompt": cfg.prompt} if prompt_ids is None else {"prompt_token_ids": prompt_ids}), **common}
    if cfg.endpoint == "completions":
        prompt: Any = cfg.prompt if prompt_ids is None else prompt_ids
        return {"prompt": prompt, "stream": True, "stream_options": {"include_usage": True}, **common}
    text = cfg.prompt if cfg.prompt is not None else " ".join(["hello"] * cfg.prompt_tokens)
    return {
        "messages": [{"role": "user", "content": text}],
        "stream": True,
        "stream_options": {"include_usage": True},
        **common,
    }


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


async def _one(pool: _Pool, cfg: LoadConfig, prompt_ids: list[int] | None, drop: bool) -> RequestRecord:
    rec = RequestRecord(ok=False, start=time.perf_counter())
    last: float | None = None
    counted = 0
    usage: dict[str, int] | None = None
    endpoint = cfg.endpoint
    request = pool.request(ENDPOINTS[endpoint], json.dumps(_body(cfg, prompt_ids)).encode())
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
                        if last is None:
                            rec.ttft = now - rec.start
                        else:
                            rec.itl.extend([(now - last) / n] * n)
                        last = now
                        counted += n
                        if drop:
                            conn.close()  # hang up mid-stream
                            rec.disconnected = True
                            rec.ok = True
                            rec.output_tokens = counted
                            rec.e2e = now - rec.start
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
    rec.e2e = time.perf_counter() - rec.start
    rec.output_tokens = (usage or {}).get("completion_tokens", counted)
    rec.prompt_tokens = (usage or {}).get("prompt_tokens", len(prompt_ids or []))
    rec.ok = True
    return rec


async def _vocab(http: httpx.AsyncClient) -> int:
    try:
        response = await http.get("/v1/models")
        if response.status_code == 200:
            return int(response.json()["data"][0].get("vocab_size") or 1000)
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        pass
    return 1000


async def run_load(cfg: LoadConfig) -> dict[str, Any]:
    """Run ``cfg`` and return ``{"config", "summary", "requests"}`` (times in seconds)."""
    if cfg.endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint={cfg.endpoint!r}: expected one of {', '.join(ENDPOINTS)}")
    if not cfg.allow_remote:
        check_loopback(cfg.url)
    if cfg.num_requests < 1 or cfg.concurrency < 1 or cfg.max_tokens < 1 or cfg.prompt_tokens < 1:
        raise ValueError("num_requests, concurrency, max_tokens and prompt_tokens must be >= 1")
    rng = random.Random(cfg.seed)
    client = AsyncClient(cfg.url, api_key=cfg.api_key, timeout=cfg.timeout)  # the one-off /v1/models
    pool = _Pool(client.base_url, client.headers)  # the streams (API key included)
    records: list[RequestRecord] = []
    try:
        vocab = cfg.vocab_size or await _vocab(client.http)
        low = min(10, vocab - 1)
        ids = range(low, vocab)

        def prompt_ids() -> list[int] | None:
            if cfg.prompt is not None or cfg.endpoint == "chat":
                return None
            return rng.choices(ids, k=cfg.prompt_tokens)

        start = time.perf_counter()
        cpu_start = time.process_time()
        deadline = start + cfg.duration if cfg.duration else None
        issued = 0

        def more() -> bool:
            return issued < cfg.num_requests and (deadline is None or time.perf_counter() < deadline)

        async def run_one() -> None:
            drop = rng.random() < cfg.disconnect_fraction
            records.append(await _one(pool, cfg, prompt_ids(), drop))

        if cfg.rate is None:

            async def worker() -> None:
                nonlocal issued
                while more():
                    issued += 1
                    await run_one()

            await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        else:
            gate = asyncio.Semaphore(cfg.max_in_flight)
            tasks: list[asyncio.Task[None]] = []

            async def gated() -> None:
                try:
                    await run_one()
                finally:
                    gate.release()

            next_at = start
            while more():
                next_at += rng.expovariate(cfg.rate)
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not more():
                    break
                await gate.acquire()
                issued += 1
                tasks.append(asyncio.ensure_future(gated()))
            await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
    finally:
        pool.close()
        await client.aclose()
    summary = summarize(records, elapsed)
    summary["client_cpu_s"] = cpu  # the load generator's own CPU time: it must stay far below duration_s
    return {"config": asdict(cfg) | {"api_key": "***" if cfg.api_key else None}, "summary": summary}


def summarize(records: list[RequestRecord], elapsed: float) -> dict[str, Any]:
    ok = [r for r in records if r.ok and not r.disconnected]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = str(r.status) if r.status and r.status >= 400 else (r.error or "error").split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    out_tokens = sum(r.output_tokens for r in records if r.ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [
        (r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.e2e and r.output_tokens > 1
    ]
    return {
        "requests": len(records),
        "completed": len(ok),
        "disconnected": sum(r.disconnected for r in records),
        "failed": sum(not r.ok for r in records),
        "errors": errors,
        "duration_s": elapsed,
        "requests_per_s": len(ok) / elapsed if elapsed > 0 else 0.0,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / elapsed if elapsed > 0 else 0.0,
        "total_tokens_per_s": (out_tokens + prompt_tokens) / elapsed if elapsed > 0 else 0.0,
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": percentiles([x for r in ok for x in r.itl]),
        "tpot_s": percentiles(tpot),
        "e2e_s": percentiles([r.e2e for r in ok if r.e2e is not None]),
    }


def format_report(result: dict[str, Any]) -> str:
    """The summary as a fixed-width table (latencies in milliseconds)."""
    s = result["summary"]
    c = result["config"]
    mode = f"closed loop x{c['concurrency']}" if c.get("rate") is None else f"Poisson {c['rate']:g} req/s"
    lines = [
        f"{c['endpoint']} @ {c['url']}  ({mode}; prompt {c['prompt_tokens']} tok, max_tokens {c['max_tokens']})",
        f"requests: {s['requests']}  completed: {s['completed']}  failed: {s['failed']}  disconnected: {s['disconnected']}"
        + (f"  errors: {s['errors']}" if s["errors"] else ""),
        f"duration: {s['duration_s']:.2f} s  throughput: {s['requests_per_s']:.2f} req/s, "
        f"{s['output_tokens_per_s']:.1f} output tok/s, {s['total_tokens_per_s']:.1f} total tok/s",
        f"{'latency (ms)':<14}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}",
    ]
    for name, key in (("TTFT", "ttft_s"), ("ITL", "itl_s"), ("TPOT", "tpot_s"), ("end-to-end", "e2e_s")):
        row = s[key]
        cells = "".join(
            f"{row[q] * 1e3:>10.1f}" if row[q] is not None else f"{'n/a':>10}" for q in ("p50", "p90", "p99", "mean")
        )
        lines.append(f"{name:<14}{cells}")
    return "\n".join(lines)


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
    p.add_argument("--num-requests", "-n", type=int, default=d.num_requests)
    p.add_argument("--duration", type=float, default=None, help="stop issuing requests after this many seconds")
    p.add_argument("--concurrency", "-c", type=int, default=d.concurrency, help="closed loop: streams in flight")
    p.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals, requests/s")
    p.add_argument("--max-in-flight", type=int, default=d.max_in_flight, help="open loop: cap on streams in flight")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--prompt", default=None, help="fixed text prompt instead of random token ids")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--timeout", type=float, default=d.timeout)
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
    p.add_argument(
        "--disconnect-fraction", type=float, default=0.0, help="hang up this share of streams after their first token"
    )
    p.add_argument("--json", metavar="PATH", help="write config and summary as JSON ('-' = stdout)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = LoadConfig(
        url=args.url,
        api_key=args.api_key,
        endpoint=args.endpoint,
        num_requests=args.num_requests,
        duration=args.duration,
        concurrency=args.concurrency,
        rate=args.rate,
        max_in_flight=args.max_in_flight,
        prompt_tokens=args.prompt_tokens,
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        ignore_eos=not args.no_ignore_eos,
        vocab_size=args.vocab_size,
        seed=args.seed,
        timeout=args.timeout,
        allow_remote=args.allow_remote,
        disconnect_fraction=args.disconnect_fraction,
    )
    try:
        result = asyncio.run(run_load(cfg))
    except ValueError as exc:
        print(f"stream-attention-loadgen: {exc}", file=sys.stderr)
        return 2
    if args.json == "-":
        print(json.dumps(result, indent=2))
    else:
        print(format_report(result))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=2)
    return 0 if result["summary"]["completed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
