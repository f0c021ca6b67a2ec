"""Pieces shared by ring attention, star attention and the distributed engine.

* LSE algebra: merging partial attention results computed over disjoint key sets,
  locally (``merge_partial_``) and across ranks (``allreduce_partials``). Both are exact:
  if ``o_i = softmax(S_i) V_i`` and ``l_i = logsumexp(S_i)``, the attention over the
  union is ``sum_i exp(l_i - L) o_i`` with ``L = logsumexp_i(l_i)``.
* Sequence sharding: contiguous and zigzag layouts and their inverses.
* ``RingComm``: asynchronous neighbour exchange through ``dist.batch_isend_irecv``
  (the same calls run on NCCL and gloo).
* ``launch_local``: spawn N local processes with a gloo/NCCL group on a free loopback
  port, with a hard deadline; used by the tests and by the engine's ``--world-size``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import queue as queue_mod
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

NEG_INF = float("-inf")


# --------------------------------------------------------------------------- groups


def group_info(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(world_size, rank)`` of ``group``; ``(1, 0)`` when torch.distributed is not up."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    """Global rank of ``group_rank`` in ``group``.

    P2P ops and ``broadcast(src=...)`` take global ranks on every torch version we
    support (``group_peer`` only exists on recent ones).
    """
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


# ------------------------------------------------------------------------ LSE algebra


def _safe_max(lse: torch.Tensor) -> torch.Tensor:
    # A row that has seen no key anywhere has every LSE at -inf; subtracting -inf from
    # -inf is NaN, so such rows are shifted by 0 instead (their weights become 0).
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def merge_partial_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Merge one partial result into a running one, in place.

    Args:
        out: running output ``[B, T, H, D]`` (fp32; updated in place, may be a view).
        lse: running log-sum-exp ``[B, H, T]`` (fp32; updated in place, may be a view).
        block_out: the new partial output ``[B, T, H, D]`` (any float dtype).
        block_lse: its log-sum-exp ``[B, H, T]``; ``-inf`` for rows that saw no key.
    """
    block_lse = block_lse.to(lse.dtype)
    new_lse = torch.logaddexp(lse, block_lse)
    shift = _safe_max(new_lse)
    w_old = torch.exp(lse - shift).transpose(1, 2).unsqueeze(-1)
    w_new = torch.exp(block_lse - shift).transpose(1, 2).unsqueeze(-1)
    out.mul_(w_old).add_(block_out.to(out.dtype) * w_new)
    lse.copy_(new_lse)


def allreduce_partials(
    out: torch.Tensor, lse: torch.Tensor, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax merge of per-rank partial attention over disjoint key shards.

    Every rank holds the same queries' partial ``out [B, T, H, D]`` and ``lse [B, H, T]``
    over its own keys. Two collectives: an all-reduce(MAX) of the LSE for a common
    shift, then one all-reduce(SUM) of ``[w * out | w]`` with ``w = exp(lse - max)``.
    Returns the merged ``(out, lse)`` (out in ``out``'s dtype, lse fp32) on every rank.
    """
    world, _ = group_info(group)
    lse = lse.float()
    if world == 1:
        return out, lse
    shift = lse.clone()
    dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    shift = _safe_max(shift)
    weight = torch.exp(lse - shift).transpose(1, 2).unsqueeze(-1)  # [B, T, H, 1]
    packed = torch.cat([out.float() * weight, weight], dim=-1).contiguous()
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    num, den = packed[..., :-1], packed[..., -1:]
    merged = num / torch.where(den == 0, torch.ones_like(den), den)
    merged_lse = shift + torch.log(den.squeeze(-1).transpose(1, 2))
    return merged.to(out.dtype), merged_lse


# ------------------------------------------------------------------------- sharding


def _check_divisible(length: int, parts: int, what: str) -> None:
    if length % parts:
        raise ValueError(f"{what}: sequence length {length} is not divisible by {parts}")


def contiguous_shard(x: torch.Tensor, rank: int, world: int, dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s contiguous ``1/world`` slice of ``x`` along ``dim``."""
    _check_divisible(x.shape[dim], world, "contiguous_shard")
    return x.chunk(world, dim=dim)[rank]


def zigzag_shard(x: torch.Tensor, rank: int, world: int, dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s zigzag shard of ``x`` along ``dim``.

    The sequence is cut into ``2 * world`` equal chunks; rank ``r`` keeps chunks ``r``
    and ``2 * world - 1 - r``, so every rank owns as much causal work as any other
    (one early and one late chunk).
    """
    _check_divisible(x.shape[dim], 2 * world, "zigzag_shard")
    chunks = x.chunk(2 * world, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)


def zigzag_unshard(shards: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`zigzag_shard`: rebuild the sequence from every rank's shard (rank order)."""
    halves = [s.chunk(2, dim=dim) for s in shards]
    firsts = [h[0] for h in halves]
    seconds = [h[1] for h in reversed(halves)]
    return torch.cat(firsts + seconds, dim=dim)


def shard_positions(seq_len: int, rank: int, world: int, zigzag: bool) -> torch.Tensor:
    """Global token positions (int64) held by ``rank`` under either layout."""
    positions = torch.arange(seq_len)
    if zigzag:
        return zigzag_shard(positions, rank, world, dim=0)
    return contiguous_shard(positions, rank, world, dim=0)


def gather_sequence(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, zigzag: bool = False, dim: int = 1
) -> torch.Tensor:
    """All-gather equal shards along ``dim`` and undo the sharding layout."""
    world, _ = group_info(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return zigzag_unshard(parts, dim=dim) if zigzag else torch.cat(parts, dim=dim)


# ----------------------------------------------------------------------- ring comms


class PendingExchange:
    """Received tensors of an in-flight :meth:`RingComm.exchange`; ``wait()`` returns them."""

    def __init__(self, works: list[Any], received: list[torch.Tensor], sent: list[torch.Tensor]) -> None:
        self._works = works
        self._received = received
        # The sent tensors must stay alive until the transfer is done (a temporary
        # from ``.contiguous()`` would otherwise be freed while in flight).
        self._sent = sent

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        self._works, self._sent = [], []
        return self._received


class RingComm:
    """Send to the next rank of the ring and receive from the previous one, asynchronously.

    Every exchange is one ``batch_isend_irecv`` holding all sends and receives, so on
    NCCL it is a single grouped launch and no pair of ranks can deadlock waiting for
    each other. Exchanges must be issued in the same order on every rank.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.world, self.rank = group_info(group)
        self.next = global_rank(group, (self.rank + 1) % self.world)
        self.prev = global_rank(group, (self.rank - 1) % self.world)

    def exchange(self, tensors: Sequence[torch.Tensor]) -> PendingExchange:
        """Post sends of ``tensors`` to the next rank and receives of same-shaped ones."""
        sends = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in sends]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in sends]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in received]
        return PendingExchange(list(dist.batch_isend_irecv(ops)), received, sends)


# ------------------------------------------------------------------------ launching


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def patched_environ(values: dict[str, str]) -> Iterator[None]:
    """Temporarily set environment variables (spawned children inherit them at start)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _worker_entry(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    backend: str,
    init_method: str,
    timeout_s: float,
    args: tuple[Any, ...],
    results: Any,
) -> None:
    status, payload = "ok", b""
    try:
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        try:
            payload = pickle.dumps(fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        status, payload = "error", traceback.format_exc().encode()
    # Plain pickle bytes, not torch's shared-memory reduction: the tensors must not
    # depend on this process staying alive after it exits.
    results.put((rank, status, payload))


def launch_local(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...] = (),
    *,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes.

    Each process joins a ``backend`` process group rendezvousing on a free loopback
    port. ``env`` is set in the children's environment before they start (so it is in
    place before they import anything). Returns the per-rank return values (which must
    pickle). Raises ``RuntimeError`` with the child's traceback if any rank fails and
    ``TimeoutError`` after ``timeout_s`` seconds, killing every child either way.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{find_free_port()}"
    # Collectives time out a bit before the parent gives up, so a hung rank reports
    # an error instead of being killed silently.
    collective_timeout = max(5.0, timeout_s - 5.0)
    procs = []
    with patched_environ(dict(env or {})):
        for rank in range(world_size):
            proc = ctx.Process(
                target=_worker_entry,
                args=(fn, rank, world_size, backend, init_method, collective_timeout, args, results),
                daemon=True,
            )
            proc.start()
            procs.append(proc)
    deadline = time.monotonic() + timeout_s
    outputs: dict[int, Any] = {}
    errors: list[str] = []
    # SIGTERM would end this process without its ``finally`` and orphan the ranks;
    # turned into SystemExit, the cleanup below still kills them.
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        while len(outputs) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{world_size} ranks did not finish within {timeout_s:.0f} s")
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    codes = ", ".join(f"rank {procs.index(p)} exit {p.exitcode}" for p in dead)
                    raise RuntimeError(f"a rank died without reporting ({codes})") from None
                continue
            if status == "ok":
                outputs[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank}:\n{payload.decode()}")
                # One failure usually strands the others in a collective; stop now.
                break
        if errors:
            raise RuntimeError("distributed worker failed\n" + "\n".join(errors))
        for proc in procs:
            proc.join(timeout=max(1.0, deadline - time.monotonic()))
        return [outputs[r] for r in range(world_size)]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        results.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)
