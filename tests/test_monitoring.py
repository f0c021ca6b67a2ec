"""Monitoring checked against reality: alert rules, a real Prometheus scraping the real
server, every metric the dashboard and the rules name, engine liveness and the prefix-cache
counters.

``promtool`` and ``prometheus`` come from Debian's ``prometheus`` package (``.ci/run``
installs it); the tests that need them skip with the reason where they are missing.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("fastapi")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from stream_attention.engine.block_manager import BlockManager  # noqa: E402
from stream_attention.engine.scheduler import Scheduler  # noqa: E402
from stream_attention.engine.sequence import Sequence  # noqa: E402
from stream_attention.engine.types import FinishReason, SamplingParams  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROM_DIR = REPO / "deploy" / "prometheus"
RULES = PROM_DIR / "alerts.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "stream-attention.json"
TTFT_BUCKET = "stream_attention_time_to_first_token_seconds_bucket"

# Series Prometheus makes itself for every target, not the server.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "inf",
    "nan",
}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"`{name}` is not installed (Debian/Ubuntu: apt-get install prometheus)")
    return path


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions,
    keywords, label names (inside ``{}`` or ``by (...)``), strings or durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, templates)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w:$.])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


def exposed_series_names(text: str) -> set[str]:
    """Names a PromQL selector can match in an exposition: the sample names (counters
    with ``_total``, histograms as ``_bucket``/``_sum``/``_count``), plus the declared names
    of families that have no sample right now (the CUDA gauges on a machine without GPU)."""
    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        names.update(s.name for s in fam.samples)
        if not fam.samples:
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(fam.type, ("",))
            names.update(fam.name + s for s in suffixes)
    return names


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r["expr"] for g in groups for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if isinstance(query, str) and var.get("type") == "query":
            # label_values(metric, label) names a metric too
            exprs.extend(re.findall(r"label_values\(\s*([a-zA-Z_:][\w:]*)", query))
    return exprs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _counter(text: str, name: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise KeyError(name)


# ----------------------------------------------------------------------------- PromQL parser


def test_promql_metric_names_parser() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (instance, le) (rate(stream_attention_x_bucket{route=~"/a|/b", le!=""}'
        '[$__rate_interval]))) / on(instance) group_left sum without (job) (up{job="x"} offset 5m) > bool 0.9'
        " and absent(foo:recorded_rule) or vector(1)"
    )
    assert promql_metric_names(expr) == {"stream_attention_x_bucket", "up", "foo:recorded_rule"}


# ----------------------------------------------------------------------------- promtool


def test_promtool_checks_rules_and_config() -> None:
    promtool = _tool("promtool")
    for args in (["check", "rules", str(RULES)], ["check", "config", str(PROM_DIR / "prometheus.yml")]):
        r = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    # check config also checks the rule files the config loads: it must load ours.
    assert "alerts.yml" in yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())["rule_files"]


def test_alert_rules_fire_on_their_unit_tests() -> None:
    """Each alert fires on a series that breaks its threshold and not on one inside it
    (deploy/prometheus/alerts.test.yml, run by promtool's rule unit-test runner)."""
    promtool = _tool("promtool")
    r = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"], capture_output=True, text=True, timeout=60, cwd=PROM_DIR
    )
    assert r.returncode == 0, r.stdout + r.stderr
    tested = set(re.findall(r"alertname:\s*(\w+)", (PROM_DIR / "alerts.test.yml").read_text()))
    defined = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert defined == tested, f"alerts without a unit test: {sorted(defined - tested)}"


def test_alerts_cover_the_failure_modes() -> None:
    exprs = " ".join(rule_exprs())
    for needle in (
        "stream_attention_engine_up",  # engine down
        'reason="queue_full"',  # queue saturated
        "stream_attention_kv_cache_usage_ratio > 0.9",  # KV nearly full
        "histogram_quantile(0.99",  # TTFT p99 over SLO
        'status=~"5.."',  # 5xx rate
    ):
        assert needle in exprs, needle


def test_compose_mounts_every_rule_file() -> None:
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = compose["services"]["prometheus"]["volumes"]
    config_dir = "/etc/prometheus"
    for rule_file in cfg["rule_files"]:
        assert (PROM_DIR / rule_file).exists(), rule_file
        assert f"./deploy/prometheus/{rule_file}:{config_dir}/{rule_file}:ro" in mounts, rule_file


# ----------------------------------------------------------------------------- live server


@pytest.fixture(scope="module")
def live(request: pytest.FixtureRequest) -> Any:
    from tests.test_server import shared_server

    return shared_server("main", request.config)


def test_every_dashboard_and_alert_metric_is_exported(live: Any) -> None:
    with httpx.Client(base_url=live.url, timeout=60) as http:
        http.post("/generate", json={"prompt": "fill the histograms", "max_tokens": 3})
        exposed = exposed_series_names(http.get("/metrics").text)
    wanted_dashboard = set().union(*(promql_metric_names(e) for e in dashboard_exprs()))
    wanted_rules = set().union(*(promql_metric_names(e) for e in rule_exprs()))
    assert len(wanted_dashboard) >= 20 and len(wanted_rules) >= 6
    missing = sorted((wanted_dashboard | wanted_rules) - exposed - PROMETHEUS_SYNTHETIC)
    assert not missing, f"queried but not exported: {missing}"


def test_readme_metrics_table_names_exist(live: Any) -> None:
    """The README's mapping to vLLM names only metrics the server really exports."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Metrics"):]
    section = section[:section.index("\n## ", 1)]
    ours = {row.split("|")[1] for row in section.splitlines() if row.startswith("| `stream_attention_")}
    named = set(re.findall(r"`(stream_attention_\w+)", " ".join(ours)))
    assert len(named) >= 12
    with httpx.Client(base_url=live.url, timeout=60) as http:
        exposed = exposed_series_names(http.get("/metrics").text)
    histograms = {n.removesuffix("_bucket") for n in exposed if n.endswith("_bucket")}
    assert not sorted(named - exposed - histograms)


def test_engine_up_and_restart_counter_on_a_live_server(live: Any) -> None:
    with httpx.Client(base_url=live.url, timeout=60) as http:
        text = http.get("/metrics").text
    assert _counter(text, "stream_attention_engine_up") == 1.0
    assert _counter(text, "stream_attention_engine_restarts_total") == 0.0


def test_engine_up_drops_with_a_dead_engine() -> None:
    """A loaded engine whose loop stopped: /health says 503 and engine_up says 0, together."""
    from stream_attention.engine import AsyncEngine, LLMEngine
    from stream_attention.server import ServerSettings, create_app
    from tests.test_server import LiveServer

    engine = AsyncEngine(engine=LLMEngine(device="cpu", num_kv_blocks=16))
    srv = LiveServer(create_app(ServerSettings(_env_file=None, log_level="warning"), engine=engine))
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            srv.wait_ready(60)
            assert _counter(http.get("/metrics").text, "stream_attention_engine_up") == 1.0
            assert http.get("/health").status_code == 200
            asyncio.run(engine.shutdown(drain=False, timeout=5))
            assert http.get("/health").status_code == 503
            assert _counter(http.get("/metrics").text, "stream_attention_engine_up") == 0.0
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- prefix cache


def test_prefix_cache_counts_tokens_like_vllm() -> None:
    """Queries are the prompt tokens of newly admitted requests, hits the ones served from
    the cache; a preempted request finding its own blocks again counts in neither."""
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_waiting=8)
    prompt = list(range(13))  # 3 full blocks + 1: at most 12 tokens can come from the cache

    def run(rid: str) -> Sequence:
        seq = Sequence(request_id=rid, prompt_token_ids=list(prompt), params=SamplingParams(max_tokens=4))
        sched.add(seq)
        sched.commit(sched.schedule().scheduled)
        return seq

    first = run("a")
    assert (bm.prefix_cache_query_tokens, bm.prefix_cache_hit_tokens) == (13, 0)
    run("b")
    assert (bm.prefix_cache_query_tokens, bm.prefix_cache_hit_tokens) == (26, 12)
    # Preempt "a" by hand, as the scheduler does, and let it be readmitted.
    sched.running.remove(first)
    bm.free(first)
    first.reset_for_recompute()
    first.num_preemptions += 1
    sched.waiting.appendleft(first)
    sched.commit(sched.schedule().scheduled)
    assert first.num_computed_tokens == 13 and first.num_cached_prompt_tokens == 12
    assert (bm.prefix_cache_query_tokens, bm.prefix_cache_hit_tokens) == (26, 12)
    for seq in list(sched.running):
        sched.finish(seq, FinishReason.STOP)
    assert bm.num_free_blocks == bm.num_blocks


def test_prefix_cache_metrics_move_on_a_repeated_prompt(live: Any) -> None:
    block = live.state.settings.block_size
    # Token ids no other test sends, so the first request cannot hit.
    prompt = [4000 - i for i in range(2 * block + 5)]
    body = {"prompt_token_ids": prompt, "max_tokens": 1, "ignore_eos": True}
    with httpx.Client(base_url=live.url, timeout=120) as http:
        from tests.test_server import wait_idle

        def counters() -> tuple[float, float]:
            wait_idle(live.engine)
            text = http.get("/metrics").text
            return (_counter(text, "stream_attention_prefix_cache_queries_total"),
                    _counter(text, "stream_attention_prefix_cache_hits_total"))

        q0, h0 = counters()
        assert http.post("/generate", json=body).status_code == 200
        q1, h1 = counters()
        assert (q1 - q0, h1 - h0) == (len(prompt), 0)
        assert http.post("/generate", json=body).status_code == 200
        q2, h2 = counters()
    # All full blocks but the one holding the last prompt token come from the cache.
    assert (q2 - q1, h2 - h1) == (len(prompt), 2 * block)


# ----------------------------------------------------------------------------- real Prometheus


@pytest.fixture
def prometheus(live: Any, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus scraping the live server every second, with the alert rules loaded."""
    binary = _tool("prometheus")
    port = _free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{
            "job_name": "stream-attention",
            "metrics_path": "/metrics",
            "static_configs": [{"targets": [live.url.removeprefix("http://")]}],
        }],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def _wait_for(prom: str, expr: str, timeout: float = 20.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        result = _query(prom, expr)
        if result:
            return result
        assert time.monotonic() < deadline, f"no result for {expr}"
        time.sleep(0.25)


@pytest.mark.slow
def test_prometheus_reads_ttft_quantile_from_the_live_server(live: Any, prometheus: str) -> None:
    # One scrape before the requests, so rate() sees the histogram grow.
    _wait_for(prometheus, 'up{job="stream-attention"} == 1')
    with httpx.Client(base_url=live.url, timeout=120) as http:
        for i in range(3):
            assert http.post("/generate", json={"prompt": f"def f{i}(x):", "max_tokens": 4}).status_code == 200
    expr = f"histogram_quantile(0.5, sum by (le) (rate({TTFT_BUCKET}[1m]))) > 0"
    (sample,) = _wait_for(prometheus, expr)
    ttft = float(sample["value"][1])
    assert math.isfinite(ttft) and ttft > 0
    # The alert rules were evaluated against the real series, without errors.
    rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
    evaluated = [r for g in rules for r in g["rules"]]
    assert len(evaluated) == len(rule_exprs())
    deadline = time.monotonic() + 10
    while any(r.get("lastEvaluation", "").startswith("0001") for r in evaluated):
        assert time.monotonic() < deadline, "rules never evaluated"
        time.sleep(0.25)
        evaluated = [r for g in httpx.get(f"{prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
                     for r in g["rules"]]
    assert all(r["health"] == "ok" for r in evaluated), [(r["name"], r.get("lastError")) for r in evaluated]
    assert _query(prometheus, "stream_attention_engine_up")[0]["value"][1] == "1"
