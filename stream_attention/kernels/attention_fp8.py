"""FP8 (e4m3) attention forward with per-block scaling of Q, K and V, in Triton.

Quantization (:func:`quantize_qkv_fp8`, four small Triton launches; a torch twin,
:func:`quantize_qkv_fp8_torch`, is the reference and the fallback where Triton cannot run):

* Q: one fp32 scale per (batch, head, block of ``block_m`` query rows), ``amax / 448``;
* K: one fp32 scale per (batch, kv head, block of ``block_n`` key rows);
* V: one fp32 scale per (batch, kv head, channel) over the whole sequence, and the codes
  are stored transposed, ``[B, Hkv, D, Tpad]`` (``Tpad`` = ``T`` rounded up to 16, zero
  padded): Hopper's fp8 tensor-core instruction takes its B operand K-major only, and in
  ``P @ V`` the reduction runs over keys.

Codes are ``torch.float8_e4m3fn`` (max 448), rounded to nearest even, with ``x * (448 /
amax)`` clamped to ±448; an all-zero block gets scale 1.

The attention kernel (:func:`attention_forward_fp8`) is laid out like the bf16 forward
(:mod:`.attention_fwd`): base-2 online softmax with ``softmax_scale * log2(e)`` folded in,
causal masks aligned bottom-right, fully visible key tiles in an unmasked loop and the
diagonal / ragged-tail tiles in a masked one, GQA without repeating K/V. Per key tile::

    S   = dot(q8, k8^T) * (q_scale * k_scale * softmax_scale * log2 e)     (fp8 x fp8 -> fp32)
    P   = exp2(S - m + 8) = 256 * exp2(S - m)                                (fp32; l sums it)
    acc = acc * alpha + dot(e4m3(P), v8 tile)                                (fp8 x fp8 -> fp32)

and at the end ``out[:, d] = acc[:, d] * v_scale[d] / l``. Scaling P by 256 (through the
exponent, so it costs nothing) keeps probabilities down to ``2**-14`` of the row maximum
out of e4m3's subnormals (P <= 256 < 448). The kernel's key tile lies inside one K
quantization block and its query tile inside one Q block (each kernel block divides the
matching quantization block; configs that do not are pruned). The only rounding the
kernel adds to the dequantized inputs is P's (3 mantissa bits): ~2% norm-wise on random
inputs; the LSE does not see it.

Tiles arrive either through pointer loads (cp.async pipelined; the V^T tile address is kept
visibly 16-byte aligned, or Triton would not pipeline it) or, on Hopper, through TMA
descriptors over 2-D views (``q``/``k`` as ``[B*T, H*D]``, ``v_t`` as ``[B*Hkv*D, Tpad]``),
chosen per call (``tma=``; by default as the bf16 forward chooses: on Hopper GPUs).
Tile configs: the first of ``_GPU_CONFIGS`` unless autotuning (``autotune=True``) or an
explicit ``config=``.

Under Triton's interpreter (CPU tests) fp32 -> e4m3 casts are emulated: the interpreter's
own cast truncates subnormals, rounds half up, and can carry a mantissa overflow into the
wrong exponent bit. :func:`_to_e4m3` first rounds to the e4m3 grid (round to nearest even,
like the GPU's ``cvt.rn.satfinite``), after which the interpreter's cast is exact.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .attention_fwd import UNBOUNDED, _bucket, key_range, tma_enabled
from .runtime import first_config, interpreter_enabled, launch_kwargs, triton_runs_on

try:  # host-side descriptors: triton >= 3.3
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton
    TensorDescriptor = None

__all__ = [
    "E4M3_MAX",
    "FP8_HEAD_DIMS",
    "P_SCALE",
    "Fp8QKV",
    "quantize_qkv_fp8",
    "quantize_qkv_fp8_torch",
    "dequantize_qkv",
    "attention_forward_fp8",
    "fp8_tma_supported",
    "attention_fp8_ref",
    "attention_ref_f64",
]

E4M3_MAX = 448.0
# Head dims the kernel compiles for (whole power-of-two tiles; fp8 MMAs want K >= 32).
FP8_HEAD_DIMS = (32, 64, 128, 256)
# P is scaled by this (a power of two) before its cast to e4m3; l carries the same factor.
P_SCALE = 256.0
# Blocks whose amax is at most this are treated as zero (scale 1): 448 / amax must stay finite.
_TINY_AMAX = 1e-30
_LOG2E = 1.0 / math.log(2.0)
# V's sequence axis is padded to a multiple of this (16 bytes of e4m3: aligned rows).
V_PAD = 16
# The interpreter runs one program at a time: small tiles keep CPU tests quick.
INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 16}


@dataclass(frozen=True)
class Fp8QKV:
    """Q, K, V quantized to e4m3 with their fp32 scales (see the module docstring).

    ``q``: ``[B, Tq, Hq, D]`` e4m3 (contiguous), ``q_scale``: ``[B, Hq, cdiv(Tq, block_m)]``;
    ``k``: ``[B, Tk, Hkv, D]`` e4m3, ``k_scale``: ``[B, Hkv, cdiv(Tk, block_n)]``;
    ``v_t``: ``[B, Hkv, D, Tpad]`` e4m3 (V transposed, zero padded past ``Tk``),
    ``v_scale``: ``[B, Hkv, D]``. Dequantized: ``q[b, t, h, :] * q_scale[b, h, t // block_m]``,
    ``v[b, t, h, d] = v_t[b, h, d, t] * v_scale[b, h, d]``.
    """

    q: torch.Tensor
    q_scale: torch.Tensor
    k: torch.Tensor
    k_scale: torch.Tensor
    v_t: torch.Tensor
    v_scale: torch.Tensor
    block_m: int
    block_n: int

    @property
    def seqlen_q(self) -> int:
        return self.q.shape[1]

    @property
    def seqlen_k(self) -> int:
        return self.k.shape[1]

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (self.q, self.q_scale, self.k, self.k_scale, self.v_t, self.v_scale)
        )


# --------------------------------------------------------------------------- quantization


@triton.jit
def _to_e4m3(x, EMULATE: tl.constexpr):
    """fp32 -> e4m3 (round to nearest even). ``x`` must already lie within ±448.

    With ``EMULATE`` (the interpreter) ``x`` is first rounded onto the e4m3 grid in fp32:
    normals by rounding the fp32 mantissa to 3 bits, subnormals (``|x| < 2**-6``) to a
    multiple of ``2**-9`` with the add-and-subtract trick; the cast is then exact.
    """
    if EMULATE:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
        normal = bits.to(tl.float32, bitcast=True)
        ax = tl.abs(x)
        sub = (ax + 24576.0) - 24576.0
        sub = tl.where(x < 0, -sub, sub)
        x = tl.where(ax < 0.015625, sub, normal)
    return x.to(tl.float8e4nv)


@triton.jit
def _quant_rows_kernel(
    X,
    Y,
    Scale,
    stride_xb,
    stride_xt,
    stride_xh,
    stride_xd,
    stride_yb,
    stride_yt,
    stride_yh,
    stride_sb,
    stride_sh,
    seqlen,
    num_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """One program per (quantization block of BLOCK_T rows, batch * head): amax, scale, codes."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    rows = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < seqlen
    x_ptrs = X + b.to(tl.int64) * stride_xb + h * stride_xh + rows[:, None] * stride_xt + offs_d[None, :] * stride_xd
    x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    ok = amax > 1e-30
    safe = tl.where(ok, amax, 1.0)
    scale = tl.where(ok, safe / 448.0, 1.0)
    inv = tl.where(ok, 448.0 / safe, 1.0)
    y = tl.minimum(tl.maximum(x * inv, -448.0), 448.0)
    y_ptrs = Y + b.to(tl.int64) * stride_yb + h * stride_yh + rows[:, None] * stride_yt + offs_d[None, :]
    tl.store(y_ptrs, _to_e4m3(y, EMULATE), mask=row_ok[:, None])
    tl.store(Scale + b * stride_sb + h * stride_sh + blk, scale)


@triton.jit
def _channel_amax_kernel(
    X,
    Partial,
    stride_xb,
    stride_xt,
    stride_xh,
    stride_xd,
    stride_pb,
    stride_ph,
    stride_pc,
    seqlen,
    num_heads,
    HEAD_DIM: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Per-channel amax of one chunk of CHUNK rows of one (batch, head): ``Partial[b, h, chunk, :]``."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    offs_d = tl.arange(0, HEAD_DIM)
    base = X + b.to(tl.int64) * stride_xb + h * stride_xh + offs_d[None, :] * stride_xd
    amax = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for start in range(0, CHUNK, BLOCK_T):
        rows = chunk * CHUNK + start + tl.arange(0, BLOCK_T)
        x = tl.load(base + rows[:, None].to(tl.int64) * stride_xt, mask=(rows < seqlen)[:, None], other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), 0))
    tl.store(Partial + b * stride_pb + h * stride_ph + chunk * stride_pc + offs_d, amax)


@triton.jit
def _quant_v_transposed_kernel(
    X,
    VT,
    Inv,
    stride_xb,
    stride_xt,
    stride_xh,
    stride_xd,
    stride_vb,
    stride_vh,
    stride_vd,
    stride_ib,
    stride_ih,
    seqlen,
    seqlen_pad,
    num_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """Codes of BLOCK_T rows of V, written transposed (``VT[b, h, d, t]``); zeros past ``seqlen``."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    rows = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    x_ptrs = X + b.to(tl.int64) * stride_xb + h * stride_xh + rows[:, None] * stride_xt + offs_d[None, :] * stride_xd
    x = tl.load(x_ptrs, mask=(rows < seqlen)[:, None], other=0.0).to(tl.float32)
    inv = tl.load(Inv + b * stride_ib + h * stride_ih + offs_d)
    y = tl.minimum(tl.maximum(x * inv[None, :], -448.0), 448.0)
    v_ptrs = VT + b.to(tl.int64) * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd + rows[:, None]
    tl.store(v_ptrs, _to_e4m3(y, EMULATE), mask=(rows < seqlen_pad)[:, None])


def _check_block(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value > 256 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two in 16..256, got {value!r}")
    return value


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D [batch, seq, heads, head_dim] tensor, got {name}{shape}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name} dtype {t.dtype} unsupported: expected float16, bfloat16 or float32")
    shapes = f"q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)}"
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {shapes}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"batch or head_dim of q and k differ: {shapes}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads must be a multiple of key/value heads: {shapes}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if q.shape[3] not in FP8_HEAD_DIMS:
        raise ValueError(f"fp8 attention supports head_dim in {FP8_HEAD_DIMS} (powers of two), got {shapes}")


def _padded(t: int) -> int:
    return (t + V_PAD - 1) // V_PAD * V_PAD


def quantize_qkv_fp8(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_m: int = 128, block_n: int = 128
) -> Fp8QKV:
    """Quantize dense ``[B, T, H, D]`` q, k, v (fp16/bf16/fp32, any strides) to :class:`Fp8QKV`.

    Runs four Triton launches (Q blocks, K blocks, V channel amax, V codes transposed)
    where Triton can run, else :func:`quantize_qkv_fp8_torch`. Reads Q and K once and V
    twice; writes one byte per element.
    """
    _check_inputs(q, k, v)
    block_m, block_n = _check_block("block_m", block_m), _check_block("block_n", block_n)
    if not triton_runs_on(q.device):
        return quantize_qkv_fp8_torch(q, k, v, block_m=block_m, block_n=block_n)
    batch, seqlen_q, hq, d = q.shape
    seqlen_k, hkv = k.shape[1], k.shape[2]
    dev = q.device
    f8 = torch.float8_e4m3fn
    q8 = torch.empty((batch, seqlen_q, hq, d), device=dev, dtype=f8)
    k8 = torch.empty((batch, seqlen_k, hkv, d), device=dev, dtype=f8)
    t_pad = _padded(seqlen_k)
    v_t = torch.empty((batch, hkv, d, t_pad), device=dev, dtype=f8)
    q_scale = torch.empty((batch, hq, triton.cdiv(seqlen_q, block_m)), device=dev, dtype=torch.float32)
    k_scale = torch.empty((batch, hkv, triton.cdiv(seqlen_k, block_n)), device=dev, dtype=torch.float32)
    emulate = interpreter_enabled()
    ctx = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with ctx:
        for x, y, s, blk, heads, t in (
            (q, q8, q_scale, block_m, hq, seqlen_q),
            (k, k8, k_scale, block_n, hkv, seqlen_k),
        ):
            if batch * heads * t == 0:
                continue
            _quant_rows_kernel[(triton.cdiv(t, blk), batch * heads)](
                x,
                y,
                s,
                *x.stride(),
                *y.stride()[:3],
                s.stride(0),
                s.stride(1),
                t,
                heads,
                HEAD_DIM=d,
                BLOCK_T=blk,
                EMULATE=emulate,
                num_warps=4 if blk * d <= 128 * 64 else 8,
            )
        if batch * hkv == 0:
            v_scale = torch.ones((batch, hkv, d), device=dev, dtype=torch.float32)
        elif seqlen_k == 0:
            v_scale = torch.ones((batch, hkv, d), device=dev, dtype=torch.float32)
            v_t.zero_()
        else:
            block_t = 32 if emulate else 64
            chunk = block_t * max(1, min(8, triton.cdiv(seqlen_k, block_t)))
            n_chunks = triton.cdiv(seqlen_k, chunk)
            partial = torch.empty((batch, hkv, n_chunks, d), device=dev, dtype=torch.float32)
            _channel_amax_kernel[(n_chunks, batch * hkv)](
                v,
                partial,
                *v.stride(),
                *partial.stride()[:3],
                seqlen_k,
                hkv,
                HEAD_DIM=d,
                CHUNK=chunk,
                BLOCK_T=block_t,
                num_warps=4,
            )
            v_scale, inv = _scales_from_amax(partial.amax(dim=2))
            block_v = 32 if emulate else 128  # 128 keys: 128-byte rows of V^T per store
            _quant_v_transposed_kernel[(triton.cdiv(t_pad, block_v), batch * hkv)](
                v,
                v_t,
                inv,
                *v.stride(),
                v_t.stride(0),
                v_t.stride(1),
                v_t.stride(2),
                inv.stride(0),
                inv.stride(1),
                seqlen_k,
                t_pad,
                hkv,
                HEAD_DIM=d,
                BLOCK_T=block_v,
                EMULATE=emulate,
                num_warps=8 if block_v * d > 64 * 128 else 4,
            )
    return Fp8QKV(q8, q_scale, k8, k_scale, v_t, v_scale, block_m, block_n)


def _scales_from_amax(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, 1 / scale)`` = ``(amax / 448, 448 / amax)``, 1 where the amax is (near) zero."""
    amax = amax.float()
    ok = amax > _TINY_AMAX
    safe = torch.where(ok, amax, torch.ones_like(amax))
    scale = torch.where(ok, safe / E4M3_MAX, torch.ones_like(amax))
    inv = torch.where(ok, torch.full_like(amax, E4M3_MAX) / safe, torch.ones_like(amax))
    return scale, inv


def _codes(x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    return (x * inv).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _quantize_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T, H, D]`` -> codes ``[B, T, H, D]`` and scales ``[B, H, cdiv(T, block)]``."""
    batch, t, h, d = x.shape
    nblk = -(-t // block)
    xf = torch.zeros((batch, nblk * block, h, d), device=x.device, dtype=torch.float32)
    xf[:, :t] = x
    xb = xf.view(batch, nblk, block, h, d)
    scale, inv = _scales_from_amax(xb.abs().amax(dim=(2, 4)))  # [B, nblk, H]
    codes = _codes(xb, inv[:, :, None, :, None]).view(batch, nblk * block, h, d)[:, :t].contiguous()
    return codes, scale.transpose(1, 2).contiguous()


def quantize_qkv_fp8_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_m: int = 128, block_n: int = 128
) -> Fp8QKV:
    """:func:`quantize_qkv_fp8` in plain torch ops (reference and CPU fallback; several fp32 passes)."""
    _check_inputs(q, k, v)
    block_m, block_n = _check_block("block_m", block_m), _check_block("block_n", block_n)
    q8, q_scale = _quantize_blocks(q, block_m)
    k8, k_scale = _quantize_blocks(k, block_n)
    batch, seqlen_k, hkv, d = v.shape
    vf = v.float()
    # Per-channel amax over the whole sequence: [B, Hkv, D].
    amax = vf.abs().amax(dim=1) if seqlen_k else torch.zeros((batch, hkv, d), device=v.device)
    v_scale, inv = _scales_from_amax(amax)
    v_t = torch.zeros((batch, hkv, d, _padded(seqlen_k)), device=v.device, dtype=torch.float8_e4m3fn)
    v_t[..., :seqlen_k] = _codes(vf, inv[:, None]).permute(0, 2, 3, 1)
    return Fp8QKV(q8, q_scale, k8, k_scale, v_t, v_scale, block_m, block_n)


def dequantize_qkv(qkv: Fp8QKV, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The values the kernel computes with, as dense ``[B, T, H, D]`` tensors of ``dtype``."""
    tq, tk = qkv.seqlen_q, qkv.seqlen_k
    qs = qkv.q_scale.to(dtype).repeat_interleave(qkv.block_m, dim=2)[:, :, :tq].transpose(1, 2)
    ks = qkv.k_scale.to(dtype).repeat_interleave(qkv.block_n, dim=2)[:, :, :tk].transpose(1, 2)
    q = qkv.q.to(dtype) * qs[..., None]
    k = qkv.k.to(dtype) * ks[..., None]
    v = (qkv.v_t[..., :tk].to(dtype) * qkv.v_scale.to(dtype)[..., None]).permute(0, 3, 1, 2)
    return q, k, v


def attention_ref_f64(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float,
    q_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention in float64 of ``[B, T, H, D]`` tensors (GQA, bottom-right causal).

    Returns ``(out [B, Tq, Hq, D], lse [B, Hq, Tq])`` in float64; rows that see no key give
    zeros and ``-inf``. ``q_chunk`` bounds the score matrix held at once (query rows).
    """
    batch, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    qd = q.double().transpose(1, 2)
    kd = k.double().transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    vd = v.double().transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    outs, lses = [], []
    step = q_chunk or max(tq, 1)
    for r0 in range(0, tq, step):
        rows = torch.arange(r0, min(r0 + step, tq), device=q.device)
        s = qd[:, :, rows] @ kd.transpose(-1, -2) * softmax_scale
        if causal:
            cols = torch.arange(tk, device=q.device)
            s = s.masked_fill(cols[None, :] > rows[:, None] + (tk - tq), float("-inf"))
        empty = torch.isneginf(s).all(dim=-1, keepdim=True)
        lse = torch.logsumexp(s.masked_fill(empty, 0.0), dim=-1, keepdim=True)
        p = torch.exp(s - lse).masked_fill(empty, 0.0)
        outs.append(p @ vd)
        lses.append(lse.masked_fill(empty, float("-inf")).squeeze(-1))
    if not outs:
        return torch.zeros_like(q, dtype=torch.float64), torch.full(
            (batch, hq, 0), float("-inf"), device=q.device, dtype=torch.float64
        )
    return torch.cat(outs, dim=2).transpose(1, 2), torch.cat(lses, dim=2)


def attention_fp8_ref(qkv: Fp8QKV, causal: bool, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 attention of the dequantized inputs: what the kernel computes, minus P's e4m3 rounding."""
    q, k, v = dequantize_qkv(qkv, torch.float64)
    return attention_ref_f64(q, k, v, causal=causal, softmax_scale=softmax_scale)


# --------------------------------------------------------------------------- attention
@triton.jit
def _fp8_kv_tiles(
    acc,
    l_i,
    m_i,
    q,
    q_coef,
    k_ptrs,
    v_ptrs,
    desc_k,
    desc_v,
    k_row0,
    k_col,
    v_row0,
    ks_base,
    stride_kt,
    offs_m,
    offs_n,
    lo,
    hi,
    seqlen_k,
    seqlen_k_pad,
    diag_offset,
    BLOCK_N: tl.constexpr,
    QBLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    P_LOG2: tl.constexpr,
    USE_TMA: tl.constexpr,
    EMULATE: tl.constexpr,
):
    # The K tile's scale is fetched one iteration ahead, so its latency never stalls the loop.
    k_scale_next = tl.load(ks_base + lo // QBLOCK_N, mask=lo < hi, other=1.0)
    for start_n in range(lo, hi, BLOCK_N):
        # lo is a multiple of BLOCK_N; say so, or the V^T tile's address (start_n is added
        # to it unscaled) looks unaligned and its load is not pipelined (no cp.async).
        start_n = start_n // BLOCK_N * BLOCK_N
        k_scale = k_scale_next
        k_scale_next = tl.load(ks_base + (start_n + BLOCK_N) // QBLOCK_N, mask=start_n + BLOCK_N < hi, other=1.0)
        cols = start_n + offs_n
        col_ok = cols < seqlen_k
        # K is read as [D, N] (D contiguous): the K-major B operand the fp8 MMA wants.
        if USE_TMA:
            # Rows past this sequence's keys belong to the next one (zeros past the tensor):
            # finite codes whose scores the masked loop removes.
            kT = desc_k.load([k_row0 + start_n, k_col]).T
        elif MASKED:
            kT = tl.load(k_ptrs + start_n * stride_kt, mask=col_ok[None, :], other=0.0)
        else:
            kT = tl.load(k_ptrs + start_n * stride_kt)
        coef = q_coef * k_scale
        s = tl.dot(q, kT)
        if MASKED:
            s = s * coef
            visible = col_ok[None, :]
            if IS_CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + diag_offset)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Rows with nothing visible yet keep m = -inf; shift by 0 so exp2 gives 0, not NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            # P is kept scaled by 2**P_LOG2 (up to 256, clear of e4m3's subnormals) by
            # shifting the exponent instead of multiplying; l carries the same factor.
            p = tl.math.exp2(s - (m_shift - P_LOG2)[:, None])
        else:
            # coef > 0, so the row max commutes with the scaling; s * coef - m fuses to an FMA.
            m_new = tl.maximum(m_i, tl.max(s, 1) * coef)
            m_shift = m_new
            p = tl.math.exp2(s * coef - (m_shift - P_LOG2)[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # V^T tile read as [N, D] with N contiguous: K-major again for P @ V. Keys in
        # [Tk, Tpad) hold finite codes (zeros) and get P = 0 exactly, so they add nothing.
        if USE_TMA:
            v = desc_v.load([v_row0, start_n]).T  # zeros past Tpad
        elif MASKED:
            # Masked at the padded length (a multiple of 16: whole 16-byte vectors, so the
            # load stays a pipelined cp.async).
            v = tl.load(v_ptrs + start_n, mask=(cols < seqlen_k_pad)[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs + start_n)
        acc = tl.dot(_to_e4m3(p, EMULATE), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_fp8_kernel(
    Q,
    QScale,
    K,
    KScale,
    VT,
    VScale,
    Out,
    Lse,
    DescQ,
    DescK,
    DescV,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qsb,
    stride_qsh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_ksb,
    stride_ksh,
    stride_vb,
    stride_vh,
    stride_vd,
    stride_vsb,
    stride_vsh,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_lb,
    stride_lh,
    seqlen_q,
    seqlen_k,
    seqlen_k_pad,
    num_heads_q,
    group_size,
    qk_scale,
    window_left,
    tune_bucket,  # autotune key only: the coarse length class of `_bucket`
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    QBLOCK_M: tl.constexpr,
    QBLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    P_LOG2: tl.constexpr,
    USE_TMA: tl.constexpr,
    EMULATE: tl.constexpr,
):
    start_m = tl.program_id(0)
    if IS_CAUSAL:
        # Longest rows first: under a causal mask later query blocks see more keys.
        start_m = tl.num_programs(0) - 1 - start_m
    batch_head = tl.program_id(1)
    b = batch_head // num_heads_q
    h = batch_head % num_heads_q
    kv_h = h // group_size
    m0 = start_m * BLOCK_M
    if m0 >= seqlen_q:
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen_q
    b64 = b.to(tl.int64)

    # Descriptors see 2-D views: q/k as [B*T, H*D], V^T as [B*Hkv*D, Tpad].
    k_row0 = b * seqlen_k
    k_col = kv_h * HEAD_DIM
    v_row0 = (b * (num_heads_q // group_size) + kv_h) * HEAD_DIM
    if USE_TMA:
        q = DescQ.load([b * seqlen_q + m0, h * HEAD_DIM])  # rows past Tq: discarded at the store
    else:
        q = tl.load(
            Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
    q_coef = tl.load(QScale + b * stride_qsb + h * stride_qsh + m0 // QBLOCK_M) * qk_scale
    k_ptrs = K + b64 * stride_kb + kv_h * stride_kh + offs_n[None, :] * stride_kt + offs_d[:, None]
    v_ptrs = VT + b64 * stride_vb + kv_h * stride_vh + offs_n[:, None] + offs_d[None, :] * stride_vd
    ks_base = KScale + b * stride_ksb + kv_h * stride_ksh

    diag_offset = seqlen_k - seqlen_q
    # Unbounded on the left, so lo_any == lo_full: two stages (unmasked, then diagonal/tail).
    _, lo_full, hi_full, hi_any = key_range(
        m0, seqlen_k, diag_offset, window_left, 0, 0, seqlen_k, BLOCK_M, BLOCK_N, IS_CAUSAL
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _fp8_kv_tiles(
        acc, l_i, m_i, q, q_coef, k_ptrs, v_ptrs, DescK, DescV, k_row0, k_col, v_row0, ks_base, stride_kt,
        offs_m, offs_n, lo_full, hi_full, seqlen_k, seqlen_k_pad, diag_offset,
        BLOCK_N, QBLOCK_N, False, IS_CAUSAL, P_LOG2, USE_TMA, EMULATE,
    )  # fmt: skip
    acc, l_i, m_i = _fp8_kv_tiles(
        acc, l_i, m_i, q, q_coef, k_ptrs, v_ptrs, DescK, DescV, k_row0, k_col, v_row0, ks_base, stride_kt,
        offs_m, offs_n, hi_full, hi_any, seqlen_k, seqlen_k_pad, diag_offset,
        BLOCK_N, QBLOCK_N, True, IS_CAUSAL, P_LOG2, USE_TMA, EMULATE,
    )  # fmt: skip

    v_scale = tl.load(VScale + b * stride_vsb + kv_h * stride_vsh + offs_d)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc * (1.0 / l_safe)[:, None] * v_scale[None, :]
    o_ptrs = Out + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    # m and l live in base 2 of the scaled scores (l times 2**P_LOG2); back to natural log.
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe) - P_LOG2) * 0.6931471805599453)
    tl.store(Lse + b * stride_lb + h * stride_lh + offs_m, lse, mask=row_ok)


def _prune_fp8_configs(configs, named_args, **kwargs):
    """Keep tiles that lie inside one quantization block and fit in shared memory."""
    d = named_args.get("HEAD_DIM", kwargs.get("HEAD_DIM", 128))
    qbm = named_args.get("QBLOCK_M", kwargs.get("QBLOCK_M", 128))
    qbn = named_args.get("QBLOCK_N", kwargs.get("QBLOCK_N", 128))
    kept = []
    for cfg in configs:
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        if qbm % bm or qbn % bn:
            continue
        if bm * d + cfg.num_stages * 2 * bn * d > 200 * 1024:  # e4m3: one byte per element
            continue
        kept.append(cfg)
    if not kept:  # quantization blocks smaller than every tuned tile: tiles = the blocks
        kept = [_config(min(qbm, 128), min(qbn, 128), 4, 2)]
    return kept


def _set_block_shapes(nargs) -> None:
    """Autotune pre-hook: descriptors' block shapes follow the config's tiles."""
    if TensorDescriptor is not None and isinstance(nargs["DescQ"], TensorDescriptor):
        bm, bn, d = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["HEAD_DIM"]
        nargs["DescQ"].block_shape = [bm, d]
        nargs["DescK"].block_shape = [bn, d]
        nargs["DescV"].block_shape = [d, bn]


def _config(bm: int, bn: int, warps: int, stages: int):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages, pre_hook=_set_block_shapes)


# Preference order: the first kept config is the default when autotuning is off.
_GPU_CONFIGS = [
    _config(bm, bn, w, s)
    for bm, bn, w, s in [
        (128, 128, 8, 3),
        (128, 64, 8, 3),
        (128, 64, 4, 4),
        (64, 64, 4, 3),
    ]
]

_attn_fwd_fp8_tuned = triton.autotune(
    configs=_GPU_CONFIGS,
    key=["HEAD_DIM", "IS_CAUSAL", "tune_bucket", "QBLOCK_M", "QBLOCK_N", "USE_TMA"],
    prune_configs_by={"early_config_prune": _prune_fp8_configs},
    **({"cache_results": True} if "cache_results" in triton.autotune.__code__.co_varnames else {}),
)(_attn_fwd_fp8_kernel)


def fp8_tma_supported(qkv: Fp8QKV) -> bool:
    """Whether the descriptor (TMA) loads can read these tensors: Hopper or newer (or the
    interpreter), contiguous e4m3 tensors as :func:`quantize_qkv_fp8` writes them."""
    if TensorDescriptor is None:
        return False
    dev = qkv.q.device
    if dev.type == "cuda":
        if torch.cuda.get_device_capability(dev)[0] < 9:
            return False
    elif not (dev.type == "cpu" and interpreter_enabled()):
        return False
    return all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (qkv.q, qkv.k, qkv.v_t))


def attention_forward_fp8(
    qkv: Fp8QKV,
    *,
    causal: bool,
    softmax_scale: float,
    out_dtype: torch.dtype = torch.bfloat16,
    tma: bool | None = None,
    autotune: bool = False,
    config: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 attention forward on pre-quantized inputs.

    Returns ``out [B, Tq, Hq, D]`` of ``out_dtype`` (contiguous) and the natural-log
    ``lse [B, Hq, Tq]`` (fp32; ``-inf`` and zero output for rows that see no key).
    Causal masks are aligned bottom-right (query ``i`` sees keys ``j <= i + Tk - Tq``).

    ``tma``: read Q/K/V tiles through TMA descriptors (``None``: on Hopper+ GPUs when
    :func:`fp8_tma_supported`; ``True`` raises where it is not supported);
    ``autotune``: tune the tile config instead of taking the first that fits; ``config``:
    an explicit ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` (tiles must divide the
    quantization blocks). Under the interpreter tiles are small and fixed.
    """
    q8, k8, v_t = qkv.q, qkv.k, qkv.v_t
    batch, seqlen_q, hq, d = q8.shape
    seqlen_k, hkv = k8.shape[1], k8.shape[2]
    if d not in FP8_HEAD_DIMS:
        raise ValueError(f"fp8 attention supports head_dim in {FP8_HEAD_DIMS}, got q{tuple(q8.shape)}")
    for name, t in (("q", q8), ("k", k8), ("v_t", v_t)):
        if t.dtype != torch.float8_e4m3fn or t.stride(-1) != 1:
            raise ValueError(f"qkv.{name} must be float8_e4m3fn with a unit last stride, got {t.dtype} {t.stride()}")
    if v_t.shape[:3] != (batch, hkv, d) or v_t.shape[3] < seqlen_k or v_t.shape[3] % V_PAD:
        raise ValueError(
            f"qkv.v_t{tuple(v_t.shape)} does not match k{tuple(k8.shape)}: expected [B, Hkv, D, Tpad], Tpad >= Tk "
            f"a multiple of {V_PAD} (codes past Tk must be finite; quantize_qkv_fp8 writes zeros)"
        )
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads must be a multiple of key/value heads: q{tuple(q8.shape)}, k{tuple(k8.shape)}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    if not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be positive, got {softmax_scale!r}")
    qbm, qbn = qkv.block_m, qkv.block_n
    if config is not None and (qbm % config[0] or qbn % config[1]):
        raise ValueError(f"config tiles {config[:2]} must divide the quantization blocks ({qbm}, {qbn})")
    out = torch.empty((batch, seqlen_q, hq, d), device=q8.device, dtype=out_dtype)
    lse = torch.empty((batch, hq, seqlen_q), device=q8.device, dtype=torch.float32)
    if batch * hq * seqlen_q == 0:
        return out, lse
    if seqlen_k == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    if tma is None:
        tma = tma_enabled(q8.device) and fp8_tma_supported(qkv)
    elif tma and not fp8_tma_supported(qkv):
        raise ValueError("tma=True needs Hopper (or the interpreter) and contiguous, 16-byte aligned e4m3 tensors")
    if interpreter_enabled():
        bm, bn = min(INTERPRETER_BLOCKS["BLOCK_M"], qbm), min(INTERPRETER_BLOCKS["BLOCK_N"], qbn)
        launch = {"BLOCK_M": bm, "BLOCK_N": bn}
    else:
        cfg = _config(*config) if config is not None else None
        launch = (
            None
            if autotune
            else launch_kwargs(cfg or first_config(_GPU_CONFIGS, _prune_fp8_configs, _meta_of(d, qbm, qbn)))
        )
    descs = (q8, k8, v_t)  # placeholders: the pointer path never reads them
    if tma:
        # Block shapes are set per launch (the autotune pre-hook rewrites them per config).
        bm, bn = (launch["BLOCK_M"], launch["BLOCK_N"]) if launch else (128, 128)
        views = (
            (q8.view(batch * seqlen_q, hq * d), [bm, d]),
            (k8.view(batch * seqlen_k, hkv * d), [bn, d]),
            (v_t.view(batch * hkv * d, v_t.shape[3]), [d, bn]),
        )
        descs = tuple(TensorDescriptor(x, list(x.shape), list(x.stride()), block) for x, block in views)
    qs, ks, vs = (t.contiguous() for t in (qkv.q_scale, qkv.k_scale, qkv.v_scale))
    args = (
        q8, qs, k8, ks, v_t, vs, out, lse, *descs,
        q8.stride(0), q8.stride(1), q8.stride(2), qs.stride(0), qs.stride(1),
        k8.stride(0), k8.stride(1), k8.stride(2), ks.stride(0), ks.stride(1),
        v_t.stride(0), v_t.stride(1), v_t.stride(2), vs.stride(0), vs.stride(1),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        seqlen_q, seqlen_k, v_t.shape[3], hq, hq // hkv, float(softmax_scale) * _LOG2E, UNBOUNDED, _bucket(seqlen_q),
    )  # fmt: skip
    meta = dict(_meta_of(d, qbm, qbn), IS_CAUSAL=bool(causal), P_LOG2=math.log2(P_SCALE), USE_TMA=bool(tma))
    if interpreter_enabled():
        grid = (triton.cdiv(seqlen_q, launch["BLOCK_M"]), batch * hq)
        _attn_fwd_fp8_kernel[grid](*args, **meta, **launch, EMULATE=True)
        return out, lse

    def grid(cfg):
        return (triton.cdiv(seqlen_q, cfg["BLOCK_M"]), batch * hq)

    with torch.cuda.device(q8.device):
        if launch is None:
            _attn_fwd_fp8_tuned[grid](*args, **meta, EMULATE=False)
        else:
            _attn_fwd_fp8_kernel[grid(launch)](*args, **meta, EMULATE=False, **launch)
    return out, lse


def _meta_of(head_dim: int, qblock_m: int, qblock_n: int) -> dict:
    return {"HEAD_DIM": head_dim, "QBLOCK_M": qblock_m, "QBLOCK_N": qblock_n}


def tuned_fp8_configs() -> dict[str, dict]:
    """The config the fp8 autotuner chose, per tuning key (for benchmark reports)."""
    return {
        f"fp8{tuple(key)}": {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        for key, cfg in getattr(_attn_fwd_fp8_tuned, "cache", {}).items()
    }
