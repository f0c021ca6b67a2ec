"""Asymmetric integer quantization of K/V tensors, in plain PyTorch.

These are the reference semantics shared by the offline compressors
(:mod:`stream_attention.utils.memory`) and the Triton page kernels
(:mod:`stream_attention.kernels.kv_pages`), which must produce the same codes.

A group of values with minimum ``mn`` and maximum ``mx`` is stored as unsigned codes
``c = clamp(floor((x - zero) / scale + 1/2), 0, qmax)`` with ``qmax = 2**bits - 1`` and
reconstructed as ``x_hat = c * scale + zero``. ``scale`` and ``zero`` are kept in fp16 to
halve the metadata; to keep the round-trip bound ``|x - x_hat| <= scale / 2`` exact
despite that rounding, ``zero`` is nudged below ``mn`` and ``scale`` above
``(mx - zero) / qmax`` by more than half an fp16 ulp before they are rounded, so every
value of the group stays inside the representable range ``[zero, zero + qmax * scale]``.

Packing: ``n = 8 // bits`` codes share a byte. The last dimension ``D`` is cut into ``n``
contiguous parts; byte ``j`` holds ``codes[j + p * D / n]`` at bit ``p * bits``. For int4
that is channel ``j`` in the low nibble and channel ``j + D/2`` in the high nibble, which
lets the attention kernels multiply each half of ``q`` against one nibble plane with no
interleaving shuffle.
"""

from __future__ import annotations

import torch

__all__ = [
    "QMAX",
    "SUPPORTED_BITS",
    "quant_params",
    "quantize_codes",
    "dequantize_codes",
    "pack_codes",
    "unpack_codes",
    "packed_dim",
    "quantize_along",
]

SUPPORTED_BITS = (2, 4, 8)
QMAX = {2: 3, 4: 15, 8: 255}

# Margins larger than half an fp16 ulp (relative 2**-11, absolute 2**-25 for subnormals),
# so rounding to fp16 can never move zero above the minimum or shrink the scale.
ZERO_REL_MARGIN = 2.0**-10
ZERO_ABS_MARGIN = 2.0**-24
SCALE_REL_MARGIN = 1.0 + 2.0**-10
# Smallest normal fp16: below it fp16 loses relative precision and the margin argument fails.
SCALE_MIN = 2.0**-14
FP16_MAX = 65504.0


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def packed_dim(dim: int, bits: int) -> int:
    """Bytes needed along the packed (last) dimension for ``dim`` codes of ``bits`` bits."""
    _check_bits(bits)
    per_byte = 8 // bits
    if dim % per_byte:
        raise ValueError(f"the last dimension ({dim}) must be a multiple of {per_byte} for {bits}-bit packing")
    return dim // per_byte


def quant_params(mn: torch.Tensor, mx: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(scale, zero)`` for groups with minimum ``mn`` and maximum ``mx``.

    Both results hold values exactly representable in fp16 (store them as fp16 without
    loss). Values beyond fp16's range are clamped; the round-trip bound then no longer
    holds, which never happens for K/V activations of real models.
    """
    _check_bits(bits)
    mn = mn.float()
    mx = mx.float()
    zero = mn - mn.abs() * ZERO_REL_MARGIN - ZERO_ABS_MARGIN
    zero = zero.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).float()
    scale = (mx - zero) * (SCALE_REL_MARGIN / QMAX[bits])
    scale = scale.clamp(SCALE_MIN, FP16_MAX).to(torch.float16).float()
    return scale, zero


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (uint8, unpacked) of ``x`` for broadcastable ``scale``/``zero``."""
    inv = 1.0 / scale
    codes = torch.floor((x.float() - zero) * inv + 0.5)
    return codes.clamp_(0, QMAX[bits]).to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """fp32 reconstruction ``codes * scale + zero``."""
    return codes.float() * scale.float() + zero.float()


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes along the last dimension (split-part layout, see module doc)."""
    per_byte = 8 // bits
    width = packed_dim(codes.shape[-1], bits)
    if per_byte == 1:
        return codes.to(torch.uint8)
    parts = codes.to(torch.int32).split(width, dim=-1)
    packed = parts[0].clone()
    for p in range(1, per_byte):
        packed |= parts[p] << (p * bits)
    return packed.to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes with ``8 // bits`` times the last dimension."""
    _check_bits(bits)
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    wide = packed.to(torch.int32)
    mask = QMAX[bits]
    parts = [(wide >> (p * bits)) & mask for p in range(per_byte)]
    return torch.cat(parts, dim=-1).to(torch.uint8)


def quantize_along(
    x: torch.Tensor, bits: int, dims: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` with one ``(scale, zero)`` per group spanning ``dims``.

    Returns unpacked uint8 codes shaped like ``x`` and fp32 ``scale``/``zero`` with the
    reduced dimensions kept as size 1.
    """
    xf = x.float()
    mn = xf.amin(dim=dims, keepdim=True)
    mx = xf.amax(dim=dims, keepdim=True)
    scale, zero = quant_params(mn, mx, bits)
    return quantize_codes(xf, scale, zero, bits), scale, zero
