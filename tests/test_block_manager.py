"""Block accounting and scheduling without a model: nothing leaks, whatever happens."""

from __future__ import annotations

import random

import pytest

from stream_attention.engine.block_manager import BlockManager
from stream_attention.engine.scheduler import Scheduler
from stream_attention.engine.sequence import Sequence, SequenceStatus
from stream_attention.engine.types import FinishReason, QueueFullError, SamplingParams


def _seq(rid: str, tokens: list[int], max_tokens: int = 8) -> Sequence:
    return Sequence(request_id=rid, prompt_token_ids=tokens, params=SamplingParams(max_tokens=max_tokens))


def _run_step(sched: Scheduler, rng: random.Random) -> list[Sequence]:
    """One step as the engine does it, with random tokens instead of a model.
    Returns the sequences that finished."""
    out = sched.schedule()
    for s in out.scheduled:
        seq = s.seq
        # The scheduled chunk must fit the blocks the sequence holds.
        assert -(-(seq.num_kv_slots + s.num_new_tokens) // sched.bm.block_size) <= len(seq.block_table)
    sched.commit(out.scheduled)
    done = []
    for s in out.scheduled:
        if s.samples:
            s.seq.token_ids.append(rng.randrange(50))
            if s.seq.num_output_tokens >= s.seq.params.max_tokens:
                sched.finish(s.seq, FinishReason.LENGTH)
                done.append(s.seq)
    return done


def test_prefix_blocks_are_shared_and_revived():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_waiting=8)
    prompt = list(range(13))  # 3 full blocks + 1 token
    a = _seq("a", prompt)
    sched.add(a)
    _run_step(sched, random.Random(0))
    assert a.num_computed_tokens == 13 and len(a.block_hashes) == 3
    b = _seq("b", prompt + [99])
    sched.add(b)
    out = sched.schedule()
    (sb,) = [s for s in out.scheduled if s.seq is b]
    assert b.block_table[:3] == a.block_table[:3] and sb.num_new_tokens == 14 - 12
    assert bm.blocks[a.block_table[0]].ref_count == 2
    sched.commit(out.scheduled)
    for s in (a, b):
        sched.finish(s, FinishReason.STOP)
    assert bm.num_free_blocks == bm.num_blocks
    # Freed blocks keep their hash: the same prompt is served from the cache again.
    c = _seq("c", prompt)
    sched.add(c)
    out = sched.schedule()
    assert out.scheduled[0].num_new_tokens == 1 and bm.prefix_cache_hits == 6
    sched.abort(c)
    bm.check_invariants([])


def test_whole_prompt_hit_still_computes_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_waiting=4)
    a = _seq("a", list(range(8)))
    sched.add(a)
    _run_step(sched, random.Random(0))
    b = _seq("b", list(range(8)))
    sched.add(b)
    out = sched.schedule()
    (sb,) = [s for s in out.scheduled if s.seq is b]
    # Only the first block can be reused: the second holds the token whose logits we need.
    assert sb.num_new_tokens == 4 and sb.samples


def test_preemption_frees_newest_and_recomputes():
    bm = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_waiting=4, admission_reserve_blocks=0)
    a, b = _seq("a", list(range(8)), max_tokens=12), _seq("b", list(range(100, 108)), max_tokens=12)
    sched.add(a)
    sched.add(b)
    rng = random.Random(0)
    _run_step(sched, rng)  # both prefill: 4 blocks used
    preempted = 0
    for _ in range(40):
        out_before = sched.num_preemptions
        _run_step(sched, rng)
        preempted += sched.num_preemptions - out_before
        if not sched.num_unfinished:
            break
    assert preempted > 0 and b.num_preemptions > 0 and a.num_preemptions == 0
    assert a.num_output_tokens == 12 and b.num_output_tokens == 12
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants([])


def test_queue_bound_and_abort_everywhere():
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=3, max_waiting=2)
    a, b, c = (_seq(x, list(range(10))) for x in "abc")
    sched.add(a)
    sched.add(b)
    with pytest.raises(QueueFullError):
        sched.add(c)
    out = sched.schedule()  # a runs its first 3-token chunk; b waits
    assert [s.seq for s in out.scheduled] == [a] and a.status is SequenceStatus.RUNNING
    sched.commit(out.scheduled)
    assert sched.abort(a) and sched.abort(b) and not sched.abort(b)
    assert a.finish_reason is FinishReason.ABORT and not a.block_table
    assert bm.num_free_blocks == 4 and sched.num_unfinished == 0


def test_drop_blocks_compacts_table():
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=64, max_waiting=2)
    a = _seq("a", list(range(14)))
    sched.add(a)
    _run_step(sched, random.Random(0))
    table = list(a.block_table)
    freed = bm.drop_blocks(a, [1, 2])
    assert freed == 2 and a.block_table == [table[0], table[3]] and a.num_kv_slots == 14 - 8
    with pytest.raises(ValueError):
        bm.drop_blocks(a, [1])  # the last block is partial
    bm.check_invariants([a])
    sched.finish(a, FinishReason.STOP)
    assert bm.num_free_blocks == 8


def test_thousand_requests_with_random_aborts_leave_every_block_free():
    rng = random.Random(1234)
    bm = BlockManager(num_blocks=48, block_size=4)
    sched = Scheduler(bm, max_num_seqs=12, max_num_batched_tokens=40, max_waiting=64)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 12))] for _ in range(5)]
    live: dict[str, Sequence] = {}
    submitted = finished = aborted = 0
    steps = 0
    while submitted < 1000 or live:
        for _ in range(rng.randrange(0, 4)):
            if submitted >= 1000:
                break
            prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 20))]
            seq = _seq(f"r{submitted}", prompt, max_tokens=rng.randrange(1, 16))
            try:
                sched.add(seq)
            except QueueFullError:
                break
            live[seq.request_id] = seq
            submitted += 1
        # Aborts land anywhere: waiting, mid-prefill, decoding, just preempted.
        for rid in list(live):
            if rng.random() < 0.02:
                assert sched.abort(live.pop(rid))
                aborted += 1
        for seq in _run_step(sched, rng):
            del live[seq.request_id]
            finished += 1
        steps += 1
        if steps % 50 == 0:
            bm.check_invariants(list(live.values()))
        assert steps < 20000, "scheduler made no progress"
    assert finished + aborted == 1000 and aborted > 0 and sched.num_preemptions > 0
    assert bm.num_free_blocks == bm.num_blocks and bm.prefix_cache_hits > 0
    bm.check_invariants([])


def test_block_tables_only_grow_in_place():
    """A consumer may cache a staged copy of a table keyed by (table object, length): the
    same object never changes below its old length (eviction assigns a new list)."""
    rng = random.Random(7)
    bm = BlockManager(num_blocks=40, block_size=4)
    sched = Scheduler(bm, max_num_seqs=6, max_num_batched_tokens=32, max_waiting=64)
    seen: dict[str, tuple[list[int], list[int]]] = {}
    live: dict[str, Sequence] = {}
    for step in range(400):
        if len(live) < 8 and rng.random() < 0.5:
            seq = _seq(f"r{step}", [rng.randrange(50) for _ in range(rng.randrange(1, 20))], rng.randrange(1, 24))
            sched.add(seq)
            live[seq.request_id] = seq
        for seq in _run_step(sched, rng):
            del live[seq.request_id]
        for seq in list(sched.running):
            full = seq.num_kv_slots // bm.block_size
            if full > 1 and rng.random() < 0.05:
                bm.drop_blocks(seq, [rng.randrange(full)])
        for rid, seq in live.items():
            obj, copy = seen.get(rid, (None, []))
            if seq.block_table is obj:
                assert seq.block_table[:len(copy)] == copy, rid
            seen[rid] = (seq.block_table, list(seq.block_table))
        bm.check_invariants(list(live.values()))


def test_commit_leaves_sequences_that_ended_during_the_step():
    """A pipelined engine may end a sequence (abort, stop string) while a step that
    includes it runs; committing that step must not touch it."""
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=64, max_waiting=2)
    a, b = _seq("a", list(range(6))), _seq("b", list(range(5)))
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert sched.abort(b)
    sched.commit(out.scheduled)
    assert a.num_computed_tokens == 6 and b.num_computed_tokens == 0 and not b.block_table
    bm.check_invariants([a])


def _decode_all(sched: Scheduler, out) -> None:
    """Pretend the model ran ``out``: commit it and give every sampling row its token."""
    sched.commit(out.scheduled)
    for s in out.scheduled:
        if s.samples:
            s.seq.token_ids.append(7)


def test_prefill_wait_holds_a_lone_arrival_for_company_then_admits() -> None:
    """With ``prefill_wait_steps=2`` a request arriving while others decode waits at most
    two decode steps; one arriving in the meantime joins it, so both prefill in one step."""
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_waiting=8, prefill_wait_steps=2)
    first = _seq("a", list(range(6)), max_tokens=16)
    sched.add(first)
    out = sched.schedule()  # an idle engine admits at once
    assert [s.seq.request_id for s in out.scheduled] == ["a"]
    _decode_all(sched, out)
    late = _seq("b", list(range(10, 16)), max_tokens=4)
    sched.add(late)
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1)]  # held 1
    _decode_all(sched, out)
    later = _seq("c", list(range(20, 26)), max_tokens=4)
    sched.add(later)
    out = sched.schedule()
    assert [s.seq.request_id for s in out.scheduled] == ["a"]  # held 2
    _decode_all(sched, out)
    out = sched.schedule()  # the wait is over: both prefill together
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 6), ("c", 6)]


def test_prefill_wait_admits_at_once_when_the_waiting_prompts_fill_half_the_budget() -> None:
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=40, max_waiting=8, prefill_wait_steps=4)
    sched.add(_seq("a", list(range(6)), max_tokens=16))
    _decode_all(sched, sched.schedule())
    sched.add(_seq("b", list(range(20)), max_tokens=4))  # 20 prompt tokens = half of 40
    assert [s.seq.request_id for s in sched.schedule().scheduled] == ["a", "b"]


def test_prefill_wait_off_admits_every_step() -> None:
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_waiting=8)
    sched.add(_seq("a", list(range(6)), max_tokens=16))
    _decode_all(sched, sched.schedule())
    sched.add(_seq("b", list(range(4)), max_tokens=4))
    assert [s.seq.request_id for s in sched.schedule().scheduled] == ["a", "b"]


# Found by mutation testing (docs/TESTING.md): counters and the prefix-hash chain.


def test_pool_of_one_block_is_valid_and_zero_is_refused():
    assert BlockManager(num_blocks=1, block_size=4).num_free_blocks == 1
    with pytest.raises(ValueError, match="num_blocks=0"):
        BlockManager(num_blocks=0, block_size=4)


def test_prefix_hit_keeps_the_hash_chain_for_later_hits():
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_waiting=4)
    rng = random.Random(0)
    a = _seq("a", list(range(13)))
    sched.add(a)
    _run_step(sched, rng)
    b = _seq("b", list(range(13)) + [50, 51, 52])  # 4 full blocks, the first 3 cached
    sched.add(b)
    _run_step(sched, rng)
    assert b.block_hashes[:3] == a.block_hashes and len(b.block_hashes) == 4
    assert b.num_cached_prompt_tokens == 12
    # A third request hits b's fourth block, whose hash chains from the cached three.
    c = _seq("c", list(b.prompt_token_ids) + [60])  # 16 cached + 1 to compute
    sched.add(c)
    (sc,) = [s for s in sched.schedule().scheduled if s.seq is c]
    assert sc.num_new_tokens == 1 and c.num_cached_prompt_tokens == 16


def test_drop_and_preemption_counters_accumulate():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=64, max_waiting=2)
    a = _seq("a", list(range(22)))
    sched.add(a)
    _run_step(sched, random.Random(0))
    bm.drop_blocks(a, [1])
    bm.drop_blocks(a, [1, 2])
    assert bm.blocks_dropped == 3 and a.num_dropped_tokens == 12 and a.prefix_cacheable is False
    assert a.block_hashes == []  # a compacted table no longer maps to prompt prefixes
    bm.check_invariants([a])


def test_chunked_prompts_are_admitted_only_when_they_fit_whole():
    # A pool of 12 blocks (48 slots), prompts of 36 and 40 tokens in 16-token steps. On its
    # first chunk alone, b would be admitted beside a's last chunk (3 blocks free), and a's
    # first decode block would then preempt b, discarding b's prefill. b must wait for a.
    bm = BlockManager(num_blocks=12, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=16, max_waiting=4,
                      enable_chunked_prefill=True, admission_reserve_blocks=0)
    a, b = _seq("a", list(range(36)), max_tokens=4), _seq("b", list(range(100, 140)), max_tokens=4)
    sched.add(a)
    sched.add(b)
    rng = random.Random(0)
    admitted_b_at = None
    for step in range(60):
        _run_step(sched, rng)
        if admitted_b_at is None and b.status is not SequenceStatus.WAITING:
            admitted_b_at = step
        if not sched.num_unfinished:
            break
    assert sched.num_preemptions == 0
    assert a.num_output_tokens == 4 and b.num_output_tokens == 4
    assert admitted_b_at is not None and admitted_b_at >= 3  # not beside a's last prompt chunk
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants([])



def test_windowed_prompts_are_admitted_on_their_first_chunk():
    # Every layer windowed (kv_reach 8): blocks behind the window go back to the pool during
    # the prefill, so a prompt needs far fewer blocks than its length and the whole-prompt
    # rule does not apply. b (40 tokens = the whole 10-block pool) starts beside a's decode
    # instead of waiting for a to finish.
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8, max_waiting=4,
                      enable_chunked_prefill=True, admission_reserve_blocks=0, kv_reach=8)
    a, b = _seq("a", list(range(40)), max_tokens=6), _seq("b", list(range(100, 140)), max_tokens=6)
    sched.add(a)
    sched.add(b)
    rng = random.Random(0)
    b_started_while_a_ran = False
    for _ in range(60):
        _run_step(sched, rng)
        b_started_while_a_ran |= b.status is not SequenceStatus.WAITING and a.status is SequenceStatus.RUNNING
        bm.check_invariants(sched.running)
        if not sched.num_unfinished:
            break
    assert b_started_while_a_ran
    assert a.num_output_tokens == 6 and b.num_output_tokens == 6
    assert bm.num_free_blocks == bm.num_blocks
