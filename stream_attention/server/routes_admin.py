"""Operational routes: ``/health``, ``/ready``, ``/metrics``, ``/memory``, ``/benchmark``."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import TypeAdapter, ValidationError
from starlette.responses import JSONResponse, PlainTextResponse, Response

from .. import __version__
from .errors import APIError
from .limits import JSONBodyRoute
from .memory import snapshot
from .openapi import ERROR_RESPONSES
from .routes_generate import get_state
from .schemas import GenerationBenchmarkRequest, KernelBenchmarkRequest

router = APIRouter(tags=["operations"], route_class=JSONBodyRoute, responses=ERROR_RESPONSES)

_KERNEL = TypeAdapter(KernelBenchmarkRequest)
_GENERATION = TypeAdapter(GenerationBenchmarkRequest)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness: 200 while the process can serve (or is still loading its model, or its
    engine is being restarted); 503 once the engine has died for good (its supervisor gave
    up), so an orchestrator restarts the container. Never needs the API key; never waits
    on the engine."""
    state = get_state(request)
    body = {"status": "ok", "uptime_s": time.time() - state.started_at, "version": __version__}
    if state.engine_dead:
        return JSONResponse({**body, "status": "engine stopped"}, status_code=503)
    return JSONResponse(body)


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 once the model is loaded and the server is not draining, else 503."""
    state = get_state(request)
    if state.ready:
        return JSONResponse({"status": "ready", "model": state.model_name, "device": state.device})
    if state.draining:
        status = "draining"
    elif state.load_error or state.engine_dead:
        status = "failed"
    elif state.engine is not None:
        status = "restarting"
    else:
        status = "loading"
    body: dict[str, Any] = {"status": status}
    if state.load_error:
        body["error"] = state.load_error
    return JSONResponse(body, status_code=503, headers=state.retry_headers())


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/memory")
async def memory(request: Request, reset_peak: bool = False) -> JSONResponse:
    """Memory profile: host RSS, CUDA allocator per device, KV-cache pool and engine stats."""
    state = get_state(request)
    return JSONResponse(snapshot(state.stats(), reset_peak=reset_peak, engine=state.engine))


@router.post("/benchmark")
async def benchmark(request: Request) -> JSONResponse:
    """Kernel benchmark (``{"kind": "kernel", "seq_lens": [...]...}``, the default) or
    generation benchmark (``{"kind": "generation", "num_requests": 8, ...}``)."""
    state = get_state(request)
    if not state.settings.benchmark_enabled:
        raise APIError(
            404, "/benchmark is disabled on this server (STREAM_ATTENTION_BENCHMARK_ENABLED)", code="disabled"
        )
    data = await request.json() if (await request.body()).strip() else {}
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_value")
    kind = data.get("kind", "kernel")
    adapter = {"kernel": _KERNEL, "generation": _GENERATION}.get(kind)
    if adapter is None:
        raise APIError(400, f"kind={kind!r}: expected 'kernel' or 'generation'", param="kind", code="invalid_value")
    try:
        spec = adapter.validate_python(data)
    except ValidationError as exc:
        # Same 400 shape as the routes FastAPI validates.
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from exc
    if kind == "generation":
        state.require_engine()
    return JSONResponse(await request.app.state.benchmark.run(spec))
