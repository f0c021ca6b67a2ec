"""KV-cache compressors of ``stream_attention.utils.memory`` (the seed's API)."""

from __future__ import annotations

import math

import pytest
import torch

from stream_attention.utils.kv_compression import _gather
from stream_attention.utils.memory import (
    QuantizedKV,
    available_kv_compressors,
    create_kv_compressor,
    select_chunks,
    select_tokens,
    token_importance,
)

B, T, H, D = 2, 256, 4, 32


def _kv(dtype=torch.float16, t: int = T, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, t, H, D, generator=g)
    k = k + torch.randn(D, generator=g) * 2  # per-channel offsets, as real keys have
    v = torch.randn(B, t, H, D, generator=g)
    return k.to(dtype), v.to(dtype)


def _expected_kept(scores: torch.Tensor, budget: int, sinks: int, recent: int) -> list[list[set[int]]]:
    b, t, h = scores.shape
    out = []
    for bi in range(b):
        row = []
        for hi in range(h):
            must = set(range(min(sinks, t))) | set(range(t - recent, t))
            rest = [i for i in scores[bi, :, hi].argsort(descending=True).tolist() if i not in must]
            row.append(must | set(rest[:budget - len(must)]))
        out.append(row)
    return out


def test_seed_readme_example_runs_as_written():
    keys, values = _kv()
    comp = create_kv_compressor("hybrid")
    ck, cv, stats = comp.compress(keys, values, compression_ratio=8.0)
    for name in ("compression_ratio", "bytes_before", "bytes_after", "attention_rel_error", "key_rel_error"):
        assert name in stats
    assert stats["bytes_before"] == 2 * keys.numel() * 2
    assert stats["compression_ratio"] >= 8.0 and stats["ratio_met"]
    dk, dv = comp.decompress(ck, cv)
    assert dk.shape == dv.shape == (B, stats["tokens_kept"], H, D) and dk.dtype == keys.dtype
    print(stats)


def test_registry_and_errors():
    assert available_kv_compressors() == ["chunk", "hybrid", "importance", "quantized", "streaming"]
    with pytest.raises(ValueError, match="unknown KV compressor"):
        create_kv_compressor("zip")
    comp = create_kv_compressor("importance")
    k, v = _kv()
    with pytest.raises(ValueError, match=">= 1"):
        comp.compress(k, v, compression_ratio=0.5)
    with pytest.raises(ValueError, match=r"\[B, T, H, D\]"):
        comp.compress(k[0], v[0])


@pytest.mark.parametrize("name", ["importance", "chunk", "hybrid", "streaming"])
@pytest.mark.parametrize("ratio", [2.0, 4.0, 8.0])
def test_evicting_compressors_hit_the_requested_ratio(name, ratio):
    keys, values = _kv()
    _, _, stats = create_kv_compressor(name).compress(keys, values, compression_ratio=ratio)
    assert stats["ratio_met"]
    assert ratio <= stats["compression_ratio"] <= ratio * 1.03
    assert stats["bytes_after"] + stats["bytes_saved"] == stats["bytes_before"]


def test_quantized_picks_the_widest_format_that_reaches_the_ratio():
    keys, values = _kv(torch.float32)  # fp32 input: int8 gives ~3.6x, int4 ~6.4x, int2 ~10x
    comp = create_kv_compressor("quantized")
    widths = {}
    for ratio in (2.0, 4.0, 8.0):
        ck, cv, stats = comp.compress(keys, values, compression_ratio=ratio)
        assert stats["ratio_met"] and stats["compression_ratio"] >= ratio
        assert isinstance(ck, QuantizedKV) and ck.per_channel and not cv.per_channel
        assert ck.nbytes + cv.nbytes == stats["bytes_after"]
        widths[ratio] = stats["bits"]
    assert widths == {2.0: 8, 4.0: 4, 8.0: 2}
    # 16-bit inputs cannot reach 8x with int2 plus fp16 scales: reported, not hidden.
    _, _, stats = comp.compress(*_kv(torch.float16), compression_ratio=8.0)
    assert stats["bits"] == 2 and not stats["ratio_met"]


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("per_channel", [False, True])
def test_quantized_kv_round_trip_bound(bits, per_channel):
    x, _ = _kv(torch.float32, t=70)  # not a multiple of the group size
    q = QuantizedKV.quantize(x, bits, per_channel=per_channel, group_size=32)
    assert q.nbytes == QuantizedKV.storage_bytes(tuple(x.shape), bits, per_channel=per_channel, group_size=32)
    scale = q.scale.float().repeat_interleave(32, dim=1)[:, :70] if per_channel else q.scale.float()
    err = (q.dequantize() - x).abs()
    # fp32 rounding of (x - zero) / scale can push a tie a few ulps of |x| past scale / 2 (4e-7 ~ 3 ulps).
    assert (err <= scale / 2 + 4e-7 * (x.abs() + 1)).all()


def test_select_tokens_keeps_sinks_window_and_top_scores():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(B, 100, H, generator=g)
    idx = select_tokens(scores, 30, sink_tokens=4, recent_tokens=10)
    assert idx.shape == (B, 30, H)
    assert (idx[:, 1:] > idx[:, :-1]).all()  # sorted, unique
    expected = _expected_kept(scores, 30, 4, 10)
    for b in range(B):
        for h in range(H):
            assert set(idx[b, :, h].tolist()) == expected[b][h]


def test_streaming_keeps_sinks_and_the_most_recent_tokens():
    keys, values = _kv()
    res = create_kv_compressor("streaming", sink_tokens=4, recent_tokens=8).compress_detailed(keys, values, 8.0)
    expected = [*range(4), *range(T - 28, T)]
    assert (res.indices == torch.tensor(expected)[None, :, None]).all()


def test_select_tokens_shrinks_the_window_before_the_sinks():
    scores = torch.rand(1, 50, 1)
    idx = select_tokens(scores, 6, sink_tokens=4, recent_tokens=10)[0, :, 0].tolist()
    assert idx == [0, 1, 2, 3, 48, 49]
    idx = select_tokens(scores, 3, sink_tokens=4, recent_tokens=10)[0, :, 0].tolist()
    assert idx == [0, 1, 2]


def test_select_tokens_breaks_ties_towards_newer_positions():
    # Equal scores (e.g. blocks no query attended yet) keep the newest tokens, so a tie
    # degenerates to StreamingLLM rather than to keeping the oldest context.
    idx = select_tokens(torch.zeros(1, 40, 1), 12, sink_tokens=2, recent_tokens=4)[0, :, 0].tolist()
    assert idx == [0, 1, *range(30, 40)]
    scores = torch.zeros(1, 40, 1)
    scores[0, [5, 10, 15], 0] = 1.0  # one tie among the top scores: 15 and 10 beat 5
    idx = select_tokens(scores, 8, sink_tokens=2, recent_tokens=4)[0, :, 0].tolist()
    assert idx == [0, 1, 10, 15, 36, 37, 38, 39]


def test_importance_without_queries_keeps_low_norm_keys():
    keys, values = _kv(torch.float32)
    heavy = torch.tensor([40, 77, 150, 201])
    keys[:, heavy] *= 0.01  # lowest L2 norms: the heavy hitters of the norm heuristic
    comp = create_kv_compressor("importance", sink_tokens=4, recent_tokens=16)
    res = comp.compress_detailed(keys, values, compression_ratio=8.0)
    budget = T // 8
    assert res.indices.shape == (B, budget, H)
    expected = _expected_kept(-keys.float().norm(dim=-1), budget, 4, 16)
    for b in range(B):
        for h in range(H):
            kept = set(res.indices[b, :, h].tolist())
            assert kept == expected[b][h] and set(heavy.tolist()) <= kept
    torch.testing.assert_close(res.keys, _gather(keys, res.indices))


def test_importance_with_queries_finds_the_attended_tokens_per_head():
    keys, values = _kv(torch.float32, seed=2)
    g = torch.Generator().manual_seed(3)
    queries = torch.randn(B, 16, 2 * H, D, generator=g)  # GQA: two query heads per KV head
    # Each KV head gets its own needles: keys aligned with the head's mean query.
    needles = {h: torch.randperm(T - 40, generator=g)[:3] + 8 for h in range(H)}
    for h, pos in needles.items():
        direction = queries[:, :, 2 * h:2 * h + 2].mean(dim=(1, 2))  # [B, D]
        direction = direction / direction.norm(dim=-1, keepdim=True)
        keys[:, pos, h] = 6 * math.sqrt(D) * direction[:, None]
    comp = create_kv_compressor("importance", sink_tokens=2, recent_tokens=8, pool_kernel=1)
    res = comp.compress_detailed(keys, values, compression_ratio=16.0, queries=queries)
    expected = _expected_kept(token_importance(keys, queries, window=32, pool_kernel=1), T // 16, 2, 8)
    for b in range(B):
        for h in range(H):
            kept = set(res.indices[b, :, h].tolist())
            assert kept == expected[b][h]
            assert set(needles[h].tolist()) <= kept
    assert res.stats["probe_source"] == "queries" and res.stats["attention_mass_kept"] > 0.5


def test_chunk_selection_keeps_whole_chunks_shared_by_heads():
    g = torch.Generator().manual_seed(4)
    scores = torch.rand(B, 96, H, generator=g) * 0.1
    scores[:, 40:48] += 5.0  # the best chunk
    scores[:, 64:72] += 3.0  # the second best
    idx = select_chunks(scores, 30, chunk_size=8, sink_tokens=4, recent_tokens=8)
    assert idx.shape == (B, 30, H)
    assert (idx == idx[:, :, :1]).all()  # the same positions for every head
    for b in range(B):
        kept = set(idx[b, :, 0].tolist())
        assert set(range(4)) | set(range(88, 96)) <= kept
        assert set(range(40, 48)) <= kept and set(range(64, 72)) <= kept
        others = kept - set(range(4)) - set(range(88, 96)) - set(range(40, 48)) - set(range(64, 72))
        assert len(others) == 2 and len({i // 8 for i in others}) == 1  # one partial chunk fills the rest


def test_quantization_beats_eviction_on_unstructured_data():
    keys, values = _kv()
    stats = {n: create_kv_compressor(n).compress(keys, values, compression_ratio=2.0)[2] for n in
             ("importance", "quantized", "hybrid")}
    assert stats["quantized"]["attention_rel_error"] < 0.2
    assert stats["hybrid"]["bits"] == 8 and stats["hybrid"]["key_rel_error"] < 0.01
    assert stats["hybrid"]["attention_rel_error"] < stats["importance"]["attention_rel_error"]


@pytest.mark.gpu
def test_compressors_run_on_gpu():
    keys, values = (t.cuda().to(torch.bfloat16) for t in _kv(t=4096))
    for name in available_kv_compressors():
        ck, cv, stats = create_kv_compressor(name).compress(keys, values, compression_ratio=4.0)
        dk, _ = create_kv_compressor(name).decompress(ck, cv)
        assert dk.is_cuda and stats["compression_ratio"] > 3.0


# --------------------------------------------------------------------------------------
# Engine side: stream_attention.engine.kv_compression
# --------------------------------------------------------------------------------------

import random  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402

from stream_attention.engine import kv_compression as ekv  # noqa: E402
from stream_attention.engine.block_manager import BlockManager  # noqa: E402
from stream_attention.engine.scheduler import Scheduler  # noqa: E402
from stream_attention.engine.sequence import Sequence  # noqa: E402
from stream_attention.engine.types import FinishReason, SamplingParams  # noqa: E402
from stream_attention.kernels import kv_attention as kva  # noqa: E402
from stream_attention.kernels import kv_pages as kvp  # noqa: E402

BS = 16


def _manager(policy: str = "streaming", dtype: str = "auto", **kw) -> ekv.KVCompressionManager:
    cfg = ekv.KVCompressionConfig(kv_cache_dtype=dtype, policy=policy, **kw)
    return ekv.KVCompressionManager(cfg, num_layers=2, num_kv_heads=2, head_dim=32, block_size=BS)


def _running_seq(bm: BlockManager, n_tokens: int, rid: str = "r0") -> Sequence:
    seq = Sequence(request_id=rid, prompt_token_ids=list(range(n_tokens)), params=SamplingParams())
    assert bm.allocate(seq, n_tokens)
    seq.num_computed_tokens = n_tokens
    return seq


def test_streaming_eviction_frees_whole_blocks_to_the_pool():
    bm = BlockManager(num_blocks=64, block_size=BS, enable_prefix_caching=False)
    seq = _running_seq(bm, 200)
    table = list(seq.block_table)
    mgr = _manager("streaming", budget_tokens=96, sink_tokens=4, window_tokens=32)
    free_before = bm.num_free_blocks
    freed = mgr.after_step([seq], bm)
    # 200 slots, budget 96: 7 blocks go, the oldest after the sink block.
    assert freed == 7 and bm.num_free_blocks == free_before + 7
    assert seq.block_table == [table[0], *table[8:]]
    assert seq.num_kv_slots == 200 - 7 * BS <= 96 and seq.num_dropped_tokens == 7 * BS
    assert mgr.stats([seq], bm)["kv_blocks_evicted_total"] == 7 == bm.blocks_dropped
    assert mgr.after_step([seq], bm) == 0  # within budget now
    bm.check_invariants([seq])


def test_heavy_hitter_eviction_drops_the_least_attended_blocks():
    bm = BlockManager(num_blocks=64, block_size=BS, enable_prefix_caching=False)
    seq = _running_seq(bm, 160)  # 10 blocks
    table = list(seq.block_table)
    mgr = _manager("heavy-hitter", budget_tokens=100, sink_tokens=4, window_tokens=40)
    mass = np.array([0.0, 5, 1, 7, 0.5, 9, 2, 3, 0.0, 0.1])  # sink block 0 and window blocks 8-9 score lowest
    collector = SimpleNamespace(per_sequence=lambda: {"r0": mass})
    freed = mgr.after_step([seq], bm, collector)
    # 160 slots, budget 100 -> 4 blocks. Candidates 1..6 (block 7, tokens 112-127, reaches into
    # the window [120, 160)); the least attended of them: 4, 2, 6, 1.
    assert freed == 4
    assert seq.block_table == [table[i] for i in (0, 3, 5, 7, 8, 9)]
    # Scores were compacted with the table: the survivors keep theirs.
    np.testing.assert_allclose(mgr._scores["r0"].mean(6), [0.0, 7, 9, 3, 0.0, 0.1])


@pytest.mark.parametrize("scheduler_owns_policy", [False, True])
def test_eviction_under_the_real_scheduler_keeps_books_balanced(scheduler_owns_policy):
    """By hand, or with the scheduler calling the policy on commit, finish and preemption
    (evictions happen only in ``after_step``, so ``blocks_evicted > 0`` shows it was called)."""
    rng = random.Random(0)
    bm = BlockManager(num_blocks=48, block_size=BS)
    mgr = _manager("streaming", ratio=3.0, sink_tokens=4, window_tokens=32)
    owned = mgr if scheduler_owns_policy else None
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_waiting=16, kv_policy=owned)
    for i in range(6):
        seq = Sequence(request_id=f"s{i}", prompt_token_ids=[rng.randrange(50) for _ in range(rng.randint(20, 120))],
                       params=SamplingParams(max_tokens=rng.randint(40, 160)))
        sched.add(seq)
    finished = 0
    for _ in range(2000):
        out = sched.schedule()
        if not out and not sched.num_unfinished:
            break
        if owned is None:
            for seq in out.preempted:
                mgr.forget(seq.request_id)
        sched.commit(out.scheduled)
        if owned is None:
            mgr.after_step(list(sched.running), bm)
        for s in out.scheduled:
            if s.samples:
                s.seq.token_ids.append(rng.randrange(50))
                if s.seq.num_output_tokens >= s.seq.params.max_tokens:
                    sched.finish(s.seq, FinishReason.LENGTH)
                    if owned is None:
                        mgr.forget(s.seq.request_id)
                    finished += 1
        for seq in sched.running:
            assert seq.num_kv_slots <= mgr.policy.budget(seq.num_computed_tokens) + BS
        bm.check_invariants(list(sched.running))
    assert finished == 6 and bm.num_free_blocks == bm.num_blocks
    assert mgr.blocks_evicted > 0


def _step_ctx(block_tables, seq_lens, cu, slots, max_q, fresh_prefill=False):
    return SimpleNamespace(slot_mapping=slots, block_tables=block_tables, seq_lens=seq_lens, cu_seqlens_q=cu,
                           max_q_len=max_q, num_splits=2, backend="triton", fresh_prefill=fresh_prefill)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_attention_step_writes_and_attends(dtype, device):
    mgr = _manager("none", dtype=dtype)
    caches = mgr.allocate(9, device)
    assert isinstance(caches[0][0], kvp.QuantizedPages) and caches[0][0].bits == mgr.bits
    g = torch.Generator().manual_seed(0)
    tables = torch.tensor([[3, 7, 1], [0, 5, 8]], dtype=torch.int32, device=device)
    # A prefill step: 20 tokens of sequence 0 and 9 of sequence 1.
    lens = [20, 9]
    slots = torch.cat([tables[b].long().repeat_interleave(BS)[:n] * BS + torch.arange(n, device=device) % BS
                       for b, n in enumerate(lens)])
    cu = torch.tensor([0, 20, 29], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(29, h, 32, generator=g).to(device) for h in (4, 2, 2))
    ctx = _step_ctx(tables, torch.tensor(lens, dtype=torch.int32, device=device), cu, slots, 20)
    kp, vp = caches[1]
    out = ekv.compressed_attention_step(q, k, v, kp, vp, ctx, 32**-0.5)
    ref, _ = kva.paged_attention_ref(q, kp, vp, tables, ctx.seq_lens, cu)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    # The pages hold the tokens to within the format's error.
    deq = kvp.dequantize_pages_ref(kp).reshape(-1, 2, 32)[slots]
    assert (deq - k).abs().max() < (0.05 if dtype == "int8" else 0.5)
    # Marked as a fresh prefill (nothing cached before), the step attends over its own
    # unquantized keys and values instead: exact attention, the codes still written.
    fresh = ekv.compressed_attention_step(q, k, v, kp, vp, _step_ctx(tables, ctx.seq_lens, cu, slots, 20, True),
                                          32**-0.5)
    kf, vf = (torch.zeros(9 * BS, 2, 32, device=device) for _ in range(2))
    kf[slots], vf[slots] = k, v
    exact, _ = kva.paged_attention_ref(q, kf.view(9, BS, 2, 32), vf.view(9, BS, 2, 32), tables, ctx.seq_lens, cu)
    torch.testing.assert_close(fresh.double(), exact, atol=1e-4, rtol=1e-4)
    assert torch.equal(kvp.dequantize_pages_ref(kp).reshape(-1, 2, 32)[slots], deq)
    # A decode step with a heavy hitter planted in sequence 1's first block: the collector sees it.
    slots2 = torch.tensor([int(tables[0, 1]) * BS + 4, int(tables[1, 0]) * BS + 9], device=device)
    q2, k2, v2 = (torch.randn(2, h, 32, generator=g).to(device) for h in (4, 2, 2))
    kp.data.zero_()  # flat keys everywhere except the planted ones
    kp.scales.zero_()
    hit = q2[1].view(2, 2, 32).mean(1)  # the KV heads' mean query
    heavy = torch.zeros(29, 2, 32, device=device)
    heavy[22] = 4 * hit / hit.norm(dim=-1, keepdim=True) * 32**0.5
    kvp.write_tokens_to_pages_ref(heavy[22:23], slots[22:23], kp)
    ctx2 = _step_ctx(tables, torch.tensor([21, 10], dtype=torch.int32, device=device),
                     torch.arange(3, dtype=torch.int32, device=device), slots2, 1)
    collector = ekv.BlockScoreCollector(["a", "b"], BS)
    out2 = ekv.compressed_attention_step(q2, k2, v2, kp, vp, ctx2, 32**-0.5, collector=collector)
    ref2, _ = kva.paged_attention_ref(q2, kp, vp, tables, ctx2.seq_lens)
    torch.testing.assert_close(out2.double(), ref2, atol=1e-4, rtol=1e-4)
    per_seq = collector.per_sequence()
    assert [len(per_seq["a"]), len(per_seq["b"])] == [2, 1]
    # Each query head spreads a probability mass of 1 over its keys.
    assert per_seq["a"].sum() == pytest.approx(4, rel=1e-4) and per_seq["b"].sum() == pytest.approx(4, rel=1e-4)


def test_collector_observes_only_the_last_queries_of_each_sequence(device):
    cu = torch.tensor([0, 40, 41, 45], dtype=torch.int32, device=device)
    rows, cu_obs = ekv.BlockScoreCollector(["a", "b", "c"], BS, observation_window=8)._observation_rows(
        SimpleNamespace(cu_seqlens_q=cu))
    assert rows.tolist() == [*range(32, 40), 40, *range(41, 45)]
    assert cu_obs.tolist() == [0, 8, 9, 13]


def test_manager_sizes_and_stats():
    bf16 = _manager("none")
    int8, int4 = _manager("none", dtype="int8"), _manager("none", dtype="int4")
    assert bf16.block_bytes() == 2 * 2 * BS * 2 * 32 * 2
    assert int8.block_bytes() == 2 * BS * (2 * 2 * 32 + 2 * 2 * 4)
    assert int4.block_bytes() == 2 * BS * (2 * 2 * 16 + 2 * 2 * 4)
    assert _manager("hybrid", ratio=4).bits == 4 and _manager("hybrid", dtype="int8", ratio=4).bits == 8
    bm = BlockManager(num_blocks=64, block_size=BS, enable_prefix_caching=False)
    seq = _running_seq(bm, 200)
    st = int4.stats([seq], bm)
    assert st["kv_compression_ratio"] == pytest.approx(200 * bf16.block_bytes() / BS / (13 * int4.block_bytes()))
    assert st["kv_bytes_saved"] == 200 * bf16.block_bytes() // BS - 13 * int4.block_bytes()
    with pytest.raises(ValueError, match="policy"):
        ekv.KVCompressionConfig(policy="lru").validate()
    assert ekv.KVCompressionConfig(policy="Importance", ratio=2).validate().policy == "heavy-hitter"
    assert ekv.KVCompressionConfig(kv_cache_dtype="INT8").bits == 8
    with pytest.raises(ValueError, match="budget_tokens or ratio"):
        ekv.KVCompressionConfig(policy="streaming").validate()
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        ekv.KVCompressionConfig(kv_cache_dtype="int3").validate()
