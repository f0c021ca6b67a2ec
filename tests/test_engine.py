"""The engine end to end on a tiny random Llama: HF-exact greedy output under continuous
batching, chunked prefill, prefix caching and preemption; seeds; stops; the async API."""

from __future__ import annotations

import asyncio

import pytest
import torch

from stream_attention.engine import (
    AsyncEngine,
    EngineConfig,
    FinishReason,
    LLMEngine,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
)


@pytest.fixture(scope="module")
def tiny():
    """A tiny Llama with peaked logits (large init) so greedy ties cannot flip, and the
    shipped byte-level BPE tokenizer."""
    from transformers import LlamaForCausalLM

    from stream_attention.models.default import default_config, load_tokenizer

    cfg = default_config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
    ref = LlamaForCausalLM(cfg).eval()
    ref.load_state_dict(model.state_dict())
    ref.generation_config.eos_token_id = None  # compare full lengths, as ignore_eos does
    return model, ref, load_tokenizer()


def _engine(tiny, **overrides) -> LLMEngine:
    model, _, tok = tiny
    cfg = dict(num_kv_blocks=64, block_size=8, max_num_batched_tokens=256, use_cuda_graphs=False)
    cfg.update(overrides)
    return LLMEngine(model, tok, **cfg)


def _hf_greedy(ref, prompt: list[int], n: int) -> list[int]:
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 4096, (n,), generator=g).tolist() for n in lengths]


GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_greedy_matches_hf_with_midflight_arrivals_and_chunked_prefill(tiny, backend):
    _, ref, _ = tiny
    # A 16-token step budget splits the longer prompts into chunks that share steps with
    # other requests' decode tokens.
    eng = _engine(tiny, attention_backend=backend, max_num_batched_tokens=16)
    prompts = _prompts([3, 21, 40, 9, 1, 17])
    ids = [eng.add_request(p, GREEDY, stream=False) for p in prompts[:3]]
    final = {}
    steps = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out
        steps += 1
        if steps in (2, 5, 9) and len(ids) < len(prompts):  # arrivals while others decode
            ids.append(eng.add_request(prompts[len(ids)], GREEDY, stream=False))
    assert len(ids) == len(prompts)
    for rid, p in zip(ids, prompts, strict=True):
        assert final[rid].token_ids == _hf_greedy(ref, p, 10), rid
        assert final[rid].finish_reason is FinishReason.LENGTH
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_greedy_matches_hf_after_forced_preemption(tiny):
    _, ref, _ = tiny
    # 12 blocks of 4 tokens cannot hold five ~30-token sequences at once.
    eng = _engine(tiny, attention_backend="sdpa", num_kv_blocks=12, block_size=4, max_num_batched_tokens=64)
    prompts = _prompts([14, 19, 11, 23, 8], seed=1)
    params = SamplingParams(max_tokens=14, ignore_eos=True)
    outs = eng.generate(prompts, params)
    assert eng.stats().preemptions_total > 0
    for out, p in zip(outs, prompts, strict=True):
        assert out.token_ids == _hf_greedy(ref, p, 14)
    assert eng.block_manager.num_free_blocks == 12


def test_preemption_and_prefix_cache_on_triton_path(tiny):
    _, ref, _ = tiny
    eng = _engine(tiny, attention_backend="triton", num_kv_blocks=9, block_size=4, max_num_batched_tokens=12)
    shared = _prompts([12], seed=2)[0]
    prompts = [shared + p for p in _prompts([3, 6, 1], seed=3)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    outs = eng.generate(prompts, params)
    stats = eng.stats()
    assert stats.preemptions_total > 0 and stats.prefix_cache_hits_total > 0
    for out, p in zip(outs, prompts, strict=True):
        assert out.token_ids == _hf_greedy(ref, p, 8)
    assert stats.kv_blocks_used == 0


def test_seeded_sampling_is_reproducible_in_any_batch(tiny):
    eng = _engine(tiny, attention_backend="sdpa")
    p = _prompts([7, 12, 5], seed=4)
    sp = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = eng.generate([p[0]], sp)[0].token_ids
    mixed = eng.generate(p, [sp, SamplingParams(max_tokens=5, temperature=1.0, ignore_eos=True),
                             SamplingParams(max_tokens=20, temperature=0.7, seed=9, ignore_eos=True)])[0]
    assert mixed.token_ids == alone
    other = eng.generate([p[0]], SamplingParams(max_tokens=12, temperature=0.9, seed=99, ignore_eos=True))[0]
    assert other.token_ids != alone


def test_stop_strings_tokens_and_streamed_deltas(tiny):
    _, _, tok = tiny
    eng = _engine(tiny, attention_backend="sdpa")
    prompt = _prompts([6], seed=5)[0]
    free_run = eng.generate([prompt], SamplingParams(max_tokens=24, ignore_eos=True))[0]
    text = free_run.text
    assert text == tok.decode(free_run.token_ids, skip_special_tokens=True)
    stop = text[5:9]
    # Stream with a stop string: deltas add up to the final text, which ends before the stop.
    rid = eng.add_request(prompt, SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop]))
    streamed, last = "", None
    while eng.has_unfinished_requests():
        for out in eng.step():
            assert out.request_id == rid
            streamed += out.delta_text
            assert not out.text.endswith(stop[:1]) or out.finished or stop[:1] not in out.text[-1:]
            last = out
    assert last.finished and last.finish_reason is FinishReason.STOP
    assert last.text == text[:text.index(stop)] == streamed
    with_stop = eng.generate([prompt], SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop],
                                                     include_stop_str_in_output=True))[0]
    assert with_stop.text == text[:text.index(stop) + len(stop)]
    # A stop token id ends the request on that token.
    stop_tok = free_run.token_ids[3]
    cut = eng.generate([prompt], SamplingParams(max_tokens=24, ignore_eos=True, stop_token_ids=[stop_tok]))[0]
    assert cut.token_ids == free_run.token_ids[:free_run.token_ids.index(stop_tok) + 1]
    assert cut.finish_reason is FinishReason.STOP


def test_logprobs_and_validation(tiny):
    eng = _engine(tiny, attention_backend="sdpa", max_waiting=1)
    out = eng.generate([[5, 6, 7]], SamplingParams(max_tokens=3, logprobs=2, ignore_eos=True))[0]
    assert len(out.logprobs) == 3 and all(lp.top and len(lp.top) == 2 for lp in out.logprobs)
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    with pytest.raises(PromptTooLongError):
        eng.add_request([5] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError):
        eng.add_request([5, 99999], SamplingParams())
    with pytest.raises(ValueError):
        eng.add_request([5], SamplingParams(top_p=0.0))
    eng.add_request([5], SamplingParams())
    with pytest.raises(QueueFullError):
        eng.add_request([6], SamplingParams())
    assert eng.abort(next(iter(eng._seqs)))
    (aborted,) = eng.step()
    assert aborted.finish_reason is FinishReason.ABORT and eng.stats().kv_blocks_used == 0


def test_async_engine_streams_aborts_and_shuts_down(tiny):
    model, _, tok = tiny

    async def main():
        eng = AsyncEngine(model, tok, config=EngineConfig(num_kv_blocks=64, block_size=8, attention_backend="sdpa",
                                                          max_waiting=8, use_cuda_graphs=False))
        await eng.start()

        async def consume(prompt, n, stop_after=None):
            got, text, last = [], "", None
            async for out in eng.stream(prompt, SamplingParams(max_tokens=n, ignore_eos=True)):
                got += out.delta_token_ids
                text += out.delta_text
                last = out
                if stop_after is not None and len(got) >= stop_after:
                    break  # a client disconnect
            return got, text, last

        results = await asyncio.gather(
            consume("Hello, world", 12), consume("naïve café ✓", 9), consume("abort me", 40, stop_after=3),
        )
        (g0, t0, l0), (g1, t1, l1), (g2, _, l2) = results
        assert g0 == l0.token_ids and t0 == l0.text and l0.finished and len(g0) == 12
        assert g1 == l1.token_ids and t1 == l1.text and len(g1) == 9
        assert len(g2) == 3 and not l2.finished
        # An explicit abort of a live request ends its stream with ABORT.
        agen = eng.stream("long one", SamplingParams(max_tokens=60, ignore_eos=True))
        first = await agen.__anext__()
        eng.abort(first.request_id)
        rest = [o async for o in agen]
        assert rest and rest[-1].finish_reason is FinishReason.ABORT
        with pytest.raises(PromptTooLongError):
            await eng.generate("x", SamplingParams(max_tokens=10_000))
        for _ in range(100):  # the disconnect's abort is processed by the loop thread
            if eng.stats().kv_blocks_used == 0 and eng.stats().running == 0:
                break
            await asyncio.sleep(0.02)
        assert eng.stats().kv_blocks_used == 0
        final = await eng.generate("after", SamplingParams(max_tokens=4, ignore_eos=True))
        assert final.finished and len(final.token_ids) == 4
        await eng.shutdown()
        assert not eng.is_running

    asyncio.run(main())


def test_default_model_runs_when_none_is_given():
    eng = LLMEngine(None, attention_backend="sdpa", num_kv_blocks=32, use_cuda_graphs=False)
    out = eng.generate("Hi", SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and eng.model_name == "stream-attention-default"


def _assert_hf_greedy_on_gpu(tiny, outs, prompts, n: int) -> None:
    """Each output equals HF greedy on the GPU; the module-scoped models go back to the CPU."""
    model, ref, _ = tiny
    dev = torch.device("cuda")
    try:
        ref.to(dev)
        for out, p in zip(outs, prompts, strict=True):
            got = ref.generate(torch.tensor([p], device=dev), max_new_tokens=n, do_sample=False, pad_token_id=0)
            assert out.token_ids == got[0, len(p):].tolist()
    finally:
        model.cpu()
        ref.cpu()


@pytest.mark.gpu
def test_cuda_graph_decode_matches_hf(tiny):
    """On a GPU: Triton kernels, CUDA-graph decode, fp32 so greedy must agree exactly."""
    model, _, tok = tiny
    dev = torch.device("cuda")
    eng = LLMEngine(model.to(dev), tok, num_kv_blocks=64, block_size=16, max_num_batched_tokens=24, max_num_seqs=8)
    assert eng.runner.graphs, "decode graphs were not captured"
    prompts = _prompts([3, 21, 40, 9, 30, 17], seed=6)
    outs = eng.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
    assert eng.async_scheduling and eng.num_steps_launched_ahead >= 10  # graph steps fed on the device
    _assert_hf_greedy_on_gpu(tiny, outs, prompts, 20)


def test_decode_staging_pads_rows_whatever_the_previous_layout():
    """Graph inputs for 44 sequences in the 48-row layout after a step in the 16-row one
    (whose slots sat where the 48-row ids go): padding rows must read token 0, position 0,
    the scratch slot and length 0, never the older values (out-of-range token ids)."""
    from types import SimpleNamespace as NS

    import numpy as np

    from stream_attention.engine.model_runner import DecodeStaging

    s64 = np.full(3 * 48, -1, dtype=np.int64)
    s32 = np.full(48 + 1 + 48 * 4, -1, dtype=np.int32)
    staging = DecodeStaging(s64, s32, block_size=16, max_blocks=4, scratch_slot=999)

    def decoding(k: int, first_id: int) -> list:
        return [NS(seq=NS(num_computed_tokens=20, num_dropped_tokens=0, token_ids=list(range(first_id, first_id + 21)),
                          block_table=[100 + i, 200 + i])) for i in range(k)]

    staging.fill(decoding(16, 7), 16)
    assert (s64[32:48] >= 16 * 200).all()  # the 16-row layout's slots, where 48-row ids go
    staging.fill(decoding(44, 3), 48)
    assert (s64[:44] == 23).all() and (s64[44:48] == 0).all()
    assert (s64[48:92] == 20).all() and (s64[92:96] == 0).all()
    assert s64[96:140].tolist() == [(200 + i) * 16 + 4 for i in range(44)] and (s64[140:144] == 999).all()
    assert (s32[:44] == 21).all() and (s32[44:48] == 0).all()
    tables = s32[48:48 + 48 * 4].reshape(48, 4)
    assert tables[:44, :2].tolist() == [[100 + i, 200 + i] for i in range(44)]


@pytest.mark.gpu
def test_cuda_graph_decode_under_heavy_preemption_matches_hf(tiny):
    """A pool far too small for the batch: preemptions, recomputes in small chunks (steps
    in which no row samples) between pipelined graph replays. Greedy must still agree."""
    model, _, tok = tiny
    dev = torch.device("cuda")
    eng = LLMEngine(model.to(dev), tok, num_kv_blocks=24, block_size=8, max_num_batched_tokens=9, max_num_seqs=16)
    assert eng.runner.graphs and eng.pipeline
    prompts = _prompts([3, 21, 40, 9, 30, 17, 5, 26, 12, 33, 8, 19], seed=8)
    outs = eng.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    assert eng.stats().preemptions_total > 0 and eng.num_steps_launched_ahead > 0
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    _assert_hf_greedy_on_gpu(tiny, outs, prompts, 24)


def _drive_choices(eng: LLMEngine, requests, arrive_at) -> tuple[dict, int]:
    """Stream ``requests`` (``(prompt, params)``) through ``eng.step()``, adding request i
    before call ``arrive_at[i]``; returns per ``(request, choice index)`` the concatenated
    deltas and the last output, and the number of calls."""
    got: dict = {}
    ids: dict = {}
    calls = 0
    while len(ids) < len(requests) or eng.has_unfinished_requests():
        for i, (prompt, params) in enumerate(requests):
            if i not in ids and arrive_at[i] <= calls:
                ids[i] = eng.add_request(prompt, params)
        for out in eng.step():
            key = (out.request_id, out.index)
            toks, text, _ = got.get(key, ([], "", None))
            got[key] = (toks + out.delta_token_ids, text + out.delta_text, out)
        calls += 1
    return {(i, c): got[(rid, c)] for i, rid in ids.items() for c in range(requests[i][1].n)}, calls


def _drive(eng: LLMEngine, requests, arrive_at) -> tuple[dict, int]:
    """:func:`_drive_choices` for requests of one choice each, keyed by request."""
    got, calls = _drive_choices(eng, requests, arrive_at)
    return {i: v for (i, _), v in got.items()}, calls



# Pipelined and synchronous runs batch different rows into each step, so the logits of one
# row come from GEMMs of different shapes: with several OpenMP threads the fp32 sums are
# ordered differently and logprobs move by ~1e-6 (seen 4e-6 on a 2-core machine). Token ids
# must still be identical; the values agree to 1e-4, far below any real sampling difference.
LOGPROB_ATOL = 1e-4


def _assert_logprobs_close(got, want, where) -> None:
    if got is None or want is None:
        assert got is want, where
        return
    assert len(got) == len(want), where
    for g, w in zip(got, want, strict=True):
        assert g.token_id == w.token_id, where
        assert abs(g.logprob - w.logprob) <= LOGPROB_ATOL, (where, g.logprob, w.logprob)
        assert (g.top is None) == (w.top is None), where
        if g.top is not None:
            assert g.top.keys() == w.top.keys(), where
            for tid, lp in g.top.items():
                assert abs(lp - w.top[tid]) <= LOGPROB_ATOL, (where, tid, lp, w.top[tid])


def test_pipelined_steps_give_the_outputs_of_synchronous_steps(tiny):
    """``pipeline_steps``: the next step is launched before this one's text is processed.
    Outputs must not change: greedy, seeded sampling, stop strings (found one step late,
    the extra row's token is dropped), stop ids, logprobs, penalties; no block leaks."""
    _, ref, _ = tiny
    prompts = _prompts([5, 17, 9, 30, 3, 12], seed=11)
    probe = _engine(tiny, attention_backend="sdpa")
    free = probe.generate(prompts[1], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    requests = [
        (prompts[0], SamplingParams(max_tokens=12, ignore_eos=True)),
        (prompts[1], SamplingParams(max_tokens=20, ignore_eos=True, stop=[free.text[6:9]])),
        (prompts[2], SamplingParams(max_tokens=15, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True, logprobs=2)),
        (prompts[3], SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=[free.token_ids[4]],
                                    repetition_penalty=1.2, frequency_penalty=0.3)),
        (prompts[4], SamplingParams(max_tokens=9, ignore_eos=True, stop=["\n\nUser:"])),
        (prompts[5], SamplingParams(max_tokens=14, temperature=1.0, top_k=20, seed=3, ignore_eos=True)),
    ]
    arrive_at = [0, 0, 1, 3, 4, 8]
    results = {}
    for pipelined in (False, True):
        eng = _engine(tiny, attention_backend="sdpa", max_num_batched_tokens=16, pipeline_steps=pipelined)
        assert eng.pipeline is pipelined
        results[pipelined], _ = _drive(eng, requests, arrive_at)
        assert eng.stats().kv_blocks_used == 0 and not eng.scheduler.running
        eng.block_manager.check_invariants([])
    for i in range(len(requests)):
        (s_toks, s_text, s_last), (p_toks, p_text, p_last) = results[False][i], results[True][i]
        assert (s_toks, s_text) == (s_last.token_ids, s_last.text), i  # deltas add up to the totals
        assert p_last.finished and (p_toks, p_text) == (p_last.token_ids, p_last.text), i
        assert (p_last.token_ids, p_last.text, p_last.finish_reason) == (
            s_last.token_ids, s_last.text, s_last.finish_reason), i
        _assert_logprobs_close(p_last.logprobs, s_last.logprobs, i)
    assert results[True][0][2].token_ids == _hf_greedy(ref, prompts[0], 12)
    assert results[True][1][2].finish_reason is FinishReason.STOP and len(results[True][1][2].token_ids) < 20


def test_pipelined_abort_while_a_step_is_in_flight(tiny):
    eng = _engine(tiny, attention_backend="sdpa", pipeline_steps=True)
    keep = eng.add_request(_prompts([7], seed=12)[0], SamplingParams(max_tokens=10, ignore_eos=True))
    gone = eng.add_request(_prompts([9], seed=13)[0], SamplingParams(max_tokens=10, ignore_eos=True))
    outs = {o.request_id: o for o in eng.step()}
    assert eng._inflight is not None and len(outs[gone].token_ids) == 1
    assert eng.abort(gone) and eng.stats().kv_blocks_used > 0
    (aborted, kept) = eng.step()  # the aborted request's token of the step in flight is dropped
    assert aborted.request_id == gone and aborted.finish_reason is FinishReason.ABORT
    assert len(aborted.token_ids) == 1 and kept.request_id == keep and len(kept.token_ids) == 2
    while eng.has_unfinished_requests():
        for o in eng.step():
            assert o.request_id == keep
    assert len(o.token_ids) == 10 and o.finished and eng.stats().kv_blocks_used == 0


def test_async_scheduling_gives_the_outputs_of_synchronous_steps(tiny):
    """``async_scheduling``: decode steps are launched before the previous step's tokens are
    read back, which feed them on the device. Outputs must equal synchronous stepping: greedy
    and seeded tokens, logprobs, stop ids (the extra row dropped), stop strings, lengths
    (no row past the last token), n > 1, arrivals mid-run (admitted in steps launched ahead,
    beside fed decode rows, or waiting for a full batch), and a pool so small that steps which
    would preempt fall back to launching after the collect."""
    _, ref, _ = tiny
    prompts = _prompts([5, 17, 9, 30, 3, 12, 7], seed=21)
    probe = _engine(tiny, attention_backend="sdpa")
    free = probe.generate(prompts[1], SamplingParams(max_tokens=24, ignore_eos=True))[0]
    requests = [
        (prompts[0], SamplingParams(max_tokens=14, ignore_eos=True)),
        (prompts[1], SamplingParams(max_tokens=24, ignore_eos=True, stop=[free.text[8:11]])),
        (prompts[2], SamplingParams(max_tokens=15, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True, logprobs=2)),
        (prompts[3], SamplingParams(max_tokens=18, ignore_eos=True, repetition_penalty=1.3)),
        (prompts[0], SamplingParams(max_tokens=17, ignore_eos=True, frequency_penalty=0.7, presence_penalty=0.5,
                                    temperature=0.9, seed=5)),
        (prompts[1], SamplingParams(max_tokens=20, ignore_eos=True, stop_token_ids=[free.token_ids[9]])),
        (prompts[5], SamplingParams(max_tokens=16, temperature=1.0, top_k=20, seed=3, ignore_eos=True, n=2)),
        (prompts[6], SamplingParams(max_tokens=1, ignore_eos=True)),
        (prompts[4], SamplingParams(max_tokens=21, ignore_eos=True)),
    ]
    arrive_at = [0, 0, 2, 2, 3, 5, 6, 9, 12]
    for pool in (64, 9):  # 9 blocks of 8: decode growth must wait for blocks, or preempt
        results = {}
        for mode in ("sync", "async"):
            eng = _engine(tiny, attention_backend="sdpa", max_num_seqs=4, num_kv_blocks=pool,
                          pipeline_steps=mode == "async", async_scheduling=mode == "async")
            assert eng.async_scheduling is (mode == "async")
            computed: dict = {}  # per request: the last position a step computed
            mixed: list[int] = []  # steps launched ahead that also admitted a prompt
            execute = eng.runner.execute

            def spy(scheduled, fed=None, _execute=execute, _computed=computed, _mixed=mixed):
                if fed is not None and len(fed[0]) < len(scheduled):
                    _mixed.append(len(scheduled))
                for s in scheduled:
                    key = (s.seq.request_id, s.seq.choice_index)
                    _computed[key] = max(_computed.get(key, -1), s.seq.num_computed_tokens + s.num_new_tokens - 1)
                return _execute(scheduled, fed)

            eng.runner.execute = spy
            results[mode], _ = _drive_choices(eng, requests, arrive_at)
            for (i, c), (_, _, last) in results[mode].items():
                if last.finish_reason is FinishReason.LENGTH:  # the last token is never fed back
                    final = len(last.prompt_token_ids) + len(last.token_ids)
                    assert computed[last.request_id, c] == final - 2, (mode, i, c)
            assert eng.stats().kv_blocks_used == 0 and not eng.scheduler.running
            eng.block_manager.check_invariants([])
            if mode == "async":
                assert eng.num_steps_launched_ahead >= 10, eng.num_steps_launched_ahead
                assert mixed, "no step launched ahead admitted a new request"
        assert results["sync"].keys() == results["async"].keys()
        for i in results["sync"]:
            (_, _, s_last), (a_toks, a_text, a_last) = results["sync"][i], results["async"][i]
            assert a_last.finish_reason is not None and (a_toks, a_text) == (a_last.token_ids, a_last.text), (pool, i)
            assert (a_last.token_ids, a_last.text, a_last.finish_reason) == (
                s_last.token_ids, s_last.text, s_last.finish_reason), (pool, i)
            _assert_logprobs_close(a_last.logprobs, s_last.logprobs, (pool, i))
        assert results["async"][0, 0][2].token_ids == _hf_greedy(ref, prompts[0], 14)
        for i in (1, 5):  # a stop string, a stop id
            assert results["async"][i, 0][2].finish_reason is FinishReason.STOP, i
        assert len(results["async"][7, 0][2].token_ids) == 1


def test_async_scheduling_penalises_the_token_still_on_the_device(tiny):
    """Penalties count the previous step's token while it is still on the device: a
    repetition or presence penalty once per distinct token (the host's copy may already
    hold it), a frequency penalty once per occurrence. Long greedy runs of a tiny model
    repeat themselves, so both cases occur; tokens must equal synchronous stepping."""
    prompts = _prompts([11, 4], seed=5)
    cases = [SamplingParams(max_tokens=40, ignore_eos=True, repetition_penalty=1.05),
             SamplingParams(max_tokens=40, ignore_eos=True, presence_penalty=0.4, frequency_penalty=0.1)]
    for params in cases:
        want = [o.token_ids for o in _engine(tiny, attention_backend="sdpa").generate(prompts, params)]
        assert any(len(set(t)) < len(t) for t in want), "no repeated token: the case is not exercised"
        eng = _engine(tiny, attention_backend="sdpa", pipeline_steps=True)
        assert [o.token_ids for o in eng.generate(prompts, params)] == want, params
        assert eng.num_steps_launched_ahead > 30


def test_async_scheduling_stays_off_for_speculation(tiny):
    """Drafts are proposed from the previous tokens on the host: no launch ahead."""
    spec = _engine(tiny, attention_backend="sdpa", pipeline_steps=True, speculative_method="ngram")
    assert spec.pipeline and not spec.async_scheduling


def test_engine_process_with_async_scheduling_streams_the_synchronous_outputs(tmp_path):
    """The default engine client on CUDA (a child process, pipelined steps launched ahead),
    forced on the CPU: concurrent streams with penalties, seeds, stop strings and stop ids
    end with the outputs of a synchronous in-process engine, and their deltas add up."""
    import asyncio

    from stream_attention.engine import EngineConfig
    from stream_attention.engine.process_engine import EngineProcess

    base = dict(device="cpu", max_num_seqs=4, num_kv_blocks=128, max_model_len=512, attention_backend="sdpa")
    prompts = ["def fibonacci(n):", "import os\n\n", "class Stack:\n    def", "for i in range(", "# sum a list\n",
               "def parse(line):"]
    params = [SamplingParams(max_tokens=24, ignore_eos=True, repetition_penalty=1.2),
              SamplingParams(max_tokens=20, temperature=0.9, seed=4, frequency_penalty=0.5, presence_penalty=0.3),
              SamplingParams(max_tokens=30, stop=["\n\n"]),
              SamplingParams(max_tokens=18, ignore_eos=True, logprobs=1),
              SamplingParams(max_tokens=22, stop_token_ids=[13]),
              SamplingParams(max_tokens=1, ignore_eos=True)]
    sync = LLMEngine(config=EngineConfig(**base, pipeline_steps=False))
    want = [sync.generate(p, sp)[0] for p, sp in zip(prompts, params, strict=True)]
    engine = EngineProcess(EngineConfig(**base, pipeline_steps=True, async_scheduling=True))

    async def one(prompt, sp):
        toks, text, last = [], "", None
        async for out in engine.stream(prompt, sp):
            toks += out.delta_token_ids
            text += out.delta_text
            last = out
        return toks, text, last

    async def main():
        await engine.start()
        try:
            return await asyncio.gather(*(one(p, sp) for p, sp in zip(prompts, params, strict=True)))
        finally:
            await engine.shutdown()

    got = asyncio.run(main())
    for i, ((toks, text, last), ref) in enumerate(zip(got, want, strict=True)):
        assert (toks, text) == (list(last.token_ids), last.text), i
        assert (list(last.token_ids), last.text, last.finish_reason) == (
            list(ref.token_ids), ref.text, ref.finish_reason), i


def test_fed_tokens_replace_the_decode_rows_input_ids(tiny):
    """``ModelRunner.execute(scheduled, fed=(rows, tokens))``: device-side tokens feed the
    given decode rows (all of them, or some beside a prefill chunk) exactly as the same ids
    from the host would; a wrong length or a row that is not one token is a ValueError
    naming the shape."""
    from stream_attention.engine.model_runner import _FakeScheduled

    eng = _engine(tiny, attention_backend="sdpa")
    rows = [_FakeScheduled(1, [0, 1], computed=9), _FakeScheduled(1, [2], computed=3)]
    with pytest.raises(ValueError, match=r"fed tokens of shape \(3,\) for rows \[0, 1\] of a 2-row step"):
        eng.runner.execute(rows, ([0, 1], torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        eng.runner.execute([rows[0], _FakeScheduled(4, [3])], ([0, 1], torch.zeros(2, dtype=torch.long)))
    mixed = [rows[0], _FakeScheduled(4, [3], computed=0), rows[1]]
    got_all, _ = eng.runner.execute(rows, ([0, 1], torch.tensor([5, 9])))
    got_mixed, _ = eng.runner.execute(mixed, ([0, 2], torch.tensor([5, 9])))
    for token, row in zip((5, 9), rows, strict=True):  # the same ids from the host
        row.seq.token_ids[-1] = token
    want_all, _ = eng.runner.execute(rows)
    want_mixed, _ = eng.runner.execute(mixed)
    torch.testing.assert_close(got_all, want_all, rtol=0, atol=0)
    torch.testing.assert_close(got_mixed, want_mixed, rtol=0, atol=0)
    assert not torch.equal(got_all[0], got_all[1])


def test_freeze_startup_objects_takes_live_objects_out_of_collections():
    """After start-up on CUDA the engine freezes what is alive: later full collections no
    longer walk those objects (``gc.get_objects`` no longer lists them)."""
    import gc

    from stream_attention.engine.llm_engine import freeze_startup_objects

    marker = [object() for _ in range(100)]
    try:
        frozen = freeze_startup_objects()
        assert frozen >= 100  # (the count then drifts: frozen objects freed by refcount leave it)
        tracked = {id(o) for o in gc.get_objects()}
        assert id(marker) not in tracked
    finally:
        gc.unfreeze()
