"""Turning a step's logits into tokens: penalties, temperature, top-k/top-p/min-p, seeds.

All rows of a step are processed together on the device; only seeded rows draw their
noise one row at a time, from their own ``torch.Generator``, so a seeded request yields
the same tokens whatever else is in the batch. Sampling uses the exponential-race
form of a categorical draw (``argmax(p / E)`` with ``E ~ Exp(1)``), which needs one
noise vector per row and no cumulative sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .sequence import PLACEHOLDER_TOKEN, Sequence
from .structured_output import TokenMasker
from .types import SamplingParams, TokenLogprob


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def _needs_penalties(p: SamplingParams) -> bool:
    """Whether :func:`apply_penalties` changes this request's logits."""
    return (p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            or bool(p.logit_bias) or p.min_tokens > 0)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on ``device`` without stalling the host.

    ``torch.tensor(values, device=cuda)`` is a blocking copy that waits for the stream
    to drain (the whole forward, in the middle of sampling); from pinned memory with
    ``non_blocking`` it is just another operation queued on the stream.
    """
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _uniform(values: list):
    """The common value of ``values``, or None when they differ."""
    first = values[0]
    for v in values:
        if v != first:
            return None
    return first


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence], last_tokens: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """``logit_bias`` (OpenAI: added first), repetition (HF: prompt and output tokens),
    presence and frequency (OpenAI: output tokens only) penalties, and ``min_tokens``
    (stop token ids at -inf until that many tokens exist), in place on the rows that ask.

    All rows together: one gather/scatter per kind over the ``(row, token)`` pairs
    concerned, whatever the number of rows.

    ``last_tokens`` (``[len(seqs)]`` on the device): the tokens standing behind a
    ``PLACEHOLDER_TOKEN`` at the end of a sequence (a step launched before they were read
    back); they count as if they were on the host."""
    rows = [i for i, s in enumerate(seqs) if _needs_penalties(s.params)]
    if not rows:
        return logits
    # Rows whose last token is still on the device: penalised from the host's tokens
    # first, then for that token unless the host's tokens already held it.
    held = [i for i in rows if seqs[i].token_ids[-1] == PLACEHOLDER_TOKEN] if last_tokens is not None else []
    vocab = logits.shape[-1]
    device = logits.device
    bias_rows: list[int] = []
    bias_toks: list[int] = []
    bias_vals: list[float] = []
    ban_rows: list[int] = []
    ban_toks: list[int] = []
    for i in rows:
        seq = seqs[i]
        p = seq.params
        if p.logit_bias:
            for t, v in p.logit_bias.items():
                if t < vocab:
                    bias_rows.append(i)
                    bias_toks.append(t)
                    bias_vals.append(v)
        if p.min_tokens and len(seq.output_token_ids) < p.min_tokens:
            stops = [t for t in seq.stop_ids if t < vocab]
            ban_rows += [i] * len(stops)
            ban_toks += stops
    if bias_rows:
        r, t = _to_device([bias_rows, bias_toks], torch.long, device)
        logits[r, t] += _to_device(bias_vals, logits.dtype, device)
    rep = [i for i in rows if seqs[i].params.repetition_penalty != 1.0]
    pf = [i for i in rows if seqs[i].params.presence_penalty != 0.0 or seqs[i].params.frequency_penalty != 0.0]
    held_tokens = {i: j for j, i in enumerate(held)}
    if rep:
        tables = [_PenaltyTokens.of(seqs[i], vocab).distinct(seqs[i], vocab) for i in rep]
        r, t = _pairs(rep, tables, device)
        pen = _to_device([seqs[i].params.repetition_penalty for i in rep], logits.dtype, device)
        pen_rows = torch.repeat_interleave(pen, _to_device([len(x) for x in tables], torch.long, device))
        vals = logits[r, t]
        logits[r, t] = torch.where(vals > 0, vals / pen_rows, vals * pen_rows)
        extra = [i for i in rep if i in held_tokens]
        if extra:
            _penalise_held(logits, seqs, extra, last_tokens, r, t, "rep")
    if pf:
        counted = [_PenaltyTokens.of(seqs[i], vocab).output_counts(seqs[i], vocab) for i in pf]
        r, t = _pairs(pf, [toks for toks, _ in counted], device)
        sizes = _to_device([len(toks) for toks, _ in counted], torch.long, device)
        cnt = torch.from_numpy(np.concatenate([c for _, c in counted]))
        if device.type == "cuda":  # pinned: a copy from pageable memory would wait for the forward pass
            cnt = cnt.pin_memory()
        cnt = cnt.to(device, logits.dtype, non_blocking=True)
        freq, pres = _to_device([[seqs[i].params.frequency_penalty for i in pf],
                                 [seqs[i].params.presence_penalty for i in pf]], logits.dtype, device)
        logits[r, t] -= torch.repeat_interleave(freq, sizes) * cnt + torch.repeat_interleave(pres, sizes)
        extra = [i for i in pf if i in held_tokens]
        if extra:
            _penalise_held(logits, seqs, extra, last_tokens, r, t, "pf")
    if ban_rows:
        r, t = _to_device([ban_rows, ban_toks], torch.long, device)
        logits[r, t] = float("-inf")
    return logits


class _PenaltyTokens:
    """A sequence's token history as the penalties read it, kept up to date incrementally
    (numpy arrays, so a step costs the new tokens plus one concatenation, not a set and a
    tensor built from every token of every row). Tokens behind a ``PLACEHOLDER_TOKEN``
    are not counted until they are known."""

    __slots__ = ("vocab", "upto", "seen", "distinct_arr", "out_upto", "counts", "count_arrs")

    def __init__(self, vocab: int = 0) -> None:
        self.vocab = vocab  # ids at or past it are left out (a model's logits may be narrower than its tokenizer)
        self.upto = 0
        self.seen: set[int] = set()
        self.distinct_arr = np.empty(0, dtype=np.int64)
        self.out_upto = 0
        self.counts: dict[int, int] = {}
        self.count_arrs: tuple[np.ndarray, np.ndarray] | None = None

    @staticmethod
    def of(seq: Sequence, vocab: int) -> _PenaltyTokens:
        """The state kept on ``seq``; a fresh one for stand-ins that keep none (the
        speculative sampler's per-position contexts)."""
        state = getattr(seq, "penalty_tokens", None)
        if state is None or state.vocab != vocab:
            state = _PenaltyTokens(vocab)
            if hasattr(seq, "penalty_tokens"):
                seq.penalty_tokens = state
        return state

    @staticmethod
    def _known(seq: Sequence) -> int:
        n = len(seq.token_ids)
        return n - 1 if n and seq.token_ids[-1] == PLACEHOLDER_TOKEN else n

    def distinct(self, seq: Sequence, vocab: int) -> np.ndarray:
        """The distinct ids in ``[0, vocab)`` among the prompt and output tokens."""
        end = self._known(seq)
        if end > self.upto:
            new = [t for t in seq.token_ids[self.upto:end] if 0 <= t < vocab and t not in self.seen]
            if new:
                fresh = list(dict.fromkeys(new))
                self.seen.update(fresh)
                self.distinct_arr = np.concatenate([self.distinct_arr, np.asarray(fresh, dtype=np.int64)])
            self.upto = end
        return self.distinct_arr

    def output_counts(self, seq: Sequence, vocab: int) -> tuple[np.ndarray, np.ndarray]:
        """The ids in ``[0, vocab)`` among the output tokens and how often each occurs."""
        start = max(self.out_upto, seq.num_prompt_tokens)
        end = self._known(seq)
        if end > start or self.count_arrs is None:
            for t in seq.token_ids[start:end]:
                if 0 <= t < vocab:
                    self.counts[t] = self.counts.get(t, 0) + 1
            self.out_upto = max(end, start)
            self.count_arrs = (np.fromiter(self.counts.keys(), dtype=np.int64, count=len(self.counts)),
                               np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts)))
        return self.count_arrs


def _pairs(rows: list[int], tokens: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row, token)`` index tensors on ``device`` for each row's token array."""
    r = np.repeat(np.asarray(rows, dtype=np.int64), [len(x) for x in tokens])
    t = np.concatenate(tokens) if tokens else np.empty(0, dtype=np.int64)
    both = torch.from_numpy(np.stack([r, t]))
    if device.type == "cuda":
        both = both.pin_memory().to(device, non_blocking=True)
    return both[0], both[1]


def _penalise_held(logits: torch.Tensor, seqs: list[Sequence], held: list[int], last_tokens: torch.Tensor,
                   host_rows: torch.Tensor, host_toks: torch.Tensor, kind: str) -> None:
    """The repetition (``kind="rep"``) or presence/frequency (``"pf"``) penalty for the
    device-side last token of each row in ``held``: repetition and presence apply only if
    the host's ``(row, token)`` pairs (on the device) did not already hold it, frequency
    always once more. The membership test runs on the device: the token is not on the host."""
    device = logits.device
    idx = _to_device(held, torch.long, device)
    tok = last_tokens.index_select(0, idx)
    already = ((host_rows[None, :] == idx[:, None]) & (host_toks[None, :] == tok[:, None])).any(dim=1)
    vals = logits[idx, tok]
    if kind == "rep":
        pen = _to_device([seqs[i].params.repetition_penalty for i in held], logits.dtype, device)
        logits[idx, tok] = torch.where(already, vals, torch.where(vals > 0, vals / pen, vals * pen))
    else:
        freq, pres = _to_device([[seqs[i].params.frequency_penalty for i in held],
                                 [seqs[i].params.presence_penalty for i in held]], logits.dtype, device)
        logits[idx, tok] = vals - (freq + torch.where(already, torch.zeros_like(pres), pres))


_ARANGE: dict[tuple[int, torch.device], torch.Tensor] = {}


def _ranks(vocab: int, device: torch.device) -> torch.Tensor:
    key = (vocab, device)
    r = _ARANGE.get(key)
    if r is None:
        r = _ARANGE[key] = torch.arange(vocab, device=device)[None, :]
    return r


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks (``-inf``), for sampled rows.

    A setting shared by every row is applied as a Python scalar (no tensor built and
    copied to the device); per-row values go over in one non-blocking copy each."""
    device = logits.device
    temps = [p.temperature for p in params]
    t = _uniform(temps)
    logits = logits / (t if t is not None else _to_device(temps, logits.dtype, device)[:, None])
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    use_k = any(k > 0 for k in top_k)
    use_p = any(p < 1.0 for p in top_p)
    if use_k or use_p:
        vocab = logits.shape[-1]
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        drop = None
        if use_k:
            k = _uniform(top_k)
            if k is not None:
                sorted_logits[:, k:] = float("-inf")
            else:
                kt = _to_device([k if k > 0 else vocab for k in top_k], torch.long, device)
                drop = _ranks(vocab, device) >= kt[:, None]
                sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        if use_p:
            probs = torch.softmax(sorted_logits, dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
            tp = _uniform(top_p)
            drop = before > (tp if tp is not None else _to_device(top_p, probs.dtype, device)[:, None])
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    min_p = [p.min_p for p in params]
    if any(m > 0.0 for m in min_p):
        probs = torch.softmax(logits, dim=-1)
        m = _uniform(min_p)
        mp = m if m is not None else _to_device(min_p, probs.dtype, device)[:, None]
        thresh = probs.max(dim=-1, keepdim=True).values * mp
        logits = logits.masked_fill(probs < thresh, float("-inf"))
    return logits


class Sampler:
    """Samples one token per row of ``logits`` according to each sequence's parameters.

    ``sampler(logits, seqs)`` returns the tokens; ``sampler.launch(logits, seqs)`` only
    queues the work on the device, so that the host can do something else before it
    waits for the tokens (``.wait()``)."""

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._shared = torch.Generator(device=device)
        self._shared.manual_seed(seed)
        self._masker: TokenMasker | None = None  # structured output, made on first use

    def generator_for(self, seq: Sequence) -> torch.Generator | None:
        """The request's own generator when it has a seed (created on first use)."""
        if seq.params.seed is None:
            return None
        if seq.generator is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(int(seq.params.seed))
            seq.generator = g
        return seq.generator

    def prepare_grammar_masks(self, vocab_size: int, dtype: torch.dtype) -> None:
        """Make the structured-output masker now and compile its device kernel, instead of
        inside the first constrained step (where the compile would stall every stream)."""
        if self._masker is None:
            self._masker = TokenMasker(vocab_size, self.device)
        self._masker.warm_up(dtype)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """``logits``: ``[len(seqs), vocab]`` for the rows that sample this step."""
        return self.launch(logits, seqs).wait()

    def launch(self, logits: torch.Tensor, seqs: list[Sequence], last_tokens: torch.Tensor | None = None
               ) -> PendingSample:
        """Queue the sampling of ``logits`` on the device without waiting for it (nothing
        here reads a device value back); :meth:`PendingSample.wait` returns the tokens.
        ``last_tokens``: see :func:`apply_penalties`."""
        n = len(seqs)
        constrained = [(i, s.grammar) for i, s in enumerate(seqs) if s.grammar is not None]
        if constrained:  # grammar masks first: nothing after them may pick a forbidden token
            if self._masker is None:
                self._masker = TokenMasker(logits.shape[-1], self.device)
            self._masker.apply(logits, constrained)
        if all(s.plain_greedy for s in seqs):
            # Plain greedy batch: argmax is exact in the logits' own dtype.
            return PendingSample(torch.argmax(logits, dim=-1), n)
        params = [s.params for s in seqs]
        raw = logits
        logits = logits.float()
        if any(_needs_penalties(p) for p in params):
            logits = apply_penalties(logits.clone() if logits is raw else logits, seqs, last_tokens)

        sample_rows = [i for i, p in enumerate(params) if p.temperature != 0.0]
        if sample_rows:
            every_row = len(sample_rows) == n
            if every_row:
                sub, sub_params = logits, params
            else:
                token_ids = torch.argmax(logits, dim=-1)
                idx = _to_device(sample_rows, torch.long, logits.device)
                sub, sub_params = logits[idx], [params[i] for i in sample_rows]
            probs = torch.softmax(filter_logits(sub, sub_params), dim=-1)
            noise = torch.empty_like(probs)
            shared_rows = list(range(len(sample_rows)))
            if any(p.seed is not None for p in sub_params):
                shared_rows = []
                for j, i in enumerate(sample_rows):
                    g = self.generator_for(seqs[i])
                    if g is None:
                        shared_rows.append(j)
                    else:
                        noise[j].exponential_(generator=g)
            if shared_rows:
                if len(shared_rows) == len(sample_rows):
                    noise.exponential_(generator=self._shared)
                else:
                    sr = _to_device(shared_rows, torch.long, logits.device)
                    noise[sr] = torch.empty((len(shared_rows), probs.shape[-1]), device=logits.device,
                                            dtype=probs.dtype).exponential_(generator=self._shared)
            picked = torch.argmax(probs / noise, dim=-1)
            if every_row:
                token_ids = picked
            else:
                token_ids[idx] = picked
        else:
            token_ids = torch.argmax(logits, dim=-1)

        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not rows:
            return PendingSample(token_ids, n)
        if len(rows) == n:
            sel, sel_ids = raw, token_ids
        else:
            ridx = _to_device(rows, torch.long, logits.device)
            sel, sel_ids = raw[ridx], token_ids[ridx]
        logp = torch.log_softmax(sel.float(), dim=-1)
        chosen = logp.gather(1, sel_ids[:, None]).squeeze(1)
        counts = [params[i].logprobs for i in rows]
        n_top = max(counts)
        top = logp.topk(n_top, dim=-1) if n_top > 0 else None
        return PendingSample(token_ids, n, (rows, counts, chosen, top))


class PendingSample:
    """A step's sampled tokens, still on the device until :meth:`wait` reads them back
    (in one device->host read, logprobs included: the step's one wait on the device).

    On CUDA the read is queued at once, right behind the sampling, into pinned memory,
    and :meth:`wait` waits for that copy only: a step launched after this one (the
    engine's async scheduling) is queued behind the copy, so reading these tokens never
    waits for the next step's forward pass."""

    __slots__ = ("token_ids", "_n", "_logprobs", "_host", "_copied")

    def __init__(self, token_ids: torch.Tensor, n: int, logprobs: tuple | None = None) -> None:
        self.token_ids = token_ids  # [n] on the device
        self._n = n
        self._logprobs = logprobs
        self._host: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None
        if token_ids.is_cuda:
            flat = self._flat()
            self._host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self._host.copy_(flat, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()

    def _flat(self) -> torch.Tensor:
        """Everything to read back in one tensor: the ids, then the chosen logprobs and the
        top values and ids (float64 holds the ids and the float32 values exactly)."""
        if self._logprobs is None:
            return self.token_ids
        _, _, chosen_t, top = self._logprobs
        parts = [self.token_ids, chosen_t] + ([top.values, top.indices] if top is not None else [])
        return torch.cat([t.reshape(-1).double() for t in parts])

    def wait(self) -> SamplerOutput:
        lps: list[TokenLogprob | None] = [None] * self._n
        if self._copied is not None:
            self._copied.synchronize()
            flat_t = self._host
        else:
            flat_t = self._flat()
        if self._logprobs is None:
            return SamplerOutput(flat_t.tolist(), lps)
        rows, counts, _, top = self._logprobs
        flat = flat_t.tolist()
        n, m = self._n, len(rows)
        ids = [int(x) for x in flat[:n]]
        chosen = flat[n:n + m]
        top_vals = top_ids = None
        if top is not None:
            w = top.values.shape[-1]
            vals, idx = flat[n + m:n + m + m * w], flat[n + m + m * w:]
            top_vals = [vals[j * w:(j + 1) * w] for j in range(m)]
            top_ids = [[int(x) for x in idx[j * w:(j + 1) * w]] for j in range(m)]
        for j, (i, k) in enumerate(zip(rows, counts, strict=True)):
            entries = None
            if k and top_ids is not None:
                entries = dict(zip(top_ids[j][:k], top_vals[j][:k], strict=True))
            lps[i] = TokenLogprob(token_id=ids[i], logprob=chosen[j], top=entries)
        return SamplerOutput(ids, lps)
