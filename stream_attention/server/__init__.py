"""The HTTP inference server: ``create_app`` and its settings.

Run it with ``stream-attention-serve`` (or ``python -m stream_attention.server``); build
the ASGI app in code with :func:`create_app`.
"""

from .app import create_app
from .settings import ServerSettings

__all__ = ["create_app", "ServerSettings"]
