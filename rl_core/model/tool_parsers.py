"""Tool-call parsers: the text of one generated policy turn -> an `AssistantTurn`.

The input is one policy turn decoded with special tokens kept and the stop token already removed
(`<|im_end|>`, `<end_of_turn>`). A parser never raises on model output: a turn whose tool-call
syntax is malformed gives `AssistantTurn(content=<the text>, parse_error=<short reason>)` with no
tool calls, and the reason is written for the model to read (it becomes the error observation).
When a turn has an error, `content` is the turn's text after the reasoning block (stripped, the
malformed markup included) and `reasoning` is kept if its block parsed.

Parsers (`TOOL_PARSERS`, `tool_parser(name)`):
- `hermes` (`parse_hermes`): Hermes / Qwen 2.5 and Qwen 3 `<tool_call>` blocks holding JSON,
  with an optional leading `<think>` reasoning block.
- `gemma` (`parse_gemma`): Gemma 3 has no tool-call tokens; Google's documented prompt-defined
  convention of Python-style calls, in a ```tool_code fence or as a bare `[call, ...]` list.

Gemma's parser lives in rl_core/model/gemma_calls.py, what the parsers share in call_syntax.py.

`format_hermes` / `format_gemma` write the canonical text each parser accepts
(`parse(format(turn))` gives the turn back, with the parser's call ids).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from rl_core.environments.actions import ToolCall
from rl_core.environments.messages import AssistantTurn
from rl_core.model.call_syntax import JSON_DECODER, MalformedCall, guarded, outside_spans, strict_json
from rl_core.model.gemma_calls import format_gemma, parse_gemma

__all__ = [
    "TOOL_PARSERS",
    "format_gemma",
    "format_hermes",
    "parse_gemma",
    "parse_hermes",
    "strict_json",
    "tool_formatter",
    "tool_parser",
]

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_CALL_OPEN, _CALL_CLOSE = "<tool_call>", "</tool_call>"


def _split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, rest) of a Hermes/Qwen turn; raises MalformedCall for an unclosed or nested leading <think>."""
    stripped = text.lstrip()
    if stripped.startswith(_THINK_OPEN):
        body_start = len(text) - len(stripped) + len(_THINK_OPEN)
        close = text.find(_THINK_CLOSE, body_start)
        if close < 0:
            raise MalformedCall("<think> without </think>")
        if _THINK_OPEN in text[body_start:close]:
            raise MalformedCall("<think> inside <think>")
        return text[body_start:close].strip(), text[close + len(_THINK_CLOSE) :]
    close = text.find(_THINK_CLOSE)
    first_call = text.find(_CALL_OPEN)
    if close >= 0 and (first_call < 0 or close < first_call) and _THINK_OPEN not in text[:close]:
        return text[:close].strip(), text[close + len(_THINK_CLOSE) :]
    return None, text


def _hermes_call(rest: str, body_start: int, n: int) -> tuple[ToolCall, int]:
    """The call whose JSON starts at `rest[body_start:]` (after `<tool_call>`), and where its block ends.
    The JSON is read as JSON (markup inside its strings is text), then `</tool_call>` must follow."""
    if rest.find(_CALL_CLOSE, body_start) < 0:
        raise MalformedCall(f"call {n}: {_CALL_OPEN} without {_CALL_CLOSE}")
    json_start = len(rest) - len(rest[body_start:].lstrip())
    block = rest[json_start:]
    try:
        payload, length = JSON_DECODER.raw_decode(block)
    except json.JSONDecodeError as error:
        raise MalformedCall(
            f"call {n}: invalid JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from None
    except ValueError as error:
        raise MalformedCall(f"call {n}: invalid JSON ({error})") from None
    after = block[length:].lstrip()
    if not after.startswith(_CALL_CLOSE):
        raise MalformedCall(f"call {n}: expected {_CALL_CLOSE} after the JSON object")
    end = len(rest) - len(after) + len(_CALL_CLOSE)
    return _hermes_payload(payload, n), end


def _hermes_payload(payload: Any, n: int) -> ToolCall:
    if not isinstance(payload, dict):
        raise MalformedCall(f'call {n}: expected a JSON object {{"name": ..., "arguments": {{...}}}}')
    extra = sorted(set(payload) - {"name", "arguments"})
    if extra:
        raise MalformedCall(f'call {n}: unexpected key "{extra[0]}" (expected "name" and "arguments")')
    name = payload.get("name")
    if name is None:
        raise MalformedCall(f'call {n}: missing "name"')
    if not isinstance(name, str) or not name.strip():
        raise MalformedCall(f'call {n}: "name" must be a non-empty string')
    arguments = payload.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = JSON_DECODER.decode(arguments)
        except ValueError:
            raise MalformedCall(f'call {n} ({name}): "arguments" is a string that is not a JSON object') from None
    if not isinstance(arguments, dict):
        raise MalformedCall(f'call {n} ({name}): "arguments" must be a JSON object')
    return ToolCall(name, arguments, f"call_{n}")


def _parse_hermes(text: str) -> AssistantTurn:
    try:
        reasoning, rest = _split_reasoning(text)
    except MalformedCall as error:
        return AssistantTurn(content=text.strip(), parse_error=str(error))
    calls: list[ToolCall] = []
    spans: list[tuple[int, int]] = []
    at = 0
    try:
        while (start := rest.find(_CALL_OPEN, at)) >= 0:
            if rest.find(_CALL_CLOSE, at, start) >= 0:
                raise MalformedCall(f"{_CALL_CLOSE} without {_CALL_OPEN}")
            call, at = _hermes_call(rest, start + len(_CALL_OPEN), len(calls) + 1)
            calls.append(call)
            spans.append((start, at))
        if _CALL_CLOSE in rest[at:]:
            raise MalformedCall(f"{_CALL_CLOSE} without {_CALL_OPEN}")
    except MalformedCall as error:
        return AssistantTurn(content=rest.strip(), reasoning=reasoning, parse_error=str(error))
    return AssistantTurn(content=outside_spans(rest, spans), tool_calls=tuple(calls), reasoning=reasoning)


def parse_hermes(text: str) -> AssistantTurn:
    """Parse one Hermes / Qwen turn. Never raises.

    Format: the Hermes function-calling format (NousResearch Hermes-2-Pro / Hermes-Function-Calling)
    as Qwen 2.5 and Qwen 3 publish it in their chat templates ("For each function call, return a
    json object with function name and arguments within <tool_call></tool_call> XML tags"), with
    Qwen 3's `<think>` reasoning block. Grammar (`ws` is any whitespace):

        turn      := [reasoning] text (tool_call text)*
        reasoning := ws "<think>" THINK "</think>"      Qwen 3 (THINK may be empty)
                   | THINK "</think>"                   the template already opened <think> in the prompt
        tool_call := "<tool_call>" ws JSON ws "</tool_call>"
        JSON      := {"name": <non-empty string>, "arguments": <object> | <string holding a JSON object>}
        text      := any text without <tool_call> or </tool_call>

    The JSON is read as JSON, so `<tool_call>`, `</tool_call>` or `</think>` inside its strings are
    text; after it only whitespace and `</tool_call>` may follow.

    - reasoning: the text of the first `</think>` block when it comes before any `<tool_call>`
      (stripped; "" for Qwen 3's empty block). A turn that opens with `<think>` and has no
      `</think>` (e.g. cut off by the token limit while reasoning) is a parse error: it has no action.
      A `<think>` anywhere else is content.
    - arguments: a JSON object, or a JSON string whose text is a JSON object (some models emit
      that); missing means {}. No other keys are allowed (a misspelt "parameters" is an error, not a
      silently empty call). NaN, Infinity and numbers that overflow a float are rejected.
    - content: the text outside the reasoning and tool_call blocks, each piece stripped, non-empty
      pieces joined by "\\n". Text before, between and after calls is content.
    - call ids: Hermes has none; the n-th call (from 1) gets "call_n".

    Errors (`parse_error`, exactly): "<think> without </think>", "<think> inside <think>",
    "call N: <tool_call> without </tool_call>", "</tool_call> without <tool_call>",
    "call N: expected </tool_call> after the JSON object",
    "call N: invalid JSON (<json error> at line L column C)" (L, C within the stripped block),
    "call N: invalid JSON (<reason>)",
    'call N: expected a JSON object {"name": ..., "arguments": {...}}',
    'call N: unexpected key "<key>" (expected "name" and "arguments")', 'call N: missing "name"',
    'call N: "name" must be a non-empty string', 'call N (<name>): "arguments" must be a JSON object',
    'call N (<name>): "arguments" is a string that is not a JSON object',
    "tool call too deeply nested".
    """
    return guarded(_parse_hermes, text)


def format_hermes(turn: AssistantTurn) -> str:
    """The canonical Hermes text of `turn` (what `parse_hermes` accepts): the reasoning block if any
    (`<think>\\n...\\n</think>\\n\\n`), the content, then one `<tool_call>` block per call (JSON with
    `ensure_ascii=False`), blocks separated by "\\n" as Qwen's templates write them. Call ids are not
    written (the format has none)."""
    parts = [] if turn.reasoning is None else [f"{_THINK_OPEN}\n{turn.reasoning}\n{_THINK_CLOSE}\n\n"]
    blocks = [turn.content] if turn.content else []
    for call in turn.tool_calls:
        payload = json.dumps({"name": call.tool, "arguments": call.arguments}, ensure_ascii=False)
        blocks.append(f"{_CALL_OPEN}\n{payload}\n{_CALL_CLOSE}")
    return "".join(parts) + "\n".join(blocks)


TOOL_PARSERS: dict[str, Callable[[str], AssistantTurn]] = {"hermes": parse_hermes, "gemma": parse_gemma}
# The canonical writer of each parser's format (parse(format(turn)) gives the turn back).
_FORMATTERS: dict[Callable[[str], AssistantTurn], Callable[[AssistantTurn], str]] = {
    parse_hermes: format_hermes,
    parse_gemma: format_gemma,
}


def tool_formatter(parser: Callable[[str], AssistantTurn]) -> Callable[[AssistantTurn], str] | None:
    """The function that writes turns in `parser`'s format (`format_hermes` for `parse_hermes` ...), or
    None for a parser Turnstile does not know."""
    return _FORMATTERS.get(parser)


def tool_parser(name: str) -> Callable[[str], AssistantTurn]:
    """The parser called `name` (`policy.tool_parser`). Raises ValueError naming the known parsers."""
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool parser {name!r}; known: {', '.join(sorted(TOOL_PARSERS))}") from None
