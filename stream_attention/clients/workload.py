"""What the load generator sends and when: arrival schedules, request lengths, datasets.

Every function here is a pure function of its arguments and an injected ``random.Random``
(token counting, the one part that may need a server, comes in as a :class:`TokenCounter`),
so a schedule or a workload is reproducible from a seed and testable without a server.

- Arrivals follow vLLM's ``benchmark_serving``: the first request at time 0, then gaps drawn
  from a gamma distribution with mean ``1 / rate`` and shape ``burstiness`` (1.0 is a Poisson
  process; below 1 burstier, above 1 more regular); an infinite rate sends everything at once.
- Synthetic lengths are log-normal with given means (ShareGPT-like: long-tailed, input ~220
  and output ~200 tokens by default), clipped so prompt and output fit the server's context.
- ShareGPT files (a JSON list or JSONL of ``{"conversations": [{"from", "value"}, ...]}``)
  give the first human turn as the prompt and the token length of the first gpt turn after
  it as the output length, keeping pairs whose prompt and output have at least 4 tokens and
  fit the context together, as vLLM does.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

HUMAN_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "chatgpt", "assistant"})
MIN_SEQUENCE_TOKENS = 4  # vLLM's filter for ShareGPT pairs: shorter ones are noise

# Common English words, one token each in most BPE vocabularies (with the leading space):
# synthetic text prompts of N words are then about N tokens long.
_WORD_LIST = (
    "the of and to in is was for on that with as by at from his her he she it this which or be are an had not "
    "but what all were when we there can one has their if would will each about how up out them then many some "
    "so these her long make thing see him two time look more write go day did number sound no most people my "
    "over know water than call first who may down side been now find any new work part take get place made live "
    "where after back little only round man year came show every good me give our under name very through just "
    "form great think say help low line turn cause much mean before move right boy old too same tell does set "
    "three want air well also play small end put home read hand port large spell add even land here must big"
)
WORDS = _WORD_LIST.split()


@dataclass(frozen=True)
class SampledRequest:
    """One request of a workload: its own prompt, optionally after a shared system prompt.

    ``prompt`` and ``prefix`` are token ids (for routes that take ids) or text; the lengths
    are in tokens (estimated for text when no tokenizer was at hand).
    """

    prompt: str | list[int]
    prompt_len: int
    output_len: int
    prefix: str | list[int] | None = None
    prefix_len: int = 0


class TokenCounter(Protocol):
    """Counts tokens of texts (no special tokens added); ``name`` says how, for the report."""

    name: str

    async def count(self, texts: Sequence[str]) -> list[int]: ...


class CharCounter:
    """About four characters per token: the usual rule of thumb for English BPE text."""

    name = "heuristic (4 characters/token)"

    async def count(self, texts: Sequence[str]) -> list[int]:
        return [math.ceil(len(t) / 4) for t in texts]


def arrival_offsets(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Start times (seconds from the first) of ``n`` requests arriving at ``rate`` per second.

    Gaps are gamma-distributed with shape ``burstiness`` and scale ``1 / (rate * burstiness)``:
    mean ``1 / rate`` at any burstiness, variance ``1 / (rate**2 * burstiness)``.
    """
    if n < 0:
        raise ValueError(f"number of requests must be >= 0, got {n}")
    if not rate > 0:  # also rejects NaN
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a finite number > 0, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    scale = 1.0 / (rate * burstiness)
    offsets, t = [], 0.0
    for _ in range(n):
        offsets.append(t)
        t += rng.gammavariate(burstiness, scale)
    return offsets


def lognormal_lengths(n: int, mean: float, sigma: float, rng: random.Random) -> list[int]:
    """``n`` positive integer lengths, log-normal with the given mean and log-space spread.

    ``mu = ln(mean) - sigma**2 / 2`` makes the mean of the distribution ``mean``; ``sigma = 0``
    gives ``mean`` every time.
    """
    if not mean >= 1:
        raise ValueError(f"mean length must be >= 1, got {mean}")
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    mu = math.log(mean) - sigma * sigma / 2
    return [max(1, round(rng.lognormvariate(mu, sigma))) for _ in range(n)]


def clip_to_context(prompt_len: int, output_len: int, context: int) -> tuple[int, int]:
    """Shorten the prompt, then the output, until both fit ``context`` (each keeps >= 1 token)."""
    if context < 2:
        raise ValueError(f"context must hold at least 2 tokens, got {context}")
    prompt_len = min(max(1, prompt_len), context - 1)
    return prompt_len, min(max(1, output_len), context - prompt_len)


def random_ids(n: int, vocab_size: int, rng: random.Random) -> list[int]:
    """``n`` token ids, avoiding the lowest ten where tokenizers keep their special tokens."""
    low = min(10, vocab_size - 1)
    return [rng.randrange(low, vocab_size) for _ in range(n)]


def random_text(n_words: int, rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=n_words))


def random_requests(
    n: int,
    input_mean: float,
    output_mean: float,
    sigma: float,
    context: int,
    rng: random.Random,
    vocab_size: int | None,
) -> list[SampledRequest]:
    """``n`` synthetic requests with log-normal lengths clipped to ``context``.

    Prompts are random token ids when ``vocab_size`` is given, else text of that many words.
    """
    inputs = lognormal_lengths(n, input_mean, sigma, rng)
    outputs = lognormal_lengths(n, output_mean, sigma, rng)
    out = []
    for i, o in zip(inputs, outputs, strict=True):
        p, o = clip_to_context(i, o, context)
        prompt: str | list[int] = random_ids(p, vocab_size, rng) if vocab_size else random_text(p, rng)
        out.append(SampledRequest(prompt, p, o))
    return out


def load_sharegpt(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, completion) pairs of a ShareGPT file: JSON list or JSON lines.

    The prompt is a conversation's first human turn, the completion the first gpt turn after
    it; conversations without such a pair are skipped.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"dataset {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
        entries = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        entries = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"dataset {str(path)!r} line {lineno}: not JSON ({exc.msg})") from exc
    pairs = [pair for entry in entries if (pair := _first_exchange(entry)) is not None]
    if not pairs:
        raise ValueError(
            f"dataset {str(path)!r}: no conversation with a human turn followed by a gpt turn "
            '(expected ShareGPT entries {"conversations": [{"from": "human", "value": ...}, ...]})'
        )
    return pairs


def _first_exchange(entry: object) -> tuple[str, str] | None:
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list):
        return None
    prompt = None
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            continue
        role = str(turn.get("from", "")).lower()
        if prompt is None and role in HUMAN_ROLES:
            prompt = turn["value"]
        elif prompt is not None and role in ASSISTANT_ROLES:
            return prompt, turn["value"]
    return None


async def sample_sharegpt(
    pairs: Sequence[tuple[str, str]],
    n: int,
    counter: TokenCounter,
    context: int,
    rng: random.Random,
    batch: int = 64,
) -> list[SampledRequest]:
    """``n`` requests from ShareGPT pairs, in an order shuffled by ``rng``.

    Pairs are counted in batches until ``n`` fit: both sides >= 4 tokens and prompt + output
    <= ``context``. When fewer than ``n`` fit, the ones that do are drawn again at random (as
    vLLM oversamples); when none does, ``ValueError``.
    """
    order = list(range(len(pairs)))
    rng.shuffle(order)
    out: list[SampledRequest] = []
    for start in range(0, len(order), batch):
        chunk = [pairs[i] for i in order[start : start + batch]]
        counts = await counter.count([p for p, _ in chunk] + [c for _, c in chunk])
        for (prompt, _), p, o in zip(chunk, counts[: len(chunk)], counts[len(chunk) :], strict=True):
            if p >= MIN_SEQUENCE_TOKENS and o >= MIN_SEQUENCE_TOKENS and p + o <= context:
                out.append(SampledRequest(prompt, p, o))
                if len(out) == n:
                    return out
    if not out:
        raise ValueError(
            f"no conversation of the dataset fits: each needs >= {MIN_SEQUENCE_TOKENS} prompt and output tokens "
            f"and prompt + output <= {context} (the context left after any shared prefix)"
        )
    return out + rng.choices(out, k=n - len(out))


def make_prefixes(count: int, length: int, rng: random.Random, vocab_size: int | None) -> list[str | list[int]]:
    """``count`` distinct system prompts of ``length`` tokens (ids) or words (text)."""
    if count < 1 or length < 1:
        raise ValueError(f"need >= 1 shared prefix of >= 1 token, got {count} of {length}")
    return [random_ids(length, vocab_size, rng) if vocab_size else random_text(length, rng) for _ in range(count)]


def add_shared_prefixes(
    requests: Sequence[SampledRequest],
    fraction: float,
    prefixes: Sequence[str | list[int]],
    prefix_len: int,
    rng: random.Random,
) -> list[SampledRequest]:
    """Put one of ``prefixes`` (chosen at random) before ``round(fraction * n)`` random requests."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"shared-prefix fraction must be in [0, 1], got {fraction}")
    chosen = set(rng.sample(range(len(requests)), round(fraction * len(requests))))
    return [
        replace(r, prefix=rng.choice(prefixes), prefix_len=prefix_len) if i in chosen else r
        for i, r in enumerate(requests)
    ]
