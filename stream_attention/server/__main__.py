"""``python -m stream_attention.server``: the same as ``stream-attention-serve``."""

from .cli import main

raise SystemExit(main())
