"""Train the embedded default model (``stream-attention-train``).

A Llama-architecture causal LM (``default.ARCHITECTURE``) trained with this package's
attention (``attn_implementation="stream_attention"``, Triton forward and backward on
CUDA) on the pre-tokenized corpus built by ``stream_attention.models.data``.

The learning-rate schedule is driven by progress = max(step / max_steps, elapsed /
time_budget), so a run given only a time budget still warms up, decays on a cosine and
ends at its floor exactly when the budget runs out, then saves.

GPU run (one H100, ~6 minutes)::

    stream-attention-train --data build/default_model/train_tokens.u16.xz --out out/train \\
        --time-budget-s 330

CPU smoke test (one step through the Triton interpreter)::

    TRITON_INTERPRET=1 STREAM_ATTENTION_BACKEND=triton stream-attention-train --device cpu --tiny --steps 1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import envs
from .data import read_heldout, read_tokens
from .default import default_config, default_model_dir
from .tokenizer import BOS, EOS

logger = logging.getLogger("stream_attention.train")

TINY_ARCH = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class TrainState:
    """What a checkpoint needs beyond the model and optimizer to resume exactly."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Train the StreamAttention default model.")
    ap.add_argument("--data", type=Path, default=Path("build/default_model/train_tokens.u16.xz"),
                    help="pre-tokenized corpus (uint16 ids, .xz or raw); --tiny falls back to the held-out text")
    ap.add_argument("--out", type=Path, default=Path("out/train_default"))
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer 64-wide model on 64-token windows (smoke tests)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=32, help="sequences per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=0, help="sequences per forward (0 = batch size)")
    ap.add_argument("--steps", type=int, default=100_000, help="maximum optimizer steps")
    ap.add_argument("--time-budget-s", type=float, default=0.0, help="stop and save after this much training time")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--warmup-steps", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--attn", default="stream_attention", choices=["stream_attention", "sdpa", "eager"],
                    help="transformers attention implementation")
    ap.add_argument("--backend", default=None, choices=["triton", "sdpa", "auto"],
                    help="STREAM_ATTENTION_BACKEND for --attn stream_attention (default: triton on CUDA, auto on CPU)")
    ap.add_argument("--require-triton-backward", action="store_true",
                    help="fail instead of falling back to SDPA when the Triton backward is unavailable")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                    help="autocast dtype (default: bf16 on CUDA, none on CPU)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=200, help="held-out loss every N steps (0 = only at the end)")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--ckpt-every-s", type=float, default=120.0)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when present")
    ap.add_argument("--save-dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = ap.parse_args(argv)
    if args.tiny:
        args.seq_len = min(args.seq_len, 64)
        args.batch_size = min(args.batch_size, 2)
        args.warmup_steps = min(args.warmup_steps, 2)
        args.eval_windows = min(args.eval_windows, 2)
    return args


def _dtype(name: str | None) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[name]


def lr_at(progress: float, step: int, args: argparse.Namespace) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``lr * min_lr_ratio``."""
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * warm * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cos)


def triton_backward_works(device: torch.device) -> tuple[bool, str]:
    """Probe one tiny forward+backward through ``fused_attention(backend="triton")``."""
    from ..core.functional import fused_attention

    try:
        q, k, v = (torch.randn(1, 32, h, 64, device=device, requires_grad=True) for h in (4, 2, 2))
        if device.type == "cuda":
            q, k, v = (t.detach().to(torch.bfloat16).requires_grad_() for t in (q, k, v))
        fused_attention(q, k, v, causal=True, backend="triton").float().sum().backward()
        ok = all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
        return ok, "ok" if ok else "non-finite or missing gradients"
    except Exception as exc:  # the probe decides, whatever the failure is
        return False, f"{type(exc).__name__}: {exc}"


def setup_attention(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Register our attention, pick the kernel backend, and say what will really run."""
    info: dict[str, Any] = {"attn_implementation": args.attn}
    if args.attn != "stream_attention":
        return info
    from ..integration.hf import register

    register()
    info["registered_by"] = "stream_attention.integration.hf"
    from ..core.backend import ENV_VAR, env_backend

    backend = args.backend or (env_backend() if envs.backend_is_set() else None)
    backend = backend or ("triton" if device.type == "cuda" else "auto")
    if backend == "triton":
        ok, why = triton_backward_works(device)
        info["triton_backward"] = why
        if not ok:
            if args.require_triton_backward:
                raise SystemExit(f"Triton backward unavailable ({why}) and --require-triton-backward was given")
            logger.warning("Triton backward unavailable (%s): attention falls back to SDPA for training", why)
            backend = "sdpa"
    os.environ[ENV_VAR] = backend  # every "auto" below follows it
    info["backend"] = backend
    return info


def load_corpus(args: argparse.Namespace, tokenizer) -> tuple[torch.Tensor, str]:
    """Training ids as one int64 tensor, and where they came from."""
    if args.data.is_file():
        return torch.from_numpy(read_tokens(args.data)), str(args.data)
    if not args.tiny:
        raise SystemExit(f"training data {args.data} not found: build it with `python -m stream_attention.models.data`")
    logger.warning("%s missing: --tiny trains on the first held-out documents instead", args.data)
    ids: list[int] = []
    for doc in read_heldout()[:4]:
        ids += [tokenizer.convert_tokens_to_ids(BOS), *tokenizer.encode(doc.text, add_special_tokens=False),
                tokenizer.convert_tokens_to_ids(EOS)]
    return torch.tensor(ids, dtype=torch.int64), "heldout-first-4-docs (tiny)"


def heldout_windows(tokenizer, seq_len: int, n: int) -> torch.Tensor:
    """``n`` fixed windows of the held-out text for the loss curve (the final numbers come from eval.py)."""
    ids: list[int] = []
    bos, eos = tokenizer.convert_tokens_to_ids(BOS), tokenizer.convert_tokens_to_ids(EOS)
    for doc in read_heldout():
        ids += [bos, *tokenizer.encode(doc.text, add_special_tokens=False), eos]
        if len(ids) >= n * (seq_len + 1):
            break
    n = max(1, min(n, len(ids) // (seq_len + 1)))
    return torch.tensor(ids[: n * (seq_len + 1)], dtype=torch.int64).view(n, seq_len + 1)


def batch_at(corpus: torch.Tensor, step: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """Random ``seq_len + 1`` windows for ``step``; a pure function of (seed, step), so resuming replays exactly."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, corpus.numel() - seq_len - 1, (batch,), generator=g)
    return torch.stack([corpus[s : s + seq_len + 1] for s in starts.tolist()])


def build_model(args: argparse.Namespace, device: torch.device):
    from transformers import LlamaForCausalLM

    cfg = default_config(**(TINY_ARCH if args.tiny else {}), max_position_embeddings=max(2048, args.seq_len))
    cfg._attn_implementation = args.attn
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg).to(device)
    model.config.use_cache = False
    return model


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; norms and biases are not decayed (decaying RMSNorm gains only hurts)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def loss_on(model, ids: torch.Tensor, amp: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """Mean next-token cross entropy of ``ids[:, :-1] -> ids[:, 1:]``."""
    ids = ids.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        logits = model(input_ids=ids[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, amp, device, micro: int) -> float:
    model.eval()
    total = 0.0
    for chunk in windows.split(micro):
        total += loss_on(model, chunk, amp, device).item() * chunk.shape[0]
    model.train()
    return total / windows.shape[0]


def save_checkpoint(path: Path, model, opt, state: TrainState) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": asdict(state)}, tmp)
    tmp.replace(path)  # a crash mid-write must not destroy the previous checkpoint


def save_hf(model, out_dir: Path, dtype: torch.dtype, extra_config: dict[str, Any]) -> None:
    """HF directory: config, bf16 ``model.safetensors``, generation config and the tokenizer files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    for k, v in extra_config.items():
        setattr(model.config, k, v)
    attn = model.config._attn_implementation
    # Saved configs must load anywhere, including where our attention is not registered.
    model.config._attn_implementation = "sdpa"
    model.config.dtype = dtype  # what the file holds, so dtype="auto" loads bf16
    state = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        # An explicit state_dict keeps the tied copy; it would add 3 MB of duplicate weights.
        state.pop("lm_head.weight", None)
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    model.config._attn_implementation = attn
    for name in TOKENIZER_FILES:
        shutil.copy2(default_model_dir() / name, out_dir / name)


def plot_losses(history: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Loss-curve PNG; returns False (no plot) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(h["tokens"] / 1e6, h["loss"]) for h in history if "loss" in h]
    val = [(h["tokens"] / 1e6, h["heldout_loss"]) for h in history if "heldout_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        x, y = zip(*train, strict=True)
        ax.plot(x, y, lw=1, alpha=0.8, label="train (batch)")
    if val:
        x, y = zip(*val, strict=True)
        ax.plot(x, y, "o-", ms=3, label="held-out")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross entropy (nats / token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) training; returns the summary also written to ``OUT/train_log.json``."""
    from .default import load_tokenizer

    t_start = time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = _dtype(args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    attn_info = setup_attention(args, device)
    tokenizer = load_tokenizer()
    corpus, corpus_src = load_corpus(args, tokenizer)
    val = heldout_windows(tokenizer, args.seq_len, args.eval_windows)
    model = build_model(args, device)
    opt = make_optimizer(model, args, device)
    state = TrainState()
    ckpt = args.out / "checkpoint.pt"
    if args.resume and ckpt.is_file():
        blob = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["opt"])
        state = TrainState(**blob["state"])
        logger.info("resumed from %s at step %d", ckpt, state.step)
    n_params = sum(p.numel() for p in model.parameters())
    micro = args.micro_batch or args.batch_size
    accum = max(1, args.batch_size // micro)
    tokens_per_step = micro * accum * args.seq_len
    logger.info("model %.2fM params, attention %s, corpus %d tokens (%s), %d tokens/step, amp=%s",
                n_params / 1e6, attn_info, corpus.numel(), corpus_src, tokens_per_step, amp)
    model.train()
    last_ckpt = time.time()
    seg_start = time.time()
    base_seconds = state.train_seconds
    stop_reason = "max steps"
    while state.step < args.steps:
        elapsed = base_seconds + (time.time() - seg_start)
        if args.time_budget_s and elapsed >= args.time_budget_s:
            stop_reason = "time budget"
            break
        progress = max(state.step / args.steps, elapsed / args.time_budget_s if args.time_budget_s else 0.0)
        lr = lr_at(progress, state.step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = batch_at(corpus, state.step, micro * accum, args.seq_len, args.seed)
        loss_sum = 0.0
        for chunk in batch.split(micro):
            loss = loss_on(model, chunk, amp, device) / accum
            loss.backward()
            loss_sum += loss.detach()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens += tokens_per_step
        if state.step % args.log_every == 0 or state.step == 1:
            loss_v = float(loss_sum)
            if not math.isfinite(loss_v):
                raise FloatingPointError(f"loss is {loss_v} at step {state.step}")
            rec = {"step": state.step, "tokens": state.tokens, "loss": round(loss_v, 5), "lr": lr,
                   "grad_norm": round(float(gnorm), 4), "seconds": round(base_seconds + time.time() - seg_start, 2)}
            state.history.append(rec)
            logger.info("step %d loss %.4f lr %.2e gnorm %.3f %.0f tok/s", state.step, loss_v, lr, rec["grad_norm"],
                        state.tokens / max(1e-9, rec["seconds"]))
        if args.eval_every and state.step % args.eval_every == 0:
            hl = heldout_loss(model, val, amp, device, micro)
            state.history.append({"step": state.step, "tokens": state.tokens, "heldout_loss": round(hl, 5)})
            logger.info("step %d held-out loss %.4f", state.step, hl)
        if args.ckpt_every_s and time.time() - last_ckpt >= args.ckpt_every_s:
            state.train_seconds = base_seconds + time.time() - seg_start
            save_checkpoint(ckpt, model, opt, state)
            last_ckpt = time.time()
    state.train_seconds = base_seconds + time.time() - seg_start
    final_heldout = heldout_loss(model, val, amp, device, micro)
    state.history.append({"step": state.step, "tokens": state.tokens, "heldout_loss": round(final_heldout, 5)})
    save_checkpoint(ckpt, model, opt, state)
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    summary = {
        "stop_reason": stop_reason,
        "steps": state.step,
        "tokens": state.tokens,
        "train_seconds": round(state.train_seconds, 1),
        "wall_seconds": round(time.time() - t_start, 1),
        "tokens_per_second": round(state.tokens / max(1e-9, state.train_seconds)),
        "epochs": round(state.tokens / max(1, corpus.numel()), 3),
        "params": n_params,
        "corpus": corpus_src,
        "corpus_tokens": int(corpus.numel()),
        "attention": attn_info,
        "amp": str(amp),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "final_train_loss": next((h["loss"] for h in reversed(state.history) if "loss" in h), None),
        "final_heldout_window_loss": round(final_heldout, 5),
        "recipe": recipe,
    }
    save_hf(model, args.out / "model", _dtype(args.save_dtype),
            {"stream_attention_training": {k: summary[k] for k in ("steps", "tokens", "train_seconds", "attention")}})
    (args.out / "train_log.json").write_text(json.dumps({**summary, "history": state.history}, indent=1) + "\n")
    summary["loss_png"] = plot_losses(state.history, args.out / "loss.png",
                                      f"default model: {n_params / 1e6:.1f}M params, {state.tokens / 1e6:.0f}M tokens, "
                                      f"{attn_info.get('backend', args.attn)} attention")
    return summary


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``stream-attention-train``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    np.random.seed(args.seed)
    summary = train(args)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
