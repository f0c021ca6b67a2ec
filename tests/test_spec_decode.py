"""Speculative decoding: proposers, the rejection sampler's distribution, and the engine
producing exactly what plain decoding produces (greedy), with its KV blocks given back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_attention.engine import EngineConfig, LLMEngine, SamplingParams
from stream_attention.engine.sampler import Sampler
from stream_attention.engine.scheduler import ScheduledSeq
from stream_attention.engine.sequence import Sequence
from stream_attention.engine.spec_decode import (
    DraftModelProposer,
    NgramProposer,
    SpeculativeDecoder,
    TokenArray,
    draft_block_bytes,
    greedy_accept,
    rejection_sample,
)
from stream_attention.models import default_model_dir

# ----------------------------------------------------------------------------- n-gram proposer


def test_ngram_proposes_what_followed_the_longest_then_latest_match() -> None:
    prop = NgramProposer(1, 3)
    assert prop.propose([1, 2, 3, 4, 1, 2], 3) == [3, 4, 1]  # suffix [1, 2] seen at 0
    # Suffix [1] occurs at 2 and 4: the latest occurrence wins.
    assert NgramProposer(1, 1).propose([5, 6, 1, 7, 1, 8, 1], 2) == [8, 1]
    # A longer match beats a more recent shorter one: [1, 2] at 0, although [2] recurs at 4.
    assert NgramProposer(1, 2).propose([1, 2, 9, 3, 2, 8, 1, 2], 2) == [9, 3]
    assert prop.propose([1, 2, 3, 4], 3) == []  # the last token never occurred before
    assert NgramProposer(2, 3).propose([1, 2, 3, 1], 3) == []  # [1] recurs, but min_n is 2
    assert prop.propose([7, 8, 7], 5) == [8, 7]  # the context ends: fewer than k
    assert prop.propose([4], 3) == []


def _reference_ngram(tokens: list[int], k: int, lo: int, hi: int) -> list[int]:
    for n in range(hi, lo - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=40), st.integers(1, 6), st.integers(1, 4), st.integers(0, 3))
def test_ngram_matches_a_brute_force_search(tokens: list[int], k: int, lo: int, extra: int) -> None:
    hi = lo + extra
    assert NgramProposer(lo, hi).propose(tokens, k) == _reference_ngram(tokens, k, lo, hi)


@pytest.mark.parametrize(("lo", "hi", "ok"), [(1, 1, True), (3, 3, True), (2, 5, True), (0, 2, False), (-1, 2, False),
                                              (3, 2, False)])
def test_ngram_lookup_bounds_need_one_at_least_and_min_at_most_max(lo: int, hi: int, ok: bool) -> None:
    if ok:
        assert NgramProposer(lo, hi).propose([5, 6, 7] * 3, 2) == [5, 6]
    else:
        with pytest.raises(ValueError, match=f"prompt_lookup_min={lo} and prompt_lookup_max={hi}"):
            NgramProposer(lo, hi)


# ------------------------------------------------------------------------- rejection sampler
N_DRAWS = 20_000


def _tv(samples: torch.Tensor, p: torch.Tensor) -> float:
    freq = torch.bincount(samples, minlength=p.numel()).double() / samples.numel()
    return 0.5 * (freq - p.double()).abs().sum().item()


def _tv_bound(n: int, vocab: int) -> float:
    # E[TV] of n draws over V categories is at most 0.5 * sqrt(V / n) (Cauchy-Schwarz on the
    # per-category standard deviations); TV concentrates within ~1/sqrt(n) of its mean
    # (McDiarmid), so 2.5x the mean bound is not reached by chance (the draws are seeded).
    return 2.5 * 0.5 * (vocab / n) ** 0.5


def _outputs(num_accepted: torch.Tensor, final: torch.Tensor, drafts: torch.Tensor) -> list[list[int]]:
    return [d[:a].tolist() + [f] for d, a, f in zip(drafts, num_accepted.tolist(), final.tolist(), strict=True)]


P = torch.tensor([[0.50, 0.20, 0.10, 0.10, 0.05, 0.05],
                  [0.05, 0.05, 0.40, 0.30, 0.10, 0.10],
                  [0.10, 0.30, 0.10, 0.10, 0.30, 0.10]])


@pytest.mark.parametrize("one_hot", [False, True], ids=["draft-model-q", "prompt-lookup-q"])
def test_rejection_sampling_reproduces_the_target_distribution(one_hot: bool) -> None:
    """Every emitted position is distributed as the target's p at that position: the first
    token always, the second whenever the first draft was accepted, the bonus after both."""
    gen = torch.Generator().manual_seed(1234)
    vocab, k = P.shape[1], 2
    q = torch.tensor([[0.05, 0.05, 0.10, 0.20, 0.30, 0.30],
                      [0.30, 0.30, 0.10, 0.10, 0.10, 0.10]])
    if one_hot:  # prompt lookup: the same drafts every time, q one-hot at them
        drafts = torch.tensor([[0, 3]] * N_DRAWS)
        draft_probs = None
    else:
        drafts = torch.stack([torch.multinomial(q[j], N_DRAWS, replacement=True, generator=gen) for j in range(k)], 1)
        draft_probs = q.repeat(N_DRAWS, 1)
    target = P.repeat(N_DRAWS, 1)
    uniforms = torch.rand(N_DRAWS, k, generator=gen)
    noise = torch.empty(N_DRAWS, vocab).exponential_(generator=gen)
    acc, final = rejection_sample(target, drafts.tolist(), draft_probs, uniforms, noise)
    out = _outputs(acc, final, drafts)
    for pos in range(k + 1):
        tokens = torch.tensor([o[pos] for o in out if len(o) > pos])
        assert tokens.numel() > 1000, f"position {pos}: too few samples to judge"
        assert _tv(tokens, P[pos]) < _tv_bound(tokens.numel(), vocab), f"position {pos}"
    # Both outcomes happen: some drafts rejected, some fully accepted.
    assert 0 < (acc == k).sum() < N_DRAWS and (acc == 0).sum() > 0


def test_rejection_sampling_with_a_one_hot_target_is_greedy() -> None:
    # temperature 0: p is one-hot at the argmax; drafts are kept exactly while they equal it.
    vocab = 5
    argmax = [[3, 1, 4], [3, 1, 4], [2, 2, 0]]
    target = torch.nn.functional.one_hot(torch.tensor(argmax).flatten(), vocab).float()
    drafts = [[3, 1], [3, 2], [1, 2]]
    acc, final = rejection_sample(target, drafts, None, torch.rand(3, 2), torch.empty(3, vocab).exponential_())
    assert _outputs(acc, final, torch.tensor(drafts)) == [[3, 1, 4], [3, 1], [2]]


def test_a_draft_the_target_gives_no_probability_is_never_accepted() -> None:
    # A uniform draw of exactly 0 must still reject a token outside the target's support
    # (e.g. filtered out by top-k): acceptance is u * q < p, never u * q <= p.
    vocab = 4
    target = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]])
    noise = torch.ones(1, vocab)
    for draft_probs in (None, torch.tensor([[1.0, 0.0, 0.0, 0.0]])):
        acc, final = rejection_sample(target, [[0]], draft_probs, torch.zeros(1, 1), noise)
        assert acc.tolist() == [0] and final.item() in (1, 2)


def test_a_residual_rounded_to_nothing_falls_back_to_the_target() -> None:
    # p <= q everywhere (p lost a little mass to rounding) and the draft rejected: max(0, p - q)
    # is all zeros, so the correction is drawn from p itself; argmax over the empty residual
    # would re-emit token 0, the rejected draft. The second sequence's residual is not empty:
    # the fallback is decided per sequence.
    target = torch.tensor([[0.4999, 0.5], [0.5, 0.5], [0.1, 0.9], [0.5, 0.5]])
    draft_probs = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    acc, final = rejection_sample(target, [[0], [0]], draft_probs, torch.tensor([[0.9999999], [0.9999999]]),
                                  torch.ones(2, 2))
    assert acc.tolist() == [0, 0] and final.tolist() == [1, 1]


def _reference_rejection(target: torch.Tensor, drafts: list[list[int]], draft_probs: torch.Tensor | None,
                         uniforms: torch.Tensor, noise: torch.Tensor) -> list[list[int]]:
    """Speculative sampling written out sequence by sequence, draft by draft (Leviathan et
    al. 2023, Algorithm 1), with the same draws: keep draft ``x`` while ``u * q(x) < p(x)``,
    then the argmax of ``weights / noise`` over ``max(0, p - q)`` after a rejection (``p``
    itself when that is empty) or over ``p`` after the last draft."""
    out, row, q_row = [], 0, 0
    for i, d in enumerate(drafts):
        kept = 0
        for j, x in enumerate(d):
            q = draft_probs[q_row + j, x] if draft_probs is not None else torch.tensor(1.0)
            if not uniforms[i, j] * q < target[row + j, x]:
                break
            kept += 1
        p = target[row + kept]
        weights = p.clone()
        if kept < len(d):
            if draft_probs is not None:
                weights = torch.clamp(p - draft_probs[q_row + kept], min=0.0)
            else:
                weights[d[kept]] = 0.0
            if not weights.sum() > 0:
                weights = p
        out.append(d[:kept] + [int(torch.argmax(weights / noise[i]))])
        row += len(d) + 1
        q_row += len(d)
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=5), st.booleans(), st.integers(0, 2**31 - 1))
def test_rejection_sampling_of_drafts_of_different_lengths_matches_a_loop(ks: list[int], one_hot: bool,
                                                                          seed: int) -> None:
    """The batched sampler against a per-sequence loop with the same uniforms and noise, exact
    tokens: rows located by each sequence's own draft count (target rows ``k_i + 1``, draft
    rows ``k_i``), sequences whose drafts all pass next to ones rejected early. Drafts are
    mostly the target's likely tokens and probabilities have zeros (top-k), so every path
    (accept all, reject with a residual, reject into an empty residual) is taken."""
    gen = torch.Generator().manual_seed(seed)
    vocab = 5
    b = len(ks)

    def dist(rows: int) -> torch.Tensor:
        w = torch.rand(rows, vocab, generator=gen) * (torch.rand(rows, vocab, generator=gen) < 0.7)
        w[torch.arange(rows), torch.randint(vocab, (rows,), generator=gen)] += 0.5  # never all zero
        return w / w.sum(dim=1, keepdim=True)

    target = dist(sum(ks) + b)
    draft_probs = None if one_hot else dist(sum(ks))
    row_of = [sum(k + 1 for k in ks[:i]) for i in range(b)]
    drafts = [[int(torch.multinomial(target[row_of[i] + j], 1, generator=gen)) if torch.rand(1, generator=gen) < 0.8
               else int(torch.randint(vocab, (1,), generator=gen)) for j in range(k)] for i, k in enumerate(ks)]
    uniforms = torch.rand(b, max(ks), generator=gen)
    noise = torch.empty(b, vocab).exponential_(generator=gen)
    acc, final = rejection_sample(target, drafts, draft_probs, uniforms, noise)
    expected = _reference_rejection(target, drafts, draft_probs, uniforms, noise)
    assert acc.tolist() == [len(e) - 1 for e in expected]
    assert [d[:a] + [f] for d, a, f in zip(drafts, acc.tolist(), final.tolist(), strict=True)] == expected


def _reference_greedy(argmax: list[int], drafts: list[list[int]]) -> list[list[int]]:
    out, row = [], 0
    for d in drafts:
        kept = 0
        while kept < len(d) and d[kept] == argmax[row + kept]:
            kept += 1
        out.append(d[:kept] + [argmax[row + kept]])
        row += len(d) + 1
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=4), min_size=1, max_size=4), st.data())
def test_greedy_verify_of_drafts_of_different_lengths(drafts: list[list[int]], data: st.DataObject) -> None:
    # Tokens 0..2 make agreement frequent, including a bonus token equal to another row's
    # draft (or to a padding value): a row never accepts more drafts than it proposed, or
    # the engine would keep K/V slots of tokens that were never computed.
    argmax = data.draw(st.lists(st.integers(0, 2), min_size=sum(len(d) + 1 for d in drafts),
                                max_size=sum(len(d) + 1 for d in drafts)))
    acc, final = greedy_accept(argmax, drafts)
    expected = _reference_greedy(argmax, drafts)
    assert acc == [len(e) - 1 for e in expected]
    assert [d[:a] + [f] for d, a, f in zip(drafts, acc, final, strict=True)] == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 9), max_size=300), min_size=1, max_size=6))
def test_token_array_follows_a_growing_list(appends: list[list[int]]) -> None:
    """Prompt lookup reads a sequence's tokens through a numpy array extended step by step
    (across reallocations); it must always equal the list, also after a reset to a shorter one."""
    tokens: list[int] = []
    arr = TokenArray()
    for chunk in appends:
        tokens += chunk
        assert arr.sync(tokens).tolist() == tokens
    assert arr.sync(tokens[:3]).tolist() == tokens[:3]


@pytest.mark.parametrize("sizes", [[300], [100, 156, 1], [255, 1, 1], [10, 1000, 3000], [256, 257, 600]],
                         ids=str)
def test_token_array_grows_past_its_buffer_and_restarts_on_a_new_list(sizes: list[int]) -> None:
    """Growth across reallocations (the first at 256 tokens; jumps past twice the buffer),
    then a shorter list with other tokens: the array is always the list, as int64 ids."""
    rng = np.random.default_rng(sum(sizes))
    tokens: list[int] = []
    arr = TokenArray()
    for size in sizes:
        tokens += rng.integers(0, 50_000, size).tolist()
        got = arr.sync(tokens)
        assert got.dtype == np.int64 and got.tolist() == tokens
    other = [7, 8, 9]
    assert arr.sync(other).tolist() == other
    assert arr.sync(other + tokens).tolist() == other + tokens


# ------------------------------------------------------- verification of a step's logits
def _target_distribution(logits: list[float], context: list[int], temperature: float, top_k: int,
                         repetition_penalty: float = 1.0) -> torch.Tensor:
    """What a sampled row draws from, from the definitions: HF's repetition penalty over the
    context (positive logits divided, others multiplied), temperature, the ``top_k`` largest
    kept, softmax."""
    z = list(logits)
    for t in set(context):
        z[t] = z[t] / repetition_penalty if z[t] > 0 else z[t] * repetition_penalty
    z = [v / temperature for v in z]
    kth = sorted(z, reverse=True)[top_k - 1]
    w = [float(np.exp(v)) if v >= kth else 0.0 for v in z]
    return torch.tensor([v / sum(w) for v in w])


def _scheduled(prompt: list[int], params: SamplingParams, draft: list[int] | None, rid: str) -> ScheduledSeq:
    seq = Sequence(request_id=rid, prompt_token_ids=prompt, params=params)
    return ScheduledSeq(seq, 1 + len(draft or ()), samples=True, draft=draft)


def test_verify_step_samples_each_position_from_the_target_with_the_drafts_in_context() -> None:
    """A step of plain rows, a greedy verify row and many sampled verify rows with
    repetition penalties, through ``SpeculativeDecoder.launch`` and ``PendingVerify.wait``
    as the engine calls them. The plain rows' logits come back in order for the ordinary
    sampler; the greedy row keeps its drafts exactly while they are the argmax; each
    sampled position is distributed as the target's distribution with the drafts before it
    in the penalty context (position 1 sees draft 0, position 2 both); the counters add up
    what was proposed and kept, over two steps."""
    vocab, n = 6, 3000
    prompt, draft = [0, 1], [2, 3]
    rows = [[0.5, 0.2, 1.8, 0.0, -1.0, 0.3],  # at draft 0 (token 2 likely, never certain)
            [0.2, 0.1, 0.3, 1.6, 1.2, -0.5],  # at draft 1: token 3 is penalized once draft 1 is in context
            [1.0, -0.3, 0.9, 1.1, 0.8, 0.0]]  # the bonus position: tokens 2 and 3 are in context
    sampled_params = SamplingParams(temperature=0.8, top_k=4, repetition_penalty=2.0, max_tokens=8)
    sampled = [_scheduled(prompt, sampled_params, list(draft), f"s{i}") for i in range(n)]
    greedy = _scheduled([5], SamplingParams(max_tokens=8), [4, 4], "g")  # argmax 4, then 1: keeps one
    greedy_rows = [[0, 0, 0, 0, 9, 0], [0, 9, 0, 0, 8, 0], [9, 0, 0, 0, 0, 0]]
    plain = [_scheduled([1], SamplingParams(max_tokens=8), None, f"p{i}") for i in range(2)]
    plain_rows = [[0, 0, 0, 7, 0, 0], [0, 0, 0, 0, 0, 7]]
    step = [plain[0], greedy] + sampled[:n // 2] + [plain[1]] + sampled[n // 2:]
    by_row = {id(plain[0]): [plain_rows[0]], id(plain[1]): [plain_rows[1]], id(greedy): greedy_rows}
    logits = torch.tensor([r for s in step for r in by_row.get(id(s), rows)], dtype=torch.float32)

    sampler = Sampler(torch.device("cpu"), seed=3)
    decoder = SpeculativeDecoder(sampler, ngram=NgramProposer(1, 2))
    plain_logits, pending = decoder.launch(logits, step)
    assert plain_logits.tolist() == plain_rows
    pending.plain = sampler.launch(plain_logits, [s.seq for s in plain])
    out = pending.wait()
    assert out.token_ids[:2] == [3, 5]  # the plain rows' argmax, first
    assert out.token_ids[2] == [4, 1]
    verified = out.token_ids[3:]
    assert len(verified) == n and out.logprobs == [None] * (n + 3)
    for pos in range(3):
        tokens = torch.tensor([o[pos] for o in verified if len(o) > pos])
        assert tokens.numel() > 500, f"position {pos}: too few samples to judge"
        p = _target_distribution(rows[pos], prompt + draft[:pos], 0.8, 4, 2.0)
        assert _tv(tokens, p) < _tv_bound(tokens.numel(), vocab), f"position {pos}"
    assert pending.accepted == [1] + [len(o) - 1 for o in verified]
    accepted = 1 + sum(len(o) - 1 for o in verified)
    assert (decoder.counters.num_drafts, decoder.counters.num_draft_tokens,
            decoder.counters.num_accepted_tokens) == (n + 1, 2 * (n + 1), accepted)

    # An all-greedy step verifies on the host; the counters keep adding up.
    again = [plain[0], _scheduled([5], SamplingParams(max_tokens=8), [4, 1, 2], "g2")]
    logits = torch.tensor([plain_rows[0]] + greedy_rows[:2] + [[0, 0, 3, 0, 0, 0], [0, 0, 0, 0, 0, 1]],
                          dtype=torch.float32)
    plain_logits, pending = decoder.launch(logits, again)
    assert plain_logits.tolist() == [plain_rows[0]]
    pending.plain = sampler.launch(plain_logits, [plain[0].seq])
    assert pending.wait().token_ids == [3, [4, 1, 2, 5]]
    assert (decoder.counters.num_drafts, decoder.counters.num_draft_tokens,
            decoder.counters.num_accepted_tokens) == (n + 2, 2 * (n + 1) + 3, accepted + 3)


def test_every_row_verifying_needs_no_plain_rows() -> None:
    sampler = Sampler(torch.device("cpu"))
    decoder = SpeculativeDecoder(sampler, ngram=NgramProposer(1, 2))
    step = [_scheduled([1], SamplingParams(max_tokens=4), [2], "a"), _scheduled([1], SamplingParams(max_tokens=4), [0], "b")]
    logits = torch.eye(4)[[2, 3, 1, 0]]
    plain_logits, pending = decoder.launch(logits, step)
    assert plain_logits.shape == (0, 4)
    assert pending.wait().token_ids == [[2, 3], [1]]


def test_a_seeded_request_verifies_the_same_whatever_shares_its_step() -> None:
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=4)
    logits = torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 4)

    def verify(others: int) -> list[int]:
        step = [_scheduled([1], SamplingParams(temperature=1.0, max_tokens=4), [2, 3], f"o{i}") for i in range(others)]
        step.append(_scheduled([1], params, [2, 3], "seeded"))
        decoder = SpeculativeDecoder(Sampler(torch.device("cpu"), seed=others), ngram=NgramProposer(1, 2))
        _, pending = decoder.launch(torch.cat([logits[:3]] * len(step)), step)
        return pending.wait().token_ids[-1]

    alone = verify(0)
    assert all(verify(others) == alone for others in (1, 3))


def test_verify_applies_penalties_in_float32_to_half_precision_logits() -> None:
    """Half-precision logits (a model's dtype) are penalized in float32, as the sampler does:
    1.0009765625 / 1.001 = 0.99997 falls below the unpenalized 1.0 (in float16 it rounds
    to 1.0, a tie that argmax gives to the penalized token 0)."""
    decoder = SpeculativeDecoder(Sampler(torch.device("cpu")), ngram=NgramProposer(1, 2))
    step = [_scheduled([0], SamplingParams(repetition_penalty=1.001, max_tokens=4), [1], "r")]
    logits = torch.tensor([[1.0009765625, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float16)
    assert decoder.launch(logits, step)[1].wait().token_ids == [[1, 3]]


@pytest.mark.parametrize("with_seeded_row", [False, True])
def test_unseeded_requests_verify_from_the_samplers_own_generator(with_seeded_row: bool) -> None:
    """Unseeded rows draw from the sampler's generator (the engine's ``seed``), alone or
    next to a seeded request: the same sampler seed gives the same tokens whatever the
    process-wide torch RNG did in between, another seed other tokens."""
    logits = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.3, 0.3, 0.2, 0.2]] * 40)

    def verify(seed: int) -> list:
        step = [_scheduled([1], SamplingParams(temperature=1.0, max_tokens=4), [2, 3], f"u{i}") for i in range(40)]
        if with_seeded_row:
            step[7] = _scheduled([1], SamplingParams(temperature=1.0, seed=1, max_tokens=4), [2, 3], "seeded")
        torch.rand(7)  # moves the process-wide generator
        decoder = SpeculativeDecoder(Sampler(torch.device("cpu"), seed=seed), ngram=NgramProposer(1, 2))
        return decoder.launch(logits, step)[1].wait().token_ids

    assert verify(3) == verify(3) != verify(4)


def test_draft_tokens_are_drawn_from_the_request_distribution_and_reported_with_it() -> None:
    """The draft model's token choice per row (``DraftModelProposer._sample``, the step after
    its forward): a greedy row takes the argmax and reports a one-hot ``q``; sampled rows
    report ``q`` = the temperature/top-k distribution of their logits and draw from it.
    20k draws: drawing ``argmax(q * noise)`` instead of ``argmax(q / noise)`` is off by a
    total variation of 0.037 here, twice the bound."""
    vocab, n = 4, 20_000
    row = [1.5, 1.2, 0.9, 0.0]
    seqs = [Sequence(request_id="g", prompt_token_ids=[1], params=SamplingParams())]
    seqs += [Sequence(request_id=f"s{i}", prompt_token_ids=[1], params=SamplingParams(temperature=0.5, top_k=3))
             for i in range(n)]
    logits = torch.tensor([[0.0, 0.0, 2.0, 1.0]] + [row] * n, dtype=torch.float16)  # cast like a model's
    proposer = DraftModelProposer(None, Sampler(torch.device("cpu"), seed=5))  # type: ignore[arg-type]
    tokens, q = proposer._sample(logits, seqs)
    assert tokens[0] == 2 and q is not None and q[0].tolist() == [0, 0, 1, 0]
    # The reference reads the float16 logits as they are; 1e-6 covers float32 vs float64 softmax rounding.
    expected = _target_distribution([float(x) for x in logits[1]], [], 0.5, 3)
    torch.testing.assert_close(q[1:], expected.float().expand(n, vocab), rtol=0, atol=1e-6)
    assert _tv(torch.tensor(tokens[1:]), expected) < _tv_bound(n, vocab)


def test_draft_block_bytes_is_one_block_of_the_draft_model_kv_cache() -> None:
    """Bytes per block of ``block_size`` tokens, K and V over every layer, as the model's own
    cache holds them after a forward of that many tokens (head_dim set apart from
    hidden_size / heads, grouped KV heads, float16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24)
    model = LlamaForCausalLM(cfg).to(torch.float16)
    block_size = 8
    with torch.no_grad():
        out = model(torch.arange(block_size)[None], use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    assert draft_block_bytes(model, block_size) == sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


# ---------------------------------------------------------------------------------- engine
CODE = '''def merge(intervals):
    intervals = sorted(intervals, key=lambda pair: pair[0])
    merged = []
    for start, end in intervals:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged
'''
PROMPTS = [
    "# Original:\n" + CODE + "\n# The same function, with a docstring:\n" + CODE[:60],
    "import os\nimport sys\nimport os\nimport sys\nimport",
    "def fibonacci(n):",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n\n    def pop(self):",
]


def _engine(**overrides) -> LLMEngine:
    return LLMEngine(config=EngineConfig(num_kv_blocks=128, **overrides))


@pytest.fixture(scope="module")
def plain() -> LLMEngine:
    return _engine()


def _generate(engine: LLMEngine, params: SamplingParams) -> list[list[int]]:
    return [out.token_ids for out in engine.generate(PROMPTS, params)]


def _acceptance(engine: LLMEngine) -> float:
    s = engine.stats()
    assert s.spec_decode_num_drafts_total > 0
    return s.spec_decode_num_accepted_tokens_total / s.spec_decode_num_draft_tokens_total


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=40, ignore_eos=True),
    SamplingParams(max_tokens=40, repetition_penalty=1.2, frequency_penalty=1.0, presence_penalty=1.0),
], ids=["greedy", "greedy-with-penalties"])
def test_ngram_greedy_equals_plain_greedy_and_returns_every_block(plain: LLMEngine, params: SamplingParams) -> None:
    expected = _generate(plain, params)
    spec = _engine(speculative_method="ngram", num_speculative_tokens=4, prompt_lookup_min=1, prompt_lookup_max=3)
    assert _generate(spec, params) == expected
    assert 0.0 < _acceptance(spec) < 1.0  # drafts were both kept and rolled back
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks
    spec.block_manager.check_invariants([])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_pipelined_speculation_equals_plain_greedy_with_stop_strings(plain: LLMEngine, method: str) -> None:
    """Pipelined steps (the default on CUDA) launch the next step before this one's text is
    processed: a sequence that ends on a stop string then still has a verify row in the
    running step, whose tokens must be dropped and whose blocks must come back."""
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    texts = [o.text for o in plain.generate(PROMPTS, params)]
    stops = [t[len(t) // 2:len(t) // 2 + 3] for t in texts]  # stop strings met mid-output
    stopped = [SamplingParams(max_tokens=40, ignore_eos=True, stop=[s]) for s in stops]
    expected = [(o.text, o.token_ids) for o in plain.generate(PROMPTS, stopped)]
    extra = {"speculative_draft_model": str(default_model_dir())} if method == "draft" else {}
    spec = _engine(speculative_method=method, num_speculative_tokens=4, pipeline_steps=True, **extra)
    assert spec.pipeline
    assert [(o.text, o.token_ids) for o in spec.generate(PROMPTS, stopped)] == expected
    assert [o.token_ids for o in spec.generate(PROMPTS, params)] == [o.token_ids for o in plain.generate(PROMPTS, params)]
    assert spec.stats().spec_decode_num_accepted_tokens_total > 0
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks
    spec.block_manager.check_invariants([])


def test_ngram_under_preemption_and_abort_keeps_the_books(plain: LLMEngine) -> None:
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    expected = _generate(plain, params)
    # 20 blocks of 16 tokens cannot hold the four sequences at once: speculation meets preemption.
    spec = LLMEngine(config=EngineConfig(num_kv_blocks=20, speculative_method="ngram", num_speculative_tokens=6))
    assert _generate(spec, params) == expected
    assert spec.stats().preemptions_total > 0
    rid = spec.add_request(PROMPTS[0], params)
    for _ in range(4):
        spec.step()
    spec.abort(rid)
    spec.step()
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks
    spec.block_manager.check_invariants([])


def test_rejected_drafts_give_their_blocks_back_every_step() -> None:
    spec = _engine(speculative_method="ngram", num_speculative_tokens=16, block_size=4)
    for prompt in PROMPTS:
        spec.add_request(prompt, SamplingParams(max_tokens=40, ignore_eos=True))
    bm, steps = spec.block_manager, 0
    while spec.has_unfinished_requests():
        spec.step()
        steps += 1
        for seq in spec.scheduler.running:  # a table holds the computed slots and no more
            assert len(seq.block_table) == -(-seq.num_kv_slots // bm.block_size), seq.request_id
        bm.check_invariants(spec.scheduler.running)
    assert steps < 40  # drafts were accepted: fewer steps than tokens
    assert bm.num_free_blocks == bm.num_blocks


def test_parallel_choices_speculate_after_the_fork(plain: LLMEngine) -> None:
    params = SamplingParams(max_tokens=30, n=3, ignore_eos=True)
    spec = _engine(speculative_method="ngram", num_speculative_tokens=4)
    got = [o.token_ids for o in spec.generate(PROMPTS[:2], params)]
    assert got == [o.token_ids for o in plain.generate(PROMPTS[:2], params)]
    assert spec.stats().spec_decode_num_drafts_total > 0
    sampled = spec.generate(PROMPTS[0], SamplingParams(max_tokens=12, n=3, temperature=1.0, seed=2, ignore_eos=True))
    assert [len(o.token_ids) for o in sampled] == [12, 12, 12]
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks


def test_sampled_speculation_is_seeded_and_structured_output_falls_back() -> None:
    spec = _engine(speculative_method="ngram", num_speculative_tokens=4)
    params = SamplingParams(max_tokens=24, temperature=0.7, top_k=20, seed=11, ignore_eos=True)
    first, again = _generate(spec, params), _generate(spec, params)
    assert first == again and all(len(t) == 24 for t in first)
    assert spec.speculates(params)
    assert not spec.speculates(SamplingParams(logprobs=2))
    from stream_attention.engine.types import StructuredOutputsParams

    assert not spec.speculates(SamplingParams(structured_outputs=StructuredOutputsParams(regex="[ab]+")))


def _tiny_draft(path, vocab: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def test_draft_model_greedy_equals_plain_greedy(plain: LLMEngine) -> None:
    from stream_attention.models import default_model_dir

    # The target as its own draft, with penalties only the target applies: the drafts are
    # often but not always right.
    params = SamplingParams(max_tokens=32, repetition_penalty=1.3)
    spec = _engine(speculative_method="draft", speculative_draft_model=str(default_model_dir()),
                   num_speculative_tokens=3)
    assert _generate(spec, params) == _generate(plain, params)
    assert 0.0 < _acceptance(spec) < 1.0
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks


@pytest.mark.slow
def test_random_draft_model_still_gives_plain_greedy_output(plain: LLMEngine, tmp_path) -> None:
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    spec = _engine(speculative_method="draft", speculative_draft_model=_tiny_draft(tmp_path, 4096),
                   num_speculative_tokens=2)
    assert _generate(spec, params) == _generate(plain, params)
    # Sampled requests through a draft distribution far from the target's.
    sampled = _generate(spec, SamplingParams(max_tokens=16, temperature=1.0, seed=5, ignore_eos=True))
    assert all(len(t) == 16 for t in sampled)


def test_config_validation(tmp_path) -> None:
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(speculative_method="ngram", num_speculative_tokens=17).validate()
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(speculative_method="ngram", num_speculative_tokens=0).validate()
    with pytest.raises(ValueError, match="speculative_draft_model"):
        EngineConfig(speculative_method="draft").validate()
    with pytest.raises(ValueError, match="speculative_method"):
        EngineConfig(speculative_method="eagle").validate()
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        EngineConfig(speculative_method="ngram", prompt_lookup_min=5, prompt_lookup_max=2).validate()
    with pytest.raises(ValueError, match="4000.*4096"):
        _engine(speculative_method="draft", speculative_draft_model=_tiny_draft(tmp_path, 4000))


# ---------------------------------------------------------------------------------- server
def test_server_flags_and_metrics(request: pytest.FixtureRequest) -> None:
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from stream_attention.server import create_app
    from stream_attention.server.engine_bridge import engine_config
    from stream_attention.server.settings import settings_from_args
    from tests.test_server import LiveServer, shared_server, wait_idle

    settings = settings_from_args(["--speculative", "ngram", "--num-speculative-tokens", "5",
                                   "--prompt-lookup-max", "3", "--log-level", "warning"])
    cfg = engine_config(settings)
    assert (cfg.speculative_method, cfg.num_speculative_tokens, cfg.prompt_lookup_max) == ("ngram", 5, 3)
    draft = settings_from_args(["--speculative", "draft", "--draft-model", "/models/small"])
    assert (draft.speculative_method, draft.speculative_draft_model) == ("draft", "/models/small")
    with pytest.raises(SystemExit):
        settings_from_args(["--speculative", "medusa"])

    plain = shared_server("main", request.config)  # loaded first: two models loading at once race in transformers' lazy imports
    srv = LiveServer(create_app(settings))
    try:
        srv.wait_ready()
        kw = dict(prompt=PROMPTS[0], max_tokens=24, temperature=0.0)
        got = [openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0).completions.create(
            model=s.state.model_name, **kw).choices[0].text for s in (srv, plain)]
        assert got[0] == got[1]
        wait_idle(srv.engine)
        text = __import__("httpx").get(srv.url + "/metrics").text
        values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                  if line.startswith("stream_attention_spec_decode")}
        drafts = values["stream_attention_spec_decode_num_drafts_total"]
        proposed = values["stream_attention_spec_decode_num_draft_tokens_total"]
        accepted = values["stream_attention_spec_decode_num_accepted_tokens_total"]
        assert drafts > 0 and 0 < accepted <= proposed <= 5 * drafts
    finally:
        srv.stop()


def test_ngram_proposal_uses_numpy_input_too() -> None:
    assert NgramProposer(1, 2).propose(np.array([3, 4, 3]), 4) == [4, 3]


def test_verify_graph_inputs_give_the_eager_step_logits() -> None:
    """What a verify-step CUDA graph computes (the fixed, padded inputs of ``VerifyStaging``,
    run eagerly: ``run_verify_static``) must equal the eager verify step's logits, for every
    verify step of a real speculative generation: rows with full, short and no drafts,
    padded batches. fp32 on CPU; the tolerance covers the two attention calls' different
    shapes (the padded queries change SDPA's blocking, not the math)."""
    spec = _engine(speculative_method="ngram", num_speculative_tokens=4, block_size=8)
    runner = spec.runner
    runner._alloc_verify_inputs([1, 2, 4, 8])
    eager_execute = runner.execute
    checked: list[tuple[int, int]] = []

    def execute(scheduled, fed=None):
        logits, collector = eager_execute(scheduled, fed)
        if any(s.draft for s in scheduled) and runner._verify_fits(scheduled):
            static = runner.run_verify_static(scheduled)
            assert static.shape == logits.shape
            torch.testing.assert_close(static, logits, rtol=1e-4, atol=1e-4)
            checked.append((len(scheduled), sum(len(s.draft or ()) for s in scheduled)))
        return logits, collector

    runner.execute = execute
    spec.generate(PROMPTS[:3], SamplingParams(max_tokens=30, ignore_eos=True))
    assert len(checked) > 5
    assert {n for n, _ in checked} >= {3}  # batches padded to the 4-row layout
    assert any(d < 4 * n for n, d in checked)  # rows with short or no drafts were padded


def test_verify_staging_lays_out_rows_as_the_eager_step_does() -> None:
    """Real positions carry the eager step's ids, positions and slots; padding writes to
    the scratch slot and reads block 0 (table entries past a sequence's blocks are zeroed,
    whatever an earlier layout left there); kept logits rows skip the padding."""
    from types import SimpleNamespace as NS

    import numpy as np

    from stream_attention.engine.model_runner import VerifyStaging

    bs, mb, k, scratch = 4, 6, 3, 999
    q = 1 + k
    s64 = np.full(3 * 4 * q, -7, dtype=np.int64)
    s32 = np.full(4 + 4 * mb, 5000, dtype=np.int32)  # stale values: not valid block ids
    staging = VerifyStaging(s64, s32, bs, mb, scratch, k)

    def row(computed: int, table: list[int], draft: list[int] | None, first: int) -> NS:
        seq = NS(num_computed_tokens=computed, num_kv_slots=computed, block_table=table,
                 token_ids=list(range(first, first + computed + 1)))
        return NS(seq=seq, draft=draft, samples=True, num_new_tokens=1 + len(draft or ()))

    rows = [row(6, [10, 11, 12], [70, 71, 72], 100), row(3, [20, 21], [80], 200), row(9, [30, 31, 32], None, 300)]
    keep = staging.fill(rows, 4)
    t = 4 * q
    ids, pos, slots = s64[:t].reshape(4, q), s64[t:2 * t].reshape(4, q), s64[2 * t:].reshape(4, q)
    lens, tables = s32[:4], s32[4:].reshape(4, mb)
    assert ids.tolist() == [[106, 70, 71, 72], [203, 80, 0, 0], [309, 0, 0, 0], [0, 0, 0, 0]]
    assert pos.tolist() == [[6, 7, 8, 9], [3, 4, 5, 6], [9, 10, 11, 12], [0, 1, 2, 3]]
    # slot = block * 4 + offset at the real positions (row 0: 6..9 in blocks 11, 11, 12, 12)
    assert slots.tolist() == [[46, 47, 48, 49], [83, 84, scratch, scratch], [129, scratch, scratch, scratch],
                              [scratch] * 4]
    assert lens.tolist() == [6 + q, 3 + q, 9 + q, q]
    assert tables[0, :3].tolist() == [10, 11, 12]
    assert tables[1, :2].tolist() == [20, 21]
    assert tables[2, :4].tolist() == [30, 31, 32, 0]  # padding at position 12 reads past the blocks: zeroed
    assert tables[3, 0] == 0
    assert keep.tolist() == [0, 1, 2, 3, 4, 5, 8]


@pytest.mark.gpu
def test_verify_graphs_on_gpu_give_plain_greedy_output() -> None:
    """On a GPU, verify steps replay CUDA graphs (captured, and checked against the eager
    step at start-up); in fp32 greedy speculation must still give plain decoding's tokens."""
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain = LLMEngine(config=EngineConfig(device="cuda", dtype="float32", num_kv_blocks=128))
    expected = [o.token_ids for o in plain.generate(PROMPTS, params)]
    del plain
    spec = LLMEngine(config=EngineConfig(device="cuda", dtype="float32", num_kv_blocks=128,
                                         speculative_method="ngram", num_speculative_tokens=4))
    assert spec.runner.verify_graphs, "verify graphs were not captured"
    replays = []
    run = spec.runner._run_verify_graph
    spec.runner._run_verify_graph = lambda scheduled: replays.append(len(scheduled)) or run(scheduled)
    assert [o.token_ids for o in spec.generate(PROMPTS, params)] == expected
    assert replays, "no verify step replayed a graph"
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks


def test_speculation_pauses_above_disable_by_batch_size(plain: LLMEngine) -> None:
    spec = _engine(speculative_method="ngram", num_speculative_tokens=4, speculative_disable_by_batch_size=1)
    seen: list[tuple[int, bool]] = []
    schedule = spec.scheduler.schedule

    def recording():
        running = len(spec.scheduler.running)
        out = schedule()
        seen.append((running, any(s.num_lookahead for s in out.scheduled)))
        return out

    spec.scheduler.schedule = recording
    params = [SamplingParams(max_tokens=8, ignore_eos=True), SamplingParams(max_tokens=40, ignore_eos=True)]
    got = [spec.generate([PROMPTS[0]], params[1])[0].token_ids]  # alone: speculates
    assert any(drafted for _, drafted in seen)
    seen.clear()
    ids = [spec.add_request(PROMPTS[i], p) for i, p in enumerate(params)]
    outs = {}
    while spec.has_unfinished_requests():
        for o in spec.step():
            if o.finished:
                outs[o.request_id] = o.token_ids
    assert not any(drafted for running, drafted in seen if running > 1)  # two running: no drafts
    assert any(drafted for running, drafted in seen if running == 1)  # the longer one alone: drafts again
    assert got == [o.token_ids for o in plain.generate([PROMPTS[0]], params[1])]
    assert [outs[i] for i in ids] == [o.token_ids for o in plain.generate(PROMPTS[:2], params)]


def test_a_failing_verify_graph_falls_back_to_eager_steps(plain: LLMEngine, caplog) -> None:
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    spec = _engine(speculative_method="ngram", num_speculative_tokens=4)
    runner = spec.runner
    runner._alloc_verify_inputs([1, 2, 4, 8])
    runner.verify_graphs = {b: None for b in (1, 2, 4, 8)}  # stands for captured graphs (CPU has none)
    calls = []

    def broken(scheduled):
        calls.append(len(scheduled))
        raise IndexError("staging bug")

    runner._run_verify_graph = broken
    with caplog.at_level("ERROR", logger="stream_attention"):
        got = [o.token_ids for o in spec.generate(PROMPTS, params)]
    assert got == [o.token_ids for o in plain.generate(PROMPTS, params)]
    assert len(calls) == 1 and not runner.verify_graphs  # tried once, then eager for good
    assert "verify-step graph failed" in caplog.text


def test_sampled_drafts_from_the_target_itself_are_all_but_always_accepted() -> None:
    """The target as its own draft model, sampled at temperature 1 without penalties: the
    draft distribution q is the target's p (up to the rounding of two batch shapes), so
    a draft is kept with probability min(1, p/q) ~ 1. A q row read for the wrong position
    or token, or a test of u against the wrong ratio, shows as rejections."""
    from stream_attention.models import default_model_dir

    spec = _engine(speculative_method="draft", speculative_draft_model=str(default_model_dir()),
                   num_speculative_tokens=3)
    params = SamplingParams(max_tokens=32, temperature=1.0, top_k=50, seed=11, ignore_eos=True)
    outs = spec.generate(PROMPTS, params)
    assert [len(o.token_ids) for o in outs] == [32] * len(PROMPTS)
    s = spec.stats()
    assert s.spec_decode_num_draft_tokens_total > 50
    # Not ~1.0: the draft's decode steps and the target's verify step round differently, and
    # at top_k=50 a token near the cut can be in q's top 50 but not p's (rejected outright).
    # Over other seeds acceptance measured 0.92-0.97; verifying against a one-hot q instead
    # of the draft's distribution gives 0.36.
    assert _acceptance(spec) > 0.8
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks


def test_greedy_and_sampled_requests_share_draft_model_steps(plain: LLMEngine) -> None:
    """Greedy and sampled requests in the same draft-model steps, ending at different
    lengths (so near the end rows draft different counts): greedy outputs equal plain
    greedy decoding, and the sampled rows are verified against their own q (not a one-hot
    q, as for greedy rows). Acceptance measured 0.956 (rounding between the draft's and the
    target's batch shapes rejects a draft now and then when u is close to 1); treating the
    sampled rows' q as one-hot gave 0.72. Each row drafts exactly its slots: a draft past
    them would write K/V the scheduler did not reserve."""
    from stream_attention.models import default_model_dir

    spec = _engine(speculative_method="draft", speculative_draft_model=str(default_model_dir()),
                   num_speculative_tokens=3)
    steps: list[list[tuple[int, int]]] = []  # per step, each drafting row's (slots, drafts)
    propose = spec.spec.propose

    def recording(scheduled):
        propose(scheduled)
        steps.append([(s.num_lookahead, len(s.draft or ())) for s in scheduled if s.num_lookahead])

    spec.spec.propose = recording
    greedy = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (29, 31)]
    params = [SamplingParams(max_tokens=32, temperature=1.0, top_k=50, seed=11, ignore_eos=True), greedy[0],
              SamplingParams(max_tokens=30, temperature=1.0, top_k=50, seed=12, ignore_eos=True), greedy[1]]
    outs = spec.generate(PROMPTS, params)
    assert [len(o.token_ids) for o in outs] == [32, 29, 30, 31]
    assert [outs[1].token_ids, outs[3].token_ids] == [o.token_ids for o in plain.generate(PROMPTS[1::2], greedy)]
    assert _acceptance(spec) > 0.85
    assert all(slots == drafted for step in steps for slots, drafted in step)  # a draft fills its slots, no more
    assert any(len({slots for slots, _ in step}) > 1 for step in steps)  # rows with different slot counts met
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks


@pytest.mark.slow
def test_verify_graph_inputs_with_split_k_attention_give_the_eager_step_logits(monkeypatch) -> None:
    """On a GPU the verify graphs split each row's keys across programs (``_verify_splits``;
    one split on CPU). Forced to three splits through the Triton kernels under the
    interpreter, the graph's inputs must still give the eager step's logits (fp32; the
    tolerance covers the split-K merge's different summation order)."""
    spec = _engine(speculative_method="ngram", num_speculative_tokens=3, block_size=8, attention_backend="triton")
    runner = spec.runner
    runner._verify_splits = lambda b: 3
    runner._alloc_verify_inputs([1, 2, 4])
    eager_execute = runner.execute
    checked: list[int] = []

    def execute(scheduled, fed=None):
        logits, collector = eager_execute(scheduled, fed)
        if any(s.draft for s in scheduled) and runner._verify_fits(scheduled):
            static = runner.run_verify_static(scheduled)
            torch.testing.assert_close(static, logits, rtol=1e-4, atol=1e-4)
            checked.append(len(scheduled))
        return logits, collector

    from stream_attention.engine import attention as attn_hook

    splits_seen: list[int] = []
    kernel = attn_hook.paged_attention

    def recording(*args, **kwargs):
        splits_seen.append(kwargs.get("num_splits", 1))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(attn_hook, "paged_attention", recording)
    runner.execute = execute
    spec.generate([p[:40] for p in PROMPTS[:2]], SamplingParams(max_tokens=10, ignore_eos=True))
    assert len(checked) >= 2
    assert 3 in splits_seen  # the graph-input path really ran split-K attention
