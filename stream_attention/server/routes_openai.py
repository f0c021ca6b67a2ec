"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Shapes follow OpenAI's API so the official ``openai`` client works unchanged, streams
included (``data: {...}`` chunks, then ``data: [DONE]``; with
``stream_options.include_usage`` a last chunk with empty ``choices`` carries usage).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from functools import lru_cache
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from ..engine.types import RequestOutput, TokenLogprob
from .errors import APIError, guarded_stream
from .limits import JSONBodyRoute
from .openapi import ERROR_RESPONSES, STREAM_OR_JSON
from .routes_generate import build_params, get_state, new_logprobs
from .schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from .sse import DONE, EventStreamResponse, event, json_head, json_str
from .state import GenerationStream, ServerState, watch_disconnect
from .structured_output import constrain
from .tool_calls import ToolPlan, call_id

router = APIRouter(prefix="/v1", tags=["openai"], route_class=JSONBodyRoute, responses=ERROR_RESPONSES)

OPENAI_DEFAULT_TEMPERATURE = 1.0
_USAGE_NULL = ',"usage":null'


def check_model(state: ServerState, model: str | None) -> None:
    state.require_engine()
    if model and model != state.model_name:
        raise APIError(
            404,
            f"model {model!r} is not served here; this server serves {state.model_name!r}",
            param="model",
            code="model_not_found",
        )


def _finish_reason(out: RequestOutput) -> str | None:
    return out.finish_reason.value if out.finish_reason is not None else None


class _TokenText:
    """Token id → its text, cached per tokenizer (logprob entries name tokens as text)."""

    def __init__(self, tokenizer: Any) -> None:
        self._decode = lru_cache(maxsize=65536)(lambda tid: tokenizer.decode([tid]))

    def __call__(self, token_id: int) -> str:
        return self._decode(token_id)


def _token_text(state: ServerState) -> _TokenText:
    if state.token_text is None:
        state.token_text = _TokenText(state.tokenizer)
    return state.token_text


def completion_logprobs(state: ServerState, lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
    text_of = _token_text(state)
    tokens, offsets = [], []
    for lp in lps:
        tokens.append(text_of(lp.token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{text_of(t): v for t, v in (lp.top or {}).items()} for lp in lps],
        "text_offset": offsets,
    }


def _with_prompt_logprobs(state: ServerState, out: RequestOutput, generated: dict[str, Any]) -> dict[str, Any]:
    """``generated`` (the completion's logprobs) preceded by the echoed prompt's: the first
    prompt token has none, as OpenAI's ``echo`` gives it."""
    text_of = _token_text(state)
    scored = out.prompt_logprobs or []
    tokens = [text_of(t) for t in out.prompt_token_ids]
    offsets, offset = [], 0
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    return {
        "tokens": tokens + generated["tokens"],
        "token_logprobs": [lp.logprob if lp is not None else None for lp in scored] + generated["token_logprobs"],
        "top_logprobs": [{text_of(t): v for t, v in (lp.top or {}).items()} if lp is not None else None
                         for lp in scored] + generated["top_logprobs"],
        "text_offset": offsets + generated["text_offset"],
    }


def vllm_prompt_logprobs(state: ServerState, out: RequestOutput) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs`` response field: per prompt token (None for the first), the
    token and its top alternatives by id, each with logprob, rank and decoded text."""
    text_of = _token_text(state)
    result: list[dict[str, Any] | None] = []
    for lp in out.prompt_logprobs or [None]:
        if lp is None:
            result.append(None)
            continue
        entry = {str(lp.token_id): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": text_of(lp.token_id)}}
        for rank, (tid, value) in enumerate((lp.top or {}).items(), start=1):
            entry.setdefault(str(tid), {"logprob": value, "rank": rank, "decoded_token": text_of(tid)})
        result.append(entry)
    return result


def _chat_prompt_logprobs(state: ServerState, body: Any, outs: list[RequestOutput]) -> dict[str, Any]:
    """vLLM puts a chat request's ``prompt_logprobs`` on the response, not on a choice."""
    if body.prompt_logprobs is None or not outs:
        return {}
    return {"prompt_logprobs": vllm_prompt_logprobs(state, outs[0])}


def _ask_prompt_logprobs(params: Any, n: int | None) -> None:
    """Ask the engine for prompt logprobs (``n`` alternatives; the larger of two asks). The
    prompt is scored once; every choice of ``params.n`` gets the same scores, and a stream
    sends them in each choice's first chunk."""
    if n is not None:
        params.prompt_logprobs = max(n, params.prompt_logprobs or 0)


def chat_logprobs(state: ServerState, lps: list[TokenLogprob]) -> dict[str, Any]:
    text_of = _token_text(state)

    def entry(tid: int, logprob: float) -> dict[str, Any]:
        tok = text_of(tid)
        return {"token": tok, "logprob": logprob, "bytes": list(tok.encode("utf-8"))}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in (lp.top or {}).items()]}
            for lp in lps
        ]
    }


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Chat messages as the tokenizer's chat template takes them."""
    out = []
    for m in messages:
        msg: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = m.tool_calls
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


async def _run(request: Request, gen: GenerationStream) -> list[RequestOutput]:
    """Every choice's last output, by index (one for ``n == 1``)."""

    async def choices() -> list[RequestOutput]:
        last: dict[int, RequestOutput] = {}
        async for out in gen:
            last[out.index] = out
        return [last[i] for i in sorted(last)]

    try:
        return await watch_disconnect(request, choices())
    finally:
        await gen.close()


def usage_of(choices: Iterable[RequestOutput]) -> dict[str, int]:
    """Usage of a request: its prompt once, the completion tokens of every choice."""
    prompt = completion = 0
    for out in choices:
        prompt = len(out.prompt_token_ids)
        completion += len(out.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# --------------------------------------------------------------------------------------


@router.post("/completions", responses=STREAM_OR_JSON)
async def completions(body: CompletionRequest, request: Request) -> Any:
    state = get_state(request)
    check_model(state, body.model)
    if isinstance(body.prompt, str):
        ids = await state.encode(body.prompt)
        if not ids:
            raise APIError(400, "prompt is empty after tokenization", param="prompt", code="invalid_value")
        prompt_text = body.prompt
    else:
        ids = list(body.prompt)
        state.check_ids(ids, "prompt")
        prompt_text = None
    max_tokens = state.resolve_max_tokens(body.max_tokens, len(ids), default=16)
    temperature = OPENAI_DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    params = build_params(
        lambda: body.sampling_params(max_tokens=max_tokens, temperature=temperature, logprobs=body.logprobs,
                                     defaults=state.sampling_defaults)
    )
    spec = body.response_format.structured_outputs() if body.response_format is not None else None
    if spec is not None:
        await constrain(state, params, spec, "response_format")
    # OpenAI's way to score a text (what evaluation harnesses send): with echo, the prompt
    # tokens come back with their logprobs too; vLLM's prompt_logprobs field asks directly.
    scores_prompt = body.echo and body.logprobs is not None
    _ask_prompt_logprobs(params, body.logprobs if scores_prompt else None)
    _ask_prompt_logprobs(params, body.prompt_logprobs)
    gen = await state.open(request, ids, params, prompt_text, priority=body.priority)
    created = int(time.time())
    cid = f"cmpl-{gen.request_id}"
    echo = (prompt_text if prompt_text is not None else state.tokenizer.decode(ids)) if body.echo else ""

    def base() -> dict[str, Any]:
        return {"id": cid, "object": "text_completion", "created": created, "model": state.model_name}

    if not body.stream:
        outs = await _run(request, gen)
        choices = []
        for out in outs:
            choice: dict[str, Any] = {
                "index": out.index,
                "text": echo + out.text,
                "logprobs": None,
                "finish_reason": _finish_reason(out),
            }
            if params.logprobs is not None:
                choice["logprobs"] = completion_logprobs(state, new_logprobs(out, 0), len(echo))
                if scores_prompt:
                    choice["logprobs"] = _with_prompt_logprobs(state, out, choice["logprobs"])
            if body.prompt_logprobs is not None:
                choice["prompt_logprobs"] = vllm_prompt_logprobs(state, out)
            choices.append(choice)
        return JSONResponse({**base(), "choices": choices, "usage": usage_of(outs)})

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)

    text_len = [len(echo)] * params.n

    def completion_choice(out: RequestOutput, lps: Any, first: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": out.index,
            "text": out.delta_text,
            "logprobs": None,
            "finish_reason": _finish_reason(out),
        }
        if params.logprobs is not None:
            choice["logprobs"] = completion_logprobs(state, lps, text_len[out.index])
        if first and body.prompt_logprobs is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(state, out)
        text_len[out.index] += len(out.delta_text)
        return choice

    def echo_opening(out: RequestOutput) -> dict[str, Any]:
        """A choice opens with the echoed prompt: its text, and the prompt tokens' scores."""
        choice: dict[str, Any] = {"index": out.index, "text": echo, "logprobs": None, "finish_reason": None}
        if scores_prompt:
            choice["logprobs"] = _with_prompt_logprobs(state, out, completion_logprobs(state, [], len(echo)))
        if body.prompt_logprobs is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(state, out)
        return {**base(), "choices": [choice]}

    fast = None
    if params.logprobs is None and not continuous and params.n == 1:
        # Mid-stream chunks from a template (same bytes as event() of the dict above).
        head = f'data: {json_head(base())},"choices":[{{"index":0,"text":'
        tail = f',"logprobs":null,"finish_reason":null}}]{_USAGE_NULL if include_usage else ""}}}\n\n'

        def fast(out: RequestOutput) -> bytes:
            return (head + json_str(out.delta_text) + tail).encode()

    opening = echo_opening if body.echo else None
    chunks = guarded_stream(gen, _openai_chunks(gen, base, opening, completion_choice, include_usage, continuous, fast))
    return EventStreamResponse(chunks)


@router.post("/chat/completions", responses=STREAM_OR_JSON)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    state = get_state(request)
    check_model(state, body.model)
    plan = ToolPlan.of(body, state.settings.tool_call_parser)
    prompt = state.chat_prompt(
        template_messages(body.messages), add_generation_prompt=body.add_generation_prompt,
        tools=plan.template_tools() if plan.mode != "none" else None,
    )
    # The template already spells out BOS and friends; letting the tokenizer add them
    # again would double them.
    ids = await state.encode(prompt, add_special_tokens=False)
    requested = body.requested_max_tokens()
    max_tokens = state.resolve_max_tokens(requested, len(ids), default=None, prompt_param="messages")
    temperature = OPENAI_DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    params = build_params(
        lambda: body.sampling_params(max_tokens=max_tokens, temperature=temperature, logprobs=body.logprobs_n(),
                                     defaults=state.sampling_defaults)
    )
    spec = body.response_format.structured_outputs() if body.response_format is not None else None
    if spec is not None and plan.constrained:
        raise APIError(400, "response_format cannot be combined with tool_choice required or a named function",
                       param="response_format", code="invalid_value")
    if spec is not None:
        await constrain(state, params, spec, "response_format")
    if plan.constrained:
        await constrain(state, params, plan.structured_outputs(), "tools")
    _ask_prompt_logprobs(params, body.prompt_logprobs)
    gen = await state.open(request, ids, params, prompt, priority=body.priority)
    created = int(time.time())
    cid = f"chatcmpl-{gen.request_id}"

    def base() -> dict[str, Any]:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_name}

    if plan.mode != "none":
        if not body.stream:
            outs = await _run(request, gen)
            choices = []
            for out in outs:
                content, calls = plan.parse(out.text)
                message: dict[str, Any] = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = calls
                choices.append({
                    "index": out.index,
                    "message": message,
                    "logprobs": chat_logprobs(state, new_logprobs(out, 0)) if params.logprobs is not None else None,
                    "finish_reason": _tool_finish_reason(out, calls),
                })
            return JSONResponse({**base(), "object": "chat.completion", "choices": choices, "usage": usage_of(outs),
                                 **_chat_prompt_logprobs(state, body, outs)})
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStreamResponse(guarded_stream(gen, _tool_chunks(
            gen, base, plan, params.n, include_usage, lambda out: _chat_prompt_logprobs(state, body, [out]))))

    if not body.stream:
        outs = await _run(request, gen)
        choices = [
            {
                "index": out.index,
                "message": {"role": "assistant", "content": out.text},
                "logprobs": chat_logprobs(state, new_logprobs(out, 0)) if params.logprobs is not None else None,
                "finish_reason": _finish_reason(out),
            }
            for out in outs
        ]
        return JSONResponse({**base(), "object": "chat.completion", "choices": choices, "usage": usage_of(outs),
                             **_chat_prompt_logprobs(state, body, outs)})

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)

    def chat_choice(out: RequestOutput, lps: Any, first: bool) -> dict[str, Any]:
        return {
            "index": out.index,
            "delta": {"content": out.delta_text} if out.delta_text else {},
            "logprobs": chat_logprobs(state, lps) if params.logprobs is not None else None,
            "finish_reason": _finish_reason(out),
        }

    opened = False

    def chat_opening(out: RequestOutput) -> dict[str, Any]:
        """A choice opens with the assistant's role; the stream's first chunk also carries
        the response's ``prompt_logprobs`` (on the response, as without stream)."""
        nonlocal opened
        chunk: dict[str, Any] = {
            **base(),
            "choices": [
                {"index": out.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}
            ],
            **({"usage": None} if include_usage else {}),
            **({} if opened else _chat_prompt_logprobs(state, body, [out])),
        }
        opened = True
        return chunk

    fast = None
    if params.logprobs is None and not continuous and params.n == 1:
        head = f'data: {json_head(base())},"choices":[{{"index":0,"delta":'
        tail = f',"logprobs":null,"finish_reason":null}}]{_USAGE_NULL if include_usage else ""}}}\n\n'
        empty = (head + "{}" + tail).encode()

        def fast(out: RequestOutput) -> bytes:
            if not out.delta_text:
                return empty
            return (head + '{"content":' + json_str(out.delta_text) + "}" + tail).encode()

    chunks = guarded_stream(gen, _openai_chunks(gen, base, chat_opening, chat_choice, include_usage, continuous, fast))
    return EventStreamResponse(chunks)


def _tool_finish_reason(out: RequestOutput, calls: list[dict[str, Any]]) -> str | None:
    reason = _finish_reason(out)
    return "tool_calls" if calls and reason == "stop" else reason


async def _tool_chunks(
    gen: Any, base: Callable[[], dict[str, Any]], plan: ToolPlan, n: int, include_usage: bool,
    response_fields: Callable[[RequestOutput], dict[str, Any]],
) -> AsyncIterator[bytes]:
    """The chat stream of a request with tools, chunked as OpenAI sends tool calls: per
    call a first delta with its ``id``, ``type`` and ``function.name`` (``arguments: ""``),
    then deltas with fragments of ``function.arguments``.

    A named function's arguments stream as they are generated. ``required`` output is a
    JSON array that becomes calls when complete; ``auto`` text streams as content while it
    cannot be (the start of) a tool call, and what was held back is parsed at the end.
    The first chunk also carries ``response_fields`` of the first output (prompt_logprobs)."""

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, **fields: Any) -> bytes:
        body = {**base(), "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return event({**body, **fields})

    def call_deltas(index: int, calls: list[dict[str, Any]]) -> list[bytes]:
        parts = []
        for k, call in enumerate(calls):
            fn = call["function"]
            head = {"index": k, "id": call["id"], "type": "function", "function": {"name": fn["name"], "arguments": ""}}
            parts.append(chunk(index, {"tool_calls": [head]}))
            parts.append(chunk(index, {"tool_calls": [{"index": k, "function": {"arguments": fn["arguments"]}}]}))
        return parts

    texts = [""] * n
    sent = [0] * n  # characters of each choice's text already sent (as content or arguments)
    lasts: dict[int, RequestOutput] = {}
    named_ids = [call_id() for _ in range(n)]

    def opening(first: RequestOutput) -> list[bytes]:
        role = {"role": "assistant", "content": None if plan.constrained else ""}
        parts = [chunk(i, role, **(response_fields(first) if i == 0 else {})) for i in range(n)]
        if plan.mode == "named":
            parts += [chunk(i, {"tool_calls": [{"index": 0, "id": named_ids[i], "type": "function",
                                                 "function": {"name": plan.name, "arguments": ""}}]})
                      for i in range(n)]
        return parts

    parts: list[bytes] = []
    opened = False
    finished = False
    async for outs in gen.batches():
        if not opened and outs:
            parts, opened = opening(outs[0]), True
        for out in outs:
            i = out.index
            lasts[i] = out
            texts[i] += out.delta_text
            text = texts[i]
            if plan.mode == "named":
                if len(text) > sent[i]:
                    args = {"tool_calls": [{"index": 0, "function": {"arguments": text[sent[i]:]}}]}
                    parts.append(chunk(i, args))
                    sent[i] = len(text)
            elif plan.mode == "auto":
                safe = plan.content_prefix(text)
                if safe > sent[i]:
                    parts.append(chunk(i, {"content": text[sent[i]:safe]}))
                    sent[i] = safe
            if out.finish_reason is None:
                continue
            # The choice is done: what was held back becomes calls or content.
            content, calls = plan.parse(text)
            if plan.mode == "named":
                calls = [{**calls[0], "id": named_ids[i]}] if calls else []
            elif calls:
                parts += call_deltas(i, calls)
                rest = (content or "")[sent[i]:] if plan.mode == "auto" else ""
                if rest.strip():
                    parts.append(chunk(i, {"content": rest}))
            elif len(text) > sent[i]:
                parts.append(chunk(i, {"content": text[sent[i]:]}))
            parts.append(chunk(i, {}, _tool_finish_reason(out, calls)))
            finished = finished or out.finished
        if finished:
            if include_usage:
                parts.append(event({**base(), "choices": [], "usage": usage_of(lasts.values())}))
            parts.append(DONE)
        if parts:
            yield b"".join(parts)
            parts = []
        if finished:
            return
    if include_usage and lasts:
        yield event({**base(), "choices": [], "usage": usage_of(lasts.values())})
    yield DONE


@router.get("/models")
async def models(request: Request) -> JSONResponse:
    state = get_state(request)
    state.require_engine()
    card = {
        "id": state.model_name,
        "object": "model",
        "created": int(state.started_at),
        "owned_by": "stream-attention",
        "max_model_len": state.max_model_len,
        "vocab_size": len(state.tokenizer) if state.tokenizer is not None else None,
    }
    return JSONResponse({"object": "list", "data": [card]})


async def _openai_chunks(
    gen: Any,
    base: Callable[[], dict[str, Any]],
    opening: Callable[[RequestOutput], dict[str, Any]] | None,
    make_choice: Callable[[RequestOutput, Any, bool], dict[str, Any]],
    include_usage: bool,
    continuous: bool,
    fast: Callable[[RequestOutput], bytes] | None = None,
) -> AsyncIterator[bytes]:
    """The SSE frame both OpenAI streaming routes share: per choice an optional opening
    chunk made from its first output (``opening``), one chunk per non-empty output (choices
    interleaved, each chunk naming its ``index``), the usage chunk when asked for,
    ``[DONE]``; failures after the 200 went out become error events
    (:func:`.errors.guarded_stream`).

    ``make_choice(out, logprobs, first)`` is told whether its chunk is the choice's first
    (no opening chunk came before it): what a stream sends once per choice goes there.
    ``fast`` writes a later mid-stream chunk (not a choice's last, no logprobs) from a
    template. Outputs that arrived together go out in one write, still one chunk each."""
    seen: dict[int, int] = {}
    started: set[int] = set()  # choices whose first chunk went out
    lasts: dict[int, RequestOutput] = {}
    last: RequestOutput | None = None
    ended = False
    async for outs in gen.batches():
        parts: list[bytes] = []
        for out in outs:
            last = lasts[out.index] = out
            done = seen.get(out.index, 0)
            lps = new_logprobs(out, done)
            seen[out.index] = done + len(out.delta_token_ids)
            first = out.index not in started
            if first and opening is not None:
                parts.append(event(opening(out)))
                started.add(out.index)
                first = False
            choice_done = out.finish_reason is not None
            if not out.delta_text and not out.delta_token_ids and not choice_done:
                continue
            started.add(out.index)
            if fast is not None and not choice_done and not first:
                parts.append(fast(out))
                continue
            chunk = {**base(), "choices": [make_choice(out, lps, first)]}
            if include_usage:
                chunk["usage"] = usage_of(lasts.values()) if continuous else None
            parts.append(event(chunk))
        if last is not None and last.finished:
            # The end of the stream shares the last chunk's write.
            if include_usage:
                parts.append(event({**base(), "choices": [], "usage": usage_of(lasts.values())}))
            parts.append(DONE)
            ended = True
        if parts:
            yield parts[0] if len(parts) == 1 else b"".join(parts)
    if not ended:
        if include_usage and last is not None:
            yield event({**base(), "choices": [], "usage": usage_of(lasts.values())})
        yield DONE
