"""KV page storage for every page format: allocation, writes, dequantization.

Formats (one tensor set per layer for K and one for V; any strides):

* ``float``: plain ``[num_blocks, block_size, Hkv, D]`` tensors of a float dtype.
* ``int8`` / ``int4`` (:class:`QuantizedPages`)::

      data    uint8 [num_blocks, block_size, Hkv, D * bits / 8]
      scales  fp16  [num_blocks, block_size, Hkv, 2]   per token: (scale, zero) over the D channels
              fp16  [num_blocks, Hkv, 2, D]            per channel (KIVI keys): over the block's tokens

  Codes are asymmetric and unsigned, ``x_hat = code * scale + zero``; int4 packs channel
  ``j`` in the low nibble and ``j + D/2`` in the high nibble of byte ``j`` (see
  :mod:`stream_attention.utils.quantization`, whose torch functions are the reference
  semantics the kernels here reproduce).
* ``fp8`` (:class:`Fp8Pages`)::

      data   float8_e4m3fn [num_blocks, block_size, Hkv, D]   the bf16 layout at half the bytes
      scale  float32       [Hkv]                              x = data * scale[head]

Sequences address pages through an int32 block table ``[B, max_blocks]``: logical token
``t`` lives in page ``block_table[b, t // block_size]`` at row ``t % block_size``. Writes
use vLLM-style ``slot_mapping`` (``slot = page * block_size + row``, negative slots are
skipped). Attention over these pages is :mod:`.kv_attention`; eviction scores are
:mod:`.kv_scoring`.

FP8 scales are per (layer, KV head), one for K and one for V, as vLLM's
``--kv-cache-dtype fp8`` keeps per-layer ``k_scale``/``v_scale``. They are calibrated
from the first tokens written (:func:`calibrate_scales`): the head's absolute maximum
times :data:`CALIBRATION_HEADROOM`, mapped onto e4m3's largest finite value 448, rounded
up to a power of two; later tokens beyond that range saturate at +-448 instead of
becoming inf. Why this scheme:

* e4m3 is a floating-point format: its relative precision (3 mantissa bits) is the same
  anywhere in its normal range, which spans 2^-6..448, almost 15 binades. A scale only
  has to keep a head's values inside that range, so generous headroom costs nothing but a
  little room at the bottom, where components below ~2^-11 of the head's maximum (which
  barely move a dot product) fall into subnormals. The headroom covers later tokens
  larger than the first prompt's (a short first prompt, or outlier tokens).
* A fixed scale of 1.0 (vLLM's default without calibration) saturates models whose keys
  reach hundreds (Qwen2's key biases) and pushes small-valued heads into subnormals.
* Per-token scales (what the int8 pages use) cost 2 bytes per token and head; per-head
  scales keep the pool at exactly half the bf16 bytes, and fold into the attention
  kernel as one scalar per program: the key scale into the softmax scale, the value
  scale into the output.
* Powers of two make ``x / scale`` exact, so the only rounding is e4m3's own
  (round-to-nearest-even, as torch's cast), and the dequantized value ``data * scale``
  is exact in bf16/fp16/fp32.

The scale of a layer is fixed once set: pages written under it are never rewritten. An
engine that writes dummy tokens while warming up calls :meth:`Fp8Pages.reset_scales`
before serving, so calibration comes from the first real prompt.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..utils.quantization import (
    FP16_MAX,
    SCALE_MIN,
    SCALE_REL_MARGIN,
    ZERO_ABS_MARGIN,
    ZERO_REL_MARGIN,
    dequantize_codes,
    pack_codes,
    quant_params,
    quantize_codes,
    unpack_codes,
)

__all__ = [
    "PAGE_BITS",
    "FP8_DTYPE",
    "FP8_MAX",
    "CALIBRATION_HEADROOM",
    "QuantizedPages",
    "Fp8Pages",
    "Pages",
    "page_format",
    "page_geometry",
    "page_kernel_args",
    "kv_bytes_per_token",
    "calibrate_scales",
    "write_tokens_to_pages",
    "write_blocks_to_pages",
    "write_tokens_fp8",
    "dequantize_pages",
    "dequantize_fp8_pages",
    "gather_sequence",
    "write_tokens_to_pages_ref",
    "write_blocks_to_pages_ref",
    "write_tokens_fp8_ref",
    "dequantize_pages_ref",
]

PAGE_BITS = (8, 4)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# First-write amax x 16 fills e4m3's range (rounded up to a power of two: 16-32x).
CALIBRATION_HEADROOM = 16.0
# A head whose first tokens are all zero gets vLLM's uncalibrated default.
DEFAULT_SCALE = 1.0

_Z_REL = tl.constexpr(ZERO_REL_MARGIN)
_Z_ABS = tl.constexpr(ZERO_ABS_MARGIN)
_S_REL = tl.constexpr(SCALE_REL_MARGIN)
_S_MIN = tl.constexpr(SCALE_MIN)
_F16_MAX = tl.constexpr(FP16_MAX)


# --------------------------------------------------------------------------------------
# Page containers
# --------------------------------------------------------------------------------------


class _PageGeometry:
    """Geometry read off a page format's ``data`` (``[blocks, block_size, heads, ...]``)."""

    @property
    def num_blocks(self) -> int:
        return self.data.shape[0]

    @property
    def block_size(self) -> int:
        return self.data.shape[1]

    @property
    def num_heads(self) -> int:
        return self.data.shape[2]

    @property
    def device(self) -> torch.device:
        return self.data.device


@dataclass
class QuantizedPages(_PageGeometry):
    """One layer's K or V pages in int8/int4 with their fp16 ``(scale, zero)`` pairs."""

    data: torch.Tensor
    scales: torch.Tensor
    bits: int
    head_dim: int
    per_channel: bool = False

    def __post_init__(self) -> None:
        if self.bits not in PAGE_BITS:
            raise ValueError(f"page bits must be one of {PAGE_BITS}, got {self.bits}")
        if self.data.dtype != torch.uint8 or self.data.dim() != 4:
            raise ValueError(f"data must be uint8 [blocks, block_size, heads, bytes], got {self.data.dtype} "
                             f"{tuple(self.data.shape)}")
        nb, bs, h, width = self.data.shape
        if width * 8 // self.bits != self.head_dim:
            raise ValueError(f"data width {width} does not hold head_dim {self.head_dim} at {self.bits} bits")
        want = (nb, h, 2, self.head_dim) if self.per_channel else (nb, bs, h, 2)
        if tuple(self.scales.shape) != want or self.scales.dtype != torch.float16:
            raise ValueError(f"scales must be float16 {want}, got {self.scales.dtype} {tuple(self.scales.shape)}")

    @classmethod
    def empty(
        cls,
        num_blocks: int,
        block_size: int,
        num_heads: int,
        head_dim: int,
        bits: int,
        *,
        per_channel: bool = False,
        device: torch.device | str | None = None,
    ) -> QuantizedPages:
        """Allocate zeroed pages (zeros dequantize to 0 thanks to zero scales)."""
        if bits not in PAGE_BITS:
            raise ValueError(f"page bits must be one of {PAGE_BITS}, got {bits}")
        if head_dim % (8 // bits):
            raise ValueError(f"head_dim {head_dim} must be even for int4 pages")
        data = torch.zeros(num_blocks, block_size, num_heads, head_dim * bits // 8, dtype=torch.uint8, device=device)
        shape = (num_blocks, num_heads, 2, head_dim) if per_channel else (num_blocks, block_size, num_heads, 2)
        scales = torch.zeros(shape, dtype=torch.float16, device=device)
        return cls(data, scales, bits, head_dim, per_channel)


    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()


@dataclass
class Fp8Pages(_PageGeometry):
    """One layer's K or V pages in e4m3 with one float32 scale per KV head (0 = not calibrated)."""

    data: torch.Tensor
    scale: torch.Tensor
    calibrated: bool = False  # host-side flag: calibration ops run on the first write only

    def __post_init__(self) -> None:
        if self.data.dtype != FP8_DTYPE or self.data.dim() != 4:
            raise ValueError(f"data must be float8_e4m3fn [blocks, block_size, heads, head_dim], got "
                             f"{self.data.dtype} {tuple(self.data.shape)}")
        if self.scale.dtype != torch.float32 or tuple(self.scale.shape) != (self.data.shape[2],):
            raise ValueError(f"scale must be float32 [{self.data.shape[2]}], got {self.scale.dtype} "
                             f"{tuple(self.scale.shape)}")

    @classmethod
    def empty(cls, num_blocks: int, block_size: int, num_heads: int, head_dim: int, *,
              device: torch.device | str | None = None) -> Fp8Pages:
        """Zeroed pages, scales not calibrated."""
        data = torch.zeros(num_blocks, block_size, num_heads, head_dim, dtype=FP8_DTYPE, device=device)
        return cls(data, torch.zeros(num_heads, dtype=torch.float32, device=device))

    def reset_scales(self) -> None:
        """Forget the calibration: the next write sets the scales again."""
        self.scale.zero_()
        self.calibrated = False


    @property
    def head_dim(self) -> int:
        return self.data.shape[3]


    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


Pages = QuantizedPages | Fp8Pages | torch.Tensor
"""One layer's K or V pages in any format (a float tensor for float pages)."""


def page_format(pages: Pages) -> str:
    """``"int8"``, ``"int4"``, ``"fp8"`` or ``"float"``."""
    if isinstance(pages, QuantizedPages):
        return f"int{pages.bits}"
    if isinstance(pages, Fp8Pages):
        return "fp8"
    return "float"


def page_geometry(pages: Pages) -> tuple[int, int, int, int]:
    """``(num_blocks, block_size, num_heads, head_dim)`` of pages in any format."""
    if isinstance(pages, (QuantizedPages, Fp8Pages)):
        return pages.num_blocks, pages.block_size, pages.num_heads, pages.head_dim
    if pages.dim() != 4:
        raise ValueError(f"float pages must be [blocks, block_size, heads, D], got {tuple(pages.shape)}")
    nb, bs, h, d = pages.shape
    return nb, bs, h, d


def page_kernel_args(pages: Pages) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """``(codes, scales, codes strides, scales strides)`` kernel arguments of pages.

    fp8 codes go as their bytes (the kernels convert them), with their per-head scale
    vector (strides unused); float pages pass themselves as placeholder scales."""
    if isinstance(pages, QuantizedPages):
        return pages.data, pages.scales, tuple(pages.data.stride()), tuple(pages.scales.stride())
    if isinstance(pages, Fp8Pages):
        return pages.data.view(torch.uint8), pages.scale, tuple(pages.data.stride()), (0, 0, 0, 0)
    return pages, pages, tuple(pages.stride()), (0, 0, 0, 0)


def kv_bytes_per_token(
    num_kv_heads: int, head_dim: int, bits: int, *, block_size: int = 16, key_per_channel: bool = False,
) -> float:
    """Bytes one token occupies in one layer's K and V pages (scales included).

    ``bits=16`` is an unquantized bf16/fp16 cache. Per-channel key scales belong to a
    whole page and are amortised over its ``block_size`` tokens.
    """
    if bits == 16:
        return 2.0 * num_kv_heads * head_dim * 2
    data = num_kv_heads * head_dim * bits / 8
    v_meta = num_kv_heads * 4
    k_meta = num_kv_heads * head_dim * 4 / block_size if key_per_channel else num_kv_heads * 4
    return 2 * data + v_meta + k_meta


# --------------------------------------------------------------------------------------
# Triton: quantization and dequantization
# --------------------------------------------------------------------------------------


@triton.jit
def _qparams(mn, mx, QMAX_: tl.constexpr):
    """fp32 (scale, zero) exactly representable in fp16; mirrors ``quant_params``."""
    zero = mn - tl.abs(mn) * _Z_REL - _Z_ABS
    zero = tl.minimum(tl.maximum(zero, -_F16_MAX), _F16_MAX)
    zero = zero.to(tl.float16).to(tl.float32)
    scale = (mx - zero) * (_S_REL / QMAX_)
    scale = tl.minimum(tl.maximum(scale, _S_MIN), _F16_MAX)
    scale = scale.to(tl.float16).to(tl.float32)
    return scale, zero


@triton.jit
def _codes(x, scale, zero, QMAX_: tl.constexpr):
    inv = 1.0 / scale
    c = tl.floor((x - zero) * inv + 0.5)
    return tl.minimum(tl.maximum(c, 0.0), QMAX_).to(tl.int32)


@triton.jit
def _quantize_tokens_kernel(
    X, SlotMapping, Data, Scales,
    stride_xn, stride_xh, stride_xd,
    stride_db, stride_dt, stride_dh, stride_dd,
    stride_sb, stride_st, stride_sh, stride_sc,
    num_heads,
    BLOCK_SIZE: tl.constexpr, PART: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
    BITS: tl.constexpr,
):
    n = tl.program_id(0)
    slot = tl.load(SlotMapping + n).to(tl.int64)
    if slot < 0:
        return
    page = slot // BLOCK_SIZE
    row = slot % BLOCK_SIZE
    QMAX_: tl.constexpr = (1 << BITS) - 1
    offs_h = tl.arange(0, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_P)
    h_ok = offs_h < num_heads
    mask = h_ok[:, None] & (offs_p < PART)[None, :]
    x_ptrs = X + n * stride_xn + offs_h[:, None] * stride_xh + offs_p[None, :] * stride_xd
    xa = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    mn = tl.min(tl.where(mask, xa, float("inf")), 1)
    mx = tl.max(tl.where(mask, xa, float("-inf")), 1)
    if BITS == 4:
        xb = tl.load(x_ptrs + PART * stride_xd, mask=mask, other=0.0).to(tl.float32)
        mn = tl.minimum(mn, tl.min(tl.where(mask, xb, float("inf")), 1))
        mx = tl.maximum(mx, tl.max(tl.where(mask, xb, float("-inf")), 1))
    # Padded head rows would otherwise carry infinities through the parameter math.
    mn = tl.where(h_ok, mn, 0.0)
    mx = tl.where(h_ok, mx, 0.0)
    scale, zero = _qparams(mn, mx, QMAX_)
    code = _codes(xa, scale[:, None], zero[:, None], QMAX_)
    if BITS == 4:
        code = code | (_codes(xb, scale[:, None], zero[:, None], QMAX_) << 4)
    d_ptrs = Data + page * stride_db + row * stride_dt + offs_h[:, None] * stride_dh + offs_p[None, :] * stride_dd
    tl.store(d_ptrs, code.to(tl.uint8), mask=mask)
    s_ptrs = Scales + page * stride_sb + row * stride_st + offs_h * stride_sh
    tl.store(s_ptrs, scale.to(tl.float16), mask=h_ok)
    tl.store(s_ptrs + stride_sc, zero.to(tl.float16), mask=h_ok)


@triton.jit
def _quantize_blocks_kernel(
    X, BlockIds, ValidLens, Data, Scales,
    stride_xb, stride_xt, stride_xh, stride_xd,
    stride_db, stride_dt, stride_dh, stride_dd,
    stride_sb, stride_sh, stride_sc, stride_sd,
    BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, PART: tl.constexpr, BLOCK_P: tl.constexpr,
    BITS: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    page = tl.load(BlockIds + i).to(tl.int64)
    valid = tl.minimum(tl.load(ValidLens + i), BLOCK_SIZE)
    QMAX_: tl.constexpr = (1 << BITS) - 1
    offs_t = tl.arange(0, BLOCK_T)
    offs_p = tl.arange(0, BLOCK_P)
    p_ok = offs_p < PART
    t_ok = offs_t < valid
    mask = t_ok[:, None] & p_ok[None, :]
    x_ptrs = X + i * stride_xb + offs_t[:, None] * stride_xt + h * stride_xh + offs_p[None, :] * stride_xd
    xa = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    # An empty block (valid == 0) gets neutral parameters instead of infinities.
    mn_a = tl.where(p_ok & (valid > 0), tl.min(tl.where(mask, xa, float("inf")), 0), 0.0)
    mx_a = tl.where(p_ok & (valid > 0), tl.max(tl.where(mask, xa, float("-inf")), 0), 0.0)
    scale_a, zero_a = _qparams(mn_a, mx_a, QMAX_)
    code = _codes(xa, scale_a[None, :], zero_a[None, :], QMAX_)
    s_ptrs = Scales + page * stride_sb + h * stride_sh + offs_p * stride_sd
    tl.store(s_ptrs, scale_a.to(tl.float16), mask=p_ok)
    tl.store(s_ptrs + stride_sc, zero_a.to(tl.float16), mask=p_ok)
    if BITS == 4:
        xb = tl.load(x_ptrs + PART * stride_xd, mask=mask, other=0.0).to(tl.float32)
        mn_b = tl.where(p_ok & (valid > 0), tl.min(tl.where(mask, xb, float("inf")), 0), 0.0)
        mx_b = tl.where(p_ok & (valid > 0), tl.max(tl.where(mask, xb, float("-inf")), 0), 0.0)
        scale_b, zero_b = _qparams(mn_b, mx_b, QMAX_)
        code = code | (_codes(xb, scale_b[None, :], zero_b[None, :], QMAX_) << 4)
        tl.store(s_ptrs + PART * stride_sd, scale_b.to(tl.float16), mask=p_ok)
        tl.store(s_ptrs + stride_sc + PART * stride_sd, zero_b.to(tl.float16), mask=p_ok)
    # Rows past the valid length are written as zeros so a page's bytes are deterministic.
    code = tl.where(t_ok[:, None], code, 0)
    d_ptrs = Data + page * stride_db + offs_t[:, None] * stride_dt + h * stride_dh + offs_p[None, :] * stride_dd
    tl.store(d_ptrs, code.to(tl.uint8), mask=(offs_t < BLOCK_SIZE)[:, None] & p_ok[None, :])


@triton.jit
def _dequantize_kernel(
    Data, Scales, BlockIds, Out,
    stride_db, stride_dt, stride_dh, stride_dd,
    ss0, ss1, ss2, ss3,
    stride_ob, stride_ot, stride_oh, stride_od,
    BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, PART: tl.constexpr, BLOCK_P: tl.constexpr,
    BITS: tl.constexpr, PER_CHANNEL: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    page = tl.load(BlockIds + i).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_p = tl.arange(0, BLOCK_P)
    t_ok = offs_t < BLOCK_SIZE
    p_ok = offs_p < PART
    mask = t_ok[:, None] & p_ok[None, :]
    c = tl.load(
        Data + page * stride_db + offs_t[:, None] * stride_dt + h * stride_dh + offs_p[None, :] * stride_dd,
        mask=mask, other=0,
    ).to(tl.int32)
    o_ptrs = Out + i * stride_ob + offs_t[:, None] * stride_ot + h * stride_oh + offs_p[None, :] * stride_od
    if PER_CHANNEL:
        s_ptrs = Scales + page * ss0 + h * ss1 + offs_p * ss3
        sa = tl.load(s_ptrs, mask=p_ok, other=0.0).to(tl.float32)[None, :]
        za = tl.load(s_ptrs + ss2, mask=p_ok, other=0.0).to(tl.float32)[None, :]
        if BITS == 4:
            sb = tl.load(s_ptrs + PART * ss3, mask=p_ok, other=0.0).to(tl.float32)[None, :]
            zb = tl.load(s_ptrs + ss2 + PART * ss3, mask=p_ok, other=0.0).to(tl.float32)[None, :]
    else:
        s_ptrs = Scales + page * ss0 + offs_t * ss1 + h * ss2
        sa = tl.load(s_ptrs, mask=t_ok, other=0.0).to(tl.float32)[:, None]
        za = tl.load(s_ptrs + ss3, mask=t_ok, other=0.0).to(tl.float32)[:, None]
        sb = sa
        zb = za
    if BITS == 4:
        lo = (c & 15).to(tl.float32) * sa + za
        hi = (c >> 4).to(tl.float32) * sb + zb
        tl.store(o_ptrs, lo.to(Out.dtype.element_ty), mask=mask)
        tl.store(o_ptrs + PART * stride_od, hi.to(Out.dtype.element_ty), mask=mask)
    else:
        x = c.to(tl.float32) * sa + za
        tl.store(o_ptrs, x.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _round_to_e4m3_grid(y):
    """``y`` (fp32, |y| <= 448) rounded to the nearest e4m3 value, ties to even, in fp32.

    The cast to e4m3 is then exact. Rounding here rather than in the cast keeps the result
    independent of the backend (Triton's CPU interpreter rounds wrongly where rounding
    carries into the exponent: 1.98 -> 1.0). Adding ``1.5 * 2^23 * step`` puts ``y`` where
    an fp32 ulp is ``step``, so fp32's own round-to-nearest-even rounds it to the grid.
    """
    bits = y.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 127
    exponent = tl.maximum(exponent, -6)  # below 2^-6 e4m3 is subnormal: a fixed step of 2^-9
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    magic = step * 12582912.0  # 1.5 * 2^23
    rounded = (y + magic) - magic
    return tl.where(rounded == 0.0, y * 0.0, rounded)  # keeps the sign of values that round to zero


@triton.jit
def _write_fp8_kernel(
    X, Slots, Data, Scale,
    stride_xt, stride_xh, stride_xd,
    stride_db, stride_dt, stride_dh, stride_dd,
    num_heads,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(Slots + t)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < num_heads
    mask = h_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    x = tl.load(X + t.to(tl.int64) * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :] * stride_xd,
                mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(Scale + offs_h, mask=h_ok, other=1.0)
    scale = tl.where(scale > 0, scale, 1.0)  # a write before any calibration (never by the engine)
    y = tl.minimum(tl.maximum(x / scale[:, None], -448.0), 448.0)
    page = slot // BLOCK_SIZE
    row = slot % BLOCK_SIZE
    ptrs = Data + page * stride_db + row * stride_dt + offs_h[:, None] * stride_dh + offs_d[None, :] * stride_dd
    tl.store(ptrs, _round_to_e4m3_grid(y).to(Data.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# Host wrappers
# --------------------------------------------------------------------------------------


def _device_ctx(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_tokens(x: torch.Tensor, pages: Pages) -> None:
    _, _, h, d = page_geometry(pages)
    if x.dim() != 3 or x.shape[1] != h or x.shape[2] != d:
        raise ValueError(f"x must be [tokens, {h}, {d}], got {tuple(x.shape)}")


def write_tokens_to_pages(x: torch.Tensor, slot_mapping: torch.Tensor, pages: Pages) -> None:
    """Store ``x [N, Hkv, D]`` into ``pages`` at ``slot_mapping [N]`` (int64, negative =
    skip): quantized per token into :class:`QuantizedPages`, as e4m3 into
    :class:`Fp8Pages` (:func:`write_tokens_fp8`), copied into float pages. No host sync."""
    if isinstance(pages, Fp8Pages):
        write_tokens_fp8(x, slot_mapping, pages)
        return
    if not isinstance(pages, QuantizedPages):
        _check_tokens(x, pages)
        keep = slot_mapping >= 0
        h, d = pages.shape[2], pages.shape[3]
        pages.view(-1, h, d).index_copy_(0, slot_mapping[keep], x[keep].to(pages.dtype))
        return
    if pages.per_channel:
        raise ValueError("per-channel pages are written a block at a time: use write_blocks_to_pages")
    n, h, d = x.shape
    if h != pages.num_heads or d != pages.head_dim:
        raise ValueError(f"x is {tuple(x.shape)}, pages hold {pages.num_heads} heads of {pages.head_dim}")
    if n == 0:
        return
    part = d // 2 if pages.bits == 4 else d
    with _device_ctx(x.device):
        _quantize_tokens_kernel[(n,)](
            x, slot_mapping, pages.data, pages.scales, *x.stride(), *pages.data.stride(), *pages.scales.stride(), h,
            BLOCK_SIZE=pages.block_size, PART=part, BLOCK_P=triton.next_power_of_2(part),
            BLOCK_H=triton.next_power_of_2(h), BITS=pages.bits,
        )


def _block_slots(block_ids: torch.Tensor, valid_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat slots of whole blocks, ``-1`` past each block's valid length."""
    rows = torch.arange(block_size, device=block_ids.device)
    slots = block_ids.to(torch.int64)[:, None] * block_size + rows
    return torch.where(rows < valid_lens.to(block_ids.device)[:, None], slots, -1).reshape(-1)


def write_blocks_to_pages(x: torch.Tensor, block_ids: torch.Tensor, valid_lens: torch.Tensor, pages: Pages) -> None:
    """Store whole blocks ``x [n, block_size, Hkv, D]`` into pages ``block_ids [n]``.

    With per-channel :class:`QuantizedPages` each (page, head, channel) gets a ``(scale,
    zero)`` over the block's first ``valid_lens[i]`` tokens; rows past that are zeroed.
    Every other format is written row by row (same result as :func:`write_tokens_to_pages`).
    """
    n, bs, h, d = x.shape
    _, page_bs, page_h, page_d = page_geometry(pages)
    if bs != page_bs or h != page_h or d != page_d:
        raise ValueError(f"x is {tuple(x.shape)}, pages are [.., {page_bs}, {page_h}, {page_d}]")
    if n == 0:
        return
    if not (isinstance(pages, QuantizedPages) and pages.per_channel):
        write_tokens_to_pages(x.reshape(n * bs, h, d), _block_slots(block_ids, valid_lens, bs), pages)
        return
    part = d // 2 if pages.bits == 4 else d
    with _device_ctx(x.device):
        _quantize_blocks_kernel[(n, h)](
            x, block_ids, valid_lens.to(torch.int32), pages.data, pages.scales,
            *x.stride(), *pages.data.stride(), *pages.scales.stride(),
            BLOCK_SIZE=bs, BLOCK_T=triton.next_power_of_2(bs), PART=part, BLOCK_P=triton.next_power_of_2(part),
            BITS=pages.bits,
        )


def calibrate_scales(x: torch.Tensor, slot_mapping: torch.Tensor, pages: Fp8Pages) -> None:
    """Set the scale of every head that has none from ``x [N, Hkv, D]`` (rows with a
    negative slot ignored): ``2^ceil(log2(amax * headroom / 448))``. Device ops only (no
    host sync); heads already calibrated keep their scale."""
    if x.shape[0] == 0:
        return
    valid = (slot_mapping >= 0).view(-1, 1, 1)
    amax = torch.where(valid, x.detach().abs().float(), 0.0).amax(dim=(0, 2))
    amax = torch.nan_to_num(amax, nan=0.0, posinf=0.0)
    fresh = torch.exp2(torch.ceil(torch.log2(amax * (CALIBRATION_HEADROOM / FP8_MAX))))
    fresh = torch.where(amax > 0, fresh, DEFAULT_SCALE)
    pages.scale.copy_(torch.where(pages.scale > 0, pages.scale, fresh))


def write_tokens_fp8(x: torch.Tensor, slot_mapping: torch.Tensor, pages: Fp8Pages) -> None:
    """Store ``x [N, Hkv, D]`` as e4m3 at ``slot_mapping [N]`` (int64, negative = skip),
    calibrating the scales on the first write. No host sync (CUDA-graph safe once calibrated)."""
    _check_tokens(x, pages)
    n = x.shape[0]
    if n == 0:
        return
    if not pages.calibrated:
        calibrate_scales(x, slot_mapping, pages)
        pages.calibrated = True
    with _device_ctx(x.device):
        _write_fp8_kernel[(n,)](
            x, slot_mapping, pages.data, pages.scale, *x.stride(), *pages.data.stride(), pages.num_heads,
            BLOCK_SIZE=pages.block_size, HEAD_DIM=pages.head_dim,
            BLOCK_H=triton.next_power_of_2(pages.num_heads), BLOCK_D=triton.next_power_of_2(pages.head_dim),
        )


def dequantize_pages(pages: Pages, block_ids: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pages ``block_ids`` (all when None) as ``[n, block_size, Hkv, D]`` of ``dtype``, any format."""
    if isinstance(pages, Fp8Pages):
        return dequantize_fp8_pages(pages, block_ids, dtype)
    if not isinstance(pages, QuantizedPages):
        return (pages if block_ids is None else pages[block_ids.long()]).to(dtype)
    if block_ids is None:
        block_ids = torch.arange(pages.num_blocks, device=pages.device)
    n = block_ids.numel()
    out = torch.empty((n, pages.block_size, pages.num_heads, pages.head_dim), dtype=dtype, device=pages.device)
    if n == 0:
        return out
    part = pages.head_dim // 2 if pages.bits == 4 else pages.head_dim
    with _device_ctx(pages.device):
        _dequantize_kernel[(n, pages.num_heads)](
            pages.data, pages.scales, block_ids, out,
            *pages.data.stride(), *pages.scales.stride(), *out.stride(),
            BLOCK_SIZE=pages.block_size, BLOCK_T=triton.next_power_of_2(pages.block_size), PART=part,
            BLOCK_P=triton.next_power_of_2(part), BITS=pages.bits, PER_CHANNEL=pages.per_channel,
        )
    return out


def dequantize_fp8_pages(pages: Fp8Pages, block_ids: torch.Tensor | None = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pages ``block_ids`` (all when None) as ``[n, block_size, Hkv, D]`` of ``dtype``."""
    data = pages.data if block_ids is None else pages.data[block_ids.long()]
    return (data.to(torch.float32) * pages.scale[:, None]).to(dtype)


# --------------------------------------------------------------------------------------
# PyTorch references (the semantics the kernels reproduce)
# --------------------------------------------------------------------------------------


def write_tokens_to_pages_ref(x: torch.Tensor, slot_mapping: torch.Tensor, pages: QuantizedPages) -> None:
    """Reference for :func:`write_tokens_to_pages`."""
    keep = slot_mapping >= 0
    x, slots = x[keep], slot_mapping[keep].long()
    if x.numel() == 0:
        return
    xf = x.float()
    scale, zero = quant_params(xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True), pages.bits)
    codes = pack_codes(quantize_codes(xf, scale, zero, pages.bits), pages.bits)
    page, row = slots // pages.block_size, slots % pages.block_size
    pages.data[page, row] = codes
    pages.scales[page, row] = torch.cat([scale, zero], dim=-1).to(torch.float16)


def write_blocks_to_pages_ref(
    x: torch.Tensor, block_ids: torch.Tensor, valid_lens: torch.Tensor, pages: QuantizedPages,
) -> None:
    """Reference for :func:`write_blocks_to_pages`."""
    if not pages.per_channel:
        n, bs, h, d = x.shape
        rows = torch.arange(bs, device=x.device)
        slots = torch.where(rows < valid_lens[:, None], block_ids.long()[:, None] * bs + rows, -1)
        write_tokens_to_pages_ref(x.reshape(n * bs, h, d), slots.reshape(-1), pages)
        return
    for i, (blk, valid) in enumerate(zip(block_ids.tolist(), valid_lens.tolist(), strict=True)):
        xb = x[i].float()  # [bs, h, d]
        if valid > 0:
            mn, mx = xb[:valid].amin(0), xb[:valid].amax(0)
        else:
            mn = mx = torch.zeros_like(xb[0])
        scale, zero = quant_params(mn, mx, pages.bits)  # [h, d]
        codes = quantize_codes(xb, scale, zero, pages.bits)
        codes[valid:] = 0
        pages.data[blk] = pack_codes(codes, pages.bits)
        pages.scales[blk] = torch.stack([scale, zero], dim=1).to(torch.float16)


def dequantize_pages_ref(pages: QuantizedPages, block_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Reference for :func:`dequantize_pages` (fp32)."""
    if block_ids is None:
        block_ids = torch.arange(pages.num_blocks, device=pages.device)
    block_ids = block_ids.long()
    codes = unpack_codes(pages.data[block_ids], pages.bits)
    sc = pages.scales[block_ids].float()
    if pages.per_channel:
        scale, zero = sc[:, None, :, 0, :], sc[:, None, :, 1, :]
    else:
        scale, zero = sc[..., 0:1], sc[..., 1:2]
    return dequantize_codes(codes, scale, zero)


def write_tokens_fp8_ref(x: torch.Tensor, slot_mapping: torch.Tensor, pages: Fp8Pages) -> None:
    """Torch version of :func:`write_tokens_fp8` (the engine's path where Triton cannot run)."""
    _check_tokens(x, pages)
    if x.shape[0] == 0:
        return
    if not pages.calibrated:
        calibrate_scales(x, slot_mapping, pages)
        pages.calibrated = True
    keep = slot_mapping >= 0
    xs, slots = x[keep].float(), slot_mapping[keep].long()
    scale = torch.where(pages.scale > 0, pages.scale, 1.0)
    codes = (xs / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    h, d = pages.num_heads, pages.head_dim
    # index_copy_ has no fp8 kernels: copy the bytes.
    pages.data.view(torch.uint8).view(-1, h, d).index_copy_(0, slots, codes.view(torch.uint8))


def gather_sequence(pages: Pages, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of a sequence's pages, dequantized: fp32 ``[length, Hkv, D]``
    (float pages keep their dtype for :func:`torch.Tensor.to` by the caller)."""
    block_size = page_geometry(pages)[1]
    ids = block_table[:triton.cdiv(length, block_size)].long()
    dense = dequantize_pages_ref(pages, ids) if isinstance(pages, QuantizedPages) else dequantize_pages(pages, ids)
    return dense.reshape(-1, *dense.shape[2:])[:length]
