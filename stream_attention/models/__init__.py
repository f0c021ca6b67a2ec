"""The embedded default model (``load_default_model``), its training and evaluation tools."""

from .default import default_config, default_model_dir, has_trained_weights, load_default_model, load_tokenizer

__all__ = ["default_config", "default_model_dir", "has_trained_weights", "load_default_model", "load_tokenizer"]
