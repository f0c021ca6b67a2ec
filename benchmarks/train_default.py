"""Train, evaluate and package the embedded default model in one GPU call.

Needs the carried corpus ``build/default_model/`` (``python -m stream_attention.models.data``).
Writes at most 7 files into ``--out`` (``$OUT`` on the device machine):

* ``default_model.tar.part-aa``, ``-ab``: the HF model directory as ``default/*`` (config,
  bf16 ``model.safetensors``, tokenizer, ``metrics.json``) in pieces under the 16 MiB
  file cap; ``cat default_model.tar.part-* | tar xf - -C stream_attention/models`` installs it;
* ``metrics.json``: recipe, training summary, held-out perplexity / bits per byte against
  ``xz -9`` and ``zstd -19``, the CI-slice reference value, greedy and sampled outputs;
* ``loss.png``, ``train_log.json`` (loss history), ``train.log`` and ``eval.log``.

Usage (H100)::

    python3 benchmarks/train_default.py --out "$OUT" --time-budget-s 300

CPU check of the whole path (a tiny model, one step, through the Triton interpreter)::

    TRITON_INTERPRET=1 python benchmarks/train_default.py --out /tmp/td --tiny --device cpu --steps 1
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The CI test (tests/test_default_model.py) recomputes exactly this slice on CPU.
CI_SLICE_BYTES = 12_000
PART_BYTES = 15_000_000


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` from the repo root, teeing its output into ``log``; raise on failure."""
    print("+", " ".join(cmd), flush=True)
    with log.open("a") as f:
        f.write("+ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})})
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        if proc.wait() != 0:
            raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")


def write_parts(model_dir: Path, out: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """``default_model.tar.part-aa, -ab, ...``: the model dir as ``default/*``, cut below the 16 MiB file cap.

    bf16 weights barely compress, so the tar is uncompressed; reassemble with
    ``cat default_model.tar.part-* | tar xf - -C stream_attention/models``.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in sorted(model_dir.iterdir()):
            tar.add(f, arcname=f"default/{f.name}")
    data = buf.getvalue()
    parts = []
    for i in range(0, len(data), part_bytes):
        suffix = chr(ord("a") + i // part_bytes // 26) + chr(ord("a") + i // part_bytes % 26)
        path = out / f"default_model.tar.part-{suffix}"
        path.write_bytes(data[i : i + part_bytes])
        parts.append(path)
    return parts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out/train_default")))
    ap.add_argument("--work", type=Path, default=None, help="scratch dir for checkpoints (default: OUT/../work)")
    ap.add_argument("--time-budget-s", type=float, default=300.0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--backend", default=None, choices=["triton", "sdpa", "auto"])
    ap.add_argument("--samples", type=int, default=128, help="tokens per greedy/sampled sample")
    ap.add_argument("train_args", nargs="*", help="extra arguments for stream_attention.models.train (after --)")
    args = ap.parse_args(argv)

    t0 = time.time()
    py = sys.executable
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work or Path("/tmp/stream_attention_train_default" + ("_tiny" if args.tiny else ""))).resolve()
    model_dir = work / "model"
    dev = ["--device", args.device] if args.device else []
    train_cmd = [py, "-m", "stream_attention.models.train", "--out", str(work), "--time-budget-s",
                 str(args.time_budget_s), "--resume", *dev]
    if args.tiny:
        train_cmd.append("--tiny")
    if args.steps:
        train_cmd += ["--steps", str(args.steps)]
    if args.backend:
        train_cmd += ["--backend", args.backend]
    run(train_cmd + args.train_args, out / "train.log")

    full = work / "eval_full.json"
    ci = work / "eval_ci.json"
    backend = args.backend or ("triton" if args.device != "cpu" else "auto")
    eval_base = [py, "-m", "stream_attention.models.eval", "--model", str(model_dir), *dev]
    max_bytes = ["--max-bytes", "4000"] if args.tiny else []
    # Headline number: our attention, bf16 autocast as trained, full held-out split.
    run(eval_base + ["--attn", "stream_attention", "--backend", backend, "--out", str(full), *max_bytes],
        out / "eval.log")
    # CI reference: fp32, SDPA, no TF32, the slice the CPU test recomputes; the samples
    # come from here too (they show the model, not the kernel's decode path).
    run(eval_base + ["--attn", "sdpa", "--dtype", "fp32", "--autocast", "none", "--anchors", "none",
                     "--max-bytes", str(CI_SLICE_BYTES), "--samples", str(args.samples), "--out", str(ci)],
        out / "eval.log")

    train_log = json.loads((work / "train_log.json").read_text())
    train_log.pop("history")  # the loss history ships as train_log.json
    full_res = json.loads(full.read_text())
    ci_res = json.loads(ci.read_text())
    metrics = {
        "heldout": {"score": full_res["score"], "text": full_res["text"], "model": full_res["model"]},
        "anchors": full_res.get("anchors"),
        "beats_xz_9": full_res.get("beats_xz_9"),
        "ci_slice": {"max_bytes": CI_SLICE_BYTES, "attn": "sdpa", "dtype": "fp32", "score": ci_res["score"],
                     "text": ci_res["text"]},
        "samples": ci_res.get("samples"),
        "training": train_log,
        "corpus_manifest": json.loads(m.read_text()) if (m := ROOT / "build/default_model/manifest.json").is_file()
        else None,
        "tiny": args.tiny,
        "total_wall_seconds": round(time.time() - t0, 1),
    }
    (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.copy2(model_dir / "metrics.json", out / "metrics.json")
    shutil.copy2(work / "train_log.json", out / "train_log.json")
    if (work / "loss.png").is_file():
        shutil.copy2(work / "loss.png", out / "loss.png")
    write_parts(model_dir, out)
    s = metrics["heldout"]["score"]
    xz = (metrics["anchors"] or {}).get("xz -9", {}).get("bits_per_byte")
    zs = (metrics["anchors"] or {}).get("zstd -19", {}).get("bits_per_byte")
    print(f"held-out: ppl {s['perplexity']:.3f}, {s['bits_per_byte']:.4f} bits/byte "
          f"(xz -9 {xz}, zstd -19 {zs}); steps {train_log['steps']}, {train_log['tokens'] / 1e6:.0f}M tokens, "
          f"total {metrics['total_wall_seconds']} s")


if __name__ == "__main__":
    main()
