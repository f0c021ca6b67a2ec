"""Fused element-wise ops of a Llama-style decoder layer: RMSNorm (with the residual add
folded in), rotary embedding, SiLU-gated product.

Why they exist: at decode batch sizes a layer's matmuls read megabytes of weights while
its element-wise ops touch a few hundred kilobytes of activations, yet transformers'
eager code spends ~30 kernel launches per layer on them (RMSNorm alone is six: cast,
square, mean, add, rsqrt, two multiplies). Inside a CUDA graph each still costs a few
microseconds of GPU time; at 16 layers that is about half of a 1B model's decode step
(benchmarks/RESULTS.md). Here each op is one kernel that reads its inputs once.

Rounding follows transformers' eager code wherever it rounds to the model dtype between
steps (the residual sum, the normalised activations before the weight multiply, SiLU's
output before the product), so a model run through these ops matches the eager model as
closely as two implementations of the same float math can. Every op has a PyTorch twin
(``*_torch``) used on CPUs without Triton and as the tests' reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import interpreter_enabled

__all__ = [
    "rms_norm",
    "fused_add_rms_norm",
    "silu_and_mul",
    "rotary_qk",
    "rms_norm_torch",
    "fused_add_rms_norm_torch",
    "silu_and_mul_torch",
    "rotary_qk_torch",
]


def _check_rows(name: str, x: torch.Tensor, width: int | None = None) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"{name}: expected a 2-D tensor with contiguous rows, got shape {tuple(x.shape)} "
                         f"strides {tuple(x.stride())}")
    if width is not None and x.shape[1] != width:
        raise ValueError(f"{name}: expected {width} columns, got shape {tuple(x.shape)}")


def _launch(kernel, grid, *args, num_warps: int = 4, **meta) -> None:
    if interpreter_enabled():
        kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta, num_warps=num_warps)


def _row_warps(block: int) -> int:
    return max(1, min(16, block // 256))


# --------------------------------------------------------------------------- RMSNorm
@triton.jit
def _rms_norm_kernel(X, RES, W, Y, stride_x, stride_res, stride_y, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, ROUND_NORMED: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    keep = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=keep, other=0.0)
    if HAS_RESIDUAL:
        # The residual stream is kept in the model dtype, as the eager ``residual + h`` does.
        r = tl.load(RES + row * stride_res + cols, mask=keep, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
        tl.store(RES + row * stride_res + cols, x, mask=keep)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = xf * inv_rms
    if ROUND_NORMED:  # Llama rounds the normalised activations before the weight multiply
        normed = normed.to(x.dtype).to(tl.float32)
    w = tl.load(W + cols, mask=keep, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=keep)


def _rms_norm_launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     round_normed: bool) -> torch.Tensor:
    _check_rows("rms_norm input", x, weight.shape[0])
    if residual is not None:
        _check_rows("rms_norm residual", residual, weight.shape[0])
        if residual.shape != x.shape:
            raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != input shape {tuple(x.shape)}")
    rows, n = x.shape
    out_dtype = torch.promote_types(x.dtype, weight.dtype) if round_normed else x.dtype
    y = torch.empty((rows, n), dtype=out_dtype, device=x.device)
    if rows == 0:
        return y
    block = triton.next_power_of_2(n)
    res = residual if residual is not None else x
    _launch(_rms_norm_kernel, (rows,), x, res, weight, y, x.stride(0), res.stride(0), y.stride(0), n, float(eps),
            HAS_RESIDUAL=residual is not None, ROUND_NORMED=round_normed, BLOCK=block, num_warps=_row_warps(block))
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, round_normed: bool = True) -> torch.Tensor:
    """``weight * x / rms(x)`` over the last dimension of ``x [rows, hidden]``, in one kernel.

    ``round_normed`` (Llama's rounding): the normalised activations are rounded to ``x``'s
    dtype before the weight multiply, and the result has the promoted dtype of ``x`` and
    ``weight``. Off (Gemma's): the product is taken in float32 (``weight`` may be float32,
    e.g. Gemma's ``1 + weight``) and rounded once, to ``x``'s dtype.
    """
    return _rms_norm_launch(x, None, weight, eps, round_normed)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                       round_normed: bool = True) -> torch.Tensor:
    """``residual += x`` (in place, in ``residual``'s dtype), then returns ``rms_norm(residual)``.

    The pre-norm block's ``h = residual + sublayer(h); h_norm = norm(h)`` in one pass.
    """
    return _rms_norm_launch(x, residual, weight, eps, round_normed)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, *, round_normed: bool = True) -> torch.Tensor:
    """PyTorch twin of :func:`rms_norm` (transformers' ``LlamaRMSNorm`` math, or with
    ``round_normed=False`` ``GemmaRMSNorm``'s single rounding)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if not round_normed:
        return (normed * weight.float()).to(x.dtype)
    return weight * normed.to(x.dtype)


def fused_add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                             eps: float, *, round_normed: bool = True) -> torch.Tensor:
    """PyTorch twin of :func:`fused_add_rms_norm` (updates ``residual`` in place)."""
    residual.add_(x)
    return rms_norm_torch(residual, weight, eps, round_normed=round_normed)


# --------------------------------------------------------------------------- SiLU · up
@triton.jit
def _silu_and_mul_kernel(X, Y, stride_x, stride_y, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < n_cols
    gate = tl.load(X + row * stride_x + cols, mask=keep, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + n_cols + cols, mask=keep, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (act * up.to(tl.float32)).to(Y.dtype.element_ty), mask=keep)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` of shape ``[rows, 2 * inter]`` → ``[rows, inter]``."""
    _check_rows("silu_and_mul input", x)
    rows, width = x.shape
    if width % 2:
        raise ValueError(f"silu_and_mul: the last dimension must be [gate | up] (even), got shape {tuple(x.shape)}")
    inter = width // 2
    y = torch.empty((rows, inter), dtype=x.dtype, device=x.device)
    if rows == 0:
        return y
    block = min(1024, triton.next_power_of_2(inter))
    _launch(_silu_and_mul_kernel, (rows, triton.cdiv(inter, block)), x, y, x.stride(0), y.stride(0), inter,
            BLOCK=block, num_warps=4)
    return y


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """PyTorch twin of :func:`silu_and_mul`."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# --------------------------------------------------------------------------- rotary
@triton.jit
def _rotate_heads(X, Y, COS, SIN, row, stride_xt, stride_xh, stride_yt, stride_yh, cos_stride, n_heads,
                  PAGES, slot, stride_ps, stride_ph, WRITE_PAGES: tl.constexpr,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    keep = (heads < n_heads) & (cols < HALF)
    c_keep = cols < HALF
    cos1 = tl.load(COS + row * cos_stride + cols, mask=c_keep, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + row * cos_stride + HALF + cols, mask=c_keep, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + row * cos_stride + cols, mask=c_keep, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + row * cos_stride + HALF + cols, mask=c_keep, other=0.0).to(tl.float32)
    src = X + row * stride_xt + heads * stride_xh + cols
    x1 = tl.load(src, mask=keep, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=keep, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
    y1 = x1 * cos1 - x2 * sin1
    y2 = x2 * cos2 + x1 * sin2
    dst = Y + row * stride_yt + heads * stride_yh + cols
    tl.store(dst, y1.to(Y.dtype.element_ty), mask=keep)
    tl.store(dst + HALF, y2.to(Y.dtype.element_ty), mask=keep)
    if WRITE_PAGES:
        page_dst = PAGES + slot * stride_ps + heads * stride_ph + cols
        tl.store(page_dst, y1.to(Y.dtype.element_ty).to(PAGES.dtype.element_ty), mask=keep)
        tl.store(page_dst + HALF, y2.to(Y.dtype.element_ty).to(PAGES.dtype.element_ty), mask=keep)


@triton.jit
def _rotary_qk_kernel(Q, K, QO, KO, COS, SIN, V, K_PAGES, V_PAGES, SLOTS,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
                      cos_stride, n_q_heads, n_k_heads,
                      stride_vt, stride_vh, stride_kps, stride_kph, stride_vps, stride_vph,
                      WRITE_PAGES: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.full([], 0, tl.int64)
    if WRITE_PAGES:
        slot = tl.load(SLOTS + row).to(tl.int64)
    _rotate_heads(Q, QO, COS, SIN, row, stride_qt, stride_qh, stride_qot, stride_qoh, cos_stride, n_q_heads,
                  K_PAGES, slot, 0, 0, False, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(K, KO, COS, SIN, row, stride_kt, stride_kh, stride_kot, stride_koh, cos_stride, n_k_heads,
                  K_PAGES, slot, stride_kps, stride_kph, WRITE_PAGES, HALF, BLOCK_HK, BLOCK_HALF)
    if WRITE_PAGES:
        heads = tl.arange(0, BLOCK_HK)[:, None]
        cols = tl.arange(0, BLOCK_D)[None, :]
        keep = (heads < n_k_heads) & (cols < HEAD_DIM)
        v = tl.load(V + row * stride_vt + heads * stride_vh + cols, mask=keep, other=0.0)
        tl.store(V_PAGES + slot * stride_vps + heads * stride_vph + cols, v.to(V_PAGES.dtype.element_ty), mask=keep)


def _check_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"rotary_qk: q and k must be [tokens, heads, head_dim], got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    tokens, _, dim = q.shape
    if k.shape[0] != tokens or k.shape[2] != dim or dim % 2:
        raise ValueError(f"rotary_qk: k {tuple(k.shape)} does not match q {tuple(q.shape)} (even head_dim needed)")
    if cos.shape != (tokens, dim) or sin.shape != (tokens, dim):
        raise ValueError(f"rotary_qk: cos/sin must be [tokens, head_dim] = {(tokens, dim)}, got {tuple(cos.shape)} "
                         f"and {tuple(sin.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rotary_qk: the head dimension of q and k must be contiguous")


def _check_pages(k: torch.Tensor, v: torch.Tensor | None, k_pages: torch.Tensor, v_pages: torch.Tensor | None,
                 slot_mapping: torch.Tensor | None) -> None:
    if v is None or v_pages is None or slot_mapping is None:
        raise ValueError("rotary_qk: writing pages needs v, k_pages, v_pages and slot_mapping together")
    if v.shape != k.shape or v.stride(-1) != 1:
        raise ValueError(f"rotary_qk: v {tuple(v.shape)} must match k {tuple(k.shape)} with a contiguous head dim")
    for name, pages in (("k_pages", k_pages), ("v_pages", v_pages)):
        if pages.dim() != 4 or pages.shape[2:] != k.shape[1:] or not pages.is_contiguous():
            raise ValueError(f"rotary_qk: {name} must be contiguous [blocks, block_size, {k.shape[1]}, "
                             f"{k.shape[2]}], got {tuple(pages.shape)}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"rotary_qk: slot_mapping must be [{k.shape[0]}], got {tuple(slot_mapping.shape)}")


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
              v: torch.Tensor | None = None, k_pages: torch.Tensor | None = None,
              v_pages: torch.Tensor | None = None,
              slot_mapping: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of ``q [T, Hq, D]`` and ``k [T, Hk, D]`` (any token/head strides, e.g.
    views into one fused QKV projection) with per-token ``cos, sin [T, D]`` in transformers'
    ``rotate_half`` convention. One kernel for both; returns new contiguous tensors.

    With ``k_pages, v_pages [blocks, block_size, Hk, D]``, ``v [T, Hk, D]`` and int64
    ``slot_mapping [T]`` (flat slot ``block * block_size + offset``), the same kernel also
    stores the rotated keys and the values into the KV cache pages, which spares the two
    page-write kernels a layer would otherwise launch.
    """
    _check_rotary(q, k, cos, sin)
    write = k_pages is not None
    if write:
        _check_pages(k, v, k_pages, v_pages, slot_mapping)
    tokens, hq, dim = q.shape
    hk = k.shape[1]
    q_out = torch.empty((tokens, hq, dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((tokens, hk, dim), dtype=k.dtype, device=k.device)
    if tokens == 0:
        return q_out, k_out
    cos = cos.contiguous()
    sin = sin.contiguous()
    half = dim // 2
    if write:
        page_args = (v, k_pages, v_pages, slot_mapping)
        page_strides = (v.stride(0), v.stride(1), hk * dim, dim, hk * dim, dim)
    else:
        page_args = (k, k_out, k_out, cos)  # placeholders, never read
        page_strides = (0, 0, 0, 0, 0, 0)
    _launch(_rotary_qk_kernel, (tokens,), q, k, q_out, k_out, cos, sin, *page_args,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), q_out.stride(0), q_out.stride(1),
            k_out.stride(0), k_out.stride(1), cos.stride(0), hq, hk, *page_strides,
            WRITE_PAGES=write, HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim),
            HALF=half, BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(hk),
            BLOCK_HALF=triton.next_power_of_2(half), num_warps=4)
    return q_out, k_out


def rotary_qk_torch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                    v: torch.Tensor | None = None, k_pages: torch.Tensor | None = None,
                    v_pages: torch.Tensor | None = None,
                    slot_mapping: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch twin of :func:`rotary_qk` (computed in float32, rounded once)."""
    _check_rotary(q, k, cos, sin)
    c = cos.float()[:, None, :]
    s = sin.float()[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * c + torch.cat((-x2, x1), dim=-1) * s).to(x.dtype)

    q_out, k_out = rotate(q), rotate(k)
    if k_pages is not None:
        _check_pages(k, v, k_pages, v_pages, slot_mapping)
        hk, d = k.shape[1], k.shape[2]
        k_pages.view(-1, hk, d).index_copy_(0, slot_mapping, k_out.to(k_pages.dtype))
        v_pages.view(-1, hk, d).index_copy_(0, slot_mapping, v.to(v_pages.dtype))
    return q_out, k_out
