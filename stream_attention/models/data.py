"""The default model's corpus: Python source that exists offline on every machine, split once.

The split is built on the development machine (Python 3.11) and never recomputed
elsewhere, because the standard library differs between Python versions:

* held-out: whole files of the CPython standard library, chosen by a hash of their
  path, committed as ``stream_attention/models/data/heldout.txt`` (< 1 MB) so that the
  recorded quality numbers are reproducible on every machine;
* train: every other stdlib file plus a per-package-capped (16 MB) sample of the pure-Python
  packages installed in the development environment (transformers, torch, sympy, ...),
  with vendored copies and near-duplicates of held-out files removed; shipped to the
  GPU machine as pre-tokenized ``uint16`` ids (``train_tokens.u16.xz``) in an ignored
  folder that the run carries.

``python -m stream_attention.models.data --out build/default_model`` rebuilds both;
``--retrain-tokenizer`` also retrains ``stream_attention/models/default/tokenizer.json``
(which invalidates any trained weights).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import sysconfig
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
HELDOUT_PATH = HERE / "data" / "heldout.txt"
# A line that never occurs in the standard library (checked at build time) separates
# held-out documents, so the file stays plain text that any tool can read.
DOC_MARKER = "<|file|>"
HELDOUT_MAX_BYTES = 950_000
HELDOUT_MAX_FILE_BYTES = 60_000
MAX_FILE_BYTES = 400_000
PER_PACKAGE_CAP = 16_000_000
SKIP_DIRS = {"test", "tests", "idle_test", "testing", "site-packages", "__pycache__", "_vendor", "vendor",
             "_vendored", "vendored", "_distutils", "extern", "_extern"}
SPLIT_SALT = "stream-attention-default-model-v1"


@dataclass(frozen=True)
class Document:
    """One source file: a stable name (``stdlib/json/decoder.py``) and its text."""

    name: str
    text: str


def _hash(s: str) -> str:
    return hashlib.sha256(f"{SPLIT_SALT}:{s}".encode()).hexdigest()


def _looks_like_code(text: str) -> bool:
    """Reject generated tables and minified data: they teach a small model nothing useful."""
    lines = text.splitlines()
    if len(lines) < 5:
        return False
    longest = max(len(line) for line in lines)
    return longest <= 400 and len(text) / len(lines) <= 90


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    if "\x00" in text or DOC_MARKER in text:
        return None
    return text.replace("\r\n", "\n")


def _walk(root: Path, prefix: str) -> Iterator[Document]:
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith("test_") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("test_") or path.stat().st_size > MAX_FILE_BYTES:
            continue
        text = _read(path)
        if text is not None and _looks_like_code(text):
            yield Document(f"{prefix}/{rel.as_posix()}", text)


def stdlib_documents() -> list[Document]:
    """Standard-library ``.py`` files, without tests and site-packages."""
    return list(_walk(Path(sysconfig.get_paths()["stdlib"]), "stdlib"))


def package_documents(cap: int = PER_PACKAGE_CAP) -> list[Document]:
    """Installed pure-Python packages, at most ``cap`` bytes each, files picked by path hash."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    docs: list[Document] = []
    for pkg in sorted(p for p in purelib.iterdir() if p.is_dir() and p.name.isidentifier()):
        if pkg.name.startswith("_") or pkg.name == "stream_attention":
            continue
        files = sorted(_walk(pkg, f"site-packages/{pkg.name}"), key=lambda d: _hash(d.name))
        used = 0
        for doc in files:
            if used + len(doc.text) > cap:
                continue
            docs.append(doc)
            used += len(doc.text)
    return docs


def _line_keys(text: str) -> set[str]:
    return {s for line in text.splitlines() if len(s := line.strip()) >= 24}


def split_documents(stdlib: list[Document], extra: list[Document]) -> tuple[list[Document], list[Document]]:
    """Deterministic split: held-out = stdlib files by path hash up to ``HELDOUT_MAX_BYTES``.

    Training files (any source) that share over a fifth of their substantial lines with
    the held-out set, or are byte-identical to a held-out file, are dropped, so that
    vendored copies of stdlib modules cannot leak the held-out text into training.
    """
    heldout: list[Document] = []
    size = 0
    for doc in sorted(stdlib, key=lambda d: _hash(d.name)):
        n = len(doc.text.encode())
        if n > HELDOUT_MAX_FILE_BYTES or size + n > HELDOUT_MAX_BYTES:
            continue
        heldout.append(doc)
        size += n
    held_names = {d.name for d in heldout}
    held_keys: set[str] = set()
    for d in heldout:
        held_keys |= _line_keys(d.text)
    held_digests = {hashlib.sha256(d.text.encode()).hexdigest() for d in heldout}
    train: list[Document] = []
    seen: set[str] = set()
    for doc in stdlib + extra:
        digest = hashlib.sha256(doc.text.encode()).hexdigest()
        if doc.name in held_names or digest in held_digests or digest in seen:
            continue
        keys = _line_keys(doc.text)
        if keys and len(keys & held_keys) > 0.2 * len(keys):
            continue
        seen.add(digest)
        train.append(doc)
    heldout.sort(key=lambda d: d.name)
    train.sort(key=lambda d: _hash("order:" + d.name))
    return train, heldout


def write_heldout(docs: Iterable[Document], path: Path = HELDOUT_PATH) -> None:
    """Held-out documents, each preceded by a ``<|file|>name`` line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for d in docs:
            f.write(f"{DOC_MARKER}{d.name}\n{d.text}")


def read_heldout(path: Path | str = HELDOUT_PATH) -> list[Document]:
    """Inverse of :func:`write_heldout`."""
    raw = Path(path).read_text(encoding="utf-8")
    docs = []
    for chunk in raw.split(DOC_MARKER)[1:]:
        name, _, text = chunk.partition("\n")
        docs.append(Document(name, text))
    return docs


def tokenize_documents(tokenizer, docs: list[Document], bos_id: int, eos_id: int) -> np.ndarray:
    """``<|bos|> doc <|eos|>`` for every document, concatenated into one ``uint16`` stream."""
    encs = tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False)
    pieces = []
    for enc in encs:
        pieces.append(np.asarray([bos_id, *enc.ids, eos_id], dtype=np.uint16))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)


def write_tokens(tokens: np.ndarray, path: Path) -> None:
    """xz-compressed raw little-endian ``uint16`` ids (compact, readable with numpy alone)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(path, "wb", preset=6) as f:
        f.write(tokens.astype("<u2").tobytes())


def read_tokens(path: Path | str) -> np.ndarray:
    """Inverse of :func:`write_tokens` (also reads an uncompressed ``.u16``)."""
    path = Path(path)
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rb") as f:
        return np.frombuffer(f.read(), dtype="<u2").astype(np.int64)


def build(out_dir: Path, vocab_size: int, cap: int = PER_PACKAGE_CAP, retrain_tokenizer: bool = False) -> dict:
    """Collect, split, tokenize (training the tokenizer only if asked or absent); returns the manifest.

    The shipped tokenizer is reused by default: a trained model is tied to it, and the
    held-out split (stdlib only) does not depend on how much package code is added.
    """
    from tokenizers import Tokenizer

    from .tokenizer import save_tokenizer, special_token_ids, train_tokenizer

    t0 = time.time()
    stdlib = stdlib_documents()
    extra = package_documents(cap)
    train, heldout = split_documents(stdlib, extra)
    write_heldout(heldout)
    tok_path = HERE / "default" / "tokenizer.json"
    if retrain_tokenizer or not tok_path.is_file():
        tok = train_tokenizer((d.text for d in train), vocab_size=vocab_size)
        save_tokenizer(tok, HERE / "default")
    else:
        tok = Tokenizer.from_file(str(tok_path))
    ids = special_token_ids(tok)
    tokens = tokenize_documents(tok, train, ids["bos"], ids["eos"])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tokens(tokens, out_dir / "train_tokens.u16.xz")
    train_bytes = sum(len(d.text.encode()) for d in train)
    by_source: dict[str, int] = {}
    for d in train:
        key = d.name.split("/")[0] if d.name.startswith("stdlib") else d.name.split("/")[1]
        by_source[key] = by_source.get(key, 0) + len(d.text.encode())
    manifest = {
        "python": sysconfig.get_python_version(),
        "split_salt": SPLIT_SALT,
        "heldout": {"files": len(heldout), "bytes": sum(len(d.text.encode()) for d in heldout),
                    "sha256": hashlib.sha256(HELDOUT_PATH.read_bytes()).hexdigest()},
        "train": {"files": len(train), "bytes": train_bytes, "tokens": int(tokens.size),
                  "bytes_per_token": train_bytes / max(1, tokens.size), "bytes_by_source": by_source,
                  "tokens_sha256": hashlib.sha256(tokens.astype("<u2").tobytes()).hexdigest()},
        "vocab_size": tok.get_vocab_size(),
        "per_package_cap_bytes": cap,
        "tokenizer_sha256": hashlib.sha256(tok_path.read_bytes()).hexdigest(),
        "build_seconds": round(time.time() - t0, 1),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out_dir / "train_files.txt").write_text("".join(d.name + "\n" for d in train))
    return manifest


def main(argv: list[str] | None = None) -> None:
    """Rebuild the split, the tokenizer and the carried training tokens."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("build/default_model"))
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--cap-bytes", type=int, default=PER_PACKAGE_CAP, help="most bytes taken from one package")
    ap.add_argument("--retrain-tokenizer", action="store_true", help="replace the shipped tokenizer (invalidates weights)")
    args = ap.parse_args(argv)
    manifest = build(args.out, args.vocab_size, args.cap_bytes, args.retrain_tokenizer)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
