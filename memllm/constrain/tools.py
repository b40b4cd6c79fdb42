"""Tool calling through the prompt: how tools, calls and results are written for the model, and
how a reply's calls are read back.

The format is the one Hermes / Qwen2.5 chat models are trained on, written by us whatever the chat
template (the bundled SmolLM2 template knows no tools; a template that does would still see
ordinary system / user / assistant messages, so every model gets the same, tested format):

* the tools go in the system message, as JSON lines inside ``<tools></tools>``, with the
  instruction to answer a call as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``;
* an assistant message with ``tool_calls`` becomes an assistant message with those blocks (after
  its text, if any);
* tool results (role ``tool``) become a user message of ``<tool_response>`` blocks (consecutive
  results are merged into one message, so user / assistant turns still alternate).

The reply is held to this format by :func:`memllm.constrain.grammars.tool_calls_grammar`, so
:func:`parse_tool_calls` reads every reply that the grammar completed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from memllm.constrain.grammars import CALL_SEPARATOR, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, FunctionSpec


@dataclass(frozen=True)
class ToolCall:
    """A call read from a reply: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


def tools_system_text(functions: Sequence[FunctionSpec], forced: str | None = None) -> str:
    """The system-prompt text that describes ``functions`` and the call format. ``forced``: the name
    of the one function the reply must call (tool_choice naming a function)."""
    lines = [
        "You can call functions. Their signatures, in JSON Schema, are within <tools></tools>:",
        "<tools>",
    ]
    for fn in functions:
        spec = {"name": fn.name, "description": fn.description, "parameters": fn.parameters}
        lines.append(json.dumps({"type": "function", "function": spec}))
    lines.append("</tools>")
    lines.append("To call a function, reply with only this (one block per call):")
    lines.append(
        TOOL_CALL_OPEN + '{"name": <function name>, "arguments": <arguments as a JSON object>}' + TOOL_CALL_CLOSE
    )
    if forced is not None:
        lines.append(f"Call the function {forced} now.")
    return "\n".join(lines)


def call_text(name: str, arguments: str) -> str:
    """One call block as the model writes it (``arguments``: JSON text, normalised to the grammar's style)."""
    try:
        args: Any = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        args = arguments  # kept as a string: the history is the client's, we only render it
    return TOOL_CALL_OPEN + json.dumps({"name": name, "arguments": args}) + TOOL_CALL_CLOSE


def assistant_text(content: str, calls: Sequence[tuple[str, str]]) -> str:
    """An assistant message of the history: its text, then its calls (name, arguments JSON)."""
    blocks = [call_text(name, args) for name, args in calls]
    return CALL_SEPARATOR.join([content, *blocks] if content else blocks)


def tool_response_text(content: str) -> str:
    """One tool result, as the user message shows it."""
    return f"<tool_response>\n{content}\n</tool_response>"


def render_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Chat messages with tool calls and results -> plain ``{role, content}`` messages any chat
    template renders. Input: ``role``, ``content`` (str), optional ``tool_calls`` as
    ``[(name, arguments JSON)]`` on assistant messages; role ``tool`` for results."""
    out: list[dict[str, str]] = []
    merging_results = False
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            text = tool_response_text(content)
            if merging_results:
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text})
            merging_results = True
            continue
        merging_results = False
        if role == "assistant" and m.get("tool_calls"):
            content = assistant_text(content, m["tool_calls"])
        out.append({"role": role, "content": content})
    return out


def parse_tool_calls(text: str) -> list[ToolCall] | None:
    """The calls of a reply that is entirely call blocks (as the grammar writes them), else None."""
    calls: list[ToolCall] = []
    rest = text.strip()
    if not rest.startswith(TOOL_CALL_OPEN.strip()):
        return None
    while rest:
        if not rest.startswith(TOOL_CALL_OPEN):
            return None
        end = rest.find(TOOL_CALL_CLOSE)
        if end < 0:
            return None
        try:
            body = json.loads(rest[len(TOOL_CALL_OPEN) : end])
        except json.JSONDecodeError:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            return None
        calls.append(ToolCall(body["name"], json.dumps(body.get("arguments", {}))))
        rest = rest[end + len(TOOL_CALL_CLOSE) :].lstrip("\n")
    return calls or None
