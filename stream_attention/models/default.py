"""The embedded default model: a small Llama trained by this project on its own kernels.

``load_default_model()`` returns ``(model, tokenizer)`` from the files shipped in
``stream_attention/models/default/``. Until trained weights are installed there it
builds the same architecture with random weights and logs loudly that it is untrained,
so that the engine and the server work end to end in the meantime.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"

# Sized to ship inside the package (~10 M parameters, ~20 MB in bf16) and to train in a
# few minutes of one H100: head_dim 64 is the kernel's best-tuned size, GQA 6:2 keeps
# the KV cache small, embeddings are tied because they are a sixth of the parameters.
ARCHITECTURE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 4096,
    "hidden_size": 384,
    "intermediate_size": 896,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
    "use_cache": True,
}


def default_model_dir() -> Path:
    """Directory holding the shipped model (config, weights, tokenizer, metrics)."""
    return Path(__file__).resolve().parent / "default"


def has_trained_weights(model_dir: Path | None = None) -> bool:
    """True once ``model.safetensors`` has been installed next to the config."""
    return ((model_dir or default_model_dir()) / WEIGHTS_FILE).is_file()


def default_config(**overrides: Any):
    """The default model's ``LlamaConfig`` (``overrides`` replace fields, e.g. for a tiny test model)."""
    from transformers import LlamaConfig

    fields = dict(ARCHITECTURE)
    fields.pop("architectures")
    fields.pop("model_type")
    fields.update(overrides)
    # transformers 5 moved rope_theta into rope_parameters; passing both shapes keeps
    # configs loadable by 4.x and 5.x alike.
    fields.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": fields["rope_theta"]})
    cfg = LlamaConfig(**fields)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def load_tokenizer(model_dir: Path | str | None = None):
    """The shipped ``PreTrainedTokenizerFast`` (byte-level BPE with a chat template)."""
    from transformers import PreTrainedTokenizerFast

    model_dir = Path(model_dir or default_model_dir())
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    kwargs = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "model_max_length", "padding_side")}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), **kwargs)
    tok.add_special_tokens({"additional_special_tokens": cfg.get("additional_special_tokens", [])})
    tok.chat_template = cfg["chat_template"]
    return tok


def _resolve(device: str | torch.device | None, dtype: torch.dtype | str | None) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, dtype


def load_default_model(
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    attn_implementation: str | None = None,
    model_dir: Path | str | None = None,
):
    """Load the embedded default model and its tokenizer.

    Args:
        device: defaults to CUDA when available, else CPU.
        dtype: defaults to bf16 on CUDA and fp32 on CPU (the weights ship in bf16).
        attn_implementation: any name ``transformers`` knows (``"sdpa"``, ``"eager"``, or
            ``"stream_attention"`` once registered); ``None`` keeps transformers' default.
        model_dir: load from another directory with the same layout (tests, fresh training).

    Returns:
        ``(model, tokenizer)``, the model in eval mode. Without trained weights the model
        is randomly initialised (seed 0) and ``model.config.stream_attention_untrained`` is True.
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model_dir = Path(model_dir or default_model_dir())
    dev, dt = _resolve(device, dtype)
    tokenizer = load_tokenizer(model_dir)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if has_trained_weights(model_dir):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt, **extra)
        model.config.stream_attention_untrained = False
    else:
        logger.warning(
            "stream_attention: no trained weights in %s; using a RANDOMLY INITIALISED default model "
            "(its text is noise and its quality numbers mean nothing)", model_dir,
        )
        cfg = default_config()
        if attn_implementation:
            cfg._attn_implementation = attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg)
        model = model.to(dtype=dt)
        model.config.stream_attention_untrained = True
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.to(dev).eval(), tokenizer


def recorded_metrics(model_dir: Path | str | None = None) -> dict | None:
    """The ``metrics.json`` written by training, or None before the model is trained."""
    path = Path(model_dir or default_model_dir()) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
