"""Runs a transformers causal LM over packed steps with a paged KV cache.

A step's tokens (prefill chunks and decode tokens of many sequences) are flattened into
one ``[1, total_tokens]`` batch with explicit ``position_ids``; attention layers resolve
to :mod:`.attention`'s hook, which reads the step's block tables from an
:class:`~.attention.AttentionContext`. Only the hidden states of positions that sample
are projected to the vocabulary (``logits_to_keep`` with indices).

On CUDA, decode-only steps replay CUDA graphs captured per padded batch size: HF's
Python per layer costs more than the GPU work of a small model's decode step. Graph
inputs are two device buffers refreshed by one host-to-device copy each.

Models that mix full-attention and sliding-window layers (Gemma 2/3) get the hybrid
layout (:class:`~.attention_spec.KVGroups`): the pool has one page tensor per
full-attention layer, each shared by a full-attention layer and the windowed layers dealt
onto it; a windowed layer finds its pages through the sequence's ``window_table`` (the
step's context carries one per layer group, ``AttentionContext.groups``). Memory budget
rule: the pool is sized as usual, in pages of ``num_slots`` layers, and both groups draw
from it; a full-attention block costs one page, a windowed block ``window_pages``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.backend import resolve_backend
from ..core.kernel_switches import KernelSwitches
from ..kernels.paged_attention import choose_num_splits
from . import attention as attn_hook
from . import fused_llama
from .attention_spec import KVGroups, kv_groups, layer_attention, unsupported_attention
from .config import EngineConfig, parse_dtype
from .kv_compression import BlockScoreCollector, KVCompressionManager, QuantizedPages
from .scheduler import ScheduledSeq

log = logging.getLogger("stream_attention.engine")


@dataclass
class ModelGeometry:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int | None

    @classmethod
    def of(cls, model: Any) -> ModelGeometry:
        cfg = model.config
        get_text = getattr(cfg, "get_text_config", None)
        if callable(get_text):
            cfg = get_text()
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab_size=cfg.vocab_size,
            max_position_embeddings=getattr(cfg, "max_position_embeddings", None),
        )


def _check_supported(model: Any) -> None:
    """Refuse models whose attention needs what the paged kernels do not do, by name."""
    reason = unsupported_attention(model)
    if reason is not None:
        raise ValueError(f"{type(model).__name__}: {reason} is not supported by the engine's attention kernels")


VERIFY_GRAPH_MAX_BATCH = 64


def _scores_prompt(scheduled: list) -> bool:
    """Whether a step scores prompt positions (``prompt_logprobs``): extra logits rows."""
    return any(s.seq.scores_prompt and s.seq.prompt_logprob_rows(s.seq.num_computed_tokens, s.num_new_tokens)
               for s in scheduled)


class _DecodeGraph:
    """One captured decode step for a fixed (padded) batch size."""

    def __init__(self, graph: torch.cuda.CUDAGraph, batch: int, logits: torch.Tensor) -> None:
        self.graph = graph
        self.batch = batch
        self.logits = logits


class ModelRunner:
    """Owns the model, the KV page pools and the step's forward pass."""

    def __init__(self, model: Any, config: EngineConfig, device: torch.device, *,
                 extra_block_bytes: int = 0) -> None:
        """``extra_block_bytes``: bytes another pool indexed by the same block ids needs per
        block (a draft model's cache), taken out of the memory budget when sizing this one."""
        _check_supported(model)
        self.extra_block_bytes = extra_block_bytes
        self.model = model
        # Read once: every step (and every captured graph) launches the same kernels.
        self.kernel_switches = KernelSwitches.from_env()
        self.config = config
        self.device = device
        self.geometry = g = ModelGeometry.of(model)
        self.dtype = next(model.parameters()).dtype
        # Float pages' dtype; with quantized pages, the dtype K/V are computed in (and the
        # dense format the compression ratio is measured against).
        self.kv_dtype = (None if config.kv_cache_quantized else parse_dtype(config.kv_cache_dtype)) or self.dtype
        self.layer_attention = layer_attention(model.config)
        kv_config = config.kv_compression_config()
        self.kv_groups = self._hybrid_layout(config, kv_config.page_format)
        self.kv_mgr = KVCompressionManager(
            kv_config, num_layers=g.num_layers if self.kv_groups is None else self.kv_groups.num_slots,
            num_kv_heads=g.num_kv_heads, head_dim=g.head_dim, block_size=config.block_size, float_dtype=self.kv_dtype,
        )
        variants = {("sliding window", s.sliding_window is not None) for s in self.layer_attention}
        variants |= {("logit soft-capping", s.softcap is not None) for s in self.layer_attention}
        named = sorted(name for name, used in variants if used)
        if named and self.kv_mgr.config.policy != "none":
            # Eviction compacts the pages (kernel slots stop being positions) and scores
            # without windows or caps.
            raise ValueError(f"kv_compression={self.kv_mgr.config.policy!r} cannot be combined with this model's "
                             f"{' and '.join(named)}; use kv_compression='none'")
        self.block_size = config.block_size
        limit = g.max_position_embeddings or 2048
        self.max_model_len = min(config.max_model_len or limit, limit)
        backend = config.attention_backend
        self.backend = "triton" if resolve_backend(backend, device) == "triton" else "torch"

        model.set_attn_implementation(attn_hook.register())
        model.eval()
        self.fused = fused_llama.build(model, use_triton=self.backend == "triton", enabled=config.fused_layers)

        self.num_blocks = self._size_cache()
        # One extra page per layer is a scratch target for the padding rows of a graph. The
        # pool is one allocation in the cache's format (compressed pages never exist in 16 bits).
        self.kv_pools = self.kv_mgr.allocate(self.num_blocks + 1, device)
        self.kv_caches = self._per_layer(self.kv_pools)
        self.scratch_slot = self.num_blocks * self.block_size
        log.info(
            "KV cache: %d blocks x %d tokens (%.2f GiB, %s, compression %s), attention backend %s",
            self.num_blocks, self.block_size, self.kv_cache_bytes / 2**30, self.kv_cache_format,
            self.kv_mgr.config.policy, self.backend,
        )
        if self.kv_groups is not None:
            gr = self.kv_groups
            log.info("hybrid KV cache: pages of %d layers; windowed layers (reach %d) take %d page(s) per block "
                     "and keep only their window (%d padded slot(s))", gr.num_slots, gr.window_reach,
                     gr.window_pages, gr.padded_slots)

        if device.type == "cuda" and self.backend == "triton" and self.num_blocks >= 16:
            self._warm_up_kernels()
        self.graphs: dict[int, _DecodeGraph] = {}
        self._graph_sizes: list[int] = []
        self._staged_copied: torch.cuda.Event | None = None  # the last staging -> device copies
        # Speculative decoding: verify steps (1 + K query tokens per sequence) replay graphs
        # of their own; drafts shorter than K are padded (see VerifyStaging).
        self.verify_k = config.num_speculative_tokens if config.speculative_method != "none" else 0
        self.verify_graphs: dict[int, _DecodeGraph] = {}
        self._verify_sizes: list[int] = []
        self._verify_staging: VerifyStaging | None = None
        self._verify_copied: torch.cuda.Event | None = None
        if config.use_cuda_graphs and device.type == "cuda" and self.backend == "triton":
            try:
                self._capture_graphs()
                if self.kv_groups is not None and self.num_blocks >= 4 and not self.kv_mgr.quantized:
                    self._check_decode_graphs()
            except Exception as exc:  # pragma: no cover - depends on the model's code
                log.warning("CUDA graph capture failed (%s); decode runs eagerly", exc)
                self.graphs.clear()
                self._graph_sizes = []
            if self.graphs and self.verify_k and self.kv_groups is not None:
                log.info("verify steps run eagerly with the hybrid KV cache (no verify graphs for two block tables)")
            elif self.graphs and self.verify_k and not self.kv_mgr.quantized and self.num_blocks >= 4:
                try:
                    self._capture_verify_graphs()
                except Exception as exc:  # pragma: no cover - depends on the model's code
                    log.warning("verify-step graph capture failed (%s); verify steps run eagerly", exc)
                    self.verify_graphs.clear()
                    self._verify_sizes = []
        # Warm-up and capture wrote dummy tokens: fp8 scales calibrate on the first real prompt.
        self.kv_mgr.reset_calibration(self.kv_caches)

    # ----------------------------------------------------------------- sizing
    def _hybrid_layout(self, config: EngineConfig, page_format: str | None) -> KVGroups | None:
        """The layer groups of the hybrid KV cache, or None (one block table for every layer)."""
        groups = kv_groups(self.layer_attention) if config.hybrid_kv_cache else None
        if groups is not None and page_format == "fp8":
            # fp8 pages calibrate one scale per page tensor: layers sharing one would share it.
            log.info("hybrid KV cache off with fp8 pages (one scale per page tensor); every layer keeps every block")
            return None
        return groups

    def _fake(self, n: int, table: list[int], computed: int = 0, draft: list[int] | None = None) -> _FakeScheduled:
        """A dummy scheduled row for profiling and warm-up steps, in this runner's layout."""
        return _FakeScheduled(n, table, computed, draft, 1 if self.kv_groups is None else self.kv_groups.window_pages)

    def _per_layer(self, pools: list) -> list:
        """Each layer's ``(k_pages, v_pages)`` out of the pool's page tensors."""
        return pools if self.kv_groups is None else [pools[s] for s in self.kv_groups.slot_of_layer]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers, K and V (quantization scales included)."""
        return self.kv_mgr.block_bytes()

    @property
    def kv_cache_format(self) -> str:
        return self.kv_mgr.format_name

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the allocated pool (scratch block and scales included)."""
        return self.kv_mgr.pool_bytes(self.num_blocks + 1)

    def _size_cache(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        if cfg.kv_cache_memory_bytes is not None:
            budget = cfg.kv_cache_memory_bytes
        elif self.device.type != "cuda":
            budget = cfg.cpu_kv_cache_bytes
        else:
            budget = self._profile_free_memory()
        if self.extra_block_bytes:
            budget = budget * self.block_bytes // (self.block_bytes + self.extra_block_bytes)
        blocks = self.kv_mgr.blocks_for_budget(budget, self.device)
        if blocks < 1:
            raise RuntimeError(f"no memory left for the KV cache (budget {budget} bytes, block {self.block_bytes})")
        return blocks

    def _profile_free_memory(self) -> int:
        """Bytes the cache may take: the memory fraction minus what is in use and the peak
        a full-budget prefill step adds on top of it."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        tokens = min(self.config.max_num_batched_tokens, self.max_model_len * self.config.max_num_seqs)
        n_seqs = max(1, min(self.config.max_num_seqs, -(-tokens // self.max_model_len)))
        per = -(-tokens // n_seqs)
        lens = [per] * (n_seqs - 1) + [tokens - per * (n_seqs - 1)]
        blocks = sum(-(-n // self.block_size) for n in lens)
        tmp_caches = self.kv_mgr.allocate(blocks + 1, self.device)
        self.kv_caches = self._per_layer(tmp_caches)
        tmp_bytes = self.kv_mgr.pool_bytes(blocks + 1)
        tables, nxt = [], 0
        for n in lens:
            nb = -(-n // self.block_size)
            tables.append(list(range(nxt, nxt + nb)))
            nxt += nb
        fake = [self._fake(n, t) for n, t in zip(lens, tables, strict=True)]
        with torch.inference_mode():
            self._run_eager(fake)
        torch.cuda.synchronize(self.device)
        del tmp_caches
        self.kv_caches = []
        peak = torch.cuda.max_memory_allocated(self.device) - tmp_bytes
        free, total = torch.cuda.mem_get_info(self.device)
        used_now = total - free
        torch.cuda.empty_cache()
        activations = max(0, peak - before)
        budget = int(total * self.config.gpu_memory_fraction - used_now - activations)
        log.info("memory: total %.1f GiB, in use %.1f GiB, step peak +%.2f GiB -> KV budget %.2f GiB",
                 total / 2**30, used_now / 2**30, activations / 2**30, budget / 2**30)
        return budget

    # ------------------------------------------------------------ inputs
    def _prepare(self, scheduled: list[ScheduledSeq]):
        bs = self.block_size
        ids: list[int] = []
        pos_parts, slot_parts = [], []
        seq_lens, cu, logit_rows = [], [0], []
        max_q = max_kv = 0
        fresh = True
        # Padded to a multiple of 16 so the kernels' row-stride argument keeps one integer
        # specialisation (and one compiled variant) whatever the longest table is.
        width = -(-max(len(s.seq.block_table) for s in scheduled) // 16) * 16
        tables = np.zeros((len(scheduled), width), dtype=np.int32)
        for i, s in enumerate(scheduled):
            seq, n = s.seq, s.num_new_tokens
            start = seq.num_computed_tokens
            kv0 = seq.num_kv_slots
            table = seq.block_table
            tables[i, :len(table)] = table
            draft = s.draft
            if draft:  # a verify row: the last token, then the draft tokens proposed after it
                ids.append(seq.token_ids[start])
                ids.extend(draft)
            else:
                ids.extend(seq.token_ids[start:start + n])
            if n == 1:
                pos_parts.append(np.array([start], dtype=np.int64))
                slot_parts.append(np.array([table[kv0 // bs] * bs + kv0 % bs], dtype=np.int64))
            else:
                pos_parts.append(np.arange(start, start + n, dtype=np.int64))
                idx = np.arange(kv0, kv0 + n, dtype=np.int64)
                slot_parts.append(tables[i, idx // bs].astype(np.int64) * bs + idx % bs)
            seq_lens.append(kv0 + n)
            cu.append(cu[-1] + n)
            scored = seq.prompt_logprob_rows(start, n) if seq.scores_prompt else 0
            if scored:  # prompt_logprobs: these positions' logits score the next prompt tokens
                logit_rows.extend(range(cu[-2], cu[-2] + scored))
            if s.samples:
                if draft:  # every position's logits: each draft token is checked against them
                    logit_rows.extend(range(cu[-2], cu[-1]))
                else:
                    logit_rows.append(cu[-1] - 1)
            max_q = max(max_q, n)
            max_kv = max(max_kv, kv0 + n)
            fresh = fresh and kv0 == 0
        return ids, np.concatenate(pos_parts), np.concatenate(slot_parts), seq_lens, cu, tables, logit_rows, max_q, \
            max_kv, fresh

    # ------------------------------------------------------------ forward
    def _decode_splits(self, batch: int, max_kv_len: int, scoring: bool = False) -> int:
        """Split-K factor of a decode step: the float pages' kernel policy, or the
        two-programs-per-SM policy that kv_quant's kernel schedules assume when that kernel
        runs (quantized pages, or a step that collects attention scores for eviction), or
        the pointer kernel's when ``STREAM_ATTENTION_PAGED_TMA=0`` keeps decode off TMA."""
        pointer_kernel = self.config.kv_cache_quantized or scoring or not self.kernel_switches.paged_tma
        return choose_num_splits(batch, self.geometry.num_kv_heads, max_kv_len, self.device,
                                 tma=False if pointer_kernel else None)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, logits_to_keep: int | torch.Tensor):
        if self.fused is not None:
            return self.fused(input_ids, positions, logits_to_keep)
        out = self.model(
            input_ids=input_ids[None], position_ids=positions[None], use_cache=False, logits_to_keep=logits_to_keep,
        )
        return out.logits[0]

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole KV blocks ``source -> destination`` in every layer (a forked sequence's
        private copy of a shared partial block); queued on the device like a step."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], dtype=torch.long).to(self.device, non_blocking=True)
        dst = torch.tensor([p[1] for p in pairs], dtype=torch.long).to(self.device, non_blocking=True)
        for pages in self.kv_pools:  # a page holds every layer group's data for its block
            for p in pages:
                if isinstance(p, torch.Tensor):  # 16/32-bit pages
                    p[dst] = p[src]
                    continue
                p.data[dst] = p.data[src]  # fp8 pages keep one scale per head: nothing else per block
                if isinstance(p, QuantizedPages):  # int8/int4 codes carry their scales per block
                    p.scales[dst] = p.scales[src]

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq], fed: tuple[list[int], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, BlockScoreCollector | None]:
        """Run one step; returns logits ``[num_sampling_rows, vocab]`` in schedule order (per
        sequence: the rows of its scored prompt positions under ``prompt_logprobs``, then one
        row if it samples, ``1 + len(draft)`` for one that verifies a draft), and
        the block scores the step collected for KV eviction (None unless the policy scores
        this step; the scheduler takes them in ``commit``).

        ``fed``: ``(rows, tokens)``, decode rows whose input token is already on the device
        (``tokens``, one per row, in order) and may not be known on the host yet (a step
        launched ahead, see ``LLMEngine._launch_ahead``): read instead of the sequences'
        last tokens."""
        n = len(scheduled)
        if fed is not None:
            rows, tokens = fed
            if tokens.shape != (len(rows),) or any(not 0 <= r < n or scheduled[r].num_new_tokens != 1 for r in rows):
                raise ValueError(f"fed tokens of shape {tuple(tokens.shape)} for rows {rows[:8]} of a {n}-row step: "
                                 "one device-side token per decode row")
        # A scoring step (heavy-hitter) runs eagerly: the graphs do not collect scores.
        collector = self.kv_mgr.start_step(scheduled)
        if collector is None and self.graphs and n <= self._graph_sizes[-1] and all(
                s.num_new_tokens == 1 for s in scheduled) and not _scores_prompt(scheduled) and (
                self.kv_groups is None or self._window_fits(scheduled)):
            return self._run_graph(scheduled, fed), None
        if collector is None and self.verify_graphs and self._verify_fits(scheduled):
            try:
                return self._run_verify_graph(scheduled), None
            except Exception:  # the step is recomputed eagerly below: speculation never kills the engine
                log.exception("a verify-step graph failed; verify steps run eagerly from now on")
                self.verify_graphs.clear()
                self._verify_sizes = []
        return self._run_eager(scheduled, collector, fed), collector

    def _run_eager(self, scheduled, collector: BlockScoreCollector | None = None,
                   fed: tuple[list[int], torch.Tensor] | None = None) -> torch.Tensor:
        dev = self.device
        ids, pos, slots, seq_lens, cu, tables, rows, max_q, max_kv, fresh = self._prepare(scheduled)
        ctx = attn_hook.AttentionContext(
            kv_caches=self.kv_caches,
            slot_mapping=torch.from_numpy(slots).to(dev, non_blocking=True),
            block_tables=torch.from_numpy(tables).to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32).to(dev, non_blocking=True),
            max_q_len=max_q,
            max_kv_len=max_kv,
            backend=self.backend,
            num_splits=self._decode_splits(len(scheduled), max_kv, collector is not None) if max_q == 1 else 1,
            fresh_prefill=fresh,
            seq_lens_cpu=seq_lens,
            cu_seqlens_q_cpu=cu,
            kv_scores=collector,
            layers=self.layer_attention,
            kernels=self.kernel_switches,
        )
        if self.kv_groups is not None:
            ctx.groups = self._group_contexts(scheduled, ctx, cu)
        input_ids = torch.tensor(ids, dtype=torch.long).to(dev, non_blocking=True)
        if fed is not None:  # each fed row is one token, at the row's offset in the packed ids
            fed_rows, fed_tokens = fed
            input_ids.index_copy_(0, torch.tensor([cu[r] for r in fed_rows], dtype=torch.long).to(dev), fed_tokens)
        positions = torch.from_numpy(pos).to(dev, non_blocking=True)
        keep = torch.tensor(rows, dtype=torch.long).to(dev, non_blocking=True)
        with attn_hook.attention_context(ctx):
            return self._forward(input_ids, positions, keep)

    def _group_contexts(self, scheduled, ctx: attn_hook.AttentionContext,
                        cu: list[int]) -> list[attn_hook.AttentionContext]:
        """Per layer, the context it attends through (hybrid KV cache): ``ctx`` for the
        full-attention layers; for the windowed layers of round ``r``, one whose tables,
        slots and lengths come from the sequences' ``window_table`` (its ``r``-th page of
        every logical block)."""
        groups, bs = self.kv_groups, self.block_size
        k = groups.window_pages
        rows = len(scheduled)
        width = -(-max(1, max(len(s.seq.window_table) // k for s in scheduled)) // 16) * 16
        tables = np.zeros((k, rows, width), dtype=np.int32)
        slots = np.empty((k, cu[-1]), dtype=np.int64)
        lens = []
        for i, s in enumerate(scheduled):
            seq, n = s.seq, s.num_new_tokens
            table = seq.window_table
            nb = len(table) // k
            if nb:
                tables[:, i, :nb] = np.asarray(table, dtype=np.int32).reshape(nb, k).T
            kv0 = seq.num_computed_tokens - seq.window_dropped_tokens
            idx = np.arange(kv0, kv0 + n, dtype=np.int64)
            slots[:, cu[i]:cu[i + 1]] = tables[:, i, idx // bs].astype(np.int64) * bs + idx % bs
            lens.append(kv0 + n)
        dev = self.device
        slots_d = torch.from_numpy(slots).to(dev, non_blocking=True)
        tables_d = torch.from_numpy(tables).to(dev, non_blocking=True)
        lens_d = torch.tensor(lens, dtype=torch.int32).to(dev, non_blocking=True)
        max_kv = max(lens)
        splits = self._decode_splits(rows, max_kv) if ctx.max_q_len == 1 else 1
        window = [dataclasses.replace(ctx, slot_mapping=slots_d[r], block_tables=tables_d[r], seq_lens=lens_d,
                                      max_kv_len=max_kv, seq_lens_cpu=lens, num_splits=splits) for r in range(k)]
        return [ctx if g < 0 else window[g] for g in groups.group_of_layer]

    def _warm_up_kernels(self) -> None:
        """Compile the attention kernel variants a server meets (fresh prefill, chunked
        prefill beside decode rows, eager decode) before the first request: Triton
        compiles on first use, about a second each, which would land in a request's TTFT."""
        t0 = time.perf_counter()
        bs = self.block_size
        with torch.inference_mode():
            self._run_eager([self._fake(n, list(range(-(-n // bs)))) for n in (bs + 3, 5)])  # fresh
            for q_len in (2, 3, 5, 9, 17, 33):  # chunk beside a decode row: every BLOCK_Q class
                chunk = self._fake(q_len, list(range(4)), computed=bs)
                decode = self._fake(1, [4, 5], computed=bs)
                self._run_eager([chunk, decode])
            self._run_eager([self._fake(1, [6, 7], computed=bs), self._fake(1, [8], computed=3)])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("attention kernels warmed up in %.1f s", time.perf_counter() - t0)

    # ------------------------------------------------------------ CUDA graphs
    def _graph_batch_sizes(self) -> list[int]:
        top = min(self.config.max_num_seqs, self.config.cuda_graph_max_batch)
        sizes = {b for b in (1, 2, 4, 8) if b <= top}
        sizes.update(range(16, top + 1, 16))
        sizes.add(top)
        return sorted(sizes)

    def _capture_graphs(self) -> None:
        t0 = time.perf_counter()
        sizes = self._graph_batch_sizes()
        dev = self.device
        self._alloc_decode_inputs(sizes)
        pool = None
        for b in reversed(sizes):
            ids, pos, ctx = self._decode_inputs(b)
            ctx.slot_mapping.fill_(self.scratch_slot)
            ctx.seq_lens.zero_()
            ctx.block_tables.zero_()
            if self.kv_groups is not None:
                self._wmeta64.fill_(self.scratch_slot)
                self._wmeta32.zero_()
            with torch.inference_mode(), attn_hook.attention_context(ctx):
                self._forward(ids, pos, 0)  # warm-up: compiles kernels outside the capture
                torch.cuda.synchronize(dev)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(ids, pos, 0)
            pool = graph.pool()
            self.graphs[b] = _DecodeGraph(graph, b, logits)
        self._graph_sizes = sizes
        torch.cuda.synchronize(dev)
        log.info("captured %d decode CUDA graphs (batch %s) in %.1f s", len(sizes), sizes, time.perf_counter() - t0)

    def _graph_views(self, b: int):
        m64, m32, mb = self._meta64, self._meta32, self._max_blocks
        return (m64[:b], m64[b:2 * b], m64[2 * b:3 * b], m32[:b], m32[b:b + b * mb].view(b, mb))

    def _alloc_decode_inputs(self, sizes: list[int]) -> None:
        """Device buffers the decode graphs read and their host staging (pinned on CUDA);
        with the hybrid KV cache also the windowed group's slots, lengths and tables, whose
        width covers a decoding sequence's window (``_window_blocks`` logical blocks)."""
        top, bs, dev = sizes[-1], self.block_size, self.device

        def host(n: int, dtype: torch.dtype) -> torch.Tensor:
            t = torch.zeros(n, dtype=dtype)
            return t.pin_memory() if dev.type == "cuda" else t

        self._max_blocks = mb = -(-self.max_model_len // bs)
        self._meta64 = torch.zeros(3 * top, dtype=torch.long, device=dev)
        self._meta32 = torch.zeros(top + 1 + top * mb, dtype=torch.int32, device=dev)
        self._stage64 = host(3 * top, torch.long)
        self._stage32 = host(top + 1 + top * mb, torch.int32)
        self._cu_decode = torch.arange(top + 1, dtype=torch.int32, device=dev)
        self._graph_sizes = sizes
        if self.kv_groups is None:
            self._staging = DecodeStaging(self._stage64.numpy(), self._stage32.numpy(), bs, mb, self.scratch_slot)
            return
        k = self.kv_groups.window_pages
        # After a step the windowed table starts at the block of position p - reach and
        # ends at the block of the next token: at most ceil((reach + 1) / bs) + 1 blocks.
        # (Padded to a multiple of 16, like the eager tables: one stride specialisation.)
        self._window_blocks = wb = -(-min(mb, -(-(self.kv_groups.window_reach + 1) // bs) + 2) // 16) * 16
        self._wmeta64 = torch.zeros(k * top, dtype=torch.long, device=dev)
        self._wmeta32 = torch.zeros(top + k * top * wb, dtype=torch.int32, device=dev)
        self._wstage64 = host(k * top, torch.long)
        self._wstage32 = host(top + k * top * wb, torch.int32)
        self._staging = HybridDecodeStaging(self._stage64.numpy(), self._stage32.numpy(), bs, mb, self.scratch_slot,
                                            self._wstage64.numpy(), self._wstage32.numpy(), k, wb)

    def _decode_inputs(self, b: int) -> tuple[torch.Tensor, torch.Tensor, attn_hook.AttentionContext]:
        """The ``b``-row decode step's ids, positions and attention context: views of the
        fixed buffers, so a graph captured over them replays whatever is staged."""
        ids, pos, slots, seq_lens, tables = self._graph_views(b)
        ctx = attn_hook.AttentionContext(
            kv_caches=self.kv_caches, slot_mapping=slots, block_tables=tables, seq_lens=seq_lens,
            cu_seqlens_q=self._cu_decode[:b + 1], max_q_len=1, max_kv_len=self.max_model_len,
            backend=self.backend,
            num_splits=self._decode_splits(b, self.max_model_len),
            layers=self.layer_attention, kernels=self.kernel_switches,
        )
        if self.kv_groups is not None:
            k, wb = self.kv_groups.window_pages, self._window_blocks
            w_slots = self._wmeta64[:k * b].view(k, b)
            w_lens = self._wmeta32[:b]
            w_tables = self._wmeta32[b:b + k * b * wb].view(k, b, wb)
            span = min(self.max_model_len, wb * self.block_size)
            window = [dataclasses.replace(ctx, slot_mapping=w_slots[r], block_tables=w_tables[r], seq_lens=w_lens,
                                          max_kv_len=span, num_splits=self._decode_splits(b, span))
                      for r in range(k)]
            ctx.groups = [ctx if g < 0 else window[g] for g in self.kv_groups.group_of_layer]
        return ids, pos, ctx

    def _stage_decode(self, scheduled: list[ScheduledSeq], b: int) -> None:
        """Write ``scheduled`` into the decode buffers (host staging, then queued copies)."""
        mb = self._max_blocks
        self._staging.fill(scheduled, b)
        self._meta64[:3 * b].copy_(self._stage64[:3 * b], non_blocking=True)
        self._meta32[:b + b * mb].copy_(self._stage32[:b + b * mb], non_blocking=True)
        if self.kv_groups is not None:
            k, wb = self.kv_groups.window_pages, self._window_blocks
            self._wmeta64[:k * b].copy_(self._wstage64[:k * b], non_blocking=True)
            self._wmeta32[:b + k * b * wb].copy_(self._wstage32[:b + k * b * wb], non_blocking=True)

    def _window_fits(self, scheduled: list[ScheduledSeq]) -> bool:
        """Whether every row's windowed table fits the decode graphs' width (a forked
        choice holds its parent's last prefill chunk until its first step slides it)."""
        limit = self._window_blocks * self.kv_groups.window_pages
        return all(len(s.seq.window_table) <= limit for s in scheduled)

    @torch.inference_mode()
    def run_decode_static(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """A decode step over the graphs' fixed, padded inputs, run eagerly: what a decode
        graph computes, on any device (tests compare it with the eager step on CPU)."""
        if not self._graph_sizes:
            self._alloc_decode_inputs(self._graph_batch_sizes())
        n = len(scheduled)
        b = next(s for s in self._graph_sizes if s >= n)
        self._stage_decode(scheduled, b)
        ids, pos, ctx = self._decode_inputs(b)
        with attn_hook.attention_context(ctx):
            logits = self._forward(ids, pos, 0)
        return logits[[i for i, s in enumerate(scheduled) if s.samples]]

    def _run_graph(self, scheduled: list[ScheduledSeq], fed: tuple[list[int], torch.Tensor] | None = None
                   ) -> torch.Tensor:
        n = len(scheduled)
        b = next(s for s in self._graph_sizes if s >= n)
        graph = self.graphs[b]
        # The pinned staging buffers are copied to the device asynchronously. Usually the
        # engine has read the previous step's sampled tokens back (a sync) before this
        # runs, but a step in which no row samples (only 1-token prefill chunks, common
        # under preemption) returns at once, and rewriting the staging then would hand
        # the previous replay this step's ids/slots/tables: out-of-range token ids (slot
        # numbers) and writes into other sequences' pages.
        if self._staged_copied is not None:
            self._staged_copied.synchronize()
        self._stage_decode(scheduled, b)
        if fed is not None:
            rows, tokens = fed
            if len(rows) == n:  # every row fed, in order (rows are increasing)
                self._meta64[:n].copy_(tokens)
            else:
                self._meta64.index_copy_(0, torch.tensor(rows, dtype=torch.long).to(self.device), tokens)
        if self._staged_copied is None:
            self._staged_copied = torch.cuda.Event()
        self._staged_copied.record()
        graph.graph.replay()
        if all(s.samples for s in scheduled):
            return graph.logits[:n]
        keep = [i for i, s in enumerate(scheduled) if s.samples]
        return graph.logits[torch.tensor(keep, device=self.device)]


    # ------------------------------------------------------------ verify-step graphs
    def _verify_fits(self, scheduled: list[ScheduledSeq]) -> bool:
        """Whether a step is decode and verify rows only (no prefill chunk), within the
        largest verify graph, with every row's ``1 + K`` positions inside the block table."""
        k, span = self.verify_k, self._max_blocks * self.block_size
        return len(scheduled) <= self._verify_sizes[-1] and all(
            s.num_new_tokens == 1 + len(s.draft or ()) and s.samples and s.seq.num_kv_slots + 1 + k <= span
            for s in scheduled)

    def _verify_views(self, b: int):
        q, m64, m32, mb = 1 + self.verify_k, self._vmeta64, self._vmeta32, self._max_blocks
        t = b * q
        return m64[:t], m64[t:2 * t], m64[2 * t:3 * t], m32[:b], m32[b:b + b * mb].view(b, mb)

    def _alloc_verify_inputs(self, sizes: list[int]) -> None:
        """Device buffers a verify graph reads, and their (pinned on CUDA) host staging."""
        q, top, dev = 1 + self.verify_k, sizes[-1], self.device
        self._max_blocks = mb = -(-self.max_model_len // self.block_size)
        # int64: [ids | positions | slots | logits rows to keep], one copy per step.
        self._vmeta64 = torch.zeros(4 * top * q, dtype=torch.long, device=dev)
        self._vmeta32 = torch.zeros(top + top * mb, dtype=torch.int32, device=dev)
        self._vstage64 = torch.zeros(4 * top * q, dtype=torch.long)
        self._vstage32 = torch.zeros(top + top * mb, dtype=torch.int32)
        if dev.type == "cuda":
            self._vstage64, self._vstage32 = self._vstage64.pin_memory(), self._vstage32.pin_memory()
        self._verify_staging = VerifyStaging(self._vstage64.numpy(), self._vstage32.numpy(), self.block_size,
                                             mb, self.scratch_slot, self.verify_k)
        self._verify_cu = torch.arange(top + 1, dtype=torch.int32, device=dev) * q
        self._verify_sizes = sizes

    def _verify_inputs(self, b: int) -> tuple[torch.Tensor, torch.Tensor, attn_hook.AttentionContext]:
        """The ``b``-row verify step's ids, positions and attention context: views of the
        fixed buffers, so a graph captured over them replays whatever is staged."""
        q = 1 + self.verify_k
        ids, pos, slots, seq_lens, tables = self._verify_views(b)
        ctx = attn_hook.AttentionContext(
            kv_caches=self.kv_caches, slot_mapping=slots, block_tables=tables, seq_lens=seq_lens,
            cu_seqlens_q=self._verify_cu[:b + 1], max_q_len=q, max_kv_len=self.max_model_len,
            backend=self.backend, num_splits=self._verify_splits(b), layers=self.layer_attention,
            kernels=self.kernel_switches,
        )
        return ids, pos, ctx

    def _verify_splits(self, b: int) -> int:
        """Split-K factor of the ``b``-row verify graph: the pointer kernel's decode policy
        (a verify row is a decode step with ``1 + K`` queries). Without it a batch-1 verify
        step runs one program per KV head over the whole context and leaves the GPU idle."""
        return choose_num_splits(b, self.geometry.num_kv_heads, self.max_model_len, self.device, tma=False)

    def _stage_verify(self, scheduled: list[ScheduledSeq], b: int) -> torch.Tensor:
        """Write ``scheduled`` into the verify buffers; returns the logits rows to keep."""
        t, mb = b * (1 + self.verify_k), self._max_blocks
        if self._verify_copied is not None:  # see _run_graph: the staging is reused per step
            self._verify_copied.synchronize()
        rows = self._verify_staging.fill(scheduled, b)
        n = len(rows)
        self._verify_staging.s64[3 * t:3 * t + n] = rows
        self._vmeta64[:3 * t + n].copy_(self._vstage64[:3 * t + n], non_blocking=True)
        self._vmeta32[:b + b * mb].copy_(self._vstage32[:b + b * mb], non_blocking=True)
        if self.device.type == "cuda":
            if self._verify_copied is None:
                self._verify_copied = torch.cuda.Event()
            self._verify_copied.record()
        return self._vmeta64[3 * t:3 * t + n]

    def _capture_verify_graphs(self) -> None:
        t0 = time.perf_counter()
        # Up to 64 rows: each graph keeps (1 + K) logits rows per sequence alive, and large
        # batches gain least from speculation (speculative_disable_by_batch_size).
        sizes = [b for b in self._graph_sizes if b <= VERIFY_GRAPH_MAX_BATCH] or self._graph_sizes[:1]
        self._alloc_verify_inputs(sizes)
        pool = self.graphs[sizes[-1]].graph.pool()  # never replayed at the same time as a decode graph
        for b in reversed(sizes):
            ids, pos, ctx = self._verify_inputs(b)
            ctx.slot_mapping.fill_(self.scratch_slot)
            ctx.seq_lens.fill_(1 + self.verify_k)
            ctx.block_tables.zero_()
            with torch.inference_mode(), attn_hook.attention_context(ctx):
                self._forward(ids, pos, 0)  # warm-up: compiles kernels outside the capture
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(ids, pos, 0)
            self.verify_graphs[b] = _DecodeGraph(graph, b, logits)
        torch.cuda.synchronize(self.device)
        self._check_verify_graphs()
        log.info("captured %d verify-step CUDA graphs (batch %s, %d query tokens each) in %.1f s",
                 len(sizes), sizes, 1 + self.verify_k, time.perf_counter() - t0)

    def _check_decode_graphs(self) -> None:
        """Run one small decode step eagerly and through its graph on the same pages; raise
        (the caller then decodes eagerly) if the logits disagree. Done for the hybrid KV
        cache, whose graphs stage a second group of tables: a staging mistake there would
        otherwise give wrong tokens silently."""
        bs = self.block_size
        with torch.inference_mode():
            for pages in self.kv_caches:
                for p in pages:
                    p[:4] = 0
            rows = [self._fake(1, [0, 1], computed=bs + 2), self._fake(1, [2, 3], computed=bs - 1)]
            for token, row in zip((5, 9), rows, strict=True):  # distinct inputs: swapped rows must show
                row.seq.token_ids[-1] = token
            eager = self._run_eager(rows).float()
            graphed = self._run_graph(rows).float()
        scale = eager.abs().amax().clamp_min(1.0)
        err = ((eager - graphed).abs().amax() / scale).item()
        if not err < 2e-2:  # the same math in two kernel schedules; NaN fails too
            raise RuntimeError(f"decode graph logits differ from the eager step's (relative error {err:.3g})")

    def _check_verify_graphs(self) -> None:
        """Run one small verify step eagerly and through its graph on the same pages; keep
        the graphs only if the logits agree (a staging mistake would otherwise give wrong
        tokens silently)."""
        k, bs = self.verify_k, self.block_size
        for pages in self.kv_caches:
            for p in pages:
                p[:4] = 0
        rows = [self._fake(1 + k, [0, 1], computed=bs - 1, draft=list(range(3, 3 + k))),
                self._fake(1, [2, 3], computed=bs + 2)]
        eager = self._run_eager(rows).float()
        graphed = self._run_verify_graph(rows).float()
        scale = eager.abs().amax().clamp_min(1.0)
        err = ((eager - graphed).abs().amax() / scale).item()
        if not err < 2e-2:  # bf16 logits of the same math in two kernel schedules; NaN fails too
            self.verify_graphs.clear()
            self._verify_sizes = []
            raise RuntimeError(f"verify graph logits differ from the eager step's (relative error {err:.3g})")

    def _run_verify_graph(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        b = next(s for s in self._verify_sizes if s >= len(scheduled))
        rows = self._stage_verify(scheduled, b)
        graph = self.verify_graphs[b]
        graph.graph.replay()
        return graph.logits[rows]

    @torch.inference_mode()
    def run_verify_static(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """A verify step over the graphs' fixed, padded inputs, run eagerly: what a verify
        graph computes, on any device (tests compare it with the eager step on CPU)."""
        b = next(s for s in self._verify_sizes if s >= len(scheduled))
        rows = self._stage_verify(scheduled, b)
        ids, pos, ctx = self._verify_inputs(b)
        with attn_hook.attention_context(ctx):
            return self._forward(ids, pos, 0)[rows]


class VerifyStaging:
    """Host side of a verify graph's inputs, for ``b`` rows of ``q = 1 + k`` query tokens:
    ``[ids | positions | slots]`` (int64, ``b * q`` each) and ``[lens | tables (b x
    max_blocks)]`` (int32), in pinned buffers shared by every graph size.

    A row verifying ``d <= k`` drafts holds its last token, the drafts, then ``k - d``
    padding tokens (id 0) whose K/V go to the scratch slot. Causal attention keeps the real
    tokens from seeing the padding; the padding's own outputs are dropped. Its key length is
    ``kv + q``, so the padding reads table entries past the sequence's blocks: those are
    zeroed (block 0), never left stale, since stale entries of another layout may hold
    lengths or slot numbers. Padding rows (``n..b``) see ``q`` keys of block 0."""

    def __init__(self, s64: np.ndarray, s32: np.ndarray, block_size: int, max_blocks: int,
                 scratch_slot: int, k: int) -> None:
        self.s64, self.s32 = s64, s32
        self.block_size, self.max_blocks, self.scratch_slot, self.q = block_size, max_blocks, scratch_slot, 1 + k

    def fill(self, scheduled: list, b: int) -> np.ndarray:
        """Stage ``scheduled`` padded to ``b`` rows; returns the logits rows to keep (each
        sampling row's last token and drafts, in order), as the eager step returns them."""
        s64, s32, bs, mb, q = self.s64, self.s32, self.block_size, self.max_blocks, self.q
        t = b * q
        ids, pos, slots = s64[:t].reshape(b, q), s64[t:2 * t].reshape(b, q), s64[2 * t:3 * t].reshape(b, q)
        lens, tables = s32[:b], s32[b:b + b * mb].reshape(b, mb)
        steps = np.arange(q, dtype=np.int64)
        keep: list[int] = []
        n = len(scheduled)
        for i, s in enumerate(scheduled):
            seq = s.seq
            p = seq.num_computed_tokens
            kv0 = seq.num_kv_slots
            table = seq.block_table
            draft = s.draft or ()
            d = len(draft)
            ids[i, 0] = seq.token_ids[p]
            ids[i, 1:1 + d] = draft
            ids[i, 1 + d:] = 0
            pos[i] = p + steps
            tables[i, :len(table)] = table
            reach = (kv0 + q - 1) // bs + 1
            tables[i, len(table):reach] = 0
            real = kv0 + steps[:1 + d]
            slots[i, :1 + d] = tables[i, real // bs].astype(np.int64) * bs + real % bs
            slots[i, 1 + d:] = self.scratch_slot
            lens[i] = kv0 + q
            if s.samples:
                keep.extend(range(i * q, i * q + 1 + d))
        ids[n:] = 0
        pos[n:] = steps
        slots[n:] = self.scratch_slot
        lens[n:] = q
        tables[n:, :(q - 1) // bs + 1] = 0
        return np.asarray(keep, dtype=np.int64)


class DecodeStaging:
    """Host side of a decode graph's inputs: ids, positions, slots (int64) and sequence
    lengths, block tables (int32) written into pinned buffers laid out per graph size
    ``b`` as ``[ids | positions | slots]`` and ``[lens | tables (b x max_blocks)]``."""

    def __init__(self, s64: np.ndarray, s32: np.ndarray, block_size: int, max_blocks: int,
                 scratch_slot: int) -> None:
        self.s64, self.s32 = s64, s32
        self.block_size, self.max_blocks, self.scratch_slot = block_size, max_blocks, scratch_slot
        self._b: int | None = None
        self._rows: list[tuple[list[int] | None, int]] = []

    def fill(self, scheduled: list, b: int) -> None:
        """Stage one decode token per scheduled sequence, padded to ``b`` rows."""
        s64, s32, bs, mb = self.s64, self.s32, self.block_size, self.max_blocks
        n = len(scheduled)
        tables = s32[b:b + b * mb].reshape(b, mb)
        # Block tables only grow in place (every other change assigns a new list, see
        # Sequence), so (list object, length) identifies a staged row's content: a row is
        # rewritten only from where it grew. The layout differs per graph size.
        if self._b != b:
            self._b, self._rows = b, [(None, 0)] * b
        rows = self._rows
        ids, pos, slots, lens = [], [], [], []
        for i, s in enumerate(scheduled):
            seq = s.seq
            p = seq.num_computed_tokens
            kv0 = p - seq.num_dropped_tokens
            table = seq.block_table
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(table[kv0 // bs] * bs + kv0 % bs)
            lens.append(kv0 + 1)
            staged, m = rows[i]
            k = len(table)
            if staged is not table or m != k:
                start = m if staged is table and m < k else 0
                tables[i, start:k] = table[start:]
                rows[i] = (table, k)
        # Padding rows (n..b) get token 0 at position 0, writing to the scratch slot: the
        # buffers keep older steps' values there, laid out for other graph sizes (slot
        # numbers where ids go), which would read as out-of-range token ids.
        s64[:n] = ids
        s64[n:b] = 0
        s64[b:b + n] = pos
        s64[b + n:2 * b] = 0
        s64[2 * b:2 * b + n] = slots
        s64[2 * b + n:3 * b] = self.scratch_slot
        s32[:n] = lens
        s32[n:b] = 0


class HybridDecodeStaging(DecodeStaging):
    """:class:`DecodeStaging` plus the windowed group's inputs (hybrid KV cache), in
    buffers of their own: ``[slots (k x b)]`` (int64) and ``[lens | tables (k x b x
    window_blocks)]`` (int32); round ``r``'s slot and table entries are the ``r``-th page
    of each logical block in the sequence's ``window_table``."""

    def __init__(self, s64: np.ndarray, s32: np.ndarray, block_size: int, max_blocks: int, scratch_slot: int,
                 w64: np.ndarray, w32: np.ndarray, window_pages: int, window_blocks: int) -> None:
        super().__init__(s64, s32, block_size, max_blocks, scratch_slot)
        self.w64, self.w32, self.k, self.window_blocks = w64, w32, window_pages, window_blocks
        self._wb: int | None = None
        self._wrows: list[tuple[list[int] | None, int]] = []

    def fill(self, scheduled: list, b: int) -> None:
        super().fill(scheduled, b)
        bs, k, wb = self.block_size, self.k, self.window_blocks
        slots = self.w64[:k * b].reshape(k, b)
        lens = self.w32[:b]
        tables = self.w32[b:b + k * b * wb].reshape(k, b, wb)
        if self._wb != b:  # as DecodeStaging: rows are rewritten from where their table grew
            self._wb, self._wrows = b, [(None, 0)] * b
        rows = self._wrows
        for i, s in enumerate(scheduled):
            seq = s.seq
            kv0 = seq.num_computed_tokens - seq.window_dropped_tokens
            table = seq.window_table
            first = kv0 // bs * k
            for r in range(k):
                slots[r, i] = table[first + r] * bs + kv0 % bs
            lens[i] = kv0 + 1
            staged, m = rows[i]
            size = len(table)
            if staged is not table or m != size:
                start = m if staged is table and m < size else 0
                tables[:, i, start // k:size // k] = np.asarray(table[start:], dtype=np.int32).reshape(-1, k).T
                rows[i] = (table, size)
        n = len(scheduled)
        slots[:, n:b] = self.scratch_slot
        lens[n:b] = 0


@dataclass
class _FakeSeq:
    """The few fields :meth:`ModelRunner._prepare` reads, for the memory-profiling step."""

    token_ids: list[int]
    block_table: list[int]
    num_computed_tokens: int = 0
    num_kv_slots: int = 0
    window_table: list[int] = dataclasses.field(default_factory=list)
    num_dropped_tokens: int = 0
    window_dropped_tokens: int = 0
    scores_prompt = False

    def prompt_logprob_rows(self, start: int, n: int) -> int:
        return 0


class _FakeScheduled:
    """A scheduled sequence of ``n`` new tokens after ``computed`` cached ones (dummy ids),
    for profiling and warm-up steps that run before any request exists."""

    def __init__(self, n: int, table: list[int], computed: int = 0, draft: list[int] | None = None,
                 window_pages: int = 1) -> None:
        # A hybrid layout's windowed group reads the same (dummy) pages, once per round.
        window = [b for b in table for _ in range(window_pages)]
        self.seq = _FakeSeq([0] * (computed + n), table, computed, computed, window)
        self.num_new_tokens = n
        self.samples = True
        self.draft = draft
