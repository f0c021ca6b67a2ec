"""A request's mutable state while the engine works on it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .types import FinishReason, SamplingParams, TokenLogprob


class SequenceGroup:
    """The choices of one request with ``params.n > 1``, forked from one prefilled sequence.

    ``unreported`` counts the choices whose last output has not been made yet: the output
    that brings it to zero is the request's final one (``RequestOutput.finished``)."""

    __slots__ = ("seqs", "unreported")

    def __init__(self, seqs: list[Sequence]) -> None:
        self.seqs = seqs
        self.unreported = len(seqs)

    def all_finished(self) -> bool:
        return all(s.status is SequenceStatus.FINISHED for s in self.seqs)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


# Stands in ``token_ids`` for a token still being sampled on the device, while the engine
# launches the step that reads it (LLMEngine._launch_ahead); never a vocabulary id.
PLACEHOLDER_TOKEN = -1


@dataclass(eq=False)
class Sequence:
    """One request inside the engine.

    Token accounting follows one rule: ``token_ids`` is the prompt plus everything sampled
    so far, and ``num_computed_tokens`` of them have their K/V in the cache. A step
    computes the next ``num_tokens - num_computed_tokens`` tokens (a prefill chunk, or the
    one token sampled last step), so decode, chunked prefill and recompute after
    preemption are the same code path.

    ``num_dropped_tokens`` counts cache slots that were released while the sequence kept
    running (KV eviction): the K/V of logical token ``p`` then lives at cache slot
    ``p - num_dropped_tokens`` of the compacted block table.

    Models whose layers mix full and sliding-window attention (Gemma 2/3, with the hybrid
    KV allocator: :class:`~.attention_spec.KVGroups`) keep the windowed layers' pages in a
    second table, ``window_table``: ``window_pages`` page ids per logical block, for the
    logical blocks from ``window_dropped_tokens // block_size`` on (the ones before left
    every window and went back to the pool). Its last logical block is always
    ``block_table``'s last one.

    ``block_table`` (and ``window_table``) only ever grows in place (appends); every other
    change (free, preemption, eviction, the window moving on) assigns a new list. So
    ``(table object, length)`` identifies its content, and a consumer that copied it
    before needs only copy the new tail. ``token_ids`` (and ``logprobs``) only ever grow too.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    prompt: str | None = None
    stream: bool = True  # streaming callers need text per step; batch callers only at the end
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int | None = None
    priority: int = 0  # lower = earlier, under the scheduler's priority policy

    token_ids: list[int] = field(init=False)
    status: SequenceStatus = field(default=SequenceStatus.WAITING, init=False)
    num_computed_tokens: int = field(default=0, init=False)
    num_dropped_tokens: int = field(default=0, init=False)
    block_table: list[int] = field(default_factory=list, init=False)
    window_table: list[int] = field(default_factory=list, init=False)
    window_dropped_tokens: int = field(default=0, init=False)
    # Chained hashes of this sequence's full blocks, in order (prefix caching).
    block_hashes: list[int] = field(default_factory=list, init=False)
    prefix_cacheable: bool = field(default=True, init=False)
    num_cached_prompt_tokens: int = field(default=0, init=False)
    finish_reason: FinishReason | None = field(default=None, init=False)
    first_token_time: float | None = field(default=None, init=False)
    finish_time: float | None = field(default=None, init=False)
    logprobs: list[TokenLogprob] | None = field(default=None, init=False)
    generator: torch.Generator | None = field(default=None, init=False, repr=False)
    # Text state, owned by the engine's output processing.
    text: str = field(default="", init=False)
    emitted_text_len: int = field(default=0, init=False)
    emitted_token_count: int = field(default=0, init=False)
    detokenizer: object | None = field(default=None, init=False, repr=False)
    num_preemptions: int = field(default=0, init=False)
    prompt_counted: bool = field(default=False, init=False)
    # Derived from ``params`` once, for the per-token checks of every step (``params``
    # is not expected to change once the request is queued):
    # token ids that end the request (stop_token_ids, plus EOS unless ignore_eos),
    stop_ids: frozenset[int] = field(default=frozenset(), init=False, repr=False)
    # len(token_ids) at which max_tokens is reached,
    token_limit: int = field(default=0, init=False, repr=False)
    # and whether the sampler may take this row's argmax and nothing else.
    plain_greedy: bool = field(default=True, init=False, repr=False)
    # Parallel sampling (``params.n > 1``): which choice this is, and its group once the
    # prompt has been prefilled and forked (None before, and for n == 1).
    choice_index: int = field(default=0, init=False)
    group: SequenceGroup | None = field(default=None, init=False, repr=False)
    final_reported: bool = field(default=False, init=False, repr=False)
    # Structured output: the xgrammar GrammarMatcher this sequence's tokens advance (or None).
    grammar: Any = field(default=None, init=False, repr=False)
    # Speculative decoding: whether the scheduler may give this sequence draft slots (the
    # engine decides, per request), and how many of its tokens a draft model has in its
    # own cache (the draft proposer's state; forgotten with the cache on preemption).
    speculative: bool = field(default=False, init=False, repr=False)
    # Prompt lookup's numpy copy of token_ids (spec_decode.TokenArray), kept in step with it.
    lookup_tokens: Any = field(default=None, init=False, repr=False)
    num_draft_computed_tokens: int = field(default=0, init=False, repr=False)
    # The sampler's incremental view of the tokens its penalties count (sampler._PenaltyTokens).
    penalty_tokens: Any = field(default=None, init=False, repr=False)
    # params.prompt_logprobs: the scores of the prompt tokens so far (None for the first).
    prompt_logprobs: list[TokenLogprob | None] | None = field(default=None, init=False, repr=False)
    scores_prompt: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        p = self.params
        if p.logprobs is not None:
            self.logprobs = []
        stop = frozenset(p.stop_token_ids)
        self.stop_ids = stop if p.ignore_eos else stop | frozenset(self.eos_token_ids)
        self.token_limit = len(self.prompt_token_ids) + p.max_tokens
        self.scores_prompt = p.prompt_logprobs is not None
        if self.scores_prompt:
            self.prompt_logprobs = [None]  # the first prompt token has nothing before it
        self.plain_greedy = (p.temperature == 0.0 and p.logprobs is None and p.repetition_penalty == 1.0
                             and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
                             and not p.logit_bias and p.min_tokens == 0)

    def fork(self, index: int, params: SamplingParams) -> Sequence:
        """Choice ``index`` of this request: the same prompt and progress (the caller shares
        or copies the KV blocks), its own ``params`` (its seed), no sampled tokens yet."""
        child = Sequence(
            request_id=self.request_id, prompt_token_ids=self.prompt_token_ids, params=params,
            arrival_time=self.arrival_time, prompt=self.prompt, stream=self.stream,
            eos_token_ids=self.eos_token_ids, max_model_len=self.max_model_len, priority=self.priority,
        )
        child.token_ids = list(self.token_ids)
        child.choice_index = index
        child.status = self.status
        child.num_cached_prompt_tokens = self.num_cached_prompt_tokens
        child.prefix_cacheable = self.prefix_cacheable
        child.prompt_counted = self.prompt_counted
        child.speculative = self.speculative
        child.prompt_logprobs = self.prompt_logprobs
        return child

    def prompt_logprob_rows(self, start: int, n: int) -> int:
        """How many of the chunk of ``n`` tokens from position ``start`` are scored prompt
        positions (position ``p`` scores prompt token ``p + 1``) under ``prompt_logprobs``;
        none once the whole prompt is scored (a recompute after preemption keeps the scores)."""
        if self.params.prompt_logprobs is None or len(self.prompt_logprobs) == len(self.prompt_token_ids):
            return 0
        return max(0, min(start + n, len(self.prompt_token_ids) - 1) - start)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def num_kv_slots(self) -> int:
        """Cache slots holding this sequence's computed K/V."""
        return self.num_computed_tokens - self.num_dropped_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def reset_for_recompute(self) -> None:
        """Forget the cache after preemption; the tokens are kept and recomputed later."""
        if self.scores_prompt and len(self.prompt_logprobs) < len(self.prompt_token_ids):
            self.prompt_logprobs = [None]  # scored again as the prompt is recomputed
        self.num_computed_tokens = 0
        self.num_draft_computed_tokens = 0
        self.num_dropped_tokens = 0
        self.block_table = []
        self.window_table = []
        self.window_dropped_tokens = 0
        self.block_hashes = []
        self.prefix_cacheable = True
        self.status = SequenceStatus.WAITING
