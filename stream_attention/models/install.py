"""Install trained weights into the package: ``python -m stream_attention.models.install PATH...``.

PATH is a model directory or the ``default_model.tar.part-*`` files written by
``benchmarks/train_default.py``. The weights must have been trained with the shipped
tokenizer (checked by hash); tied output embeddings are stored once, the config records
bf16, and ``metrics.json`` comes along so the CI test checks the new weights.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

from .default import METRICS_FILE, WEIGHTS_FILE, default_model_dir

COPIED = ("generation_config.json", METRICS_FILE)


def _unpack(paths: list[Path], into: Path) -> Path:
    if len(paths) == 1 and paths[0].is_dir():
        return paths[0]
    data = b"".join(p.read_bytes() for p in sorted(paths))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        tar.extractall(into, filter="data")
    found = [p.parent for p in into.rglob(WEIGHTS_FILE)]
    if len(found) != 1:
        raise SystemExit(f"expected one {WEIGHTS_FILE} in the archive, found {len(found)}")
    return found[0]


def install(src: Path, dst: Path | None = None) -> dict:
    """Copy a trained model directory into ``dst`` (default: the packaged default model)."""
    from safetensors.torch import load_file, save_file

    dst = dst or default_model_dir()
    ours = hashlib.sha256((dst / "tokenizer.json").read_bytes()).hexdigest()
    theirs = hashlib.sha256((src / "tokenizer.json").read_bytes()).hexdigest()
    if ours != theirs:
        raise SystemExit("the model was trained with a different tokenizer.json than the shipped one")
    cfg = json.loads((src / "config.json").read_text())
    state = load_file(src / WEIGHTS_FILE)
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    cfg["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    save_file(state, dst / WEIGHTS_FILE, metadata={"format": "pt"})
    (dst / WEIGHTS_FILE).chmod(0o644)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in COPIED:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return {"dir": str(dst), "params": sum(t.numel() for t in state.values()),
            "bytes": (dst / WEIGHTS_FILE).stat().st_size}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path, help="model dir, or default_model.tar.part-* files")
    ap.add_argument("--dst", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(install(_unpack(args.paths, Path(tmp)), args.dst), indent=2))


if __name__ == "__main__":
    main()
