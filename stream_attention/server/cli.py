"""``stream-attention-serve``: settings from flags/env/.env, then uvicorn."""

from __future__ import annotations

import logging
import sys
from typing import Any

from .settings import ServerSettings, settings_from_args

log = logging.getLogger("stream_attention.server")


def uvicorn_implementations() -> dict[str, str]:
    """The event loop and HTTP parser uvicorn's "auto" picks here: uvloop and httptools
    when installed (about 30% less event-loop CPU per streamed token than asyncio + h11)."""
    import importlib.util

    return {
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
    }


def uvicorn_options(settings: ServerSettings) -> dict[str, Any]:
    """``uvicorn.Config`` options of ``stream-attention-serve`` (``benchmarks/bench_server.py``
    serves with the same), less the bind address."""
    return {
        "log_level": settings.log_level,
        "access_log": False,  # the app logs each request with its request ID
        "timeout_graceful_shutdown": int(settings.drain_timeout) if settings.drain_timeout else None,
        "proxy_headers": True,
        "loop": "auto",
        "http": "auto",
    }


def serve(settings: ServerSettings) -> int:
    """Run the server until SIGINT/SIGTERM; in-flight requests drain for ``drain_timeout``.

    Returns the process exit status: 1 if the model failed to load.
    """
    import uvicorn

    from .app import configure_logging, create_app

    configure_logging(settings.log_level)
    server: uvicorn.Server | None = None
    failed: list[BaseException] = []

    def on_load_failure(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_failure=on_load_failure)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, **uvicorn_options(settings))
    server = uvicorn.Server(config)
    impl = uvicorn_implementations()
    log.info("serving on http://%s:%d (event loop %s, HTTP %s)", settings.host, settings.port, impl["loop"], impl["http"])
    server.run()
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    try:
        settings = settings_from_args(argv)
        # Checked before binding the port: a bad engine option (e.g. a KV format this
        # build lacks) should fail the command, not a background load a minute later.
        from .engine_bridge import engine_config

        engine_config(settings)
    except Exception as exc:  # pydantic's ValidationError / ValueError name the field; no traceback needed
        print(f"stream-attention-serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    return serve(settings)


if __name__ == "__main__":
    raise SystemExit(main())
