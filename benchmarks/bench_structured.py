"""What structured output costs a decode step: batch 64, every request constrained or none.

    python benchmarks/bench_structured.py --out structured.json            # GPU
    python benchmarks/bench_structured.py --out structured.json --quick    # CPU smoke run

Model: the embedded default model (``LLMEngine()``), ``--model PATH`` for any local HF
causal LM, or ``--shape 1b``: random weights in Llama 3.2 1B's shape with a byte-level BPE
tokenizer of Llama 3's vocabulary size (128,256), trained here on the Python standard
library's sources and cached in ``--tokenizer-dir`` (the mask cost grows with the
vocabulary: it is one bitmask row per constrained sequence per step, filled on the host by
xgrammar and applied on the device; the default model's 4k vocabulary and host-bound step
understate it).

Workload: ``--batch`` requests (64) with the same 32-token prompt, ``--gen`` tokens each
(EOS ignored), added at once. Run twice: unconstrained, then every request constrained by
a JSON schema that keeps a small model generating (an array of objects with integer,
enum, bounded string and nested array fields). The grammar is compiled before the runs, as
the server does before queueing (``compile_s``). Reported per run:

- ``step_ms``: median wall time of ``LLMEngine.step()`` over the steps where the whole
  batch was decoding (prefill and finishing steps left out); with the engine's pipelined
  steps on CUDA this is the step period;
- ``mask_ms``: median host time of the grammar mask per step (bitmask fill of every
  constrained row, launching the copy and ``apply_token_bitmask_inplace``; the device
  work itself shows in ``step_ms``);
- ``tokens_per_s`` over those steps; ``valid_json``: how many constrained outputs parse
  (finished ones must all be valid; cut-off ones are prefixes).

``overhead_pct`` = constrained / unconstrained median step time - 1; the mean, p90 and
largest step are reported beside it (a few slow steps move the mean, and throughput).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from stream_attention.engine import LLMEngine, SamplingParams, StructuredOutputsParams  # noqa: E402
from stream_attention.engine.structured_output import TokenMasker  # noqa: E402

SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 100000},
            "kind": {"enum": ["file", "directory", "link"]},
            "name": {"type": "string", "maxLength": 24},
            "sizes": {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": 8},
        },
        "required": ["id", "kind", "name", "sizes"],
        "additionalProperties": False,
    },
    "minItems": 64,
}
PROMPT = "import json\n\n# the directory listing as JSON\nlisting = "


class _MaskTimer:
    """Wraps ``TokenMasker.apply`` to time its host side. No device synchronisation: one
    would stall the pipelined step on the forward pass and charge that wait to the mask."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._orig = TokenMasker.apply

    def __enter__(self) -> _MaskTimer:
        orig, times = self._orig, self.times

        def timed(masker: TokenMasker, logits: torch.Tensor, matchers: list[tuple[int, Any]]) -> None:
            t0 = time.perf_counter()
            orig(masker, logits, matchers)
            times.append(time.perf_counter() - t0)

        TokenMasker.apply = timed
        return self

    def __exit__(self, *exc: object) -> None:
        TokenMasker.apply = self._orig


def run(engine: LLMEngine, batch: int, gen: int, constrained: bool) -> dict[str, Any]:
    spec = StructuredOutputsParams(json=SCHEMA) if constrained else None
    params = SamplingParams(max_tokens=gen, temperature=0.8, top_p=0.95, seed=0, ignore_eos=True,
                            structured_outputs=spec)
    ids = [engine.add_request(PROMPT, params, stream=False, bounded=False) for _ in range(batch)]
    steady: list[float] = []
    slow: list[dict[str, Any]] = []  # where the time of unusually slow steps went
    collections = [0]

    def count_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            collections[0] += 1

    finals = {}
    gc.callbacks.append(count_gc)
    with _MaskTimer() as masks:
        while engine.has_unfinished_requests():
            full = engine.stats().running == batch and all(
                s.num_computed_tokens >= s.num_prompt_tokens for s in engine.scheduler.running)
            n_masks, n_gc = len(masks.times), collections[0]
            t0 = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t0
            if full:
                steady.append(dt)
                if len(steady) > 8 and dt > 2 * statistics.median(steady):
                    slow.append({"step": len(steady), "ms": round(dt * 1e3, 2),
                                 "mask_ms": round(sum(masks.times[n_masks:]) * 1e3, 2),
                                 "gc_collections": collections[0] - n_gc})
            for out in outs:
                if out.finished:
                    finals[out.request_id] = out
    gc.callbacks.remove(count_gc)
    texts = [finals[i].text for i in ids]
    result: dict[str, Any] = {
        "constrained": constrained,
        "steady_steps": len(steady),
        "step_ms": statistics.median(steady) * 1e3 if steady else None,
        "step_ms_mean": statistics.fmean(steady) * 1e3 if steady else None,
        "step_ms_p90": statistics.quantiles(steady, n=10)[-1] * 1e3 if len(steady) > 1 else None,
        "step_ms_max": max(steady) * 1e3 if steady else None,
        "tokens_per_s": batch / statistics.median(steady) if steady else None,
        "mask_ms": statistics.median(masks.times) * 1e3 if masks.times else None,
        "mask_ms_max": max(masks.times) * 1e3 if masks.times else None,
        "slow_steps": slow[:20],
        "mean_output_tokens": statistics.fmean(len(finals[i].token_ids) for i in ids),
    }
    if constrained:
        stopped = [finals[i] for i in ids if finals[i].finish_reason.value == "stop"]
        result["finished_by_grammar"] = len(stopped)
        result["valid_json"] = sum(_parses(o.text) for o in stopped)
        result["sample"] = texts[0][:200]
    return result


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def large_vocab_tokenizer(directory: Path, vocab: int) -> Any:
    """A byte-level BPE tokenizer of ``vocab`` entries (trained once, then loaded from
    ``directory``): real text pieces, so xgrammar's mask fill sees a Llama-3-sized vocabulary."""
    from transformers import PreTrainedTokenizerFast

    path = directory / "tokenizer.json"
    if not path.exists():
        import sysconfig

        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        stdlib = Path(sysconfig.get_paths()["stdlib"])
        def texts() -> Any:
            for f in sorted(stdlib.rglob("*.py")):
                if "site-packages" not in f.parts:
                    try:
                        yield f.read_text(encoding="utf-8")
                    except (UnicodeDecodeError, OSError):
                        continue  # a few test files are deliberately not UTF-8

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|bos|>", "<|eos|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts(), trainer)
        directory.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<|bos|>", eos_token="<|eos|>")


def one_b_model(tokenizer_dir: Path, device: str | None) -> tuple[Any, Any]:
    """Random weights in Llama 3.2 1B's shape over :func:`large_vocab_tokenizer`."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_support import LLAMA_1B, build_model, llama_config

    tokenizer = large_vocab_tokenizer(tokenizer_dir, LLAMA_1B["vocab_size"])
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = llama_config(tiny=False, max_position_embeddings=131072, rope_scaled=True)
    cfg.vocab_size = max(LLAMA_1B["vocab_size"], len(tokenizer))
    return build_model(cfg, dev), tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON report path")
    ap.add_argument("--model", default=None, help="local HF model path (default: the embedded default model)")
    ap.add_argument("--shape", choices=["1b"], default=None,
                    help="random weights in this shape with a 128k-entry tokenizer instead of --model")
    ap.add_argument("--tokenizer-dir", type=Path, default=REPO / "build" / "bpe128k",
                    help="where --shape's tokenizer is trained once and cached")
    ap.add_argument("--train-tokenizer-only", action="store_true", help="build --tokenizer-dir and exit")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--gen", type=int, default=128, help="tokens per request")
    ap.add_argument("--quick", action="store_true", help="small run (CPU smoke test): batch 8, 12 tokens")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    args = ap.parse_args(argv)
    batch, gen = (8, 12) if args.quick else (args.batch, args.gen)
    if args.train_tokenizer_only:
        print(len(large_vocab_tokenizer(args.tokenizer_dir, 128256)), "tokens in", args.tokenizer_dir)
        return 0
    model = one_b_model(args.tokenizer_dir, args.device) if args.shape else args.model
    engine = LLMEngine(model, device=args.device, max_num_seqs=max(batch, 8),
                       use_cuda_graphs=not args.quick)
    t0 = time.perf_counter()
    engine.compile_grammar(StructuredOutputsParams(json=SCHEMA))  # as the server does, before queueing
    compile_s = time.perf_counter() - t0
    # Warm-up at the full batch: kernels (xgrammar's bitmask kernel is compiled per shape),
    # graphs, the masker's buffers.
    run(engine, batch, 4, True)
    runs = [run(engine, batch, gen, False), run(engine, batch, gen, True)]
    base, con = runs[0]["step_ms"], runs[1]["step_ms"]
    report = {
        "benchmark": "structured_output_decode_step",
        "device": str(engine.device),
        "gpu": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else None,
        "model": engine.model_name,
        "vocab_size": engine.runner.geometry.vocab_size,
        "batch": batch,
        "gen_tokens": gen,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "compile_s": compile_s,
        "runs": runs,
        "overhead_pct": (con / base - 1) * 100 if base and con else None,
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}))
    for r in runs:
        print(json.dumps({k: v for k, v in r.items() if k != "sample"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
