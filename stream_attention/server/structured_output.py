"""Compiling a request's structured-output constraint before it is queued.

The grammar is compiled in the server's thread pool, bounded by ``--grammar-compile-timeout``,
so the engine's step loop only ever finds it in the compile cache and other requests never
wait on a slow schema. A schema, regex or grammar that cannot be compiled (or uses a JSON
schema keyword constrained decoding cannot enforce) is a 400 naming the field.
"""

from __future__ import annotations

import asyncio

from ..engine.types import SamplingParams, StructuredOutputsParams
from . import engine_bridge as bridge
from .errors import APIError
from .state import ServerState


async def constrain(state: ServerState, params: SamplingParams, spec: StructuredOutputsParams, param: str) -> None:
    """Compile ``spec`` off the event loop and attach it to ``params``; 400 naming ``param``
    if it does not compile in time or at all."""
    engine = state.require_engine()
    timeout = state.settings.grammar_compile_timeout
    try:
        await asyncio.wait_for(asyncio.to_thread(bridge.compile_grammar, engine, spec), timeout)
    except TimeoutError as exc:
        raise APIError(
            400, f"{param}: compiling the constraint took longer than {timeout:g} s", param=param,
            code="grammar_timeout",
        ) from exc
    except ImportError as exc:
        raise APIError(400, f"{param}: structured output needs xgrammar on the server ({exc})", param=param,
                       code="unsupported") from exc
    except ValueError as exc:
        raise APIError(400, f"{param}: {exc}", param=param, code="invalid_value") from exc
    params.structured_outputs = spec
