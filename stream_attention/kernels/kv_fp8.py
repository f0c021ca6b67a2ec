"""FP8 (e4m3) paged KV cache: pages, writes, and attention that reads them directly.

Page layout (one per layer for K and one for V)::

    data   float8_e4m3fn [num_blocks, block_size, Hkv, D]   the bf16 layout at half the bytes
    scale  float32       [Hkv]                              x = data * scale[head]

Scales are per (layer, KV head), one for K and one for V, as vLLM's ``--kv-cache-dtype
fp8`` keeps per-layer ``k_scale``/``v_scale``. They are calibrated from the first
tokens written (:func:`calibrate_scales`): the head's absolute maximum times
:data:`CALIBRATION_HEADROOM`, mapped onto e4m3's largest finite value 448, rounded up to
a power of two; later tokens beyond that range saturate at +-448 instead of becoming inf.
Why this scheme:

* e4m3 is a floating-point format: its relative precision (3 mantissa bits) is the same
  anywhere in its normal range, which spans 2^-6..448, almost 15 binades. A scale only
  has to keep a head's values inside that range, so generous headroom costs nothing but a
  little room at the bottom, where components below ~2^-11 of the head's maximum (which
  barely move a dot product) fall into subnormals. The headroom covers later tokens
  larger than the first prompt's (a short first prompt, or outlier tokens).
* A fixed scale of 1.0 (vLLM's default without calibration) saturates models whose keys
  reach hundreds (Qwen2's key biases) and pushes small-valued heads into subnormals.
* Per-token scales (what the int8 pages use) cost 2 bytes per token and head; per-head
  scales keep the pool at exactly half the bf16 bytes, and fold into the kernels as one
  scalar per program: the key scale into the softmax scale, the value scale into the
  output.
* Powers of two make ``x / scale`` exact, so the only rounding is e4m3's own
  (round-to-nearest-even, as torch's cast), and the dequantized value ``data * scale``
  is exact in bf16/fp16/fp32.

The scale of a layer is fixed once set: pages written under it are never rewritten. An
engine that writes dummy tokens while warming up calls :meth:`Fp8Pages.reset_scales`
before serving, so calibration comes from the first real prompt.

The attention kernel loads e4m3 tiles and converts them to the query's dtype in registers
(exact: every e4m3 value is a bf16 and an fp16 value) before ``tl.dot``; Hopper converts
two values per instruction. Decode splits long contexts across programs (flash-decoding),
merged by :func:`~stream_attention.kernels.split_combine.combine_splits`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .attention_fwd import dot_precision_for
from .runtime import interpreter_enabled
from .split_combine import combine_splits, partial_buffers

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "CALIBRATION_HEADROOM",
    "Fp8Pages",
    "calibrate_scales",
    "write_tokens_fp8",
    "write_tokens_fp8_ref",
    "dequantize_fp8_pages",
    "paged_attention_fp8",
    "paged_attention_fp8_ref",
    "paged_token_attention_mass_fp8",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# First-write amax x 16 fills e4m3's range (rounded up to a power of two: 16-32x).
CALIBRATION_HEADROOM = 16.0
# A head whose first tokens are all zero gets vLLM's uncalibrated default.
DEFAULT_SCALE = 1.0
_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)


@dataclass
class Fp8Pages:
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
    def num_blocks(self) -> int:
        return self.data.shape[0]

    @property
    def block_size(self) -> int:
        return self.data.shape[1]

    @property
    def num_heads(self) -> int:
        return self.data.shape[2]

    @property
    def head_dim(self) -> int:
        return self.data.shape[3]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


# --------------------------------------------------------------------------------------
# Writes
# --------------------------------------------------------------------------------------


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


def _check_tokens(x: torch.Tensor, pages: Fp8Pages) -> None:
    if x.dim() != 3 or x.shape[1] != pages.num_heads or x.shape[2] != pages.head_dim:
        raise ValueError(f"x must be [tokens, {pages.num_heads}, {pages.head_dim}], got {tuple(x.shape)}")


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
    ctx = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with ctx:
        _write_fp8_kernel[(n,)](
            x, slot_mapping, pages.data, pages.scale, *x.stride(), *pages.data.stride(), pages.num_heads,
            BLOCK_SIZE=pages.block_size, HEAD_DIM=pages.head_dim,
            BLOCK_H=triton.next_power_of_2(pages.num_heads), BLOCK_D=triton.next_power_of_2(pages.head_dim),
        )


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


def dequantize_fp8_pages(pages: Fp8Pages, block_ids: torch.Tensor | None = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pages ``block_ids`` (all when None) as ``[n, block_size, Hkv, D]`` of ``dtype``."""
    data = pages.data if block_ids is None else pages.data[block_ids.long()]
    return (data.to(torch.float32) * pages.scale[:, None]).to(dtype)


# --------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------


@triton.jit
def _key_span(ctx, q_len, tok0, toks, pid_s, num_splits, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys ``[lo, hi)`` that query tokens ``[tok0, tok0 + toks)`` read in split ``pid_s``;
    ``[lo, full_hi)`` is visible to every row (no mask). Splits are computed from the
    sequence's own length, so a CUDA graph replays for any context."""
    diag = ctx - q_len
    hi = ctx
    full = ctx
    if CAUSAL:
        last_tok = tl.minimum(tok0 + toks, q_len) - 1
        hi = tl.minimum(hi, last_tok + diag + 1)
        full = tok0 + diag + 1
    hi = tl.maximum(hi, 0)
    tiles_per_split = tl.cdiv(tl.cdiv(hi, BLOCK_N), num_splits)
    lo = tl.minimum(pid_s * tiles_per_split * BLOCK_N, hi)
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, hi)
    full = tl.minimum(tl.maximum(full, lo), hi)
    full_hi = lo + (full - lo) // BLOCK_N * BLOCK_N
    return lo, hi, full_hi


@triton.jit
def _fp8_scores(q, K, bt_ptr, cols, col_ok, kv_head, offs_d, d_ok,
                stride_kb, stride_kt, stride_kh, stride_kd,
                BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``q . k`` of one key tile (K loaded transposed, converted to q's dtype) and its pages/rows."""
    if MASKED:
        page = tl.load(bt_ptr + cols // BLOCK_SIZE, mask=col_ok, other=0).to(tl.int64)
        kmask = d_ok[:, None] & col_ok[None, :]
    else:
        page = tl.load(bt_ptr + cols // BLOCK_SIZE).to(tl.int64)
        kmask = d_ok[:, None]
    row = cols % BLOCK_SIZE
    k_ptrs = K + kv_head * stride_kh + (page * stride_kb + row * stride_kt)[None, :] + offs_d[:, None] * stride_kd
    k = tl.load(k_ptrs, mask=kmask, other=0.0).to(q.dtype)
    return tl.dot(q, k, input_precision=DOT_PRECISION), page, row


@triton.jit
def _fp8_attend(acc, l_i, m_i, q, K, V, bt_ptr, kv_head, row_tok, lo, hi, ctx, diag, qk_scale, offs_d, d_ok,
                stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
                BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        cols = start + offs_n
        col_ok = cols < ctx
        qk, page, row = _fp8_scores(q, K, bt_ptr, cols, col_ok, kv_head, offs_d, d_ok,
                                    stride_kb, stride_kt, stride_kh, stride_kd, BLOCK_SIZE, MASKED, DOT_PRECISION)
        qk = qk * qk_scale
        if MASKED:
            visible = col_ok[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= row_tok[:, None] + diag)
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing: 0, not NaN
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_shift = m_new
        p = tl.math.exp2(qk - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = V + kv_head * stride_vh + (page * stride_vb + row * stride_vt)[:, None] + offs_d[None, :] * stride_vd
        if MASKED:
            v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _paged_attn_fp8_kernel(
    Q, Out, PartOut, PartLse, Lse,
    K, V, KScale, VScale, BlockTables, SeqLens, CuSeqlensQ,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_bt,
    stride_ps, stride_pt, stride_ph, stride_pd,
    stride_ls, stride_lt, stride_lh,
    stride_lse_h, stride_lse_t,
    num_kv_heads, group_size, num_splits, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // num_kv_heads
    kv_head = pid_bh % num_kv_heads
    q_start = tl.load(CuSeqlensQ + b)
    q_len = tl.load(CuSeqlensQ + b + 1) - q_start
    ctx = tl.load(SeqLens + b)
    # Rows are (query token, head of the GQA group): one pass over the pages serves the group.
    toks = BLOCK_M // group_size
    tok0 = pid_m * toks
    if tok0 >= q_len:
        return
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_tok = tok0 + offs_r // group_size
    row_head = kv_head * group_size + offs_r % group_size
    row_ok = (offs_r < toks * group_size) & (row_tok < q_len)
    diag = ctx - q_len
    lo, hi, full_hi = _key_span(ctx, q_len, tok0, toks, pid_s, num_splits, CAUSAL, BLOCK_N)
    q_rows = (q_start + row_tok).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + row_head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # The key scale joins the softmax scale; the value scale multiplies the output.
    qk_scale = qk_scale * tl.load(KScale + kv_head)
    v_scale = tl.load(VScale + kv_head)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_ptr = BlockTables + b.to(tl.int64) * stride_bt
    acc, l_i, m_i = _fp8_attend(acc, l_i, m_i, q, K, V, bt_ptr, kv_head, row_tok, lo, full_hi, ctx, diag, qk_scale,
                                offs_d, d_ok, stride_kb, stride_kt, stride_kh, stride_kd,
                                stride_vb, stride_vt, stride_vh, stride_vd,
                                BLOCK_N, BLOCK_SIZE, False, CAUSAL, DOT_PRECISION)
    acc, l_i, m_i = _fp8_attend(acc, l_i, m_i, q, K, V, bt_ptr, kv_head, row_tok, full_hi, hi, ctx, diag, qk_scale,
                                offs_d, d_ok, stride_kb, stride_kt, stride_kh, stride_kd,
                                stride_vb, stride_vt, stride_vh, stride_vd,
                                BLOCK_N, BLOCK_SIZE, True, CAUSAL, DOT_PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc * (v_scale / l_safe)[:, None]
    lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:  # normalised partials and base-2 LSEs, merged by split_combine
        tl.store(PartOut + pid_s * stride_ps + q_rows[:, None] * stride_pt + row_head[:, None] * stride_ph
                 + offs_d[None, :] * stride_pd, o, mask=mask)
        tl.store(PartLse + pid_s * stride_ls + q_rows * stride_lt + row_head * stride_lh, lse2, mask=row_ok)
    else:
        tl.store(Out + q_rows[:, None] * stride_ot + row_head[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 o.to(Out.dtype.element_ty), mask=mask)
        if STORE_LSE:
            tl.store(Lse + row_head * stride_lse_h + q_rows * stride_lse_t, lse2 * 0.6931471805599453, mask=row_ok)


# Fixed schedules (BLOCK_N, num_warps, num_stages): decode is memory-bound, and the bf16
# pointer kernel's H100 optimum is 128-key tiles, 4 warps, 2 stages; prefill tiles are
# up to 64 rows. benchmarks/bench_kv_quant.py times the decode one.
DEFAULT_LAUNCH = {"decode": (128, 4, 2), "prefill": (64, 4, 2)}
_INTERPRETER_BLOCK_N = 16  # small tiles keep CPU tests quick while crossing pages and splits


def _check_pages(q: torch.Tensor, k_pages: Fp8Pages, v_pages: Fp8Pages) -> tuple[int, int, int]:
    if not isinstance(k_pages, Fp8Pages) or not isinstance(v_pages, Fp8Pages):
        raise ValueError("k_pages and v_pages must both be Fp8Pages")
    if k_pages.data.shape != v_pages.data.shape:
        raise ValueError(f"K and V pages differ in shape: {tuple(k_pages.data.shape)} vs {tuple(v_pages.data.shape)}")
    _, bs, hkv, d = k_pages.data.shape
    if q.dim() != 3 or q.shape[-1] != d:
        raise ValueError(f"q must be [tokens, Hq, {d}], got {tuple(q.shape)}")
    if q.shape[1] % hkv:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({hkv})")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must be fp16/bf16/fp32, got {q.dtype}")
    return bs, hkv, d


def paged_attention_fp8(
    q: torch.Tensor,
    k_pages: Fp8Pages,
    v_pages: Fp8Pages,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    *,
    max_q_len: int | None = None,
    softmax_scale: float | None = None,
    num_splits: int = 1,
    causal: bool = True,
    return_lse: bool = False,
    launch: tuple[int, int, int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of new query tokens over e4m3 pages; the calling convention of
    :func:`stream_attention.kernels.kv_quant.paged_attention_quantized`.

    ``q [total_q, Hq, D]`` packed per ``cu_seqlens_q`` (int32 ``[B + 1]``; None = decode,
    one query per sequence), ``block_tables`` int32 ``[B, max_blocks]``, ``seq_lens``
    int32 ``[B]`` counting keys including the new tokens (already written), causal
    bottom-right. No host sync unless a prefill leaves out ``max_q_len`` (CUDA-graph
    safe). Returns ``out`` in q's dtype, and with ``return_lse`` the fp32 natural-log
    ``lse [Hq, total_q]`` (``-inf`` where nothing is visible). ``launch`` is ``(BLOCK_N,
    num_warps, num_stages)`` (default :data:`DEFAULT_LAUNCH`).
    """
    block_size, hkv, head_dim = _check_pages(q, k_pages, v_pages)
    decode = cu_seqlens_q is None
    batch = q.shape[0] if decode else cu_seqlens_q.numel() - 1
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or seq_lens.numel() != batch:
        raise ValueError(f"block_tables must be [{batch}, max_blocks] and seq_lens [{batch}], got "
                         f"{tuple(block_tables.shape)} and {tuple(seq_lens.shape)}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    device = q.device
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device) if decode else cu_seqlens_q
    if decode:
        max_q_len = 1
    elif max_q_len is None:
        max_q_len = int((cu_q[1:] - cu_q[:-1]).max().item()) if batch else 0
    total_q, hq = q.shape[0], q.shape[1]
    out = torch.empty_like(q)
    lse = torch.full((hq, total_q), float("-inf"), dtype=torch.float32, device=device) if return_lse else None
    if total_q == 0 or batch == 0:
        return (out, lse) if return_lse else out
    interp = interpreter_enabled()
    group = hq // hkv
    rows_cap = 32 if interp else 64
    block_m = min(max(triton.next_power_of_2(group * max_q_len), 16), max(rows_cap, triton.next_power_of_2(group)))
    q_tiles = triton.cdiv(max_q_len, block_m // group)
    num_splits = max(1, int(num_splits))
    part_out, part_lse, p_strides, l_strides = partial_buffers(out, num_splits)
    lse_arg = lse if lse is not None else out
    lse_strides = lse.stride() if lse is not None else (0, 0)
    bn, warps, stages = launch or DEFAULT_LAUNCH["decode" if max_q_len <= 1 else "prefill"]
    extra = {} if interp else {"num_warps": warps, "num_stages": stages}
    grid = (q_tiles, batch * hkv, num_splits)
    ctx = torch.cuda.device(device) if q.is_cuda else contextlib.nullcontext()
    with ctx:
        _paged_attn_fp8_kernel[grid](
            q, out, part_out, part_lse, lse_arg,
            k_pages.data, v_pages.data, k_pages.scale, v_pages.scale, block_tables, seq_lens, cu_q,
            *q.stride(), *out.stride(), *k_pages.data.stride(), *v_pages.data.stride(), block_tables.stride(0),
            *p_strides, *l_strides, *lse_strides,
            hkv, group, num_splits, softmax_scale * _LOG2E,
            HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m,
            BLOCK_N=_INTERPRETER_BLOCK_N if interp else bn, BLOCK_SIZE=block_size, CAUSAL=causal,
            SPLIT=num_splits > 1, STORE_LSE=return_lse, DOT_PRECISION=dot_precision_for(q.dtype), **extra,
        )
    if num_splits > 1:
        combine_splits(part_out, part_lse, out, num_splits)
        if lse is not None:  # merged LSE of the splits, natural log
            lse.copy_(torch.logsumexp(part_lse * _LN2, dim=0).transpose(0, 1))
    return (out, lse) if return_lse else out


@triton.jit
def _token_mass_fp8_kernel(
    Q, Lse, Mass, K, KScale, BlockTables, SeqLens, CuSeqlensQ,
    stride_qt, stride_qh, stride_qd,
    stride_lh, stride_lt,
    stride_mb, stride_mh, stride_mt,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_bt,
    num_kv_heads, group_size, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // num_kv_heads
    kv_head = pid_bh % num_kv_heads
    q_start = tl.load(CuSeqlensQ + b)
    q_len = tl.load(CuSeqlensQ + b + 1) - q_start
    ctx = tl.load(SeqLens + b)
    start = pid_n * BLOCK_N
    if start >= ctx:
        return
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < ctx
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    bt_ptr = BlockTables + b.to(tl.int64) * stride_bt
    qk_scale = qk_scale * tl.load(KScale + kv_head)
    diag = ctx - q_len
    toks = BLOCK_M // group_size
    offs_r = tl.arange(0, BLOCK_M)
    mass = tl.zeros([BLOCK_N], dtype=tl.float32)
    for tok0 in range(0, q_len, toks):
        row_tok = tok0 + offs_r // group_size
        row_head = kv_head * group_size + offs_r % group_size
        row_ok = (offs_r < toks * group_size) & (row_tok < q_len)
        q_rows = (q_start + row_tok).to(tl.int64)
        q = tl.load(Q + q_rows[:, None] * stride_qt + row_head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        qk, page, row = _fp8_scores(q, K, bt_ptr, cols, col_ok, kv_head, offs_d, d_ok,
                                    stride_kb, stride_kt, stride_kh, stride_kd, BLOCK_SIZE, True, DOT_PRECISION)
        qk = qk * qk_scale
        lse = tl.load(Lse + row_head * stride_lh + q_rows * stride_lt, mask=row_ok, other=float("inf"))
        visible = row_ok[:, None] & col_ok[None, :] & (lse != float("-inf"))[:, None]
        if CAUSAL:
            visible = visible & (cols[None, :] <= row_tok[:, None] + diag)
        p = tl.where(visible, tl.math.exp2(qk - (lse * 1.4426950408889634)[:, None]), 0.0)
        mass += tl.sum(p, 0)
    tl.store(Mass + b.to(tl.int64) * stride_mb + kv_head * stride_mh + cols * stride_mt, mass, mask=col_ok)


def paged_token_attention_mass_fp8(
    q: torch.Tensor,
    k_pages: Fp8Pages,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    *,
    softmax_scale: float | None = None,
    max_kv_len: int | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Attention probability each cached token received from the given queries, for e4m3
    key pages; the convention of :func:`~stream_attention.kernels.kv_quant.paged_token_attention_mass`
    (``lse [Hq, total_q]`` from the attention call; returns fp32 ``[B, Hkv, max_kv_len]``)."""
    _, block_size, hkv, head_dim = k_pages.data.shape
    decode = cu_seqlens_q is None
    batch = q.shape[0] if decode else cu_seqlens_q.numel() - 1
    hq = q.shape[1]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    device = q.device
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device) if decode else cu_seqlens_q.to(torch.int32)
    max_ctx = int(max_kv_len if max_kv_len is not None else (seq_lens.max().item() if batch else 0))
    mass = torch.zeros((batch, hkv, max_ctx), dtype=torch.float32, device=device)
    if batch == 0 or max_ctx == 0:
        return mass
    group = hq // hkv
    block_n = _INTERPRETER_BLOCK_N if interpreter_enabled() else 64
    grid = (batch * hkv, triton.cdiv(max_ctx, block_n))
    ctx = torch.cuda.device(device) if q.is_cuda else contextlib.nullcontext()
    with ctx:
        _token_mass_fp8_kernel[grid](
            q, lse, mass, k_pages.data, k_pages.scale, block_tables, seq_lens, cu_q,
            *q.stride(), *lse.stride(), *mass.stride(), *k_pages.data.stride(), block_tables.stride(0),
            hkv, group, softmax_scale * _LOG2E,
            HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            BLOCK_M=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_SIZE=block_size,
            CAUSAL=causal, DOT_PRECISION=dot_precision_for(q.dtype),
        )
    return mass


def paged_attention_fp8_ref(
    q: torch.Tensor,
    k_pages: Fp8Pages,
    v_pages: Fp8Pages,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    *,
    softmax_scale: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over the dequantized pages in ``dtype``, one sequence at a time:
    ``(out, lse [Hq, total_q])``. The engine's path where Triton cannot run."""
    block_size, hkv, d = _check_pages(q, k_pages, v_pages)
    decode = cu_seqlens_q is None
    batch = q.shape[0] if decode else cu_seqlens_q.numel() - 1
    cu = list(range(batch + 1)) if decode else cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    hq = q.shape[1]
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    lse = torch.full((hq, q.shape[0]), float("-inf"), dtype=dtype, device=q.device)
    for b in range(batch):
        n_q, n_kv = cu[b + 1] - cu[b], lens[b]
        if n_q == 0:
            continue
        ids = block_tables[b, :triton.cdiv(n_kv, block_size)]
        k = dequantize_fp8_pages(k_pages, ids, dtype).reshape(-1, hkv, d)[:n_kv]
        v = dequantize_fp8_pages(v_pages, ids, dtype).reshape(-1, hkv, d)[:n_kv]
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[cu[b]:cu[b + 1]].to(dtype), k) * scale
        rows = torch.arange(n_q, device=q.device)[:, None] + (n_kv - n_q)
        s = s.masked_fill(torch.arange(n_kv, device=q.device)[None, :] > rows, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)
        p = torch.nan_to_num(torch.exp(s - torch.where(torch.isinf(row_lse), 0.0, row_lse)[..., None]))
        out[cu[b]:cu[b + 1]] = torch.einsum("hqk,khd->qhd", p, v)
        lse[:, cu[b]:cu[b + 1]] = row_lse
    return out, lse
