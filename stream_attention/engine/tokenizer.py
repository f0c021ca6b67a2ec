"""Tokenizers for the engine: loading, an offline byte-level one, incremental detokenization.

Detokenizing a stream one token at a time is not ``decode([token])``: byte-level BPE
tokens can carry a fraction of a UTF-8 character, and SentencePiece tokens decode
differently depending on their left neighbour (leading spaces). :class:`IncrementalDetokenizer`
re-decodes a short window of recent tokens and emits only text that is stable, holding
back a trailing replacement character until the bytes that complete it arrive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# How many tokens before the first new one are re-decoded for context.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """``AutoTokenizer.from_pretrained`` with the engine's defaults."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)


def build_byte_tokenizer(extra_special_tokens: tuple[str, ...] = ()) -> Any:
    """A byte-level tokenizer built offline: ids 0..2 are ``<pad>``, ``<s>``, ``</s>`` and
    ids 3..258 are the 256 byte values. No merges, so any text round-trips exactly and
    multi-byte characters span several tokens (which is what the streaming tests need).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", *extra_special_tokens]
    alphabet = ByteLevel.alphabet()
    # ByteLevel maps each byte to a printable stand-in; order by byte value.
    byte_to_char = {b: c for b, c in zip(range(256), _bytes_to_unicode(), strict=True)}
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {tok: i for i, tok in enumerate(specials)}
    for b in range(256):
        vocab[byte_to_char[b]] = len(specials) + b
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False
    )
    return fast


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character table, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = {}
    n = 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def eos_token_ids(tokenizer: Any, model: Any | None = None) -> frozenset[int]:
    """End-of-sequence ids from the model's generation config and the tokenizer."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if source is None:
            continue
        if isinstance(source, int):
            ids.add(source)
        else:
            ids.update(int(x) for x in source)
    return frozenset(ids)


def fast_decoder(tokenizer: Any, skip_special_tokens: bool = True) -> Callable[[list[int]], str]:
    """``ids -> tokenizer.decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)``.

    For a transformers fast tokenizer whose ``decode``/``_decode`` are the library's own,
    that call is the Rust backend's ``decode`` behind several layers of Python argument
    handling; calling the backend directly gives the same string for a fifth of the cost
    (it runs for every streamed token). Anything else goes through ``decode``.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    cls = type(tokenizer)
    if (backend is not None and type(backend).__module__.startswith("tokenizers")
            and callable(getattr(backend, "decode", None))
            and getattr(getattr(cls, "_decode", None), "__module__", "") in _LIBRARY_DECODE_MODULES
            and getattr(getattr(cls, "decode", None), "__module__", "") == "transformers.tokenization_utils_base"):
        decode = backend.decode
        return lambda ids: decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
                                        clean_up_tokenization_spaces=False)


# Where transformers defines the fast tokenizers' ``_decode`` (5.x, 4.x).
_LIBRARY_DECODE_MODULES = ("transformers.tokenization_utils_tokenizers", "transformers.tokenization_utils_fast")


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas, correct across
    multi-byte characters and tokenizers whose pieces depend on their neighbours."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decode = fast_decoder(tokenizer, skip_special_tokens)
        # Seed the window with the prompt's tail so the first output token decodes with
        # the same leading-space behaviour it has inside the full text.
        self.ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.num_prompt_context = len(self.ids)
        # The decoded ids[prefix_offset:read_offset], while those offsets stand.
        self._prefix_text: str | None = None

    def step(self, new_token_ids: list[int]) -> str:
        """Append tokens and return the text that became final."""
        ids = self.ids
        ids.extend(new_token_ids)
        prefix_text = self._prefix_text
        if prefix_text is None:
            prefix_text = self._prefix_text = self._decode(ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(ids[self.prefix_offset:])
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT):
            delta = full_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(ids)
            self._prefix_text = None
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character becomes U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        self._prefix_text = None
        return full_text[len(prefix_text):] if len(full_text) > len(prefix_text) else ""


def decode_output(tokenizer: Any, prompt_token_ids: list[int], output_token_ids: list[int]) -> str:
    """The text of ``output_token_ids`` as a stream would have produced it, in one go."""
    det = IncrementalDetokenizer(tokenizer, prompt_token_ids)
    return det.step(output_token_ids) + det.flush()


def stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into a stop string
    (such text is held back from a stream until it is known not to be one)."""
    best = 0
    size = len(text)
    for stop in stops:
        m = len(stop) - 1  # a held suffix is a proper prefix of the stop string
        if m <= best:
            continue
        # Candidates start where stop[0] occurs in the last m characters; the leftmost
        # one that matches is the longest.
        first = stop[0]
        j = text.find(first, max(0, size - m))
        while j != -1 and size - j > best:
            if stop.startswith(text[j:]):
                best = size - j
                break
            j = text.find(first, j + 1)
    return best


def find_stop(text: str, stops: list[str], search_from: int) -> tuple[int, str] | None:
    """Earliest stop string occurrence that ends after ``search_from``: ``(index, stop)``."""
    found: tuple[int, str] | None = None
    for stop in stops:
        if not stop:
            continue
        i = text.find(stop, max(0, search_from - len(stop) + 1))
        if i != -1 and (found is None or i < found[0]):
            found = (i, stop)
    return found
