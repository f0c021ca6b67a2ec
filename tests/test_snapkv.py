"""SnapKV eviction in the engine: pooled observation-window scores choose the blocks to free.

The expected selections are computed here from the definition (float64 softmax of the
prompt's last queries over its keys, summed over the window and the GQA group, pooled
along the keys, summed per block over heads and layers; the lowest-scored blocks outside
the sinks and the recent window go), not from the engine's code."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from stream_attention.engine import kv_compression as ekv
from stream_attention.engine.block_manager import BlockManager
from stream_attention.engine.scheduler import ScheduledSeq
from stream_attention.engine.sequence import Sequence
from stream_attention.engine.types import SamplingParams

BS, HKV, HQ, D, LAYERS = 16, 2, 4, 16, 2


def _pool_by_hand(x: torch.Tensor, kernel: int, mode: str) -> torch.Tensor:
    half = kernel // 2
    out = torch.empty_like(x)
    n = x.shape[-1]
    for t in range(n):
        window = x[..., max(0, t - half):min(n, t + half + 1)]
        out[..., t] = window.amax(-1) if mode == "max" else window.sum(-1) / kernel
    return out


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_pooling_matches_definition(mode: str, kernel: int) -> None:
    x = torch.rand(2, 3, 41, dtype=torch.float64)
    torch.testing.assert_close(ekv.pool_token_scores(x, kernel, mode), _pool_by_hand(x, kernel, mode))


def _direct_block_scores(qs, ks, n_obs: int, scale: float, kernel: int | None) -> torch.Tensor:
    """Per block of the prompt: SnapKV's score from the definition, summed over layers."""
    total = None
    for q, k in zip(qs, ks, strict=True):  # q [T, HQ, D], k [T, HKV, D]
        t = q.shape[0]
        q_obs = q[t - n_obs:].double().view(n_obs, HKV, HQ // HKV, D)
        s = torch.einsum("qhgd,khd->hgqk", q_obs, k.double()) * scale
        rows = torch.arange(t - n_obs, t)[:, None]
        s = s.masked_fill(torch.arange(t)[None, :] > rows, float("-inf"))
        votes = torch.softmax(s, -1).sum(dim=(1, 2))  # [HKV, T]
        if kernel:
            votes = _pool_by_hand(votes, kernel, "max")
        per_block = votes.sum(0).view(-1, BS).sum(-1)
        total = per_block if total is None else total + per_block
    return total


def _expected_table(table: list[int], scores: torch.Tensor, n_tokens: int, budget: int, sink: int,
                    window: int) -> list[int]:
    first = math.ceil(sink / BS)
    candidates = list(range(first, (n_tokens - window) // BS))
    need = math.ceil((n_tokens - budget) / BS)
    drop = set(sorted(candidates, key=lambda i: float(scores[i]))[:need])
    return [b for i, b in enumerate(table) if i not in drop]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_snapkv_frees_the_blocks_the_definition_selects(backend: str, device) -> None:
    n_tokens, budget, sink, window, n_obs, kernel = 160, 96, 4, 32, 8, 5
    # Keys of mixed magnitudes so attention is peaked; a seed where pooling changes the ranking.
    g = torch.Generator().manual_seed(15)
    qs = [torch.randn(n_tokens, HQ, D, generator=g) * 2 for _ in range(LAYERS)]
    ks = [torch.randn(n_tokens, HKV, D, generator=g) * torch.rand(n_tokens, 1, 1, generator=g) * 2
          for _ in range(LAYERS)]
    vs = [torch.randn(n_tokens, HKV, D, generator=g) for _ in range(LAYERS)]
    scale = D ** -0.5

    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=False)
    seq = Sequence(request_id="r0", prompt_token_ids=list(range(n_tokens)), params=SamplingParams())
    assert bm.allocate(seq, n_tokens)
    table = list(seq.block_table)
    cfg = ekv.KVCompressionConfig(policy="snapkv", budget_tokens=budget, sink_tokens=sink, window_tokens=window,
                                  observation_window=n_obs, pool_kernel=kernel)
    mgr = ekv.KVCompressionManager(cfg, num_layers=LAYERS, num_kv_heads=HKV, head_dim=D, block_size=BS,
                                   float_dtype=torch.float32)
    collector = mgr.start_step([ScheduledSeq.of(seq, n_tokens)])
    assert collector is not None
    caches = mgr.allocate(bm.num_blocks, device)
    tables = torch.tensor([table], dtype=torch.int32, device=device)
    slots = torch.tensor([table[i // BS] * BS + i % BS for i in range(n_tokens)], device=device)
    ctx = SimpleNamespace(slot_mapping=slots, block_tables=tables,
                          seq_lens=torch.tensor([n_tokens], dtype=torch.int32, device=device),
                          cu_seqlens_q=torch.tensor([0, n_tokens], dtype=torch.int32, device=device),
                          max_q_len=n_tokens, num_splits=1, backend=backend, fresh_prefill=True)
    for layer, (kp, vp) in enumerate(caches):
        ekv.compressed_attention_step(qs[layer].to(device), ks[layer].to(device), vs[layer].to(device), kp, vp, ctx,
                                      scale, collector=collector, layer_idx=layer)
    seq.num_computed_tokens = n_tokens  # the scheduler's commit
    freed = mgr.after_step([seq], bm, collector)

    pooled = _direct_block_scores(qs, ks, n_obs, scale, kernel)
    want = _expected_table(table, pooled, n_tokens, budget, sink, window)
    assert freed == 4 and seq.block_table == want
    # Pooling decides here: the unpooled (heavy-hitter) ranking would free other blocks.
    assert want != _expected_table(table, _direct_block_scores(qs, ks, n_obs, scale, None), n_tokens, budget, sink,
                                   window)
    bm.check_invariants([seq])


def test_snapkv_compresses_a_prompt_only_once_it_is_complete() -> None:
    bm = BlockManager(num_blocks=32, block_size=BS, enable_prefix_caching=False)
    seq = Sequence(request_id="r0", prompt_token_ids=list(range(200)), params=SamplingParams())
    mgr = ekv.KVCompressionManager(
        ekv.KVCompressionConfig(policy="snapkv", budget_tokens=64, sink_tokens=4, window_tokens=16),
        num_layers=1, num_kv_heads=HKV, head_dim=D, block_size=BS)
    # A first chunk of 150 prompt tokens: no scoring step, and no eviction although over budget.
    assert bm.allocate(seq, 150)
    first = ScheduledSeq.of(seq, 150)
    assert not first.samples and mgr.start_step([first]) is None
    seq.num_computed_tokens = 150
    assert mgr.after_step([seq], bm) == 0 and seq.num_kv_slots == 150
    # The last chunk scores (its sequence is observed) and the prompt is then compressed.
    assert bm.allocate(seq, 200)
    last = ScheduledSeq.of(seq, 50)
    collector = mgr.start_step([last])
    assert collector is not None and collector.observed == {"r0"}
    seq.num_computed_tokens = 200
    fake_scores = SimpleNamespace(per_sequence=lambda: {"r0": torch.arange(13, 0, -1).double().numpy()})
    assert mgr.after_step([seq], bm, fake_scores) > 0 and seq.num_kv_slots <= 64 + BS
    bm.check_invariants([seq])


def test_snapkv_is_its_own_policy_with_validated_pooling() -> None:
    cfg = ekv.KVCompressionConfig(policy="SnapKV", ratio=4.0).validate()
    assert cfg.policy == "snapkv" and cfg.scores and cfg.evicts
    assert ekv.KVCompressionConfig(policy="h2o", ratio=4.0).validate().policy == "heavy-hitter"
    with pytest.raises(ValueError, match="pool_kernel"):
        ekv.KVCompressionConfig(policy="snapkv", ratio=4.0, pool_kernel=4).validate()
    with pytest.raises(ValueError, match="pooling"):
        ekv.KVCompressionConfig(policy="snapkv", ratio=4.0, pooling="median").validate()
