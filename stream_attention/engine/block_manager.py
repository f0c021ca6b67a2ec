"""Block accounting for the paged KV cache: allocation, reference counts, prefix caching.

The manager never touches tensors; it hands out block ids into the per-layer page pools
that :class:`~stream_attention.engine.model_runner.ModelRunner` owns. Invariants, which
``check_invariants`` verifies and the tests exercise after thousands of random
requests and aborts:

* every block is either referenced (``ref_count > 0``) or in the free list, never both;
* a block's ``ref_count`` equals the number of live block tables that hold it;
* the prefix-cache map only points at blocks whose hash it records.

Prefix caching: when a block becomes full of computed tokens its content is identified
by a hash chained over all tokens up to its end (the K/V of a causal model depend on the
whole prefix). Freed blocks keep their hash and stay in the map, ordered least recently
freed first, so a later request with the same prefix revives them for free; they are
only forgotten when the allocator reuses them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence

_NO_HASH = -1


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int = _NO_HASH
    token_ids: tuple[int, ...] = ()


def chain_hash(prev_hash: int, tokens: tuple[int, ...]) -> int:
    """Hash of a full block given the hash of everything before it."""
    return hash((prev_hash, tokens))


class BlockManager:
    """Hands out fixed-size KV blocks to sequences and takes them back."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion order = reuse order: the block freed longest ago is reused first.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._hash_to_block: dict[int, int] = {}
        self.prefix_cache_hits = 0  # blocks served from the prefix cache
        # Token counts as vLLM reports them (prefix_cache_queries / prefix_cache_hits): the
        # prompt tokens of first admissions and how many of them the cache served. A
        # preempted sequence re-finding its own blocks is left out so it cannot inflate the
        # hit rate.
        self.prefix_cache_query_tokens = 0
        self.prefix_cache_hit_tokens = 0
        self.blocks_dropped = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add to ``seq``'s table so ``num_new_tokens`` more slots fit."""
        slots = seq.num_kv_slots + num_new_tokens
        return max(0, -(-slots // self.block_size) - len(seq.block_table))

    # ------------------------------------------------------------ prefix cache
    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of ``seq``'s tokens (read-only lookup).

        The last token is never matched: the step that computes it produces the logits
        the first sample needs.
        """
        if not self.enable_prefix_caching or seq.num_computed_tokens or seq.block_table:
            return []
        bs = self.block_size
        limit = (seq.num_tokens - 1) // bs
        found: list[int] = []
        h = _NO_HASH
        for i in range(limit):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(h, tokens)
            bid = self._hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != tokens:
                break
            found.append(bid)
        return found

    def can_admit(self, seq: Sequence, cached: list[int], num_new_tokens: int, reserve: int = 0) -> bool:
        """Whether ``seq`` can take ``cached`` blocks and room for ``num_new_tokens`` more
        while leaving ``reserve`` blocks free."""
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        slots = len(cached) * self.block_size + num_new_tokens
        fresh = -(-slots // self.block_size) - len(cached)
        return revived + fresh + reserve <= len(self._free)

    def take_cached(self, seq: Sequence, cached: list[int]) -> None:
        """Give ``seq`` the prefix blocks found by :meth:`match_prefix` (called on every
        admission, hit or not: it also counts the prefix-cache lookup)."""
        h = _NO_HASH
        for bid in cached:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self._free[bid]
            block.ref_count += 1
            h = block.block_hash
            seq.block_table.append(bid)
            seq.block_hashes.append(h)
        n = len(cached) * self.block_size
        seq.num_computed_tokens = n
        seq.num_cached_prompt_tokens = max(seq.num_cached_prompt_tokens, n)
        self.prefix_cache_hits += len(cached)
        if self.enable_prefix_caching and not seq.num_preemptions:
            self.prefix_cache_query_tokens += seq.num_tokens
            self.prefix_cache_hit_tokens += n

    # -------------------------------------------------------------- allocation
    def _pop_free(self) -> int:
        bid, _ = self._free.popitem(last=False)
        block = self.blocks[bid]
        if block.block_hash != _NO_HASH:
            if self._hash_to_block.get(block.block_hash) == bid:
                del self._hash_to_block[block.block_hash]
            block.block_hash = _NO_HASH
            block.token_ids = ()
        block.ref_count = 1
        return bid

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow ``seq``'s table to fit ``num_new_tokens`` more slots; False (and no change)
        when the pool is short."""
        table = seq.block_table
        need = -(-(seq.num_computed_tokens - seq.num_dropped_tokens + num_new_tokens) // self.block_size) - len(table)
        if need <= 0:  # the common decode case: the last block still has room
            return True
        if need > len(self._free):
            return False
        for _ in range(need):
            table.append(self._pop_free())
        return True

    def truncate(self, seq: Sequence, num_slots: int) -> int:
        """Free the tail blocks of ``seq`` beyond the first ``num_slots`` cache slots (the
        rollback of rejected speculative tokens); returns how many went back to the pool.
        Tail blocks past the computed slots are the sequence's own, never shared."""
        keep = -(-num_slots // self.block_size)
        table = seq.block_table
        if len(table) <= keep:
            return 0
        for bid in reversed(table[keep:]):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[bid] = None
        seq.block_table = table[:keep]  # a new list: tables are append-only otherwise (see Sequence)
        return len(table) - keep

    def commit(self, seq: Sequence) -> None:
        """Record the hashes of blocks that the last step filled with computed tokens."""
        if not self.enable_prefix_caching or not seq.prefix_cacheable:
            return
        bs = self.block_size
        # A verify step computes draft tokens the engine appends only after this commit:
        # their blocks are hashed by the next commit, once their tokens are known.
        full = min(seq.num_computed_tokens, len(seq.token_ids)) // bs
        if len(seq.block_hashes) >= full:  # no block filled up this step
            return
        while len(seq.block_hashes) < full:
            i = len(seq.block_hashes)
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            prev = seq.block_hashes[-1] if seq.block_hashes else _NO_HASH
            h = chain_hash(prev, tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.block_hash == _NO_HASH:
                block.block_hash = h
                block.token_ids = tokens
                # An identical block computed concurrently may already be registered; keep it.
                self._hash_to_block.setdefault(h, block.block_id)

    def fork(self, parent: Sequence, child: Sequence, num_computed: int) -> tuple[int, int] | None:
        """Give ``child`` the KV of ``parent``'s first ``num_computed`` tokens (parallel sampling).

        Full blocks are shared (one more reference each; they are never written again).
        The partial last block, which both will keep appending to, is copied into a fresh
        block: the returned ``(source, destination)`` pair is for the caller to copy on the
        device. When no block is free the child keeps only the full blocks and recomputes
        the few tokens of the partial one on its next step (returns None).
        """
        bs = self.block_size
        full = num_computed // bs
        shared = parent.block_table[:full]
        for bid in shared:
            self.blocks[bid].ref_count += 1
        child.block_table = list(shared)
        child.block_hashes = list(parent.block_hashes[:full])
        copy = None
        if num_computed % bs and self._free:
            dst = self._pop_free()
            child.block_table.append(dst)
            copy = (parent.block_table[full], dst)
            child.num_computed_tokens = num_computed
        else:
            child.num_computed_tokens = full * bs
        return copy

    def free(self, seq: Sequence) -> None:
        """Release all of ``seq``'s blocks. Safe to call twice."""
        # Tail blocks go to the free list first so that they are reused first: a shared
        # prefix is worth more to later requests than a sequence's private tail.
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[bid] = None
            elif block.ref_count < 0:  # pragma: no cover - would be an accounting bug
                raise RuntimeError(f"block {bid} freed more often than allocated")
        seq.block_table = []
        seq.block_hashes = []

    def drop_blocks(self, seq: Sequence, indices: list[int]) -> int:
        """Release whole blocks from the middle of a running sequence (KV eviction).

        Only full blocks of computed tokens may go; the table is compacted, so the
        attention kernels simply see fewer keys. Returns how many blocks were freed to the
        pool (shared blocks are only dereferenced).
        """
        bs = self.block_size
        full = seq.num_kv_slots // bs
        drop = sorted(set(indices))
        if any(i < 0 or i >= full for i in drop):
            raise ValueError(f"can only drop full computed blocks [0, {full}) of {seq.request_id}, got {indices}")
        freed = 0
        table = list(seq.block_table)
        for i in reversed(drop):
            bid = table.pop(i)
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[bid] = None
                freed += 1
        seq.block_table = table  # a new list: tables are append-only otherwise (see Sequence)
        seq.num_dropped_tokens += len(drop) * bs
        # Block positions no longer match token positions, so later blocks cannot be keyed
        # by their prefix any more.
        seq.prefix_cacheable = False
        seq.block_hashes = []
        self.blocks_dropped += len(drop)
        return freed

    # ------------------------------------------------------------- checking
    def check_invariants(self, live: list[Sequence]) -> None:
        """Raise ``AssertionError`` if the books do not balance for the ``live`` sequences."""
        refs = [0] * self.num_blocks
        for seq in live:
            for bid in seq.block_table:
                refs[bid] += 1
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], f"block {block.block_id}: ref {block.ref_count}"
            assert (block.ref_count == 0) == (block.block_id in self._free), f"block {block.block_id} free-list"
        for h, bid in self._hash_to_block.items():
            assert self.blocks[bid].block_hash == h, f"hash map points at block {bid} with another hash"
