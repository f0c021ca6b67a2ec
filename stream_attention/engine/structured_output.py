"""Structured output: grammars compiled by xgrammar, and the token masks they put on logits.

A request's :class:`~.types.StructuredOutputsParams` (JSON schema, any JSON object, regex or
EBNF) is compiled once per distinct spec into an ``xgrammar.CompiledGrammar`` (an LRU cache
keyed by the spec's canonical text); each constrained sequence then owns a
``GrammarMatcher`` that is advanced with every token it accepts. Before sampling, the
matchers fill one bitmask row each on the host and ``xgrammar.apply_token_bitmask_inplace``
sets the disallowed logits of those rows to ``-inf`` on the device, before any penalty,
temperature or top-k/p — so whatever the sampling settings, only grammar-valid tokens can
be drawn, and the sequence ends when its matcher terminates.

JSON schemas are checked for keywords that xgrammar would ignore or mishandle (``not``,
``if``/``then``/``else``, ``allOf`` of several schemas, ``uniqueItems``, ``contains``...):
those are refused with a ``ValueError`` naming the keyword rather than silently producing
output that does not satisfy the schema.

xgrammar is imported on first use, so an engine that never sees a constrained request
does not need it.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from typing import Any

import torch

from .types import StructuredOutputsParams

# Keywords xgrammar does not enforce (it ignores them, or its grammar for them rejects valid
# instances); a schema using any of them is refused. ``allOf`` with one member is fine.
UNSUPPORTED_SCHEMA_KEYWORDS = frozenset({
    "not", "if", "then", "else", "uniqueItems", "contains", "minContains", "maxContains",
    "dependentSchemas", "dependentRequired", "dependencies", "unevaluatedProperties", "unevaluatedItems",
    "additionalItems", "$dynamicRef", "$dynamicAnchor", "$recursiveRef", "contentEncoding",
    "contentMediaType", "contentSchema",
})
# Keywords whose value is a schema, or a list/map of schemas, to walk into.
_SUBSCHEMA = ("items", "additionalProperties", "propertyNames")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_XGRAMMAR_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def check_json_schema(schema: Any, path: str = "#") -> None:
    """Raise ``ValueError`` naming the first keyword of ``schema`` that constrained decoding
    cannot enforce (see :data:`UNSUPPORTED_SCHEMA_KEYWORDS`)."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"json schema at {path} must be an object or a boolean, got {type(schema).__name__}")
    for key in schema:
        if key in UNSUPPORTED_SCHEMA_KEYWORDS:
            raise ValueError(f"json schema keyword {key!r} (at {path}) is not supported by constrained decoding")
    all_of = schema.get("allOf")
    if isinstance(all_of, list) and len(all_of) > 1:
        raise ValueError(f"json schema keyword 'allOf' with {len(all_of)} schemas (at {path}) is not supported")
    for key in _SUBSCHEMA:
        if isinstance(schema.get(key), dict):
            check_json_schema(schema[key], f"{path}/{key}")
    for key in _SUBSCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or []):
            check_json_schema(sub, f"{path}/{key}/{i}")
    for key in _SUBSCHEMA_MAPS:
        members = schema.get(key)
        if isinstance(members, dict):
            for name, sub in members.items():
                check_json_schema(sub, f"{path}/{key}/{name}")


def _clean(exc: BaseException) -> str:
    """xgrammar's C++ messages start with a time stamp and a source location."""
    return _XGRAMMAR_LOG_PREFIX.sub("", str(exc).strip()).strip()


class GrammarCompiler:
    """Compiles :class:`StructuredOutputsParams` for one tokenizer; thread-safe, LRU-cached.

    ``vocab_size`` is the model's (its logits' width), which may exceed the tokenizer's.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, *, cache_size: int = 256, max_threads: int = 4) -> None:
        import xgrammar as xgr

        self.vocab_size = vocab_size
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        # Our own LRU (keyed by the canonical spec) bounds what is kept; xgrammar's cache off.
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.compiles = 0  # cache misses, for tests and stats

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The ``xgrammar.CompiledGrammar`` of ``spec``; ``ValueError`` if it cannot be compiled."""
        key = spec.key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self._compile(*key)
        with self._lock:
            self.compiles += 1
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, kind: str, text: str) -> Any:
        import json

        try:
            if kind == "json":
                check_json_schema(json.loads(text))
                # Compact JSON: free whitespace lets a small model pad forever.
                return self._compiler.compile_json_schema(text, any_whitespace=False)
            if kind == "json_object":
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                          strict_mode=False)
            if kind == "regex":
                return self._compiler.compile_regex(text)
            return self._compiler.compile_grammar(text)
        except ValueError:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError (C++) for bad schemas, regexes, grammars
            raise ValueError(f"{kind}: {_clean(exc)}") from exc

    def matcher(self, spec: StructuredOutputsParams) -> Any:
        """A fresh ``xgrammar.GrammarMatcher`` for one sequence."""
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compile(spec))


class TokenMasker:
    """Applies the matchers' next-token masks to a step's logits, in place, on the device."""

    def __init__(self, vocab_size: int, device: torch.device, *, fill_threads: int | None = None) -> None:
        import xgrammar as xgr

        self.vocab_size = vocab_size
        self.device = device
        self._host: torch.Tensor | None = None  # the bitmask, pinned on CUDA hosts
        # One C++ call fills every row: a Python loop over ``fill_next_token_bitmask`` costs
        # about 4x as much at batch 64, and the fill is on the host's critical path of every
        # step. One thread by default: with more, the hand-off cost more than it saved at
        # batch 64 (measured on a 2-core host, and no gain seen with 4 threads on a 16-core one).
        self._batch = xgr.BatchGrammarMatcher(max_threads=fill_threads or 1)

    def _bitmask(self, rows: int) -> torch.Tensor:
        import xgrammar as xgr

        if self._host is None or self._host.shape[0] < rows:
            size = max(rows, 2 * (self._host.shape[0] if self._host is not None else 8))
            host = xgr.allocate_token_bitmask(size, self.vocab_size)
            self._host = host.pin_memory() if self.device.type == "cuda" else host
        return self._host[:rows]

    def warm_up(self, dtype: torch.dtype) -> None:
        """Mask once per row-count class the device kernel is specialised on (xgrammar's
        Triton kernel recompiles for one row, a multiple of 16 rows and any other count), so
        that no constrained step in service waits for a compile, which would stall every
        running stream (the likely cause of the slow steps in the H200 run of RESULTS v0.10)."""
        for rows in (1, 3, 16):
            logits = torch.zeros(rows, self.vocab_size, dtype=dtype, device=self.device)
            bitmask = self._bitmask(rows)
            bitmask.fill_(-1)  # every token allowed
            self._mask(logits, bitmask, list(range(rows)))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the pinned mask is refilled by the next real step

    def apply(self, logits: torch.Tensor, matchers: list[tuple[int, Any]]) -> None:
        """Mask ``logits[row]`` with each ``(row, matcher)``'s allowed next tokens."""
        if not matchers:
            return
        bitmask = self._bitmask(logits.shape[0])
        rows = [row for row, _ in matchers]
        self._batch.batch_fill_next_token_bitmask([m for _, m in matchers], bitmask, indices=rows)
        self._mask(logits, bitmask, rows)

    def _mask(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        import xgrammar as xgr

        mask = bitmask.to(logits.device, non_blocking=True) if logits.device.type != "cpu" else bitmask
        if logits.device.type == "cpu" and logits.dtype != torch.float32:
            # xgrammar's CPU path takes float32 logits only.
            masked = logits.float()
            xgr.apply_token_bitmask_inplace(masked, mask, vocab_size=self.vocab_size, indices=rows)
            logits.copy_(masked)
            return
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=self.vocab_size, indices=rows)
