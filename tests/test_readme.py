"""The README is the user's contract: its runnable examples must run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def _block_containing(marker: str) -> str:
    blocks = [b for b in _python_blocks() if marker in b]
    assert len(blocks) == 1, f"expected one README python block containing {marker!r}"
    return blocks[0]


def test_readme_quick_start_is_the_tested_example():
    example = (Path(__file__).resolve().parents[1] / "examples" / "quickstart.py").read_text()
    assert _block_containing("StreamAttention(config)").strip() == example.strip()


def test_readme_engine_example_runs(capsys):
    exec(compile(_block_containing("LLMEngine()"), "README-engine", "exec"), {})
    assert capsys.readouterr().out.strip()


def test_readme_names_the_two_setup_commands():
    assert "make serve" in README and "make test" in README
