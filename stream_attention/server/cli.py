"""``stream-attention-serve``: settings from flags/env/.env, then uvicorn."""

from __future__ import annotations

import logging
import sys

from .settings import ServerSettings, settings_from_args

log = logging.getLogger("stream_attention.server")


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
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # the app logs each request with its request ID
        timeout_graceful_shutdown=int(settings.drain_timeout) if settings.drain_timeout else None,
        proxy_headers=True,
    )
    server = uvicorn.Server(config)
    log.info("serving on http://%s:%d", settings.host, settings.port)
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
