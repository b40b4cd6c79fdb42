"""Grammars of structured outputs, as llguidance Lark text (pure functions, no model needed).

* :func:`json_grammar`: the whole output is one JSON value of a schema (default: any JSON object);
* :func:`tool_calls_grammar`: the output is one or more tool calls in the format the prompt asks for
  (:mod:`memllm.constrain.tools`), each ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
  with ``name`` one of the functions and ``arguments`` held to that function's parameter schema;
  optionally *or* an ordinary answer (free text that does not begin with ``<``, or a JSON value).

JSON is written in one canonical style: no free whitespace, ``", "`` between items and ``": "``
after keys (a schema's own ``x-guidance`` options win). Free whitespace lets a small model pad
forever; the style also matches what the model sees in its prompt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

JSON_STYLE: dict[str, Any] = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
TOOL_CALL_OPEN = "<tool_call>\n"
TOOL_CALL_CLOSE = "\n</tool_call>"
CALL_SEPARATOR = "\n"
FREE_TEXT = "TEXT"  # the text branch of tool_calls_grammar: any text that does not begin with "<"
ANY_OBJECT: dict[str, Any] = {"type": "object"}
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class FunctionSpec:
    """A callable tool: its name, description and JSON schema of its arguments (an object)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: dict(NO_PARAMETERS))


def json_value(schema: dict[str, Any]) -> str:
    """The Lark right-hand side for one JSON value of ``schema`` (in :data:`JSON_STYLE`)."""
    own = schema.get("x-guidance")
    style = {**JSON_STYLE, **(own if isinstance(own, dict) else {})}
    return "%json " + json.dumps({**schema, "x-guidance": style})


def json_grammar(schema: dict[str, Any] | None = None) -> str:
    """The whole output: one JSON value of ``schema`` (None: any JSON object)."""
    return "start: " + json_value(schema if schema is not None else ANY_OBJECT)


def call_schema(fn: FunctionSpec) -> dict[str, Any]:
    """``{"name": <fn.name>, "arguments": <fn.parameters>}`` as one JSON schema. The parameters'
    ``$defs`` / ``definitions`` move to the root, so their ``#/$defs/...`` references still resolve."""
    params = dict(fn.parameters)
    defs = {key: params.pop(key) for key in ("$defs", "definitions") if key in params}
    return {
        "type": "object",
        "properties": {"name": {"const": fn.name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        **defs,
    }


def tool_calls_grammar(functions: Sequence[FunctionSpec], max_calls: int = 1, text: str | None = None) -> str:
    """1..``max_calls`` tool calls of ``functions``; with ``text``, an ordinary answer instead:
    :data:`FREE_TEXT` (text not beginning with ``<``) or a :func:`json_value` right-hand side."""
    if not functions:
        raise ValueError("tool_calls_grammar needs at least one function")
    if max_calls < 1:
        raise ValueError("max_calls must be >= 1")
    rules = [f"start: calls{' | text' if text is not None else ''}"]
    rules.append(f"calls: call{f' ({json.dumps(CALL_SEPARATOR)} call){{0,{max_calls - 1}}}' if max_calls > 1 else ''}")
    rules.append(f"call: {json.dumps(TOOL_CALL_OPEN)} body {json.dumps(TOOL_CALL_CLOSE)}")
    rules.append("body: " + " | ".join(f"body{i}" for i in range(len(functions))))
    rules += [f"body{i}: {json_value(call_schema(fn))}" for i, fn in enumerate(functions)]
    if text == FREE_TEXT:
        rules += ["text: TEXT", r"TEXT: /[^<](.|\n)*/"]
    elif text is not None:
        rules.append(f"text: {text}")
    return "\n".join(rules)
