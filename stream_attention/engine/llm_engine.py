"""The synchronous engine: add requests, call ``step()``, read outputs.

``LLMEngine`` ties the pieces together — scheduler and block manager decide what runs,
the model runner computes logits for a packed step, the sampler picks tokens, and the
output processing here applies stop conditions and produces :class:`RequestOutput`
snapshots with token and text deltas. It is single-threaded by design; the
:class:`~.async_engine.AsyncEngine` drives one from a background thread.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import itertools
import logging
import os
import threading
import time
from collections.abc import Sequence as SequenceABC
from pathlib import Path
from typing import Any

import torch

from .attention_spec import kv_reach
from .config import EngineConfig, parse_dtype
from .model_runner import ModelRunner
from .sampler import PendingSample, Sampler, _to_device
from .scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from .sequence import PLACEHOLDER_TOKEN, Sequence, SequenceGroup, SequenceStatus
from .spec_decode import DraftModelProposer, NgramProposer, PendingVerify, SpeculativeDecoder, draft_block_bytes
from .structured_output import GrammarCompiler
from .tokenizer import (
    IncrementalDetokenizer,
    decode_output,
    eos_token_ids,
    find_stop,
    load_tokenizer,
    stop_holdback,
)
from .types import (
    EngineStats,
    FinishReason,
    ListView,
    PromptTooLongError,
    Request,
    RequestOutput,
    SamplingParams,
    StructuredOutputsParams,
    TokenLogprob,
)

log = logging.getLogger("stream_attention.engine")

DEFAULT_MODEL_NAME = "stream-attention-default"
PromptLike = str | list[int] | Request


def load_model(model: Any, tokenizer: Any, config: EngineConfig, device: torch.device) -> tuple[Any, Any, str]:
    """Resolve ``model`` (None, a path/hub id, or a model object) to ``(model, tokenizer, name)``.

    Public so that other engines (e.g. the distributed workers) load the same model
    without a paged cache."""
    dtype = parse_dtype(config.dtype)
    if model is None and config.model is None:
        from ..models.default import load_default_model

        m, tok = load_default_model(device=device, dtype=dtype)
        return m, (tokenizer or tok), DEFAULT_MODEL_NAME
    if model is None or isinstance(model, str):
        from transformers import AutoModelForCausalLM

        path = model or config.model
        m = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or "auto", trust_remote_code=config.trust_remote_code, revision=config.revision,
        )
        if dtype is None and m.dtype == torch.float32 and device.type == "cuda":
            m = m.to(torch.bfloat16)  # serve fp32 checkpoints in bf16 on GPUs
        tok = tokenizer or load_tokenizer(config.tokenizer or path, trust_remote_code=config.trust_remote_code,
                                          revision=config.revision)
        if isinstance(tok, str):
            tok = load_tokenizer(tok, trust_remote_code=config.trust_remote_code)
        return m.to(device).eval(), tok, str(path)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be None, a path or hub id, or a transformers model; got {type(model).__name__}")
    if dtype is not None:
        model = model.to(dtype)
    tok = tokenizer
    if tok is None or isinstance(tok, str):
        tok = load_tokenizer(tok or config.tokenizer or model.config.name_or_path,
                             trust_remote_code=config.trust_remote_code)
    name = config.model or getattr(model.config, "name_or_path", "") or type(model).__name__
    return model.to(device).eval(), tok, name



def freeze_startup_objects() -> int:
    """Collect once, then move every object alive now (the model's modules, the tokenizer,
    imported libraries: hundreds of thousands) out of the garbage collector's view
    (``gc.freeze``, as vLLM does after start-up). A full collection otherwise walks all of
    them in the middle of some step, a pause of tens of milliseconds that every stream
    sees as one slow token. Returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class _Flight:
    """A launched step: what ran, who samples, and the sampling still on the device."""

    __slots__ = ("scheduled", "sampling", "pending", "collector", "verify", "prompt_scores", "committed")

    def __init__(self, scheduled: list[ScheduledSeq], sampling: list[Sequence],
                 pending: PendingSample | PendingVerify | None, collector: Any,
                 verify: list[ScheduledSeq] | None = None, prompt_scores: _PromptScores | None = None) -> None:
        self.scheduled = scheduled
        self.sampling = sampling
        self.pending = pending
        self.collector = collector
        self.verify = verify  # rows that verified a draft (their sequences end ``sampling``)
        self.prompt_scores = prompt_scores
        self.committed = False  # the scheduler has advanced past this step (a step launched ahead of it)


class _PromptScores:
    """A step's ``prompt_logprobs`` on the device: per scored chunk ``(seq, first position,
    positions)``, the logprob of each next prompt token and the top alternatives."""

    __slots__ = ("chunks", "chosen", "ranks", "top")

    def __init__(self, chunks: list[tuple[Sequence, int, int]], chosen: torch.Tensor, ranks: torch.Tensor,
                 top: Any) -> None:
        self.chunks, self.chosen, self.ranks, self.top = chunks, chosen, ranks, top

    @classmethod
    def split(cls, scheduled: list[ScheduledSeq], logits: torch.Tensor) -> tuple[torch.Tensor, _PromptScores | None]:
        """Take the scored prompt rows out of a step's ``logits`` (see ``ModelRunner.execute``);
        the rest keep their usual layout."""
        if not any(s.seq.scores_prompt for s in scheduled):  # the common step: nothing to split
            return logits, None
        scored: list[int] = []
        rest: list[int] = []
        chunks: list[tuple[Sequence, int, int]] = []
        targets: list[int] = []
        row = 0
        for s in scheduled:
            seq = s.seq
            start = seq.num_computed_tokens
            k = seq.prompt_logprob_rows(start, s.num_new_tokens) if seq.scores_prompt else 0
            if k:
                scored.extend(range(row, row + k))
                chunks.append((seq, start, k))
                targets.extend(seq.prompt_token_ids[start + 1:start + 1 + k])
                row += k
            if s.samples:
                m = 1 + len(s.draft or ())
                rest.extend(range(row, row + m))
                row += m
        if not chunks:
            return logits, None
        device = logits.device
        logp = torch.log_softmax(logits.index_select(0, torch.tensor(scored, device=device)).float(), dim=-1)
        chosen = logp.gather(1, torch.tensor(targets, device=device)[:, None]).squeeze(1)
        ranks = (logp > chosen[:, None]).sum(dim=1) + 1
        n_top = max(seq.params.prompt_logprobs for seq, _, _ in chunks)
        top = logp.topk(n_top, dim=-1) if n_top > 0 else None
        rest_logits = logits.index_select(0, torch.tensor(rest, dtype=torch.long, device=device))
        return rest_logits, cls(chunks, chosen, ranks, top)

    def record(self) -> None:
        """Append the scores to their sequences (reads the device)."""
        chosen = self.chosen.tolist()
        ranks = self.ranks.tolist()
        top_v = self.top.values.tolist() if self.top is not None else None
        top_i = self.top.indices.tolist() if self.top is not None else None
        o = 0
        for seq, start, k in self.chunks:
            # (A sequence preempted since this step launched starts over: its list is shorter.)
            if seq.status is not SequenceStatus.FINISHED and len(seq.prompt_logprobs) == start + 1:
                want = seq.params.prompt_logprobs
                for j in range(k):
                    top = dict(zip(top_i[o + j][:want], top_v[o + j][:want], strict=True)) if want else None
                    seq.prompt_logprobs.append(
                        TokenLogprob(seq.prompt_token_ids[start + 1 + j], chosen[o + j], top, ranks[o + j]))
            o += k


class LLMEngine:
    """Offline and step-wise generation with a paged KV cache and continuous batching.

    Args:
        model: ``None`` (the embedded demo model, or ``config.model`` when set), a local
            path or hub id, a transformers causal-LM object, an ``(model, tokenizer)``
            pair, or an :class:`EngineConfig`.
        tokenizer: a tokenizer object or name; defaults to the model's.
        config: engine settings; keyword ``overrides`` replace its fields.
    """

    def __init__(self, model: Any = None, tokenizer: Any = None, *, config: EngineConfig | None = None,
                 **overrides: Any) -> None:
        if isinstance(model, EngineConfig):
            config, model = model, None
        if isinstance(model, tuple):
            model, tokenizer = model
        config = (config or EngineConfig()).replace(**overrides) if overrides else (config or EngineConfig())
        if isinstance(model, str):
            config = config.replace(model=model)
        self.config = config.validate()
        self.device = config.resolved_device()
        t0 = time.perf_counter()
        hf_model, tok, name = load_model(model, tokenizer, config, self.device)
        self.model_name = name
        self.tokenizer = tok
        draft_model = self._load_draft_model(hf_model, tok, config) if config.speculative_method == "draft" else None
        self.runner = ModelRunner(hf_model, config, self.device, extra_block_bytes=(
            draft_block_bytes(draft_model, config.block_size) if draft_model is not None else 0))
        self.kv_mgr = self.runner.kv_mgr  # the page format (runner) and the eviction policy (scheduler)
        self.max_model_len = self.runner.max_model_len
        self.scheduler = Scheduler.from_config(config, self.runner.num_blocks, kv_policy=self.kv_mgr,
                                               kv_reach=kv_reach(self.runner.layer_attention),
                                               kv_groups=self.runner.kv_groups)
        self.block_manager = self.scheduler.bm
        self.sampler = Sampler(self.device, config.seed)
        if self.device.type == "cuda" and importlib.util.find_spec("xgrammar") is not None:
            try:
                self.sampler.prepare_grammar_masks(self.runner.geometry.vocab_size, self.runner.dtype)
            except Exception as exc:  # a warm-up only: structured output still works, compiling on first use
                log.warning("structured-output mask warm-up failed (%s); its kernel compiles on first use", exc)
        self.spec = self._speculative_decoder(draft_model)
        self.eos_token_ids = eos_token_ids(tok, hf_model)
        self._seqs: dict[str, Sequence] = {}
        self._pending: list[RequestOutput] = []
        self._ids = itertools.count()
        self._counters = EngineStats()
        # Pipelined steps (see step()): worth it where the model runs asynchronously.
        # With speculation too: the next step is launched after this one's tokens are
        # collected (its drafts need them), so only the text side overlaps the device.
        self.pipeline = config.pipeline_steps if config.pipeline_steps is not None else self.device.type == "cuda"
        # Launching decode steps ahead of their input tokens (see _launch_ahead): not
        # with speculation (drafts need the tokens) nor an eviction policy (scores a step
        # collects decide the next step's blocks).
        self.async_scheduling = self.pipeline and (
            config.async_scheduling if config.async_scheduling is not None else True
        ) and self.spec is None and not self.kv_mgr.config.evicts
        self._inflight: _Flight | None = None
        self.num_steps_launched_ahead = 0
        self._grammar_compiler: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()
        if self.device.type == "cuda":
            freeze_startup_objects()
        log.info("engine ready: %s on %s in %.1f s", name, self.device, time.perf_counter() - t0)

    # ------------------------------------------------------------------ speculative decoding
    def _load_draft_model(self, target: Any, tokenizer: Any, config: EngineConfig) -> Any:
        """The draft model of ``speculative_method="draft"``, on the target's device and dtype
        setting; its vocabulary must be the target's (draft and target rows are compared
        token id for token id)."""
        from .model_runner import ModelGeometry

        path = config.speculative_draft_model
        draft, _, _ = load_model(path, tokenizer, config.replace(model=path, tokenizer=None), self.device)
        target_vocab, draft_vocab = ModelGeometry.of(target).vocab_size, ModelGeometry.of(draft).vocab_size
        if draft_vocab != target_vocab:
            raise ValueError(f"speculative_draft_model={path!r} has a vocabulary of {draft_vocab} tokens; the target "
                             f"model's has {target_vocab}: a draft model must share the target's tokenizer")
        return draft

    def _speculative_decoder(self, draft_model: Any) -> SpeculativeDecoder | None:
        cfg = self.config
        if cfg.speculative_method == "none":
            return None
        if cfg.speculative_method == "ngram":
            return SpeculativeDecoder(self.sampler, ngram=NgramProposer(cfg.prompt_lookup_min, cfg.prompt_lookup_max))
        if self.scheduler.kv_reach is not None:
            raise ValueError("speculative_method='draft' is not supported for models whose every layer is windowed")
        if self.runner.kv_groups is not None:
            raise ValueError("speculative_method='draft' is not supported with the hybrid KV cache (a model mixing "
                             "full and sliding-window layers); set hybrid_kv_cache=False or use speculative_method="
                             "'ngram'")
        runner = ModelRunner(draft_model, cfg.replace(
            num_kv_blocks=self.runner.num_blocks, kv_cache_dtype="auto", kv_compression="none",
            kv_compression_ratio=None, kv_budget_tokens=None, max_model_len=self.max_model_len,
            speculative_method="none",
        ), self.device)
        if runner.max_model_len < self.max_model_len:
            raise ValueError(f"speculative_draft_model's context ({runner.max_model_len} tokens) is shorter than the "
                             f"target's max_model_len ({self.max_model_len})")
        return SpeculativeDecoder(self.sampler, draft=DraftModelProposer(runner, self.sampler))

    def speculates(self, params: SamplingParams) -> bool:
        """Whether requests with ``params`` get draft tokens: not with structured output (the
        grammar mask is per position and stateful), logprobs (computed per sampled row by the
        plain sampler), ``logit_bias`` or ``min_tokens``; those decode one token per step."""
        return (self.spec is not None and params.structured_outputs is None and params.logprobs is None
                and params.prompt_logprobs is None and not params.logit_bias and params.min_tokens == 0)

    # ------------------------------------------------------------------ properties
    @property
    def model(self) -> Any:
        return self.runner.model

    @property
    def dtype(self) -> torch.dtype:
        return self.runner.dtype

    # ------------------------------------------------------------------ structured output
    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """The structured-output compiler for this model's tokenizer (made on first use)."""
        with self._grammar_lock:
            if self._grammar_compiler is None:
                self._grammar_compiler = GrammarCompiler(self.tokenizer, self.runner.geometry.vocab_size)
            return self._grammar_compiler

    def compile_grammar(self, spec: StructuredOutputsParams) -> Any:
        """Compile ``spec`` now (thread-safe, cached): callers run this off the step loop
        before queueing, so that adding the request finds it compiled. ``ValueError`` if
        the spec cannot be compiled."""
        return self.grammar_compiler.compile(spec)

    # ------------------------------------------------------------------ requests
    def make_request(self, prompt: PromptLike, params: SamplingParams | None = None,
                     request_id: str | None = None) -> Request:
        """Tokenize and validate; raises ``ValueError`` / :class:`PromptTooLongError`."""
        if isinstance(prompt, Request):
            req = prompt
        else:
            params = params or SamplingParams()
            if isinstance(prompt, str):
                ids = self.tokenizer.encode(prompt)
                text = prompt
            else:
                ids, text = [int(t) for t in prompt], None
            req = Request(request_id=request_id or f"req-{next(self._ids)}", prompt_token_ids=ids,
                          params=params, prompt=text, arrival_time=time.time())
        self.validate(req)
        return req

    def validate(self, req: Request) -> None:
        """Check a request against the model and the cache before it is queued."""
        req.params.validate()
        n = len(req.prompt_token_ids)
        if n == 0:
            raise ValueError("prompt is empty")
        vocab = self.runner.geometry.vocab_size
        if any(t < 0 or t >= vocab for t in req.prompt_token_ids):
            raise ValueError(f"prompt_token_ids contain ids outside [0, {vocab})")
        outside = [t for t in (req.params.logit_bias or {}) if t >= vocab]
        if outside:
            raise ValueError(f"logit_bias token id {outside[0]} is outside the vocabulary [0, {vocab})")
        total = n + req.params.max_tokens
        if total > self.max_model_len:
            raise PromptTooLongError(
                f"prompt ({n} tokens) + max_tokens ({req.params.max_tokens}) = {total} exceeds the context length "
                f"{self.max_model_len}"
            )
        bm = self.block_manager
        if bm.window_reach is None:
            capacity = bm.num_blocks * bm.block_size
            if total > capacity:
                raise PromptTooLongError(
                    f"prompt + max_tokens = {total} tokens exceeds the KV cache ({capacity} tokens)")
        else:  # hybrid: the windowed group also holds up to its window plus one prompt chunk
            pages = bm.pages_for_tokens(total, self.config.max_num_batched_tokens)
            if pages > bm.num_blocks:
                raise PromptTooLongError(f"prompt + max_tokens = {total} tokens exceeds the KV cache ({pages} blocks "
                                         f"over both layer groups, {bm.num_blocks} in the pool)")
        if not self.config.enable_chunked_prefill and total > self.config.max_num_batched_tokens:
            raise PromptTooLongError(f"{total} tokens exceed max_num_batched_tokens without chunked prefill")
        if req.params.n > 1:
            if req.params.n > self.config.max_num_seqs:
                raise ValueError(f"n={req.params.n} exceeds max_num_seqs={self.config.max_num_seqs}")
            if self.kv_mgr.policy is not None:
                raise ValueError(f"n={req.params.n}: parallel sampling is not supported with KV eviction")

    def _new_sequence(self, req: Request, stream: bool) -> Sequence:
        """The engine's record of a validated request (detokenized per step when streamed)."""
        seq = Sequence(
            request_id=req.request_id,
            prompt_token_ids=list(req.prompt_token_ids),
            params=req.params,
            arrival_time=req.arrival_time or time.time(),
            prompt=req.prompt,
            stream=stream,
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
            priority=req.priority,
        )
        if stream or seq.params.stop:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids)
        if seq.params.structured_outputs is not None:
            seq.grammar = self.grammar_compiler.matcher(seq.params.structured_outputs)
        seq.speculative = self.speculates(seq.params)
        return seq

    def add_request(self, prompt: PromptLike, params: SamplingParams | None = None, *,
                    request_id: str | None = None, stream: bool = True, bounded: bool = True) -> str:
        """Queue a request; returns its id.

        ``stream=False`` skips per-step detokenization (the text is produced once at the
        end). ``bounded=False`` bypasses the waiting-queue bound (offline batches).
        Raises :class:`QueueFullError`, :class:`PromptTooLongError` or ``ValueError``.
        """
        req = self.make_request(prompt, params, request_id)
        if req.request_id in self._seqs:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        seq = self._new_sequence(req, stream)
        if bounded:
            self.scheduler.add(seq)
        else:
            seq_max, self.scheduler.max_waiting = self.scheduler.max_waiting, 1 << 62
            try:
                self.scheduler.add(seq)
            finally:
                self.scheduler.max_waiting = seq_max
        self._seqs[seq.request_id] = seq
        return seq.request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is; its blocks are freed now and a final output with
        ``finish_reason=ABORT`` comes out of the next :meth:`step`. False if unknown."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        aborted = [s for s in (seq.group.seqs if seq.group is not None else [seq]) if self.scheduler.abort(s)]
        if not aborted:
            return False
        now = time.time()
        for s in aborted:
            s.finish_time = now
            self.finish_text(s)
            self._pending.append(self.make_output(s))
        del self._seqs[request_id]
        self._counters.requests_finished_total += 1
        return True

    def abort_all(self) -> list[str]:
        """Abort every unfinished request; returns their ids."""
        ids = list(self._seqs)
        for rid in ids:
            self.abort(rid)
        return ids

    def fail_all(self, *, waiting_too: bool = True) -> list[str]:
        """End the requests a failed step leaves behind: every unfinished one, or with
        ``waiting_too=False`` only those already scheduled (waiting ones keep their place).
        Their blocks return to the pool; the step in flight and the outputs not yet
        returned for them are dropped (the caller tells each request's owner why).
        Returns their ids."""
        self._inflight = None
        ids = [rid for rid, seq in self._seqs.items() if waiting_too or seq.status is not SequenceStatus.WAITING]
        for rid in ids:
            self.abort(rid)
        failed = set(ids)
        self._pending = [out for out in self._pending if out.request_id not in failed]
        return ids

    def _inject_fault(self, path: str) -> None:
        """``EngineConfig.fault_file``: raise the fault the file names, once per file."""
        try:
            kind = Path(path).read_text().strip()
            os.unlink(path)
        except FileNotFoundError:
            return
        log.warning("injecting an engine fault from %s: %s", path, kind or "error")
        if kind == "oom":
            raise torch.cuda.OutOfMemoryError("injected out-of-memory fault")
        raise RuntimeError(f"injected engine fault ({kind or 'error'})")

    def has_unfinished_requests(self) -> bool:
        return bool(self._seqs) or bool(self._pending) or self._inflight is not None

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._seqs)

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns a snapshot for every request that progressed
        (a new token, or finished) and for requests aborted since the last step.

        With :attr:`pipeline` on (the default on CUDA), the next step is launched on the
        device before this one's text is processed, so detokenization, stop strings and
        output objects overlap the GPU. Each call still returns one step's outputs; a
        request added between calls joins the step after the one already running, and a
        request that ends on a stop string has already been given a row in the running
        step (its token is dropped). With :attr:`async_scheduling` on as well, the next step
        is launched even before this one's tokens are read back (see :meth:`_launch_ahead`)."""
        if self.config.fault_file is not None:
            self._inject_fault(self.config.fault_file)
        outputs, self._pending = self._pending, []
        flight, self._inflight = self._inflight, None
        if flight is None:
            flight = self._launch()
            if flight is None:
                return outputs
        ahead = self._launch_ahead(flight) if self.async_scheduling else None
        done = self._collect(flight)
        if ahead is not None:
            self._inflight = ahead
        elif self.pipeline:
            self._inflight = self._launch()
        self._emit(done, outputs)
        return outputs

    def _launch_ahead(self, flight: _Flight) -> _Flight | None:
        """Launch the step after ``flight`` before its tokens are read back (vLLM's async
        scheduling): the device then goes from one step to the next without waiting for the
        host to collect, schedule and stage in between.

        The scheduler advances past ``flight`` now, and each sequence that sampled in it
        gets a placeholder token (``PLACEHOLDER_TOKEN``) that ``_collect`` replaces with the
        sampled one; the new step reads those tokens straight from the device. It qualifies
        when every running sequence sampled in ``flight`` and none needs its tokens on the
        host (a grammar) or would need a preemption; new requests may be admitted beside
        the decode rows (their prompts are known). Otherwise None, and the caller launches
        after collecting, as before. Sequences whose token in ``flight`` is their last by
        length get no row; those that end on it by a stop token or string have a row whose
        token is dropped."""
        pending = flight.pending
        if type(pending) is not PendingSample or flight.verify or flight.prompt_scores is not None:
            return None
        scheduler = self.scheduler
        running = scheduler.running
        if not running:
            return None
        row_of = {id(seq): i for i, seq in enumerate(flight.sampling)}
        if any(id(seq) not in row_of or seq.grammar is not None for seq in running):
            return None
        scheduler.commit(flight.scheduled, flight.collector)
        flight.committed = True
        bm = scheduler.bm
        max_len = self.max_model_len
        growing = [seq for seq in running if len(seq.token_ids) + 1 < min(seq.token_limit, max_len)]
        # Decode rows are scheduled before admissions, so only they could need a preemption.
        if not growing or sum(bm.blocks_needed(seq, 1) for seq in growing) > bm.num_free_blocks:
            return None
        for seq in growing:
            seq.token_ids.append(PLACEHOLDER_TOKEN)
        sched = scheduler.schedule()
        assert not sched.preempted and all(
            s.num_new_tokens == 1 and id(s.seq) in row_of
            for s in sched.scheduled if s.seq.token_ids[-1] == PLACEHOLDER_TOKEN
        ), "a step launched ahead feeds decode rows of sampled sequences only"
        ahead = self._launch(sched, fed=(row_of, pending.token_ids))
        if ahead is not None:
            self.num_steps_launched_ahead += 1
        return ahead

    @staticmethod
    def _fed_tokens(seqs: list[Sequence], row_of: dict[int, int], tokens: torch.Tensor
                    ) -> tuple[list[int], torch.Tensor] | None:
        """For the rows of ``seqs`` whose last token is a placeholder: their indices and
        those tokens, gathered from the previous step's sampled ``tokens`` (``row_of``: a
        sequence's row there). None when no row has one."""
        rows = [i for i, seq in enumerate(seqs) if seq.token_ids[-1] == PLACEHOLDER_TOKEN]
        if not rows:
            return None
        src = [row_of[id(seqs[i])] for i in rows]
        if src == list(range(len(src))):  # the common case: same sequences, same order
            return rows, tokens if len(src) == tokens.shape[0] else tokens[:len(src)]
        return rows, tokens.index_select(0, _to_device(src, torch.long, tokens.device))

    def _launch(self, sched: SchedulerOutput | None = None,
                fed: tuple[dict[int, int], torch.Tensor] | None = None) -> _Flight | None:
        """Schedule a step (or take ``sched``), run the model and queue the sampling (no
        wait on the device). ``fed``: a step launched ahead's map from a sequence to its row
        in the previous step and that step's sampled tokens, for the rows they feed."""
        scheduler = self.scheduler
        if sched is None:
            sched = scheduler.schedule()
        counters = self._counters
        counters.preemptions_total = scheduler.num_preemptions
        if not sched:
            return None
        scheduled = sched.scheduled
        sampling: list[Sequence] = []
        forks: list[ScheduledSeq] = []
        for s in scheduled:
            seq = s.seq
            if s.samples:
                sampling.append(seq)
                if seq.params.n > 1 and seq.group is None:
                    forks.append(s)
            if not seq.prompt_counted:
                seq.prompt_counted = True
                counters.prompt_tokens_total += len(seq.prompt_token_ids)
            prompt_left = len(seq.prompt_token_ids) - seq.num_computed_tokens
            if prompt_left > 0:
                counters.prefill_tokens_total += min(prompt_left, s.num_new_tokens)
        spec = self.spec
        if spec is not None:
            spec.propose(scheduled)
        fed_rows = None
        if fed is not None:
            fed_rows = self._fed_tokens([s.seq for s in scheduled], *fed)
        logits, collector = (self.runner.execute(scheduled) if fed_rows is None
                             else self.runner.execute(scheduled, fed_rows))
        logits, prompt_scores = _PromptScores.split(scheduled, logits)
        verify = [s for s in scheduled if s.draft] if spec is not None else None
        if verify:
            logits, pending_verify = spec.launch(logits, [s for s in scheduled if s.samples])
            sampling = [s.seq for s in scheduled if s.samples and not s.draft]
        if forks:
            logits, sampling = self._fork(forks, logits, sampling)
        last_tokens = None
        if fed_rows is not None and not forks and len(fed_rows[0]) == len(scheduled) == len(sampling):
            last_tokens = fed_rows[1]  # every row fed and sampling, in order: the same tokens
        elif fed is not None and sampling:
            held = self._fed_tokens(sampling, *fed)
            if held is not None:  # penalties read a row's placeholder token from here
                rows, tokens = held
                last_tokens = tokens if len(rows) == len(sampling) else torch.zeros(
                    len(sampling), dtype=tokens.dtype, device=tokens.device).index_copy_(
                    0, _to_device(rows, torch.long, tokens.device), tokens)
        pending = None
        if sampling:
            pending = (self.sampler.launch(logits, sampling) if last_tokens is None
                       else self.sampler.launch(logits, sampling, last_tokens))
        if verify:
            pending_verify.plain = pending
            return _Flight(scheduled, sampling + [s.seq for s in verify], pending_verify, collector, verify,
                           prompt_scores)
        return _Flight(scheduled, sampling, pending, collector, prompt_scores=prompt_scores)

    def _fork(self, forks: list[ScheduledSeq], logits: torch.Tensor, sampling: list[Sequence]
              ) -> tuple[torch.Tensor, list[Sequence]]:
        """Split each request in ``forks`` (prompt just prefilled, ``params.n > 1``) into its
        choices: the children share the prompt's full KV blocks, get a copy of the partial
        last one, and sample their first token from the parent's logits row."""
        fork_at = {id(s.seq): s for s in forks}
        rows: list[int] = []
        out: list[Sequence] = []
        copies: list[tuple[int, int]] = []
        for row, seq in enumerate(sampling):
            rows.append(row)
            out.append(seq)
            s = fork_at.get(id(seq))
            if s is None:
                continue
            computed = seq.num_computed_tokens + s.num_new_tokens  # what the step leaves computed
            seeds = seq.params.seed
            group = seq.group = SequenceGroup([seq])
            for i in range(1, seq.params.n):
                params = seq.params if seeds is None else dataclasses.replace(seq.params, seed=seeds + i)
                child = seq.fork(i, params)
                copies.extend(self.block_manager.fork(seq, child, computed))
                if child.stream or params.stop:
                    child.detokenizer = IncrementalDetokenizer(self.tokenizer, child.prompt_token_ids)
                if seq.grammar is not None:
                    child.grammar = seq.grammar.fork()
                child.group = group
                group.seqs.append(child)
                self.scheduler.running.append(child)
                rows.append(row)
                out.append(child)
            group.unreported = len(group.seqs)
        self.runner.copy_blocks(copies)
        index = torch.tensor(rows, dtype=torch.long).to(logits.device, non_blocking=True)
        return logits.index_select(0, index), out

    def _collect(self, flight: _Flight) -> list[tuple[Sequence, int | None, bool]]:
        """Wait for a step's tokens, append them and end the sequences that stop on a token
        id or a length (so that the next step leaves them out). Returns what is left to do
        per sequence: ``(seq, token whose text is still to be processed or None, ended)``."""
        result = flight.pending.wait() if flight.pending is not None else None
        if flight.prompt_scores is not None:
            flight.prompt_scores.record()
        scheduler = self.scheduler
        if flight.verify:
            # Keep the K/V of the accepted drafts only (the scheduler rolls back the rest).
            for s, a in zip(flight.verify, flight.pending.accepted, strict=True):
                s.num_new_tokens = 1 + a
        if not flight.committed:
            scheduler.commit(flight.scheduled, flight.collector)
        if result is None:
            return []
        now = time.time()
        max_len = self.max_model_len
        done: list[tuple[Sequence, int | None, bool]] = []
        appended = 0
        for seq, new, lp in zip(flight.sampling, result.token_ids, result.logprobs, strict=True):
            if seq.status is SequenceStatus.FINISHED:
                continue  # aborted, or ended on a stop string, while this step ran
            tokens = seq.token_ids
            if lp is not None and seq.logprobs is not None:
                seq.logprobs.append(lp)
            if seq.first_token_time is None:
                seq.first_token_time = now
            # One token, or a verify row's accepted drafts and the token after them: those
            # past a stop are dropped.
            if type(new) is int:
                new = (new,)
                if tokens[-1] == PLACEHOLDER_TOKEN:  # the token a step launched ahead already reads
                    tokens.pop()
            last = len(new) - 1
            for j, token in enumerate(new):
                tokens.append(token)
                appended += 1
                grammar_done = seq.grammar is not None and self._advance_grammar(seq, token)
                if token in seq.stop_ids or len(tokens) >= seq.token_limit or len(tokens) >= max_len or grammar_done:
                    # The last token: with text, a stop string in it takes precedence.
                    reason = self.process_token(seq, token) if seq.detokenizer is not None else (
                        FinishReason.STOP if token in seq.stop_ids or grammar_done else FinishReason.LENGTH)
                    reason = reason or FinishReason.STOP  # the grammar is complete (ignore_eos)
                    self._end_sequence(seq, reason, now)
                    done.append((seq, None, True))
                    break
                if j != last:
                    # An accepted draft (never pipelined): its text now, in case it stops.
                    if seq.detokenizer is not None and self.process_token(seq, token) is not None:
                        self._end_sequence(seq, FinishReason.STOP, now)
                        done.append((seq, None, True))
                        break
                elif seq.detokenizer is not None:
                    done.append((seq, token, False))  # may still end on a stop string
                elif seq.stream:
                    done.append((seq, None, False))
        self._counters.generation_tokens_total += appended
        return done

    @staticmethod
    def _advance_grammar(seq: Sequence, token: int) -> bool:
        """Feed ``token`` to the sequence's matcher; True once the grammar has terminated."""
        if not seq.grammar.accept_token(token):  # the mask forbade it: nothing valid was left
            log.error("%s: token %d is outside the grammar; ending the sequence", seq.request_id, token)
            return True
        return seq.grammar.is_terminated()

    def _emit(self, done: list[tuple[Sequence, int | None, bool]], outputs: list[RequestOutput]) -> None:
        """The text side of a collected step: detokenize, stop strings, output snapshots."""
        for seq, token, ended in done:
            if token is not None and self.process_token(seq, token) is not None:
                # A stop string. (In a pipelined step the sequence also has a row in the
                # step now running; its token is dropped when that step is collected.)
                self._end_sequence(seq, FinishReason.STOP, time.time())
                ended = True
            if ended:
                self.finish_text(seq)
            if ended or seq.stream:
                outputs.append(self.make_output(seq))

    def _end_sequence(self, seq: Sequence, reason: FinishReason, now: float) -> None:
        """Retire ``seq`` from scheduling (its blocks are freed now); its text is finished later."""
        seq.finish_time = now
        self.scheduler.finish(seq, reason)
        if seq.group is None or seq.group.all_finished():
            self._seqs.pop(seq.request_id, None)
            self._counters.requests_finished_total += 1

    # Per-token output processing, public for engines whose sequences live outside the
    # scheduler (engine/distributed.py): apply a sampled token, finalize text, snapshot.
    @property
    def counters(self) -> EngineStats:
        """The engine's running counters (tokens, finished requests), updated in place."""
        return self._counters

    def process_token(self, seq: Sequence, token: int) -> FinishReason | None:
        """Apply stop conditions to ``token`` (already appended to ``seq``); the finish reason or None."""
        by_token = token in seq.stop_ids
        if seq.detokenizer is not None and not by_token:
            delta = seq.detokenizer.step([token])
            if delta:
                p = seq.params
                before = len(seq.text)
                seq.text += delta
                if p.stop and len(seq.token_ids) - len(seq.prompt_token_ids) >= p.min_tokens:
                    hit = find_stop(seq.text, p.stop, before)
                    if hit is not None:
                        i, stop = hit
                        seq.text = seq.text[:i + len(stop)] if p.include_stop_str_in_output else seq.text[:i]
                        seq.detokenizer = None  # the text is final
                        return FinishReason.STOP
        if by_token:
            return FinishReason.STOP
        n = len(seq.token_ids)
        if n >= seq.token_limit or n >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def finish_text(self, seq: Sequence) -> None:
        """Make ``seq.text`` final: flush the stream's held-back bytes, or decode in one go."""
        if seq.detokenizer is not None:
            seq.text += seq.detokenizer.flush()
            seq.detokenizer = None
        elif not seq.stream and not seq.params.stop:
            out = seq.output_token_ids
            if seq.finish_reason is FinishReason.STOP and out and (
                out[-1] in seq.params.stop_token_ids or out[-1] in seq.eos_token_ids
            ):
                out = out[:-1]
            seq.text = decode_output(self.tokenizer, seq.prompt_token_ids, out)

    def make_output(self, seq: Sequence) -> RequestOutput:
        """A :class:`RequestOutput` snapshot of ``seq`` with the deltas since the last one."""
        done = finished = seq.status is SequenceStatus.FINISHED
        group = seq.group
        if done and group is not None:  # the request ends with the last choice's last output
            if not seq.final_reported:
                seq.final_reported = True
                group.unreported -= 1
            finished = group.unreported == 0
        text = seq.text
        stops = seq.params.stop
        if stops and not done:
            held = stop_holdback(text, stops)
            if held:
                text = text[:len(text) - held]
        tokens = seq.token_ids
        n_prompt, n = len(seq.prompt_token_ids), len(tokens)
        delta_ids = tokens[n_prompt + seq.emitted_token_count:]
        delta_text = text[seq.emitted_text_len:]
        seq.emitted_token_count = n - n_prompt
        seq.emitted_text_len = len(text)
        lps = seq.logprobs
        ttft = seq.first_token_time - seq.arrival_time if seq.first_token_time is not None else None
        latency = seq.finish_time - seq.arrival_time if done and seq.finish_time is not None else None
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            # Views of the totals (token_ids and logprobs only ever grow): a snapshot
            # without copying the whole output for every streamed token.
            token_ids=ListView(tokens, n_prompt, n),
            text=text,
            delta_token_ids=delta_ids,
            delta_text=delta_text,
            finished=finished,
            finish_reason=seq.finish_reason if done else None,
            logprobs=ListView(lps, 0, len(lps)) if lps is not None else None,
            time_to_first_token=ttft,
            latency=latency,
            index=seq.choice_index,
            prompt_logprobs=seq.prompt_logprobs,
        )

    # ------------------------------------------------------------------ batch API
    def generate(
        self,
        prompts: PromptLike | SequenceABC[PromptLike],
        params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, or :class:`Request`) and return the
        final outputs in prompt order (a request with ``params.n > 1`` gives its ``n``
        choices in a row, by ``index``). Requests beyond the queue bound wait their turn."""
        if isinstance(prompts, (str, Request)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params_list = [params] * len(prompts)
        else:
            params_list = list(params)
            if len(params_list) != len(prompts):
                raise ValueError(f"{len(params_list)} SamplingParams for {len(prompts)} prompts")
        ids = [self.add_request(p, sp, stream=False, bounded=False) for p, sp in zip(prompts, params_list, strict=True)]
        wanted = set(ids)
        final: dict[str, RequestOutput] = {}
        choices: dict[str, dict[int, RequestOutput]] = {i: {} for i in ids}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generate")
        while len(final) < len(ids):
            for out in self.step():
                if out.request_id not in wanted:
                    continue
                if out.finish_reason is not None or out.finished:
                    choices[out.request_id][out.index] = out
                if out.finished:
                    final[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        if self._inflight is not None and not self._seqs:
            # A pipelined step still running for requests that have all ended (a stop
            # string seen after it was launched): nothing in it to emit.
            flight, self._inflight = self._inflight, None
            self._collect(flight)
        return [out for i in ids for _, out in sorted(choices[i].items())]

    # ------------------------------------------------------------------ stats
    def stats(self) -> EngineStats:
        """A snapshot of gauges and counters (cheap; safe to call from another thread)."""
        c = self._counters
        ratio, saved = 1.0, 0
        mgr = self.kv_mgr
        if mgr.quantized or mgr.policy is not None:
            kv = mgr.stats(list(self.scheduler.running), self.block_manager)
            ratio, saved = kv["kv_compression_ratio"], kv["kv_bytes_saved"]
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_total=self.block_manager.num_blocks,
            kv_blocks_used=self.block_manager.num_used_blocks,
            preemptions_total=self.scheduler.num_preemptions,
            prompt_tokens_total=c.prompt_tokens_total,
            generation_tokens_total=c.generation_tokens_total,
            requests_finished_total=c.requests_finished_total,
            prefix_cache_queries_total=self.block_manager.prefix_cache_query_tokens,
            prefix_cache_hits_total=self.block_manager.prefix_cache_hit_tokens,
            prefill_tokens_total=c.prefill_tokens_total,
            kv_blocks_evicted_total=self.block_manager.blocks_dropped,
            kv_compression_ratio=ratio,
            kv_bytes_saved=saved,
            **self._spec_stats(),
        )

    def _spec_stats(self) -> dict[str, int]:
        if self.spec is None:
            return {}
        c = self.spec.counters
        return {"spec_decode_num_drafts_total": c.num_drafts,
                "spec_decode_num_draft_tokens_total": c.num_draft_tokens,
                "spec_decode_num_accepted_tokens_total": c.num_accepted_tokens}
