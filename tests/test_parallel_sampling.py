"""``SamplingParams.n > 1``: one prefill, forked block tables, per-choice seeds, block accounting."""

from __future__ import annotations

import pytest

from stream_attention.engine import SamplingParams
from stream_attention.engine.block_manager import BlockManager
from stream_attention.engine.sequence import Sequence
from tests import test_engine
from tests.test_engine import _engine, _hf_greedy, _prompts


@pytest.fixture(scope="module")
def tiny():
    """test_engine's tiny Llama (peaked logits, so greedy ties cannot flip) and tokenizer."""
    return test_engine.tiny.__wrapped__()

SAMPLED = SamplingParams(max_tokens=8, temperature=1.0, top_k=50, seed=1234, ignore_eos=True)


@pytest.mark.parametrize("pipeline", [False, True])
@pytest.mark.parametrize("prompt_len", [13, 16])  # a partial last block (copied), and none
def test_seeded_choices_equal_separate_requests_with_seed_plus_index(tiny, pipeline, prompt_len):
    eng = _engine(tiny, pipeline_steps=pipeline)
    prompt = _prompts([prompt_len], seed=3)[0]
    outs = eng.generate([prompt], SamplingParams(**{**SAMPLED.__dict__, "n": 3}))
    assert [o.index for o in outs] == [0, 1, 2]
    separate = eng.generate([prompt] * 3, [SamplingParams(**{**SAMPLED.__dict__, "seed": 1234 + i}) for i in range(3)])
    assert [o.token_ids for o in outs] == [o.token_ids for o in separate]
    assert len({tuple(o.token_ids) for o in outs}) > 1  # the seeds did differ
    assert eng.stats().kv_blocks_used == 0


def test_greedy_choices_are_identical_and_exact(tiny):
    _, ref, _ = tiny
    eng = _engine(tiny)
    prompt = _prompts([11], seed=5)[0]
    a, b = eng.generate(prompt, SamplingParams(max_tokens=9, ignore_eos=True, n=2))
    assert a.token_ids == b.token_ids == _hf_greedy(ref, prompt, 9)


def test_prompt_is_prefilled_once(tiny):
    eng = _engine(tiny, enable_prefix_caching=False)  # so separate requests could not share either
    prompt = _prompts([21], seed=7)[0]
    before = eng.stats()
    outs = eng.generate(prompt, SamplingParams(max_tokens=6, temperature=0.8, ignore_eos=True, n=4))
    after = eng.stats()
    assert after.prefill_tokens_total - before.prefill_tokens_total == len(prompt)
    assert after.prompt_tokens_total - before.prompt_tokens_total == len(prompt)
    assert after.generation_tokens_total - before.generation_tokens_total == 4 * 6
    assert after.requests_finished_total - before.requests_finished_total == 1
    assert all(len(o.token_ids) == 6 for o in outs)
    assert after.kv_blocks_used == 0
    # The reference: four separate requests prefill four times.
    eng.generate([prompt] * 4, SamplingParams(max_tokens=6, ignore_eos=True))
    assert eng.stats().prefill_tokens_total - after.prefill_tokens_total == 4 * len(prompt)


def test_stream_interleaves_choices_and_only_the_last_output_is_final(tiny):
    eng = _engine(tiny)
    rid = eng.add_request(_prompts([10])[0], SamplingParams(max_tokens=5, temperature=1.0, ignore_eos=True, n=3))
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert {o.request_id for o in outs} == {rid}
    assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished
    for i in range(3):
        mine = [o for o in outs if o.index == i]
        assert sum(len(o.delta_token_ids) for o in mine) == 5
        assert [o.finish_reason is not None for o in mine] == [False] * (len(mine) - 1) + [True]
        assert "".join(o.delta_text for o in mine) == mine[-1].text


def test_abort_ends_every_choice_and_frees_blocks(tiny):
    eng = _engine(tiny)
    rid = eng.add_request(_prompts([19])[0], SamplingParams(max_tokens=50, ignore_eos=True, n=3))
    for _ in range(3):
        eng.step()
    assert eng.stats().running == 3
    assert eng.abort(rid)
    outs = eng.step()
    assert sorted(o.index for o in outs) == [0, 1, 2]
    assert [o.finished for o in outs] == [False, False, True]
    assert {o.finish_reason.value for o in outs} == {"abort"}
    assert eng.stats().kv_blocks_used == 0
    assert not eng.has_unfinished_requests()


def test_preemption_of_forked_choices_keeps_exact_output_and_books_balanced(tiny):
    _, ref, _ = tiny
    # 12 blocks of 8 tokens: three 2-choice requests of 30 tokens each cannot all fit.
    eng = _engine(tiny, num_kv_blocks=12)
    prompts = _prompts([9, 14, 12], seed=11)
    ids = [eng.add_request(p, SamplingParams(max_tokens=18, ignore_eos=True, n=2), stream=False) for p in prompts]
    final: dict[tuple[str, int], list[int]] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finish_reason is not None:
                final[(out.request_id, out.index)] = list(out.token_ids)
        live = list(eng.scheduler.running) + list(eng.scheduler.waiting)
        eng.block_manager.check_invariants(live)
    assert eng.stats().preemptions_total > 0
    for rid, p in zip(ids, prompts, strict=True):
        expected = _hf_greedy(ref, p, 18)
        assert final[(rid, 0)] == final[(rid, 1)] == expected
    assert eng.stats().kv_blocks_used == 0


def test_n_is_validated(tiny):
    eng = _engine(tiny, max_num_seqs=4)
    with pytest.raises(ValueError, match="n=0"):
        eng.add_request([5, 6], SamplingParams(n=0))
    with pytest.raises(ValueError, match="max_num_seqs"):
        eng.add_request([5, 6], SamplingParams(n=5))


def test_block_fork_shares_full_blocks_and_copies_the_partial_one():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    parent = Sequence("r", list(range(10)), SamplingParams())
    assert bm.allocate(parent, 10)
    child = Sequence("r", list(range(10)), SamplingParams())
    copies = bm.fork(parent, child, 10)
    assert child.block_table[:2] == parent.block_table[:2]
    assert copies == [(parent.block_table[2], child.block_table[2])] and child.block_table[2] != parent.block_table[2]
    assert child.num_computed_tokens == 10
    bm.check_invariants([parent, child])
    # Nothing free: the child keeps the full blocks and will recompute the partial one.
    other = Sequence("o", list(range(16)), SamplingParams())
    assert bm.allocate(other, 16) and bm.num_free_blocks == 0
    late = Sequence("r", list(range(10)), SamplingParams())
    assert bm.fork(parent, late, 10) == []
    assert late.block_table == parent.block_table[:2] and late.num_computed_tokens == 8
    bm.check_invariants([parent, child, other, late])
    for s in (parent, child, other, late):
        bm.free(s)
    assert bm.num_free_blocks == 8
