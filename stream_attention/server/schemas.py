"""Request bodies of every route, validated strictly.

Unknown fields are rejected (``extra="forbid"``) so a misspelt parameter is a 400 naming
it rather than a silently ignored knob. Ranges mirror
:meth:`stream_attention.engine.types.SamplingParams.validate`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ..engine.types import SamplingParams, StructuredOutputsParams
from .limits import check_logit_bias, current_limits


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _stop_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


class _Sampling(Strict):
    """Sampling knobs shared by every generation route (vLLM-style extensions included)."""

    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="0 or -1 = off")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(None, description="stop strings (at most --max-stop-strings)")
    stop_token_ids: list[int] | None = Field(None, description="at most --max-stop-token-ids")
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = Field(
        None, description="token id -> bias in [-100, 100] added to its logit (at most --max-logit-bias entries)")
    min_tokens: int = Field(0, ge=0, description="EOS, stop_token_ids and stop strings take effect only after "
                            "this many tokens")

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_bounds(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        check_logit_bias(value or {})
        return value

    @field_validator("stop")
    @classmethod
    def _stop_bounds(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = _stop_list(value)
        limits = current_limits()
        if len(stops) > limits.max_stop_strings:
            raise ValueError(f"at most {limits.max_stop_strings} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        if max(map(len, stops), default=0) > limits.max_stop_string_chars:
            raise ValueError(f"stop strings must be at most {limits.max_stop_string_chars} characters")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _non_negative_ids(cls, value: list[int] | None) -> list[int] | None:
        limit = current_limits().max_stop_token_ids
        if value and len(value) > limit:
            raise ValueError(f"at most {limit} stop token ids")
        if value and min(value) < 0:  # min() is C speed; prompts carry thousands of ids
            raise ValueError("token ids must be >= 0")
        return value

    def sampling_params(self, *, max_tokens: int, temperature: float, logprobs: int | None = None,
                        defaults: dict[str, float] | None = None) -> SamplingParams:
        """The engine's params; knobs the request leaves out take ``defaults`` (the model's
        generation config), then the neutral value. ``validate()`` re-checks ranges the
        schema does not know."""
        d = defaults or {}
        top_k = self.top_k if self.top_k is not None else int(d.get("top_k", 0))
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=max(top_k, 0),
            top_p=self.top_p if self.top_p is not None else d.get("top_p", 1.0),
            min_p=self.min_p if self.min_p is not None else d.get("min_p", 0.0),
            repetition_penalty=(self.repetition_penalty if self.repetition_penalty is not None
                                else d.get("repetition_penalty", 1.0)),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed,
            stop=_stop_list(self.stop),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            min_tokens=self.min_tokens,
        )
        return params.validate()


# ---------------------------------------------------------------------------------------
# /generate and /generate_stream (TGI-style)


class GenerateRequest(_Sampling):
    """``POST /generate`` and ``/generate_stream``.

    Give ``prompt`` (alias ``inputs``) or ``prompt_token_ids``. Sampling parameters sit at
    the top level or, as in TGI, inside ``parameters`` (with ``max_new_tokens`` and
    ``do_sample``).
    """

    prompt: str | None = Field(None, validation_alias=AliasChoices("prompt", "inputs"))
    prompt_token_ids: list[int] | None = Field(None, min_length=1)
    max_tokens: int | None = Field(None, ge=1, validation_alias=AliasChoices("max_tokens", "max_new_tokens"))
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    do_sample: bool | None = Field(None, description="TGI: false = greedy; true with no temperature = 1.0")
    logprobs: int | None = Field(None, ge=0, le=20, description="top-N logprobs per generated token")
    details: bool = Field(True, description="include per-token ids/logprobs in the response")
    return_full_text: bool = Field(False, description="prepend the prompt to generated_text")
    add_special_tokens: bool = Field(True, description="let the tokenizer add BOS etc. to a text prompt")
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1, description="lower runs earlier (--scheduling-policy priority)")
    # Structured output (at most one): the generated text is constrained to match it.
    json_schema: dict[str, Any] | None = Field(None, description="a JSON schema the output is an instance of")
    regex: str | None = Field(None, min_length=1, description="a regular expression the whole output matches")
    grammar: str | None = Field(None, min_length=1, description="an EBNF grammar (GBNF syntax, a root rule)")

    @model_validator(mode="after")
    def _one_constraint(self) -> GenerateRequest:
        given = [k for k in ("json_schema", "regex", "grammar") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of json_schema, regex and grammar (got {', '.join(given)})")
        return self

    def structured_outputs(self) -> tuple[StructuredOutputsParams, str] | None:
        """The constraint and the field that named it, or None."""
        if self.json_schema is not None:
            return StructuredOutputsParams(json=self.json_schema), "json_schema"
        if self.regex is not None:
            return StructuredOutputsParams(regex=self.regex), "regex"
        if self.grammar is not None:
            return StructuredOutputsParams(grammar=self.grammar), "grammar"
        return None

    @model_validator(mode="before")
    @classmethod
    def _flatten_parameters(cls, data: Any) -> Any:
        if isinstance(data, dict) and "parameters" in data:
            data = dict(data)
            nested = data.pop("parameters")
            if nested is None:
                return data
            if not isinstance(nested, dict):
                raise ValueError("parameters must be an object")
            clash = sorted(set(nested) & set(data))
            if clash:
                raise ValueError(f"{clash[0]} is given both at the top level and in parameters")
            data.update(nested)
        return data

    @field_validator("prompt_token_ids")
    @classmethod
    def _ids_non_negative(cls, value: list[int] | None) -> list[int] | None:
        if value and min(value) < 0:  # min() is C speed; prompts carry thousands of ids
            raise ValueError("token ids must be >= 0")
        return value

    def effective_temperature(self) -> float:
        if self.do_sample is False:
            return 0.0
        if self.temperature is not None:
            return self.temperature
        return 1.0 if self.do_sample else 0.0


# ---------------------------------------------------------------------------------------
# OpenAI-compatible


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _OpenAICommon(_Sampling):
    model: str | None = None
    n: int = Field(1, ge=1, description="choices per request (at most --max-n); they share the prompt's prefill")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    prompt_logprobs: int | None = Field(
        None, ge=0, le=20, description="vLLM's: each prompt token's logprob, rank and top alternatives (streamed: in the first chunk)")
    user: str | None = None
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1, description="lower runs earlier (--scheduling-policy priority)")

    def sampling_params(self, **kwargs: Any) -> SamplingParams:
        params = super().sampling_params(**kwargs)
        params.n = self.n
        return params.validate()


class CompletionRequest(_OpenAICommon):
    """``POST /v1/completions``: one prompt, as text or as token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1, description="refused unless equal to n (no server-side ranking)")
    suffix: str | None = None
    response_format: ResponseFormat | None = None

    @field_validator("n")
    @classmethod
    def _n_bound(cls, value: int) -> int:
        limit = current_limits().max_n
        if value > limit:
            raise ValueError(f"at most {limit} choices per request")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if value is not None and value != n:
            raise ValueError(f"best_of={value} is not supported (ask for n={value} choices instead)")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported")
        return value

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, value: Any) -> str | list[int]:
        # A list of one prompt is how some clients always send; more than one would need
        # several choices per response, which this server does not do (n is 1).
        if isinstance(value, list) and value and isinstance(value[0], str | list):
            if len(value) != 1:
                raise ValueError("exactly one prompt per request")
            value = value[0]
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt is empty")
            if min(value) < 0:
                raise ValueError("token ids must be >= 0")
        return value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    # Lenient: a message echoed back from an earlier response carries fields (refusal,
    # annotations, tool_calls=None...) that have no meaning for the chat template.
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # An assistant turn that called tools, and a tool's answer: passed to the chat template.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content part of type {part.type!r} is not supported (text only)")
            out.append(part.text)
        return "".join(out)


class JsonSchemaFormat(Strict):
    """OpenAI's ``response_format.json_schema``: the output is an instance of ``schema``."""

    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    """``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {...}}``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("type json_schema needs json_schema.schema")
        return self

    def structured_outputs(self) -> StructuredOutputsParams | None:
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.type == "json_schema":
            return StructuredOutputsParams(json=self.json_schema.schema_)
        return None


class FunctionDefinition(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(Strict):
    """``{"type": "function", "function": {"name", "description", "parameters"}}``."""

    type: Literal["function"]
    function: FunctionDefinition


class _FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    """``{"type": "function", "function": {"name": ...}}``: call exactly this function."""

    type: Literal["function"]
    function: _FunctionName


class ChatCompletionRequest(_OpenAICommon):
    """``POST /v1/chat/completions``; the prompt is the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True

    @field_validator("tools")
    @classmethod
    def _unique_tool_names(cls, value: list[Tool] | None) -> list[Tool] | None:
        names = [t.function.name for t in value or []]
        if len(set(names)) != len(names):
            raise ValueError("function names must be unique")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_names_a_tool(cls, value: Any, info: ValidationInfo) -> Any:
        names = [t.function.name for t in info.data.get("tools") or []]
        if value == "required" and not names:
            raise ValueError("'required' needs tools")
        if isinstance(value, NamedToolChoice) and value.function.name not in names:
            raise ValueError(f"names function {value.function.name!r}, which is not in tools")
        return value

    @field_validator("messages")
    @classmethod
    def _text_only(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        for m in value:
            m.text()  # raises for non-text parts
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_n(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


# ---------------------------------------------------------------------------------------
# /benchmark


class KernelBenchmarkRequest(Strict):
    """Time the fused kernel beside SDPA on the serving device (seed CLI's table)."""

    kind: Literal["kernel"] = "kernel"
    seq_lens: list[int] = Field(default_factory=lambda: [512, 1024], min_length=1, max_length=8)
    batch: int = Field(1, ge=1, le=64)
    heads: int = Field(8, ge=1, le=128)
    kv_heads: int | None = Field(None, ge=1, le=128)
    dim: int = Field(64, ge=16, le=256)
    causal: bool = True
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    warmup: int = Field(3, ge=0, le=100)
    iters: int = Field(10, ge=1, le=200)

    @field_validator("seq_lens")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(n < 1 for n in value):
            raise ValueError("sequence lengths must be >= 1")
        return value

    @model_validator(mode="after")
    def _gqa(self) -> KernelBenchmarkRequest:
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        return self


class GenerationBenchmarkRequest(Strict):
    """Run a short burst of generation through the serving engine and time it."""

    kind: Literal["generation"]
    num_requests: int = Field(8, ge=1)
    concurrency: int | None = Field(None, ge=1, description="requests in flight at once (default: all)")
    prompt_tokens: int = Field(64, ge=1, le=8192)
    max_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)


# ---------------------------------------------------------------------------------------
# /tokenize and /detokenize (vLLM's shapes)


class TokenizeRequest(Strict):
    """``POST /tokenize``: give ``prompt`` (text) or ``messages`` (rendered through the chat
    template, as the chat route does). ``add_special_tokens`` defaults as in vLLM: on for a
    prompt, off for messages (the template spells out its special tokens itself)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        for m in self.messages or []:
            m.text()  # raises for non-text parts
        return self


class DetokenizeRequest(Strict):
    """``POST /detokenize``: token ids back to text."""

    model: str | None = None
    tokens: list[int]

    @field_validator("tokens")
    @classmethod
    def _ids_non_negative(cls, value: list[int]) -> list[int]:
        if value and min(value) < 0:
            raise ValueError("token ids must be >= 0")
        return value
