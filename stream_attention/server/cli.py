"""``stream-attention-serve``: settings from flags/env/.env, then uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
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
        "timeout_graceful_shutdown": settings.shutdown_timeout,
        "timeout_keep_alive": settings.timeout_keep_alive,
        "proxy_headers": True,
        "loop": "auto",
        "http": "auto",
    }


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``, bound before anything slow happens so that
    a taken port fails the command at once rather than after the model has loaded.

    Raises ``OSError`` whose message names the address.
    """
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP
    # (accepted sockets inherit it); without it Nagle + delayed ACK hold SSE events back.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not SO_REUSEPORT: a taken port must fail
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


# Past shutdown_timeout the app aborts what still runs; uvicorn cancels what has not ended
# this much later still (a last resort: a cancelled response is a connection cut mid-body).
_CANCEL_AFTER_ABORT_S = 5.0


def _graceful_server(config: Any, on_signal: Callable[[], None]) -> Any:
    """A ``uvicorn.Server`` for which SIGINT/SIGTERM mean "drain, then exit 0".

    The first signal calls ``on_signal`` in the event loop (the app starts its own drain)
    and uvicorn stops accepting connections and waits for the open ones. uvicorn on its
    own would then raise the captured signal again, so Ctrl+C would end in a
    ``KeyboardInterrupt`` traceback and SIGTERM in death by signal. A second signal still
    cuts the drain short.
    """
    import uvicorn

    class GracefulServer(uvicorn.Server):
        loop: asyncio.AbstractEventLoop | None = None

        async def serve(self, sockets: list[socket.socket] | None = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if first and self.loop is not None:
                # A signal handler may only hand work to the loop (call_soon_threadsafe is
                # safe here); the drain itself runs there.
                self.loop.call_soon_threadsafe(on_signal)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return GracefulServer(config)


def raise_open_file_limit(wanted: int = 65536) -> int:
    """Raise this process's soft limit on open files towards ``wanted`` (within the hard limit).

    Every stream holds a socket: with the common soft limit of 1,024, a server with about a
    thousand open streams fails to accept more and drops connections. Returns the new limit."""
    try:
        import resource
    except ImportError:  # not on POSIX: nothing to raise
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft


def serve(settings: ServerSettings, sock: socket.socket | None = None) -> int:
    """Run the server until SIGINT/SIGTERM; in-flight requests drain for up to
    ``shutdown_timeout`` seconds.

    ``sock``: an already listening socket (:func:`listen_socket`; default: bind
    ``settings.host:settings.port`` now). Returns the process exit status: 0 after a
    signal, 1 if the model failed to load.
    """
    from .app import begin_shutdown, configure_logging, create_app

    configure_logging(settings.log_level)
    raise_open_file_limit()
    if sock is None:
        sock = listen_socket(settings.host, settings.port)
    server: Any = None
    failed: list[BaseException] = []

    def on_load_failure(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    import uvicorn

    app = create_app(settings, on_load_failure=on_load_failure)
    options = uvicorn_options(settings)
    options["timeout_graceful_shutdown"] = settings.shutdown_timeout + _CANCEL_AFTER_ABORT_S
    server = _graceful_server(uvicorn.Config(app, **options), lambda: begin_shutdown(app))
    impl = uvicorn_implementations()
    host, port = sock.getsockname()[:2]
    log.info("serving on http://%s:%d (event loop %s, HTTP %s)", host, port, impl["loop"], impl["http"])
    server.run(sockets=[sock])
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    try:
        settings = settings_from_args(argv)
    except Exception as exc:  # pydantic's ValidationError / ValueError name the field; no traceback needed
        print(f"stream-attention-serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    try:
        sock = listen_socket(settings.host, settings.port)
    except OSError as exc:
        print(f"stream-attention-serve: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        # Checked before serving: a bad engine option (e.g. a KV format this build lacks)
        # should fail the command, not a background load a minute later.
        from .engine_bridge import engine_config

        engine_config(settings)
    except Exception as exc:
        sock.close()
        print(f"stream-attention-serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    return serve(settings, sock)


if __name__ == "__main__":
    raise SystemExit(main())
