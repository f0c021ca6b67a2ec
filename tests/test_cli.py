"""The seed's CLIs, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys

from stream_attention.cli import accuracy, benchmark


def test_accuracy_cli_passes_and_reports_errors(capsys):
    assert accuracy.main(["--seq", "128", "--batch", "2", "--heads", "4", "--dim", "64", "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "max_abs_error=" in out and "relative_error=" in out and "PASS" in out


def test_accuracy_cli_fails_over_tolerance(capsys):
    assert accuracy.main(["--seq", "64", "--dim", "32", "--dtype", "fp16", "--tolerance", "1e-12"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_accuracy_cli_bad_shape_is_an_error_not_a_crash(capsys):
    assert accuracy.main(["--seq", "8", "--heads", "3", "--kv-heads", "2", "--dim", "32"]) == 2
    assert "multiple of key/value heads" in capsys.readouterr().err


def test_benchmark_cli_table_json_and_plot(tmp_path, capsys):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = benchmark.main(
        ["--seq", "64", "128", "--heads", "2", "--dim", "32", "--warmup", "1", "--iters", "2", "--json", str(js),
         "--plot", str(png), "--causal", "--kv-heads", "1", "--no-progress"]
    )
    assert rc == 0
    table = capsys.readouterr().out
    assert "SeqLen" in table and "Fused(ms)" in table and "sdpa/Fused(ms)" in table
    rows = json.loads(js.read_text())
    assert {r["impl"] for r in rows} >= {"fused", "sdpa"}
    assert all(r["time_ms"] > 0 for r in rows)
    assert png.stat().st_size > 1000


def test_console_scripts_are_installed():
    for name in ("stream_attention.cli.benchmark", "stream_attention.cli.accuracy", "stream_attention.cli.distributed"):
        res = subprocess.run([sys.executable, "-m", name, "--help"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and "usage" in res.stdout
