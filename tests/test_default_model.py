"""The embedded default model: tokenizer, loading, generation, recorded quality, training smoke test.

The quality check recomputes, on CPU, the held-out slice whose perplexity the GPU run
recorded in ``stream_attention/models/default/metrics.json`` (fp32, SDPA on both sides),
so a changed tokenizer, weight file, held-out text or modeling code shows up here.
"""

from __future__ import annotations

import hashlib
import json
import lzma

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from stream_attention.models import default_model_dir, has_trained_weights, load_default_model  # noqa: E402
from stream_attention.models.data import HELDOUT_PATH, read_heldout  # noqa: E402
from stream_attention.models.default import load_tokenizer, recorded_metrics  # noqa: E402
from stream_attention.models.eval import load_documents, plan_windows, score_documents  # noqa: E402

TRAINED = has_trained_weights()
METRICS = recorded_metrics()
NO_WEIGHTS = "no trained weights in stream_attention/models/default yet (run benchmarks/train_default.py on a GPU)"


@pytest.fixture
def restore_attention_registry():
    """Training registers an autocast-safe wrapper for "stream_attention"; keep other tests unaffected."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    saved = dict(AttentionInterface._global_mapping), dict(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)
    yield
    for registry, old in zip((AttentionInterface, ALL_MASK_ATTENTION_FUNCTIONS), saved, strict=True):
        registry._global_mapping.clear()
        registry._global_mapping.update(old)


def test_tokenizer_special_tokens_and_chat_template():
    tok = load_tokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert 4000 <= len(tok) <= 8192
    text = "def add(a, b):\n    return a + b  # ünïcode ✓\n"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte-level: lossless
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|bos|><|user|>\nhi<|eos|>\n<|assistant|>\n"
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == tok.bos_token_id and tok.convert_tokens_to_ids("<|assistant|>") in ids


def test_heldout_split_is_small_and_anchored():
    assert HELDOUT_PATH.stat().st_size <= 1_000_000
    docs = read_heldout()
    assert len(docs) > 50 and all(d.name.startswith("stdlib/") for d in docs)
    data = "".join(d.text for d in docs).encode()
    table = json.loads(HELDOUT_PATH.with_name("heldout_anchors.json").read_text())
    recorded = table[hashlib.sha256(data).hexdigest()]
    assert len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9)) == recorded["xz -9"]["bytes"]


def test_plan_windows_scores_every_target_once():
    for n, ctx, stride in [(1, 8, 7), (5, 8, 7), (9, 8, 7), (20, 8, 7), (21, 8, 3), (100, 16, 5)]:
        windows = plan_windows(n, ctx, stride)
        targets = [p for start, end, first in windows for p in range(first, end)]
        assert targets == list(range(1, n))
        assert all(end - start <= ctx and start < first for start, end, first in windows)


def test_default_model_loads_and_generates():
    model, tok = load_default_model(device="cpu")
    assert model.config.max_position_embeddings >= 2048
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    assert bool(model.config.stream_attention_untrained) is (not TRAINED)
    ids = torch.tensor([[tok.bos_token_id, *tok.encode("import os\n", add_special_tokens=False)]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if TRAINED:  # the trained model continues an import block with Python
        assert "import" in text or "from" in text, text


@pytest.mark.skipif(not TRAINED or METRICS is None, reason=NO_WEIGHTS)
def test_heldout_perplexity_matches_recorded():
    ref = METRICS["ci_slice"]
    docs = load_documents(max_bytes=ref["max_bytes"])
    text = "".join(d.text for d in docs).encode()
    assert hashlib.sha256(text).hexdigest() == ref["text"]["sha256"], "held-out slice changed since training"
    model, tok = load_default_model(device="cpu", dtype=torch.float32, attn_implementation="sdpa")
    got = score_documents(model, tok, docs, ctx=ref["score"]["ctx"], stride=ref["score"]["stride"])
    assert got["tokens"] == ref["score"]["tokens"]
    assert got["perplexity"] == pytest.approx(ref["score"]["perplexity"], rel=0.01)
    assert got["bits_per_byte"] == pytest.approx(ref["score"]["bits_per_byte"], rel=0.01)


@pytest.mark.skipif(not TRAINED or METRICS is None, reason=NO_WEIGHTS)
def test_recorded_quality_beats_xz():
    bpb = METRICS["heldout"]["score"]["bits_per_byte"]
    assert METRICS["heldout"]["text"]["bytes"] == HELDOUT_PATH.stat().st_size - sum(
        len(f"<|file|>{d.name}\n".encode()) for d in read_heldout())
    assert bpb < METRICS["anchors"]["xz -9"]["bits_per_byte"]
    assert METRICS["training"]["attention"]["attn_implementation"] == "stream_attention"
    assert (default_model_dir() / "model.safetensors").stat().st_size <= 21_000_000


def test_train_one_tiny_step_under_interpreter(tmp_path, monkeypatch, restore_attention_registry):
    from stream_attention.models import train

    monkeypatch.setenv("STREAM_ATTENTION_BACKEND", "triton")
    out = tmp_path / "run"
    common = ["--device", "cpu", "--tiny", "--out", str(out), "--data", str(tmp_path / "missing.u16.xz"),
              "--eval-every", "0", "--seed", "7"]
    first = train.train(train.parse_args([*common, "--steps", "1"]))
    assert first["steps"] == 1 and first["stop_reason"] == "max steps"
    attention = first["attention"]
    assert attention["attn_implementation"] == "stream_attention"
    if torch.cuda.is_available() or attention.get("triton_backward") == "ok":
        assert attention["backend"] == "triton"  # our forward and backward ran (interpreted on CPU)
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "tokenizer.json").is_file()
    assert (out / "loss.png").is_file() or "loss_png" in first
    log = json.loads((out / "train_log.json").read_text())
    assert log["history"] and all(torch.isfinite(torch.tensor(h.get("loss", 0.0))) for h in log["history"])
    # Resuming continues from the checkpoint instead of starting over.
    second = train.train(train.parse_args([*common, "--steps", "2", "--resume"]))
    assert second["steps"] == 2
