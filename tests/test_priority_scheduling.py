"""``scheduling_policy="priority"``: the waiting queue in (priority, arrival) order, and the
lowest priority preempted first. At the scheduler level, with real block accounting."""

from __future__ import annotations

import pytest

from stream_attention.engine import EngineConfig, FinishReason, SamplingParams
from stream_attention.engine.block_manager import BlockManager
from stream_attention.engine.scheduler import Scheduler
from stream_attention.engine.sequence import Sequence


def _scheduler(policy: str, num_blocks: int = 64, **kw) -> Scheduler:
    bm = BlockManager(num_blocks, 4, enable_prefix_caching=False)
    args = dict(max_num_seqs=64, max_num_batched_tokens=1024, max_waiting=100, admission_reserve_blocks=0)
    return Scheduler(bm, policy=policy, **{**args, **kw})


def _seq(name: str, priority: int, arrival: float, prompt_len: int = 4) -> Sequence:
    return Sequence(name, list(range(10, 10 + prompt_len)), SamplingParams(max_tokens=32), arrival_time=arrival,
                    priority=priority)


def _step(sched: Scheduler):
    """One scheduled step as the engine runs it: commit, then a token for every sampling row."""
    out = sched.schedule()
    sched.commit(out.scheduled)
    for s in out.scheduled:
        if s.samples:
            s.seq.token_ids.append(7)
    return out


PRIORITIES = [("a", 5), ("b", 0), ("c", 5), ("d", -1), ("e", 0)]


@pytest.mark.parametrize(("policy", "expected"), [("priority", ["d", "b", "e", "a", "c"]),
                                                  ("fcfs", ["a", "b", "c", "d", "e"])])
def test_admission_order(policy: str, expected: list[str]) -> None:
    sched = _scheduler(policy, max_num_seqs=2)
    for t, (name, prio) in enumerate(PRIORITIES):
        sched.add(_seq(name, prio, float(t)))
    admitted = []
    while sched.waiting:
        admitted += [s.seq.request_id for s in _step(sched).scheduled if s.seq.num_output_tokens == 1]
        for seq in list(sched.running):  # make room: the next two are admitted next step
            sched.finish(seq, FinishReason.STOP)
    assert admitted == expected


@pytest.mark.parametrize(("policy", "victim"), [("priority", "low"), ("fcfs", "high")])
def test_preemption_takes_the_lowest_priority_first(policy: str, victim: str) -> None:
    # Five blocks of four tokens. "low" and "mid" run first; "high" arrives a step later and
    # takes the last free block. The step after, "high" needs a second block and none is
    # free: someone is preempted. By priority that is "low"; first-come-first-served takes
    # the newest, "high" itself.
    sched = _scheduler(policy, num_blocks=5)
    sched.add(_seq("low", 9, 0.0))
    sched.add(_seq("mid", 5, 1.0))
    _step(sched)
    sched.add(_seq("high", 0, 2.0))
    assert not _step(sched).preempted
    third = _step(sched)
    assert [s.request_id for s in third.preempted] == [victim]
    assert victim not in [s.seq.request_id for s in third.scheduled]
    assert [s.request_id for s in sched.waiting] == [victim]
    sched.bm.check_invariants(sched.running)


def test_preempted_sequence_waits_by_its_rank() -> None:
    sched = _scheduler("priority", num_blocks=4)
    for t, (name, prio) in enumerate([("high", 0), ("low", 9), ("mid", 1)]):
        sched.add(_seq(name, prio, float(t)))
    _step(sched)
    sched.add(_seq("later-low", 9, 10.0))
    sched.add(_seq("later-high", 0, 11.0))
    assert [s.request_id for s in _step(sched).preempted] == ["low"]
    # "low" arrived before "later-low" (same priority), after every priority-0 request.
    assert [s.request_id for s in sched.waiting] == ["later-high", "low", "later-low"]


def test_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineConfig(scheduling_policy="sjf").validate()
    with pytest.raises(ValueError, match="policy"):
        _scheduler("lifo")


def test_server_refuses_priority_without_the_priority_policy(request: pytest.FixtureRequest) -> None:
    pytest.importorskip("fastapi")
    import httpx

    from tests.test_server import shared_server

    srv = shared_server("main", request.config)  # --scheduling-policy fcfs (the default)
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "priority": 3}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority", r.text
    r = httpx.post(srv.url + "/generate", json={"prompt": "x", "max_tokens": 2, "priority": 0}, timeout=60)
    assert r.status_code == 200, r.text
