"""What a request asks of the output's shape: ``response_format``, ``tools`` and ``tool_choice``.

:func:`output_plan` checks them (400s in OpenAI's error shape for anything it cannot serve) and
compiles the grammar once; :meth:`OutputPlan.constraint` makes a fresh grammar state per choice.

* ``response_format``: ``text`` (nothing enforced), ``json_object`` (any JSON object),
  ``json_schema`` (a JSON value of the schema; ``strict`` or not, it is always enforced);
* ``tool_choice``: ``none`` (the tools are not described and no call is made), ``auto`` (the default
  when there are tools: the reply is either calls or an ordinary answer that does not begin with
  ``<``, or that follows ``response_format`` when one is given), ``required`` (the reply is calls),
  ``{"type": "function", "function": {"name": N}}`` (the reply is calls of N). One call per reply
  unless ``parallel_tool_calls: true`` (then up to :data:`MAX_PARALLEL_CALLS`): unlike OpenAI the
  default is one, because small models given the choice repeat the same call until max_tokens.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from memllm.constrain import (
    FREE_TEXT,
    Constraint,
    FunctionSpec,
    GrammarError,
    check_grammar,
    grammar_tokenizer,
    json_grammar,
    json_value,
    tool_calls_grammar,
)
from memllm_api.errors import ApiError
from memllm_api.schemas import ChatCompletionRequest, ResponseFormat, Tool, ToolChoiceFunction

MAX_PARALLEL_CALLS = 4
MAX_TOOLS = 64


@dataclass
class OutputPlan:
    """The output shape of one request: ``grammar`` (None: free text), the ``functions`` described in
    the prompt, ``forced`` (the function tool_choice names), ``calls`` (the reply may be tool calls:
    read it back as calls), ``calls_only`` (the reply must be calls)."""

    grammar: str | None = None
    functions: list[FunctionSpec] = field(default_factory=list)
    forced: str | None = None
    calls: bool = False
    calls_only: bool = False
    lltokenizer: Any = None

    def constraint(self) -> Constraint | None:
        """A fresh grammar state for one choice (None without a grammar)."""
        if self.grammar is None:
            return None
        return Constraint(self.grammar, self.lltokenizer)


async def lltokenizer(core: Any) -> Any:
    """The engine's llguidance tokenizer (built once, off the event loop)."""
    engine = core.engine
    vocab = engine.model.config.vocab_size
    return await asyncio.to_thread(grammar_tokenizer, engine.tokenizer, vocab, engine.stop_ids)


def format_value(rf: ResponseFormat | None) -> str | None:
    """The Lark right-hand side of ``response_format`` (None for text)."""
    if rf is None or rf.type == "text":
        if rf is not None and rf.json_schema is not None:
            raise ApiError(400, "response_format: json_schema is only read with type json_schema", "response_format")
        return None
    if rf.type == "json_object":
        return json_value({"type": "object"})
    if rf.json_schema is None:
        raise ApiError(400, "response_format: type json_schema needs a json_schema object", "response_format")
    schema = rf.json_schema.schema
    return json_value(schema if schema is not None else {"type": "object"})


def functions_of(tools: list[Tool]) -> list[FunctionSpec]:
    """The request's tools as function specs (400 for duplicates or non-object parameters)."""
    if len(tools) > MAX_TOOLS:
        raise ApiError(400, f"at most {MAX_TOOLS} tools per request", "too_many_tools", "tools")
    names = [t.function.name for t in tools]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ApiError(400, f"tools: the function name {dup!r} is used twice", "duplicate_tool", "tools")
    out = []
    for t in tools:
        params = t.function.parameters
        if params is not None and params.get("type", "object") != "object":
            message = f"tools: the parameters of {t.function.name!r} must be a JSON schema of type object"
            raise ApiError(400, message, "invalid_tool_parameters", "tools")
        spec = FunctionSpec(t.function.name, t.function.description or "")
        out.append(FunctionSpec(spec.name, spec.description, params) if params is not None else spec)
    return out


def _tool_choice(data: ChatCompletionRequest, functions: list[FunctionSpec]) -> tuple[str, str | None]:
    """("none" | "auto" | "required", the forced function's name or None)."""
    choice = data.tool_choice
    if isinstance(choice, ToolChoiceFunction):
        if not functions:
            raise ApiError(400, "tool_choice names a function but there are no tools", "tool_choice", "tool_choice")
        name = choice.function.name
        if name not in {f.name for f in functions}:
            raise ApiError(400, f"tool_choice: no tool is named {name!r}", "unknown_tool", "tool_choice")
        return "required", name
    if choice is None:
        return ("auto" if functions else "none"), None
    if choice == "required" and not functions:
        raise ApiError(400, "tool_choice 'required' needs tools", "tool_choice", "tool_choice")
    return choice, None


async def output_plan(core: Any, data: Any) -> OutputPlan:
    """The checked output plan of a chat or completion request (see the module docstring)."""
    text_value = format_value(data.response_format)
    plan = OutputPlan()
    if isinstance(data, ChatCompletionRequest) and data.tools is not None:
        functions = functions_of(data.tools)
        mode, forced = _tool_choice(data, functions)
        if mode != "none":
            plan.functions = [f for f in functions if f.name == forced] if forced else functions
            plan.forced, plan.calls, plan.calls_only = forced, True, mode == "required"
            max_calls = MAX_PARALLEL_CALLS if data.parallel_tool_calls else 1
            text = None if plan.calls_only else (text_value or FREE_TEXT)
            plan.grammar = tool_calls_grammar(plan.functions, max_calls, text)
            if forced:  # describe every tool, but only the named one may be called
                plan.functions = functions
    elif isinstance(data, ChatCompletionRequest) and data.tool_choice not in (None, "none", "auto"):
        raise ApiError(400, "tool_choice needs tools", "tool_choice", "tool_choice")
    if plan.grammar is None and text_value is not None:
        plan.grammar = "start: " + text_value
    if plan.grammar is not None:
        plan.lltokenizer = await lltokenizer(core)
        try:
            check_grammar(plan.grammar, plan.lltokenizer)
        except GrammarError as exc:
            param = "tools" if plan.calls else "response_format"
            raise ApiError(400, f"{param}: the JSON schema cannot be used: {exc}", "invalid_schema", param) from None
    return plan


__all__ = ["MAX_PARALLEL_CALLS", "OutputPlan", "format_value", "json_grammar", "output_plan"]
