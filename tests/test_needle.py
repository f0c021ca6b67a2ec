"""The needle harness (stream_attention.engine.needle) on a model that retrieves by construction.

``InductionModel`` is one attention layer over a transformers ``DynamicCache``: the key of
position j is the token before it (one-hot), its value the token at j; a query matches the
keys of its current token, the most recent match winning, so the next-token logits copy
the token that followed the last earlier occurrence of the current two tokens. With the
whole cache it answers every needle; once the needle's blocks are evicted it cannot."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from stream_attention.engine import needle as nd

VOCAB = 512
NONE = VOCAB  # "no token there" channel
POS = 2 * (VOCAB + 1)  # recency channel
WIDTH = POS + 1


class InductionModel(torch.nn.Module):
    """Keys: one-hot of the two tokens before position j; queries: of the current and the
    previous token. Both matching scores 1e5, more than any recency term (10 per
    position), and the latest full match wins by e^10 per position."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the harness a device

    def forward(self, input_ids, position_ids=None, past_key_values=None, use_cache=True, output_attentions=False):
        ids = input_ids[0]
        n = ids.numel()
        history = [NONE, NONE]
        if past_key_values.get_seq_length() > 0:
            cached = past_key_values.layers[0].values[0, 0, -2:, :VOCAB].argmax(-1).tolist()
            history = ([NONE] + cached)[-2:]
        seq = torch.tensor(history + ids.tolist())  # seq[i + 2] is ids[i]
        idx = torch.arange(n)
        k = torch.zeros(n, WIDTH)
        k[idx, seq[idx + 1]] = 5e4  # token before j
        k[idx, VOCAB + 1 + seq[idx]] = 5e4  # two before j
        k[:, POS] = position_ids[0].float() * 10.0
        v = torch.zeros(n, WIDTH)
        v[idx, ids] = 1.0
        keys, values = past_key_values.update(k[None, None], v[None, None], 0)
        q = torch.zeros(n, WIDTH)
        q[idx, ids] = 1.0
        q[idx, VOCAB + 1 + seq[idx + 1]] = 1.0
        q[:, POS] = 1.0
        s = q @ keys[0, 0].T  # [n, T]
        total = keys.shape[2]
        # Strictly earlier keys only (a position's own key holds the tokens before it).
        visible = torch.arange(total)[None, :] < torch.arange(total - n, total)[:, None]
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1).nan_to_num()
        logits = 100.0 * (p @ values[0, 0])[:, :VOCAB]
        return SimpleNamespace(logits=logits[None], past_key_values=past_key_values,
                               attentions=(p[None, None],) if output_attentions else None)


class WordTokenizer:
    """Words, single spaces and single punctuation marks as tokens; ids assigned on first sight."""

    bos_token_id = 0

    def __init__(self) -> None:
        self.vocab = ["<bos>"]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        out = []
        for piece in re.findall(r"\w+|\s|[^\w\s]", text):
            if piece not in self.vocab:
                self.vocab.append(piece)
            out.append(self.vocab.index(piece))
        assert len(self.vocab) <= VOCAB
        return out

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.vocab[i] for i in ids if i)


def _filler(n_lines: int) -> str:
    # No "=", quotes, hyphens, digits or the needles' words: every n-gram of a needle is its own.
    words = ["lorem", "ipsum", "dolor", "sit", "amet"]
    return "".join(f"{words[i % 5]} {words[(i * 3) % 5]}\n" for i in range(n_lines))


@pytest.fixture(scope="module")
def cases():
    tok = WordTokenizer()
    return tok, nd.make_needle_cases(tok, [_filler(150)], 6, 400, depth=0.1, seed=3)


def test_cases_hold_the_needle_near_the_top_and_end_with_the_question(cases) -> None:
    tok, made = cases
    assert [c.kind for c in made] == ["number", "identifier", "string"] * 2
    for c in made:
        assert len(c.context_ids) == 400 and c.context_ids[0] == tok.bos_token_id
        start, end = c.needle_tokens
        assert tok.decode(c.context_ids[start:end]).strip() == f"{c.name} = {c.value}"
        assert start < 0.2 * 400
        assert tok.decode(c.question_ids) == f"\n{c.name} ="


def test_full_cache_retrieves_everything_and_eviction_of_the_needle_fails(cases) -> None:
    tok, made = cases
    settings = nd.NeedleSettings(max_new_tokens=24)
    res = nd.run_needles(InductionModel(), tok, made, [("none", 1.0), ("streaming", 4.0), ("streaming", 1.0)],
                         settings)
    assert res["none@1"]["accuracy"] == 1.0 and res["none@1"]["achieved_ratio"] == 1.0
    # Ratio 1: nothing to evict, same answers.
    assert res["streaming@1"]["accuracy"] == 1.0
    # 4x keeps the sinks and the last blocks: the needle (~10% deep) is gone.
    assert res["streaming@4"]["accuracy"] == 0.0 and res["streaming@4"]["achieved_ratio"] > 3.5


def test_scored_policies_keep_what_the_window_attends(cases) -> None:
    """The context's last queries attend (by construction) to the keys of their current
    tokens' earlier occurrences; scored policies keep those blocks and drop others."""
    tok, made = cases
    case = made[0]
    kv, attentions = nd._prefill(InductionModel(), case.context_ids, nd.NeedleSettings())
    for policy in ("heavy-hitter", "snapkv", "hybrid"):
        kept, achieved = nd.compress_cache(kv, attentions, policy, 4.0, nd.NeedleSettings())
        assert kept[0][0].shape[2] < len(case.context_ids) and achieved > 3.5
    # hybrid stores int4 codes: values come back quantized, ratio counts 4-bit codes.
    _, hybrid_ratio = nd.compress_cache(kv, attentions, "hybrid", 1.0, nd.NeedleSettings())
    assert hybrid_ratio > 3.0


@pytest.mark.parametrize("text,value,ok", [(" 48213\n", "48213", True), ("48213", "48213", True),
                                           (" 482130", "48213", False), (" 4821", "48213", False),
                                           (' "a-b-1"', '"a-b-1"', True), (" foo_bar_x", "foo_bar", False)])
def test_answer_check(text: str, value: str, ok: bool) -> None:
    assert nd.answer_correct(text, value) == ok


def test_eval_command_reports_needles_and_perplexity_full_and_compressed(tmp_path, capsys) -> None:
    """``stream-attention-eval --kv-compression P --ratio R`` on the embedded model: both
    settings are scored, and the compressed one really keeps about 1/R of the context."""
    import json

    from stream_attention.cli.eval import main

    out = tmp_path / "eval.json"
    main(["--kv-compression", "snapkv", "--ratio", "4", "--needles", "2", "--needle-context", "256",
          "--needle-depth", "0.9", "--ppl-windows", "1", "--ppl-context", "128", "--ppl-tokens", "32",
          "--max-docs", "20", "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["needle"]) == {"none@1", "snapkv@4"} == set(result["perplexity"])
    assert result["needle"]["none@1"]["cases"] == result["needle"]["snapkv@4"]["cases"] == 2
    assert abs(result["needle"]["snapkv@4"]["achieved_ratio"] - 4.0) < 0.5
    assert result["needle"]["none@1"]["achieved_ratio"] == 1.0
    for entry in result["perplexity"].values():
        assert entry["tokens"] == 31 and entry["perplexity"] > 1.0
