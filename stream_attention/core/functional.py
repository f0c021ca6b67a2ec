"""The functional entry points: ``fused_attention``, ``fused_attention_varlen`` and the
forward-only FP8 path ``fused_attention_fp8``.

Both run the Triton kernels (forward and backward, through one ``torch.autograd.Function``)
where Triton can run, and PyTorch SDPA otherwise. Masks and dropout are validated and
normalised here once, so both backends see the same semantics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.attention_bwd import attention_backward
from ..kernels.attention_fp8 import FP8_HEAD_DIMS, attention_forward_fp8, fp8_tma_supported, quantize_qkv_fp8
from ..kernels.attention_fwd import attention_forward
from ..kernels.runtime import TritonUnavailableError, triton_runs_on, why_triton_cannot_run
from .backend import resolve_backend
from .kernel_switches import KernelSwitches
from .sdpa import sdpa_attention

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
_LAYOUTS = ("bthd", "bhtd")


def _shapes(**tensors: torch.Tensor) -> str:
    return ", ".join(f"{name}{tuple(t.shape)}" for name, t in tensors.items())


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, packed: bool = False) -> None:
    """Raise ``ValueError`` naming the offending shapes unless q, k, v can be attended.

    Dense tensors are ``[B, T, H, D]``; ``packed=True`` checks varlen ``[total, H, D]``.
    """
    rank = 3 if packed else 4
    layout = "[total, heads, head_dim]" if packed else "[batch, seq, heads, head_dim]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {layout}, got {name}{tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype} ({_shapes(q=q, k=k, v=v)})")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}; expected float16, bfloat16 or float32")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {_shapes(k=k, v=v)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head_dim of q and k differ: {_shapes(q=q, k=k)}")
    if not packed and q.shape[0] != k.shape[0]:
        raise ValueError(f"batch sizes differ: {_shapes(q=q, k=k)}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}): {_shapes(q=q, k=k)}")
    d = q.shape[-1]
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d} unsupported (expected {MIN_HEAD_DIM}..{MAX_HEAD_DIM}): {_shapes(q=q)}")


def check_window(window: tuple[int, int] | None) -> tuple[int, int] | None:
    if window is None:
        return None
    try:
        left, right = (int(w) for w in window)
    except (TypeError, ValueError):
        raise ValueError(f"window must be a (left, right) pair of ints (-1 = unbounded), got {window!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"window bounds must be >= -1 (-1 = unbounded), got {window!r}")
    return left, right


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_dropout(dropout_p: float) -> float:
    try:
        p = float(dropout_p)
    except (TypeError, ValueError):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}") from None
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return p


def _draw_seed(dropout_p: float, dropout_seed: int | None) -> int:
    if dropout_p == 0.0:
        return 0
    if dropout_seed is None:
        # Drawn from torch's CPU generator: reproducible under torch.manual_seed, no device sync.
        return int(torch.randint(0, 2**31 - 1, (1,)).item())
    seed = int(dropout_seed)
    if not 0 <= seed < 2**31:
        raise ValueError(f"dropout_seed must be in [0, 2**31), got {dropout_seed!r}")
    return seed


def normalize_attn_mask(
    attn_mask: torch.Tensor | None, *, batch: int, heads: int, seqlen_q: int, seqlen_k: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split a user mask into ``(mask_4d, key_padding)``, validating shapes.

    * A 2-D ``[B, Tk]`` mask is a key-padding mask (the package's convention, which wins
      over plain broadcasting when ``B == Tq``; pass ``[1, 1, Tq, Tk]`` to mean the other);
      bool/integer ones come back as ``key_padding`` ``[B, Tk]`` bool, float ones as an
      additive ``[B, 1, 1, Tk]`` bias.
    * Otherwise the mask must broadcast (right-aligned) to ``[B, Hq, Tq, Tk]``: bool (True =
      attend), integer (nonzero = attend) or floating (additive, may require grad).
    """
    if attn_mask is None:
        return None, None
    if not isinstance(attn_mask, torch.Tensor):
        raise ValueError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.device != device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {device}")
    target = (batch, heads, seqlen_q, seqlen_k)
    mask = attn_mask
    if not (mask.dtype == torch.bool or mask.is_floating_point()):
        if mask.is_complex():
            raise ValueError(f"attn_mask dtype {mask.dtype} unsupported (bool, integer or floating)")
        mask = mask != 0
    if mask.dim() == 2 and tuple(mask.shape) == (batch, seqlen_k):
        if mask.dtype == torch.bool:
            return None, mask
        return mask[:, None, None, :], None
    if mask.dim() > 4 or any(s not in (1, t) for s, t in zip(reversed(mask.shape), reversed(target), strict=False)):
        raise ValueError(
            f"attn_mask{tuple(attn_mask.shape)} does not broadcast to [B, Hq, Tq, Tk] = {target} "
            f"(nor is it a [B, Tk] = {(batch, seqlen_k)} key-padding mask)"
        )
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask, None


def _sdpa_mask(mask: torch.Tensor | None, key_padding: torch.Tensor | None) -> torch.Tensor | None:
    """One SDPA-style mask (bool keep or additive float) from the normalised pieces."""
    if key_padding is None:
        return mask
    keep = key_padding[:, None, None, :]
    if mask is None:
        return keep
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, float("-inf"))


@dataclass(frozen=True)
class _Call:
    """Non-tensor arguments of one kernel call, shared by its forward and backward
    (``switches``: the environment's launch switches, read once per call)."""

    causal: bool
    softmax_scale: float
    window: tuple[int, int] | None
    dropout_p: float
    dropout_seed: int
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int | None = None
    max_seqlen_k: int | None = None
    switches: KernelSwitches = KernelSwitches()

    def forward_kwargs(self) -> dict:
        return {**self.kernel_kwargs(), "tma": self.switches.tma}

    def kernel_kwargs(self) -> dict:
        """Keyword arguments the forward and the backward launchers share."""
        return dict(
            causal=self.causal,
            softmax_scale=self.softmax_scale,
            window=self.window,
            cu_seqlens_q=self.cu_seqlens_q,
            cu_seqlens_k=self.cu_seqlens_k,
            max_seqlen_q=self.max_seqlen_q,
            max_seqlen_k=self.max_seqlen_k,
            dropout_p=self.dropout_p,
            dropout_seed=self.dropout_seed,
            autotune=self.switches.autotune,
        )


class _TritonAttention(torch.autograd.Function):
    """Triton forward + backward. Outputs ``(out, lse)``; both are differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, mask, key_padding, call: _Call):  # type: ignore[override]
        out, lse = attention_forward(
            q, k, v, store_lse=True, attn_mask=mask, key_padding_mask=key_padding, **call.forward_kwargs()
        )
        ctx.save_for_backward(q, k, v, out, lse, mask, key_padding)
        ctx.call = call
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[override]
        q, k, v, out, lse, mask, key_padding = ctx.saved_tensors
        call: _Call = ctx.call
        if dout is None:
            dout = torch.zeros_like(out)
        want_dbias = mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3]
        dbias = None
        if want_dbias:
            if call.cu_seqlens_q is not None:
                raise NotImplementedError("gradients for an additive attn_mask are not supported with packed sequences")
            shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
            dbias = torch.zeros(shape, device=q.device, dtype=torch.float32)
        dq, dk, dv = attention_backward(
            dout,
            q,
            k,
            v,
            out,
            lse,
            attn_mask=mask,
            key_padding_mask=key_padding,
            dlse=dlse,
            dbias=dbias,
            **call.kernel_kwargs(),
        )
        dmask = dbias.sum_to_size(mask.shape).to(mask.dtype) if want_dbias else None
        return dq, dk, dv, dmask, None, None


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    *,
    layout: str = "bthd",
    window: tuple[int, int] | None = None,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention computed in one streaming pass (online softmax), differentiable.

    Args:
        q: ``[B, Tq, Hq, D]`` queries (``[B, Hq, Tq, D]`` with ``layout="bhtd"``).
        k, v: ``[B, Tk, Hkv, D]`` keys and values; ``Hq`` must be a multiple of ``Hkv``
            (GQA/MQA, K/V are never repeated in memory).
        causal: mask future keys, aligned bottom-right when ``Tq != Tk`` (query ``i``
            sees keys ``j <= i + Tk - Tq``).
        softmax_scale: defaults to ``D ** -0.5``.
        return_lse: also return the natural-log log-sum-exp, fp32 ``[B, Hq, Tq]``
            (differentiable on the Triton path).
        backend: ``"triton"`` (raises if it cannot run), ``"sdpa"``, or ``"auto"``
            (Triton on CUDA, else SDPA; ``STREAM_ATTENTION_BACKEND`` overrides). The
            Triton path has its own backward, so autograd keeps it.
        layout: ``"bthd"`` or ``"bhtd"``; any strides are read in place, without copies.
        window: optional sliding window ``(left, right)`` in keys, ``-1`` unbounded.
        attn_mask: optional mask, always indexed ``[B, Hq, Tq, Tk]`` whatever ``layout``:
            bool (True = attend), integer (nonzero = attend) or floating additive bias
            (its gradient is computed when it requires grad), broadcastable to
            ``[B, Hq, Tq, Tk]``. A 2-D ``[B, Tk]`` mask is a key-padding mask; tiles that
            are padding only are skipped. Rows that see no key output zeros.
        dropout_p: attention dropout probability (applied whenever > 0, as in SDPA).
        dropout_seed: Philox seed in ``[0, 2**31)`` for the Triton path (default: drawn
            from torch's generator); with the same seed the mask can be rebuilt by
            :func:`stream_attention.kernels.masks_dropout.dropout_keep_mask`.

    Returns:
        Output with ``q``'s shape and layout, and the LSE when ``return_lse``.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected 'bthd' or 'bhtd'")
    if layout == "bhtd":
        q, k, v = (t.transpose(1, 2) if isinstance(t, torch.Tensor) and t.dim() == 4 else t for t in (q, k, v))
    check_qkv(q, k, v)
    window = check_window(window)
    dropout_p = check_dropout(dropout_p)
    batch, seqlen_q, hq, head_dim = q.shape
    mask, key_padding = normalize_attn_mask(
        attn_mask, batch=batch, heads=hq, seqlen_q=seqlen_q, seqlen_k=k.shape[1], device=q.device
    )
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    needs_grad = _needs_grad(q, k, v, mask)
    chosen = resolve_backend(backend, q.device, needs_grad=needs_grad, grad_supported=True)
    if chosen == "triton":
        call = _Call(causal, scale, window, dropout_p, _draw_seed(dropout_p, dropout_seed),
                     switches=KernelSwitches.from_env())
        if needs_grad:
            out, lse = _TritonAttention.apply(q, k, v, mask, key_padding, call)
        else:
            out, lse = attention_forward(
                q, k, v, store_lse=return_lse, attn_mask=mask, key_padding_mask=key_padding, **call.forward_kwargs()
            )
    else:
        res = sdpa_attention(
            q,
            k,
            v,
            causal=causal,
            softmax_scale=scale,
            window=window,
            return_lse=return_lse,
            attn_mask=_sdpa_mask(mask, key_padding),
            dropout_p=dropout_p,
        )
        out, lse = res if return_lse else (res, None)
    if layout == "bhtd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def check_cu_seqlens(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    check_values: bool,
) -> None:
    """Validate packed-batch metadata; raise ``ValueError`` naming the shapes.

    Values (monotone offsets starting at 0, within the packed tensors, lengths within
    ``max_seqlen_*``) are checked when ``check_values`` (it reads the offsets on the host).
    """
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{name} must be 1-D [batch + 1], got {name}{tuple(cu.shape)}")
        if cu.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {cu.dtype}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q{tuple(cu_seqlens_q.shape)} and cu_seqlens_k{tuple(cu_seqlens_k.shape)} "
            "describe different numbers of sequences"
        )
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"{name} must be a non-negative int, got {m!r}")
    if not check_values:
        return
    for name, cu, packed, cap in (
        ("cu_seqlens_q", cu_seqlens_q, ("q", q), max_seqlen_q),
        ("cu_seqlens_k", cu_seqlens_k, ("k", k), max_seqlen_k),
    ):
        vals = cu.tolist()
        lens = [b - a for a, b in zip(vals[:-1], vals[1:], strict=True)]
        if vals[0] != 0 or any(n < 0 for n in lens):
            raise ValueError(f"{name} must start at 0 and be non-decreasing, got {vals}")
        if vals[-1] > packed[1].shape[0]:
            raise ValueError(f"{name} ends at {vals[-1]} beyond {_shapes(**dict([packed]))}")
        if lens and max(lens) > cap:
            raise ValueError(f"{name} has a sequence of length {max(lens)} > max_seqlen {cap}")


def _varlen_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    window: tuple[int, int] | None,
    dropout_p: float,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The packed batch as a loop of per-sequence SDPA calls (differentiable)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qs, ks, vs = q[cq[b] : cq[b + 1]], k[ck[b] : ck[b + 1]], v[ck[b] : ck[b + 1]]
        if qs.shape[0] == 0:
            continue
        if ks.shape[0] == 0:
            outs.append(torch.zeros_like(qs))
            lses.append(torch.full((q.shape[1], qs.shape[0]), float("-inf"), device=q.device))
            continue
        res = sdpa_attention(
            qs[None],
            ks[None],
            vs[None],
            causal=causal,
            softmax_scale=scale,
            window=window,
            dropout_p=dropout_p,
            return_lse=return_lse,
        )
        o, lse = res if return_lse else (res, None)
        outs.append(o[0])
        if return_lse:
            lses.append(lse[0].float())
    tail = q.shape[0] - cq[-1]
    if tail:
        outs.append(torch.zeros_like(q[cq[-1] :]))
        lses.append(torch.full((q.shape[1], tail), float("-inf"), device=q.device))
    out = torch.cat(outs, dim=0) if outs else torch.zeros_like(q)
    lse = None
    if return_lse:
        lse = torch.cat(lses, dim=1) if lses else torch.full((q.shape[1], 0), float("-inf"), device=q.device)
    return out, lse


def fused_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    window: tuple[int, int] | None = None,
    dropout_p: float = 0.0,
    *,
    dropout_seed: int | None = None,
    validate: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over a packed batch of variable-length sequences, differentiable.

    Sequence ``b`` is ``q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]`` against
    ``k, v[cu_seqlens_k[b]:cu_seqlens_k[b + 1]]``; nothing is padded and one launch
    covers the batch.

    Args:
        q: ``[total_q, Hq, D]``; k, v: ``[total_k, Hkv, D]`` (``Hq`` a multiple of ``Hkv``).
        cu_seqlens_q, cu_seqlens_k: int32/int64 ``[B + 1]`` offsets starting at 0.
        max_seqlen_q, max_seqlen_k: upper bounds of the per-sequence lengths.
        causal, softmax_scale, window, dropout_p, dropout_seed, backend: as in
            :func:`fused_attention`, per sequence (causal is bottom-right per sequence).
        return_lse: also return the fp32 LSE ``[Hq, total_q]``.
        validate: check the offsets' values (a host read). Default: only when they are
            on the CPU, so CUDA calls never synchronise.

    Returns:
        ``out [total_q, Hq, D]`` (and the LSE). Tokens past ``cu_seqlens_q[-1]`` get
        zeros (LSE ``-inf``).
    """
    check_qkv(q, k, v, packed=True)
    window = check_window(window)
    dropout_p = check_dropout(dropout_p)
    check_cu_seqlens(
        q,
        k,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        check_values=cu_seqlens_q.device.type == "cpu" if validate is None else bool(validate),
    )
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    needs_grad = _needs_grad(q, k, v)
    chosen = resolve_backend(backend, q.device, needs_grad=needs_grad, grad_supported=True)
    if chosen == "triton":
        call = _Call(
            causal,
            scale,
            window,
            dropout_p,
            _draw_seed(dropout_p, dropout_seed),
            cu_seqlens_q.to(torch.int32),
            cu_seqlens_k.to(torch.int32),
            int(max_seqlen_q),
            int(max_seqlen_k),
            KernelSwitches.from_env(),
        )
        if needs_grad:
            out, lse = _TritonAttention.apply(q, k, v, None, None, call)
        else:
            out, lse = attention_forward(q, k, v, store_lse=return_lse, **call.forward_kwargs())
    else:
        out, lse = _varlen_sdpa(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            causal=causal,
            scale=scale,
            window=window,
            dropout_p=dropout_p,
            return_lse=return_lse,
        )
    return (out, lse) if return_lse else out


def fused_attention_fp8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention forward with Q, K, V quantized to FP8 e4m3 (per-block scales), inference only.

    Q gets one scale per 128 query rows and head, K one per 128 key rows and KV head, V one
    per channel and KV head (see :mod:`stream_attention.kernels.attention_fp8`); both matrix
    products run on fp8 tensor cores with fp32 accumulation. Expect a relative error of a
    few percent against exact attention (e4m3 keeps 3 mantissa bits), against ~0.3% for
    the bf16 kernel. To reuse quantized inputs (e.g. K/V across calls) use
    ``quantize_qkv_fp8`` and ``attention_forward_fp8`` directly.

    Args:
        q: ``[B, Tq, Hq, D]``; k, v: ``[B, Tk, Hkv, D]`` (fp16/bf16/fp32, any strides), ``Hq``
            a multiple of ``Hkv``; ``D`` one of 32, 64, 128, 256.
        causal: mask future keys, aligned bottom-right when ``Tq != Tk``.
        softmax_scale: defaults to ``D ** -0.5``.
        return_lse: also return the natural-log LSE, fp32 ``[B, Hq, Tq]``.

    Returns:
        ``out [B, Tq, Hq, D]`` in ``q``'s dtype (contiguous), and the LSE when ``return_lse``.
        Needs CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``. No backward.
    """
    check_qkv(q, k, v)
    if q.shape[-1] not in FP8_HEAD_DIMS:
        raise ValueError(f"fused_attention_fp8 supports head_dim in {FP8_HEAD_DIMS}, got {_shapes(q=q, k=k, v=v)}")
    if not triton_runs_on(q.device):
        raise TritonUnavailableError(f"fused_attention_fp8 cannot run: {why_triton_cannot_run(q.device)}")
    if _needs_grad(q, k, v):
        raise ValueError("fused_attention_fp8 has no backward: call it under torch.no_grad() or on detached inputs")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not scale > 0:
        raise ValueError(f"softmax_scale must be positive, got {softmax_scale!r}")
    qkv = quantize_qkv_fp8(q, k, v)
    switches = KernelSwitches.from_env()
    # STREAM_ATTENTION_TMA=1 asks for TMA where it can run (the interpreter included);
    # the kernel's tma=True insists on it.
    tma = switches.tma and fp8_tma_supported(qkv) if switches.tma is not None else None
    out, lse = attention_forward_fp8(qkv, causal=causal, softmax_scale=scale, out_dtype=q.dtype, tma=tma,
                                     autotune=switches.autotune)
    return (out, lse) if return_lse else out
