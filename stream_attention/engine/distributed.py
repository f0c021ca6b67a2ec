"""The engine across several ranks: long prompts prefilled with ring or star attention.

Call :func:`init_distributed_engine` on every rank of an initialized process group; the
command line that does so (and can serve HTTP on rank 0) is
:mod:`stream_attention.cli.distributed`.

Rank 0 runs the scheduler: it is a normal
:class:`~.llm_engine.LLMEngine` for short prompts, which stay on its device with the
paged cache. A prompt of at least ``min_prompt_tokens`` tokens goes to every rank:

* prefill: each rank runs the model on its shard of the prompt (zigzag shards for ring,
  contiguous for star), with positions of the whole sequence; the attention layers run
  :func:`~stream_attention.core.ring_attention.ring_attention` (exact) or star attention
  phase 1 (approximate, no K/V exchange beyond the anchor) across the ranks. Each rank
  keeps its shard's K/V: the cache stays sharded.
* the prompt's tail (its last token for ring, the last ``star_query_tokens`` for star)
  and every generated token then run *replicated* on all ranks: at each layer every
  rank attends the new tokens to its cache shard, and the partial outputs are merged
  exactly through their LSE (one all-reduce MAX and one all-reduce SUM per layer). The
  new tokens' K/V are appended on one rank (``owner_rank``). All ranks end with the same
  hidden states; rank 0 samples.

Control (which sequences to prefill, decode or free this step) is broadcast from rank 0
on a gloo group with a long timeout, so idle workers block on the CPU rather than in a
device collective; the attention data moves on the default group (NCCL on GPUs, gloo on
CPU). Weights are broadcast from rank 0 at start so every replica is identical.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..core.config import StreamAttentionConfig
from ..core.distributed_utils import (
    allreduce_partials,
    contiguous_shard,
    group_info,
    zigzag_shard,
)
from ..core.functional import fused_attention
from ..core.ring_attention import ring_attention
from ..core.star_attention import star_attention_phase1
from . import attention as paged_hook
from .config import EngineConfig
from .llm_engine import LLMEngine, PromptLike, load_model
from .model_runner import ModelGeometry
from .sequence import Sequence, SequenceStatus
from .types import FinishReason, PromptTooLongError, QueueFullError, Request, RequestOutput, SamplingParams

ATTN_NAME = "stream_attention_distributed"
MODES = ("ring", "star")
# Idle workers wait on the control group for the next step; this only bounds a dead rank 0.
CONTROL_TIMEOUT = datetime.timedelta(days=7)
# Variables that keep NVLink multicast off on shared multi-GPU hosts (set before NCCL starts).
SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class DistributedConfig:
    """How long prompts are spread over the ranks.

    Attributes:
        mode: ``"ring"`` (exact) or ``"star"`` (approximate phase 1, faster).
        min_prompt_tokens: prompts at least this long are prefilled across ranks;
            ``None`` = ``world * ring_attention_block_size`` (ring) or
            ``world * star_attention_block_size`` (star) of ``attention``.
        star_query_tokens: star only: the prompt's last tokens answered in phase 2
            (exact attention to the whole distributed context).
        owner_rank: the rank whose cache receives the prompt tail and generated tokens.
        attention: ring/star settings (``ring_attention_zigzag``, ``ring_attention_overlap``,
            ``star_attention_anchor_size``, ``star_attention_block_size``, ``backend``);
            its head fields are not read.
        sync_weights: broadcast rank 0's weights at start (random-init models differ per
            process otherwise).
        pad_token_id: token used to pad a ring prompt to a multiple of ``2 * world``
            (the pads sit after the prompt, so causal attention never lets a real token
            see them, and their K/V are not cached).
    """

    mode: str = "ring"
    min_prompt_tokens: int | None = None
    star_query_tokens: int = 128
    owner_rank: int = -1
    attention: StreamAttentionConfig = field(default_factory=StreamAttentionConfig)
    sync_weights: bool = True
    pad_token_id: int = 0

    def threshold(self, world: int) -> int:
        if self.min_prompt_tokens is not None:
            return int(self.min_prompt_tokens)
        block = (
            self.attention.ring_attention_block_size
            if self.mode == "ring"
            else self.attention.star_attention_block_size
        )
        return world * block

    def validate(self, world: int) -> DistributedConfig:
        """Raise ``ValueError`` naming the bad field; returns ``self``."""
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: expected one of {', '.join(MODES)}")
        if self.star_query_tokens < 1:
            raise ValueError(f"star_query_tokens={self.star_query_tokens} must be >= 1")
        if world > 1 and self.threshold(world) < 2 * world + self.tail_tokens(self.threshold(world)):
            raise ValueError(
                f"min_prompt_tokens={self.threshold(world)} is too small for {world} ranks: every rank needs a shard"
            )
        return self

    def tail_tokens(self, prompt_len: int) -> int:
        """Prompt tokens run replicated after the sharded prefill (they yield the first logits)."""
        if self.mode == "ring":
            return 1
        return max(1, min(self.star_query_tokens, prompt_len // 2))


# ------------------------------------------------------------------ step commands


@dataclass
class PrefillSpec:
    """Shard ``context_ids`` over the ranks and encode them (the cache's first tokens)."""

    request_id: str
    context_ids: list[int]
    mode: str
    reserve: int  # extra slots on the owner rank: the tail plus the generated tokens


@dataclass
class Segment:
    """Tokens of one sequence run replicated on every rank, at positions ``start...``."""

    request_id: str
    token_ids: list[int]
    start: int


@dataclass
class StepCommand:
    """What every rank does in one step, in this order: free, prefill, replicated forward."""

    release: list[str] = field(default_factory=list)
    prefill: list[PrefillSpec] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    stop: bool = False


def broadcast_command(cmd: StepCommand | None, group: dist.ProcessGroup | None) -> StepCommand:
    """Rank 0 sends ``cmd``; every other rank receives (and returns) it."""
    box = [cmd]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


# ---------------------------------------------------------------- sharded K/V cache


class ShardCache:
    """One sequence's K/V held by this rank, for every layer: ``[L, capacity, Hkv, D]``."""

    def __init__(self, geometry: ModelGeometry, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (geometry.num_layers, capacity, geometry.num_kv_heads, geometry.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


_local = threading.local()


@contextlib.contextmanager
def _installed(ctx: Any) -> Iterator[None]:
    prev = getattr(_local, "ctx", None)
    _local.ctx = ctx
    try:
        yield
    finally:
        _local.ctx = prev


class _PrefillContext:
    """Attention of a sharded prefill: ring or star phase 1 across ranks; K/V cached."""

    def __init__(self, executor: ShardExecutor, mode: str, cache: ShardCache, keep: torch.Tensor | None) -> None:
        self.executor = executor
        self.mode = mode
        self.cache = cache
        self.keep = keep

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        cfg = self.executor.config.attention
        group = self.executor.group
        if self.mode == "ring":
            out = ring_attention(
                q,
                k,
                v,
                causal=True,
                softmax_scale=scale,
                group=group,
                zigzag=cfg.ring_attention_zigzag,
                overlap=cfg.ring_attention_overlap,
                backend=cfg.backend,
            )
        else:
            out = star_attention_phase1(
                q,
                k,
                v,
                anchor_size=cfg.star_attention_anchor_size,
                block_size=cfg.star_attention_block_size,
                causal=True,
                softmax_scale=scale,
                group=group,
                backend=cfg.backend,
            )
        k_rows, v_rows = (k[0], v[0]) if self.keep is None else (k[0, self.keep], v[0, self.keep])
        n = k_rows.shape[0]
        self.cache.k[layer, :n] = k_rows
        self.cache.v[layer, :n] = v_rows
        return out


class _ReplicatedContext:
    """Attention of tokens run on every rank: local partials over each cache, merged exactly."""

    def __init__(self, executor: ShardExecutor, parts: list[tuple[ShardCache, int, int]]) -> None:
        self.executor = executor
        self.parts = parts  # (cache, offset in the packed tokens, count)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        ex = self.executor
        owner = ex.rank == ex.owner
        outs, lses = [], []
        for cache, off, n in self.parts:
            end = cache.length
            if owner:
                cache.k[layer, end : end + n] = k[0, off : off + n]
                cache.v[layer, end : end + n] = v[0, off : off + n]
                end += n
            q_part = q[:, off : off + n]
            if end == 0:
                outs.append(torch.zeros_like(q_part))
                lses.append(torch.full((1, q.shape[2], n), float("-inf"), device=q.device, dtype=torch.float32))
                continue
            # On the owner the new tokens are the cache's last keys: causal, bottom-right
            # aligned. Every other rank's keys all precede them.
            out, lse = fused_attention(
                q_part,
                cache.k[layer, None, :end],
                cache.v[layer, None, :end],
                causal=owner,
                softmax_scale=scale,
                return_lse=True,
                backend=ex.config.attention.backend,
            )
            outs.append(out)
            lses.append(lse)
        out, _ = allreduce_partials(torch.cat(outs, 1), torch.cat(lses, 2), ex.group)
        return out


def distributed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention callable: the distributed paths inside a sharded step, the
    engine's paged attention (or SDPA) everywhere else."""
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        return paged_hook.paged_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # HF passes [1, H, T, D] views; the kernels take [1, T, H, D] with any strides.
    out = ctx.attend(module.layer_idx, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale)
    return out, None


def install_attention(model: Any) -> str:
    """Register :func:`distributed_attention_forward` and switch ``model`` to it."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, distributed_attention_forward)
    model.set_attn_implementation(ATTN_NAME)
    return ATTN_NAME


def broadcast_weights(model: torch.nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Make every rank's parameters and buffers equal to rank 0's."""
    if group_info(group)[0] == 1:
        return
    seen: set[int] = set()
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if id(tensor) in seen:  # tied weights
            continue
        seen.add(id(tensor))
        with torch.no_grad():
            dist.broadcast(tensor.data, src=0, group=group)


class ShardExecutor:
    """What every rank does with a :class:`StepCommand`: the same code on rank 0 and workers."""

    def __init__(
        self, model: Any, device: torch.device, config: DistributedConfig, group: dist.ProcessGroup | None = None
    ) -> None:
        self.model = model
        self.device = device
        self.config = config
        self.group = group
        self.world, self.rank = group_info(group)
        self.owner = config.owner_rank % self.world
        self.geometry = ModelGeometry.of(model)
        self.dtype = next(model.parameters()).dtype
        self.caches: dict[str, ShardCache] = {}

    @property
    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches.values())

    @torch.inference_mode()
    def run(self, cmd: StepCommand) -> torch.Tensor | None:
        """Execute ``cmd``; returns the logits of each segment's last token ``[S, V]`` (or None)."""
        for rid in cmd.release:
            self.caches.pop(rid, None)
        for spec in cmd.prefill:
            self._prefill(spec)
        if not cmd.segments:
            return None
        return self._replicated(cmd.segments)

    def _shard(self, n: int, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Global positions this rank encodes, and which of them are real (None = all)."""
        world, rank = self.world, self.rank
        if mode == "star":
            return torch.arange(rank * n // world, (rank + 1) * n // world), None
        padded = -(-n // (2 * world)) * (2 * world)
        positions = torch.arange(padded)
        if self.config.attention.ring_attention_zigzag:
            positions = zigzag_shard(positions, rank, world, dim=0)
        else:
            positions = contiguous_shard(positions, rank, world, dim=0)
        keep = positions < n
        return positions, (None if bool(keep.all()) else keep)

    def _prefill(self, spec: PrefillSpec) -> None:
        n = len(spec.context_ids)
        positions, keep = self._shard(n, spec.mode)
        ids = torch.tensor(spec.context_ids + [self.config.pad_token_id], dtype=torch.long)
        local_ids = ids[positions.clamp(max=n)]  # pads read the appended pad token
        kept = int(keep.sum()) if keep is not None else positions.numel()
        reserve = spec.reserve if self.rank == self.owner else 0
        cache = ShardCache(self.geometry, kept + reserve, self.dtype, self.device)
        ctx = _PrefillContext(self, spec.mode, cache, None if keep is None else keep.to(self.device))
        with _installed(ctx):
            self.model(
                input_ids=local_ids[None].to(self.device),
                position_ids=positions[None].to(self.device),
                use_cache=False,
                logits_to_keep=1,
            )
        cache.length = kept
        self.caches[spec.request_id] = cache

    def _replicated(self, segments: list[Segment]) -> torch.Tensor:
        ids: list[int] = []
        positions: list[int] = []
        parts: list[tuple[ShardCache, int, int]] = []
        last_rows: list[int] = []
        for seg in segments:
            n = len(seg.token_ids)
            parts.append((self.caches[seg.request_id], len(ids), n))
            ids.extend(seg.token_ids)
            positions.extend(range(seg.start, seg.start + n))
            last_rows.append(len(ids) - 1)
        with _installed(_ReplicatedContext(self, parts)):
            out = self.model(
                input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),
                position_ids=torch.tensor([positions], dtype=torch.long, device=self.device),
                use_cache=False,
                logits_to_keep=torch.tensor(last_rows, dtype=torch.long, device=self.device),
            )
        if self.rank == self.owner:
            for cache, _, n in parts:
                cache.length += n
        return out.logits[0]


# ------------------------------------------------------------------------ rank 0


class DistributedLLMEngine(LLMEngine):
    """:class:`LLMEngine` on rank 0 that sends long prompts across every rank.

    Construct it through :func:`init_distributed_engine` (which also starts the workers
    on the other ranks), on a process group that is already initialized. Short prompts
    behave exactly as in :class:`LLMEngine`. Call :meth:`close` (or use it as a context
    manager) to release the workers.
    """

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        *,
        config: EngineConfig | None = None,
        distributed: DistributedConfig | None = None,
        control_group: dist.ProcessGroup | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__(model, tokenizer, config=config, **overrides)
        self.world_size, _ = group_info(None)
        self.distributed = (distributed or DistributedConfig()).validate(self.world_size)
        self.control_group = control_group
        _prepare_replica(self.model, self.distributed)
        self.executor = ShardExecutor(self.model, self.device, self.distributed)
        self._dist_seqs: dict[str, Sequence] = {}
        self._dist_waiting: deque[Sequence] = deque()
        self._dist_running: list[Sequence] = []
        self._dist_pending: list[RequestOutput] = []
        self._release: list[str] = []
        self._closed = False

    # -------------------------------------------------------------- routing
    def uses_ranks(self, num_prompt_tokens: int) -> bool:
        """True when a prompt of this length is prefilled across the ranks."""
        return self.world_size > 1 and num_prompt_tokens >= self.distributed.threshold(self.world_size)

    def validate(self, req: Request) -> None:
        if not self.uses_ranks(len(req.prompt_token_ids)):
            super().validate(req)
            return
        # The paged cache's capacity does not apply: this prompt lives on every rank.
        req.params.validate()
        vocab = self.runner.geometry.vocab_size
        if any(t < 0 or t >= vocab for t in req.prompt_token_ids):
            raise ValueError(f"prompt_token_ids contain ids outside [0, {vocab})")
        total = len(req.prompt_token_ids) + req.params.max_tokens
        if total > self.max_model_len:
            raise PromptTooLongError(
                f"prompt ({len(req.prompt_token_ids)} tokens) + max_tokens ({req.params.max_tokens}) = {total} "
                f"exceeds the context length {self.max_model_len}"
            )

    def add_request(
        self,
        prompt: PromptLike,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        stream: bool = True,
        bounded: bool = True,
    ) -> str:
        if self._closed:
            raise RuntimeError("the distributed engine is closed")
        req = self.make_request(prompt, params, request_id)
        if req.request_id in self._dist_seqs:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        if not self.uses_ranks(len(req.prompt_token_ids)):
            return super().add_request(req, stream=stream, bounded=bounded)
        if req.request_id in self._seqs:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        if bounded and len(self._dist_waiting) >= self.config.max_waiting:
            raise QueueFullError(f"waiting queue is full ({self.config.max_waiting} requests)")
        seq = self._new_sequence(req, stream)
        self._dist_waiting.append(seq)
        self._dist_seqs[seq.request_id] = seq
        return seq.request_id

    def abort(self, request_id: str) -> bool:
        seq = self._dist_seqs.pop(request_id, None)
        if seq is None:
            return super().abort(request_id)
        if seq in self._dist_waiting:
            self._dist_waiting.remove(seq)
        if seq in self._dist_running:
            self._dist_running.remove(seq)
            self._release.append(request_id)
        self._retire(seq, FinishReason.ABORT, time.time())
        self._dist_pending.append(self.make_output(seq))
        return True

    def abort_all(self) -> list[str]:
        """Abort every request, local and distributed; returns their ids."""
        ids = list(self._seqs) + list(self._dist_seqs)
        for rid in ids:
            self.abort(rid)
        return ids

    def has_unfinished_requests(self) -> bool:
        return (
            super().has_unfinished_requests()
            or bool(self._dist_seqs)
            or bool(self._dist_pending)
            or bool(self._release)
        )

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._seqs) + len(self._dist_seqs)

    def stats(self) -> Any:
        s = super().stats()
        s.running += len(self._dist_running)
        s.waiting += len(self._dist_waiting)
        return s

    # -------------------------------------------------------------- stepping
    def step(self) -> list[RequestOutput]:
        outputs, self._dist_pending = self._dist_pending, []
        if self._dist_waiting or self._dist_running or self._release:
            outputs += self._distributed_step()
        return outputs + super().step()

    def _distributed_step(self) -> list[RequestOutput]:
        cmd = StepCommand(release=self._release)
        self._release = []
        order: list[Sequence] = []
        for seq in self._dist_running:
            cmd.segments.append(Segment(seq.request_id, [seq.token_ids[-1]], seq.num_tokens - 1))
            order.append(seq)
        if self._dist_waiting:
            # One prefill per step: it is long, and running sequences keep decoding meanwhile.
            seq = self._dist_waiting.popleft()
            tail = self.distributed.tail_tokens(seq.num_prompt_tokens)
            context = seq.prompt_token_ids[:-tail]
            cmd.prefill.append(
                PrefillSpec(seq.request_id, context, self.distributed.mode, tail + seq.params.max_tokens)
            )
            cmd.segments.append(Segment(seq.request_id, seq.prompt_token_ids[-tail:], len(context)))
            seq.status = SequenceStatus.RUNNING
            self.counters.prompt_tokens_total += seq.num_prompt_tokens
            self._dist_running.append(seq)
            order.append(seq)
        broadcast_command(cmd, self.control_group)
        logits = self.executor.run(cmd)
        if not order:
            return []
        result = self.sampler(logits, order)
        outputs = []
        now = time.time()
        for seq, token, lp in zip(order, result.token_ids, result.logprobs, strict=True):
            seq.token_ids.append(token)
            seq.num_computed_tokens = seq.num_tokens - 1
            if seq.logprobs is not None and lp is not None:
                seq.logprobs.append(lp)
            if seq.first_token_time is None:
                seq.first_token_time = now
            self.counters.generation_tokens_total += 1
            reason = self.process_token(seq, token)
            if reason is not None:
                self._dist_running.remove(seq)
                self._dist_seqs.pop(seq.request_id, None)
                self._release.append(seq.request_id)
                self._retire(seq, reason, now)
            if seq.stream or reason is not None:
                outputs.append(self.make_output(seq))
        return outputs

    def _retire(self, seq: Sequence, reason: FinishReason, now: float) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finish_time = now
        self.finish_text(seq)
        self.counters.requests_finished_total += 1

    # -------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Stop the worker ranks (idempotent). Local generation keeps working."""
        if self._closed:
            return
        self._closed = True
        if self.world_size > 1:
            broadcast_command(StepCommand(release=list(self.executor.caches), stop=True), self.control_group)
        self.executor.caches.clear()

    def __enter__(self) -> DistributedLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prepare_replica(model: Any, config: DistributedConfig) -> None:
    install_attention(model)
    if config.sync_weights:
        broadcast_weights(model)


def run_worker(
    model: Any, device: torch.device, config: DistributedConfig, control_group: dist.ProcessGroup | None
) -> None:
    """A worker rank's loop: execute rank 0's step commands until it says stop."""
    _prepare_replica(model, config)
    executor = ShardExecutor(model, device, config)
    while True:
        cmd = broadcast_command(None, control_group)
        if cmd.stop:
            break
        executor.run(cmd)


def init_distributed_engine(
    model: Any = None,
    tokenizer: Any = None,
    *,
    config: EngineConfig | None = None,
    distributed: DistributedConfig | None = None,
    **overrides: Any,
) -> DistributedLLMEngine | None:
    """Call on every rank of an initialized default process group.

    Rank 0 gets the :class:`DistributedLLMEngine`. Every other rank loads the same model,
    serves rank 0's steps until :meth:`DistributedLLMEngine.close`, and then returns None.
    """
    if not dist.is_initialized():
        raise RuntimeError("init_distributed_engine needs torch.distributed.init_process_group() first")
    world, rank = group_info(None)
    distributed = (distributed or DistributedConfig()).validate(world)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if world > 1 else None
    if rank == 0:
        return DistributedLLMEngine(
            model, tokenizer, config=config, distributed=distributed, control_group=control, **overrides
        )
    if isinstance(model, EngineConfig):
        config, model = model, None
    if isinstance(model, tuple):
        model, tokenizer = model
    cfg = (config or EngineConfig()).replace(**overrides) if overrides else (config or EngineConfig())
    if isinstance(model, str):
        cfg = cfg.replace(model=model)
    cfg = cfg.validate()
    device = cfg.resolved_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    hf_model, _, _ = load_model(model, tokenizer, cfg, device)
    run_worker(hf_model, device, distributed, control)
    return None


__all__ = [
    "MODES",
    "SAFE_NCCL_ENV",
    "DistributedConfig",
    "DistributedLLMEngine",
    "PrefillSpec",
    "Segment",
    "ShardCache",
    "ShardExecutor",
    "StepCommand",
    "broadcast_command",
    "broadcast_weights",
    "distributed_attention_forward",
    "init_distributed_engine",
    "install_attention",
    "run_worker",
]


if __name__ == "__main__":
    # The command line can start the HTTP server, which sits above the engine; it lives in
    # stream_attention/cli/distributed.py so that this module imports nothing above it.
    sys.exit(
        "the distributed engine's command line is `python -m stream_attention.cli.distributed` "
        "(under torchrun: torchrun --nproc-per-node N -m stream_attention.cli.distributed --serve)"
    )
