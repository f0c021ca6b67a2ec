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

Two layer groups (the hybrid allocator, for models that mix full-attention and
sliding-window layers; ``window_reach`` set): one pool of pages serves both. A sequence's
``block_table`` holds the full-attention layers' pages, one per logical block; its
``window_table`` the windowed layers', ``window_pages`` per logical block, and only for
the logical blocks some windowed query may still read: :meth:`slide_window` returns the
others to the pool after every step. Both tables always end at the same logical block,
so "the last block has room" means the same for both. The windowed group takes part in
the prefix cache as vLLM's sliding-window manager does: its full blocks are registered
by the same chained hashes, and a prefix hit counts only as far as the windowed group
still holds the blocks the next query's window covers.
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


class PrefixMatch(list):
    """:meth:`BlockManager.match_prefix`'s answer with a windowed group: the full group's
    cached blocks (the list itself), and the windowed group's pages for logical blocks
    ``window_first ..`` up to the same end (``window``, ``window_pages`` ids per block)."""

    def __init__(self, blocks: list[int], window: list[int], window_first: int) -> None:
        super().__init__(blocks)
        self.window = window
        self.window_first = window_first


class BlockManager:
    """Hands out fixed-size KV blocks to sequences and takes them back."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 window_reach: int | None = None, window_pages: int = 1) -> None:
        """``window_reach``: with a windowed layer group (hybrid allocator), how far back its
        queries read; ``window_pages``: pages one logical block of that group takes."""
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        if window_reach is not None and (window_reach < 0 or window_pages < 1):
            raise ValueError(f"window_reach={window_reach}, window_pages={window_pages}")
        self.window_reach = window_reach
        self.window_pages = window_pages
        # Windowed group's prefix cache: chained hash -> the logical block's pages.
        self._window_hash: dict[int, tuple[int, ...]] = {}
        self.window_blocks_released = 0  # logical windowed blocks that left every window
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
        """Pages to add to ``seq``'s tables so ``num_new_tokens`` more slots fit."""
        slots = seq.num_kv_slots + num_new_tokens
        need = max(0, -(-slots // self.block_size) - len(seq.block_table))
        return need * (1 + self.window_pages) if self.window_reach is not None else need

    def pages_for_tokens(self, num_tokens: int, max_chunk: int) -> int:
        """Pages one sequence of ``num_tokens`` tokens holds at most when prompt chunks are
        at most ``max_chunk`` tokens: every block in the full group, and in a windowed
        group no more than the window plus one chunk."""
        bs = self.block_size
        blocks = -(-num_tokens // bs)
        if self.window_reach is None:
            return blocks
        return blocks + self.window_pages * min(blocks, -(-(self.window_reach + max_chunk) // bs) + 1)

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
        hashes: list[int] = []
        h = _NO_HASH
        for i in range(limit):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(h, tokens)
            bid = self._hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != tokens:
                break
            found.append(bid)
            hashes.append(h)
        if self.window_reach is None:
            return found
        return self._match_window(found, hashes)

    def _match_window(self, found: list[int], hashes: list[int]) -> PrefixMatch:
        """The longest prefix of ``found`` whose windowed tail is cached too: the windowed
        group must hold every block the query after the prefix reads (from ``reach``
        positions back), as vLLM's sliding-window manager requires."""
        bs, reach = self.block_size, self.window_reach
        entries: list[tuple[int, ...] | None] = []
        run = []  # run[j]: consecutive cached windowed blocks ending at block j
        for j, h in enumerate(hashes):
            entry = self._window_hash.get(h)
            if entry is not None and self.blocks[entry[0]].token_ids != self.blocks[found[j]].token_ids:
                entry = None
            entries.append(entry)
            run.append(0 if entry is None else (run[-1] + 1 if run else 1))
        for n in range(len(found), 0, -1):
            first = max(0, n * bs - reach) // bs
            if run[n - 1] >= n - first:
                window = [bid for entry in entries[first:n] for bid in entry]
                return PrefixMatch(found[:n], window, first)
        return PrefixMatch([], [], 0)

    def can_admit(self, seq: Sequence, cached: list[int], num_new_tokens: int, reserve: int = 0, *,
                  window_tokens: int | None = None) -> bool:
        """Whether ``seq`` can take ``cached`` blocks and room for ``num_new_tokens`` more
        while leaving ``reserve`` blocks free. ``window_tokens``: the new slots to count in
        a windowed group (default ``num_new_tokens``; a whole prompt's check counts only
        its first chunk there, as the group frees what leaves the window)."""
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        slots = len(cached) * self.block_size + num_new_tokens
        fresh = -(-slots // self.block_size) - len(cached)
        if self.window_reach is not None:
            window = getattr(cached, "window", ())
            revived += sum(1 for b in window if self.blocks[b].ref_count == 0)
            # The windowed table ends where the cached prefix ends, at a block boundary.
            n = num_new_tokens if window_tokens is None else window_tokens
            fresh += self.window_pages * -(-n // self.block_size)
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
        if self.window_reach is not None:
            window = getattr(cached, "window", [])
            for bid in window:
                block = self.blocks[bid]
                if block.ref_count == 0:
                    del self._free[bid]
                block.ref_count += 1
            seq.window_table = list(window)
            seq.window_dropped_tokens = getattr(cached, "window_first", 0) * self.block_size
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
            h = block.block_hash
            if self._hash_to_block.get(h) == bid:
                del self._hash_to_block[h]
            elif bid in self._window_hash.get(h, ()):
                del self._window_hash[h]  # the logical block lost one of its pages
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
        if self.window_reach is not None:
            return self._allocate_both(seq, need)
        if need > len(self._free):
            return False
        for _ in range(need):
            table.append(self._pop_free())
        return True

    def _allocate_both(self, seq: Sequence, need: int) -> bool:
        """``need`` more logical blocks in both groups (the tables end together)."""
        k = self.window_pages
        if need * (1 + k) > len(self._free):
            return False
        table, window = seq.block_table, seq.window_table
        for _ in range(need):
            table.append(self._pop_free())
            for _ in range(k):
                window.append(self._pop_free())
        return True

    def _release_pages(self, pages: list[int]) -> None:
        """Drop one reference to each page, tail first: freed pages join the free list in that
        order, so a sequence's private tail is reused before a prefix others may share."""
        for bid in reversed(pages):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[bid] = None
            elif block.ref_count < 0:  # pragma: no cover - would be an accounting bug
                raise RuntimeError(f"block {bid} freed more often than allocated")

    def truncate(self, seq: Sequence, num_slots: int) -> int:
        """Free the tail blocks of ``seq`` beyond the first ``num_slots`` cache slots (the
        rollback of rejected speculative tokens); returns how many went back to the pool.
        Tail blocks past the computed slots are the sequence's own, never shared."""
        keep = -(-num_slots // self.block_size)
        table = seq.block_table
        freed = 0
        if self.window_reach is not None:
            # Same logical end for the windowed table, which starts later.
            logical = num_slots + seq.num_dropped_tokens - seq.window_dropped_tokens
            keep_w = max(0, -(-logical // self.block_size)) * self.window_pages
            window = seq.window_table
            if len(window) > keep_w:
                self._release_pages(window[keep_w:])
                seq.window_table = window[:keep_w]
                freed += len(window) - keep_w
        if len(table) <= keep:
            return freed
        for bid in reversed(table[keep:]):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[bid] = None
        seq.block_table = table[:keep]  # a new list: tables are append-only otherwise (see Sequence)
        return freed + len(table) - keep

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
            if self.window_reach is not None:
                self._commit_window(seq, i, h, tokens)

    def _commit_window(self, seq: Sequence, i: int, h: int, tokens: tuple[int, ...]) -> None:
        """Register logical block ``i``'s windowed pages under hash ``h`` (when the windowed
        table still holds them: it does for every block filled by the step being committed)."""
        k = self.window_pages
        j = (i - seq.window_dropped_tokens // self.block_size) * k
        if j < 0 or j + k > len(seq.window_table):
            return
        pages = tuple(seq.window_table[j:j + k])
        if self.blocks[pages[0]].block_hash != _NO_HASH:
            return
        for bid in pages:
            self.blocks[bid].block_hash = h
            self.blocks[bid].token_ids = tokens
        self._window_hash.setdefault(h, pages)

    def fork(self, parent: Sequence, child: Sequence, num_computed: int) -> list[tuple[int, int]]:
        """Give ``child`` the KV of ``parent``'s first ``num_computed`` tokens (parallel sampling).

        Full blocks are shared (one more reference each; they are never written again).
        The partial last block, which both will keep appending to, is copied into a fresh
        block (in each layer group): the returned ``(source, destination)`` pairs are for
        the caller to copy on the device. When the pool is short the child keeps only the
        full blocks and recomputes the few tokens of the partial one on its next step
        (returns no pairs). Blocks that already left the cache (``num_dropped_tokens``,
        ``window_dropped_tokens``) are left out for the child as for the parent.
        """
        bs = self.block_size
        full = num_computed // bs
        off = parent.num_dropped_tokens // bs
        shared = parent.block_table[:full - off]
        hybrid = self.window_reach is not None
        k = self.window_pages
        w_off = parent.window_dropped_tokens // bs
        w_shared = parent.window_table[:(full - w_off) * k] if hybrid else []
        for bid in shared + w_shared:
            self.blocks[bid].ref_count += 1
        child.block_table = list(shared)
        child.block_hashes = list(parent.block_hashes[:full])
        child.num_dropped_tokens = parent.num_dropped_tokens
        if hybrid:
            child.window_table = list(w_shared)
            child.window_dropped_tokens = parent.window_dropped_tokens
        copies: list[tuple[int, int]] = []
        if num_computed % bs and len(self._free) >= (1 + k if hybrid else 1):
            dst = self._pop_free()
            child.block_table.append(dst)
            copies.append((parent.block_table[full - off], dst))
            if hybrid:
                src = (full - w_off) * k
                for r in range(k):
                    dst = self._pop_free()
                    child.window_table.append(dst)
                    copies.append((parent.window_table[src + r], dst))
            child.num_computed_tokens = num_computed
        else:
            child.num_computed_tokens = full * bs
        return copies

    def free(self, seq: Sequence) -> None:
        """Release all of ``seq``'s blocks. Safe to call twice."""
        # Tail blocks go to the free list first so that they are reused first: a shared
        # prefix is worth more to later requests than a sequence's private tail.
        self._release_pages(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        if seq.window_table:
            self._release_pages(seq.window_table)
            seq.window_table = []

    def slide_window(self, seq: Sequence) -> int:
        """Return to the pool the windowed group's leading blocks that no windowed query
        will read again: the next query sits at ``num_computed_tokens`` and reads back
        ``window_reach`` positions. The full group is untouched, and the freed pages keep
        their prefix-cache hashes (a later prompt with this prefix can revive them).
        Returns how many logical blocks left."""
        bs = self.block_size
        computed, dropped = seq.num_computed_tokens, seq.window_dropped_tokens
        n = min(computed - self.window_reach - dropped, computed - dropped) // bs
        if n <= 0:
            return 0
        cut = n * self.window_pages
        table = seq.window_table
        self._release_pages(table[:cut])
        seq.window_table = table[cut:]  # a new list: tables are append-only otherwise (see Sequence)
        seq.window_dropped_tokens = dropped + n * bs
        self.window_blocks_released += n
        return n

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
            for bid in seq.window_table:
                refs[bid] += 1
            if self.window_reach is not None and (seq.block_table or seq.window_table):
                k, bs = self.window_pages, self.block_size
                assert len(seq.window_table) % k == 0, f"{seq.request_id}: windowed table of {len(seq.window_table)}"
                end = len(seq.window_table) // k + seq.window_dropped_tokens // bs
                assert end == len(seq.block_table) + seq.num_dropped_tokens // bs, (
                    f"{seq.request_id}: windowed table ends at block {end}, full table at {len(seq.block_table)}")
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], f"block {block.block_id}: ref {block.ref_count}"
            assert (block.ref_count == 0) == (block.block_id in self._free), f"block {block.block_id} free-list"
        for h, bid in self._hash_to_block.items():
            assert self.blocks[bid].block_hash == h, f"hash map points at block {bid} with another hash"
        for h, pages in self._window_hash.items():
            assert all(self.blocks[b].block_hash == h for b in pages), f"windowed hash map: pages {pages}"
