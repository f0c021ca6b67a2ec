"""Block manager properties under random operation sequences (hypothesis stateful testing).

The manager has no fork: sequences share blocks only through the prefix cache (a later
prompt with the same leading blocks takes the cached blocks). The state machine drives
the manager the way the scheduler does (match/admit, allocate per step, commit, free,
preempt, drop blocks for KV eviction) and keeps its own books, built only from what each
call promised:

* ``owners[block]``: the live sequences that hold the block. A fresh allocation must come
  from blocks nobody holds; only a prefix-cache hit may add a second owner.
* ``content[block]``: the tokens the model would have written into each slot. A prefix
  hit must hand out blocks whose content is exactly the prompt's leading tokens (a
  block reallocated and overwritten since it was cached must not be served).

After every step the manager's reference counts must equal the number of owners and its
free count the number of unowned blocks; at the end, with everything freed, every block
is free again.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from stream_attention.engine.block_manager import BlockManager
from stream_attention.engine.sequence import Sequence
from stream_attention.engine.types import SamplingParams

BLOCK_SIZE = 4
NUM_BLOCKS = 6  # small: admissions and allocations are refused now and then
# Few distinct prompt heads so that prefixes repeat and the cache is hit often.
HEADS = ((1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 4, 20, 21, 22, 23), (30, 31, 32, 33, 34))


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.owners: dict[int, list[str]] = defaultdict(list)
        self.content: dict[int, list[int | None]] = {}
        self.hits_seen = 0
        self.next_id = 0

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def _note(what: str) -> None:
        """Count ``what`` in ``--hypothesis-show-statistics`` (when hypothesis drives us)."""
        if currently_in_test_context():
            event(what)

    def _write(self, seq: Sequence, start: int, n: int) -> None:
        """Record the tokens a step computes at logical positions [start, start + n)."""
        for pos in range(start, start + n):
            slot = pos - seq.num_dropped_tokens
            bid = seq.block_table[slot // BLOCK_SIZE]
            self.content[bid][slot % BLOCK_SIZE] = seq.token_ids[pos]

    def _take_new(self, seq: Sequence, before: int) -> None:
        for bid in seq.block_table[before:]:
            assert not self.owners[bid], f"block {bid} handed to {seq.request_id} while held by {self.owners[bid]}"
            self.owners[bid].append(seq.request_id)
            self.content[bid] = [None] * BLOCK_SIZE

    def _release(self, seq: Sequence, bids: list[int]) -> None:
        for bid in bids:
            self.owners[bid].remove(seq.request_id)

    def _snapshot(self) -> tuple[object, ...]:
        return (self.bm.num_free_blocks, tuple(b.ref_count for b in self.bm.blocks),
                tuple(tuple(s.block_table) for s in self.running + self.waiting))

    # ------------------------------------------------------------------- rules
    @precondition(lambda self: len(self.waiting) + len(self.running) < 8)
    @rule(head=st.sampled_from(HEADS), tail=st.lists(st.integers(40, 45), max_size=10), max_tokens=st.integers(1, 8))
    def add(self, head: tuple[int, ...], tail: list[int], max_tokens: int) -> None:
        seq = Sequence(f"r{self.next_id}", list(head) + tail, SamplingParams(max_tokens=max_tokens))
        self.next_id += 1
        self.waiting.append(seq)

    @rule(data=st.data(), chunk=st.integers(1, 12))
    def admit(self, data: st.DataObject, chunk: int) -> None:
        if not self.waiting:
            return
        self.admit_seq(data.draw(st.sampled_from(self.waiting)), chunk)

    def admit_seq(self, seq: Sequence, chunk: int) -> None:
        """Admission as the scheduler does it, including prefix-cache hits (sharing)."""
        cached = self.bm.match_prefix(seq)
        for i, bid in enumerate(cached):
            want = seq.token_ids[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
            assert self.content.get(bid) == want, f"cached block {bid} holds {self.content.get(bid)}, want {want}"
        n = min(seq.num_tokens - len(cached) * BLOCK_SIZE, chunk)
        before = self._snapshot()
        if not self.bm.can_admit(seq, cached, n):
            self._note("admission refused: pool short")
            assert self._snapshot() == before
            return
        self.bm.take_cached(seq, cached)
        for bid in cached:
            self.owners[bid].append(seq.request_id)
        self.hits_seen += len(cached)
        if any(self.bm.blocks[b].ref_count > 1 for b in cached):
            self._note("block shared by several live sequences")
        elif cached:
            self._note("freed block revived from the prefix cache")
        assert self.bm.allocate(seq, n), "can_admit promised room"
        self._take_new(seq, len(cached))
        self._write(seq, seq.num_computed_tokens, n)
        seq.num_computed_tokens += n
        self.bm.commit(seq)
        self.waiting.remove(seq)
        self.running.append(seq)

    @rule(data=st.data(), chunk=st.integers(1, 8))
    def step(self, data: st.DataObject, chunk: int) -> None:
        if not self.running:
            return
        self.step_seq(data.draw(st.sampled_from(self.running)), chunk, data.draw(st.integers(40, 45)))

    def step_seq(self, seq: Sequence, chunk: int, next_token: int) -> None:
        """One model step of a running sequence: the rest of its prefill (chunked) or a decode."""
        remaining = seq.num_tokens - seq.num_computed_tokens
        if remaining == 0:  # the last step sampled: a new token to compute
            if seq.num_output_tokens >= seq.params.max_tokens:
                return
            seq.token_ids.append(next_token)
            remaining = 1
        n = min(remaining, chunk)
        before, table_len = self._snapshot(), len(seq.block_table)
        if not self.bm.allocate(seq, n):
            self._note("allocation refused: pool short")
            assert self._snapshot() == before, "a refused allocation changed the books"
            return
        self._take_new(seq, table_len)
        self._write(seq, seq.num_computed_tokens, n)
        seq.num_computed_tokens += n
        self.bm.commit(seq)

    @rule(data=st.data(), twice=st.booleans())
    def free(self, data: st.DataObject, twice: bool) -> None:
        """Finish or abort: every block goes back (freeing twice is harmless)."""
        if not self.running:
            return
        seq = data.draw(st.sampled_from(self.running))
        self._release(seq, list(seq.block_table))
        self.bm.free(seq)
        if twice:
            self.bm.free(seq)
        self.running.remove(seq)
        assert not seq.block_table

    @rule(data=st.data())
    def preempt(self, data: st.DataObject) -> None:
        """Free and queue again for recompute (a later admission may hit its own blocks)."""
        if not self.running:
            return
        seq = data.draw(st.sampled_from(self.running))
        self._release(seq, list(seq.block_table))
        self.bm.free(seq)
        seq.reset_for_recompute()
        self.running.remove(seq)
        self.waiting.append(seq)

    @rule(data=st.data())
    def drop_blocks(self, data: st.DataObject) -> None:
        """KV eviction of whole computed blocks from the middle of a running sequence."""
        candidates = [s for s in self.running if s.num_kv_slots >= BLOCK_SIZE]
        if not candidates:
            return
        seq = data.draw(st.sampled_from(candidates))
        full = seq.num_kv_slots // BLOCK_SIZE
        indices = data.draw(st.lists(st.integers(0, full - 1), min_size=1, max_size=full))
        dropped = [seq.block_table[i] for i in sorted(set(indices))]
        kept = [b for i, b in enumerate(seq.block_table) if i not in set(indices)]
        self._release(seq, dropped)
        freed = self.bm.drop_blocks(seq, indices)
        assert seq.block_table == kept
        assert freed == sum(1 for b in set(dropped) if not self.owners[b])
        if freed < len(dropped):
            self._note("dropped a shared block")

    @rule(data=st.data())
    def drop_partial_block_is_refused(self, data: st.DataObject) -> None:
        if not self.running:
            return
        seq = data.draw(st.sampled_from(self.running))
        before = self._snapshot()
        with pytest.raises(ValueError):
            self.bm.drop_blocks(seq, [seq.num_kv_slots // BLOCK_SIZE])
        assert self._snapshot() == before

    # -------------------------------------------------------------- invariants
    @invariant()
    def refcounts_equal_owners(self) -> None:
        for block in self.bm.blocks:
            owners = self.owners[block.block_id]
            assert len(owners) == len(set(owners)), f"block {block.block_id} twice in one table: {owners}"
            assert block.ref_count == len(owners), (
                f"block {block.block_id}: ref_count {block.ref_count}, owners {owners}"
            )

    @invariant()
    def free_count_is_unowned_blocks(self) -> None:
        unowned = sum(1 for b in range(NUM_BLOCKS) if not self.owners[b])
        assert self.bm.num_free_blocks == unowned
        assert self.bm.num_used_blocks == NUM_BLOCKS - unowned

    @invariant()
    def tables_match_owners(self) -> None:
        for seq in self.running + self.waiting:
            for bid in seq.block_table:
                assert seq.request_id in self.owners[bid]
        self.bm.check_invariants(self.running + self.waiting)

    def teardown(self) -> None:
        for seq in self.running + self.waiting:
            self.bm.free(seq)
        assert self.bm.num_free_blocks == NUM_BLOCKS, "blocks leaked"
        assert all(b.ref_count == 0 for b in self.bm.blocks)
        self.bm.check_invariants([])


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=80, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestBlockManagerProperties = BlockManagerMachine.TestCase


def test_the_machine_reaches_prefix_hits_and_sharing() -> None:
    """The sharing path must be reachable through the machine's own admission: a prompt
    computed in full, then asked twice more, shares its full blocks three ways."""
    m = BlockManagerMachine()
    for _ in range(3):
        m.add(head=HEADS[0], tail=[], max_tokens=1)
    for _ in range(3):
        m.admit_seq(m.waiting[0], chunk=12)
    assert m.hits_seen == 4  # 9 tokens: 2 full blocks, the last token is always recomputed
    shared = m.running[0].block_table[0]
    assert m.bm.blocks[shared].ref_count == 3
    m.refcounts_equal_owners()
    m.free_count_is_unowned_blocks()
    m.tables_match_owners()
    m.teardown()


def test_the_machine_refuses_growth_of_a_full_pool() -> None:
    """Scripted path to a refused allocation (rare in random runs): two sequences fill the
    pool, then one needs another block."""
    m = BlockManagerMachine()
    m.add(head=HEADS[2], tail=[40] * 7, max_tokens=8)  # 12 tokens: 3 blocks
    m.add(head=HEADS[1], tail=[41] * 4, max_tokens=8)  # 12 tokens: 3 blocks
    m.admit_seq(m.waiting[0], chunk=12)
    m.admit_seq(m.waiting[0], chunk=12)
    assert m.bm.num_free_blocks == 0
    grown = m.running[0]
    m.step_seq(grown, chunk=1, next_token=42)  # the 13th token needs a 4th block
    assert grown.num_computed_tokens == 12 and len(grown.block_table) == 3
    m.refcounts_equal_owners()
    m.free_count_is_unowned_blocks()
    m.teardown()
