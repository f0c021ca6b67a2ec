"""The environment is read in one module, stream_attention/envs.py, and the README lists it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from stream_attention import envs

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stream_attention"
# patched_environ saves and restores whatever names its caller sets: no setting is read.
SAVE_RESTORE = {("core/distributed_utils.py", "patched_environ")}


def _environ_reads(source: str, rel: str) -> list[str]:
    """``rel:line`` of each read of ``os.environ`` / ``os.getenv`` in ``source`` (the text of
    the package file ``rel``) outside a save-restore helper."""
    tree = ast.parse(source)
    exempt = {
        id(node)
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef) and (rel, fn.name) in SAVE_RESTORE
        for node in ast.walk(fn)
    }
    reads = []
    for node in ast.walk(tree):
        if id(node) in exempt:
            continue
        if isinstance(node, ast.Attribute) and node.attr == "getenv":
            reads.append(f"{rel}:{node.lineno}")
        elif isinstance(node, ast.Attribute) and node.attr == "environ":
            parent_is_write = False
            for other in ast.walk(tree):
                # os.environ[...] = x and os.environ.update(...) set variables for children.
                if isinstance(other, ast.Subscript) and other.value is node and isinstance(other.ctx, ast.Store):
                    parent_is_write = True
                if (
                    isinstance(other, ast.Attribute)
                    and other.value is node
                    and other.attr in ("update", "setdefault", "pop")
                ):
                    parent_is_write = other.attr != "setdefault"
            if not parent_is_write:
                reads.append(f"{rel}:{node.lineno}")
    return reads


def test_only_envs_reads_the_environment():
    reads = [
        r
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.name != "envs.py"
        for r in _environ_reads(p.read_text(), str(p.relative_to(PACKAGE)))
    ]
    assert reads == [], "read the environment through stream_attention/envs.py accessors"


def test_the_read_checker_sees_reads():
    text = 'import os\nA = os.environ.get("X")\nos.environ["Y"] = "1"\nB = os.getenv("Z")\nC = "W" in os.environ\n'
    reads = _environ_reads(text, "engine/probe.py")
    assert sorted(r.split(":")[1] for r in reads) == ["2", "4", "5"]


def test_readme_table_is_the_module_s():
    assert envs.markdown_table() in (ROOT / "README.md").read_text(), (
        "paste stream_attention.envs.markdown_table() into the README's 'Environment variables' section"
    )


@pytest.mark.parametrize(
    ("value", "switch", "default_on"),
    [(None, None, True), ("0", False, False), ("off", False, False), ("1", True, True), ("YES", True, True),
     ("maybe", None, True)],
)
def test_switches_parse_like_the_kernels_expect(monkeypatch, value, switch, default_on):
    for var in (envs.TMA, envs.KV_DEFER_SUMS, envs.PAGED_TMA, envs.KV_FAST, envs.KV_ASM, envs.AUTOTUNE):
        if value is None:
            monkeypatch.delenv(var.name, raising=False)
        else:
            monkeypatch.setenv(var.name, value)
    assert envs.tma() is switch and envs.kv_defer_sums() is switch
    assert envs.paged_tma() is envs.kv_fast() is envs.kv_asm() is default_on
    assert envs.autotune() is (switch is True)


def test_backend_variable_is_validated(monkeypatch):
    monkeypatch.setenv(envs.BACKEND.name, " Triton ")
    assert envs.backend() == "triton" and envs.backend_is_set()
    monkeypatch.setenv(envs.BACKEND.name, "")
    assert envs.backend() == "auto" and not envs.backend_is_set()
    monkeypatch.setenv(envs.BACKEND.name, "cuda")
    with pytest.raises(ValueError, match="STREAM_ATTENTION_BACKEND"):
        envs.backend()
