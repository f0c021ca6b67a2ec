"""The load generator's arrival schedules, workloads and statistics, and one sweep against the live server.

Everything but the last tests runs without a server: schedules on a fake clock, statistics
from hand-made request records with hand-computed expectations.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import statistics
from pathlib import Path

import pytest

from stream_attention.clients import loadgen
from stream_attention.clients.loadgen_stats import RequestRecord, check_slo, meets_slo, percentiles, summarize
from stream_attention.clients.workload import (
    CharCounter,
    SampledRequest,
    add_shared_prefixes,
    arrival_offsets,
    clip_to_context,
    load_sharegpt,
    lognormal_lengths,
    make_prefixes,
    sample_sharegpt,
)
from stream_attention.models.default import default_model_dir

# ----------------------------------------------------------------------------- arrivals

N_ARRIVALS = 20_000


def _gaps(rate: float, burstiness: float, seed: int = 0) -> list[float]:
    offsets = arrival_offsets(N_ARRIVALS, rate, burstiness, random.Random(seed))
    assert offsets[0] == 0.0 and all(b >= a for a, b in zip(offsets, offsets[1:], strict=False))
    return [b - a for a, b in zip(offsets, offsets[1:], strict=False)]


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_arrival_gaps_have_gamma_mean_and_variance(burstiness: float) -> None:
    """Gaps of gamma(shape k, scale 1/(rate k)): mean 1/rate, variance 1/(rate^2 k).

    Tolerance: 5 standard errors of the estimates for n = 20000 gaps. The sample mean's is
    sd / sqrt(n); the sample variance's is var * sqrt((2 + 6/k) / n) (gamma's excess kurtosis
    is 6/k). A fixed seed makes the check deterministic; 5 SE would rarely fail for any seed.
    """
    rate = 4.0
    gaps = _gaps(rate, burstiness)
    n = len(gaps)
    mean, var = 1 / rate, 1 / (rate**2 * burstiness)
    assert abs(statistics.fmean(gaps) - mean) <= 5 * math.sqrt(var / n)
    assert abs(statistics.variance(gaps) - var) <= 5 * var * math.sqrt((2 + 6 / burstiness) / n)


def test_burstiness_changes_variance_not_mean() -> None:
    bursty, poisson, regular = (_gaps(2.0, b) for b in (0.25, 1.0, 4.0))
    assert statistics.variance(bursty) > 2 * statistics.variance(poisson) > 4 * statistics.variance(regular)
    for gaps in (bursty, poisson, regular):
        assert statistics.fmean(gaps) == pytest.approx(0.5, rel=0.05)  # within 5 SE of the bursty case


def test_infinite_rate_sends_all_at_once_and_bad_values_are_refused() -> None:
    assert arrival_offsets(5, math.inf, 1.0, random.Random(0)) == [0.0] * 5
    assert arrival_offsets(3, 10.0, 1.0, random.Random(7)) == arrival_offsets(3, 10.0, 1.0, random.Random(7))
    for rate, burstiness in ((0.0, 1.0), (-1.0, 1.0), (math.nan, 1.0), (1.0, 0.0), (1.0, -2.0), (1.0, math.inf)):
        with pytest.raises(ValueError, match="rate|burstiness"):
            arrival_offsets(3, rate, burstiness, random.Random(0))


class FakeClock:
    """A clock that only moves when someone sleeps on it."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        await asyncio.sleep(0)  # as a real sleep would, let the requests already started run first
        self.sleeps.append(delay)
        self.now += delay


def test_dispatch_sends_on_schedule_on_a_fake_clock() -> None:
    clock = FakeClock()
    sent: list[tuple[int, float]] = []

    async def send(i: int) -> None:
        sent.append((i, clock()))

    started = asyncio.run(loadgen.dispatch([0.0, 0.5, 0.5, 2.0], send, clock=clock, sleep=clock.sleep))
    assert started == 4 and sent == [(0, 100.0), (1, 100.5), (2, 100.5), (3, 102.0)]
    assert clock.sleeps == [0.5, 1.5]  # no sleep for a request due now

    clock, sent = FakeClock(), []
    started = asyncio.run(
        loadgen.dispatch([0.0, 0.5, 0.9, 1.0, 3.0], send, deadline=1.0, clock=clock, sleep=clock.sleep)
    )
    assert started == 3 and [i for i, _ in sent] == [0, 1, 2]  # arrivals at or after the deadline are not sent

    clock, sent = FakeClock(), []
    offsets = arrival_offsets(6, math.inf, 1.0, random.Random(0))
    asyncio.run(loadgen.dispatch(offsets, send, clock=clock, sleep=clock.sleep))
    assert [t for _, t in sent] == [100.0] * 6 and clock.sleeps == []


@pytest.mark.parametrize(("cap", "peak"), [(2, 2), (None, 6)])
def test_dispatch_max_concurrency_caps_streams_in_flight(cap: int | None, peak: int) -> None:
    in_flight, seen, done = 0, [], []

    async def send(i: int) -> None:
        nonlocal in_flight
        in_flight += 1
        seen.append(in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        done.append(i)

    asyncio.run(loadgen.dispatch([0.0] * 6, send, max_concurrency=cap))
    assert max(seen) == peak and sorted(done) == list(range(6))


# ----------------------------------------------------------------------------- lengths, datasets, prefixes


def test_lognormal_lengths_mean_and_clipping() -> None:
    """Mean within 5 standard errors: a log-normal's sd is mean * sqrt(exp(sigma^2) - 1)."""
    lengths = lognormal_lengths(N_ARRIVALS, 220, 1.0, random.Random(1))
    sd = 220 * math.sqrt(math.e - 1)
    assert abs(statistics.fmean(lengths) - 220) <= 5 * sd / math.sqrt(N_ARRIVALS) + 0.5  # + rounding to ints
    assert min(lengths) >= 1 and max(lengths) > 4 * 220  # long-tailed
    assert lognormal_lengths(5, 37, 0.0, random.Random(0)) == [37] * 5
    assert clip_to_context(3000, 500, 2048) == (2047, 1)
    assert clip_to_context(1000, 1500, 2048) == (1000, 1048)
    assert clip_to_context(0, 0, 16) == (1, 1)
    with pytest.raises(ValueError):
        lognormal_lengths(3, 0.5, 1.0, random.Random(0))


def _write_sharegpt(path: Path, jsonl: bool) -> None:
    entries = [
        {"id": "a", "conversations": [{"from": "human", "value": "p" * 40}, {"from": "gpt", "value": "c" * 80}]},
        {"id": "sys", "conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "q" * 20},
                                        {"from": "gpt", "value": "d" * 16}, {"from": "human", "value": "more"}]},
        {"id": "gpt-first", "conversations": [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "r" * 24},
                                              {"from": "human", "value": "again"}, {"from": "gpt", "value": "e" * 32}]},
        {"id": "human-only", "conversations": [{"from": "human", "value": "alone"}]},
        {"id": "short", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "c" * 40}]},
        {"id": "long", "conversations": [{"from": "human", "value": "s" * 400}, {"from": "gpt", "value": "f" * 400}]},
        {"id": "no-conversations"},
    ]  # fmt: skip
    text = "\n".join(json.dumps(e) for e in entries) if jsonl else json.dumps(entries)
    path.write_text(text)


@pytest.mark.parametrize("jsonl", [False, True])
def test_sharegpt_parsing(tmp_path: Path, jsonl: bool) -> None:
    path = tmp_path / ("data.jsonl" if jsonl else "data.json")
    _write_sharegpt(path, jsonl)
    assert load_sharegpt(path) == [
        ("p" * 40, "c" * 80),
        ("q" * 20, "d" * 16),
        ("r" * 24, "e" * 32),  # the first human turn, and the first gpt turn after it
        ("hi", "c" * 40),
        ("s" * 400, "f" * 400),
    ]


def test_sharegpt_bad_files_name_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": []}\n{not json\n')
    with pytest.raises(ValueError, match="line 2"):
        load_sharegpt(bad)
    empty = tmp_path / "empty.json"
    empty.write_text('[{"conversations": [{"from": "gpt", "value": "only"}]}]')
    with pytest.raises(ValueError, match="no conversation"):
        load_sharegpt(empty)
    with pytest.raises(ValueError, match="missing.json"):
        load_sharegpt(tmp_path / "missing.json")


def test_sharegpt_sampling_filters_like_vllm(tmp_path: Path) -> None:
    """At 4 characters a token: 'hi' (1 token) is too short, 100 + 100 tokens too long for 150."""
    path = tmp_path / "data.json"
    _write_sharegpt(path, jsonl=False)
    pairs = load_sharegpt(path)
    sampled = asyncio.run(sample_sharegpt(pairs, 3, CharCounter(), 150, random.Random(0)))
    expected = {("p" * 40, 10, 20), ("q" * 20, 5, 4), ("r" * 24, 6, 8)}
    assert {(r.prompt, r.prompt_len, r.output_len) for r in sampled} == expected
    # More requests than fitting pairs: the fitting ones are drawn again.
    many = asyncio.run(sample_sharegpt(pairs, 10, CharCounter(), 150, random.Random(0)))
    assert len(many) == 10 and {(r.prompt, r.prompt_len, r.output_len) for r in many} == expected
    with pytest.raises(ValueError, match="fits"):
        asyncio.run(sample_sharegpt(pairs, 3, CharCounter(), 8, random.Random(0)))


def test_shared_prefix_fraction() -> None:
    requests = [SampledRequest([i], 1, 1) for i in range(40)]
    prefixes = make_prefixes(3, 5, random.Random(0), vocab_size=100)
    assert len(prefixes) == 3 and all(len(p) == 5 and all(10 <= t < 100 for t in p) for p in prefixes)
    out = add_shared_prefixes(requests, 0.25, prefixes, 5, random.Random(0))
    with_prefix = [r for r in out if r.prefix is not None]
    assert len(with_prefix) == 10 and all(r.prefix in prefixes and r.prefix_len == 5 for r in with_prefix)
    assert [r.prompt for r in out] == [r.prompt for r in requests]  # own prompts untouched, order kept
    assert all(r.prefix is None for r in add_shared_prefixes(requests, 0.0, prefixes, 5, random.Random(0)))
    assert all(r.prefix is not None for r in add_shared_prefixes(requests, 1.0, prefixes, 5, random.Random(0)))
    with pytest.raises(ValueError, match="fraction"):
        add_shared_prefixes(requests, 1.5, prefixes, 5, random.Random(0))
    text = make_prefixes(2, 7, random.Random(0), vocab_size=None)
    assert all(isinstance(p, str) and len(p.split()) == 7 for p in text)


def test_request_bodies_put_the_prefix_first() -> None:
    cfg = loadgen.LoadConfig()
    ids = SampledRequest([5, 6], 2, 3, prefix=[1, 2, 3], prefix_len=3)
    assert loadgen._body(cfg, ids)["prompt_token_ids"] == [1, 2, 3, 5, 6]
    assert loadgen._body(cfg, ids)["max_tokens"] == 3
    text = SampledRequest("question", 2, 4, prefix="system words", prefix_len=2)
    assert loadgen._body(loadgen.LoadConfig(endpoint="completions"), text)["prompt"] == "system words\n\nquestion"
    chat = loadgen._body(loadgen.LoadConfig(endpoint="chat"), text)
    assert chat["messages"] == [{"role": "system", "content": "system words"}, {"role": "user", "content": "question"}]


# ----------------------------------------------------------------------------- statistics


def test_percentiles_nearest_rank() -> None:
    assert percentiles([5.0, 1.0, 4.0, 2.0, 3.0]) == {"p50": 3.0, "p90": 5.0, "p99": 5.0, "mean": 3.0}
    ten = percentiles([float(x) for x in range(10, 0, -1)])
    assert (ten["p50"], ten["p90"], ten["p99"], ten["mean"]) == (5.0, 9.0, 10.0, 5.5)
    assert percentiles([7.0]) == {"p50": 7.0, "p90": 7.0, "p99": 7.0, "mean": 7.0}


def _timed(start: float, events: list[tuple[float, int]], end: float) -> RequestRecord:
    """A request timed on a fake clock: token events at given times, the last event at ``end``."""
    r = RequestRecord(ok=False, start=start)
    for now, n in events:
        r.tokens_arrived(now, n)
    r.finished(end)
    return r


def test_ttft_itl_tpot_on_a_fake_clock() -> None:
    r = _timed(10.0, [(10.5, 1), (10.7, 2), (11.0, 1)], 11.2)
    assert r.ttft == pytest.approx(0.5) and r.e2e == pytest.approx(1.2) and r.output_tokens == 4
    assert r.itl == pytest.approx([0.1, 0.1, 0.3])  # the 0.2 s gap shared by the 2 tokens it brought
    s = summarize([r], elapsed=2.0)
    assert s["tpot_s"]["p50"] == pytest.approx((1.2 - 0.5) / (4 - 1))  # (e2e - ttft) / (tokens - 1)
    assert summarize([_timed(0.0, [(0.3, 1)], 0.4)], 1.0)["tpot_s"]["p50"] is None  # one token: no TPOT


def test_throughput_and_goodput_by_hand() -> None:
    """SLO TTFT <= 100 ms and TPOT <= 20 ms, requests counted by hand over a 2 s run."""
    records = [
        _timed(0.0, [(0.05, 1), (0.06, 1), (0.07, 1)], 0.07),  # ttft 50, tpot 10: good
        _timed(0.0, [(0.15, 1), (0.16, 1)], 0.16),  # ttft 150: bad
        _timed(0.0, [(0.08, 1), (0.11, 1)], 0.11),  # tpot 30: bad
        _timed(0.0, [(0.09, 1)], 0.09),  # one token, ttft 90: good (no TPOT to miss)
        _timed(0.0, [(0.02, 2), (0.05, 2)], 0.05),  # ttft 20, tpot (50-20)/3 = 10: good
        RequestRecord(ok=False, status=503, error="HTTP 503: busy"),  # failed
    ]
    dropped = _timed(0.0, [(0.01, 1)], 0.01)
    dropped.disconnected = True  # hung up by the client: not completed, never good
    assert not meets_slo(dropped, {"ttft": 1000}) and not meets_slo(records[-1], {"ttft": 1000})
    records.append(dropped)
    for r, prompt in zip(records, (10, 20, 30, 40, 50), strict=False):
        r.prompt_tokens = prompt
    s = summarize(records, elapsed=2.0, slo_ms={"ttft": 100, "tpot": 20})
    assert (s["requests"], s["completed"], s["failed"], s["disconnected"]) == (7, 5, 1, 1)
    assert s["errors"] == {"503": 1}
    assert s["good_requests"] == 3 and s["goodput_requests_per_s"] == pytest.approx(1.5)
    assert s["requests_per_s"] == pytest.approx(2.5)
    out_tokens = 3 + 2 + 2 + 1 + 4 + 1  # the disconnected request's token was generated too
    assert s["output_tokens"] == out_tokens and s["output_tokens_per_s"] == pytest.approx(out_tokens / 2)
    assert s["total_tokens_per_s"] == pytest.approx((out_tokens + 150) / 2)
    assert "goodput_requests_per_s" not in summarize(records, elapsed=2.0)


def test_itl_and_e2e_slos() -> None:
    steady = _timed(0.0, [(0.1, 1), (0.12, 1), (0.14, 1)], 0.14)  # gaps of 20 ms
    stall = _timed(0.0, [(0.1, 1), (0.11, 1), (0.2, 1), (0.21, 1)], 0.21)  # one 90 ms gap, tpot 36.7 ms
    assert meets_slo(steady, {"itl": 25}) and not meets_slo(stall, {"itl": 25})
    assert meets_slo(stall, {"tpot": 40}) and not meets_slo(stall, {"tpot": 40, "itl": 50})
    assert meets_slo(steady, {"e2el": 140.0001}) and not meets_slo(steady, {"e2el": 139})
    with pytest.raises(ValueError, match="ttfb"):
        check_slo({"ttfb": 1})
    with pytest.raises(ValueError, match="tpot"):
        check_slo({"tpot": -5})


def test_cli_refuses_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--request-rate", "0"], ["--request-rate", "fast"], ["--goodput", "ttfb:10"],
                 ["--rate", "2", "--request-rate", "3"]):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            loadgen.main(argv)
        assert exc.value.code == 2
    assert "request-rate" in capsys.readouterr().err
    base = ["--url", "http://127.0.0.1:9", "--request-rate", "1"]
    assert loadgen.main([*base, "--dataset-name", "sharegpt"]) == 2
    assert "dataset-path" in capsys.readouterr().err
    assert loadgen.main([*base, "--shared-prefix-fraction", "2"]) == 2
    assert "shared_prefix_fraction" in capsys.readouterr().err
    assert loadgen.main([*base, "--burstiness", "0"]) == 2
    args = loadgen.build_parser().parse_args(["--request-rate", "1", "inf", "--goodput", "ttft:500", "tpot:50",
                                              "--slo-itl-ms", "80", "--dataset-path", "x.json"])  # fmt: skip
    cfg = loadgen.config_from_args(args)
    assert args.request_rate == [1.0, math.inf] and cfg.dataset_name == "sharegpt"
    assert cfg.slo_ms == {"ttft": 500.0, "tpot": 50.0, "itl": 80.0}


# ----------------------------------------------------------------------------- against the live server


@pytest.fixture(scope="module")
def srv(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    pytest.importorskip("fastapi")
    from tests.test_server import shared_server

    return shared_server("main", request.config)


@pytest.mark.slow
def test_sweep_end_to_end(srv, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    report, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    argv = [
        "--url", srv.url, "--request-rate", "40", "inf", "-n", "6", "--seed", "3",
        "--dataset-name", "random", "--random-input-len", "12", "--random-output-len", "4", "--random-sigma", "0.5",
        "--shared-prefix-fraction", "0.5", "--shared-prefix-len", "16", "--num-shared-prefixes", "2",
        "--slo-ttft-ms", "600000", "--slo-tpot-ms", "600000", "--max-concurrency", "4",
        "--json", str(report), "--plot", str(png),
    ]  # fmt: skip
    assert loadgen.main(argv) == 0
    out = capsys.readouterr().out
    assert "Poisson 40 req/s" in out and "all at once" in out and "goodput" in out
    data = json.loads(report.read_text())
    assert data["config"]["request_rates"] == [40, "inf"]
    assert data["config"]["slo_ms"] == {"ttft": 600000, "tpot": 600000}
    assert [run["request_rate"] for run in data["runs"]] == [40, "inf"]
    for run in data["runs"]:
        s, w = run["summary"], run["workload"]
        assert s["completed"] == 6 and s["failed"] == 0
        assert w["shared_prefix_requests"] == 3 and w["dataset"] == "random"
        for key in ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s"):
            assert s[key] > 0
        assert s["total_tokens_per_s"] > s["output_tokens_per_s"]
        for key in ("ttft_s", "itl_s", "tpot_s", "e2e_s"):
            assert set(s[key]) == {"p50", "p90", "p99", "mean"} and s[key]["p50"] <= s[key]["p99"]
        # SLOs of ten minutes: every completed request is good, so goodput is the request throughput.
        assert s["good_requests"] == 6 and s["goodput_requests_per_s"] == pytest.approx(s["requests_per_s"])
        assert s["output_tokens"] == 6 * w["mean_output_tokens"]  # ignore_eos: exactly the sampled lengths
    first_prompts = data["runs"][0]["workload"]["mean_prompt_tokens"]
    assert first_prompts >= 16  # half the requests carry the 16-token prefix
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[0] > 100 and image.shape[1] > 100


@pytest.mark.slow
def test_sharegpt_sweep_end_to_end(srv, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A ShareGPT file on the chat route, counted by the default model's tokenizer."""
    path = tmp_path / "data.jsonl"
    _write_sharegpt(path, jsonl=True)
    cfg = loadgen.LoadConfig(url=srv.url, endpoint="chat", num_requests=4, dataset_name="sharegpt",
                             dataset_path=str(path), tokenizer=str(default_model_dir()))  # fmt: skip
    sweep = asyncio.run(loadgen.run_sweep(cfg, [math.inf]))
    (run,) = sweep["runs"]
    assert run["summary"]["completed"] == 4 and run["workload"]["token_counter"].startswith("tokenizer")
    assert run["summary"]["output_tokens"] == 4 * run["workload"]["mean_output_tokens"]
    # Without --tokenizer: the server's /tokenize where it has one, else the character heuristic.
    run = asyncio.run(loadgen.run_load(dataclasses.replace(cfg, tokenizer=None, rate=50.0)))
    assert run["workload"]["token_counter"] in {"server /tokenize", CharCounter.name}
    assert run["summary"]["completed"] == 4


@pytest.mark.slow
def test_server_tokenize_counts_like_the_models_tokenizer(srv) -> None:  # type: ignore[no-untyped-def]
    """Dataset prompts counted through ``POST /tokenize`` equal the served model's tokenizer's counts."""
    import httpx

    texts = ["hello world", "p" * 40, "The quick brown fox jumps over the lazy dog."]

    async def server_counts() -> list[int] | None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
            counter = loadgen.ServerTokenCounter(http)
            return await counter.count(texts) if await counter.answers() else None

    counts = asyncio.run(server_counts())
    if counts is None:
        pytest.skip("this server has no /tokenize route")
    assert counts == asyncio.run(loadgen.HFTokenCounter(str(default_model_dir())).count(texts))
