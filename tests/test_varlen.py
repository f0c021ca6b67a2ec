"""Packed variable-length attention: forward and backward equal the per-sequence loop."""

from __future__ import annotations

import pytest
import torch

from stream_attention.core.functional import fused_attention, fused_attention_varlen
from stream_attention.kernels.masks_dropout import dropout_keep_mask
from tests.attention_reference import grads, nan_poisoned_allocations, reference_attention, rel_err

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")


def _packed(device, dtype, lens_q, lens_k, hq, hkv, d, tail=0):
    """Packed q/k/v plus ``tail`` NaN-poisoned tokens after the last sequence."""
    total_q, total_k = sum(lens_q) + tail, sum(lens_k) + tail
    q = torch.randn(total_q, hq, d, device=device, dtype=dtype)
    k = torch.randn(total_k, hkv, d, device=device, dtype=dtype)
    v = torch.randn(total_k, hkv, d, device=device, dtype=dtype)
    if tail:
        for t in (q, k, v):
            t[-tail:] = float("nan")
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return [t.requires_grad_() for t in (q, k, v)], cu_q, cu_k


# lengths of q and k per sequence: empty sequences, Tq != Tk, Tq > Tk (rows that see nothing)
LENS = ([5, 0, 17, 33, 9], [5, 3, 24, 33, 4])


@pytest.mark.parametrize(
    "causal,window,hq,hkv,d",
    [(True, None, 4, 2, 24), (False, None, 2, 2, 16), (True, (7, -1), 3, 1, 40), (False, (4, 6), 2, 1, 32)],
)
def test_varlen_equals_per_sequence_loop(device, causal, window, hq, hkv, d):
    lens_q, lens_k = LENS
    (q, k, v), cu_q, cu_k = _packed(device, torch.float32, lens_q, lens_k, hq, hkv, d, tail=3)
    dout = torch.randn_like(q)
    out, lse = fused_attention_varlen(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, window=window, return_lse=True, backend="triton"
    )
    body = slice(0, sum(lens_q))
    dq, dk, dv = grads((out[body] * dout[body]).sum(), q, k, v)
    # Tokens after the last sequence: zeros out, -inf LSE, zero grads, NaN inputs never read.
    assert torch.equal(out[body.stop :], torch.zeros_like(out[body.stop :]))
    assert torch.isneginf(lse[:, body.stop :]).all()
    assert torch.equal(dq[body.stop :], torch.zeros_like(dq[body.stop :]))
    assert torch.equal(dk[sum(lens_k) :], torch.zeros_like(dk[sum(lens_k) :]))
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()

    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(lens_q)):
        qs, ks, vs = (
            q[cq[b] : cq[b + 1]].detach()[None].requires_grad_(),
            k[ck[b] : ck[b + 1]].detach()[None].requires_grad_(),
            v[ck[b] : ck[b + 1]].detach()[None].requires_grad_(),
        )
        if qs.shape[1] == 0:
            continue
        dos = dout[cq[b] : cq[b + 1]][None]
        ref, ref_lse = reference_attention(qs, ks, vs, causal=causal, window=window)
        want = grads((ref * dos.double()).sum(), qs, ks, vs) if ks.shape[1] else None
        assert rel_err(out[cq[b] : cq[b + 1]], ref[0]) <= 1e-5
        seq_lse = lse[:, cq[b] : cq[b + 1]]
        finite = torch.isfinite(ref_lse[0])
        assert torch.equal(torch.isneginf(seq_lse), ~finite)
        assert rel_err(seq_lse[finite], ref_lse[0][finite]) <= 1e-5
        if want is None:
            continue
        assert rel_err(dq[cq[b] : cq[b + 1]], want[0][0]) <= 1e-5
        assert rel_err(dk[ck[b] : ck[b + 1]], want[1][0]) <= 1e-5
        assert rel_err(dv[ck[b] : ck[b + 1]], want[2][0]) <= 1e-5

        # The same sequence through the dense kernel gives the same numbers.
        dense = fused_attention(qs.detach(), ks.detach(), vs.detach(), causal=causal, window=window, backend="triton")
        assert rel_err(out[cq[b] : cq[b + 1]], dense[0]) <= 1e-6


def test_varlen_fp16(device):
    lens_q = lens_k = [19, 7, 30]
    (q, k, v), cu_q, cu_k = _packed(device, torch.float16, lens_q, lens_k, 4, 2, 32)
    dout = torch.randn_like(q)
    out = fused_attention_varlen(q, k, v, cu_q, cu_k, 30, 30, causal=True, backend="triton")
    got = grads((out.float() * dout.float()).sum(), q, k, v)
    refs = []
    for b in range(3):
        s = slice(int(cu_q[b]), int(cu_q[b + 1]))
        qs, ks, vs = (t[s][None] for t in (q, k, v))
        ref, _ = reference_attention(qs, ks, vs, causal=True)
        refs.append(ref[0])
    ref = torch.cat(refs)
    want = grads((ref * dout.double()).sum(), q, k, v)
    assert rel_err(out, ref) <= 2e-3
    for g, r in zip(got, want, strict=True):
        assert rel_err(g, r) <= 2e-3


def test_varlen_sdpa_fallback_matches_triton(device):
    lens_q, lens_k = [6, 14, 0], [9, 14, 2]
    (q, k, v), cu_q, cu_k = _packed(device, torch.float32, lens_q, lens_k, 2, 1, 16)
    results = []
    for backend in ("triton", "sdpa"):
        out, lse = fused_attention_varlen(q, k, v, cu_q, cu_k, 14, 14, causal=True, return_lse=True, backend=backend)
        results.append((out, lse, grads(out.square().sum(), q, k, v)))
    (o1, l1, g1), (o2, l2, g2) = results
    assert rel_err(o1, o2) <= 1e-5
    finite = torch.isfinite(l2)
    assert torch.equal(torch.isfinite(l1), finite) and rel_err(l1[finite], l2[finite]) <= 1e-5
    for a, b in zip(g1, g2, strict=True):
        assert rel_err(a, b) <= 1e-5


def test_varlen_writes_every_output_element(device):
    lens = [13, 1, 22]
    (q, k, v), cu_q, cu_k = _packed(device, torch.float32, lens, lens, 2, 2, 16)
    with nan_poisoned_allocations():
        out = fused_attention_varlen(q, k, v, cu_q, cu_k, 22, 22, causal=False, backend="triton")
        dq, dk, dv = grads(out.sum(), q, k, v)
    for t in (out, dq, dk, dv):
        assert not torch.isnan(t).any()


def test_varlen_dropout_replays_rebuilt_mask(device):
    lens_q, lens_k = [11, 20], [15, 20]
    (q, k, v), cu_q, cu_k = _packed(device, torch.float32, lens_q, lens_k, 2, 1, 16)
    p, seed = 0.25, 4242
    out = fused_attention_varlen(
        q, k, v, cu_q, cu_k, 20, 20, causal=True, dropout_p=p, dropout_seed=seed, backend="triton"
    )
    dout = torch.randn_like(out)
    got = grads((out * dout).sum(), q, k, v)
    keep = dropout_keep_mask(seed, 2, 2, 20, 20, p, device=device)
    refs = []
    for b in range(2):
        sq, sk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        kb = keep[b : b + 1, :, : lens_q[b], : lens_k[b]]
        ref, _ = reference_attention(q[sq][None], k[sk][None], v[sk][None], causal=True, keep=kb, dropout_p=p)
        refs.append(ref[0])
    ref = torch.cat(refs)
    want = grads((ref * dout.double()).sum(), q, k, v)
    assert rel_err(out, ref) <= 1e-5
    for g, r in zip(got, want, strict=True):
        assert rel_err(g, r) <= 1e-5


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(q=a["q"][None]), r"q must be 3-D"),
        (lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"][:-1]), r"different numbers of sequences"),
        (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].float()), r"int32 or int64"),
        (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].flip(0)), r"start at 0 and be non-decreasing"),
        (lambda a: a.update(max_seqlen_q=3), r"length 8 > max_seqlen 3"),
        (lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"] * 2), r"ends at 26 beyond k\(13, "),
        (lambda a: a.update(max_seqlen_k=-1), r"max_seqlen_k must be a non-negative int"),
        (lambda a: a.update(v=a["v"][:, :, :8]), r"k and v shapes differ: k\(13, 1, 16\), v\(13, 1, 8\)"),
        (lambda a: a.update(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
    ],
)
def test_varlen_validation_errors(device, mutate, match):
    (q, k, v), cu_q, cu_k = _packed(device, torch.float32, [5, 8], [5, 8], 2, 1, 16)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=8, max_seqlen_k=8)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        fused_attention_varlen(**args, validate=True)


@pytest.mark.gpu
def test_varlen_bf16_gpu():
    device = torch.device("cuda")
    lens_q, lens_k = [1000, 17, 513, 2048], [1200, 17, 513, 2048]
    (q, k, v), cu_q, cu_k = _packed(device, torch.bfloat16, lens_q, lens_k, 8, 2, 128)
    out = fused_attention_varlen(q, k, v, cu_q, cu_k, 2048, 2048, causal=True, backend="triton")
    dout = torch.randn_like(out)
    got = grads((out.float() * dout.float()).sum(), q, k, v)
    refs = []
    for b in range(4):
        sq, sk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        ref, _ = reference_attention(q[sq][None].float(), k[sk][None].float(), v[sk][None].float(), causal=True)
        refs.append(ref[0])
    ref = torch.cat(refs)
    want = grads((ref * dout.double()).sum(), q, k, v)
    assert rel_err(out, ref) <= 1e-2
    for g, r in zip(got, want, strict=True):
        assert rel_err(g, r) <= 2e-2
