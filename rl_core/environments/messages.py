"""Tools as data: the policy's turn as a structured message, and the environment's tool results.

An environment describes its tools as JSON schemas in the OpenAI function format
(`Environment.tools()`: [{"type": "function", "function": {"name", "description",
"parameters"}}]) and receives each policy turn as an `AssistantTurn`: the text, the reasoning if
the model produced any, and the parsed tool calls (`ToolCall`: name, arguments, call id). It
answers each tool call with a `ToolResult` (`StepResult.tool_results`), in call order.

A renderer (the chat format) turns generated token ids into an `AssistantTurn` and tool results
into the token ids that extend the episode. A turn whose tool-call syntax could not be parsed
carries `parse_error` (a short reason): the environment answers it with an error observation
(and the rollout counts it), it is never a crash.

Environments written for the text action format (`EnvSession.step(action_text)`, `CALL tool
{...}` / `ANSWER {...}`, rl_core/environments/actions.py) keep working: `respond_through_text`
is the adapter that turns a structured turn into that text (one tool call per turn; further calls
in the same turn get an error result) and the session's `StepResult` into tool results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rl_core.environments.actions import ToolCall, format_call

if TYPE_CHECKING:
    from rl_core.environments.base import EnvSession, StepResult


@dataclass(frozen=True)
class AssistantTurn:
    """One policy turn as a structured message.

    content: the text outside tool calls and reasoning. tool_calls: the parsed calls, in order.
    reasoning: the model's reasoning text (e.g. a `<think>` block), None when it produced none.
    parse_error: why the turn's tool-call syntax could not be parsed (None when it could).
    """

    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    reasoning: str | None = None
    parse_error: str | None = None


@dataclass(frozen=True)
class ToolResult:
    """The environment's answer to one tool call: `content` (text, often JSON) for the call `call_id`
    of tool `tool`; `ok` is False for a failed call (unknown tool, bad arguments, no such record)."""

    call_id: str | None
    tool: str
    content: str
    ok: bool


@dataclass(frozen=True)
class ToolSchema:
    """A tool as the OpenAI function format describes it: `name`, `description`, and `parameters`
    (a JSON schema of the arguments object)."""

    name: str
    description: str
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def as_openai(self) -> dict[str, Any]:
        """{"type": "function", "function": {"name", "description", "parameters"}}."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}


def error_content(reason: str) -> str:
    """The content of a failed tool result or observation: {"error": reason} as JSON."""
    return json.dumps({"error": reason})


def respond_through_text(session: EnvSession, turn: AssistantTurn) -> StepResult:
    """Answer a structured turn with a session that only speaks the text action format.

    A parse error is answered with an error observation (the session is not called). A turn
    with tool calls is sent as `CALL <first tool> {...}`; each further call in the turn gets a
    failed result ("one tool call per turn"). A turn without tool calls is sent as its text
    (`ANSWER {...}` ends the episode). The session's observation becomes the first call's tool
    result."""
    from rl_core.environments.base import StepResult

    if turn.parse_error is not None:
        return StepResult(observation=error_content(turn.parse_error), tool_ok=False)
    if not turn.tool_calls:
        return session.step(turn.content)
    first, *rest = turn.tool_calls
    result = session.step(format_call(first.tool, first.arguments))
    if result.done or result.observation is None:
        return result
    results = [ToolResult(first.call_id, result.tool_name or first.tool, result.observation, bool(result.tool_ok))]
    results += [ToolResult(c.call_id, c.tool, error_content("one tool call per turn"), False) for c in rest]
    result.tool_results = results
    return result
