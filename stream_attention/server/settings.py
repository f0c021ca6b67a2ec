"""Server settings: command-line flags over ``STREAM_ATTENTION_*`` environment over ``.env``.

Every field of :class:`ServerSettings` is settable three ways, highest priority first:
a flag (``--max-queue 64``), an environment variable (``STREAM_ATTENTION_MAX_QUEUE=64``)
and a line in ``.env`` in the working directory. The package's attention modules read
other ``STREAM_ATTENTION_*`` names from the same ``.env`` (``NUM_HEADS``, ``BACKEND``...),
so unknown names are ignored here rather than rejected.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "STREAM_ATTENTION_"

_DTYPE_ALIASES = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float32": "fp32",
    "float": "fp32",
    "fp8_e4m3": "fp8",  # vLLM's name for the same e4m3 KV pages
}


class ServerSettings(BaseSettings):
    """Everything ``stream-attention-serve`` can be told.

    Engine-facing fields (model, dtype, device, KV cache, limits) are handed to the
    engine's config; HTTP-facing ones (host, port, API key, body size, drain time) stay
    in the server.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    # --- model -----------------------------------------------------------------
    model: str | None = Field(
        None, description="local path or Hugging Face hub id; unset serves the engine's embedded default model"
    )
    tokenizer: str | None = Field(None, description="tokenizer path or hub id (default: the model's)")
    served_model_name: str | None = Field(None, description="name reported by /v1/models (default: from the model)")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="weights/activations dtype")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    revision: str | None = Field(None, description="model revision (branch, tag or commit) on the hub")
    trust_remote_code: bool = Field(False, description="allow model code from the hub")
    seed: int = Field(0, description="engine seed for requests that give none")
    attention_backend: Literal["auto", "triton", "sdpa"] = Field("auto", description="attention kernels of the engine")
    use_cuda_graphs: bool = Field(True, description="replay CUDA graphs for decode steps (CUDA only)")
    engine_process: bool = Field(
        False,
        description="run the engine in a process of its own (no GIL shared with HTTP: faster at many streams)",
    )

    # --- KV cache ----------------------------------------------------------------
    kv_cache_dtype: Literal["auto", "bf16", "fp16", "fp32", "fp8", "fp8_e4m3", "int8", "int4"] = Field(
        "auto", description="storage format of KV pages (auto = the model dtype; fp8 = e4m3, alias fp8_e4m3)"
    )
    kv_compression: str = Field(
        "none",
        description="KV eviction policy: none, streaming (sinks + recent window), heavy-hitter (H2O), snapkv, hybrid",
    )
    kv_compression_ratio: float | None = Field(
        None, ge=1.0, le=64.0, description="eviction target: keep 1/ratio of each sequence's tokens"
    )
    kv_budget_tokens: int | None = Field(None, ge=1, description="eviction target: KV tokens kept per sequence")
    kv_sink_tokens: int = Field(4, ge=0, description="first tokens eviction never drops (attention sinks)")
    kv_window_tokens: int = Field(256, ge=0, description="most recent tokens eviction never drops")
    kv_score_interval: int = Field(8, ge=1, description="heavy-hitter eviction: score every n-th decode step")
    kv_block_size: int = Field(16, ge=1, le=1024, description="tokens per KV block")
    kv_cache_blocks: int = Field(0, ge=0, description="KV blocks in the pool (0 = size from memory)")
    kv_cache_memory_fraction: float = Field(
        0.9, gt=0.0, le=1.0, description="fraction of device memory weights plus KV pool may take (CUDA)"
    )
    kv_cache_memory_bytes: int | None = Field(None, gt=0, description="bytes of KV pool (overrides the fraction)")
    enable_prefix_caching: bool = Field(True, description="reuse KV blocks of shared prompt prefixes")

    # --- limits ----------------------------------------------------------------
    max_model_len: int | None = Field(None, ge=16, description="context length (default: the model's)")
    max_num_seqs: int = Field(256, ge=1, le=4096, description="sequences decoded together")
    max_num_batched_tokens: int = Field(8192, ge=1, description="tokens per engine step (decode + prefill chunks)")
    max_queue: int = Field(256, ge=0, le=1_000_000, description="requests waiting beyond the running ones; 429 past it")
    max_tokens: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest request body accepted")

    # --- HTTP --------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="bind port (0 = any free port)")
    api_key: SecretStr | None = Field(
        None, description="if set, every route but /health needs 'Authorization: Bearer <key>'"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info")
    drain_timeout: float = Field(30.0, ge=0.0, description="seconds shutdown waits for in-flight requests")
    retry_after: int = Field(1, ge=1, le=3600, description="Retry-After seconds sent with 429/503")
    telemetry: bool = Field(
        False, description="FastAPI's native OpenTelemetry spans/metrics (needs a configured OpenTelemetry SDK)"
    )

    # --- /benchmark ------------------------------------------------------------
    benchmark_enabled: bool = Field(True, description="serve POST /benchmark")
    benchmark_max_seq_len: int = Field(8192, ge=16, description="longest sequence /benchmark may time")
    benchmark_max_memory_bytes: int = Field(
        1 << 30, ge=1 << 20, description="largest q+k+v+out footprint a kernel benchmark may allocate"
    )
    benchmark_max_tokens: int = Field(256, ge=1, description="largest generation-benchmark max_tokens")
    benchmark_max_requests: int = Field(64, ge=1, description="most requests in a generation benchmark")
    benchmark_time_budget: float = Field(
        30.0, gt=0.0, description="seconds after which a kernel benchmark stops starting new sizes"
    )

    @field_validator("dtype", "kv_cache_dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
            return _DTYPE_ALIASES.get(value, value)
        return value

    @field_validator("kv_compression", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        value = value.strip().lower()
        head, _, index = value.partition(":")
        if head not in ("auto", "cpu", "cuda") or (index and (head != "cuda" or not index.isdigit())):
            raise ValueError(f"device={value!r}: expected auto, cpu, cuda or cuda:N")
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        # An empty STREAM_ATTENTION_API_KEY= line in .env means "no key", not "the empty key".
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _limits(self) -> ServerSettings:
        if self.max_model_len is not None and self.max_tokens > self.max_model_len:
            self.max_tokens = self.max_model_len
        return self

    def resolved_device(self) -> str:
        """``device`` with ``auto`` resolved against what this machine has."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def api_key_value(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key is not None else None


def _flag_type(annotation: Any) -> tuple[Any, list[str] | None]:
    """argparse ``type``/``choices`` for a field annotation (``X | None`` unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _flag_type(args[0])
    if origin is Literal:
        return str, [str(a) for a in typing.get_args(annotation)]
    if annotation in (int, float):
        return annotation, None
    return str, None


def build_parser(prog: str = "stream-attention-serve") -> argparse.ArgumentParser:
    """One ``--flag`` per settings field; unset flags leave env/.env/defaults in charge."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve an LLM over HTTP (REST, SSE, OpenAI-compatible) on StreamAttention's engine. "
        f"Every flag can also be set as {ENV_PREFIX}<NAME> in the environment or in .env.",
    )
    parser.add_argument("--env-file", default=None, help="read settings from this file instead of ./.env")
    for name, info in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = ENV_PREFIX + name.upper()
        help_text = f"{info.description or ''} [env {env}; default {info.default!r}]".strip()
        if info.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        typ, choices = _flag_type(info.annotation)
        parser.add_argument(flag, dest=name, type=typ, choices=choices, default=None, help=help_text)
    return parser


def settings_from_args(argv: list[str] | None = None) -> ServerSettings:
    """Parse flags and merge them over the environment and ``.env``."""
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k != "env_file"}
    if args.env_file is not None:
        return ServerSettings(_env_file=args.env_file, **overrides)
    return ServerSettings(**overrides)
