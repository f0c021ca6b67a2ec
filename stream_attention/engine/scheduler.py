"""Continuous batching with chunked prefill and preemption by recompute.

Each step the scheduler fills a token budget (``max_num_batched_tokens``) in this order:

1. running sequences, oldest first: one token for those decoding, the next prompt chunk
   for those still prefilling. When the pool has no block for one of them, the newest
   running sequence is preempted (its blocks freed, its tokens kept for recompute) until
   the block fits; if the sequence itself is the newest, it is the one preempted.
2. waiting sequences, oldest first, while budget, sequence slots and blocks last
   (prefix-cache hits are claimed first, so only the uncached part costs budget).
   With ``prefill_wait_steps`` > 0, a few new requests arriving while others decode wait
   up to that many decode steps for company: requests of a serving workload arrive a few
   milliseconds apart, and one prefill step for several of them costs far less than one
   mixed step each (mixed steps run eagerly; decode-only steps replay CUDA graphs).

With ``policy="priority"`` (vLLM's ``--scheduling-policy priority``) "oldest" reads "first by
``(priority, arrival)``": the waiting queue is kept in that order (lower priority values first),
running sequences are visited in it, and preemption victims are taken from its end, i.e. the
lowest priority (highest value), newest first.

Progress is guaranteed: requests whose prompt plus ``max_tokens`` cannot fit the whole
pool are refused at admission, so the oldest running sequence can always get every
block it needs by preempting the others. Nothing is admitted in a step that preempted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus
from .types import FinishReason, QueueFullError

if TYPE_CHECKING:
    from .attention_spec import KVGroups
    from .config import EngineConfig
    from .kv_compression import BlockScoreCollector, KVCompressionManager


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    # Whether this chunk reaches the end of the known tokens, so a token is sampled after it.
    samples: bool = False
    # Speculative decoding: slots reserved beyond the one decode token for draft tokens
    # (the scheduler's part), and the draft tokens proposed into them (the engine's part;
    # ``num_new_tokens`` is then ``1 + len(draft)``: the step verifies them all at once).
    num_lookahead: int = 0
    draft: list[int] | None = None

    @classmethod
    def of(cls, seq: Sequence, n: int) -> ScheduledSeq:
        return cls(seq, n, seq.num_computed_tokens + n == len(seq.token_ids))


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_decode_only(self) -> bool:
        return all(s.num_new_tokens == 1 for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    """Decides which sequences run each step and how many tokens each computes.

    It owns the KV state of its sequences: the block manager (``bm``) and, when given,
    the KV eviction policy (``kv_policy``), which hears of every finish, abort and
    preemption here and merges each step's block scores in :meth:`commit`.
    """

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_waiting: int,
        enable_chunked_prefill: bool = True,
        admission_reserve_blocks: int | None = None,
        kv_policy: KVCompressionManager | None = None,
        prefill_wait_steps: int = 0,
        kv_reach: int | None = None,
        policy: str = "fcfs",
        num_lookahead_tokens: int = 0,
        speculation_max_batch: int | None = None,
    ) -> None:
        if policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy={policy!r}: expected fcfs or priority")
        self.policy = policy
        self.bm = block_manager
        self.kv_policy = kv_policy
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.enable_chunked_prefill = enable_chunked_prefill
        # A little headroom when admitting keeps fresh admissions from being preempted by
        # the decode growth of the very next step.
        if admission_reserve_blocks is None:
            admission_reserve_blocks = min(max(1, block_manager.num_blocks // 100), 16)
        self.admission_reserve_blocks = admission_reserve_blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefill_wait_steps = prefill_wait_steps
        # Every layer windowed (Mistral-style): keys further back than this leave the cache.
        self.kv_reach = kv_reach
        # Speculative decoding: draft slots reserved per decoding sequence that may speculate.
        self.num_lookahead_tokens = num_lookahead_tokens
        self.speculation_max_batch = speculation_max_batch
        self._held_steps = 0

    @classmethod
    def from_config(
        cls, config: EngineConfig, num_blocks: int, kv_policy: KVCompressionManager | None = None,
        kv_reach: int | None = None, kv_groups: KVGroups | None = None,
    ) -> Scheduler:
        """A scheduler with a block manager of ``num_blocks`` blocks, sized and limited by
        ``config``; with ``kv_groups`` (the hybrid allocator) its block manager keeps a
        windowed group beside the full one."""
        bm = BlockManager(num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching,
                          window_reach=None if kv_groups is None else kv_groups.window_reach,
                          window_pages=1 if kv_groups is None else kv_groups.window_pages)
        return cls(
            bm,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_waiting=config.max_waiting,
            enable_chunked_prefill=config.enable_chunked_prefill,
            kv_policy=kv_policy,
            prefill_wait_steps=config.resolved_prefill_wait_steps(),
            policy=config.scheduling_policy,
            kv_reach=kv_reach,
            num_lookahead_tokens=config.num_speculative_tokens if config.speculative_method != "none" else 0,
            speculation_max_batch=config.speculative_disable_by_batch_size,
        )

    def _release(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and forget its eviction scores."""
        self.bm.free(seq)
        if self.kv_policy is not None:
            self.kv_policy.forget(seq.request_id)

    # ------------------------------------------------------------------ intake
    def add(self, seq: Sequence) -> None:
        """Queue ``seq``; raises :class:`QueueFullError` when the waiting queue is full."""
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"waiting queue is full ({self.max_waiting} requests)")
        seq.status = SequenceStatus.WAITING
        if self.policy == "priority":
            self._insert_waiting(seq)
        else:
            self.waiting.append(seq)

    @staticmethod
    def _rank(seq: Sequence) -> tuple[int, float]:
        return seq.priority, seq.arrival_time

    def _insert_waiting(self, seq: Sequence) -> None:
        """Put ``seq`` in the waiting queue after everything that ranks before or with it."""
        rank = self._rank(seq)
        waiting = self.waiting
        i = len(waiting)
        while i and self._rank(waiting[i - 1]) > rank:  # arrivals mostly rank last: a short walk
            i -= 1
        waiting.insert(i, seq)

    def abort(self, seq: Sequence) -> bool:
        """Drop ``seq`` wherever it is and free its blocks. False if it was not queued."""
        if seq.status is SequenceStatus.RUNNING and seq in self.running:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        else:
            return False
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = FinishReason.ABORT
        return True

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Retire a running sequence that produced its last token."""
        if seq in self.running:
            self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # --------------------------------------------------------------- stepping
    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._release(seq)  # recomputed from scratch later: its scores are stale
        seq.reset_for_recompute()
        seq.num_preemptions += 1
        if self.policy == "priority":
            self._insert_waiting(seq)
        else:
            self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

    def _chunk(self, remaining: int, budget: int) -> int:
        if remaining <= budget:
            return remaining
        return budget if self.enable_chunked_prefill else 0

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.bm
        block_size = bm.block_size
        chunked = self.enable_chunked_prefill
        running = self.running
        scheduled = out.scheduled
        if self.policy == "priority":
            running.sort(key=self._rank)  # nearly sorted already: linear for timsort

        # Running sequences: a decode step is one token each, and a new block only when
        # the table is full, so the common case is a few attribute reads per sequence.
        i = 0
        speculate = self.num_lookahead_tokens and (
            self.speculation_max_batch is None or len(running) <= self.speculation_max_batch)
        while i < len(running) and budget > 0:
            seq = running[i]
            remaining = len(seq.token_ids) - seq.num_computed_tokens
            n = remaining if remaining <= budget else (budget if chunked else 0)
            if n == 0:
                i += 1
                continue
            if remaining == 1 and speculate and seq.speculative:
                k = self._lookahead(seq, budget)
                if k and bm.allocate(seq, 1 + k):
                    scheduled.append(ScheduledSeq(seq, 1 + k, True, k))
                    budget -= 1 + k
                    i += 1
                    continue
            if (seq.num_computed_tokens - seq.num_dropped_tokens + n <= len(seq.block_table) * block_size
                    or bm.allocate(seq, n)):
                scheduled.append(ScheduledSeq(seq, n, n == remaining))
                budget -= n
                i += 1
                continue
            # Short of blocks: preempt the newest sequences until it fits (or it is the newest).
            while True:
                victim = running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
                if bm.allocate(seq, n):
                    scheduled.append(ScheduledSeq(seq, n, n == remaining))
                    budget -= n
                    i += 1
                    break

        if out.preempted or (self.prefill_wait_steps and self._hold_admissions(scheduled, budget)):
            return out

        # Admission with chunked prefill: a prompt is admitted only if the pool has room for
        # all of it, not only for its first chunk. Otherwise long prompts admitted side by
        # side fill the pool halfway through their prefill and preempt one another, each
        # preemption throwing away up to a whole prompt's prefill (seen with several 128k
        # prompts in an 8 GiB pool). Admission runs only with budget left, so every prompt
        # already running has all of its rest allocated by now: nothing else is owed.
        whole_prompts = self._prompts_bounded()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.group is None and seq.params.n > 1 and len(self.running) + seq.params.n > self.max_num_seqs:
                break  # its choices will need a sequence slot each once forked
            # Scoring the prompt needs every prompt position computed: no prefix-cache reuse.
            cached = self.bm.match_prefix(seq) if seq.params.prompt_logprobs is None else []
            remaining = seq.num_tokens - len(cached) * self.bm.block_size
            n = self._chunk(remaining, budget)
            if n == 0:
                break
            reserve = self.admission_reserve_blocks if self.running else 0
            if not self.bm.can_admit(seq, cached, n, reserve):
                break
            # A windowed group (hybrid KV cache) holds at most the window and a chunk of the prompt.
            window = None if self.bm.window_reach is None else min(remaining, n + self.bm.window_reach + block_size)
            if whole_prompts and not self.bm.can_admit(seq, cached, remaining, reserve, window_tokens=window):
                break
            self.waiting.popleft()
            self.bm.take_cached(seq, cached)
            ok = self.bm.allocate(seq, n)
            assert ok, "can_admit promised room"
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq.of(seq, n))
            budget -= n
        return out

    def _prompts_bounded(self) -> bool:
        """Whether a sequence's blocks grow with every token it computes, so a prompt's need
        is known at admission: not where blocks leave the cache mid-prefill (windowed
        layers, or an eviction policy)."""
        return self.kv_reach is None and (self.kv_policy is None or not self.kv_policy.config.evicts)

    def _lookahead(self, seq: Sequence, budget: int) -> int:
        """Draft slots for a decoding sequence: at most ``num_lookahead_tokens``, what the
        step's budget leaves beside its decode token, and no more than could be kept (a
        verify step adds up to ``1 + k`` tokens, which must stay within ``max_tokens`` and
        the context)."""
        limit = seq.token_limit if seq.max_model_len is None else min(seq.token_limit, seq.max_model_len)
        return max(0, min(self.num_lookahead_tokens, budget - 1, limit - len(seq.token_ids) - 1))

    def _hold_admissions(self, scheduled: list[ScheduledSeq], budget: int) -> bool:
        """Whether to keep waiting requests back this step so that later arrivals share
        their prefill step: only while every scheduled row is a decode, for at most
        ``prefill_wait_steps`` steps in a row, and not once the waiting prompts would fill
        half the step's budget or every free sequence slot."""
        waiting = self.waiting
        if not waiting or not scheduled or self._held_steps >= self.prefill_wait_steps:
            self._held_steps = 0
            return False
        if len(waiting) >= self.max_num_seqs - len(self.running) or not all(
                s.num_new_tokens == 1 for s in scheduled):
            self._held_steps = 0
            return False
        tokens = 0
        for seq in waiting:
            tokens += seq.num_tokens - seq.num_computed_tokens
            if 2 * tokens >= budget:
                self._held_steps = 0
                return False
        self._held_steps += 1
        return True

    def _drop_blocks_behind_the_window(self, scheduled: list[ScheduledSeq]) -> None:
        """Free the leading blocks no query will read again when every layer is windowed:
        the next query of a sequence sits at position ``num_computed_tokens`` and reads back
        ``kv_reach`` positions. Dropping leading blocks shifts every remaining slot by the
        same amount, so the kernels' window masks (slot distances) stay exact."""
        reach = self.kv_reach
        bs = self.bm.block_size
        for s in scheduled:
            seq = s.seq
            if seq.status is SequenceStatus.FINISHED:
                continue
            behind = seq.num_computed_tokens - reach - seq.num_dropped_tokens
            n = min(behind, seq.num_kv_slots) // bs
            if n > 0:
                self.bm.drop_blocks(seq, list(range(n)))

    def _roll_back_drafts(self, scheduled: list[ScheduledSeq]) -> None:
        """After a verify step, keep the K/V of the accepted draft tokens only: the engine
        has set ``num_new_tokens`` to ``1 + accepted``, so the rejected drafts' slots lie
        beyond the sequence's length (the kernels never read them; the next step
        overwrites them), and the blocks holding nothing but such slots go back to the
        pool."""
        bm = self.bm
        for s in scheduled:
            if s.num_lookahead and s.seq.status is not SequenceStatus.FINISHED:
                bm.truncate(s.seq, s.seq.num_kv_slots + s.num_new_tokens)

    def commit(self, scheduled: list[ScheduledSeq], collector: BlockScoreCollector | None = None) -> None:
        """Advance ``num_computed_tokens`` after the model ran a step. Sequences that
        finished while the step ran (aborted, or a stop string seen by a pipelined
        engine) are left alone: their blocks are gone. Then the eviction policy merges
        the step's block scores (``collector``, from ``ModelRunner.execute``) and evicts
        blocks of over-budget sequences."""
        finished = SequenceStatus.FINISHED
        if self.num_lookahead_tokens:
            self._roll_back_drafts(scheduled)
        if not self.bm.enable_prefix_caching:
            for s in scheduled:
                seq = s.seq
                if seq.status is not finished:
                    seq.num_computed_tokens += s.num_new_tokens
        else:
            commit = self.bm.commit
            for s in scheduled:
                seq = s.seq
                if seq.status is not finished:
                    seq.num_computed_tokens += s.num_new_tokens
                    commit(seq)
        if self.kv_reach is not None:
            self._drop_blocks_behind_the_window(scheduled)
        elif self.bm.window_reach is not None:  # hybrid: only the windowed group's table slides
            slide = self.bm.slide_window
            for s in scheduled:
                if s.seq.status is not finished:
                    slide(s.seq)
        policy = self.kv_policy
        if policy is None:
            return
        policy.after_step(self.running, self.bm, collector)
        if collector is not None:
            for s in scheduled:  # ended while the step ran: no scores to keep
                if s.seq.status is finished:
                    policy.forget(s.seq.request_id)
