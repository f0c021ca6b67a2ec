"""``POST /tokenize`` and ``POST /detokenize`` with vLLM's request and response shapes.

Clients use them to count tokens before sending (``count`` against ``max_model_len``) and to
see exactly what the chat template makes of a conversation: ``messages`` are rendered the
way ``/v1/chat/completions`` renders them, so the ids are the ones generation would see.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from .errors import APIError
from .limits import JSONBodyRoute
from .openapi import ERROR_RESPONSES
from .routes_generate import get_state
from .routes_openai import check_model, template_messages
from .schemas import DetokenizeRequest, TokenizeRequest

router = APIRouter(tags=["tokenize"], route_class=JSONBodyRoute, responses=ERROR_RESPONSES)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
    """``{prompt | messages, add_special_tokens}`` → ``{count, max_model_len, tokens}``."""
    state = get_state(request)
    check_model(state, body.model)
    if body.messages is not None:
        text = state.chat_prompt(template_messages(body.messages), add_generation_prompt=body.add_generation_prompt)
        special = bool(body.add_special_tokens)
    else:
        text = body.prompt or ""
        special = True if body.add_special_tokens is None else body.add_special_tokens
    ids = await state.encode(text, add_special_tokens=special)
    result: dict = {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}
    if body.return_token_strs:
        result["token_strs"] = state.tokenizer.convert_ids_to_tokens(ids)
    return JSONResponse(result)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
    """``{tokens}`` → ``{prompt}``: the text of the ids, special tokens included."""
    state = get_state(request)
    check_model(state, body.model)
    if body.tokens and state.vocab_size and max(body.tokens) >= state.vocab_size:
        raise APIError(
            400, f"tokens: token ids must be < vocabulary size {state.vocab_size}", param="tokens", code="invalid_value"
        )
    return JSONResponse({"prompt": state.tokenizer.decode(body.tokens)})
