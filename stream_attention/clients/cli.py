"""``stream-attention-client``: talk to a running server from the terminal.

Examples::

    stream-attention-client generate "Once upon a time" --max-tokens 64      # streams tokens
    stream-attention-client chat "Write a haiku about GPUs" --system "Be terse."
    stream-attention-client benchmark --seq 512 1024 --heads 8 --dim 64
    stream-attention-client benchmark --kind generation --num-requests 16 --max-tokens 32
    stream-attention-client health | ready | models | memory | metrics

The server URL comes from ``--url`` or ``STREAM_ATTENTION_URL`` (default
``http://127.0.0.1:8000``), the API key from ``--api-key`` or ``STREAM_ATTENTION_API_KEY``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import httpx

from .client import APIError, Client


def _sampling_flags(p: argparse.ArgumentParser, default_max_tokens: int | None) -> None:
    p.add_argument("--max-tokens", type=int, default=default_max_tokens)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer (implies --no-stream)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-attention-client",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", default=None, help="server URL (env STREAM_ATTENTION_URL)")
    parser.add_argument("--api-key", default=None, help="bearer token (env STREAM_ATTENTION_API_KEY)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each response/token")
    parser.add_argument("--retries", type=int, default=4, help="retries on 429/503 and refused connections")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete a prompt ('-' reads stdin), streaming tokens")
    gen.add_argument("prompt")
    _sampling_flags(gen, 128)

    chat = sub.add_parser("chat", help="one chat turn through /v1/chat/completions")
    chat.add_argument("message", help="user message ('-' reads stdin)")
    chat.add_argument("--system", default=None)
    chat.add_argument("--model", default=None)
    _sampling_flags(chat, None)

    bench = sub.add_parser("benchmark", help="run POST /benchmark and print its table")
    bench.add_argument("--kind", choices=["kernel", "generation"], default="kernel")
    bench.add_argument("--seq", type=int, nargs="+", default=None, help="kernel: sequence lengths")
    bench.add_argument("--batch", type=int, default=None)
    bench.add_argument("--heads", type=int, default=None)
    bench.add_argument("--kv-heads", type=int, default=None)
    bench.add_argument("--dim", type=int, default=None)
    bench.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None)
    bench.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None)
    bench.add_argument("--warmup", type=int, default=None)
    bench.add_argument("--iters", type=int, default=None)
    bench.add_argument("--num-requests", type=int, default=None, help="generation: requests")
    bench.add_argument("--concurrency", type=int, default=None, help="generation: requests in flight")
    bench.add_argument("--prompt-tokens", type=int, default=None, help="generation: prompt length")
    bench.add_argument("--max-tokens", type=int, default=None, help="generation: tokens per request")
    bench.add_argument("--json", action="store_true", help="print the raw JSON answer")

    for name, text in (
        ("health", "liveness"),
        ("ready", "readiness (exit 1 if not ready)"),
        ("models", "served models"),
        ("memory", "memory profile"),
        ("metrics", "Prometheus exposition"),
    ):
        sub.add_parser(name, help=text)
    return parser


def _read(text: str) -> str:
    return sys.stdin.read() if text == "-" else text


def _params(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
    }


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _generate(client: Client, args: argparse.Namespace) -> int:
    prompt = _read(args.prompt)
    params = _params(args)
    if args.no_stream or args.json:
        result = client.generate(prompt, **params)
        if args.json:
            _print_json(result.raw)
        else:
            print(result.text)
        return 0
    start = time.perf_counter()
    first: float | None = None
    final = None
    for ev in client.generate_stream(prompt, **params):
        if ev.text:
            first = first if first is not None else time.perf_counter() - start
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        if ev.finished:
            final = ev
    sys.stdout.write("\n")
    if final is not None:
        elapsed = time.perf_counter() - start
        n = (final.usage or {}).get("completion_tokens", 0)
        ttft = f"{first * 1e3:.0f} ms" if first is not None else "n/a"
        print(
            f"[{final.finish_reason}; {n} tokens; first token {ttft}; {n / elapsed:.1f} tok/s; id {final.request_id}]",
            file=sys.stderr,
        )
    return 0


def _chat(client: Client, args: argparse.Namespace) -> int:
    message = _read(args.message)
    params = _params(args)
    if args.no_stream or args.json:
        result = client.chat(message, system=args.system, model=args.model, **params)
        if args.json:
            _print_json(result)
        else:
            print(result["choices"][0]["message"]["content"])
        return 0
    for piece in client.chat_stream(message, system=args.system, model=args.model, **params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _benchmark(client: Client, args: argparse.Namespace) -> int:
    spec: dict[str, Any] = {"kind": args.kind}
    fields = (
        ("seq_lens", args.seq),
        ("batch", args.batch),
        ("heads", args.heads),
        ("kv_heads", args.kv_heads),
        ("dim", args.dim),
        ("causal", args.causal),
        ("dtype", args.dtype),
        ("warmup", args.warmup),
        ("iters", args.iters),
    )
    if args.kind == "generation":
        fields = (
            ("num_requests", args.num_requests),
            ("concurrency", args.concurrency),
            ("prompt_tokens", args.prompt_tokens),
            ("max_tokens", args.max_tokens),
        )
    spec.update({k: v for k, v in fields if v is not None})
    result = client.benchmark(**spec)
    if args.json:
        _print_json(result)
    elif result.get("kind") == "kernel":
        print(result["table"])
        for row in result["rows"]:
            if "error" in row:
                print(f"  {row['impl']} @ {row['seq_len']}: {row['error']}", file=sys.stderr)
    else:
        print(
            f"{result['completed']} requests in {result['elapsed_s']:.2f} s: "
            f"{result['output_tokens_per_s']:.1f} output tok/s, TTFT p50 {result['ttft_s']['p50']}, e2e p50 {result['e2e_s']['p50']}"
        )
    if result.get("truncated"):
        print("(stopped early: the server's benchmark time budget ran out)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with Client(args.url, api_key=args.api_key, timeout=args.timeout, max_retries=args.retries) as client:
            if args.command == "generate":
                return _generate(client, args)
            if args.command == "chat":
                return _chat(client, args)
            if args.command == "benchmark":
                return _benchmark(client, args)
            if args.command == "ready":
                ok = client.ready()
                print("ready" if ok else "not ready")
                return 0 if ok else 1
            if args.command == "metrics":
                sys.stdout.write(client.metrics())
                return 0
            result = {"health": client.health, "models": client.models, "memory": client.memory}[args.command]()
            _print_json(result)
            return 0
    except APIError as exc:
        print(f"stream-attention-client: server error {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"stream-attention-client: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
