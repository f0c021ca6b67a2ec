"""Clients of the StreamAttention server.

- :class:`Client` / :class:`AsyncClient`: every route, with retries on 429/503;
- ``stream-attention-client``: stream tokens to the terminal (:mod:`.cli`);
- ``stream-attention-loadgen``: throughput, TTFT/ITL/TPOT/e2e percentiles and goodput, over
  request-rate sweeps of synthetic or ShareGPT workloads (:mod:`.loadgen`).
"""

from .client import APIError, AsyncClient, Client, Generation, StreamEvent, parse_metrics

__all__ = ["APIError", "AsyncClient", "Client", "Generation", "StreamEvent", "parse_metrics"]
