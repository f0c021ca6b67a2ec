"""The hybrid KV cache: models that mix full-attention and sliding-window layers (Gemma 2/3)
keep only the window in their windowed layers' blocks.

Tiny random models through ``LLMEngine`` with the Triton kernels (interpreter on CPU),
prompts and generations longer than the window (8 tokens, pages of 4): greedy tokens
identical to transformers' ``generate``, while the block manager shows that the windowed
group holds no more than the window plus one block per sequence, and its books balance
after every step. The paths that touch block tables each get a run: chunked prefill,
preemption and recompute, ``n > 1`` forks, n-gram speculation with rollback, prefix-cache
reuse, and the decode graphs' staged inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch

from stream_attention.engine import LLMEngine, SamplingParams
from stream_attention.engine.attention_spec import LayerAttention, kv_groups
from stream_attention.engine.block_manager import BlockManager
from stream_attention.engine.scheduler import Scheduler
from stream_attention.engine.sequence import Sequence

transformers = pytest.importorskip("transformers")

WINDOW = 8
REACH = WINDOW - 1
BS = 4
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=256, initializer_range=0.05, tie_word_embeddings=False,
              sliding_window=WINDOW, query_pre_attn_scalar=1)
S, F = "sliding_attention", "full_attention"
# Gemma 3 with 2 global layers and 3 local ones: pages of 2 layers, a windowed block takes
# 2 pages (one padded slot); with 1 global and 2 local layers (the cheaper model most
# paths run on) pages of 1 layer, 2 per windowed block; Gemma 2 alternates (1 page each).
MODELS = {
    "gemma3": ("Gemma3TextConfig", dict(num_hidden_layers=3, layer_types=[S, F, S]), "sdpa"),
    "gemma3_padded": ("Gemma3TextConfig", dict(num_hidden_layers=5, layer_types=[S, S, F, S, F]), "sdpa"),
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=2, attn_logit_softcapping=5.0, final_logit_softcapping=2.0),
               "eager"),
}
MAX_TOKENS = 12
PROMPT_LENGTHS = (21, 5, 14)


def _build(name: str):
    cls, overrides, attn = MODELS[name]
    cfg = getattr(transformers, cls)(**{**COMMON, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=attn).eval()
    # Sharpened q/k and random norms (as tests/test_model_families.py): attention, not the
    # last token's embedding, decides the next token, so a wrong window changes tokens.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            if "norm" in pname:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            if pname.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
            elif pname.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(8.0 * (1.0 + p) - 1.0)
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=attn).eval()
    model.load_state_dict(ref.state_dict())
    ref.generation_config.eos_token_id = None
    return model, ref


@pytest.fixture(scope="module")
def gemma3():
    return _build("gemma3")


def _prompts(lengths=PROMPT_LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(ref, prompt: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _engine(model, **kw) -> LLMEngine:
    from stream_attention.models.default import load_tokenizer

    args = dict(num_kv_blocks=96, block_size=BS, max_num_batched_tokens=16, use_cuda_graphs=False,
                attention_backend="triton")
    return LLMEngine(model, load_tokenizer(), **{**args, **kw})


class _Watch:
    """After every commit: the block manager's invariants over every live sequence, and
    the most logical blocks a sequence's windowed table held once the step was done."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.peak_window = 0
        self.steps = 0
        commit = Scheduler.commit
        watch = self

        def watching(sched, scheduled, collector=None):
            commit(sched, scheduled, collector)
            bm = sched.bm
            bm.check_invariants(sched.running + list(sched.waiting))
            for s in scheduled:
                if not s.seq.is_finished:
                    watch.peak_window = max(watch.peak_window, len(s.seq.window_table) // bm.window_pages)
            watch.steps += 1

        mp.setattr(Scheduler, "commit", watching)


# After a step the windowed table starts at the block of position ``computed - reach`` and
# ends with the block of the last computed token.
WINDOW_BLOCKS = -(-(REACH + BS - 1) // BS)


# ---------------------------------------------------------------------- layout and books
def test_layer_groups_follow_the_layer_pattern():
    full, win = LayerAttention(), LayerAttention(sliding_window=WINDOW)
    g2 = kv_groups([win, full] * 13)  # Gemma 2: alternating
    assert (g2.num_slots, g2.window_pages, g2.padded_slots, g2.window_reach) == (13, 1, 0, REACH)
    assert g2.group_of_layer[:4] == (0, -1, 0, -1) and g2.slot_of_layer[:4] == (0, 0, 1, 1)
    g3 = kv_groups(([win] * 5 + [full]) * 4 + [win, win])  # Gemma 3 1B: 4 global, 22 local
    assert (g3.num_slots, g3.window_pages, g3.padded_slots) == (4, 6, 2)
    # Every (slot, round) pair is one layer's: no two layers write the same pages.
    pairs = {(s, gr) for s, gr in zip(g3.slot_of_layer, g3.group_of_layer, strict=True)}
    assert len(pairs) == 26
    assert kv_groups([full] * 4) is None and kv_groups([win] * 4) is None
    assert kv_groups([full, full, win]) is None  # more global than local layers: one table


def test_block_manager_keeps_the_window_and_balances_its_books():
    bm = BlockManager(64, BS, window_reach=REACH, window_pages=2)
    seq = Sequence("a", list(range(30)), SamplingParams())
    assert bm.allocate(seq, 16)  # a 16-token chunk: both groups hold it for the step
    assert len(seq.block_table) == 4 and len(seq.window_table) == 8
    seq.num_computed_tokens = 16
    bm.commit(seq)
    assert bm.slide_window(seq) == 2  # the next query (position 16) reads back to 9: block 2 on
    assert seq.window_dropped_tokens == 8 and len(seq.window_table) == 4 and len(seq.block_table) == 4
    bm.check_invariants([seq])
    # Speculative rollback: the tail goes in both groups, to the same logical end.
    assert bm.allocate(seq, 6)
    assert bm.truncate(seq, 17) == 3  # one full-group block, one windowed block of 2 pages
    assert len(seq.block_table) == 5 and len(seq.window_table) == 6
    bm.check_invariants([seq])
    # A fork shares the full blocks and copies the partial one in each group.
    child = Sequence("a", list(range(30)), SamplingParams())
    copies = bm.fork(seq, child, 17)
    assert len(copies) == 3 and child.window_dropped_tokens == 8 and child.num_computed_tokens == 17
    assert child.window_table[:4] == seq.window_table[:4] and child.block_table[:4] == seq.block_table[:4]
    bm.check_invariants([seq, child])
    bm.free(seq)
    bm.free(child)
    bm.check_invariants([])
    assert bm.num_free_blocks == bm.num_blocks


def test_prefix_match_needs_the_window_tail_cached():
    """A prefix hit counts only as far as the windowed group still has the blocks the next
    query reads: once those pages are reused, the hit shrinks (here to nothing)."""
    bm = BlockManager(24, BS, window_reach=REACH)
    tokens = list(range(3, 24))  # 21 tokens: 5 full blocks can be matched
    first = Sequence("a", tokens, SamplingParams())
    assert bm.allocate(first, 21)
    first.num_computed_tokens = 21
    bm.commit(first)
    bm.slide_window(first)
    bm.free(first)
    again = Sequence("b", tokens, SamplingParams())
    match = bm.match_prefix(again)
    assert len(match) == 5 and match.window_first == (20 - REACH) // BS and len(match.window) == 5 - 3
    bm.take_cached(again, match)
    assert again.num_computed_tokens == 20 and again.window_dropped_tokens == 12
    bm.check_invariants([again])
    bm.free(again)
    # Use up the free pages (the windowed tail's pages among them): no hit any more.
    hog = Sequence("h", list(range(200, 296)), SamplingParams())
    assert bm.allocate(hog, 4 * 12 - 4)
    late = Sequence("c", tokens, SamplingParams())
    assert len(bm.match_prefix(late)) < 5
    bm.check_invariants([hog])


# ---------------------------------------------------------------------- through the engine
@pytest.mark.parametrize("name", ["gemma3_padded", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_hybrid_greedy_matches_transformers_and_holds_only_the_window(name):
    model, ref = _build(name)
    prompts = _prompts()
    with pytest.MonkeyPatch.context() as mp:
        watch = _Watch(mp)
        eng = _engine(model)
        outs = eng.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    assert eng.runner.kv_groups == kv_groups([LayerAttention(s.sliding_window) for s in eng.runner.layer_attention])
    assert eng.block_manager.window_reach == REACH
    for out, prompt in zip(outs, prompts, strict=True):
        assert out.token_ids == _hf_greedy(ref, prompt), len(prompt)
    assert watch.peak_window <= WINDOW_BLOCKS, watch.peak_window
    assert eng.block_manager.window_blocks_released > 0
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


@pytest.mark.slow
def test_hybrid_off_keeps_one_table(gemma3):
    model, ref = gemma3
    eng = _engine(model, hybrid_kv_cache=False)
    assert eng.runner.kv_groups is None and eng.block_manager.window_reach is None
    prompt = _prompts()[0]
    out = eng.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))[0]
    assert out.token_ids == _hf_greedy(ref, prompt)
    assert eng.block_manager.window_blocks_released == 0


@pytest.mark.slow
def test_preemption_recomputes_both_groups(gemma3):
    """A pool too small for every sequence at once: sequences are preempted (both tables
    freed) and recomputed, and still give transformers' tokens."""
    model, ref = gemma3
    prompts = _prompts((21, 18, 14), seed=3)
    with pytest.MonkeyPatch.context() as mp:
        _Watch(mp)
        eng = _engine(model, num_kv_blocks=24)
        outs = eng.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    assert eng.scheduler.num_preemptions > 0
    for out, prompt in zip(outs, prompts, strict=True):
        assert out.token_ids == _hf_greedy(ref, prompt)
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_parallel_choices_fork_both_groups(gemma3):
    """n = 2 after a prompt longer than the window, prefilled in chunks: the choices share
    the full blocks and copy the partial one in each group; greedy choices are identical."""
    model, ref = gemma3
    prompt = _prompts((22,), seed=5)[0]
    with pytest.MonkeyPatch.context() as mp:
        watch = _Watch(mp)
        eng = _engine(model)
        outs = eng.generate([prompt], SamplingParams(n=2, max_tokens=MAX_TOKENS, ignore_eos=True))
    want = _hf_greedy(ref, prompt)
    assert [out.token_ids for out in outs] == [want, want]
    assert watch.peak_window <= WINDOW_BLOCKS
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


@pytest.mark.slow
def test_ngram_speculation_rolls_back_both_groups(gemma3):
    model, ref = gemma3
    base = _prompts((6,), seed=7)[0]
    prompts = [base * 4, _prompts((13,), seed=8)[0] * 2]  # repeats: prompt lookup proposes drafts
    with pytest.MonkeyPatch.context() as mp:
        watch = _Watch(mp)
        eng = _engine(model, speculative_method="ngram", num_speculative_tokens=3, prompt_lookup_min=1,
                      prompt_lookup_max=3)
        outs = eng.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    for out, prompt in zip(outs, prompts, strict=True):
        assert out.token_ids == _hf_greedy(ref, prompt)
    stats = eng.stats()
    assert stats.spec_decode_num_draft_tokens_total > stats.spec_decode_num_accepted_tokens_total  # rollbacks
    assert watch.peak_window <= WINDOW_BLOCKS
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_prefix_cache_reuses_both_groups(gemma3):
    model, ref = gemma3
    prompt = _prompts((23,), seed=9)[0]
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    with pytest.MonkeyPatch.context() as mp:
        _Watch(mp)
        eng = _engine(model)
        first = eng.generate([prompt], params)[0]
        second = eng.generate([prompt], params)[0]
    assert first.token_ids == second.token_ids == _hf_greedy(ref, prompt)
    # (23 - 1) // 4 = 5 blocks; the windowed group still held the blocks back to position 20 - 7.
    assert eng.block_manager.prefix_cache_hit_tokens == 20


@pytest.mark.slow
def test_decode_graph_inputs_give_the_eager_step_logits(gemma3):
    """What a decode graph computes (the fixed, padded buffers of ``HybridDecodeStaging``
    run eagerly: ``run_decode_static``) equals the eager decode step, windowed group
    included, for every decode step of a generation longer than the window."""
    model, _ = gemma3
    eng = _engine(model, max_num_seqs=3)
    runner = eng.runner
    runner._alloc_decode_inputs([1, 2, 4])
    eager_execute = runner.execute
    checked = []

    def execute(scheduled, fed=None):
        # The staged step first: had it written a token's K/V anywhere but its slot, the
        # pages it reads would lack that token (the eager step writes the same slots next).
        static = None
        if all(s.num_new_tokens == 1 for s in scheduled) and runner._window_fits(scheduled):
            static = runner.run_decode_static(scheduled)
        logits, collector = eager_execute(scheduled, fed)
        if static is not None:
            torch.testing.assert_close(static, logits, rtol=1e-4, atol=1e-4)
            checked.append(len(scheduled))
        return logits, collector

    runner.execute = execute
    eng.generate(_prompts(), SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    assert len(checked) > 5 and 3 in checked  # padded to the 4-row layout


def test_capacity_check_counts_both_groups(gemma3):
    """A request that could not fit the pool even alone is refused at admission; one that
    fits only because the windowed group frees what leaves the window is accepted."""
    from stream_attention.engine.types import PromptTooLongError

    model, _ = gemma3
    eng = _engine(model, num_kv_blocks=40)
    bm = eng.block_manager
    # 100 tokens: 25 full-group blocks + 2 pages x min(25, ceil((7 + 16) / 4) + 1 = 7) = 39 pages.
    assert bm.pages_for_tokens(100, 16) == 39
    eng.make_request(list(range(3, 53)), SamplingParams(max_tokens=50))
    with pytest.raises(PromptTooLongError, match="KV cache"):
        eng.make_request(list(range(3, 53)), SamplingParams(max_tokens=60))


def test_bench_hybrid_kv_measures_the_gemma2_shape(tmp_path):
    """benchmarks/bench_hybrid_kv.py on CPU (meta-device model, the engine's scheduler and
    block manager, no weights): the Gemma-2-2B shape at 32k holds 3.25 GiB per sequence
    with one table and 1.83 GiB with the hybrid cache, and that many more sequences run."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_hybrid_kv.py"
    spec = importlib.util.spec_from_file_location("bench_hybrid_kv", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "hybrid.json"
    assert bench.main(["--budget-gib", "20", "--out", str(out)]) == 0
    single, hybrid = json.loads(out.read_text())["rows"]
    # 26 layers x 4 KV heads x 256 x 2 (K, V) x 2 bytes x 32768 tokens; hybrid: 13 layers of
    # that plus 13 layers x (ceil(4095 / 16) + 1) blocks of 16 tokens.
    assert single["kv_gib_per_sequence"] == pytest.approx(26 * 4096 * 32768 / 2**30)
    assert hybrid["kv_gib_per_sequence"] == pytest.approx(13 * 4096 * (32768 + 257 * 16) / 2**30)
    assert (single["peak_sequences_at_context"], hybrid["peak_sequences_at_context"]) == (6, 10)
    assert single["preemptions"] == hybrid["preemptions"] == 0


def test_async_scheduling_over_both_groups(gemma3):
    """Decode steps launched ahead of their tokens (pipelined, async scheduling) in a pool
    small enough that a step launched ahead must count the pages of both groups: the
    same tokens as transformers, the window held, the books balanced."""
    model, ref = gemma3
    prompts = _prompts((21, 18, 14), seed=3)
    with pytest.MonkeyPatch.context() as mp:
        watch = _Watch(mp)
        eng = _engine(model, num_kv_blocks=26, pipeline_steps=True)
        outs = eng.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS + 8, ignore_eos=True))
    assert eng.num_steps_launched_ahead > 5
    for out, prompt in zip(outs, prompts, strict=True):
        assert out.token_ids == _hf_greedy(ref, prompt, MAX_TOKENS + 8)
    assert watch.peak_window <= WINDOW_BLOCKS
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_decode_graph_self_check_rejects_wrong_staging(gemma3, monkeypatch):
    """The start-up check that drops hybrid decode graphs whose logits differ from the eager
    step's: it passes what a graph computes (``run_decode_static``) and raises when the
    staged rows come back swapped."""
    model, _ = gemma3
    runner = _engine(model, max_num_seqs=3).runner
    runner._alloc_decode_inputs([1, 2, 4])
    monkeypatch.setattr(runner, "_run_graph", lambda rows, fed=None: runner.run_decode_static(rows))
    runner._check_decode_graphs()
    monkeypatch.setattr(runner, "_run_graph", lambda rows, fed=None: runner.run_decode_static(rows).flip(0))
    with pytest.raises(RuntimeError, match="decode graph logits differ"):
        runner._check_decode_graphs()
