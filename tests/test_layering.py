"""The package's layers point one way: a module imports only its own layer or lower ones.

envs < utils < kernels < core < integration < models < engine | clients < server < cli.
``engine`` and ``clients`` are siblings (neither imports the other); the server may import
both; the command lines may import everything. docs/ARCHITECTURE.md explains the layers.
Every import is read with ``ast`` (lazy ones inside functions included), so a violation
is caught without importing anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "stream_attention"

# Layer rank of each subpackage; equal ranks are siblings that must not import each other.
RANK = {
    "envs": -1,  # stream_attention/envs.py: the environment accessors, importing nothing of the package
    "utils": 0,
    "kernels": 1,
    "core": 2,
    "integration": 3,
    "models": 4,
    "engine": 5,
    "clients": 5,
    "server": 6,
    "cli": 7,
}
# `stream_attention/__init__.py` re-exports core's public API, so importing the top
# package counts as importing core.
TOP = "core"


def _layer(module: str) -> str:
    """Subpackage of a dotted ``stream_attention...`` name (``TOP`` for the package itself)."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in RANK:
        return parts[1]
    return TOP


def _imported(source: str, rel: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every stream_attention import in ``source``, the
    text of the file at ``rel`` (relative to the directory holding the package)."""
    package = list(rel.with_suffix("").parts[:-1])  # the package a relative import starts from
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename=str(rel))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.lineno, node.module or ""))
                continue
            base = package[: len(package) - (node.level - 1)]
            if node.module:
                found.append((node.lineno, ".".join([*base, node.module])))
            else:  # `from . import x`: x is a module of that package
                found += [(node.lineno, ".".join([*base, alias.name])) for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return [(line, name) for line, name in found if name == "stream_attention" or name.startswith("stream_attention.")]


def _violations(source_text: str, rel: Path) -> list[str]:
    source = _layer(".".join(rel.with_suffix("").parts))
    bad = []
    for line, name in _imported(source_text, rel):
        target = _layer(name)
        if target == source:
            continue
        if RANK[target] >= RANK[source]:
            bad.append(f"{rel}:{line} ({source}) imports {name} ({target})")
    return bad


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_subpackage_has_a_layer():
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    assert subpackages | modules == set(RANK), "give each one a rank in RANK (and a line in docs/ARCHITECTURE.md)"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_imports_only_lower_layers(path: Path):
    assert _violations(path.read_text(), path.relative_to(PACKAGE.parent)) == []


def test_the_checker_sees_upward_imports():
    """The rule itself: an upward import, a lazy one and a sibling one are caught; own-layer,
    lower-layer and top-package imports are not."""
    probe = (
        "from ..server import app\n"
        "import stream_attention\n"
        "from ..kernels import paged_attention\n"
        "def f():\n"
        "    from stream_attention.clients import client\n"
        "    import stream_attention.engine.types\n"
        "    from . import sampler\n"
    )
    bad = _violations(probe, Path("stream_attention/engine/probe.py"))
    assert len(bad) == 2
    assert "probe.py:1 (engine) imports stream_attention.server (server)" in bad[0]
    assert "probe.py:5 (engine) imports stream_attention.clients (clients)" in bad[1]


def _environment_uses(source: str, rel: Path) -> list[int]:
    """Lines of ``source`` (the file at ``rel``) that import ``stream_attention.envs`` or
    name ``envs``."""
    lines = {line for line, name in _imported(source, rel) if name.split(".")[:2] == ["stream_attention", "envs"]}
    for node in ast.walk(ast.parse(source)):
        imported = isinstance(node, ast.ImportFrom) and any(alias.name == "envs" for alias in node.names)
        named = (isinstance(node, ast.Name) and node.id == "envs") or (
            isinstance(node, ast.Attribute) and node.attr == "envs"
        )
        if imported or named:
            lines.add(node.lineno)
    return sorted(lines)


KERNEL_MODULES = sorted((PACKAGE / "kernels").rglob("*.py"))


@pytest.mark.parametrize("path", KERNEL_MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_kernels_take_their_switches_as_arguments(path: Path):
    """Launch switches arrive as keyword arguments; core and the engine read the environment
    (core/kernel_switches.py) and pass them down."""
    assert _environment_uses(path.read_text(), path.relative_to(PACKAGE.parent)) == []


def test_the_environment_checker_sees_uses():
    probe = (
        "from .. import envs\n"
        "from stream_attention import envs as switches\n"
        "import stream_attention.envs\n"
        "def f():\n"
        "    return stream_attention.envs.tma()\n"
        "x = 1  # envs in a comment is fine\n"
    )
    assert _environment_uses(probe, Path("stream_attention/kernels/probe.py")) == [1, 2, 3, 5]
