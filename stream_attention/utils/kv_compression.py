"""KV-cache compression of dense ``[B, T, H, D]`` keys/values: eviction, quantization, both.

Four strategies behind one interface (``create_kv_compressor(name).compress(keys, values,
compression_ratio)``):

* ``importance`` - heavy-hitter eviction (H2O, Zhang et al. 2023; SnapKV, Li et al. 2024).
  Each KV head keeps the attention sinks (first tokens, StreamingLLM, Xiao et al. 2023), a
  recent window, and the tokens with the highest importance. Importance is the attention
  the *observation window* (the last queries, when ``queries`` are given) pays to each
  key, summed over the window and the query heads sharing the KV head, then smoothed by
  a 1-D pooling so neighbours of a heavy hitter survive with it (SnapKV). Without queries
  a key's importance is minus its L2 norm: low-norm keys draw the most attention (Devoto
  et al. 2024).
* ``chunk`` - the same scores, aggregated over contiguous chunks of tokens and across
  heads, keep or drop whole chunks (ChunkKV, Liu et al. 2025): text survives in
  semantically whole pieces, and every head keeps the same positions.
* ``quantized`` - KIVI (Liu et al. 2024): keys per channel over groups of tokens (key
  outliers sit in fixed channels), values per token; asymmetric int8/int4/int2 packed
  into bytes with fp16 scales and zero points (:mod:`.quantization`). The widest format
  that still reaches the requested ratio is used; formats are discrete, so the achieved
  ratio is at least the requested one when any format reaches it.
* ``streaming`` - StreamingLLM's sinks plus the most recent tokens (the baseline the
  scored policies must beat).
* ``hybrid`` - quantization first (int8 below int4's ratio, int4 above), then importance
  eviction for the rest of the ratio, so any ratio is met closely.

Layout: ``[batch, tokens, kv_heads, head_dim]`` (the seed's ``[B, T, H, D]``). Evicting
compressors return dense tensors ``[B, T_kept, H, D]`` (each head keeps its own
positions, in order; RoPE is already applied to cached keys, so attention over them needs
no positions); quantizing ones return :class:`QuantizedKV` objects; ``decompress`` turns
either into dense tensors. Ratios and bytes count what must be stored: packed codes plus
fp16 scales; kept-position indices are not needed for attention and are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .quantization import (
    SUPPORTED_BITS,
    dequantize_codes,
    pack_codes,
    packed_dim,
    quant_params,
    quantize_codes,
    unpack_codes,
)

__all__ = [
    "QuantizedKV",
    "CompressionResult",
    "KVCompressor",
    "ImportanceKVCompressor",
    "ChunkKVCompressor",
    "StreamingKVCompressor",
    "QuantizedKVCompressor",
    "HybridKVCompressor",
    "create_kv_compressor",
    "available_kv_compressors",
    "token_importance",
    "keep_top_k",
    "select_tokens",
    "select_chunks",
    "attention_error",
]

# fp16 (scale, zero) pair per quantization group.
_META_BYTES = 4


# --------------------------------------------------------------------------------------
# Quantized tensors
# --------------------------------------------------------------------------------------


@dataclass
class QuantizedKV:
    """A ``[B, T, H, D]`` tensor stored as packed low-bit codes with fp16 scales.

    Per token (values): one ``(scale, zero)`` per ``(b, t, h)`` over the ``D`` channels.
    Per channel (KIVI keys): one per ``(b, group of group_size tokens, h, d)``; the last
    group may be shorter.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    per_channel: bool
    group_size: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def quantize(cls, x: torch.Tensor, bits: int, *, per_channel: bool = False, group_size: int = 32) -> QuantizedKV:
        """Quantize ``x [B, T, H, D]``."""
        if x.dim() != 4:
            raise ValueError(f"expected [B, T, H, D], got {tuple(x.shape)}")
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
        packed_dim(x.shape[-1], bits)  # validates divisibility
        xf = x.float()
        if per_channel:
            b, t, h, d = x.shape
            groups = max(1, math.ceil(t / group_size))
            pad = groups * group_size - t
            # Repeating the last token leaves each group's min/max unchanged.
            xp = torch.cat([xf, xf[:, -1:].expand(b, pad, h, d)], dim=1) if pad and t else xf
            if t == 0:
                xp = xf.new_zeros(b, group_size, h, d)
            xg = xp.view(b, groups, group_size, h, d)
            scale, zero = quant_params(xg.amin(2), xg.amax(2), bits)  # [B, G, H, D]
            s_tok = scale.repeat_interleave(group_size, dim=1)[:, :t]
            z_tok = zero.repeat_interleave(group_size, dim=1)[:, :t]
            codes = quantize_codes(xf, s_tok, z_tok, bits)
        else:
            scale, zero = quant_params(xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True), bits)
            codes = quantize_codes(xf, scale, zero, bits)
        return cls(pack_codes(codes, bits), scale.half(), zero.half(), bits, per_channel, group_size,
                   tuple(x.shape), x.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ``[B, T, H, D]`` reconstruction in ``dtype`` (default: the original dtype)."""
        codes = unpack_codes(self.packed, self.bits)
        if self.per_channel:
            t = self.shape[1]
            scale = self.scale.float().repeat_interleave(self.group_size, dim=1)[:, :t]
            zero = self.zero.float().repeat_interleave(self.group_size, dim=1)[:, :t]
        else:
            scale, zero = self.scale, self.zero
        return dequantize_codes(codes, scale, zero).to(dtype or self.dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))

    @staticmethod
    def storage_bytes(shape: tuple[int, ...], bits: int, *, per_channel: bool, group_size: int = 32) -> int:
        """Bytes :meth:`quantize` would use for a tensor of ``shape`` (without building it)."""
        b, t, h, d = shape
        data = b * t * h * d * bits // 8
        groups = b * math.ceil(t / group_size) * h * d if per_channel else b * t * h
        return data + groups * _META_BYTES

    def __repr__(self) -> str:
        kind = f"per-channel/{self.group_size}" if self.per_channel else "per-token"
        return f"QuantizedKV(shape={self.shape}, int{self.bits}, {kind}, {self.nbytes} bytes)"


def _nbytes(x: Any) -> int:
    if isinstance(x, QuantizedKV):
        return x.nbytes
    return x.numel() * x.element_size()


def _dense(x: Any) -> torch.Tensor:
    return x.dequantize() if isinstance(x, QuantizedKV) else x


# --------------------------------------------------------------------------------------
# Scoring and selection
# --------------------------------------------------------------------------------------


def _check_kv(keys: torch.Tensor, values: torch.Tensor) -> None:
    if keys.dim() != 4 or keys.shape != values.shape:
        raise ValueError(f"keys and values must be equal [B, T, H, D] tensors, got {tuple(keys.shape)} and "
                         f"{tuple(values.shape)}")


def token_importance(
    keys: torch.Tensor,
    queries: torch.Tensor | None = None,
    *,
    window: int = 32,
    pool_kernel: int = 5,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Importance of every cached token for every KV head: ``[B, T, H]`` fp32, higher = keep.

    With ``queries [B, Tq, Hq, D]`` (``Hq`` a multiple of ``H``; the queries are the last
    ``Tq`` positions of the sequence), the last ``window`` of them attend causally to the
    keys and each key scores the probability mass it receives, summed over those queries
    and the query heads of its group, then average-pooled over ``pool_kernel``
    neighbouring positions (SnapKV). Without queries: ``-||k||``.
    """
    b, t, h, d = keys.shape
    if queries is None:
        return -keys.float().norm(dim=-1)
    if queries.dim() != 4 or queries.shape[0] != b or queries.shape[-1] != d or queries.shape[2] % h:
        raise ValueError(f"queries must be [B, Tq, Hq, D] with Hq a multiple of {h}, got {tuple(queries.shape)}")
    hq = queries.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    obs = queries[:, -min(window, t):].float()  # [B, W, Hq, D]
    w = obs.shape[1]
    kf = keys.float().repeat_interleave(hq // h, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", obs, kf) * scale
    pos_q = torch.arange(t - w, t, device=keys.device)[:, None]
    s = s.masked_fill(torch.arange(t, device=keys.device)[None, :] > pos_q, float("-inf"))
    p = torch.softmax(s, dim=-1).sum(dim=2)  # [B, Hq, T]
    p = p.view(b, h, hq // h, t).sum(dim=2)
    if pool_kernel > 1:
        p = F.avg_pool1d(p, kernel_size=pool_kernel, stride=1, padding=pool_kernel // 2, count_include_pad=False)
        p = p[..., :t]
    return p.transpose(1, 2).contiguous()


def _mandatory(t: int, budget: int, sink_tokens: int, recent_tokens: int, device: torch.device) -> torch.Tensor:
    """Bool ``[T]``: the sink and recent-window positions that fit in ``budget`` (window shrinks first)."""
    recent = min(recent_tokens, max(budget - sink_tokens, 0), t)
    sinks = min(sink_tokens, budget, t)
    keep = torch.zeros(t, dtype=torch.bool, device=device)
    keep[:sinks] = True
    if recent:
        keep[t - recent:] = True
    return keep


def keep_top_k(scores: torch.Tensor, budget: int, *, sink: int, recent: int) -> torch.Tensor:
    """Positions to keep along the last dim of ``scores [..., T]``: ``[..., budget]``, ascending.

    The first ``sink`` and the last ``recent`` positions are kept first (the window
    shrinks, then the sinks, when the budget cannot hold both); the rest of the budget
    goes to the highest scores, a tie to the newer position. This is the one selection
    rule of every eviction policy: the dense compressors rank tokens per head
    (:func:`select_tokens`), the engine's paged policies rank whole blocks by their
    attention mass, or by recency for StreamingLLM.
    """
    t = scores.shape[-1]
    budget = max(0, min(int(budget), t))
    mandatory = _mandatory(t, budget, sink, recent, scores.device).expand(scores.shape)
    # Stable sorts, least significant key first: position (newest first), score, mandatory.
    order = torch.arange(t - 1, -1, -1, device=scores.device).expand(scores.shape)
    order = order.gather(-1, scores.float().gather(-1, order).sort(dim=-1, descending=True, stable=True).indices)
    order = order.gather(-1, mandatory.gather(-1, order).to(torch.uint8).sort(dim=-1, descending=True,
                                                                                 stable=True).indices)
    return order[..., :budget].sort(dim=-1).values


def select_tokens(scores: torch.Tensor, budget: int, *, sink_tokens: int = 4, recent_tokens: int = 32) -> torch.Tensor:
    """Positions to keep per head, ``[B, budget, H]`` sorted ascending.

    Sinks and the recent window are always kept (the window shrinks, then the sinks, if
    the budget cannot hold both); the rest of the budget goes to the highest ``scores
    [B, T, H]`` among the other positions (:func:`keep_top_k` per head).
    """
    idx = keep_top_k(scores.transpose(1, 2), budget, sink=sink_tokens, recent=recent_tokens)
    return idx.transpose(1, 2).contiguous()


def select_chunks(
    scores: torch.Tensor, budget: int, *, chunk_size: int = 8, sink_tokens: int = 4, recent_tokens: int = 32,
) -> torch.Tensor:
    """Positions to keep, the same for every head, chosen chunk by chunk: ``[B, budget, H]``.

    A chunk's score is the mean token score over its positions and all heads. Sinks and
    the recent window are kept; whole chunks follow in score order; when the next chunk
    no longer fits, its best tokens fill the remaining budget exactly.
    """
    b, t, h = scores.shape
    budget = max(0, min(int(budget), t))
    mandatory = _mandatory(t, budget, sink_tokens, recent_tokens, scores.device)
    tok = scores.float().mean(dim=2)  # [B, T]
    n_chunks = math.ceil(t / chunk_size)
    pad = n_chunks * chunk_size - t
    padded = F.pad(tok, (0, pad), value=0.0).view(b, n_chunks, chunk_size)
    counts = torch.full((n_chunks,), chunk_size, device=scores.device)
    counts[-1] = chunk_size - pad
    chunk_score = padded.sum(-1) / counts  # [B, C]
    chunk_of = torch.arange(t, device=scores.device) // chunk_size
    # Token priority: mandatory first, then by chunk rank, then by token score inside the chunk.
    rank = torch.empty_like(chunk_score, dtype=torch.long)
    rank.scatter_(1, chunk_score.argsort(dim=1, descending=True), torch.arange(n_chunks, device=scores.device)
                  .expand(b, n_chunks).contiguous())
    tok_rank = tok.argsort(dim=1, descending=True).argsort(dim=1)  # 0 = best token
    priority = -(rank[:, chunk_of] * t + tok_rank).float()
    priority = priority.masked_fill(mandatory[None, :], float("inf"))
    idx = priority.topk(budget, dim=1).indices.sort(dim=1).values  # [B, budget]
    return idx[:, :, None].expand(b, budget, h).contiguous()


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x [B, T, H, D]`` at per-head positions ``idx [B, n, H]`` -> ``[B, n, H, D]``."""
    return x.gather(1, idx[..., None].expand(*idx.shape, x.shape[-1]))


def attention_error(
    probes: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    keys_c: torch.Tensor,
    values_c: torch.Tensor,
    kept: torch.Tensor | None = None,
    *,
    softmax_scale: float | None = None,
) -> dict[str, float]:
    """How much attention of ``probes [B, P, Hq, D]`` changes when the cache is compressed.

    Probes attend (non-causally, like decode steps after the cached tokens) to the full
    ``keys/values [B, T, H, D]`` and to the compressed ``keys_c/values_c [B, n, H, D]``.
    Returns the relative L2 error of the outputs, their mean cosine similarity, and, when
    ``kept [B, n, H]`` positions are given, the mean share of the full attention's
    probability mass that fell on kept tokens.
    """
    b, t, h, d = keys.shape
    hq = probes.shape[2]
    g = hq // h
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    q = probes.float()

    def attend(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = k.float().repeat_interleave(g, dim=2)
        v = v.float().repeat_interleave(g, dim=2)
        p = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) * scale, dim=-1)
        return torch.einsum("bhqk,bkhd->bqhd", p, v), p

    full, p_full = attend(keys, values)
    comp, _ = attend(keys_c, values_c)
    err = (comp - full).norm() / full.norm().clamp_min(1e-30)
    cos = F.cosine_similarity(comp.flatten(-2), full.flatten(-2), dim=-1).mean()
    stats = {"attention_rel_error": float(err), "attention_cosine": float(cos)}
    if kept is not None:
        idx = kept.repeat_interleave(g, dim=2).permute(0, 2, 1)[:, :, None, :]  # [B, Hq, 1, n]
        mass = p_full.gather(-1, idx.expand(b, hq, p_full.shape[2], idx.shape[-1])).sum(-1)
        stats["attention_mass_kept"] = float(mass.mean())
    return stats


# --------------------------------------------------------------------------------------
# Compressors
# --------------------------------------------------------------------------------------


@dataclass
class CompressionResult:
    """What a compressor produced: compressed keys/values, kept positions, statistics."""

    keys: torch.Tensor | QuantizedKV
    values: torch.Tensor | QuantizedKV
    indices: torch.Tensor | None  # [B, n, H] kept positions, None when nothing was evicted
    stats: dict[str, Any] = field(default_factory=dict)


class KVCompressor:
    """Base class: subclasses implement :meth:`_compress`; statistics are computed here."""

    name = "base"

    def __init__(self, *, num_probes: int = 32) -> None:
        self.num_probes = num_probes

    def compress(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        compression_ratio: float = 8.0,
        *,
        queries: torch.Tensor | None = None,
        probe_queries: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | QuantizedKV, torch.Tensor | QuantizedKV, dict[str, Any]]:
        """Compress ``keys, values [B, T, H, D]`` by about ``compression_ratio`` (in bytes).

        ``queries [B, Tq, Hq, D]`` (the last ``Tq`` positions' queries, optional) drive the
        importance scores. The stats' error measures use ``probe_queries`` when given,
        else ``queries``, else the last keys as stand-in queries (flagged in
        ``stats["probe_source"]``). Returns ``(compressed_keys, compressed_values, stats)``.
        """
        res = self.compress_detailed(keys, values, compression_ratio, queries=queries, probe_queries=probe_queries)
        return res.keys, res.values, res.stats

    def compress_detailed(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        compression_ratio: float = 8.0,
        *,
        queries: torch.Tensor | None = None,
        probe_queries: torch.Tensor | None = None,
        with_stats: bool = True,
    ) -> CompressionResult:
        """Like :meth:`compress`, also returning the kept positions."""
        _check_kv(keys, values)
        if not compression_ratio >= 1.0:
            raise ValueError(f"compression_ratio must be >= 1, got {compression_ratio}")
        with torch.no_grad():
            res = self._compress(keys, values, float(compression_ratio), queries)
            if with_stats:
                res.stats = self._stats(keys, values, res, float(compression_ratio), queries, probe_queries)
        return res

    @staticmethod
    def decompress(keys: torch.Tensor | QuantizedKV, values: torch.Tensor | QuantizedKV) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
        """Dense tensors ready for attention from whatever :meth:`compress` returned."""
        return _dense(keys), _dense(values)

    def _compress(self, keys, values, ratio: float, queries) -> CompressionResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def _stats(self, keys, values, res: CompressionResult, ratio: float, queries, probe_queries) -> dict[str, Any]:
        before = _nbytes(keys) + _nbytes(values)
        after = _nbytes(res.keys) + _nbytes(res.values)
        kd, vd = self.decompress(res.keys, res.values)
        kept = res.indices
        ko, vo = (keys, values) if kept is None else (_gather(keys, kept), _gather(values, kept))
        stats: dict[str, Any] = {
            "method": self.name,
            "requested_ratio": ratio,
            "compression_ratio": before / max(after, 1),
            # Quantization formats are discrete: a ratio beyond int2's cannot be met by it alone.
            "ratio_met": before / max(after, 1) >= ratio * (1 - 1e-9),
            "bytes_before": before,
            "bytes_after": after,
            "bytes_saved": before - after,
            "tokens_before": keys.shape[1],
            "tokens_kept": kd.shape[1],
            # Reconstruction of what was kept (evicted tokens are gone, not reconstructed).
            "key_rel_error": float((kd.float() - ko.float()).norm() / ko.float().norm().clamp_min(1e-30)),
            "value_rel_error": float((vd.float() - vo.float()).norm() / vo.float().norm().clamp_min(1e-30)),
            "key_max_abs_error": float((kd.float() - ko.float()).abs().max()) if kd.numel() else 0.0,
        }
        if isinstance(res.keys, QuantizedKV):
            stats["bits"] = res.keys.bits
        if probe_queries is not None:
            probes, source = probe_queries, "probe_queries"
        elif queries is not None:
            probes, source = queries[:, -self.num_probes:], "queries"
        else:
            # Keys stand in for queries: in trained models q and k of a head share a subspace.
            probes, source = keys[:, -self.num_probes:], "keys"
        stats["probe_source"] = source
        if keys.shape[1] and kd.shape[1]:
            stats.update(attention_error(probes, keys, values, kd, vd, kept))
        return stats


class _EvictionMixin:
    """Budget arithmetic shared by the evicting compressors."""

    sink_tokens: int
    recent_tokens: int

    @staticmethod
    def _budget(t: int, ratio: float) -> int:
        # floor keeps the achieved ratio >= the requested one; one token is the minimum.
        return max(1, min(t, math.floor(t / ratio + 1e-9)))


class ImportanceKVCompressor(KVCompressor, _EvictionMixin):
    """Heavy-hitter eviction (H2O / SnapKV) keeping sinks and a recent window."""

    name = "importance"

    def __init__(self, *, sink_tokens: int = 4, recent_tokens: int = 32, observation_window: int = 32,
                 pool_kernel: int = 5, num_probes: int = 32) -> None:
        super().__init__(num_probes=num_probes)
        self.sink_tokens = sink_tokens
        self.recent_tokens = recent_tokens
        self.observation_window = observation_window
        self.pool_kernel = pool_kernel

    def scores(self, keys: torch.Tensor, queries: torch.Tensor | None) -> torch.Tensor:
        return token_importance(keys, queries, window=self.observation_window, pool_kernel=self.pool_kernel)

    def select(self, keys: torch.Tensor, budget: int, queries: torch.Tensor | None) -> torch.Tensor:
        return select_tokens(self.scores(keys, queries), budget, sink_tokens=self.sink_tokens,
                             recent_tokens=self.recent_tokens)

    def _compress(self, keys, values, ratio, queries) -> CompressionResult:
        idx = self.select(keys, self._budget(keys.shape[1], ratio), queries)
        return CompressionResult(_gather(keys, idx), _gather(values, idx), idx)


class ChunkKVCompressor(ImportanceKVCompressor):
    """Chunk-level eviction (ChunkKV): whole contiguous chunks, shared by all heads."""

    name = "chunk"

    def __init__(self, *, chunk_size: int = 8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chunk_size = chunk_size

    def select(self, keys: torch.Tensor, budget: int, queries: torch.Tensor | None) -> torch.Tensor:
        return select_chunks(self.scores(keys, queries), budget, chunk_size=self.chunk_size,
                             sink_tokens=self.sink_tokens, recent_tokens=self.recent_tokens)


class StreamingKVCompressor(ImportanceKVCompressor):
    """StreamingLLM (Xiao et al. 2023): the attention sinks plus the most recent tokens."""

    name = "streaming"

    def scores(self, keys: torch.Tensor, queries: torch.Tensor | None) -> torch.Tensor:
        b, t, h, _ = keys.shape
        return torch.arange(t, device=keys.device, dtype=torch.float32)[None, :, None].expand(b, t, h)


class QuantizedKVCompressor(KVCompressor):
    """KIVI quantization: keys per channel over token groups, values per token."""

    name = "quantized"

    def __init__(self, *, bits: int | None = None, key_per_channel: bool = True, group_size: int = 32,
                 num_probes: int = 32) -> None:
        super().__init__(num_probes=num_probes)
        if bits is not None and bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS} or None, got {bits}")
        self.bits = bits
        self.key_per_channel = key_per_channel
        self.group_size = group_size

    def storage_bytes(self, shape: tuple[int, ...], bits: int) -> int:
        return (QuantizedKV.storage_bytes(shape, bits, per_channel=self.key_per_channel, group_size=self.group_size)
                + QuantizedKV.storage_bytes(shape, bits, per_channel=False))

    def ratio_of(self, keys: torch.Tensor, bits: int) -> float:
        """Compression ratio ``bits`` gives on tensors shaped and typed like ``keys``."""
        return 2 * _nbytes(keys) / max(self.storage_bytes(tuple(keys.shape), bits), 1)

    def choose_bits(self, keys: torch.Tensor, ratio: float) -> int:
        """The widest format reaching ``ratio`` (the narrowest when none does)."""
        if self.bits is not None:
            return self.bits
        for bits in sorted(SUPPORTED_BITS, reverse=True):
            if self.ratio_of(keys, bits) >= ratio:
                return bits
        return min(SUPPORTED_BITS)

    def quantize(self, keys: torch.Tensor, values: torch.Tensor, bits: int) -> tuple[QuantizedKV, QuantizedKV]:
        return (QuantizedKV.quantize(keys, bits, per_channel=self.key_per_channel, group_size=self.group_size),
                QuantizedKV.quantize(values, bits, per_channel=False))

    def _compress(self, keys, values, ratio, queries) -> CompressionResult:
        qk, qv = self.quantize(keys, values, self.choose_bits(keys, ratio))
        return CompressionResult(qk, qv, None)


class HybridKVCompressor(QuantizedKVCompressor, _EvictionMixin):
    """Quantization, then heavy-hitter eviction for the rest of the ratio."""

    name = "hybrid"

    def __init__(self, *, bits: int | None = None, key_per_channel: bool = True, group_size: int = 32,
                 sink_tokens: int = 4, recent_tokens: int = 32, observation_window: int = 32, pool_kernel: int = 5,
                 num_probes: int = 32) -> None:
        super().__init__(bits=bits, key_per_channel=key_per_channel, group_size=group_size, num_probes=num_probes)
        self.sink_tokens = sink_tokens
        self.recent_tokens = recent_tokens
        self.evictor = ImportanceKVCompressor(sink_tokens=sink_tokens, recent_tokens=recent_tokens,
                                              observation_window=observation_window, pool_kernel=pool_kernel)

    def choose_bits(self, keys: torch.Tensor, ratio: float) -> int:
        """int4 once the ratio reaches what int4 alone gives, else int8 (near lossless)."""
        if self.bits is not None:
            return self.bits
        return 4 if ratio >= self.ratio_of(keys, 4) else 8

    def _compress(self, keys, values, ratio, queries) -> CompressionResult:
        b, t, h, d = keys.shape
        bits = self.choose_bits(keys, ratio)
        target = 2 * _nbytes(keys) / ratio
        n = max(1, min(t, math.floor(t * self.ratio_of(keys, bits) / ratio + 1e-9)))
        # Per-channel key groups make storage slightly non-linear in n; step down to fit.
        while n > 1 and self.storage_bytes((b, n, h, d), bits) > target:
            n -= 1
        idx = self.evictor.select(keys, n, queries) if n < t else None
        kk, vv = (keys, values) if idx is None else (_gather(keys, idx), _gather(values, idx))
        qk, qv = self.quantize(kk, vv, bits)
        return CompressionResult(qk, qv, idx)


_REGISTRY: dict[str, type[KVCompressor]] = {
    "importance": ImportanceKVCompressor,
    "streaming": StreamingKVCompressor,
    "chunk": ChunkKVCompressor,
    "quantized": QuantizedKVCompressor,
    "hybrid": HybridKVCompressor,
}


def available_kv_compressors() -> list[str]:
    return sorted(_REGISTRY)


def create_kv_compressor(name: str, **kwargs: Any) -> KVCompressor:
    """A compressor by name: ``'importance'``, ``'chunk'``, ``'quantized'``, ``'hybrid'`` or ``'streaming'``.

    Keyword arguments go to the compressor (e.g. ``sink_tokens``, ``recent_tokens``,
    ``bits``, ``chunk_size``).
    """
    try:
        cls = _REGISTRY[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown KV compressor {name!r}; available: {', '.join(available_kv_compressors())}") from None
    return cls(**kwargs)
