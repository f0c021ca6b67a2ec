"""Tool calls on ``/v1/chat/completions``: ``tools``, ``tool_choice``, ``parallel_tool_calls``.

- ``required`` and a named function are grammar-constrained (the structured-output path):
  a named function's output *is* its arguments object (its ``parameters`` schema), so the
  stream can send the arguments as they are generated; ``required`` generates a JSON
  array of ``{"name", "parameters"}`` objects (one item unless ``parallel_tool_calls``),
  each item's ``parameters`` validated by its tool's schema.
- ``auto`` renders the tools through the model's chat template and parses what the model
  writes: Hermes-style ``<tool_call>{...}</tool_call>`` blocks, or a Llama-3 style JSON
  object (or list of them) ``{"name": ..., "parameters" | "arguments": {...}}`` as the
  whole answer. Anything else is plain content.
- ``none`` (or no tools) is a plain chat completion.

Calls come back as OpenAI shapes them: ``{"id": "call_...", "type": "function", "function":
{"name", "arguments": <JSON text>}}`` with ``finish_reason: "tool_calls"``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ..engine.types import StructuredOutputsParams
from .schemas import ChatCompletionRequest, NamedToolChoice, Tool

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
HERMES_OPEN = "<tool_call>"
# What ``tool_choice: auto`` reads in the model's answer (vLLM's ``--tool-call-parser`` names):
# both formats, or only one where the other could be ordinary content (a model that answers
# in JSON, or that writes the Hermes tag as text).
TOOL_CALL_PARSERS = ("auto", "hermes", "llama3_json")


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call(name: str, arguments: str) -> dict[str, Any]:
    """One entry of a message's ``tool_calls``; ``arguments`` is JSON text."""
    return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


@dataclass
class ToolPlan:
    """How a chat request with tools is generated and read back."""

    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[Tool]
    parallel: bool = True
    name: str | None = None  # the named function
    parser: str = "auto"  # which of the model's own formats ``auto`` reads (see TOOL_CALL_PARSERS)

    @classmethod
    def of(cls, body: ChatCompletionRequest, parser: str = "auto") -> ToolPlan:
        tools = list(body.tools or [])
        choice = body.tool_choice
        if isinstance(choice, NamedToolChoice):
            return cls("named", tools, body.parallel_tool_calls, choice.function.name, parser)
        if not tools or choice == "none":
            return cls("none", tools, body.parallel_tool_calls, parser=parser)
        return cls(choice or "auto", tools, body.parallel_tool_calls, parser=parser)

    @property
    def constrained(self) -> bool:
        return self.mode in ("required", "named")

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates take them (OpenAI's shape)."""
        return [t.model_dump(exclude_none=True) for t in self.tools] or None

    def structured_outputs(self) -> StructuredOutputsParams | None:
        """The grammar for ``required`` and named calls (None otherwise)."""
        if self.mode == "named":
            tool = next(t for t in self.tools if t.function.name == self.name)
            return StructuredOutputsParams(json=tool.function.parameters)
        if self.mode == "required":
            calls = [
                {
                    "type": "object",
                    "properties": {"name": {"const": t.function.name}, "parameters": t.function.parameters},
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for t in self.tools
            ]
            schema: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                                      "minItems": 1}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutputsParams(json=schema)
        return None

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """``(content, tool_calls)`` of a finished choice's text."""
        if self.mode == "named":
            try:
                json.loads(text)
            except ValueError:  # cut off (finish_reason length): not a call
                return text, []
            return None, [tool_call(self.name or "", text)]
        if self.mode == "required":
            try:
                items = json.loads(text)
            except ValueError:
                return text, []
            return None, [tool_call(c["name"], json.dumps(c["parameters"])) for c in items]
        if self.mode == "auto":
            return parse_auto(text, {t.function.name for t in self.tools}, self.parallel, self.parser)
        return text, []

    def content_prefix(self, text: str) -> int:
        """See :func:`content_prefix`."""
        return content_prefix(text, self.parser)


def _as_call(obj: Any, names: set[str]) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as JSON text already
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return tool_call(obj["name"], json.dumps(args))


def parse_auto(text: str, names: set[str], parallel: bool = True, parser: str = "auto",
               ) -> tuple[str | None, list[dict[str, Any]]]:
    """Tool calls a model wrote on its own: Hermes ``<tool_call>`` blocks (text around them
    is the content), or the whole answer as Llama-3 JSON (an object or a list of objects);
    ``parser`` ``hermes`` or ``llama3_json`` reads that format only. Calls to unknown
    functions or with malformed JSON leave the text as plain content."""
    if parser not in TOOL_CALL_PARSERS:
        raise ValueError(f"tool_call_parser={parser!r}: expected one of {', '.join(TOOL_CALL_PARSERS)}")
    blocks = _HERMES.findall(text) if parser != "llama3_json" else []
    if blocks:
        calls = []
        for block in blocks:
            try:
                call = _as_call(json.loads(block), names)
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        content = _HERMES.sub("", text).strip()
        return (content or None), calls[: None if parallel else 1]
    stripped = text.strip()
    if parser != "hermes" and stripped[:1] in ("{", "["):
        try:
            obj = json.loads(stripped)
        except ValueError:
            return text, []
        objs = obj if isinstance(obj, list) else [obj]
        calls = [_as_call(o, names) for o in objs]
        if objs and all(c is not None for c in calls):
            return None, calls[: None if parallel else 1]
    return text, []


def content_prefix(text: str, parser: str = "auto") -> int:
    """How much of streamed ``auto`` text is surely content: the rest could still be (the
    start of) a tool call in a format ``parser`` reads, so it is held back until the choice ends."""
    stripped = text.lstrip()
    if not stripped or (parser != "hermes" and stripped[0] in "{["):
        return 0
    if parser == "llama3_json":
        return len(text)
    at = text.find(HERMES_OPEN)
    if at >= 0:
        return at
    for k in range(len(HERMES_OPEN) - 1, 0, -1):
        if text.endswith(HERMES_OPEN[:k]):
            return len(text) - k
    return len(text)
