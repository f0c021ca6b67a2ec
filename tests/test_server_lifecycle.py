"""Starting and stopping ``stream-attention-serve`` as a real process.

A taken port must fail the command before any model is loaded, and SIGINT (Ctrl+C) or
SIGTERM must let in-flight requests finish within ``--shutdown-timeout`` (ending those
that overrun with ``finish_reason: abort``) and exit 0 without a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(port: int, *flags: str, cwd: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_ATTENTION_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.Popen(
        [sys.executable, "-m", "stream_attention.server", "--port", str(port), "--max-num-seqs", "4", *flags],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@contextlib.contextmanager
def _ready_server(tmp_path: Path, *flags: str, timeout: float = 60.0):
    """A started, ready ``stream-attention-serve`` and a client on it; killed on the way out
    if the test left it running."""
    port = _free_port()
    proc = _serve(port, *flags, cwd=tmp_path)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=timeout) as client:
            _wait_ready(proc, client)
            yield proc, client, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _wait_ready(proc: subprocess.Popen[str], client: httpx.Client, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()
        try:
            if client.get("/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.25)


@pytest.mark.slow
def test_taken_port_fails_before_loading_the_model(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = _serve(port, cwd=tmp_path)
        try:
            # Generous for a loaded 2-core machine: the process only imports the package.
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert proc.returncode != 0
    assert f"127.0.0.1:{port}" in err and "in use" in err, err
    assert "Traceback" not in err
    # Nothing past the bind ran: no model, no "serving on" line.
    assert "serving on" not in out + err and "engine ready" not in out + err and "Loading weights" not in err


def _stream_and_signal(
    proc: subprocess.Popen[str], client: httpx.Client, sig: signal.Signals, max_tokens: int
) -> tuple[list[dict], float]:
    """Stream a generation, send ``sig`` after its second event, read it to the end.
    Returns the events and the seconds from the signal to the end of the stream."""
    body = {"prompt": "def f(x):", "max_tokens": max_tokens, "ignore_eos": True}
    events: list[dict] = []
    sent_at = 0.0
    with client.stream("POST", "/generate_stream", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if len(events) == 2:
                    proc.send_signal(sig)
                    sent_at = time.monotonic()
    return events, time.monotonic() - sent_at


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_drains_in_flight_stream_then_exits_zero(tmp_path: Path, sig: signal.Signals) -> None:
    with _ready_server(tmp_path, "--shutdown-timeout", "60") as (proc, client, _):
        events, _ = _stream_and_signal(proc, client, sig, max_tokens=24)
        # The stream in flight at the signal ran to its end.
        assert events[-1]["finish_reason"] == "length"
        assert events[-1]["usage"]["completion_tokens"] == 24
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in out + err, err
    assert "server stopped" in err  # the lifespan ran to its end: engine shut down


@pytest.mark.slow
def test_shutdown_timeout_ends_overrunning_stream_cleanly(tmp_path: Path) -> None:
    with _ready_server(tmp_path, "--shutdown-timeout", "1") as (proc, client, _):
        # Far more tokens than a CPU decodes in the one second of grace.
        events, ended_after = _stream_and_signal(proc, client, signal.SIGTERM, max_tokens=1900)
        # Aborted, but as a complete response: the last event says so.
        assert events[-1]["finish_reason"] == "abort"
        assert events[-1]["usage"]["completion_tokens"] < 1900
        # One second of grace plus the time an abort takes to reach the stream
        # (an engine step on a loaded 2-core machine).
        assert ended_after < 15, ended_after
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in out + err, err


def test_open_file_limit_is_raised_for_many_streams() -> None:
    """A thousand streams need a thousand sockets: the server raises a low soft limit
    (within the hard one) before it listens."""
    resource = pytest.importorskip("resource")
    from stream_attention.server.cli import raise_open_file_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        low = min(256, soft) if soft != resource.RLIM_INFINITY else 256
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
        got = raise_open_file_limit(4096)
        want = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
        assert got == want == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_keep_alive_outlasts_client_pools() -> None:
    """An idle connection must stay open longer than common client pools keep theirs
    (httpx expires idle connections after 5 s): with equal timeouts a client can send a
    request into a socket the server is closing and get a reset, not an answer."""
    from stream_attention.server.cli import uvicorn_options
    from stream_attention.server.settings import ServerSettings

    assert uvicorn_options(ServerSettings())["timeout_keep_alive"] > httpx.Limits().keepalive_expiry
    assert uvicorn_options(ServerSettings(timeout_keep_alive=7))["timeout_keep_alive"] == 7


@pytest.mark.slow
def test_timeout_keep_alive_closes_idle_connections(tmp_path: Path) -> None:
    with _ready_server(tmp_path, "--timeout-keep-alive", "1") as (_, _, port), \
            socket.create_connection(("127.0.0.1", port), timeout=10.0) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        received, t0 = b"", time.monotonic()
        while chunk := sock.recv(65536):  # ends when the server closes the idle connection
            received += chunk
        assert received.startswith(b"HTTP/1.1 200") and received.count(b"HTTP/1.1") == 1
        assert 0.5 < time.monotonic() - t0 < 5.0
