"""The flags vLLM and SGLang users type, as ``stream-attention-serve`` reads them."""

from __future__ import annotations

import pytest

from stream_attention.server.engine_bridge import engine_config
from stream_attention.server.settings import settings_from_args


def test_switches_and_renamed_flags_set_our_settings() -> None:
    s = settings_from_args(["--enforce-eager", "--disable-radix-cache", "--enable-priority-scheduling",
                            "--cuda-graph-max-bs", "32", "--chunked-prefill-size", "4096"])
    cfg = engine_config(s)
    assert cfg.use_cuda_graphs is False and cfg.enable_prefix_caching is False
    assert cfg.scheduling_policy == "priority"
    assert (cfg.cuda_graph_max_batch, cfg.max_num_batched_tokens) == (32, 4096)
    assert settings_from_args(["--disable-cuda-graph"]).use_cuda_graphs is False
    vllm = settings_from_args(["--dtype", "bfloat16", "--kv-cache-dtype", "fp8_e4m3", "--gpu-memory-utilization", "0.8"])
    assert (vllm.dtype, vllm.kv_cache_dtype, vllm.gpu_memory_fraction) == ("bf16", "fp8", 0.8)
    assert settings_from_args(["--dtype", "half"]).dtype == "fp16"
    settings_from_args(["--grammar-backend", "xgrammar", "--guided-decoding-backend", "auto"])  # accepted
    # Without them, our defaults stand.
    plain = engine_config(settings_from_args([]))
    assert plain.use_cuda_graphs is True and plain.enable_prefix_caching is True and plain.scheduling_policy == "fcfs"


def test_vllm_speculative_config_json() -> None:
    ngram = engine_config(settings_from_args(
        ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, '
                                 '"prompt_lookup_max": 5, "disable_by_batch_size": 8}']))
    assert (ngram.speculative_method, ngram.num_speculative_tokens, ngram.prompt_lookup_min,
            ngram.prompt_lookup_max, ngram.speculative_disable_by_batch_size) == ("ngram", 3, 2, 5, 8)
    draft = settings_from_args(["--speculative-config", '{"model": "/models/small", "num_speculative_tokens": 2}'])
    assert (draft.speculative_method, draft.speculative_draft_model, draft.num_speculative_tokens) == (
        "draft", "/models/small", 2)
    sglang = settings_from_args(["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "6",
                                 "--speculative-draft-model-path", "/models/d"])
    assert (sglang.speculative_method, sglang.num_speculative_tokens, sglang.speculative_draft_model) == (
        "ngram", 6, "/models/d")


@pytest.mark.parametrize(("argv", "message"), [
    (["--speculative-config", '{"method": "eagle"}'], "method 'eagle' is not supported"),
    (["--speculative-config", '{"method": "ngram", "k": 2}'], "unsupported key(s) k"),
    (["--speculative-config", "{not json"], "is not JSON"),
    (["--speculative-config", "[1]"], "must be a JSON object"),
    (["--speculative-config", '{"num_speculative_tokens": 2}'], 'needs "model"'),
    (["--speculative-algorithm", "EAGLE"], "only NGRAM"),
    (["--enforce-eager", "--use-cuda-graphs"], "contradicts another flag"),
    (["--speculative", "draft", "--speculative-config", '{"method": "ngram"}'], "contradicts another flag"),
    (["--enable-priority-scheduling", "--scheduling-policy", "fcfs"], "contradicts another flag"),
    (["--dtype", "int3"], "invalid choice: 'int3'"),
    (["--grammar-backend", "outlines"], "xgrammar only"),
    (["--guided-decoding-backend", "guidance"], "xgrammar only"),
])
def test_bad_peer_flags_are_usage_errors_that_say_why(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        settings_from_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
