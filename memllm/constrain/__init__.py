"""Constrained decoding: grammars (JSON schemas, tool calls) enforced on the logits, token by token.

* :mod:`memllm.constrain.grammars`: grammar text for JSON outputs and tool calls (pure);
* :mod:`memllm.constrain.matcher`: :class:`Constraint`, one stream's grammar state over llguidance
  (masks logits, advances with each sampled token), and the per-tokenizer setup;
* :mod:`memllm.constrain.tools`: how tools, calls and results are written into the prompt, and how
  a reply's calls are read back.

Library choice (llguidance) and its measured cost: ``memllm bench structured``.
"""

from memllm.constrain.grammars import FREE_TEXT, FunctionSpec, json_grammar, json_value, tool_calls_grammar
from memllm.constrain.matcher import Constraint, ConstraintViolation, GrammarError, check_grammar, grammar_tokenizer
from memllm.constrain.tools import ToolCall, parse_tool_calls, render_messages, tools_system_text

__all__ = [
    "FREE_TEXT",
    "Constraint",
    "ConstraintViolation",
    "FunctionSpec",
    "GrammarError",
    "ToolCall",
    "check_grammar",
    "grammar_tokenizer",
    "json_grammar",
    "json_value",
    "parse_tool_calls",
    "render_messages",
    "tool_calls_grammar",
    "tools_system_text",
]
