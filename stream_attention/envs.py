"""Every environment variable the package reads, with its type, default and meaning.

Code reads the environment only through the accessors below (``tests/test_envs.py``
checks that no other module does), so this file is the list of what can be set from
outside. Each accessor reads at call time: a test or a script may change a variable
between calls. The README's table of variables is :func:`markdown_table`'s output (the
same test keeps them equal).

Two families are read by their owners rather than one name at a time:
``STREAM_ATTENTION_<FIELD>`` of :class:`~stream_attention.core.config.StreamAttentionConfig`
(through :func:`family_values`) and ``STREAM_ATTENTION_<FLAG>`` of
``stream-attention-serve`` (through pydantic-settings, which also reads ``.env``).

This module imports nothing from the package, so every layer may use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

PREFIX = "STREAM_ATTENTION_"
_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


@dataclass(frozen=True)
class EnvVar:
    """One variable (or one family, when ``name`` ends in ``<...>``) and who reads it."""

    name: str
    default: str
    help: str
    read_by: str


VARIABLES: list[EnvVar] = []


def _declare(name: str, default: str, help: str, read_by: str) -> EnvVar:
    var = EnvVar(name, default, help, read_by)
    VARIABLES.append(var)
    return var


def _text(var: EnvVar) -> str | None:
    """The variable's value, stripped and lower-cased; None when unset."""
    value = os.environ.get(var.name)
    return None if value is None else value.strip().lower()


def _switch(var: EnvVar) -> bool | None:
    """True for 1/true/yes/on, False for 0/false/no/off, None when unset (or anything else)."""
    value = _text(var)
    if value in _ON:
        return True
    if value in _OFF:
        return False
    return None


# --------------------------------------------------------------------------- backends

BACKEND = _declare(
    PREFIX + "BACKEND", "auto",
    "`triton`, `sdpa` or `auto`: what every `backend=\"auto\"` in the package (modules, HF models, engine, "
    "server) resolves to; an explicit `backend=` argument wins",
    "core/backend.py",
)
BACKENDS = ("auto", "triton", "sdpa")


def backend() -> str:
    """The backend ``STREAM_ATTENTION_BACKEND`` names (``"auto"`` when unset or empty).

    Raises ``ValueError`` naming the variable for anything but auto, triton or sdpa.
    """
    value = _text(BACKEND) or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND.name}={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


def backend_is_set() -> bool:
    """Whether ``STREAM_ATTENTION_BACKEND`` is set to a non-empty value."""
    return bool(_text(BACKEND))


# --------------------------------------------------------------------------- kernel switches
# The kernels take these as arguments; core/kernel_switches.py reads them for the callers.

AUTOTUNE = _declare(
    PREFIX + "AUTOTUNE", "0",
    "`1` autotunes every new shape on the GPU (tens of seconds each); unset, launches take the config "
    "measured for their shape class",
    "core/kernel_switches.py",
)
TMA = _declare(
    PREFIX + "TMA", "",
    "`0` keeps dense forward launches off the TMA-descriptor kernel on Hopper; `1` also takes it under the "
    "Triton interpreter",
    "core/kernel_switches.py",
)
PAGED_TMA = _declare(
    PREFIX + "PAGED_TMA", "1",
    "`0` keeps paged decode on the pointer kernel instead of the TMA kernel (Hopper)",
    "core/kernel_switches.py",
)
KV_FAST = _declare(
    PREFIX + "KV_FAST", "1",
    "`0` sends compressed (fp8/int8/int4) paged attention to the generic kernel instead of the fp16-code one",
    "core/kernel_switches.py",
)
KV_ASM = _declare(
    PREFIX + "KV_ASM", "1",
    "`0` makes the compressed-page kernel convert codes with portable integer ops instead of inline PTX",
    "core/kernel_switches.py",
)
KV_DEFER_SUMS = _declare(
    PREFIX + "KV_DEFER_SUMS", "",
    "`1`/`0` forces the quantized kernel to keep (or not) its row sums per key column until the end; unset, "
    "decides per launch",
    "core/kernel_switches.py",
)


def autotune() -> bool:
    """Whether GPU launches autotune (``STREAM_ATTENTION_AUTOTUNE=1``) instead of taking the
    measured default config of their shape class: autotuning compiles and times every
    candidate for each new shape, tens of seconds on a server's first requests."""
    return _switch(AUTOTUNE) is True


def tma() -> bool | None:
    """``STREAM_ATTENTION_TMA``: False forbids the TMA forward kernel, True asks for it even
    under the interpreter, None (unset) leaves it to the device."""
    return _switch(TMA)


def paged_tma() -> bool:
    """Whether paged decode may take the TMA kernel (``STREAM_ATTENTION_PAGED_TMA``, default on)."""
    return _switch(PAGED_TMA) is not False


def kv_fast() -> bool:
    """Whether quantized paged attention may take the fp16-code kernel (``STREAM_ATTENTION_KV_FAST``, default on)."""
    return _switch(KV_FAST) is not False


def kv_asm() -> bool:
    """Whether the quantized kernel converts codes with inline PTX (``STREAM_ATTENTION_KV_ASM``, default on)."""
    return _switch(KV_ASM) is not False


def kv_defer_sums() -> bool | None:
    """``STREAM_ATTENTION_KV_DEFER_SUMS``: True/False forces deferred row sums, None lets the launch decide."""
    return _switch(KV_DEFER_SUMS)


# --------------------------------------------------------------------------- clients

URL = _declare(
    PREFIX + "URL", "http://127.0.0.1:8000",
    "server the Python client and `stream-attention-client` talk to",
    "clients/client.py",
)
API_KEY = _declare(
    PREFIX + "API_KEY", "",
    "bearer key: the server requires it on every route but /health; the client sends it",
    "clients/client.py, server/settings.py",
)


def client_url() -> str | None:
    """``STREAM_ATTENTION_URL`` as given (None when unset or empty)."""
    return os.environ.get(URL.name) or None


def client_api_key() -> str | None:
    """``STREAM_ATTENTION_API_KEY`` as given (None when unset)."""
    return os.environ.get(API_KEY.name)


# --------------------------------------------------------------------------- families

CONFIG_FIELDS = _declare(
    PREFIX + "<FIELD>", "",
    "any `StreamAttentionConfig` field, read by `StreamAttentionConfig.from_env()` (see `.env.example`)",
    "core/config.py",
)
SERVER_FLAGS = _declare(
    PREFIX + "<FLAG>", "",
    "any `stream-attention-serve` flag, e.g. `STREAM_ATTENTION_MAX_WAITING` (`--help` lists them; `.env` too)",
    "server/settings.py (pydantic-settings)",
)


def family_values(names: Iterable[str], prefix: str = PREFIX) -> dict[str, str]:
    """``{name: raw value}`` for each of ``names`` whose ``<prefix><NAME>`` variable is set."""
    out = {}
    for name in names:
        value = os.environ.get(prefix + name.upper())
        if value is not None:
            out[name] = value
    return out


# --------------------------------------------------------------------------- set by others

TRITON_INTERPRET = _declare(
    "TRITON_INTERPRET", "0",
    "`1` runs the Triton kernels on CPU tensors through Triton's interpreter (read by Triton when the package "
    "is imported: set it before)",
    "Triton itself (kernels/runtime.py asks triton.knobs)",
)
TORCHRUN = _declare(
    "RANK, WORLD_SIZE, LOCAL_RANK", "",
    "set by `torchrun`: `stream_attention.cli.distributed` joins that process group",
    "cli/distributed.py",
)


def torchrun_launched() -> bool:
    """Whether this process was started by ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_rank() -> int:
    """This process's device index on its host under ``torchrun`` (``LOCAL_RANK``, default 0)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


# --------------------------------------------------------------------------- documentation


def markdown_table() -> str:
    """The README's table of variables, one row per :data:`VARIABLES` entry."""
    rows = ["| variable | default | what | read by |", "|---|---|---|---|"]
    for var in VARIABLES:
        default = f"`{var.default}`" if var.default else "unset"
        rows.append(f"| `{var.name}` | {default} | {var.help} | `{var.read_by}` |")
    return "\n".join(rows)
