"""Server settings: command-line flags over ``STREAM_ATTENTION_*`` environment over ``.env``.

Every field of :class:`ServerSettings` is settable three ways, highest priority first:
a flag (``--max-waiting 64``), an environment variable (``STREAM_ATTENTION_MAX_WAITING=64``)
and a line in ``.env`` in the working directory. The package's attention modules read
other ``STREAM_ATTENTION_*`` names from the same ``.env`` (``NUM_HEADS``, ``BACKEND``...),
so unknown names are ignored here rather than rejected.

The engine's settings are not declared here: :class:`EngineSettings` is generated from
:class:`~stream_attention.engine.config.EngineConfig` (same names, types, defaults, help
and bounds), so a new engine field is a new server flag with nothing to map by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import AliasChoices, Field, SecretStr, create_model, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..engine.config import EngineConfig, canonical_dtype_name

ENV_PREFIX = "STREAM_ATTENTION_"

# Names the server's flags had before they took the engine's names; still accepted as
# flags (--max-queue), environment variables (STREAM_ATTENTION_MAX_QUEUE) and arguments.
LEGACY_NAMES: dict[str, tuple[str, ...]] = {
    "max_waiting": ("max_queue",),
    "block_size": ("kv_block_size",),
    "num_kv_blocks": ("kv_cache_blocks",),
    "gpu_memory_fraction": ("kv_cache_memory_fraction",),
    "shutdown_timeout": ("drain_timeout",),
}
# Shorter spellings the peer servers' users type (issue 19: ``--speculative ngram
# --draft-model PATH``), accepted the same way.
SHORT_NAMES: dict[str, tuple[str, ...]] = {
    "speculative_method": ("speculative",),
    "speculative_draft_model": ("draft_model", "speculative_draft_model_path"),  # the second: SGLang's
    "num_speculative_tokens": ("speculative_num_draft_tokens",),  # SGLang
    "gpu_memory_fraction": ("gpu_memory_utilization",),  # vLLM
    "cuda_graph_max_batch": ("cuda_graph_max_bs",),  # SGLang
    "max_num_batched_tokens": ("chunked_prefill_size",),  # SGLang: the step's token budget is the chunk size
}
ALIASES: dict[str, tuple[str, ...]] = {
    name: LEGACY_NAMES.get(name, ()) + SHORT_NAMES.get(name, ()) for name in {*LEGACY_NAMES, *SHORT_NAMES}
}

_SETTINGS_CONFIG = SettingsConfigDict(
    env_prefix=ENV_PREFIX,
    env_prefix_target="all",  # the legacy names are aliases: they get the prefix too
    env_file=".env",
    env_file_encoding="utf-8",
    extra="ignore",
    validate_default=True,
)


def _engine_field(f: dataclasses.Field, annotation: Any) -> tuple[Any, Any]:
    """The pydantic field of one :class:`EngineConfig` field (its metadata gives help and bounds)."""
    meta = f.metadata
    if "choices" in meta:
        choices = Literal[tuple(meta["choices"])]  # type: ignore[misc]
        annotation = choices | None if type(None) in typing.get_args(annotation) else choices
    names = (f.name, *ALIASES.get(f.name, ()))
    return annotation, Field(
        f.default,
        description=meta.get("help"),
        validation_alias=AliasChoices(*names) if len(names) > 1 else None,
        **{k: meta[k] for k in ("ge", "gt", "le") if k in meta},
    )


_HINTS = typing.get_type_hints(EngineConfig)
EngineSettings: type[BaseSettings] = create_model(
    "EngineSettings",
    __base__=BaseSettings,
    __doc__="The engine's settings: one per :class:`EngineConfig` field, of the same name.",
    **{f.name: _engine_field(f, _HINTS[f.name]) for f in dataclasses.fields(EngineConfig)},
)


class ServerSettings(EngineSettings):
    """Everything ``stream-attention-serve`` can be told.

    The engine's fields come from :class:`EngineSettings` and go to the engine's config
    unchanged (``engine_bridge.engine_config``); the fields below are the server's own
    (HTTP, request limits, ``/benchmark``).
    """

    model_config = _SETTINGS_CONFIG

    # --- model -----------------------------------------------------------------
    served_model_name: str | None = Field(None, description="name reported by /v1/models (default: from the model)")
    generation_config: str = Field(
        "auto",
        description="sampling defaults for knobs a request leaves out (repetition_penalty, top_p, top_k, min_p): "
        "auto = the model's generation_config.json, none = neutral values, or a directory holding one",
    )
    engine_mode: Literal["auto", "thread", "process"] = Field(
        "auto",
        description="where the engine steps: process = a process of its own (its Python never waits for the "
        "server's per-token work; the default on CUDA), thread = a thread of the server process (the default on CPU)",
    )
    engine_process: bool = Field(False, description="same as --engine-mode process")
    engine_max_restarts: int = Field(
        5, ge=0, description="engine restarts allowed within 10 minutes before the server exits non-zero"
    )

    # --- limits ----------------------------------------------------------------
    max_tokens: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest request body accepted")
    grammar_compile_timeout: float = Field(
        10.0, gt=0.0, description="seconds a structured-output constraint may take to compile (400 past it)"
    )
    tool_call_parser: Literal["auto", "hermes", "llama3_json"] = Field(
        "auto", description="what tool_choice auto reads in a model's answer: Hermes <tool_call> blocks, "
        "Llama-3 JSON, or both (auto)"
    )

    # --- HTTP --------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="bind port (0 = any free port)")
    api_key: SecretStr | None = Field(
        None, description="if set, every route but /health needs 'Authorization: Bearer <key>'"
    )
    api_key_file: Path | None = Field(
        None, description="read the API key from this file (keeps it out of argv and the environment)"
    )
    public_metrics: bool = Field(False, description="serve /metrics and /memory without the API key")
    allowed_origins: str = Field(
        "", description="comma-separated origins browsers may call from (CORS; '*' = any); empty = CORS off"
    )
    log_prompts: bool = Field(False, description="log each request's prompt and parameters (off: prompts never logged)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info")
    shutdown_timeout: float = Field(
        30.0, ge=0.0, description="seconds SIGINT/SIGTERM wait for in-flight requests to finish before exiting",
        validation_alias=AliasChoices("shutdown_timeout", "drain_timeout"),
    )
    timeout_keep_alive: int = Field(
        60, ge=1, le=3600,
        description="seconds an idle keep-alive connection stays open; longer than client pools keep idle "
        "connections (httpx 5 s, aiohttp 15 s) so the client closes first and never sends into a closing socket",
    )
    retry_after: int = Field(1, ge=1, le=3600, description="Retry-After seconds sent with 429/503")
    telemetry: bool = Field(
        False, description="FastAPI's native OpenTelemetry spans/metrics (needs a configured OpenTelemetry SDK)"
    )

    # --- what one request may carry (limits.py) -----------------------------------
    max_json_depth: int = Field(32, ge=4, le=512, description="deepest nesting of arrays/objects in a request body")
    max_stop_strings: int = Field(16, ge=0, le=1024, description="most stop strings a request may give")
    max_stop_string_chars: int = Field(256, ge=1, description="longest stop string, in characters")
    max_stop_token_ids: int = Field(64, ge=0, description="most stop_token_ids a request may give")
    max_logit_bias: int = Field(300, ge=0, description="most logit_bias entries a request may give")
    max_n: int = Field(16, ge=1, le=128, description="most choices (n) an OpenAI request may ask for")

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
        return canonical_dtype_name(value) if isinstance(value, str) else value

    @field_validator("num_kv_blocks", mode="before")
    @classmethod
    def _zero_blocks_is_unset(cls, value: Any) -> Any:
        # --kv-cache-blocks 0 meant "size the pool from memory", which is what unset means.
        return None if value in (0, "0") else value

    @field_validator("kv_compression", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().lower()
        head, _, index = value.partition(":")
        if head not in ("auto", "cpu", "cuda") or (index and (head != "cuda" or not index.isdigit())):
            raise ValueError(f"device={value!r}: expected auto, cpu, cuda or cuda:N")
        return None if value == "auto" else value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        # An empty STREAM_ATTENTION_API_KEY= line in .env means "no key", not "the empty key".
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _key_from_file(self) -> ServerSettings:
        if self.api_key_file is None:
            return self
        if self.api_key is not None:
            raise ValueError("api_key and api_key_file are both set: give one")
        try:
            key = self.api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"api_key_file={str(self.api_key_file)!r}: cannot read it ({exc})") from exc
        if not key:
            raise ValueError(f"api_key_file={str(self.api_key_file)!r} is empty")
        self.api_key = SecretStr(key)
        return self

    @model_validator(mode="after")
    def _limits(self) -> ServerSettings:
        if self.max_model_len is not None and self.max_tokens > self.max_model_len:
            self.max_tokens = self.max_model_len
        return self

    def resolved_device(self) -> str:
        """``device``, or what this machine has when it is unset (``auto``)."""
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def api_key_value(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key is not None else None

    def cors_origins(self) -> list[str]:
        return [o.strip() for o in self.allowed_origins.split(",") if o.strip()]


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


# Earlier names of flags, still accepted.
def build_parser(prog: str = "stream-attention-serve") -> argparse.ArgumentParser:
    """One ``--flag`` per settings field; unset flags leave env/.env/defaults in charge."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve an LLM over HTTP (REST, SSE, OpenAI-compatible) on StreamAttention's engine. "
        f"Every flag can also be set as {ENV_PREFIX}<NAME> in the environment or in .env.",
    )
    parser.add_argument("--env-file", default=None, help="read settings from this file instead of ./.env")
    for name, info in ServerSettings.model_fields.items():
        env = ENV_PREFIX + name.upper()
        help_text = f"{info.description or ''} [env {env}; default {info.default!r}]".strip()
        # A legacy name keeps a flag of its own, so an error names the flag that was typed.
        for dest in (name, *ALIASES.get(name, ())):
            flag = "--" + dest.replace("_", "-")
            if dest != name:
                help_text = f"same as --{name.replace('_', '-')}"
            if info.annotation in (bool, bool | None):
                parser.add_argument(
                    flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text
                )
                continue
            typ, choices = _flag_type(info.annotation)
            if name in ("dtype", "kv_cache_dtype"):
                typ = canonical_dtype_name  # vLLM's spellings too: bfloat16, float16, half, float32
            parser.add_argument(flag, dest=dest, type=typ, choices=choices, default=None, help=help_text)
    _add_peer_flags(parser)
    return parser


# The peer servers' switches whose value takes another shape here: flag -> (settings, help).
PEER_SWITCHES: dict[str, tuple[dict[str, Any], str]] = {
    "--enforce-eager": ({"use_cuda_graphs": False}, "vLLM: same as --no-use-cuda-graphs"),
    "--disable-cuda-graph": ({"use_cuda_graphs": False}, "SGLang: same as --no-use-cuda-graphs"),
    "--disable-radix-cache": ({"enable_prefix_caching": False}, "SGLang: same as --no-enable-prefix-caching"),
    "--disable-hybrid-kv-cache-manager": ({"hybrid_kv_cache": False}, "vLLM: same as --no-hybrid-kv-cache"),
    "--enable-priority-scheduling": ({"scheduling_policy": "priority"},
                                     "SGLang: same as --scheduling-policy priority"),
    "--enable-auto-tool-choice": ({}, "vLLM: accepted; tool_choice auto is always on here (see --tool-call-parser)"),
}
# vLLM's ``--speculative-config`` keys and the settings they set.
_SPECULATIVE_CONFIG_KEYS = {
    "method": "speculative_method", "model": "speculative_draft_model",
    "num_speculative_tokens": "num_speculative_tokens",
    "prompt_lookup_min": "prompt_lookup_min", "prompt_lookup_max": "prompt_lookup_max",
    "disable_by_batch_size": "speculative_disable_by_batch_size",
}


def speculative_config(text: str) -> dict[str, Any]:
    """Settings from vLLM's ``--speculative-config`` JSON (``{"method": "ngram",
    "num_speculative_tokens": 4, "prompt_lookup_max": 4}``, or ``{"model": PATH, ...}`` for a
    draft model). ``ValueError`` names an unknown key or a method this engine lacks."""
    import json

    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--speculative-config is not JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"--speculative-config must be a JSON object, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(_SPECULATIVE_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"--speculative-config: unsupported key(s) {', '.join(unknown)} "
                         f"(supported: {', '.join(_SPECULATIVE_CONFIG_KEYS)})")
    out = {_SPECULATIVE_CONFIG_KEYS[k]: v for k, v in spec.items()}
    method = spec.get("method")
    if method is None or method in ("draft_model", "draft"):
        if not spec.get("model"):
            raise ValueError("--speculative-config: a draft model needs \"model\" (or use \"method\": \"ngram\")")
        out["speculative_method"] = "draft"
    elif method == "ngram":
        out["speculative_method"] = "ngram"
    else:
        raise ValueError(f"--speculative-config: method {method!r} is not supported (ngram, draft_model)")
    return out


def _add_peer_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("vLLM / SGLang spellings")
    for flag, (_, help_text) in PEER_SWITCHES.items():
        group.add_argument(flag, dest="peer:" + flag, action="store_true", help=help_text)
    group.add_argument("--speculative-config", dest="peer:--speculative-config", metavar="JSON",
                       help='vLLM: {"method": "ngram" | "draft_model", "model": PATH, "num_speculative_tokens": K, '
                            '"prompt_lookup_min": N, "prompt_lookup_max": N}')
    group.add_argument("--speculative-algorithm", dest="peer:--speculative-algorithm", metavar="NAME",
                       help="SGLang: NGRAM (same as --speculative ngram)")
    for flag, who in (("--grammar-backend", "SGLang"), ("--guided-decoding-backend", "vLLM")):
        group.add_argument(flag, dest="peer:" + flag, metavar="NAME",
                           help=f"{who}: structured output always runs on xgrammar here; xgrammar or auto accepted")


def _peer_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """Settings the peer spellings ask for; a peer flag that contradicts a flag of ours
    given beside it is an error rather than a silent winner."""
    given = {k[len("peer:"):]: v for k, v in vars(args).items() if k.startswith("peer:") and v not in (None, False)}
    out: dict[str, Any] = {}
    for flag, value in given.items():
        try:
            if flag in PEER_SWITCHES:
                settings = PEER_SWITCHES[flag][0]
            elif flag == "--speculative-config":
                settings = speculative_config(value)
            elif flag in ("--grammar-backend", "--guided-decoding-backend"):
                if value.lower() not in ("xgrammar", "auto"):
                    raise ValueError(f"{flag} {value}: structured output runs on xgrammar only")
                settings = {}
            elif value.lower() == "ngram":
                settings = {"speculative_method": "ngram"}
            else:
                raise ValueError(f"--speculative-algorithm {value}: only NGRAM is supported")
        except ValueError as exc:
            parser.error(str(exc))
        for name, v in settings.items():
            ours = [getattr(args, dest, None) for dest in (name, *ALIASES.get(name, ()))]
            if any(o is not None and o != v for o in ours) or name in out and out[name] != v:
                parser.error(f"{flag} sets {name} to {v!r}, which contradicts another flag")
            out[name] = v
    return out


def settings_from_args(argv: list[str] | None = None) -> ServerSettings:
    """Parse flags and merge them over the environment and ``.env``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    peer = _peer_overrides(parser, args)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k != "env_file" and not k.startswith("peer:")}
    overrides.update(peer)
    if args.env_file is not None:
        return ServerSettings(_env_file=args.env_file, **overrides)
    return ServerSettings(**overrides)
