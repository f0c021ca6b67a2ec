"""Score modifiers shared by the paged attention kernels: sliding windows and logit soft-capping.

Both are defined on the natural-log scores ``s = softmax_scale * q . k`` of a causal
(bottom-right aligned) query ``i`` over keys ``j`` with ``off = kv_len - q_len``:

* a window of ``window_left`` keeps keys ``i + off - window_left <= j <= i + off``
  (transformers' ``sliding_window = W`` is ``window_left = W - 1``: ``W`` keys including
  the query's own);
* soft-capping (Gemma 2's ``attn_logit_softcapping``) replaces ``s`` by
  ``softcap * tanh(s / softcap)`` before the softmax.

The kernels keep scores in base 2 (``s * log2(e)``), where the cap reads
``c * tanh(x / c)`` with ``c = softcap * log2(e)``: :func:`soft_cap` takes that ``c``
(:func:`softcap_arg`) so the scale folded into the kernels' dot products stays as is.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from .attention_fwd import UNBOUNDED

_LOG2E = 1.0 / math.log(2.0)


@triton.jit
def soft_cap(x, cap_log2):
    """``cap_log2 * tanh(x / cap_log2)``, elementwise, from one ``exp2``.

    ``tanh(y) = 1 - 2 / (e^{2y} + 1)`` saturates cleanly at both ends (``exp2`` giving
    ``inf`` or 0); near 0 its absolute error is a few fp32 ulps of ``cap_log2``, far
    below what a softmax over such scores can resolve.
    """
    e = tl.math.exp2(x * (2.0 * 1.4426950408889634 / cap_log2))
    return cap_log2 - 2.0 * cap_log2 / (e + 1.0)


def window_left_arg(window_left: int | None) -> int:
    """The kernels' runtime window bound: ``window_left`` (``None`` or negative: no window)."""
    if window_left is None or window_left < 0:
        return UNBOUNDED
    return min(int(window_left), UNBOUNDED)


def softcap_arg(softcap: float | None) -> tuple[bool, float]:
    """``(SOFTCAP, cap_log2)`` kernel arguments for a soft-cap (``None`` or 0: none)."""
    if softcap is None or softcap == 0:
        return False, 1.0
    if not softcap > 0 or math.isinf(softcap):
        raise ValueError(f"softcap must be a positive finite number, got {softcap}")
    return True, float(softcap) * _LOG2E
