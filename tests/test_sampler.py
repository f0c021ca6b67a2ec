"""Sampling, penalties, seeds, logprobs, and the text side: detokenization and stop strings."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from stream_attention.engine.sampler import Sampler, apply_penalties, filter_logits
from stream_attention.engine.sequence import Sequence
from stream_attention.engine.tokenizer import (
    IncrementalDetokenizer,
    build_byte_tokenizer,
    find_stop,
    stop_holdback,
)
from stream_attention.engine.types import SamplingParams

VOCAB = 32


def _seq(params: SamplingParams, prompt=(1, 2, 3), out=()) -> Sequence:
    s = Sequence(request_id="x", prompt_token_ids=list(prompt), params=params)
    s.token_ids.extend(out)
    return s


def test_greedy_and_top_k_one_are_argmax():
    logits = torch.randn(3, VOCAB)
    sampler = Sampler(torch.device("cpu"))
    seqs = [_seq(SamplingParams()), _seq(SamplingParams(temperature=1.5, top_k=1)),
            _seq(SamplingParams(temperature=0.7, top_p=1e-6))]
    out = sampler(logits, seqs)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_filters_keep_the_right_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: torch.isfinite(filter_logits(logits.clone(), [p])).squeeze(0).tolist()
    assert kept(SamplingParams(temperature=1.0, top_k=2)) == [True, True, False, False]
    assert kept(SamplingParams(temperature=1.0, top_p=0.7)) == [True, True, False, False]
    assert kept(SamplingParams(temperature=1.0, top_p=0.81)) == [True, True, True, False]
    assert kept(SamplingParams(temperature=1.0, min_p=0.2)) == [True, True, True, False]


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    rep = apply_penalties(logits.clone(), [_seq(SamplingParams(repetition_penalty=2.0), prompt=[0], out=[1])])
    assert rep.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    pf = apply_penalties(logits.clone(), [_seq(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
                                                 prompt=[3], out=[2, 2, 0])])
    # Prompt tokens are not penalised by presence/frequency (OpenAI semantics).
    assert pf.tolist() == [[2.0 - 0.75, -2.0, 1.0 - 1.0, 0.5]]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = torch.log(probs).expand(4000, 4).clone()
    sampler = Sampler(torch.device("cpu"), seed=3)
    seqs = [_seq(SamplingParams(temperature=1.0)) for _ in range(4000)]
    ids = torch.tensor(sampler(logits, seqs).token_ids)
    freq = torch.bincount(ids, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03) and freq[3] == 0


def test_seeded_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    steps = [torch.randn(5, VOCAB) for _ in range(6)]
    params = SamplingParams(temperature=1.0, seed=42)

    def run(row: int, batch_seeds: list[int | None]) -> list[int]:
        sampler = Sampler(torch.device("cpu"), seed=7)
        mine = _seq(params)
        others = [_seq(SamplingParams(temperature=1.0, seed=s)) for s in batch_seeds]
        seqs = others[:row] + [mine] + others[row:]
        got = []
        for logits in steps:
            # The same logits row for our request wherever it sits in the batch.
            batch = torch.randn(len(seqs), VOCAB)
            batch[row] = logits[0]
            got.append(sampler(batch, seqs).token_ids[row])
        return got

    alone = run(0, [])
    assert run(2, [None, 5, None, 9]) == alone
    assert run(1, [1]) == alone
    other = Sampler(torch.device("cpu"))
    assert [other(s[:1], [_seq(SamplingParams(temperature=1.0, seed=43))]).token_ids[0] for s in steps] != alone


def test_logprobs_of_the_raw_distribution():
    logits = torch.randn(2, VOCAB)
    sampler = Sampler(torch.device("cpu"))
    out = sampler(logits, [_seq(SamplingParams(logprobs=3)), _seq(SamplingParams())])
    lp = out.logprobs[0]
    ref = torch.log_softmax(logits[0], -1)
    assert lp.token_id == out.token_ids[0] and math.isclose(lp.logprob, ref.max().item(), rel_tol=1e-5)
    assert list(lp.top) == ref.topk(3).indices.tolist()
    assert out.logprobs[1] is None


def test_incremental_detokenizer_across_multibyte_characters():
    tok = build_byte_tokenizer()
    text = "naïve 日本語 🎉 end"
    ids = tok.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, tok.encode("prompt:", add_special_tokens=False))
    deltas = [det.step([i]) for i in ids]
    assert "".join(deltas) + det.flush() == text
    assert all("\ufffd" not in d for d in deltas)
    # A character split over tokens appears whole, on the token that completes it.
    first_cjk = ids.index(tok.encode("日", add_special_tokens=False)[0])
    assert deltas[first_cjk] == "" and deltas[first_cjk + 2] == "日"


def test_incremental_detokenizer_on_a_bpe_tokenizer():
    from stream_attention.models.default import load_tokenizer

    tok = load_tokenizer()
    text = "Hello there, général Kenobi! ünïcödé ✓"
    ids = tok.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [])
    assert "".join(det.step([i]) for i in ids) + det.flush() == tok.decode(ids)


@pytest.mark.parametrize(
    ("text", "stops", "held"),
    [("hello wor", ["world"], 3), ("hello", ["lo!"], 2), ("abc", ["x"], 0), ("ab", ["abc", "b"], 2),
     ("x\n\nUs", ["\n\nUser:", "<|im_end|>"], 4), ("abab", ["abac"], 2), ("aab", ["aabx", "abz"], 3),
     ("", ["a"], 0), ("a", ["", "a"], 0)],
)
def test_stop_holdback(text, stops, held):
    assert stop_holdback(text, stops) == held


def test_find_stop_earliest():
    assert find_stop("one two three", ["three", "two"], 0) == (4, "two")
    assert find_stop("one two", ["one"], 5) is None
    assert find_stop("one two", ["e t"], 3) == (2, "e t")


def test_penalties_on_many_rows_equal_one_row_at_a_time():
    g = torch.Generator().manual_seed(0)
    seqs = [_seq(SamplingParams(repetition_penalty=r, presence_penalty=p, frequency_penalty=f),
                 prompt=torch.randint(0, VOCAB + 4, (7,), generator=g).tolist(),  # ids >= VOCAB are ignored
                 out=torch.randint(0, VOCAB, (9,), generator=g).tolist())
            for r, p, f in [(1.3, 0.0, 0.0), (1.0, 0.0, 0.0), (1.0, 0.4, -0.2), (0.7, -0.5, 0.3)]]
    logits = torch.randn(len(seqs), VOCAB, generator=g)
    batch = apply_penalties(logits.clone(), seqs)
    rows = torch.stack([apply_penalties(logits[i:i + 1].clone(), [s])[0] for i, s in enumerate(seqs)])
    assert torch.equal(batch, rows) and torch.equal(batch[1], logits[1]) and not torch.equal(batch[0], logits[0])


def test_launch_then_wait_is_the_call():
    logits = torch.randn(4, VOCAB)
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=5, logprobs=2),
              SamplingParams(temperature=1.2, top_k=4), SamplingParams(logprobs=0)]
    a = Sampler(torch.device("cpu"), seed=3)(logits, [_seq(p) for p in params])
    pending = Sampler(torch.device("cpu"), seed=3).launch(logits, [_seq(p) for p in params])
    assert pending.token_ids.shape == (4,)
    b = pending.wait()
    assert a == b and all(isinstance(t, int) for t in b.token_ids)
    assert b.logprobs[1].token_id == b.token_ids[1] and len(b.logprobs[1].top) == 2 and b.logprobs[3].top is None


def test_fast_decoder_is_tokenizer_decode():
    from stream_attention.engine.tokenizer import fast_decoder
    from stream_attention.models.default import load_tokenizer

    for tok in (load_tokenizer(), build_byte_tokenizer(("<x>",))):
        ids = tok.encode("Hi <x> naïve ✓ end", add_special_tokens=False) + [tok.eos_token_id, 1, 2]
        for skip in (True, False):
            for cut in range(len(ids)):
                assert fast_decoder(tok, skip)(ids[cut:]) == tok.decode(
                    ids[cut:], skip_special_tokens=skip, clean_up_tokenization_spaces=False)

    class Custom:  # anything that is not a plain fast tokenizer goes through decode()
        def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
            return "|".join(map(str, ids))

    assert fast_decoder(Custom())([1, 2]) == "1|2"


def test_request_output_totals_are_snapshots():
    from stream_attention.engine.types import ListView, RequestOutput

    source = [7, 8, 9]
    out = RequestOutput("r", [7], ListView(source, 1, 3), "", [9], "", False)
    source += [10, 11]
    assert out.token_ids == [8, 9] and out.logprobs is None and out.usage["completion_tokens"] == 2
    out.token_ids.append(0)  # the materialised list is the output's own
    assert source == [7, 8, 9, 10, 11]
    plain = RequestOutput("r", [7], [8, 9, 0], "", [9], "", False)
    assert plain == out


# --- Mixed batches: every row follows its own settings --------------------------------

def reference_probs(logits: torch.Tensor, p: SamplingParams, prompt: list[int], out: list[int]) -> list[float]:
    """One row's next-token distribution, written from the definitions (float64, loops).

    Repetition penalty (HF) over prompt and output tokens: positive logits are divided,
    negative ones multiplied. Presence/frequency (OpenAI) over output tokens:
    ``logit -= frequency * count + presence``. Then temperature; top-k keeps the k most
    likely; top-p keeps the most likely tokens while the mass strictly above a token is at
    most top_p (renormalised after top-k); min-p keeps tokens with probability at least
    ``min_p * max probability``.
    """
    x = [float(v) for v in logits]
    if p.repetition_penalty != 1.0:
        for t in set(prompt) | set(out):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(out):
        x[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
    if p.temperature == 0.0:
        best = max(range(len(x)), key=lambda t: x[t])
        return [1.0 if t == best else 0.0 for t in range(len(x))]
    x = [v / p.temperature for v in x]
    order = sorted(range(len(x)), key=lambda t: -x[t])
    kept = order[: p.top_k] if p.top_k > 0 else order

    def normalised(tokens):
        z = sum(math.exp(x[t]) for t in tokens)
        return {t: math.exp(x[t]) / z for t in tokens}

    if p.top_p < 1.0:
        probs, above, survivors = normalised(kept), 0.0, []
        for t in kept:
            if above > p.top_p:
                break
            survivors.append(t)
            above += probs[t]
        kept = survivors
    if p.min_p > 0.0:
        probs = normalised(kept)
        top = max(probs.values())
        kept = [t for t in kept if probs[t] >= p.min_p * top]
    final = normalised(kept)
    return [final.get(t, 0.0) for t in range(len(x))]


MIXED = [  # one row each; every setting differs from its neighbours
    SamplingParams(temperature=1.0, top_p=0.5, seed=11),
    SamplingParams(temperature=0.7, top_k=3, seed=12),
    SamplingParams(temperature=1.3, min_p=0.3, seed=13),
    SamplingParams(temperature=1.0, top_p=0.9, top_k=5, repetition_penalty=1.5, seed=14),
    SamplingParams(temperature=0.0, frequency_penalty=0.8, presence_penalty=0.5),  # greedy after penalties
    SamplingParams(temperature=2.0, presence_penalty=-1.0, frequency_penalty=0.4, seed=15),
    SamplingParams(temperature=1.0, seed=16),
]
SMALL_VOCAB = 8


def _mixed_seqs() -> list[Sequence]:
    g = torch.Generator().manual_seed(5)
    return [_seq(p, prompt=torch.randint(0, SMALL_VOCAB, (4,), generator=g).tolist(),
                 out=torch.randint(0, SMALL_VOCAB, (5,), generator=g).tolist()) for p in MIXED]


def test_mixed_batch_filters_each_row_by_its_own_settings():
    g = torch.Generator().manual_seed(1)
    seqs = _mixed_seqs()
    for _ in range(20):
        logits = torch.randn(len(seqs), SMALL_VOCAB, generator=g) * 2
        sampled = [i for i, s in enumerate(seqs) if s.params.temperature > 0]
        pen = apply_penalties(logits.clone(), seqs)
        probs = torch.softmax(filter_logits(pen[sampled], [seqs[i].params for i in sampled]).double(), -1)
        for j, i in enumerate(sampled):
            s = seqs[i]
            ref = torch.tensor(reference_probs(logits[i], s.params, s.prompt_token_ids, s.output_token_ids),
                               dtype=torch.float64)
            assert torch.equal(probs[j] > 0, ref > 0), (i, s.params)  # the same support, exactly
            assert (probs[j] - ref).abs().max() < 1e-5  # float32 softmax against float64


def test_mixed_batch_tokens_equal_single_row_sampling():
    # Same seeds, same logits row: a row's token does not depend on the other rows' settings.
    g = torch.Generator().manual_seed(2)
    steps = [torch.randn(len(MIXED), SMALL_VOCAB, generator=g) * 2 for _ in range(30)]
    batch_seqs, alone_seqs = _mixed_seqs(), _mixed_seqs()
    batch_sampler, alone_sampler = Sampler(torch.device("cpu"), seed=1), Sampler(torch.device("cpu"), seed=1)
    for logits in steps:
        together = batch_sampler(logits, batch_seqs).token_ids
        one_by_one = [alone_sampler(logits[i:i + 1], [s]).token_ids[0] for i, s in enumerate(alone_seqs)]
        assert together == one_by_one
        for i, s in enumerate(batch_seqs):
            ref = reference_probs(logits[i], s.params, s.prompt_token_ids, s.output_token_ids)
            assert ref[together[i]] > 0, (i, s.params)  # never a token its own filters drop


def test_mixed_batch_frequencies_follow_each_rows_distribution():
    # 2000 copies of each setting in one batch (shared generator): each copy's empirical
    # distribution matches its own reference. With n=2000 a frequency's standard error is
    # at most 0.011, so 0.05 is > 4 sigma; swapping two rows' settings moves some
    # frequency by more than 0.2 here.
    reps = 2000
    unseeded = [dataclasses.replace(p, seed=None) for p in MIXED]
    seqs = [_seq(p, prompt=s.prompt_token_ids, out=s.output_token_ids)
            for p, s in zip(unseeded, _mixed_seqs(), strict=True) for _ in range(reps)]
    logits_rows = torch.randn(len(MIXED), SMALL_VOCAB, generator=torch.Generator().manual_seed(3)) * 2
    logits = logits_rows.repeat_interleave(reps, 0)
    ids = torch.tensor(Sampler(torch.device("cpu"), seed=9)(logits, seqs).token_ids).view(len(MIXED), reps)
    for i, s in enumerate(_mixed_seqs()):
        freq = torch.bincount(ids[i], minlength=SMALL_VOCAB).double() / reps
        ref = torch.tensor(reference_probs(logits_rows[i], s.params, s.prompt_token_ids, s.output_token_ids),
                           dtype=torch.float64)
        assert (freq[ref == 0] == 0).all(), (i, s.params)
        assert (freq - ref).abs().max() < 0.05, (i, s.params, freq, ref)


def test_presence_or_frequency_penalty_alone():
    # Either one alone must apply (found by mutation testing: "or" read as "and" survived).
    logits = torch.zeros(2, 4)
    seqs = [_seq(SamplingParams(presence_penalty=0.5), prompt=[3], out=[1, 1]),
            _seq(SamplingParams(frequency_penalty=0.25), prompt=[3], out=[2, 2, 2])]
    assert apply_penalties(logits, seqs).tolist() == [[0.0, -0.5, 0.0, 0.0], [0.0, 0.0, -0.75, 0.0]]


def test_penalties_skip_token_ids_outside_the_vocabulary():
    # Ids equal to or above the logits' width (a tokenizer larger than the model's head)
    # are not penalised, and do not fail.
    logits = torch.ones(1, VOCAB)
    seq = _seq(SamplingParams(repetition_penalty=2.0, presence_penalty=1.0), prompt=[VOCAB, 5], out=[VOCAB, 7])
    got = apply_penalties(logits.clone(), [seq])[0]
    expect = torch.ones(VOCAB)
    expect[5], expect[7] = 0.5, 0.5 - 1.0
    assert torch.equal(got, expect)


def test_penalties_count_the_last_token_while_it_is_on_the_device():
    """Rows whose last token is a placeholder (their step was launched before the token was
    read back), with those tokens passed as ``last_tokens``: the penalised logits equal those
    of the same rows with the tokens on the host. Per row a different history, the last
    token inside it or not (repetition and presence count once per distinct token, frequency
    per occurrence), logits at the last token on both sides of 0 and inside (0, 1] (where
    the repetition penalty switches between dividing and multiplying), a row with no output
    before its placeholder, and a row without a placeholder beside them."""
    from stream_attention.engine.sequence import PLACEHOLDER_TOKEN

    rep = SamplingParams(repetition_penalty=1.7)
    pf = SamplingParams(presence_penalty=0.8, frequency_penalty=0.3)
    both = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.6, logit_bias={4: 2.0})
    rows = [  # (params, prompt, output before the last token, last token, its logit)
        (rep, (1, 7), (9, 11), 9, 0.5),     # in the history
        (rep, (1, 7), (9, 11), 20, 0.5),    # not in it
        (pf, (2,), (12, 12, 5), 12, -0.7),  # an output token already
        (pf, (2, 21), (5,), 21, 0.3),       # only in the prompt: presence applies again
        (both, (3,), (14, 6), 6, 0.9),
        (both, (3,), (14, 6), 25, -1.5),
        (pf, (4, 8), (), 8, 0.0),           # the first output token is on the device
        (rep, (1,), (2,), 3, 2.0),          # no placeholder: on the host already
    ]
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(len(rows), VOCAB, generator=g) * 3
    on_host, held = [], []
    for i, (p, prompt, out, last, value) in enumerate(rows):
        logits[i, last] = value
        on_host.append(_seq(p, prompt=prompt, out=out + (last,)))
        held.append(on_host[-1] if i == len(rows) - 1 else _seq(p, prompt=prompt, out=out + (PLACEHOLDER_TOKEN,)))
    last_tokens = torch.tensor([last for _, _, _, last, _ in rows])
    want = apply_penalties(logits.clone(), on_host)
    got = apply_penalties(logits.clone(), held, last_tokens)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.equal(want, logits)


def test_penalties_follow_a_sequence_that_grows_between_steps():
    """The sampler keeps each sequence's penalty view between steps: after tokens are
    appended (a new one, a repeated one, one behind a placeholder that is then filled) the
    penalised logits equal those of a fresh sequence holding the same tokens."""
    from stream_attention.engine.sequence import PLACEHOLDER_TOKEN

    params = SamplingParams(repetition_penalty=1.5, presence_penalty=0.4, frequency_penalty=0.7)
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(4)) * 3
    seq = _seq(params, prompt=(1, 2), out=(3,))
    for new in ([4], [3], [PLACEHOLDER_TOKEN], [], [5, 4]):
        if seq.token_ids[-1] == PLACEHOLDER_TOKEN:
            seq.token_ids[-1] = 9
        seq.token_ids.extend(new)
        got = apply_penalties(logits.clone(), [seq])
        known = [t for t in seq.token_ids[2:] if t != PLACEHOLDER_TOKEN]
        want = apply_penalties(logits.clone(), [_seq(params, prompt=(1, 2), out=tuple(known))])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
