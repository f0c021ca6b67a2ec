"""Ring attention on torch.distributed (gloo, CPU): equal to single-device attention.

Each multi-process check spawns its ranks once (module-scoped fixtures) and runs every
case inside; the tests then read the per-case errors. The reference is the
single-device ``fused_attention`` on the full sequence (SDPA path, with autograd).
"""

from __future__ import annotations

import math

import pytest
import torch

from stream_attention.core.distributed_utils import (
    contiguous_shard,
    launch_local,
    merge_partial_,
    shard_positions,
    zigzag_shard,
    zigzag_unshard,
)
from stream_attention.core.functional import fused_attention
from stream_attention.core.ring_attention import (
    RingAttention,
    block_backward_reference,
    block_plan,
    ring_attention,
)

TIMEOUT_S = 150.0
# The ring's blocks and the full-sequence reference run fp32 CPU GEMMs of different
# shapes, which are not bitwise-consistent on every CPU: one CI machine showed an LSE
# 5e-5 apart (2e-7 here). A wrong block, mask or merge is off by 1e-2 or more.
ATOL = 1e-4

# (name, batch, local_len, q_heads, kv_heads, head_dim, causal, zigzag)
CASES_2 = [
    ("causal-zigzag", 2, 16, 4, 4, 16, True, True),
    ("causal-contiguous", 2, 16, 4, 4, 16, True, False),
    ("full-zigzag", 2, 16, 4, 4, 16, False, True),
    ("full-contiguous", 1, 12, 4, 4, 16, False, False),
    ("causal-zigzag-gqa", 1, 16, 6, 2, 32, True, True),
    ("causal-zigzag-mqa", 1, 8, 4, 1, 16, True, True),
    ("causal-contiguous-gqa", 1, 10, 4, 2, 16, True, False),
    ("full-gqa", 1, 8, 4, 2, 16, False, True),
]
CASES_4 = [
    ("causal-zigzag-gqa", 1, 16, 4, 2, 16, True, True),
    ("causal-contiguous", 2, 8, 2, 2, 16, True, False),
    ("full-zigzag-gqa", 1, 8, 4, 2, 16, False, True),
]


def _inputs(batch, seqlen, hq, hkv, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen, hq, dim, generator=gen)
    k = torch.randn(batch, seqlen, hkv, dim, generator=gen)
    v = torch.randn(batch, seqlen, hkv, dim, generator=gen)
    dout = torch.randn(batch, seqlen, hq, dim, generator=gen)
    return q, k, v, dout


def _ring_worker(rank: int, world: int, cases, backend: str, overlap: bool) -> dict:
    """Run every case on this rank; return the max errors vs the full-sequence reference."""
    results = {}
    for name, batch, t_local, hq, hkv, dim, causal, zigzag in cases:
        q, k, v, dout = _inputs(batch, t_local * world, hq, hkv, dim)
        # The loss also reaches the LSE, so its gradient path (dLSE) is checked too.
        dlse = torch.randn(batch, hq, t_local * world, generator=torch.Generator().manual_seed(1))
        ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
        ref, ref_lse = fused_attention(*ref_in, causal=causal, backend="sdpa", return_lse=True)
        ((ref * dout).sum() + (ref_lse * dlse).sum()).backward()

        def shard(x, zigzag=zigzag, dim=1):
            return zigzag_shard(x, rank, world, dim) if zigzag else contiguous_shard(x, rank, world, dim)

        local = [shard(t).clone().requires_grad_() for t in (q, k, v)]
        out, lse = ring_attention(
            *local, causal=causal, zigzag=zigzag, backend=backend, overlap=overlap, return_lse=True
        )
        ((out * shard(dout)).sum() + (lse * shard(dlse, dim=2)).sum()).backward()
        results[name] = {
            "out": (out - shard(ref)).abs().max().item(),
            "lse": (lse - shard(ref_lse, dim=2)).abs().max().item(),
            "dq": (local[0].grad - shard(ref_in[0].grad)).abs().max().item(),
            "dk": (local[1].grad - shard(ref_in[1].grad)).abs().max().item(),
            "dv": (local[2].grad - shard(ref_in[2].grad)).abs().max().item(),
            "dtype_ok": out.dtype == q.dtype and local[1].grad.shape == local[1].shape,
        }
    return results


def _triton_worker(rank: int, world: int) -> dict:
    """Forward and backward with the Triton kernels under the interpreter (env set by the parent)."""
    from stream_attention.core.backend import resolve_backend
    from stream_attention.core.ring_attention import _triton_backward

    cases = [("triton-causal-zigzag-gqa", 1, 32, 4, 2, 16, True, True), ("triton-full", 1, 16, 2, 2, 16, False, False)]
    results = _ring_worker(rank, world, cases, "auto", True)
    results["backend"] = resolve_backend("auto", torch.device("cpu"))
    results["triton_backward"] = _triton_backward() is not None
    return results


def _max_over_ranks(per_rank: list[dict], case: str) -> dict:
    keys = [key for key in per_rank[0][case] if key != "dtype_ok"]
    merged = {key: max(r[case][key] for r in per_rank) for key in keys}
    merged["dtype_ok"] = all(r[case]["dtype_ok"] for r in per_rank)
    return merged


@pytest.fixture(scope="module")
def ring_2() -> list[dict]:
    return launch_local(_ring_worker, 2, (CASES_2, "sdpa", True), timeout_s=TIMEOUT_S)


@pytest.fixture(scope="module")
def ring_4() -> list[dict]:
    return launch_local(_ring_worker, 4, (CASES_4, "sdpa", True), timeout_s=TIMEOUT_S)


@pytest.mark.parametrize("case", [c[0] for c in CASES_2])
def test_ring_two_ranks_matches_single_device(ring_2, case):
    errors = _max_over_ranks(ring_2, case)
    assert errors.pop("dtype_ok")
    assert all(err < ATOL for err in errors.values()), errors


@pytest.mark.parametrize("case", [c[0] for c in CASES_4])
def test_ring_four_ranks_matches_single_device(ring_4, case):
    errors = _max_over_ranks(ring_4, case)
    assert errors.pop("dtype_ok")
    assert all(err < ATOL for err in errors.values()), errors


def test_ring_without_overlap_matches():
    per_rank = launch_local(_ring_worker, 2, (CASES_2[:1], "sdpa", False), timeout_s=TIMEOUT_S)
    errors = _max_over_ranks(per_rank, CASES_2[0][0])
    errors.pop("dtype_ok")
    assert all(err < ATOL for err in errors.values()), errors


def test_ring_triton_interpreter_two_ranks():
    """The per-block kernels are the Triton ones here (TRITON_INTERPRET=1 in the children)."""
    env = {"TRITON_INTERPRET": "1", "STREAM_ATTENTION_BACKEND": "triton"}
    per_rank = launch_local(_triton_worker, 2, timeout_s=TIMEOUT_S, env=env)
    assert all(r["backend"] == "triton" and r["triton_backward"] for r in per_rank)
    for case in ("triton-causal-zigzag-gqa", "triton-full"):
        errors = _max_over_ranks(per_rank, case)
        assert errors.pop("dtype_ok")
        assert all(err < 1e-4 for err in errors.values()), (case, errors)


# ------------------------------------------------------------- single-process parts


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("zigzag", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_block_plan_covers_the_global_mask_exactly(world, zigzag, causal):
    """Union over ring steps of the per-block kernel masks == the global mask, once each."""
    t_local = 6
    seq = t_local * world
    want = torch.ones(seq, seq, dtype=torch.int64)
    if causal:
        want = want.tril()
    got = torch.zeros(seq, seq, dtype=torch.int64)
    work = []
    for rank in range(world):
        q_pos = shard_positions(seq, rank, world, zigzag)
        rank_work = 0
        for src in range(world):
            plan = block_plan(rank, src, t_local, causal, zigzag)
            if plan is None:
                continue
            rows, cols, block_causal = plan
            k_pos = shard_positions(seq, src, world, zigzag)[cols]
            qp = q_pos[rows]
            keep = torch.ones(len(qp), len(k_pos), dtype=torch.int64)
            if block_causal:
                keep = keep.tril(diagonal=len(k_pos) - len(qp))
            got[qp[:, None], k_pos[None, :]] += keep
            rank_work += int(keep.sum())
        work.append(rank_work)
    assert torch.equal(got, want)
    if causal and zigzag:
        assert max(work) == min(work), work  # zigzag balances the causal work


def test_zigzag_shard_roundtrip_and_positions():
    x = torch.arange(24).view(1, 24)
    shards = [zigzag_shard(x, r, 3) for r in range(3)]
    assert shards[0].tolist() == [[0, 1, 2, 3, 20, 21, 22, 23]]
    assert torch.equal(zigzag_unshard(shards), x)
    assert shard_positions(24, 1, 3, True).tolist() == [4, 5, 6, 7, 16, 17, 18, 19]
    with pytest.raises(ValueError, match="not divisible"):
        zigzag_shard(torch.zeros(1, 10), 0, 3)


def test_merge_partial_handles_rows_that_see_nothing():
    q, k, v, _ = _inputs(1, 8, 2, 2, 16)
    full, full_lse = fused_attention(q, k, v, causal=False, backend="sdpa", return_lse=True)
    out = torch.zeros(1, 8, 2, 16)
    lse = torch.full((1, 2, 8), -math.inf)
    empty_out, empty_lse = torch.zeros(1, 8, 2, 16), torch.full((1, 2, 8), -math.inf)
    merge_partial_(out, lse, empty_out, empty_lse)  # -inf with -inf stays empty, no NaN
    assert torch.isneginf(lse).all() and not out.isnan().any() and (out == 0).all()
    for part in (slice(0, 3), slice(3, 8)):
        o, l_ = fused_attention(q, k[:, part], v[:, part], causal=False, backend="sdpa", return_lse=True)
        merge_partial_(out, lse, o, l_)
    merge_partial_(out, lse, empty_out, empty_lse)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_block_backward_reference_matches_autograd(causal):
    """Per-block gradients with the global out/LSE sum to the full attention's gradients."""
    q, k, v, dout = _inputs(1, 12, 4, 2, 16, seed=3)
    k_full = torch.cat([k, torch.randn(1, 5, 2, 16)], dim=1)
    v_full = torch.cat([v, torch.randn(1, 5, 2, 16)], dim=1)
    ref_in = [t.clone().requires_grad_() for t in (q, k_full, v_full)]
    ref, lse = fused_attention(*ref_in, causal=causal, backend="sdpa", return_lse=True)
    ref.backward(dout)
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for part, part_causal in ((slice(0, 5), False), (slice(5, 17), causal)):
        g = block_backward_reference(
            dout, q, k_full[:, part], v_full[:, part], ref.detach(), lse, causal=part_causal, softmax_scale=16**-0.5
        )
        dq += g[0]
        dks.append(g[1])
        dvs.append(g[2])
    torch.testing.assert_close(dq, ref_in[0].grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat(dks, 1), ref_in[1].grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat(dvs, 1), ref_in[2].grad, atol=1e-5, rtol=1e-4)


def test_ring_of_one_process_is_plain_attention():
    """Without torch.distributed the ring has one rank and one diagonal step."""
    from stream_attention.core.config import StreamAttentionConfig

    q, k, v, dout = _inputs(1, 10, 4, 2, 16)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = fused_attention(*ref_in, causal=True, backend="sdpa")
    ref.backward(dout)
    module = RingAttention(StreamAttentionConfig(num_heads=4, head_dim=16, num_kv_heads=2, backend="sdpa"))
    local = [t.clone().requires_grad_() for t in (q, k, v)]
    out = module(*local)
    out.backward(dout)
    assert module.world_size == 1 and torch.equal(module.shard(q), q)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for mine, theirs in zip(local, ref_in, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="attention_mask"):
        module(q, k, v, attention_mask=torch.ones(1, 10, dtype=torch.bool))


def _failing_worker(rank: int, world: int) -> None:
    if rank == 1:
        raise RuntimeError("boom on rank 1")


def test_launch_local_reports_a_failing_rank():
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        launch_local(_failing_worker, 2, timeout_s=60.0)


# ------------------------------------------------- every rank's blocks in one process


def _simulated_ring(q, k, v, dout, world, causal, zigzag, backend):
    """The ring's per-block schedule for every rank, run in one process (no transfers).

    Same ``block_plan``, per-block kernels (strided half-shard views included), LSE
    merges and dK/dV accumulation as the distributed code; what it leaves out is only
    the movement of the blocks. Returns the unsharded output and gradients.
    """
    from stream_attention.core.ring_attention import _block_backward, _block_forward

    def shard(x, rank, dim=1):
        return zigzag_shard(x, rank, world, dim) if zigzag else contiguous_shard(x, rank, world, dim)

    def unshard(parts, dim=1):
        return zigzag_unshard(parts, dim) if zigzag else torch.cat(parts, dim)

    scale = q.shape[-1] ** -0.5
    qs, ks, vs, dos = ([shard(t, r) for r in range(world)] for t in (q, k, v, dout))
    t_local = qs[0].shape[1]
    outs, lses = [], []
    for rank in range(world):
        out = torch.zeros(qs[rank].shape, dtype=torch.float32, device=q.device)
        lse = torch.full((q.shape[0], q.shape[2], t_local), -math.inf, device=q.device)
        for src in range(world):
            plan = block_plan(rank, src, t_local, causal, zigzag)
            if plan is not None:
                rows, cols, block_causal = plan
                o, l_ = _block_forward(
                    qs[rank][:, rows], ks[src][:, cols], vs[src][:, cols], block_causal, scale, backend
                )
                merge_partial_(out[:, rows], lse[:, :, rows], o, l_)
        outs.append(out.to(q.dtype))
        lses.append(lse)
    dq = [torch.zeros(t.shape, dtype=torch.float32, device=q.device) for t in qs]
    dk = [torch.zeros(t.shape, dtype=torch.float32, device=q.device) for t in ks]
    dv = [torch.zeros(t.shape, dtype=torch.float32, device=q.device) for t in vs]
    for rank in range(world):
        for src in range(world):
            plan = block_plan(rank, src, t_local, causal, zigzag)
            if plan is None:
                continue
            rows, cols, block_causal = plan
            g = _block_backward(
                dos[rank][:, rows], qs[rank][:, rows], ks[src][:, cols], vs[src][:, cols],
                outs[rank][:, rows], lses[rank][:, :, rows], block_causal, scale, backend, None,
            )  # fmt: skip
            dq[rank][:, rows] += g[0]
            dk[src][:, cols] += g[1]
            dv[src][:, cols] += g[2]
    return unshard(outs), unshard(dq), unshard(dk), unshard(dv)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize(("world", "zigzag"), [(3, True), (3, False)])
def test_simulated_ring_with_triton_kernels_odd_world(world, zigzag):
    """Three 'ranks' through the Triton forward and backward kernels (interpreter on CPU)."""
    q, k, v, dout = _inputs(1, 16 * world, 2, 1, 16, seed=4)
    if q.device.type == "cpu":
        from stream_attention.kernels.runtime import interpreter_enabled

        if not interpreter_enabled():
            pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = fused_attention(*ref_in, causal=True, backend="sdpa")
    ref.backward(dout)
    out, dq, dk, dv = _simulated_ring(q, k, v, dout, world, True, zigzag, "triton")
    for got, want in ((out, ref), (dq, ref_in[0].grad), (dk, ref_in[1].grad), (dv, ref_in[2].grad)):
        torch.testing.assert_close(got.float(), want, atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_simulated_ring_bf16_cuda(causal):
    """Four 'ranks' on one GPU, bf16, Triton kernels: equal to single-GPU attention."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape_q, shape_kv = (2, 2048, 8, 128), (2, 2048, 2, 128)
    q, dout = (torch.randn(shape_q, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(shape_kv, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = fused_attention(*ref_in, causal=causal)
    ref.backward(dout)
    out, dq, dk, dv = _simulated_ring(q, k, v, dout, 4, causal, True, "triton")
    errors = {
        "out": _rel(out, ref),
        "dq": _rel(dq, ref_in[0].grad),
        "dk": _rel(dk, ref_in[1].grad),
        "dv": _rel(dv, ref_in[2].grad),
    }
    assert all(e < 2e-2 for e in errors.values()), errors


def _nccl_worker(rank: int, world: int) -> dict:
    torch.cuda.set_device(rank)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, dout = (torch.randn(1, 4096, 8, 128, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(1, 4096, 2, 128, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = fused_attention(*ref_in, causal=True)
    ref.backward(dout)
    local = [zigzag_shard(t, rank, world).detach().clone().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, causal=True)
    out.backward(zigzag_shard(dout, rank, world))
    pairs = [(out, ref)] + [(mine.grad, theirs.grad) for mine, theirs in zip(local, ref_in, strict=True)]
    return {
        name: _rel(got, zigzag_shard(want, rank, world))
        for name, (got, want) in zip(("out", "dq", "dk", "dv"), pairs, strict=True)
    }


@pytest.mark.gpu
def test_ring_nccl_multi_gpu_bf16():
    """Real ranks on NCCL (needs two GPUs or more; NVLink multicast kept off)."""
    count = torch.cuda.device_count()
    if count < 2:
        pytest.skip("needs at least two GPUs")
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    per_rank = launch_local(_nccl_worker, min(count, 4), backend="nccl", timeout_s=240.0, env=env)
    worst = {key: max(r[key] for r in per_rank) for key in per_rank[0]}
    assert all(e < 2e-2 for e in worst.values()), worst
