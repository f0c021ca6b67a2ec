"""Integrations of StreamAttention with other libraries.

``stream_attention.integration.hf`` (extra ``hf``: ``pip install "stream-attention[hf]"``)
registers the ``"stream_attention"`` attention implementation with Hugging Face
transformers, so any causal LM whose modeling code uses transformers' attention
registry runs its attention through :func:`stream_attention.fused_attention`::

    import stream_attention.integration.hf  # registers "stream_attention"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="stream_attention")
    # or, on a model already loaded:
    from stream_attention.integration.hf import enable_stream_attention
    enable_stream_attention(model)

This package itself does not import transformers; only ``.hf`` does.
"""

__all__ = ["hf"]
