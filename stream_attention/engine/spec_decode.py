"""Speculative decoding: cheap proposals, verified by the target model in one step.

A decoding sequence that may speculate gets ``k`` draft slots from the scheduler. A
proposer fills them with draft tokens: :class:`NgramProposer` (prompt lookup: the tokens
that followed the latest earlier occurrence of the context's last few tokens; no model)
or :class:`DraftModelProposer` (``k`` decode steps of a smaller model with the target's
vocabulary, over its own paged cache indexed by the target's block ids). The target then
runs the last token plus the ``k`` drafts as one ``1 + k``-token chunk of its ordinary
mixed step, giving ``1 + k`` rows of logits, and :func:`rejection_sample` keeps the
longest prefix of drafts the target agrees with plus one token of its own (the
correction at the first rejection, or a bonus after the last draft). The scheduler rolls
the KV of the rejected drafts back.

Greedy requests accept a draft token exactly when it is the target's argmax, so their
output equals plain greedy decoding. Sampled requests use standard speculative rejection
sampling (Leviathan et al. 2023; Chen et al. 2023): draft ``x`` drawn from ``q`` is kept
with probability ``min(1, p(x) / q(x))``; at the first rejection the token is drawn from
``max(0, p - q)`` renormalized; after ``k`` acceptances a bonus token is drawn from ``p``.
Every output token is then distributed as a draw from ``p``, the target's distribution
after the request's penalties, temperature and top-k/top-p/min-p, processed by the
sampler's own functions. Prompt-lookup drafts have a one-hot ``q``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .sampler import PendingSample, Sampler, _needs_penalties, _to_device, apply_penalties, filter_logits
from .scheduler import ScheduledSeq
from .sequence import Sequence
from .types import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from .model_runner import ModelRunner


# ---------------------------------------------------------------------------- proposers
class NgramProposer:
    """Prompt lookup (vLLM's ``prompt_lookup_min/max``): match the last ``n`` tokens of
    prompt plus output against the earlier context, longest ``n`` first, and propose the
    tokens that followed the most recent match. Outputs that copy their prompt (edits,
    summaries with quotes, code refactoring) get long runs of accepted drafts."""

    def __init__(self, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"prompt_lookup_min={min_n} and prompt_lookup_max={max_n}: need 1 <= min <= max")
        self.min_n, self.max_n = min_n, max_n

    def propose(self, token_ids: list[int] | np.ndarray, k: int) -> list[int]:
        """Up to ``k`` tokens to follow ``token_ids`` (fewer near the context's end; none
        when no suffix of ``min_n`` or more tokens occurred before)."""
        tokens = np.asarray(token_ids, dtype=np.int64)
        length = len(tokens)
        if length < 2:
            return []
        # Every match ends on an earlier occurrence of the last token (one pass over the
        # context); longer suffixes are checked on those candidates only.
        ends = np.flatnonzero(tokens[:length - 1] == tokens[-1])
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            cand = ends[ends >= n - 1]
            for back in range(1, n):
                if not cand.size:
                    break
                cand = cand[tokens[cand - back] == tokens[length - 1 - back]]
            if cand.size:
                start = int(cand[-1]) + 1
                return tokens[start:start + k].tolist()
        return []


class TokenArray:
    """A sequence's tokens as a numpy array that grows with it: each step copies only the
    tokens appended since the last (converting the whole list cost ~35 µs per sequence
    and step at 1.5k tokens, a tenth of a batch-1 verify step)."""

    __slots__ = ("buf", "n")

    def __init__(self) -> None:
        self.buf = np.empty(256, dtype=np.int64)
        self.n = 0

    def sync(self, tokens: list[int]) -> np.ndarray:
        """The array holding ``tokens`` (which only ever grow; a shorter list is copied anew)."""
        m = len(tokens)
        if m < self.n:
            self.n = 0
        if m > len(self.buf):
            grown = np.empty(max(2 * len(self.buf), m), dtype=np.int64)
            grown[:self.n] = self.buf[:self.n]
            self.buf = grown
        if m > self.n:
            self.buf[self.n:m] = tokens[self.n:m]
        self.n = m
        return self.buf[:m]


def _token_array(seq: Sequence) -> np.ndarray:
    if seq.lookup_tokens is None:
        seq.lookup_tokens = TokenArray()
    return seq.lookup_tokens.sync(seq.token_ids)


@dataclass(eq=False)
class _DraftView:
    """A sequence as the draft model's runner sees it: the target's tokens plus the drafts
    proposed so far, and the draft cache's own progress (the block table is the target's)."""

    token_ids: list[int]
    block_table: list[int]
    num_computed_tokens: int
    num_dropped_tokens: int = 0

    scores_prompt = False  # the draft model never scores prompts (prompt_logprobs)

    @property
    def num_kv_slots(self) -> int:
        return self.num_computed_tokens

    def prompt_logprob_rows(self, start: int, n: int) -> int:
        return 0


class _DraftStep:
    """One row of a draft-model step (the fields ``ModelRunner`` reads of a ScheduledSeq)."""

    __slots__ = ("seq", "num_new_tokens", "samples", "draft")

    def __init__(self, view: _DraftView, n: int) -> None:
        self.seq, self.num_new_tokens, self.samples, self.draft = view, n, True, None


def draft_block_bytes(model: Any, block_size: int) -> int:
    """Bytes one KV block of ``model`` takes over all layers (K and V, the weights' dtype)."""
    from .model_runner import ModelGeometry

    g = ModelGeometry.of(model)
    itemsize = next(model.parameters()).element_size()
    return 2 * g.num_layers * block_size * g.num_kv_heads * g.head_dim * itemsize


class DraftModelProposer:
    """Draft tokens from a smaller model: ``k`` decode steps per engine step over its own
    cache, which uses the target's block ids (its runner holds a pool of as many blocks),
    so the target's block accounting, prefix sharing and rollback cover it too.

    A sequence's ``num_draft_computed_tokens`` says how many of its tokens the draft
    cache holds; the first draft step of an engine step catches up from there (the
    whole prompt the first time, then the tokens the last verify step added)."""

    def __init__(self, runner: ModelRunner, sampler: Sampler) -> None:
        self.runner = runner
        self.sampler = sampler

    @torch.inference_mode()
    def propose(self, rows: list[ScheduledSeq]) -> tuple[list[list[int]], torch.Tensor | None]:
        """Drafts of ``s.num_lookahead`` tokens for each row, and the probabilities they were
        drawn from (``[sum of draft lengths, vocab]``, rows in order), or None when every
        row is greedy (one-hot drafts)."""
        views, steps_left = [], []
        for s in rows:
            seq = s.seq
            # Draft K/V beyond what the target kept are of rejected tokens: recomputed.
            done = min(seq.num_draft_computed_tokens, seq.num_computed_tokens)
            views.append(_DraftView(list(seq.token_ids), seq.block_table, done))
            steps_left.append(s.num_lookahead)
        drafts: list[list[int]] = [[] for _ in rows]
        probs: list[list[torch.Tensor | None]] = [[] for _ in rows]
        sampled = any(s.seq.params.temperature != 0.0 for s in rows)
        for step in range(max(steps_left)):
            active = [i for i, left in enumerate(steps_left) if left > step]
            batch = [_DraftStep(views[i], len(views[i].token_ids) - views[i].num_computed_tokens) for i in active]
            logits, _ = self.runner.execute(batch)
            seqs = [rows[i].seq for i in active]
            tokens, q = self._sample(logits, seqs)
            for j, i in enumerate(active):
                view = views[i]
                view.num_computed_tokens = len(view.token_ids)
                view.token_ids.append(tokens[j])
                drafts[i].append(tokens[j])
                if sampled:
                    probs[i].append(q[j] if q is not None else None)
        for s, view in zip(rows, views, strict=True):
            s.seq.num_draft_computed_tokens = view.num_computed_tokens
        if not sampled:
            return drafts, None
        vocab = logits.shape[-1]
        flat = [p if p is not None else torch.nn.functional.one_hot(torch.tensor(t, device=logits.device), vocab).float()
                for row, toks in zip(probs, drafts, strict=True) for p, t in zip(row, toks, strict=True)]
        return drafts, torch.stack(flat)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], torch.Tensor | None]:
        """One draft token per row: argmax for greedy requests; for sampled ones a draw from
        ``q`` = the draft's distribution under the request's temperature/top-k/top-p/min-p
        (returned, the verifier needs it)."""
        logits = logits.float()
        sample_rows = [i for i, s in enumerate(seqs) if s.params.temperature != 0.0]
        tokens = torch.argmax(logits, dim=-1)
        q = None
        if sample_rows:
            idx = _to_device(sample_rows, torch.long, logits.device)
            sub = torch.softmax(filter_logits(logits[idx], [seqs[i].params for i in sample_rows]), dim=-1)
            noise = _exponential(sub.shape, [seqs[i] for i in sample_rows], self.sampler)
            tokens[idx] = torch.argmax(sub / noise, dim=-1)
            q = torch.zeros_like(logits)
            q[idx] = sub
        token_list = tokens.tolist()
        if q is not None:
            sampled = set(sample_rows)
            for i in range(len(seqs)):
                if i not in sampled:
                    q[i, token_list[i]] = 1.0
        return token_list, q


# ------------------------------------------------------------------ rejection sampling
def _draws(shape: tuple[int, ...], seqs: list[Any], sampler: Sampler, kind: str) -> torch.Tensor:
    """Uniform or Exp(1) draws, one leading row per sequence: a seeded request's rows come
    from its own generator (so it repeats whatever else runs), the rest from the shared one."""
    out = torch.empty(shape, device=sampler.device)
    fill = (lambda t, g: t.uniform_(generator=g)) if kind == "uniform" else (lambda t, g: t.exponential_(generator=g))
    gens = [sampler.generator_for(s) for s in seqs]
    if all(g is None for g in gens):
        fill(out, sampler._shared)
        return out
    for i, g in enumerate(gens):
        fill(out[i], g if g is not None else sampler._shared)
    return out


def _exponential(shape: tuple[int, ...], seqs: list[Any], sampler: Sampler) -> torch.Tensor:
    return _draws(shape, seqs, sampler, "exponential")


def rejection_sample(
    target_probs: torch.Tensor,
    draft_token_ids: list[list[int]],
    draft_probs: torch.Tensor | None,
    uniforms: torch.Tensor,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify a batch of drafts; all on the device, nothing read back.

    Args:
        target_probs: ``[sum(k_i + 1), vocab]``: for sequence ``i``, the target's
            distributions at its ``k_i`` draft positions and then at the bonus position.
        draft_token_ids: the drafts, ``k_i >= 1`` tokens per sequence.
        draft_probs: ``[sum(k_i), vocab]``, the distributions the drafts were drawn from;
            None means one-hot (prompt lookup).
        uniforms: ``[B, max k]`` U[0, 1) draws (acceptance tests).
        noise: ``[B, vocab]`` Exp(1) draws (the correction or bonus token, drawn as
            ``argmax(weights / noise)``, which needs no normalization).

    Returns ``(num_accepted [B], final_token [B])``: sequence ``i`` gains its first
    ``num_accepted[i]`` drafts and then ``final_token[i]``.
    """
    device = target_probs.device
    ks = [len(d) for d in draft_token_ids]
    b, k_max = len(ks), max(ks)
    starts = np.zeros(b, dtype=np.int64)
    starts[1:] = np.cumsum(np.asarray(ks[:-1]) + 1)
    seg = np.repeat(np.arange(b), ks)
    pos = np.concatenate([np.arange(k) for k in ks])
    flat_draft = [t for d in draft_token_ids for t in d]
    padded = np.zeros((b, k_max), dtype=np.int64)
    padded[seg, pos] = flat_draft
    host = torch.from_numpy(np.stack([starts[seg] + pos, seg, pos, np.asarray(flat_draft)]))
    rows_t, seg_t, pos_t, draft_t = host.to(device, non_blocking=True)
    meta = torch.from_numpy(np.stack([starts, np.asarray(ks)])).to(device, non_blocking=True)
    starts_t, ks_t = meta
    padded_t = torch.from_numpy(padded).to(device, non_blocking=True)

    p_at_draft = target_probs[rows_t, draft_t]
    q_at_draft = draft_probs[torch.arange(len(flat_draft), device=device), draft_t] if draft_probs is not None \
        else torch.ones_like(p_at_draft)
    # Accept with probability min(1, p/q): u < p/q, written without the division.
    accept = uniforms[seg_t, pos_t] * q_at_draft < p_at_draft
    accepted = torch.zeros((b, k_max), dtype=torch.int32, device=device)
    accepted[seg_t, pos_t] = accept.int()
    num_accepted = accepted.cumprod(dim=1).sum(dim=1)

    final_rows = starts_t + num_accepted
    weights = target_probs[final_rows].clone()
    rejected = num_accepted < ks_t
    at = num_accepted.clamp(max=k_max - 1)
    if draft_probs is None:
        # p minus a one-hot q at the rejected draft: that token's probability goes.
        rejected_token = padded_t.gather(1, at[:, None])
        kept = weights.gather(1, rejected_token)
        weights.scatter_(1, rejected_token, torch.where(rejected[:, None], torch.zeros_like(kept), kept))
    else:
        draft_starts = torch.cumsum(ks_t, 0) - ks_t
        q_rows = draft_probs[(draft_starts + at).clamp(max=len(flat_draft) - 1)]
        weights = torch.where(rejected[:, None], (weights - q_rows).clamp(min=0.0), weights)
    # A residual that rounding left empty can only follow a rejection of probability ~0: use p.
    empty = weights.sum(dim=1, keepdim=True) <= 0
    weights = torch.where(empty, target_probs[final_rows], weights)
    final = torch.argmax(weights / noise, dim=1)
    return num_accepted, final


def greedy_accept(targets: list[int], drafts: list[list[int]]) -> tuple[list[int], list[int]]:
    """Greedy verification on the host from the target's argmax per row (``sum(k_i + 1)``
    ids, row by row): each row keeps its drafts while they equal the argmax, then takes the
    argmax at the first mismatch (or after its last draft). Returns ``(accepted counts,
    final tokens)``. A step's few hundred ids are compared faster here than by the handful
    of device operations and host copies the same test takes on the GPU."""
    accepted, final = [], []
    start = 0
    for d in drafts:
        a = 0
        for token in d:
            if targets[start + a] != token:
                break
            a += 1
        accepted.append(a)
        final.append(targets[start + a])
        start += len(d) + 1
    return accepted, final


class _Context:
    """What the penalties read of a sequence, for the position after ``draft[:j]``."""

    __slots__ = ("params", "token_ids", "num_prompt")

    def __init__(self, params: SamplingParams, token_ids: list[int], num_prompt: int) -> None:
        self.params, self.token_ids, self.num_prompt = params, token_ids, num_prompt

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_prompt_tokens(self) -> int:
        return self.num_prompt


# ------------------------------------------------------------------- the engine's part
@dataclass
class SpecCounters:
    """vLLM's spec_decode counters: verified drafts, draft tokens, accepted draft tokens."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


class PendingVerify:
    """A step's sampled tokens when some rows verified drafts: ``wait`` returns a
    :class:`~.sampler.SamplerOutput`-shaped result whose ``token_ids`` hold, per sampling
    sequence (plain rows first, then the verified ones), one token or a list of them.

    ``verified`` is either the target's argmax per verify row (every row greedy: accepted
    on the host by :func:`greedy_accept`) or ``(num_accepted, final)`` from
    :func:`rejection_sample`, still on the device."""

    def __init__(self, plain: PendingSample | None, verified: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                 drafts: list[list[int]], counters: SpecCounters) -> None:
        self.plain, self.verified, self.drafts, self.counters = plain, verified, drafts, counters
        self.accepted: list[int] = []

    def wait(self) -> VerifyOutput:
        if isinstance(self.verified, torch.Tensor):
            accepted, final = greedy_accept(self.verified.tolist(), self.drafts)
        else:
            accepted, final = torch.stack([t.long() for t in self.verified]).tolist()
        plain = self.plain.wait() if self.plain is not None else None
        self.accepted = accepted
        verified = [d[:a] + [t] for d, a, t in zip(self.drafts, accepted, final, strict=True)]
        c = self.counters
        c.num_drafts += len(self.drafts)
        c.num_draft_tokens += sum(len(d) for d in self.drafts)
        c.num_accepted_tokens += sum(accepted)
        tokens: list[Any] = list(plain.token_ids) if plain is not None else []
        logprobs: list[TokenLogprob | None] = list(plain.logprobs) if plain is not None else []
        return VerifyOutput(tokens + verified, logprobs + [None] * len(verified))


@dataclass
class VerifyOutput:
    token_ids: list[Any]  # an int per plain row, a list per verified row
    logprobs: list[TokenLogprob | None]


class SpeculativeDecoder:
    """Proposes drafts into the slots the scheduler reserved and verifies them.

    ``propose`` fills ``ScheduledSeq.draft`` (shrinking ``num_new_tokens`` to what was
    proposed) before the target step; ``launch`` turns the step's logits into tokens:
    the plain rows through the ordinary sampler, the verify rows through rejection
    sampling."""

    def __init__(self, sampler: Sampler, *, ngram: NgramProposer | None = None,
                 draft: DraftModelProposer | None = None) -> None:
        self.sampler = sampler
        self.ngram = ngram
        self.draft = draft
        self.counters = SpecCounters()
        # The draft model's distributions for this step's drafts (None: one-hot drafts).
        self._draft_probs: torch.Tensor | None = None

    def propose(self, scheduled: list[ScheduledSeq]) -> None:
        """Draft tokens for the rows with lookahead slots (in place)."""
        rows = [s for s in scheduled if s.num_lookahead]
        if not rows:
            return
        if self.draft is not None:
            # Every row gets a full draft, so the rows of ``q`` follow the verify rows.
            drafts, self._draft_probs = self.draft.propose(rows)
        else:
            drafts = [self.ngram.propose(_token_array(s.seq), s.num_lookahead) for s in rows]
            self._draft_probs = None
        for s, d in zip(rows, drafts, strict=True):
            s.draft = d or None
            s.num_new_tokens = 1 + len(d)

    def launch(self, logits: torch.Tensor, sampling: list[ScheduledSeq]) -> tuple[torch.Tensor, PendingVerify]:
        """Split the step's ``logits`` (one row per sampling sequence, ``1 + len(draft)``
        per verify row) into the plain rows, returned for the ordinary sampler, and the
        verify rows, whose rejection sampling is queued here. The caller samples the plain
        rows and hands their pending result to the returned :class:`PendingVerify`."""
        plain_rows: list[int] = []
        verify_rows: list[int] = []
        verify: list[ScheduledSeq] = []
        row = 0
        for s in sampling:
            if s.draft:
                verify_rows.extend(range(row, row + 1 + len(s.draft)))
                verify.append(s)
                row += 1 + len(s.draft)
            else:
                plain_rows.append(row)
                row += 1
        if plain_rows:
            idx = _to_device(plain_rows + verify_rows, torch.long, logits.device)
            both = logits.index_select(0, idx)
            plain_logits, verify_logits = both[:len(plain_rows)], both[len(plain_rows):]
        else:  # every row verifies: the logits are already in order
            plain_logits, verify_logits = logits[:0], logits
        drafts = [s.draft for s in verify]
        verified = self._verify(verify_logits, [s.seq for s in verify], drafts)
        return plain_logits, PendingVerify(None, verified, drafts, self.counters)

    def _verify(self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]]
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Target distributions from the verify rows' logits, processed like the sampler
        processes a row (penalties over the context including the drafts before that row,
        then temperature/top-k/top-p/min-p), and the rejection sampling over them; for
        all-greedy rows with one-hot drafts only the argmax (accepted on the host)."""
        if all(s.plain_greedy for s in seqs) and self._draft_probs is None:
            return torch.argmax(logits, dim=-1)
        logits = logits.to(torch.float32, copy=True)  # penalties write into it; the step's logits stay as they were
        row_params: list[SamplingParams] = []
        contexts: list[_Context] = []
        penalties = any(_needs_penalties(s.params) for s in seqs)
        for seq, d in zip(seqs, drafts, strict=True):
            row_params.extend([seq.params] * (len(d) + 1))
            if penalties:
                base = seq.token_ids
                contexts.extend(_Context(seq.params, base + d[:j], seq.num_prompt_tokens) for j in range(len(d) + 1))
        if penalties:
            logits = apply_penalties(logits, contexts)  # type: ignore[arg-type]
        probs = torch.zeros_like(logits)
        greedy = [i for i, p in enumerate(row_params) if p.temperature == 0.0]
        sampled = [i for i, p in enumerate(row_params) if p.temperature != 0.0]
        if greedy:
            g = _to_device(greedy, torch.long, logits.device)
            probs[g, torch.argmax(logits[g], dim=-1)] = 1.0
        if sampled:
            sidx = _to_device(sampled, torch.long, logits.device)
            probs[sidx] = torch.softmax(filter_logits(logits[sidx], [row_params[i] for i in sampled]), dim=-1)
        k_max = max(len(d) for d in drafts)
        uniforms = _draws((len(seqs), k_max), seqs, self.sampler, "uniform")
        noise = _exponential((len(seqs), logits.shape[-1]), seqs, self.sampler)
        return rejection_sample(probs, drafts, self._draft_probs, uniforms, noise)
