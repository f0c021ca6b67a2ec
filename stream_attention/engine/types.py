"""Public data types of the engine: what a request asks for and what comes back.

These are the contract between the engine and its callers (the server, the clients'
tests, offline scripts). They carry no HTTP or scheduling concerns.
"""

from __future__ import annotations

import enum
import json as _json
from dataclasses import dataclass, field
from typing import Any


class FinishReason(str, enum.Enum):  # noqa: UP042 - str() must stay as in 3.10-style enums for callers
    STOP = "stop"  # a stop string or stop token id (EOS included) was produced
    LENGTH = "length"  # max_tokens reached, or the context length
    ABORT = "abort"  # aborted by the caller (client disconnect, abort())


@dataclass
class StructuredOutputsParams:
    """Constrain the output to a grammar (vLLM's name). Exactly one of:

    - ``json``: a JSON schema (a dict, or its JSON text); the output is an instance of it;
    - ``json_object``: any JSON object;
    - ``regex``: the output matches this regular expression (whole);
    - ``grammar``: an EBNF grammar (llama.cpp GBNF syntax) with a ``root`` rule.

    Plain data, so a request carrying it can cross process boundaries; the engine compiles
    it (once per distinct spec, see :meth:`key`).
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    grammar: str | None = None
    json_object: bool = False

    def key(self) -> tuple[str, str]:
        """``(kind, canonical text)``: equal specs give equal keys (the compile cache's key)."""
        given = [k for k, v in (("json", self.json), ("regex", self.regex), ("grammar", self.grammar),
                                ("json_object", self.json_object or None)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of json, json_object, regex, grammar; got {given}")
        kind = given[0]
        if kind == "json":
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = _json.loads(schema)
                except ValueError as exc:
                    raise ValueError(f"json schema is not valid JSON: {exc}") from exc
            if not isinstance(schema, dict):
                raise ValueError(f"json schema must be a JSON object, got {type(schema).__name__}")
            return kind, _json.dumps(schema, separators=(",", ":"))
        if kind == "json_object":
            return kind, ""
        text = self.regex if kind == "regex" else self.grammar
        if not text:
            raise ValueError(f"{kind} is empty")
        return kind, text


@dataclass
class SamplingParams:
    """How to pick tokens. Defaults give greedy decoding of up to 16 tokens.

    ``validate()`` raises ``ValueError`` naming the field that is out of range.
    """

    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # return the top-N logprobs of each sampled token
    include_stop_str_in_output: bool = False
    # Choices per request: the prompt is prefilled once and its KV blocks are shared by
    # the n continuations; with a seed, choice i draws like a request seeded ``seed + i``.
    n: int = 1
    structured_outputs: StructuredOutputsParams | None = None
    # OpenAI's logit_bias: token id -> a value in [-100, 100] added to that token's logit
    # before penalties, temperature and filtering (-100 all but bans it, 100 all but forces it).
    logit_bias: dict[int, float] | None = None
    # vLLM's prompt_logprobs: the logprob of each prompt token after the ones before it (the
    # first has none), with the top-N alternatives; what scoring a text (echo) needs.
    prompt_logprobs: int | None = None
    # vLLM's min_tokens: EOS and stop_token_ids are masked, and stop strings not looked for,
    # until this many tokens have been generated.
    min_tokens: int = 0

    def validate(self) -> SamplingParams:
        checks = [
            ("max_tokens", self.max_tokens >= 1),
            ("temperature", 0.0 <= self.temperature <= 100.0),
            ("top_k", self.top_k >= 0),
            ("top_p", 0.0 < self.top_p <= 1.0),
            ("min_p", 0.0 <= self.min_p <= 1.0),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20),
            ("n", 1 <= self.n <= 128),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range")
        for token, bias in (self.logit_bias or {}).items():
            if not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias key {token!r} is not a token id")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias[{token}]={bias!r} is out of range [-100, 100]")
        if self.structured_outputs is not None:
            self.structured_outputs.key()
        return self


@dataclass
class Request:
    """One generation request as the engine sees it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    arrival_time: float = 0.0
    # Scheduling priority under ``scheduling_policy="priority"``: lower runs earlier (vLLM's convention).
    priority: int = 0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] | None = None
    rank: int | None = None  # 1 + how many tokens were likelier (set for prompt_logprobs)


class ListView:
    """``source[start:end]``, taken when first needed.

    The engine hands these to :class:`RequestOutput` for the running totals (token ids,
    logprobs): copying them whole for every streamed token would cost time quadratic
    in the output length, and a consumer usually reads only the deltas. The source
    lists only ever grow, so a later slice is the same snapshot."""

    __slots__ = ("source", "start", "end")

    def __init__(self, source: list, start: int, end: int) -> None:
        self.source, self.start, self.end = source, start, end

    def materialize(self) -> list:
        return self.source[self.start:self.end]


class _SnapshotField:
    """A dataclass field holding a list, or a :class:`ListView` made a list on first read."""

    def __init__(self, *default) -> None:
        self.default = default  # () = required field

    def __set_name__(self, owner, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj, objtype=None):
        if obj is None:  # the dataclass machinery asking for the field's default
            if self.default:
                return self.default[0]
            raise AttributeError(self.slot)
        value = obj.__dict__[self.slot]
        if type(value) is ListView:
            value = obj.__dict__[self.slot] = value.materialize()
        return value

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.slot] = value


@dataclass
class RequestOutput:
    """A snapshot of a request's progress.

    When streaming, each yielded object carries the *new* tokens and text since the
    previous one in ``delta_token_ids`` / ``delta_text``, and the totals so far in
    ``token_ids`` / ``text``. ``finished`` is True on the last one.

    A request with ``params.n > 1`` streams its choices interleaved: each output is about
    choice ``index``; ``finish_reason`` is set on that choice's last output, and
    ``finished`` only on the request's very last output (every choice done).
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = _SnapshotField()  # noqa: RUF009 - a descriptor, not a shared default
    text: str
    delta_token_ids: list[int]
    delta_text: str
    finished: bool
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = _SnapshotField(None)  # noqa: RUF009 - a descriptor
    # wall-clock seconds: arrival -> first token, arrival -> finish
    time_to_first_token: float | None = None
    latency: float | None = None
    index: int = 0  # which of the request's ``params.n`` choices this output is about
    # With ``params.prompt_logprobs``: one entry per prompt token, None for the first.
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": len(self.prompt_token_ids),
            "completion_tokens": len(self.token_ids),
            "total_tokens": len(self.prompt_token_ids) + len(self.token_ids),
        }


@dataclass
class EngineStats:
    """Counters and gauges the server exports as Prometheus metrics."""

    running: int = 0
    waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    preemptions_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    requests_finished_total: int = 0
    # Prefix cache, in prompt tokens of newly admitted requests (vLLM's definition):
    # looked up, and served from the cache.
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0
    # prompt tokens the model computed (prefix-cache hits and forked choices excluded,
    # recomputation after preemption included)
    prefill_tokens_total: int = 0
    # KV compression (zeros when the cache is uncompressed)
    kv_compression_ratio: float = 1.0
    kv_bytes_saved: int = 0
    kv_blocks_evicted_total: int = 0
    # Speculative decoding (vLLM's spec_decode_* counters): sequences given a draft to
    # verify, draft tokens proposed, and of those the ones the target accepted. The
    # acceptance rate is accepted / proposed; accepted / drafts + 1 is the mean number of
    # tokens a verified sequence gains per step.
    spec_decode_num_drafts_total: int = 0
    spec_decode_num_draft_tokens_total: int = 0
    spec_decode_num_accepted_tokens_total: int = 0
    # Set by a supervising client: how often the engine was rebuilt after dying.
    engine_restarts_total: int = 0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 429)."""


class PromptTooLongError(ValueError):
    """The prompt plus max_tokens does not fit the model's context or the KV cache."""
