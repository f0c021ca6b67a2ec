"""GPU benchmark of the HTTP server: what serving over HTTP costs against the engine alone.

    python benchmarks/bench_server.py --out server.json [--quick]

Model: a 1B-shaped Llama with random weights (hidden 2048, 16 layers, 32/8 heads,
intermediate 8192, vocab 128256, bf16), the same as ``bench_engine.py``'s throughput case.
Workload: prompts of 512 random token ids, 128 generated tokens each, EOS ignored.

For 1, 16 and 64 concurrent streams (closed loop, 2-4 requests per stream):

- ``direct``: the same requests through ``AsyncEngine.stream`` in this process, no HTTP;
- ``http``: ``stream-attention-loadgen`` in a separate process, streaming over loopback
  from ``stream-attention-serve``'s app (uvicorn, in this process) serving that engine.

Plus the offline figure (``LLMEngine.generate`` on all prompts at once). The ratio
``http / direct`` output tokens/s at 64 streams is the HTTP layer's cost (goal: > 0.9).
Every request streams, so TTFT/ITL/e2e percentiles come from the stream events.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT_LEN = 512
VOCAB = 128256
# --smoke: a tiny model on CPU, to check this script end to end without a GPU.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
}


def _wordlevel_tokenizer(vocab: int) -> Any:
    """An offline tokenizer covering every id of the random model (its text is irrelevant)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", pad_token="t0")


def build_engine(max_num_seqs: int, smoke: bool = False, kv_bytes: int = 8 << 30) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    from stream_attention.engine import AsyncEngine, LLMEngine

    shape = dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=VOCAB,
    )
    if smoke:
        shape.update(TINY)
    cfg = LlamaConfig(
        **shape,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    device = "cpu" if smoke else "cuda"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.float32 if smoke else torch.bfloat16).eval()
    llm = LLMEngine(
        model,
        _wordlevel_tokenizer(cfg.vocab_size),
        device=device,
        kv_cache_memory_bytes=(64 << 20) if smoke else kv_bytes,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=16384,
        max_model_len=1024,
        enable_prefix_caching=False,
    )
    return AsyncEngine(engine=llm)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, _vocab[0], (n, PROMPT_LEN), generator=g).tolist()


_vocab = [VOCAB]


def _pct(values: list[float]) -> dict[str, float | None]:
    from stream_attention.clients.loadgen import percentiles

    return percentiles(values)


def offline(engine: Any, n: int, gen: int) -> dict[str, Any]:
    """``LLMEngine.generate`` on ``n`` prompts at once (run before the async loop owns it)."""
    from stream_attention.engine import SamplingParams

    llm = engine.engine
    sp = SamplingParams(max_tokens=gen, ignore_eos=True)
    llm.generate(_prompts(min(n, 8), 99), SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
    _sync()
    t0 = time.perf_counter()
    outs = llm.generate(_prompts(n, 1), sp)
    _sync()
    s = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    return {"requests": n, "gen_tokens": gen, "seconds": s, "output_tokens_per_s": tokens / s}


async def _direct(engine: Any, concurrency: int, n: int, gen: int, seed: int) -> dict[str, Any]:
    """Closed loop of ``concurrency`` streams straight on ``AsyncEngine`` (no HTTP)."""
    from stream_attention.engine import Request, SamplingParams

    prompts = _prompts(n, seed)
    ttft, itl, e2e = [], [], []
    tokens = 0
    next_i = 0

    async def worker() -> None:
        nonlocal next_i, tokens
        while next_i < n:
            i = next_i
            next_i += 1
            req = Request(
                f"direct-{seed}-{i}",
                prompts[i],
                SamplingParams(max_tokens=gen, ignore_eos=True),
                arrival_time=time.time(),
            )
            t0 = time.perf_counter()
            last = None
            async for out in engine.stream(req):
                now = time.perf_counter()
                k = len(out.delta_token_ids)
                if k:
                    if last is None:
                        ttft.append(now - t0)
                    else:
                        itl.extend([(now - last) / k] * k)
                    last = now
                if out.finished:
                    tokens += len(out.token_ids)
            e2e.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    s = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "requests": n,
        "seconds": s,
        "output_tokens_per_s": tokens / s,
        "requests_per_s": n / s,
        "ttft_s": _pct(ttft),
        "itl_s": _pct(itl),
        "e2e_s": _pct(e2e),
    }


class _Server:
    """The server's app on a loopback port, uvicorn in a background thread."""

    def __init__(self, engine: Any) -> None:
        import uvicorn

        from stream_attention.server import ServerSettings, create_app

        settings = ServerSettings(_env_file=None, max_queue=4096, max_tokens=1024, log_level="warning")
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(settings, engine=engine), log_level="warning", access_log=False)
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def http_load(url: str, concurrency: int, n: int, gen: int, seed: int) -> dict[str, Any]:
    """``stream-attention-loadgen`` in its own process, so the client does not share our GIL."""
    with tempfile.NamedTemporaryFile(suffix=".json") as fh:
        cmd = [
            sys.executable, "-m", "stream_attention.clients.loadgen",
            "--url", url, "--endpoint", "generate", "--concurrency", str(concurrency), "-n", str(n),
            "--prompt-tokens", str(PROMPT_LEN), "--max-tokens", str(gen), "--vocab-size", str(_vocab[0]),
            "--seed", str(seed), "--json", fh.name,
        ]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
        if r.returncode != 0:
            return {"concurrency": concurrency, "error": (r.stdout + r.stderr)[-2000:]}
        print(r.stdout, flush=True)
        summary = json.loads(Path(fh.name).read_text())["summary"]
    return {"concurrency": concurrency, **summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="write results as JSON here")
    parser.add_argument("--quick", action="store_true", help="fewer requests and tokens")
    parser.add_argument("--kv-gib", type=float, default=8.0, help="engine KV cache size")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script, measures nothing")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("bench_server.py needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 1
    if args.smoke:
        _vocab[0] = TINY["vocab_size"]
    gen = 8 if args.smoke else 64 if args.quick else 128
    levels = [(1, 4), (16, 32), (64, 128)] if not (args.quick or args.smoke) else [(1, 2), (16, 16), (64, 64)]
    started = time.perf_counter()
    result: dict[str, Any] = {
        "device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": "tiny random Llama (smoke)"
        if args.smoke
        else "random Llama 1B shape (2048 hidden, 16 layers, 32/8 heads, vocab 128256), bf16",
        "prompt_tokens": PROMPT_LEN,
        "gen_tokens": gen,
    }
    t0 = time.perf_counter()
    engine = build_engine(max_num_seqs=64, smoke=args.smoke, kv_bytes=int(args.kv_gib * 2**30))
    result["engine_init_s"] = time.perf_counter() - t0
    result["offline"] = offline(engine, 64, gen)
    print("offline", json.dumps(result["offline"]), flush=True)

    async def direct_all() -> list[dict[str, Any]]:
        await engine.start()
        await _direct(engine, 8, 8, 8, seed=98)  # warm-up: graphs, allocator
        return [await _direct(engine, c, n, gen, seed=10 + c) for c, n in levels]

    result["direct"] = asyncio.run(direct_all())
    for row in result["direct"]:
        print("direct", json.dumps(row), flush=True)

    server = _Server(engine)
    try:
        http_load(server.url, 8, 8, 8, seed=97)  # warm-up of the HTTP path
        result["http"] = [http_load(server.url, c, n, gen, seed=10 + c) for c, n in levels]
    finally:
        server.stop()
    ratios = {}
    for d, h in zip(result["direct"], result["http"], strict=True):
        if "output_tokens_per_s" in h:
            ratios[str(d["concurrency"])] = h["output_tokens_per_s"] / d["output_tokens_per_s"]
    result["http_over_direct_throughput"] = ratios
    result["http_over_offline_at_64"] = (
        result["http"][-1]["output_tokens_per_s"] / result["offline"]["output_tokens_per_s"]
        if "output_tokens_per_s" in result["http"][-1]
        else None
    )
    result["total_s"] = time.perf_counter() - started
    print(json.dumps({k: v for k, v in result.items() if k not in ("direct", "http")}, indent=1), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
