"""KV memory of a Gemma-2-2B-shaped model with and without the hybrid KV cache.

    python benchmarks/bench_hybrid_kv.py --out hybrid_kv.json [--device cuda] [--budget-gib 40] [--context 32768]

The model (hidden 2304, 26 layers alternating 4096-token windows and global attention,
8 query / 4 KV heads of 256, bf16 pages) is built on the meta device: no weights, only
its config and attention modules, which the engine reads for its layer groups
(``attention_spec.kv_groups``) and checks as it would at load time. For each layout,
one block table for every layer (``hybrid_kv_cache=False``) and the hybrid one:

- KV bytes one sequence holds at ``--context`` tokens (decode steady state: the full
  group's every block, the windowed group's window plus one block);
- how many such sequences the pool sized from ``--budget-gib`` holds, by that arithmetic
  and *measured* through the engine's own ``Scheduler`` and ``BlockManager`` (no model):
  sequences of ``--context`` tokens are admitted, prefilled in chunks of
  ``--max-num-batched-tokens`` and decoded for ``--decode-tokens`` more; the figure is
  the most sequences decoding at once, each holding at least ``context - decode_tokens``
  tokens;
- with ``--device cuda``: the pool really allocated (``KVPoolLayout.allocate``) and the
  bytes the device's allocator reports for it.

Expected at 32k, 40 GiB, pages of 16: 3.25 GiB per sequence without groups, 1.83 GiB
with (1.78x), 12 against 21 sequences.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_attention.engine.attention_spec import kv_groups, layer_attention, unsupported_attention  # noqa: E402
from stream_attention.engine.block_manager import BlockManager  # noqa: E402
from stream_attention.engine.kv_compression import KVPoolLayout  # noqa: E402
from stream_attention.engine.scheduler import Scheduler  # noqa: E402
from stream_attention.engine.sequence import Sequence  # noqa: E402
from stream_attention.engine.types import FinishReason, SamplingParams  # noqa: E402

GIB = 2**30


def gemma2_2b_config(context: int):
    """Gemma-2-2B's shape (the one ``bench_families.py`` runs), context ``context``."""
    import transformers

    return transformers.Gemma2Config(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, sliding_window=4096, max_position_embeddings=context,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=256,
    )


def meta_model(config):
    """The model's modules without weights (the engine's load-time attention audit runs on it)."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    reason = unsupported_attention(model)
    if reason is not None:
        raise SystemExit(f"the engine would refuse this model: {reason}")
    return model


def simulate(bm: BlockManager, context: int, decode_tokens: int, max_batched: int, num_seqs: int) -> dict:
    """Run ``num_seqs`` requests of ``context`` tokens through the scheduler with no model:
    every scheduled token counts as computed, every sampling row appends a token. Returns
    the most sequences decoding at full context at once, and the preemptions."""
    sched = Scheduler(bm, max_num_seqs=1024, max_num_batched_tokens=max_batched, max_waiting=10**6)
    params = SamplingParams(max_tokens=decode_tokens, ignore_eos=True)
    for i in range(num_seqs):
        sched.add(Sequence(f"r{i}", [1] * (context - decode_tokens), params))
    peak = steps = 0
    full = context - decode_tokens
    while sched.num_unfinished:
        out = sched.schedule()
        if not out:
            raise RuntimeError("the scheduler made no progress")
        sched.commit(out.scheduled)
        steps += 1
        for s in out.scheduled:
            seq = s.seq
            if s.samples and not seq.is_finished:
                seq.token_ids.append(1)
                if len(seq.token_ids) >= seq.token_limit:
                    sched.finish(seq, FinishReason.LENGTH)
        peak = max(peak, sum(1 for seq in sched.running if seq.num_computed_tokens >= full))
    bm.check_invariants([])
    return {"peak_sequences_at_context": peak, "preemptions": sched.num_preemptions, "steps": steps}


def measure(layout_name: str, model, args) -> dict:
    cfg = model.config
    layers = layer_attention(cfg)
    groups = kv_groups(layers) if layout_name == "hybrid" else None
    slots = cfg.num_hidden_layers if groups is None else groups.num_slots
    bs = args.block_size
    layout = KVPoolLayout(slots, bs, cfg.num_key_value_heads, cfg.head_dim, None, torch.bfloat16)
    budget = int(args.budget_gib * GIB)
    pages = layout.blocks_for_budget(budget, args.device)
    page_bytes = layout.pool_bytes(2) - layout.pool_bytes(1)
    bm = BlockManager(pages, bs, enable_prefix_caching=False,
                      window_reach=None if groups is None else groups.window_reach,
                      window_pages=1 if groups is None else groups.window_pages)
    per_seq = bm.pages_for_tokens(args.context, 1)  # decode steady state: chunks of one token
    row = {
        "layout": layout_name,
        "page_layers": slots,
        "window_pages_per_block": None if groups is None else groups.window_pages,
        "pool_pages": pages,
        "pool_gib": layout.pool_bytes(pages + 1) / GIB,
        "kv_gib_per_sequence": per_seq * page_bytes / GIB,
        "sequences_fit_arithmetic": pages // per_seq,
    }
    t0 = time.perf_counter()
    row.update(simulate(bm, args.context, args.decode_tokens, args.max_num_batched_tokens,
                        num_seqs=pages // per_seq + 4))
    row["simulate_s"] = time.perf_counter() - t0
    if torch.device(args.device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(args.device)
        pool = layout.allocate(pages + 1, args.device)
        torch.cuda.synchronize()
        row["allocated_gib"] = (torch.cuda.memory_allocated(args.device) - before) / GIB
        del pool
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budget-gib", type=float, default=40.0)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--decode-tokens", type=int, default=512,
                    help="tokens generated after each prompt (enough for every admitted prompt to be prefilled "
                         "while the first ones still decode)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    model = meta_model(gemma2_2b_config(args.context))
    rows = [measure(name, model, args) for name in ("single_table", "hybrid")]
    single, hybrid = rows
    result = {
        "model": "gemma2-2b shape (meta device, no weights)",
        "context": args.context, "budget_gib": args.budget_gib, "block_size": args.block_size,
        "device": args.device, "torch": torch.__version__, "python": platform.python_version(),
        "rows": rows,
        "per_sequence_ratio": single["kv_gib_per_sequence"] / hybrid["kv_gib_per_sequence"],
        "sequences_ratio_measured": hybrid["peak_sequences_at_context"] / max(1, single["peak_sequences_at_context"]),
    }
    for r in rows:
        print(f"{r['layout']:>12}: {r['kv_gib_per_sequence']:.2f} GiB/seq at {args.context} tokens; "
              f"{r['pool_pages']} pages of {r['page_layers']} layers ({r['pool_gib']:.2f} GiB); "
              f"{r['sequences_fit_arithmetic']} sequences fit by arithmetic, {r['peak_sequences_at_context']} "
              f"decoded at once through the scheduler ({r['preemptions']} preemptions)"
              + (f"; allocated {r['allocated_gib']:.2f} GiB" if "allocated_gib" in r else ""))
    print(f"per sequence {result['per_sequence_ratio']:.2f}x less KV; "
          f"{result['sequences_ratio_measured']:.2f}x the sequences at {args.context} tokens")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
