"""What the tool-call parsers share (rl_core/model/tool_parsers.py for Hermes, gemma_calls.py for Gemma):
the error a malformed call raises inside a parser, the guard that turns any parser failure into a
`parse_error`, the text outside the call blocks, and strict JSON (RFC 8259: no NaN or Infinity, and no
number that overflows a float), which harmony's tool-call arguments use too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from rl_core.environments.messages import AssistantTurn


class MalformedCall(Exception):
    """A parse error whose message is the turn's `parse_error`."""


def outside_spans(text: str, spans: list[tuple[int, int]]) -> str:
    """The text outside `spans` (sorted, disjoint): each piece stripped, non-empty ones joined by newlines."""
    out, at = [], 0
    for start, end in spans:
        out.append(text[at:start].strip())
        at = end
    out.append(text[at:].strip())
    return "\n".join(piece for piece in out if piece)


def guarded(parse: Callable[[str], AssistantTurn], text: str) -> AssistantTurn:
    """`parse(text)`, or, when the parser fails anyway (too deeply nested, or a bug), a turn with that failure
    as its `parse_error`: a parser never raises on model output."""
    try:
        return parse(text)
    except (RecursionError, MemoryError):
        return AssistantTurn(content=text.strip(), parse_error="tool call too deeply nested")
    except Exception as error:  # a parser bug must not crash a rollout; the turn is then unparseable
        return AssistantTurn(content=text.strip(), parse_error=f"unparseable turn ({type(error).__name__})")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"number {literal} out of range")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


JSON_DECODER = json.JSONDecoder(  # no NaN/Infinity (not JSON), no numbers that overflow a float
    parse_float=_finite_float, parse_constant=_reject_constant
)


def strict_json(text: str) -> Any:
    """`text` as strict JSON: no NaN / Infinity (not JSON), no number that overflows a float (the model's
    tool-call arguments must be finite). Raises ValueError with a short reason (also for nesting too deep to
    read, e.g. thousands of open brackets)."""
    try:
        return JSON_DECODER.decode(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{error.msg} at char {error.pos}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
