"""Deployment files: Prometheus config, Grafana provisioning and dashboard, Dockerfile, compose.

No Docker engine is needed: the files are parsed and cross-checked, ``promtool check
config`` and ``docker compose config`` (or ``docker-compose config``) run where
installed. ``tests/test_monitoring.py`` checks the alert rules and the metric names the
dashboard and the rules query against a live server and a real Prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "stream-attention.json"
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_prometheus_config() -> None:
    cfg = _load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    job = cfg["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["server:8000"]
    promtool = shutil.which("promtool")
    if promtool:
        r = subprocess.run(
            [promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_provisioning() -> None:
    ds = _load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    source = ds["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    provider = _load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "stream-attention.yml")["providers"][0]
    compose = _load_yaml(COMPOSE)
    mounts = compose["services"]["grafana"]["volumes"]
    # The provider reads the directory the compose file mounts the dashboard JSON into.
    assert any(m.startswith("./deploy/grafana/dashboards:" + provider["options"]["path"]) for m in mounts)

    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    uids = {t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])}
    assert uids == {source["uid"]}
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("throughput", "time to first token", "inter-token", "queue", "kv cache", "gpu memory", "compression"):
        assert topic in titles, topic
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24


def test_dashboard_queries_are_balanced_promql() -> None:
    for expr in dashboard_exprs():
        assert (
            expr.count("(") == expr.count(")")
            and expr.count("{") == expr.count("}")
            and expr.count("[") == expr.count("]")
        ), expr
    assert any("histogram_quantile(0.99" in e for e in dashboard_exprs())


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    base = froms[0].replace("${CUDA_IMAGE}", args.get("CUDA_IMAGE", ""))
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*CMD .*?/health", text, re.M)
    assert re.search(r"^EXPOSE 8000", text, re.M)
    assert '"stream-attention-serve"' in text
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
        for path in src.split():
            if path != "README.md":  # the lead's README; present in the release tree
                assert (REPO / path).exists(), path
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


def _dockerfile_healthcheck() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    (line,) = re.findall(r"^HEALTHCHECK (.*)$", text, re.M)
    options, _, command = line.partition(" CMD ")
    check = dict(re.findall(r"--([\w-]+)=(\S+)", options))
    check["url"] = re.search(r"(https?://\S+)", command).group(1)
    return check


def test_dockerfile_and_compose_healthchecks_agree() -> None:
    """Both probe liveness (/health: 503 once the engine died), with the same timings, so
    `docker run` and `docker compose up` judge the container alike. /ready (readiness) is
    for load balancers and Kubernetes readiness probes, not for restarting."""
    docker = _dockerfile_healthcheck()
    compose = _load_yaml(COMPOSE)["services"]["server"]["healthcheck"]
    urls = [part for part in compose["test"] if part.startswith("http")]
    assert urls == [docker["url"]]
    assert docker["url"].endswith("/health")
    for key in ("interval", "timeout", "start-period", "retries"):
        assert str(compose[key.replace("-", "_")]) == docker[key], key


def test_compose_file() -> None:
    compose = _load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) >= {"server", "prometheus", "grafana"}
    server = services["server"]
    assert server["build"]["dockerfile"] == "Dockerfile"
    assert "8000:8000" in server["ports"] and "/health" in " ".join(server["healthcheck"]["test"])
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (REPO / src).exists(), src
    assert "prometheus.yml" in " ".join(services["prometheus"]["volumes"])

    checked = False
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if not shutil.which(cmd[0]):
            continue
        # The docker CLI may lack its compose plugin; `version` tells without an engine.
        if subprocess.run([*cmd, "version"], capture_output=True, timeout=60).returncode != 0:
            continue
        r = subprocess.run(
            [*cmd, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=120, cwd=REPO
        )
        assert r.returncode == 0, r.stdout + r.stderr
        checked = True
    if not checked:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed; parsed and cross-checked only")
