"""Turning a step's logits into tokens: penalties, temperature, top-k/top-p/min-p, seeds.

All rows of a step are processed together on the device; only seeded rows draw their
noise one row at a time, from their own ``torch.Generator``, so a seeded request yields
the same tokens whatever else is in the batch. Sampling uses the exponential-race
form of a categorical draw (``argmax(p / E)`` with ``E ~ Exp(1)``), which needs one
noise vector per row and no cumulative sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sequence import Sequence
from .types import SamplingParams, TokenLogprob


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def _needs_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition (HF: prompt and output tokens), presence and frequency (OpenAI: output
    tokens only) penalties, in place on the rows that ask for them."""
    rows = [i for i, s in enumerate(seqs) if _needs_penalties(s.params)]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    device = logits.device
    for i in rows:
        p = seqs[i].params
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seqs[i].token_ids)), dtype=torch.long, device=device)
            seen = seen[seen < vocab]
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            out_ids = seqs[i].output_token_ids
            if out_ids:
                ids = torch.tensor(out_ids, dtype=torch.long, device=device)
                ids = ids[ids < vocab]
                counts = torch.zeros(vocab, dtype=row.dtype, device=device)
                counts.scatter_add_(0, ids, torch.ones_like(ids, dtype=row.dtype))
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return logits


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks (``-inf``), for sampled rows."""
    device = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
    logits = logits / temps[:, None]
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        vocab = logits.shape[-1]
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device)[None, :]
        k = torch.tensor([k if k > 0 else vocab for k in top_k], device=device)
        drop = ranks >= k[:, None]
        if any(p < 1.0 for p in top_p):
            probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
            tp = torch.tensor(top_p, dtype=probs.dtype, device=device)
            drop |= before > tp[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    min_p = [p.min_p for p in params]
    if any(m > 0.0 for m in min_p):
        probs = torch.softmax(logits, dim=-1)
        mp = torch.tensor(min_p, dtype=probs.dtype, device=device)
        thresh = probs.max(dim=-1, keepdim=True).values * mp[:, None]
        logits = logits.masked_fill(probs < thresh, float("-inf"))
    return logits


class Sampler:
    """Samples one token per row of ``logits`` according to each sequence's parameters."""

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._shared = torch.Generator(device=device)
        self._shared.manual_seed(seed)

    def generator_for(self, seq: Sequence) -> torch.Generator | None:
        """The request's own generator when it has a seed (created on first use)."""
        if seq.params.seed is None:
            return None
        if seq.generator is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(int(seq.params.seed))
            seq.generator = g
        return seq.generator

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """``logits``: ``[len(seqs), vocab]`` for the rows that sample this step."""
        params = [s.params for s in seqs]
        want_logprobs = any(p.logprobs is not None for p in params)
        if not want_logprobs and all(p.temperature == 0.0 and not _needs_penalties(p) for p in params):
            # Plain greedy batch: argmax is exact in the logits' own dtype.
            return SamplerOutput(torch.argmax(logits, dim=-1).tolist(), [None] * len(seqs))
        raw = logits
        logits = logits.float()
        if any(_needs_penalties(p) for p in params):
            logits = apply_penalties(logits.clone() if logits is raw else logits, seqs)

        greedy = [p.temperature == 0.0 for p in params]
        token_ids = torch.argmax(logits, dim=-1)
        sample_rows = [i for i, g in enumerate(greedy) if not g]
        if sample_rows:
            idx = torch.tensor(sample_rows, device=logits.device)
            filtered = filter_logits(logits[idx], [params[i] for i in sample_rows])
            probs = torch.softmax(filtered, dim=-1)
            noise = torch.empty_like(probs)
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
                    sr = torch.tensor(shared_rows, device=logits.device)
                    noise[sr] = torch.empty((len(shared_rows), probs.shape[-1]), device=logits.device,
                                            dtype=probs.dtype).exponential_(generator=self._shared)
            picked = torch.argmax(probs / noise, dim=-1)
            token_ids[idx] = picked
        ids = token_ids.tolist()

        lps: list[TokenLogprob | None] = [None] * len(seqs)
        if want_logprobs:
            rows = [i for i, p in enumerate(params) if p.logprobs is not None]
            logp = torch.log_softmax(raw[rows].float(), dim=-1)
            chosen = logp.gather(1, token_ids[rows][:, None]).squeeze(1).tolist()
            n_top = max(params[i].logprobs for i in rows)
            top_vals, top_ids = (logp.topk(n_top, dim=-1) if n_top > 0 else (None, None))
            for j, i in enumerate(rows):
                n = params[i].logprobs
                top = None
                if n and top_ids is not None:
                    top = dict(zip(top_ids[j, :n].tolist(), top_vals[j, :n].tolist(), strict=True))
                lps[i] = TokenLogprob(token_id=ids[i], logprob=chosen[j], top=top)
        return SamplerOutput(ids, lps)
