"""The policy's action format: parsing, rendering and tool-argument checks.

Exactly one action per turn, in one of two forms (surrounding whitespace is ignored):

    CALL <tool_name> <JSON object of arguments>    CALL get_order {"order_id": "4821"}
    ANSWER <JSON object>                           ANSWER {"decision": "refund", "amount": "120"}

The JSON object must be the whole rest of the text: anything after it (a second action,
a comment) makes the action malformed. All argument and answer values are strings.

`parse_action` never raises: text that is not a well-formed action gives a `ParseFailure`
with a short reason. Answer values are checked here (strings only); tool arguments are
checked against the tool's schema with `check_arguments`, which needs the tool.
`format_call` / `format_answer` render the canonical text the parser accepts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_KEYWORD = re.compile(r"(CALL|ANSWER)\b\s*")
_TOOL_NAME = re.compile(r"([A-Za-z_]\w*)\s*")


@dataclass(frozen=True)
class ToolCall:
    """A tool call: `CALL tool {...}` in the text format, or one entry of a structured turn's
    `tool_calls` (rl_core/environments/messages.py). `arguments` are as decoded, not yet checked
    against the tool's schema; `call_id` is the id a native tool-call format gives the call (None
    in the text format), which the tool result quotes."""

    tool: str
    arguments: dict[str, Any]
    call_id: str | None = None


@dataclass(frozen=True)
class FinalAnswer:
    """`ANSWER {...}`: a JSON object whose values are all strings."""

    fields: dict[str, str]


@dataclass(frozen=True)
class ParseFailure:
    """Text that is not a well-formed action; `reason` is short enough to show the policy."""

    reason: str


Action = ToolCall | FinalAnswer | ParseFailure


def parse_action(text: str) -> Action:
    """Parse one policy turn. Never raises."""
    text = text.strip()
    keyword = _KEYWORD.match(text)
    if keyword is None:
        return ParseFailure("expected CALL <tool> {...} or ANSWER {...}")
    rest = text[keyword.end() :]
    if keyword.group(1) == "ANSWER":
        return _parse_answer(rest)
    name = _TOOL_NAME.match(rest)
    if name is None:
        return ParseFailure("CALL needs a tool name, then a JSON object")
    arguments = _json_object(rest[name.end() :])
    if isinstance(arguments, ParseFailure):
        return arguments
    return ToolCall(name.group(1), arguments)


def _parse_answer(body: str) -> FinalAnswer | ParseFailure:
    fields = _json_object(body)
    if isinstance(fields, ParseFailure):
        return fields
    for key, value in fields.items():
        if not isinstance(value, str):
            return ParseFailure(f"answer value for {key!r} must be a string")
    return FinalAnswer(fields)


def _json_object(body: str) -> dict[str, Any] | ParseFailure:
    if not body:
        return ParseFailure("missing JSON object")
    try:
        value = json.loads(body)
    except json.JSONDecodeError as err:
        return ParseFailure(f"bad JSON ({err.msg})")
    except (ValueError, RecursionError):
        return ParseFailure("bad JSON")
    if not isinstance(value, dict):
        return ParseFailure("expected a JSON object")
    return value


def check_arguments(tool: str, schema: dict[str, Any], arguments: dict[str, Any]) -> str | None:
    """Check `arguments` against a tool's JSON schema; return the first problem, or None.

    The supported subset: an object schema with `properties` (each `{"type": "string"}`)
    and `required`. Properties not declared are always rejected.
    """
    properties = schema.get("properties", {})
    for name in arguments:
        if name not in properties:
            return f"unknown argument {name!r} for {tool}"
    for name in schema.get("required", []):
        if name not in arguments:
            return f"missing argument {name!r} for {tool}"
    for name, value in arguments.items():
        if properties[name].get("type") == "string" and not isinstance(value, str):
            return f"argument {name!r} must be a string"
    return None


def format_call(tool: str, arguments: dict[str, str]) -> str:
    """Canonical text of a tool call."""
    return f"CALL {tool} {json.dumps(arguments)}"


def format_answer(fields: dict[str, str]) -> str:
    """Canonical text of a final answer."""
    return f"ANSWER {json.dumps(fields)}"
