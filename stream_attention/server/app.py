"""The FastAPI application: ``create_app(settings, engine=None)``.

The app is a thin translation layer: HTTP in, :mod:`stream_attention.engine` requests
out, engine outputs back as JSON or SSE. Cross-cutting concerns live in one ASGI
middleware (request IDs, API key, body size, metrics, access log); the engine loads in
the background so ``/health`` answers while weights are still being read.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import prometheus_client
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from . import engine_bridge as bridge
from .benchmark import BenchmarkRunner
from .errors import error_body, install_error_handlers
from .limits import RequestLimits
from .metrics import ServerMetrics
from .openapi import document_errors_as_sent
from .routes_admin import router as admin_router
from .routes_generate import router as generate_router
from .routes_openai import router as openai_router
from .routes_tokenize import router as tokenize_router
from .settings import ServerSettings
from .state import ClientGone, ServerState, request_id_var

log = logging.getLogger("stream_attention.server")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Routes polled by machines; their access-log lines go to DEBUG.
_QUIET = {"/health", "/ready", "/metrics"}
_MONITORING = frozenset({"/metrics", "/memory"})
_READ_HEADERS = frozenset({b"x-request-id", b"authorization", b"content-length"})


class ServerMiddleware:
    """Request ID, API key, body-size limit, per-route metrics and the access log."""

    def __init__(self, app: ASGIApp, state: ServerState, routes: set[str | None]) -> None:
        self.app = app
        self.state = state
        self.routes = routes
        # Liveness must answer an orchestrator that holds no key; monitoring only when asked.
        self.public = {"/health"} | (_MONITORING if state.settings.public_metrics else set())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        settings = state.settings
        # One pass over the raw headers for the three this middleware reads.
        wanted = {}
        for name, value in scope["headers"]:
            if name in _READ_HEADERS:
                wanted.setdefault(name, value.decode("latin-1"))
        offered = wanted.get(b"x-request-id", "")
        from_client = bool(_REQUEST_ID_RE.match(offered))
        rid = offered if from_client else uuid.uuid4().hex
        scope.setdefault("state", {}).update(request_id=rid, request_id_from_client=from_client)
        token = request_id_var.set(rid)
        path = scope["path"]
        route = path if path in self.routes else "other"
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        async def reply(code: int, body: dict[str, Any], extra: dict[str, str] | None = None) -> None:
            response = Response(
                json.dumps(body), status_code=code, media_type="application/json", headers=extra or None
            )
            await response(scope, receive, send_with_id)

        state.in_flight += 1
        state.metrics.http_in_progress.inc()
        try:
            key = settings.api_key_value()
            if key and path not in self.public and not _authorized(wanted.get(b"authorization", ""), key):
                await reply(
                    401,
                    error_body(401, "missing or invalid API key (Authorization: Bearer <key>)", code="invalid_api_key"),
                    {"WWW-Authenticate": "Bearer"},
                )
                return
            length = wanted.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > settings.max_request_bytes:
                await reply(
                    413, error_body(413, f"request body exceeds {settings.max_request_bytes} bytes", code="too_large")
                )
                return
            received = 0
            too_large = False

            async def bounded_receive() -> Message:
                # A chunked body has no Content-Length to check up front: answer 413 as
                # soon as it overflows, then tell the app the client is gone.
                nonlocal received, too_large
                message = await receive()
                if message["type"] == "http.request" and not too_large:
                    received += len(message.get("body", b""))
                    if received > settings.max_request_bytes and not started:
                        too_large = True
                        await reply(
                            413,
                            error_body(
                                413, f"request body exceeds {settings.max_request_bytes} bytes", code="too_large"
                            ),
                        )
                        return {"type": "http.disconnect"}
                return message

            async def app_send(message: Message) -> None:
                if too_large:
                    return
                if started:  # body chunks (one per SSE write) go straight to the server
                    await send(message)
                else:
                    await send_with_id(message)

            try:
                await self.app(scope, bounded_receive, app_send)
            except Exception:
                if not too_large:
                    raise
        finally:
            state.in_flight -= 1
            elapsed = time.perf_counter() - start
            m = state.metrics
            m.http_in_progress.dec()
            m.http_requests.labels(route=route, method=scope["method"], status=str(status)).inc()
            m.http_duration.labels(route=route).observe(elapsed)
            level = logging.DEBUG if path in _QUIET and status < 400 else logging.INFO
            log.log(level, "%s %s %d %.1fms", scope["method"], path, status, elapsed * 1e3)
            request_id_var.reset(token)


def _authorized(header: str, key: str) -> bool:
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every log record (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def configure_logging(level: str = "info") -> None:
    """Log lines that carry the request ID, for the server and the engine alike."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger("stream_attention")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def create_app(
    settings: ServerSettings | None = None,
    engine: Any = None,
    *,
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """Build the app.

    Args:
        settings: server settings (default: from environment and ``.env``).
        engine: an already started engine to serve; the caller keeps ownership (it is not
            shut down with the app). ``None`` builds one from ``settings`` at startup,
            in the background, and shuts it down with the app.
        on_load_failure: called if building the engine fails (the CLI exits on it).
    """
    settings = settings or ServerSettings()
    state = ServerState(settings=settings)
    # The _created series double every counter's cardinality and no dashboard reads them.
    prometheus_client.disable_created_metrics()
    state.metrics = ServerMetrics(
        state.stats,
        info={
            "version": __version__,
            "model": settings.model or "default",
            "dtype": settings.dtype,
            "kv_cache_dtype": settings.kv_cache_dtype,
            "kv_compression": settings.kv_compression,
        },
        engine=lambda: state.engine,
    )

    async def load() -> None:
        try:
            built = await asyncio.to_thread(bridge.build_engine, settings, on_load_failure)
            await bridge.start(built)
            state.attach(built)
            log.info("engine ready: model=%s device=%s context=%d", state.model_name, state.device, state.max_model_len)
        except Exception as exc:
            state.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("engine failed to load")
            if on_load_failure is not None:
                on_load_failure(exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = engine is None
        loader = None
        state.draining = False  # an app may be started again after a shutdown (tests, embedding)
        if engine is not None:
            state.attach(engine)
            await bridge.start(engine)
        else:
            loader = asyncio.create_task(load())
        try:
            yield
        finally:
            state.draining = True
            deadline = time.monotonic() + settings.shutdown_timeout
            while state.in_flight > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if state.in_flight:
                log.warning("shutting down with %d requests still in flight", state.in_flight)
            if loader is not None and not loader.done():
                loader.cancel()
            if owned and state.engine is not None:
                try:
                    await bridge.shutdown(state.engine)
                except Exception:  # the process is going away either way; say why it was untidy
                    log.exception("engine shutdown failed")
            log.info("server stopped")

    extra: dict[str, Any] = {}
    if not settings.telemetry and "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        # FastAPI's native OpenTelemetry hook asks the global providers (environment
        # lookups) on every request even when no SDK is configured: ~0.1 ms a request.
        extra["telemetry"] = {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(
        title="StreamAttention server",
        version=__version__,
        description="LLM generation on StreamAttention's fused-attention engine: REST, SSE, OpenAI-compatible.",
        lifespan=lifespan,
        **extra,
    )
    app.state.server = state
    app.state.limits = RequestLimits.from_settings(settings)
    app.state.benchmark = BenchmarkRunner(state)
    install_error_handlers(app)
    document_errors_as_sent(app)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        # Nobody reads this; 499 (nginx's "client closed request") keeps it apart in metrics.
        return Response(status_code=499)

    for router in (generate_router, openai_router, tokenize_router, admin_router):
        app.include_router(router)
    # Metric labels use the route template, never the raw path, so a scan of random
    # URLs cannot blow up the series count.
    routes = {getattr(r, "path", None) for rt in (app, generate_router, openai_router, tokenize_router, admin_router) for r in rt.routes}
    routes.discard(None)
    app.add_middleware(ServerMiddleware, state=state, routes=routes)
    origins = settings.cors_origins()
    if origins:
        # Outside ServerMiddleware: a browser's preflight carries no API key.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    return app


def begin_shutdown(app: FastAPI) -> None:
    """Start a graceful shutdown (the server's signal handler calls this in the event loop).

    New requests are refused (503, ``/ready`` says draining) while running ones go on;
    whatever still runs after ``shutdown_timeout`` is aborted in the engine, so its
    stream ends with ``finish_reason: abort`` and a complete response instead of a
    connection cut mid-body.
    """
    state: ServerState = app.state.server
    state.draining = True

    async def abort_running() -> None:
        running = [gen for gen in state.streams if not gen.finished]
        if running:
            log.warning("shutdown timeout: aborting %d running requests", len(running))
        for gen in running:
            try:
                await bridge.abort(gen.engine, gen.request_id)
            except Exception:
                log.exception("abort of %s failed", gen.request_id)

    loop = asyncio.get_running_loop()
    loop.call_later(state.settings.shutdown_timeout, lambda: loop.create_task(abort_running()))
