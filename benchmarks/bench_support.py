"""Shared parts of the serving benchmarks (``bench_long_prompt.py``, ``bench_sweep.py``,
``bench_long_context.py``): the 1B Llama shape with random weights, random prompts, a
server in a child process, a time budget, guarded rows, the report header and a table.

Kept beside the scripts (not in the package) because nothing but benchmarks needs it;
the scripts import it as a sibling module.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# bench_engine.py's throughput model: Llama 3.2 1B's shape (tied embeddings, GQA 32/8).
LLAMA_1B = {
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
}  # fmt: skip
# --quick: small enough for a CPU smoke run, same structure (GQA, tied embeddings).
TINY = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
}  # fmt: skip
FIRST_PROMPT_ID = 2  # ids 0 (bos/pad) and 1 (eos) never appear in random prompts


def llama3_rope(original: int = 8192, factor: float = 32.0) -> dict[str, Any]:
    """Llama 3.2's RoPE scaling (``rope_type="llama3"``; its 1B/3B checkpoints use these
    defaults with ``max_position_embeddings`` 131072)."""
    return {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": original,
    }  # fmt: skip


def llama_config(tiny: bool, max_position_embeddings: int, rope_scaled: bool) -> Any:
    """The 1B shape (or :data:`TINY`), RoPE theta 500k, scaled as Llama 3.2 when ``rope_scaled``."""
    from transformers import LlamaConfig

    shape = TINY if tiny else LLAMA_1B
    rope = llama3_rope(max_position_embeddings // 4, 4.0) if tiny else llama3_rope()
    extra: dict[str, Any] = {"rope_scaling": rope} if rope_scaled else {}
    # ``rope_scaling`` + ``rope_theta`` is the spelling transformers 4.x reads and 5.x converts.
    cfg = LlamaConfig(
        **shape, max_position_embeddings=max_position_embeddings, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=0, **extra,
    )  # fmt: skip
    params = getattr(cfg, "rope_parameters", None)
    if rope_scaled and isinstance(params, dict) and params.get("rope_type") != "llama3":
        cfg.rope_parameters = {**rope, "rope_theta": 500000.0}  # a 5.x that did not convert it
    return cfg


def rope_description(cfg: Any) -> Any:
    """The config's RoPE settings, however this transformers version spells them."""
    return getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)


def build_model(cfg: Any, device: torch.device, seed: int = 0) -> Any:
    """Random weights (bf16 on CUDA, fp32 on CPU), eval mode, SDPA attention."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.set_attn_implementation("sdpa")
    return model


def rope_type(model: Any) -> str | None:
    """The RoPE variant the built model actually uses (checks that the scaling took)."""
    return getattr(getattr(model.model, "rotary_emb", None), "rope_type", None)


def scaled_llama(quick: bool, context: int, device: torch.device) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The 1B Llama shape (``TINY`` when ``quick``) with RoPE scaled to ``context``, random
    weights: ``(config, model, tokenizer, description for the report)``."""
    cfg = llama_config(quick, context, rope_scaled=True)
    model = build_model(cfg, device)
    tok = wordlevel_tokenizer(cfg.vocab_size)
    described = {"shape": TINY if quick else LLAMA_1B, "dtype": str(next(model.parameters()).dtype),
                 "max_position_embeddings": context, "rope": rope_description(cfg),
                 "rope_type_used": rope_type(model),
                 "params_B": sum(p.numel() for p in model.parameters()) / 1e9}
    return cfg, model, tok, described


def wordlevel_tokenizer(vocab: int) -> Any:
    """An offline tokenizer covering every id of the random model (its text is irrelevant)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token="t1", pad_token="t0")


def save_model(model: Any, tokenizer: Any, directory: Path) -> Path:
    """Write ``model`` and ``tokenizer`` where ``stream-attention-serve --model DIR`` loads them."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """``n`` prompts of ``length`` uniform token ids in ``[2, vocab)`` (never bos/eos/pad)."""
    if length < 1 or vocab <= FIRST_PROMPT_ID:
        raise ValueError(f"length={length} must be >= 1 and vocab={vocab} > {FIRST_PROMPT_ID}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_PROMPT_ID, vocab, (n, length), generator=g).tolist()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Seconds per call of a long-running ``fn`` (a whole prefill): ``warmup`` untimed
    calls, then ``repeats`` calls each between device synchronisations (the host clock
    is precise enough for calls of milliseconds and more). Median, min and every sample."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "samples_s": samples}


def reset_peak(device: torch.device) -> int:
    """Start a peak-memory window; returns the bytes allocated at its start."""
    if device.type != "cuda":
        return 0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_since(device: torch.device, start_bytes: int) -> dict[str, float]:
    """Peak allocated bytes since :func:`reset_peak` (GiB): in all, and above the start."""
    if device.type != "cuda":
        return {"peak_gib": 0.0, "peak_over_start_gib": 0.0}
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_gib": peak / 2**30, "peak_over_start_gib": (peak - start_bytes) / 2**30}


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Budget:
    """Wall-clock budget of a script: later rows are skipped (and reported as skipped)
    rather than cut off by the caller's ``timeout`` with nothing written."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, needed_s: float) -> bool:
        """Whether ``needed_s`` more seconds fit in what is left."""
        return self.left() >= needed_s


def error_row(exc: BaseException) -> dict[str, Any]:
    """A report row for a failure: the message and the traceback's tail (also printed)."""
    trace = "".join(traceback.format_exception(exc))
    print(trace, file=sys.stderr, flush=True)
    return {"error": f"{type(exc).__name__}: {exc}"[:1000], "trace": trace[-3000:]}


def guarded(fn: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """``fn()``'s row, or an :func:`error_row` when it raises, so one failed row (an OOM,
    a kernel that does not compile) leaves the others running."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row of the report
        return error_row(exc)
    finally:
        free_device_memory(device)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def environment(device: torch.device, args: Any) -> dict[str, Any]:
    """The report header: what ran where, when, and with which arguments."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "args": {k: v for k, v in vars(args).items()},
        "env": {k: v for k, v in os.environ.items() if k.startswith(("STREAM_ATTENTION_", "TRITON_INTERPRET"))},
    }
    for name in ("triton", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if device.type == "cuda":
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                        timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def write_report(path: str | Path, report: dict[str, Any], *, final: bool = True) -> None:
    """Write the JSON report. Scripts also write it after each row (``final=False``,
    silently), so a run killed from outside still leaves the rows it finished."""
    Path(path).write_text(json.dumps(report, indent=1, default=str))
    if final:
        print(f"wrote {path}", flush=True)


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, fmt)
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Rows as a fixed-width text table. ``columns``: (header, key, format spec); missing
    values print as ``-``; a row with an ``error`` prints it after its first cell."""
    cells = []
    for row in rows:
        if "error" in row:
            first = _cell(row.get(columns[0][1]), columns[0][2])
            cells.append([first, f"ERROR {row['error'][:90]}"])
            continue
        cells.append([_cell(row.get(key), fmt) for _, key, fmt in columns])
    widths = [max([len(h)] + [len(c[i]) for c in cells if len(c) == len(columns)]) for i, (h, _, _) in
              enumerate(columns)]
    lines = ["  ".join(h.rjust(w) for (h, _, _), w in zip(columns, widths, strict=True))]
    for c in cells:
        if len(c) != len(columns):
            lines.append(f"{c[0].rjust(widths[0])}  {c[1]}")
        else:
            lines.append("  ".join(x.rjust(w) for x, w in zip(c, widths, strict=True)))
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m stream_attention.server`` in a child process on a free loopback port,
    waited for until ``/ready``; its output goes to a log kept for the report."""

    def __init__(self, flags: list[str], ready_timeout_s: float, log_dir: Path) -> None:
        import httpx

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.cmd = [sys.executable, "-m", "stream_attention.server", "--host", "127.0.0.1", "--port", str(port),
                    "--log-level", "warning", *flags]
        self.log_path = log_dir / f"server-{port}.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        start = time.perf_counter()
        deadline = start + ready_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() > deadline:
                tail = self.tail()
                self.stop()
                raise TimeoutError(f"server not ready after {ready_timeout_s:.0f} s: {tail}")
            time.sleep(0.25)
        self.startup_s = time.perf_counter() - start

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text()[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (the server drains and exits), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def temp_dir(prefix: str) -> tempfile.TemporaryDirectory:
    """A temporary directory under ``$TMPDIR`` (the saved model is a few GB on the GPU box)."""
    return tempfile.TemporaryDirectory(prefix=prefix)
