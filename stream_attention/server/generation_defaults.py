"""Sampling defaults from the model's ``generation_config.json`` (vLLM's ``--generation-config auto``).

A model's authors often ship the sampling knobs it should run with (a repetition penalty for a
small model that loops greedily, a top-p for a chat model). A request that leaves one of those
knobs out gets the model's value instead of the neutral one; a request that sets it wins.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("stream_attention.server")

# The knobs taken from generation_config.json. Temperature is not among them: each route keeps
# its documented default (greedy for /generate, 1.0 for the OpenAI routes).
SAMPLING_KEYS = ("repetition_penalty", "top_p", "top_k", "min_p")


def load_sampling_defaults(source: str, model: str | None) -> dict[str, float]:
    """The sampling knobs ``source`` sets: ``"auto"`` reads the served model's directory
    (the embedded default model when ``model`` is None), ``"none"`` sets nothing, anything
    else is a directory holding a ``generation_config.json``. Knobs the file leaves at
    transformers' defaults are not returned (the server's neutral values apply)."""
    if source == "none":
        return {}
    if source == "auto":
        if model is None:
            from ..models.default import default_model_dir

            where: str | Path = default_model_dir()
        else:
            where = model
    else:
        where = source
    try:
        from transformers import GenerationConfig

        diff = GenerationConfig.from_pretrained(where).to_diff_dict()
    except Exception as exc:  # noqa: BLE001 - no file (or no network for a hub id): no defaults
        if source not in ("auto", "none"):
            raise ValueError(f"generation_config={source!r}: cannot read a generation_config.json there ({exc})") from exc
        log.info("no generation_config.json for %s (%s): neutral sampling defaults", where, exc)
        return {}
    defaults = {k: float(diff[k]) for k in SAMPLING_KEYS if diff.get(k) is not None}
    if defaults:
        log.info("sampling defaults from %s: %s", where, defaults)
    return defaults


def served_model_source(settings_model: str | None, engine_model_name: str | None) -> tuple[str | None, bool]:
    """Where ``"auto"`` looks for the served model's ``generation_config.json``:
    ``(model, known)``. ``--model`` when given; else the engine's own model, which is the
    embedded default model (``model`` None) or one the engine was handed as an object,
    found again only when its name is a local checkpoint directory (``known`` False
    otherwise: the embedded model's knobs must not leak onto another model)."""
    from ..engine.llm_engine import DEFAULT_MODEL_NAME

    if settings_model is not None or engine_model_name in (None, DEFAULT_MODEL_NAME):
        return settings_model, True
    if Path(engine_model_name).is_dir():
        return engine_model_name, True
    return None, False
