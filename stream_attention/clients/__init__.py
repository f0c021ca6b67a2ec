"""Clients of the StreamAttention server.

- :class:`Client` / :class:`AsyncClient`: every route, with retries on 429/503;
- ``stream-attention-client``: stream tokens to the terminal (:mod:`.cli`);
- ``stream-attention-loadgen``: throughput and TTFT/ITL/e2e percentiles (:mod:`.loadgen`).
"""

from .client import APIError, AsyncClient, Client, Generation, StreamEvent, parse_metrics

__all__ = ["APIError", "AsyncClient", "Client", "Generation", "StreamEvent", "parse_metrics"]
