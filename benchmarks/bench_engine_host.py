"""Host-side cost of an engine step, with the model forward excluded (runs on CPU).

    python benchmarks/bench_engine_host.py [--batch 64] [--prompt-len 512] [--gen 256]
        [--scenario bench|stream|server|penalised|all] [--pipeline] [--real-forward] [--profile]
        [--json out.json]

On a GPU a decode step is the CUDA-graph replay plus whatever Python runs between two
replays (scheduling, staging inputs, sampling, appending tokens, stop checks,
detokenization, output objects); the GPU idles during the latter. This harness runs
``LLMEngine`` on a tiny random Llama on the CPU with the forward replaced by a stub that
returns random logits (``--real-forward``: the eager model, timed and subtracted), and
times every ``step()`` with ``time.perf_counter``, splitting it into

* ``schedule``  ``Scheduler.schedule``
* ``forward``   ``ModelRunner.execute`` (excluded from ``host``)
* ``sample``    ``Sampler.launch`` + ``PendingSample.wait`` (on CPU this includes the
  argmax over ``[batch, vocab]``: on a GPU a kernel, plus the step's one device->host
  wait; ``sample_small_vocab_ms`` is the same call on a 16-wide vocab, i.e. its Python
  and per-op dispatch, and ``sample_ops`` the tensor ops it launches)
* ``commit``    ``Scheduler.commit`` and ``kv_mgr.after_step``
* ``post``      the rest of ``step()``: appending tokens, stop checks, detokenization,
  ``RequestOutput`` objects, finishing
* ``gap``       the critical path: from a step's tokens reaching the host to the next
  ``execute`` call. With synchronous steps it holds all the post-processing and the
  next schedule; with ``--pipeline`` (the engine's default on CUDA) the next step is
  launched first and the text side runs while the device computes.

``host = step - forward``, as median and mean over the steady decode steps (all
sequences decoding one token, none finishing), and the mean over the whole run
(prefill and finishing steps included, forward still excluded).

``graph_staging`` times the host part of ``ModelRunner._run_graph`` (the per-sequence
loop that fills the pinned staging buffers before a replay) on a steady batch, with CPU
tensors standing in for the device buffers and a no-op replay: on a GPU it runs between
the tokens' arrival and the replay too, so the device idles about ``gap + staging`` per
step (plus launch latency).

Scenarios (``SamplingParams`` typical of each use):

* ``bench``: ``LLMEngine.generate``-style offline batch, greedy, ``ignore_eos``,
  ``stream=False`` (text decoded once at the end), as ``bench_engine.py`` runs it;
* ``stream``: streamed requests with two stop strings and greedy sampling:
  per-step incremental detokenization and a ``RequestOutput`` per sequence per step;
* ``server``: the same with temperature 0.8 / top-p 0.95 (on the CPU the sort for
  top-p dwarfs and disturbs everything else, so the text costs read best in ``stream``).
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import pstats
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECTIONS = ("schedule", "forward", "sample", "commit", "post")


def _tiny_engine(batch: int, prompt_len: int, gen: int, block_size: int, pipeline: bool = False):
    from transformers import LlamaForCausalLM

    from stream_attention.engine import LLMEngine
    from stream_attention.models.default import default_config, load_tokenizer

    cfg = default_config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=max(2048, prompt_len + gen))
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    blocks = batch * -(-(prompt_len + gen) // block_size) + 64
    return LLMEngine(
        model, load_tokenizer(), num_kv_blocks=blocks, block_size=block_size, max_num_seqs=batch,
        max_num_batched_tokens=16384, use_cuda_graphs=False, attention_backend="sdpa", enable_prefix_caching=False,
        device="cpu", pipeline_steps=pipeline,
    )


class _Timers:
    """Wraps the engine's collaborators so each call adds its wall time to a section, and
    measures the host's critical path: from a step's tokens reaching the host
    (``PendingSample.wait`` returns) to the next ``runner.execute`` (the next launch).
    On a GPU that is time the device idles (plus the runner's staging inside
    ``execute``); the rest of the host's work overlaps the device's."""

    def __init__(self, engine) -> None:
        self.acc = dict.fromkeys((*SECTIONS[:-1], "gap"), 0.0)
        self.last_scheduled = None
        self.wait_end: float | None = None
        self.harness: float = 0.0  # harness time since wait_end (between two step() calls)
        self._wrap(engine.scheduler, "schedule", "schedule")
        self._wrap(engine.runner, "execute", "forward", on_start=self._launching)
        if hasattr(engine.sampler, "launch"):
            self._wrap(engine.sampler, "launch", "sample", wrap_result=True)
        else:  # an engine from before Sampler.launch (comparisons against older commits)
            self._wrap(engine, "sampler", "sample", on_end=self._sampled)
        self._wrap(engine.scheduler, "commit", "commit")
        self._wrap(engine.kv_mgr, "after_step", "commit")  # called from Scheduler.commit

    def _launching(self, t0: float, args) -> None:
        self.last_scheduled = args[0]
        if self.wait_end is not None:
            self.acc["gap"] += t0 - self.wait_end - self.harness
            self.wait_end = None

    def _sampled(self, t1: float) -> None:
        self.wait_end, self.harness = t1, 0.0

    def _wrap(self, obj, attr: str, section: str, on_start=None, on_end=None, wrap_result: bool = False) -> None:
        inner = getattr(obj, attr)
        acc = self.acc
        pc = time.perf_counter
        timers = self

        class TimedPending:
            def __init__(self, pending) -> None:
                self.pending = pending

            def wait(self):
                t0 = pc()
                try:
                    return self.pending.wait()
                finally:
                    t1 = pc()
                    acc[section] += t1 - t0
                    timers.wait_end, timers.harness = t1, 0.0

        def timed(*args, **kwargs):
            t0 = pc()
            if on_start is not None:
                on_start(t0, args)
            try:
                out = inner(*args, **kwargs)
                return TimedPending(out) if wrap_result else out
            finally:
                t1 = pc()
                acc[section] += t1 - t0
                if on_end is not None:
                    on_end(t1)

        timed.__wrapped__ = inner
        setattr(obj, attr, timed)

    def reset(self) -> dict[str, float]:
        out = dict(self.acc)
        for k in self.acc:
            self.acc[k] = 0.0
        return out


def _params(scenario: str, gen: int):
    from stream_attention.engine import SamplingParams

    if scenario == "bench":
        return SamplingParams(max_tokens=gen, ignore_eos=True), False
    if scenario == "stream":
        return SamplingParams(max_tokens=gen, ignore_eos=True, stop=["\n\nUser:", "<|im_end|>"]), True
    if scenario == "penalised":  # what the embedded model's requests run with (its generation config)
        return SamplingParams(max_tokens=gen, ignore_eos=True, repetition_penalty=1.2,
                              stop=["\n\nUser:", "<|im_end|>"]), True
    # Stop strings the random model will not produce, so that every sequence keeps
    # streaming (the checks still run every step).
    return SamplingParams(max_tokens=gen, temperature=0.8, top_p=0.95, ignore_eos=True,
                          stop=["\n\nUser:", "<|im_end|>"]), True


def _stub_forward(engine) -> None:
    """Replace the forward by handing back one of a few random logits buffers."""
    vocab = engine.runner.geometry.vocab_size
    g = torch.Generator().manual_seed(1)
    bufs = itertools.cycle([torch.randn(engine.scheduler.max_num_seqs, vocab, generator=g) for _ in range(7)])

    def execute(scheduled, fed=None):
        return next(bufs)[:sum(1 for s in scheduled if s.samples)], None

    engine.runner.execute = execute


def run_scenario(scenario: str, batch: int, prompt_len: int, gen: int, block_size: int,
                 profile: bool = False, real_forward: bool = False, pipeline: bool = False) -> dict:
    engine = _tiny_engine(batch, prompt_len, gen, block_size, pipeline)
    if not real_forward:
        _stub_forward(engine)
    params, stream = _params(scenario, gen)
    vocab = engine.runner.geometry.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    # A short warm-up batch (first-call costs: allocator, lazy imports).
    warm, _ = _params(scenario, 4)
    for p in prompts[:4]:
        engine.add_request(p[:16], warm, stream=stream)
    while engine.has_unfinished_requests():
        engine.step()

    timers = _Timers(engine)
    for p in prompts:
        engine.add_request(p, params, stream=stream, bounded=False)
    rows = []
    prof = cProfile.Profile() if profile else None
    n_out = 0
    extras: dict = {}
    t_return = time.perf_counter()
    while engine.has_unfinished_requests():
        timers.reset()
        decode = len(engine.scheduler.running) == batch and not engine.scheduler.waiting and all(
            s.num_computed_tokens == s.num_tokens - 1 for s in engine.scheduler.running)
        steady = decode and all(s.num_output_tokens < gen - 1 for s in engine.scheduler.running)
        if prof is not None and steady:
            prof.enable()
        t0 = time.perf_counter()
        if timers.wait_end is not None:
            timers.harness += t0 - t_return
        outs = engine.step()
        t_return = time.perf_counter()
        total = t_return - t0
        if prof is not None and steady:
            prof.disable()
        n_out += len(outs)
        sec = timers.reset()
        gap = sec.pop("gap")
        sec["post"] = total - sum(sec.values())
        sec["gap"] = gap
        sec["total"] = total
        sec["host"] = total - sec["forward"]
        sec["steady"] = steady
        rows.append(sec)
        if steady and not extras and engine.scheduler.running[0].num_output_tokens >= gen // 2:
            extras = _extras(engine, timers.last_scheduled)

    steady_rows = [r for r in rows if r["steady"]]
    ms = 1e3

    def stat(key: str, rs) -> dict:
        vals = [r[key] * ms for r in rs]
        return {"median_ms": statistics.median(vals), "mean_ms": statistics.fmean(vals)} if vals else {}

    result = {
        "scenario": scenario, "forward": "real" if real_forward else "stub", "batch": batch, "prompt_len": prompt_len, "gen": gen, "block_size": block_size,
        "steps": len(rows), "steady_steps": len(steady_rows), "outputs": n_out,
        "pipeline": pipeline,
        "steady": {k: stat(k, steady_rows) for k in ("host", *SECTIONS, "gap")},
        "all_steps_host_mean_ms": statistics.fmean(r["host"] * ms for r in rows),
        "all_steps_host_sum_ms": sum(r["host"] * ms for r in rows),
    }
    result.update(extras)
    if "sample_small_vocab_ms" in extras and steady_rows:
        # What the host would spend on a GPU: the sampler's Python and op dispatch
        # (measured on a narrow vocab) instead of the CPU's arithmetic over the full one.
        result["host_gpu_estimate_ms"] = (result["steady"]["host"]["median_ms"] - result["steady"]["sample"]["median_ms"]
                                          + extras["sample_small_vocab_ms"])
    if steady_rows and extras.get("graph_staging_ms") is not None:
        # The device idles from a step's tokens reaching the host to the next replay.
        result["gpu_idle_estimate_ms"] = result["steady"]["gap"]["median_ms"] + extras["graph_staging_ms"]
    if prof is not None:
        st = pstats.Stats(prof)
        st.sort_stats("tottime")
        result["profile"] = prof
    return result


def _median_ms(fn, reps: int = 200) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _extras(engine, scheduled) -> dict:
    """Side measurements on a steady decode batch (the engine's state is left as it was)."""
    out = {"graph_staging_ms": _graph_staging_ms(engine, scheduled)}
    seqs = [s.seq for s in scheduled]
    # A 16-wide vocab leaves the sampler's Python and per-op dispatch (what a GPU's
    # host pays: ~5-10 us per launched op) without the CPU's arithmetic.
    logits = torch.randn(len(seqs), 16)
    sampler = engine.sampler
    if hasattr(type(sampler), "launch"):
        launch = type(sampler).launch  # the class's, not the harness's timed wrapper

        def sample(x):
            return launch(sampler, x, seqs).wait()
    else:
        sampler = getattr(sampler, "__wrapped__", sampler)

        def sample(x):
            return sampler(x, seqs)
    out["sample_small_vocab_ms"] = _median_ms(lambda: sample(logits))
    out["sample_ops"] = _count_ops(lambda: sample(torch.randn(len(seqs), 16)))
    return out


def _count_ops(fn) -> int:
    """Tensor ops (aten calls) ``fn`` dispatches: each is a kernel launch on a GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def _graph_staging_ms(engine, scheduled) -> float | None:
    """Host time of ``ModelRunner._run_graph`` for ``scheduled`` with a no-op replay.

    The sequences were advanced after this step; the loop only reads their state, so
    it is re-run as if they were about to decode the last token again."""
    from stream_attention.engine.model_runner import DecodeStaging, ModelRunner

    runner = engine.runner
    n = len(scheduled)
    top = n
    bs = runner.block_size
    mb = -(-runner.max_model_len // bs)
    logits = torch.zeros(top, runner.geometry.vocab_size)
    fake = types.SimpleNamespace(
        _graph_sizes=[top], graphs={top: types.SimpleNamespace(graph=types.SimpleNamespace(replay=lambda: None),
                                                               batch=top, logits=logits)},
        block_size=bs, _max_blocks=mb, scratch_slot=runner.num_blocks * bs,
        _meta64=torch.zeros(3 * top, dtype=torch.long), _meta32=torch.zeros(top + 1 + top * mb, dtype=torch.int32),
        _stage64=torch.zeros(3 * top, dtype=torch.long), _stage32=torch.zeros(top + 1 + top * mb, dtype=torch.int32),
        _cu_decode=torch.arange(top + 1, dtype=torch.int32), device=torch.device("cpu"), kv_groups=None,
        _staged_copied=types.SimpleNamespace(synchronize=lambda: None, record=lambda: None),
    )
    fake._staging = DecodeStaging(fake._stage64.numpy(), fake._stage32.numpy(), bs, mb, fake.scratch_slot)
    fake._stage_decode = lambda sched, b: ModelRunner._stage_decode(fake, sched, b)
    # Make every sequence look like it is about to compute its last token.
    saved = [(s.seq.num_computed_tokens, s.seq) for s in scheduled]
    for s in scheduled:
        s.seq.num_computed_tokens = s.seq.num_tokens - 1
    try:
        if any(len(s.seq.block_table) * bs <= s.seq.num_kv_slots for s in scheduled):
            return None  # tables were freed (sequences finished)
        return _median_ms(lambda: ModelRunner._run_graph(fake, scheduled))
    except Exception as exc:  # the runner's internals changed; the harness only estimates
        print(f"graph staging estimate skipped: {exc!r}", file=sys.stderr)
        return None
    finally:
        for c, seq in saved:
            seq.num_computed_tokens = c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--scenario", choices=["bench", "server", "stream", "penalised", "all"], default="all")
    ap.add_argument("--profile", action="store_true", help="cProfile the steady decode steps (top 25 by tottime)")
    ap.add_argument("--real-forward", action="store_true",
                    help="run the tiny model (timed and subtracted) instead of a stub that returns random logits")
    ap.add_argument("--pipeline", action="store_true",
                    help="pipelined steps (the engine's default on CUDA): the next step is launched before the "
                         "text of this one is processed")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    np.random.seed(0)
    scenarios = ["bench", "stream", "server"] if args.scenario == "all" else [args.scenario]
    results = []
    for sc in scenarios:
        r = run_scenario(sc, args.batch, args.prompt_len, args.gen, args.block_size, profile=args.profile,
                         real_forward=args.real_forward, pipeline=args.pipeline)
        prof = r.pop("profile", None)
        s = r["steady"]
        line = "  ".join(f"{k} {s[k]['median_ms']:.3f}" for k in ("host", *SECTIONS, "gap") if s[k])
        mode = "pipelined" if r["pipeline"] else "synchronous"
        print(f"[{sc}] batch {r['batch']}, {mode} steps: steady decode step, median ms: {line}")
        print(f"[{sc}] host mean steady {s['host']['mean_ms']:.3f} ms, all {r['steps']} steps "
              f"{r['all_steps_host_mean_ms']:.3f} ms (sum {r['all_steps_host_sum_ms']:.1f} ms); sampler on a 16-wide "
              f"vocab {r.get('sample_small_vocab_ms', float('nan')):.3f} ms ({r.get('sample_ops')} ops) -> host work "
              f"per step on a GPU ~{r.get('host_gpu_estimate_ms', float('nan')):.3f} ms + staging "
              f"{r.get('graph_staging_ms') or float('nan'):.3f} ms; device idle per step ~ gap + staging = "
              f"{r.get('gpu_idle_estimate_ms', float('nan')):.3f} ms")
        if prof is not None:
            pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)
        results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
