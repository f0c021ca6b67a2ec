"""Benchmark of the HTTP server: what serving over HTTP costs against the engine alone.

    python benchmarks/bench_server.py --out server.json [--quick] [--engine-process]   # GPU, 1B shape
    python benchmarks/bench_server.py --out cpu.json --device cpu [--profile-loop loop.txt]

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

Each run also records the CPU time of the threads involved (``cpu_us_per_token``): the
engine thread, the event loop that consumes the outputs (the benchmark's own loop for
``direct``, uvicorn's for ``http``) and the load generator process. Engine thread and event
loop share one GIL, so the event loop's Python time per token is what HTTP costs the
engine at high concurrency. ``--profile-loop`` adds a cProfile of uvicorn's thread.

``--device cpu`` measures the same on a CPU-only machine with the server's embedded
default model (``--model default``, the production build path) or a tiny random Llama
(``--model tiny``: its step is Python-bound like the 1B model's on a GPU); ``--model
fake`` has no model at all (``FakeLLM``: host and device time per step as given) to time
the serving layers alone. ``--engine-process`` serves the HTTP runs from an engine in a
child process (``stream-attention-serve --engine-process``: no GIL shared with HTTP).
``--server-cpus``/``--client-cpus``/``--engine-cpus`` pin the parts to CPUs (a small
machine is otherwise too noisy to compare).

CPU example (2 cores: engine on one, HTTP server and load generator on the other)::

    python benchmarks/bench_server.py --out cpu.json --device cpu --model tiny --quick --no-offline \
        --levels 1:8,16:64,64:256 --server-cpus 1 --client-cpus 0 [--engine-process --engine-cpus 1 --http-server-cpus 0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
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


class _FakeTokenizer:
    all_special_ids: list[int] = []
    chat_template = None

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __len__(self) -> int:
        return self.vocab

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [10 + hash(w) % (self.vocab - 10) for w in text.split()]}

    def decode(self, ids: list[int]) -> str:
        return "".join(f" t{i}" for i in ids)


class FakeLLM:
    """``LLMEngine``'s surface with no model, to time the serving layers alone: a step
    spins ``python_us_per_seq`` per running request (the GIL held, as the engine's Python
    does, released for an instant every ``op_us`` as a PyTorch op call does) and the
    "device" takes ``step_s`` (a sleep: the GIL free), after the host work or, with
    ``pipeline`` (as ``LLMEngine`` on CUDA), overlapping the next step's host work; each
    running request gets one token. ``--fake-python-us 100 --fake-step-ms 3.5`` is
    roughly the 1B model's decode step at batch 64 on an H100 before pipelining (~10 ms,
    3.45 ms of it GPU time)."""

    def __init__(self, max_num_seqs: int, step_s: float = 0.01, python_us_per_seq: float = 0.0, vocab: int = 4096,
                 op_us: float = 20.0, pipeline: bool = True) -> None:
        from types import SimpleNamespace

        self.config = SimpleNamespace(max_waiting=1 << 30, max_num_seqs=max_num_seqs)
        self.scheduler = SimpleNamespace(waiting=[])
        self.tokenizer = _FakeTokenizer(vocab)
        self.max_model_len = 1 << 16
        self.model_name = "fake"
        self.device = "cpu"
        self.step_s = step_s
        self.python_s = python_us_per_seq * 1e-6
        self.op_s = op_us * 1e-6
        self.pipeline = pipeline
        self._device_done = 0.0
        self.running: dict[str, Any] = {}
        self._pending: list[Any] = []

    def validate(self, req: Any) -> None:
        req.params.validate()

    def make_request(self, prompt: Any, params: Any = None, request_id: str | None = None) -> Any:
        from stream_attention.engine import Request, SamplingParams

        return Request(request_id or f"fake-{time.perf_counter_ns()}", list(prompt), params or SamplingParams())

    def add_request(self, req: Any, stream: bool = True, bounded: bool = True) -> str:
        self.scheduler.waiting.append(req)
        return req.request_id

    def _output(self, req: Any, ids: list[int], new: list[int], reason: Any) -> Any:
        from stream_attention.engine.types import RequestOutput

        delta = "".join(f" t{i}" for i in new)
        req.text = getattr(req, "text", "") + delta
        return RequestOutput(req.request_id, req.prompt_token_ids, list(ids), req.text, new, delta,
                             reason is not None, reason)  # fmt: skip

    def abort(self, request_id: str) -> bool:
        from stream_attention.engine.types import FinishReason

        entry = self.running.pop(request_id, None)
        if entry is None:
            for req in self.scheduler.waiting:
                if req.request_id == request_id:
                    self.scheduler.waiting.remove(req)
                    entry = (req, [])
                    break
        if entry is None:
            return False
        self._pending.append(self._output(entry[0], entry[1], [], FinishReason.ABORT))
        return True

    def abort_all(self) -> list[str]:
        ids = [*self.running, *(r.request_id for r in self.scheduler.waiting)]
        for rid in ids:
            self.abort(rid)
        return ids

    def has_unfinished_requests(self) -> bool:
        return bool(self.running or self.scheduler.waiting or self._pending)

    def step(self) -> list[Any]:
        from stream_attention.engine.types import FinishReason

        outputs, self._pending = self._pending, []
        waiting = self.scheduler.waiting
        while waiting and len(self.running) < self.config.max_num_seqs:
            req = waiting.pop(0)
            self.running[req.request_id] = (req, [])
        if not self.running:
            return outputs
        if self.pipeline:
            # The device is still on the step launched last time: wait for it (the GIL
            # free), then do this step's host work while the next one "runs".
            time.sleep(max(0.0, self._device_done - time.perf_counter()))
            self._host_work()
            self._device_done = time.perf_counter() + self.step_s
        else:
            self._host_work()
            time.sleep(self.step_s)
        for rid, (req, ids) in list(self.running.items()):
            tok = 10 + (len(ids) * 7919 + len(rid)) % (len(self.tokenizer) - 10)
            ids.append(tok)
            done = len(ids) >= req.params.max_tokens
            if done:
                del self.running[rid]
            outputs.append(self._output(req, ids, [tok], FinishReason.LENGTH if done else None))
        return outputs

    def _host_work(self) -> None:
        """Scheduling, input staging, kernel launches, detokenization: the GIL held, but
        dropped for an instant at every op as PyTorch does. CPU time, not wall time:
        waiting for the GIL does not count as work done."""
        now = time.thread_time()
        end = now + self.python_s * len(self.running)
        while now < end:
            op_end = now + self.op_s
            while time.thread_time() < op_end:
                pass
            time.sleep(0)  # releases the GIL, like a PyTorch op call
            now = time.thread_time()

    def stats(self) -> Any:
        from stream_attention.engine.types import EngineStats

        return EngineStats(running=len(self.running), waiting=len(self.scheduler.waiting))


def _default_settings(max_num_seqs: int, device: str) -> Any:
    from stream_attention.server import ServerSettings

    return ServerSettings(
        _env_file=None, device=device, max_num_seqs=max_num_seqs, max_num_batched_tokens=16384,
        max_model_len=1024, enable_prefix_caching=False, kv_cache_memory_bytes=256 << 20 if device == "cpu" else None,
    )  # fmt: skip


def build_llm(model: str, device: str, kv_bytes: int = 8 << 30, max_num_seqs: int = 64,
              fake: dict[str, Any] | None = None, torch_threads: int | None = None,
              overrides: dict[str, Any] | None = None) -> Any:
    """The engine of ``--model`` (an ``LLMEngine``, or the ``FakeLLM``). Module-level and
    picklable by reference, so that ``--engine-process`` builds the same in its child.
    ``overrides``: further ``EngineConfig`` fields (``--engine-opt``)."""
    if torch_threads:
        torch.set_num_threads(torch_threads)
    if model == "fake":
        return FakeLLM(max_num_seqs, **(fake or {}))
    from stream_attention.engine import LLMEngine

    if model == "default":  # the embedded default model, as stream-attention-serve builds it
        from stream_attention.server.engine_bridge import engine_config

        return LLMEngine(config=engine_config(_default_settings(max_num_seqs, device)))
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=VOCAB,
    )
    if model == "tiny":
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
    with torch.device(device):
        net = LlamaForCausalLM(cfg).to(torch.float32 if device == "cpu" else torch.bfloat16).eval()
    return LLMEngine(
        net,
        _wordlevel_tokenizer(cfg.vocab_size),
        device=device,
        kv_cache_memory_bytes=(64 << 20) if device == "cpu" else kv_bytes,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=16384,
        max_model_len=1024,
        enable_prefix_caching=False,
        **(overrides or {}),
    )


def build_engine(max_num_seqs: int, smoke: bool = False, kv_bytes: int = 8 << 30, device: str | None = None) -> Any:
    """``AsyncEngine`` on the 1B shape (``smoke``: the tiny one on CPU)."""
    from stream_attention.engine import AsyncEngine

    device = device or ("cpu" if smoke else "cuda")
    return AsyncEngine(engine=build_llm("tiny" if smoke else "llama1b", device, kv_bytes, max_num_seqs))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, _vocab[0], (n, _prompt_len[0]), generator=g).tolist()


_vocab = [VOCAB]
_prompt_len = [PROMPT_LEN]


class CpuClock:
    """CPU seconds of named threads of this process, and of finished child processes."""

    def __init__(self, threads: dict[str, threading.Thread | None], pids: dict[str, int] | None = None) -> None:
        self.threads = {k: t for k, t in threads.items() if t is not None and t.ident is not None}
        self.pids = pids or {}
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        import resource

        out = {}
        for name, t in self.threads.items():
            try:
                out[name] = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
            except (OSError, AttributeError):  # thread gone, or a platform without per-thread clocks
                out[name] = float("nan")
        for name, pid in self.pids.items():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                out[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, ValueError, IndexError):
                out[name] = float("nan")
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        out["loadgen_process"] = ru.ru_utime + ru.ru_stime
        ru = resource.getrusage(resource.RUSAGE_SELF)
        out["server_process"] = ru.ru_utime + ru.ru_stime
        return out

    def per_token(self, tokens: int) -> dict[str, float]:
        """Microseconds of CPU per output token since construction, by thread."""
        end = self._read()
        return {k: (end[k] - self.start[k]) * 1e6 / max(tokens, 1) for k in end}


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

    clock = CpuClock({"engine_thread": engine._thread, "event_loop": threading.current_thread()})
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    s = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "requests": n,
        "seconds": s,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / s,
        "cpu_us_per_token": clock.per_token(tokens),
        "requests_per_s": n / s,
        "ttft_s": _pct(ttft),
        "itl_s": _pct(itl),
        "e2e_s": _pct(e2e),
    }


class _Server:
    """The server's app on a loopback port, uvicorn in a background thread (configured as
    ``stream-attention-serve`` configures it)."""

    def __init__(self, engine: Any, profile: bool = False) -> None:
        import uvicorn

        from stream_attention.server import ServerSettings, create_app
        from stream_attention.server.cli import uvicorn_options
        settings = ServerSettings(_env_file=None, max_queue=4096, max_tokens=1024, log_level="warning")
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
        # and accepted sockets inherit the listener's; without it Nagle + delayed ACK hold SSE events ~40 ms.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        extra = {**uvicorn_options(settings), "log_level": "warning", "timeout_graceful_shutdown": 5}
        self.server = uvicorn.Server(uvicorn.Config(create_app(settings, engine=engine), **extra))
        self.profiler = None
        if profile:
            import cProfile

            self.profiler = cProfile.Profile()
        self.thread = threading.Thread(target=self._run, daemon=True, name="uvicorn")
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def _run(self) -> None:
        self.server.run(sockets=[self.sock])

    def profile(self, on: bool) -> None:
        """Switch cProfile on or off inside uvicorn's thread (cProfile hooks one thread)."""
        if self.profiler is None:
            return
        loop = self.server.servers[0].get_loop()
        done = threading.Event()

        def flip() -> None:
            (self.profiler.enable if on else self.profiler.disable)()
            done.set()

        loop.call_soon_threadsafe(flip)
        done.wait(10)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


_client_cpus: list[set[int] | None] = [None]


def _cpus(text: str | None) -> set[int] | None:
    """``0`` / ``0,2`` / ``0-3`` as a CPU set."""
    if not text:
        return None
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _pin_process(cpus: set[int] | None) -> None:
    """Move every thread of this process to ``cpus`` (``sched_setaffinity`` is per thread)."""
    if cpus:
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cpus)


def http_load(server: _Server, concurrency: int, n: int, gen: int, seed: int, endpoint: str = "generate",
              engine: Any = None) -> dict[str, Any]:
    """``stream-attention-loadgen`` in its own process, so the client does not share our GIL."""
    with tempfile.NamedTemporaryFile(suffix=".json") as fh:
        cmd = [
            sys.executable, "-m", "stream_attention.clients.loadgen",
            "--url", server.url, "--endpoint", endpoint, "--concurrency", str(concurrency), "-n", str(n),
            "--prompt-tokens", str(_prompt_len[0]), "--max-tokens", str(gen), "--vocab-size", str(_vocab[0]),
            "--seed", str(seed), "--json", fh.name,
        ]  # fmt: skip
        proc = getattr(engine, "_proc", None)  # --engine-process: the child's CPU is the engine's
        if proc is not None:
            clock = CpuClock({"event_loop": server.thread, "engine_rx_thread": engine._thread},
                             {"engine_thread": proc.pid})  # fmt: skip
        else:
            clock = CpuClock({"engine_thread": getattr(engine, "_thread", None), "event_loop": server.thread})
        pin = _client_cpus[0]
        r = subprocess.run(
            cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
            preexec_fn=(lambda: os.sched_setaffinity(0, pin)) if pin else None,
        )  # fmt: skip
        if r.returncode != 0:
            return {"concurrency": concurrency, "error": (r.stdout + r.stderr)[-2000:]}
        print(r.stdout, flush=True)
        summary = json.loads(Path(fh.name).read_text())["summary"]
    cpu = clock.per_token(summary.get("output_tokens", 0))
    if summary.get("client_cpu_s") is not None:  # the load generator's own figure (no start-up)
        cpu["loadgen_process"] = summary["client_cpu_s"] * 1e6 / max(summary.get("output_tokens", 0), 1)
    return {"concurrency": concurrency, **summary, "cpu_us_per_token": cpu}


def _table(result: dict[str, Any]) -> str:
    lines = [
        f"{'streams':>7} {'direct tok/s':>12} {'http tok/s':>10} {'ratio':>6} | CPU us/token: "
        f"{'eng(d)':>7} {'loop(d)':>7} {'eng(h)':>7} {'loop(h)':>7} {'client':>7} | {'ITL p50/p99 ms (h)':>18}"
    ]
    for d, h in zip(result["direct"], result["http"], strict=True):
        if "output_tokens_per_s" not in h:
            lines.append(f"{d['concurrency']:>7} {d['output_tokens_per_s']:>12.0f}  http failed")
            continue
        cd, ch = d["cpu_us_per_token"], h["cpu_us_per_token"]
        itl = h["itl_s"]
        lines.append(
            f"{d['concurrency']:>7} {d['output_tokens_per_s']:>12.0f} {h['output_tokens_per_s']:>10.0f} "
            f"{h['output_tokens_per_s'] / d['output_tokens_per_s']:>6.2f} |               "
            f"{cd.get('engine_thread', 0):>7.0f} {cd.get('event_loop', 0):>7.0f} {ch.get('engine_thread', 0):>7.0f} "
            f"{ch.get('event_loop', 0):>7.0f} {ch.get('loadgen_process', 0):>7.0f} | "
            f"{(itl['p50'] or 0) * 1e3:>8.1f} / {(itl['p99'] or 0) * 1e3:>6.1f}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="write results as JSON here")
    parser.add_argument("--quick", action="store_true", help="fewer requests and tokens")
    parser.add_argument("--kv-gib", type=float, default=8.0, help="engine KV cache size")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script, measures nothing")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument(
        "--model", choices=("llama1b", "tiny", "default", "fake"), default=None,
        help="llama1b: random 1B shape (GPU default); tiny: random tiny Llama; default: the embedded default "
        "model built as the server builds it (CPU default); fake: no model (FakeLLM), the serving layers alone",
    )  # fmt: skip
    parser.add_argument("--fake-step-ms", type=float, default=10.0, help="--model fake: sleep per step")
    parser.add_argument("--fake-python-us", type=float, default=0.0,
                        help="--model fake: GIL-holding busy time per running request per step")
    parser.add_argument("--fake-serial", action="store_true",
                        help="--model fake: device time after the host work (no pipelining)")
    parser.add_argument("--fake-op-us", type=float, default=20.0,
                        help="--model fake: the busy time drops the GIL this often (as PyTorch op calls do)")
    parser.add_argument("--engine-process", action="store_true",
                        help="HTTP runs serve an engine in a child process (the server's --engine-process)")
    parser.add_argument("--engine-cpus", help="--engine-process: pin the engine's process to these CPUs")
    parser.add_argument("--http-server-cpus", help="--engine-process: move this process to these CPUs for the HTTP runs")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="sys.setswitchinterval for this process (seconds; default: Python's 0.005)")
    parser.add_argument("--levels", default=None, help="streams:requests pairs, e.g. 1:4,16:32,64:128")
    parser.add_argument("--prompt-tokens", type=int, default=None, help=f"default {PROMPT_LEN} (CPU: 64)")
    parser.add_argument("--gen-tokens", type=int, default=None, help="default 128 (--quick: 64, --smoke: 8)")
    parser.add_argument("--endpoint", choices=("generate", "completions", "chat"), default="generate")
    parser.add_argument("--engine-opt", action="append", default=[], metavar="FIELD=VALUE",
                        help="an EngineConfig field for the llama1b/tiny engine, e.g. async_scheduling=false")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (CPU default: 1)")
    parser.add_argument("--no-offline", action="store_true", help="skip the offline LLMEngine.generate figure")
    parser.add_argument("--profile-loop", metavar="PATH", help="cProfile uvicorn's thread over the HTTP runs")
    parser.add_argument("--server-cpus", help="pin this process (engine, server) to these CPUs, e.g. 0")
    parser.add_argument("--client-cpus", help="pin the load generator to these CPUs, e.g. 1")
    args = parser.parse_args()
    from stream_attention.server.cli import uvicorn_implementations

    if args.server_cpus:
        os.sched_setaffinity(0, _cpus(args.server_cpus))
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    _client_cpus[0] = _cpus(args.client_cpus)
    device = args.device or ("cpu" if args.smoke else "cuda")
    model = args.model or ("tiny" if args.smoke else "llama1b" if device == "cuda" else "default")
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_server.py needs a CUDA GPU (or --device cpu / --smoke)", file=sys.stderr)
        return 1
    if device == "cpu":
        torch.set_num_threads(args.torch_threads or 1)
    elif args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if model == "tiny":
        _vocab[0] = TINY["vocab_size"]
    if model == "fake":
        _vocab[0] = 4096
        args.no_offline = True
    _prompt_len[0] = args.prompt_tokens or (PROMPT_LEN if device == "cuda" and not args.smoke else 64)
    gen = args.gen_tokens or (8 if args.smoke else 64 if args.quick else 128)
    levels = [(1, 4), (16, 32), (64, 128)] if not (args.quick or args.smoke) else [(1, 2), (16, 16), (64, 64)]
    if args.levels:
        levels = [tuple(int(x) for x in pair.split(":")) for pair in args.levels.split(",")]
    started = time.perf_counter()
    model_desc = {
        "llama1b": "random Llama 1B shape (2048 hidden, 16 layers, 32/8 heads, vocab 128256)",
        "tiny": "tiny random Llama (64 hidden, 2 layers, vocab 512)",
        "default": "the embedded default model (384 hidden, 6 layers, vocab 4096), server build path",
        "fake": f"no model: FakeLLM, {args.fake_step_ms:g} ms sleep + {args.fake_python_us:g} us busy/request per step",
    }[model]
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": model_desc + ("" if model == "fake" else ", bf16" if device == "cuda" else ", fp32"),
        "prompt_tokens": _prompt_len[0],
        "gen_tokens": gen,
        "endpoint": args.endpoint,
        "switch_interval_s": sys.getswitchinterval(),
        "uvicorn": uvicorn_implementations(),
        "http_engine": "child process" if args.engine_process else "in process (engine thread)",
        "levels": levels,
        "engine_opts": args.engine_opt,
        "server_cpus": args.server_cpus,
        "client_cpus": args.client_cpus,
    }
    from functools import partial

    from stream_attention.engine import AsyncEngine

    fake = {"step_s": args.fake_step_ms * 1e-3, "python_us_per_seq": args.fake_python_us, "op_us": args.fake_op_us,
            "pipeline": not args.fake_serial}  # fmt: skip
    overrides = {}
    for opt in args.engine_opt:
        key, _, value = opt.partition("=")
        overrides[key] = {"true": True, "false": False}.get(value.lower(), value)
    build = partial(build_llm, model, device, int(args.kv_gib * 2**30), 64, fake, torch.get_num_threads(), overrides)
    t0 = time.perf_counter()
    engine = AsyncEngine(engine=build())
    if model == "default":
        _vocab[0] = len(engine.tokenizer)
    result["engine_init_s"] = time.perf_counter() - t0
    if not args.no_offline:
        result["offline"] = offline(engine, levels[-1][0], gen)
        print("offline", json.dumps(result["offline"]), flush=True)

    async def direct_all() -> list[dict[str, Any]]:
        await engine.start()
        await _direct(engine, 8, 8, 8, seed=98)  # warm-up: graphs, allocator
        return [await _direct(engine, c, n, gen, seed=10 + c) for c, n in levels]

    result["direct"] = asyncio.run(direct_all())
    for row in result["direct"]:
        print("direct", json.dumps(row), flush=True)
    if args.engine_process:
        # The server's engine in a child process (stream-attention-serve --engine-process):
        # the in-process one goes first, so both never hold the device's memory at once.
        from stream_attention.engine.process_engine import EngineProcess

        asyncio.run(engine.shutdown())
        del engine
        if device == "cuda":
            torch.cuda.empty_cache()
        if args.http_server_cpus:
            _pin_process(_cpus(args.http_server_cpus))
        t0 = time.perf_counter()
        engine = EngineProcess(build=build, cpus=_cpus(args.engine_cpus))
        result["engine_process_init_s"] = time.perf_counter() - t0
    # The server always serves a supervised client (restarted if it dies): measure that path.
    from stream_attention.engine.supervisor import SupervisedEngine

    engine = SupervisedEngine(lambda: None, client=engine)  # type: ignore[arg-type]  # never restarted here
    # The direct runs' loop is gone; the engine thread keeps running for the server.
    server = _Server(engine, profile=bool(args.profile_loop))
    try:
        http_load(server, 8, 8, 8, seed=97, endpoint=args.endpoint)  # warm-up of the HTTP path
        server.profile(True)
        result["http"] = [
            http_load(server, c, n, gen, seed=10 + c, endpoint=args.endpoint, engine=engine) for c, n in levels
        ]
        server.profile(False)
    finally:
        server.stop()
        asyncio.run(engine.shutdown(drain=False))
    if args.profile_loop and server.profiler is not None:
        import io
        import pstats

        buf = io.StringIO()
        stats = pstats.Stats(server.profiler, stream=buf)
        stats.sort_stats("tottime").print_stats(45)
        stats.sort_stats("cumulative").print_stats(45)
        Path(args.profile_loop).write_text(buf.getvalue())
        print(f"event-loop profile: {args.profile_loop}", flush=True)
    ratios = {}
    for d, h in zip(result["direct"], result["http"], strict=True):
        if "output_tokens_per_s" in h:
            ratios[str(d["concurrency"])] = h["output_tokens_per_s"] / d["output_tokens_per_s"]
    result["http_over_direct_throughput"] = ratios
    if "offline" in result:
        result[f"http_over_offline_at_{levels[-1][0]}"] = (
            result["http"][-1]["output_tokens_per_s"] / result["offline"]["output_tokens_per_s"]
            if "output_tokens_per_s" in result["http"][-1]
            else None
        )
    result["total_s"] = time.perf_counter() - started
    print(json.dumps({k: v for k, v in result.items() if k not in ("direct", "http")}, indent=1), flush=True)
    print(_table(result), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
