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

`format_hermes` / `format_gemma` write the canonical text each parser accepts
(`parse(format(turn))` gives the turn back, with the parser's call ids).
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Callable
from typing import Any

from rl_core.environments.actions import ToolCall
from rl_core.environments.messages import AssistantTurn

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_CALL_OPEN, _CALL_CLOSE = "<tool_call>", "</tool_call>"
_TOOL_CODE_OPEN = re.compile(r"```tool_code(?!\w)[ \t]*\n?")
_FENCE = "```"
_BARE_GEMMA_LIST = re.compile(r"\[\s*[A-Za-z_]\w*\s*\(")


class _Malformed(Exception):
    """A parse error whose message is the turn's `parse_error`."""


def _pieces(text: str, spans: list[tuple[int, int]]) -> str:
    """The text outside `spans` (sorted, disjoint): each piece stripped, non-empty ones joined by newlines."""
    out, at = [], 0
    for start, end in spans:
        out.append(text[at:start].strip())
        at = end
    out.append(text[at:].strip())
    return "\n".join(piece for piece in out if piece)


def _guarded(parse: Callable[[str], AssistantTurn], text: str) -> AssistantTurn:
    try:
        return parse(text)
    except (RecursionError, MemoryError):
        return AssistantTurn(content=text.strip(), parse_error="tool call too deeply nested")
    except Exception as error:  # a parser bug must not crash a rollout; the turn is then unparseable
        return AssistantTurn(content=text.strip(), parse_error=f"unparseable turn ({type(error).__name__})")


def _split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, rest) of a Hermes/Qwen turn; raises _Malformed for an unclosed or nested leading <think>."""
    stripped = text.lstrip()
    if stripped.startswith(_THINK_OPEN):
        body_start = len(text) - len(stripped) + len(_THINK_OPEN)
        close = text.find(_THINK_CLOSE, body_start)
        if close < 0:
            raise _Malformed("<think> without </think>")
        if _THINK_OPEN in text[body_start:close]:
            raise _Malformed("<think> inside <think>")
        return text[body_start:close].strip(), text[close + len(_THINK_CLOSE) :]
    close = text.find(_THINK_CLOSE)
    first_call = text.find(_CALL_OPEN)
    if close >= 0 and (first_call < 0 or close < first_call) and _THINK_OPEN not in text[:close]:
        return text[:close].strip(), text[close + len(_THINK_CLOSE) :]
    return None, text


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"number {literal} out of range")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(  # no NaN/Infinity (not JSON), no numbers that overflow a float
    parse_float=_finite_float, parse_constant=_reject_constant
)


def strict_json(text: str) -> Any:
    """`text` as strict JSON: no NaN / Infinity (not JSON), no number that overflows a float (the model's
    tool-call arguments must be finite). Raises ValueError with a short reason (also for nesting too deep to
    read, e.g. thousands of open brackets)."""
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{error.msg} at char {error.pos}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _hermes_call(rest: str, body_start: int, n: int) -> tuple[ToolCall, int]:
    """The call whose JSON starts at `rest[body_start:]` (after `<tool_call>`), and where its block ends.
    The JSON is read as JSON (markup inside its strings is text), then `</tool_call>` must follow."""
    if rest.find(_CALL_CLOSE, body_start) < 0:
        raise _Malformed(f"call {n}: {_CALL_OPEN} without {_CALL_CLOSE}")
    json_start = len(rest) - len(rest[body_start:].lstrip())
    block = rest[json_start:]
    try:
        payload, length = _DECODER.raw_decode(block)
    except json.JSONDecodeError as error:
        raise _Malformed(f"call {n}: invalid JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    except ValueError as error:
        raise _Malformed(f"call {n}: invalid JSON ({error})") from None
    after = block[length:].lstrip()
    if not after.startswith(_CALL_CLOSE):
        raise _Malformed(f"call {n}: expected {_CALL_CLOSE} after the JSON object")
    end = len(rest) - len(after) + len(_CALL_CLOSE)
    return _hermes_payload(payload, n), end


def _hermes_payload(payload: Any, n: int) -> ToolCall:
    if not isinstance(payload, dict):
        raise _Malformed(f'call {n}: expected a JSON object {{"name": ..., "arguments": {{...}}}}')
    extra = sorted(set(payload) - {"name", "arguments"})
    if extra:
        raise _Malformed(f'call {n}: unexpected key "{extra[0]}" (expected "name" and "arguments")')
    name = payload.get("name")
    if name is None:
        raise _Malformed(f'call {n}: missing "name"')
    if not isinstance(name, str) or not name.strip():
        raise _Malformed(f'call {n}: "name" must be a non-empty string')
    arguments = payload.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = _DECODER.decode(arguments)
        except ValueError:
            raise _Malformed(f'call {n} ({name}): "arguments" is a string that is not a JSON object') from None
    if not isinstance(arguments, dict):
        raise _Malformed(f'call {n} ({name}): "arguments" must be a JSON object')
    return ToolCall(name, arguments, f"call_{n}")


def _parse_hermes(text: str) -> AssistantTurn:
    try:
        reasoning, rest = _split_reasoning(text)
    except _Malformed as error:
        return AssistantTurn(content=text.strip(), parse_error=str(error))
    calls: list[ToolCall] = []
    spans: list[tuple[int, int]] = []
    at = 0
    try:
        while (start := rest.find(_CALL_OPEN, at)) >= 0:
            if rest.find(_CALL_CLOSE, at, start) >= 0:
                raise _Malformed(f"{_CALL_CLOSE} without {_CALL_OPEN}")
            call, at = _hermes_call(rest, start + len(_CALL_OPEN), len(calls) + 1)
            calls.append(call)
            spans.append((start, at))
        if _CALL_CLOSE in rest[at:]:
            raise _Malformed(f"{_CALL_CLOSE} without {_CALL_OPEN}")
    except _Malformed as error:
        return AssistantTurn(content=rest.strip(), reasoning=reasoning, parse_error=str(error))
    return AssistantTurn(content=_pieces(rest, spans), tool_calls=tuple(calls), reasoning=reasoning)


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
    return _guarded(_parse_hermes, text)


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


_LITERAL_NAMES = {"True": True, "False": False, "None": None, "true": True, "false": False, "null": None}


def _literal(node: ast.AST) -> Any:
    """A JSON value from a Python literal node; raises ValueError for anything else."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, bool, int, float))):
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise ValueError("number out of range")
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("sign on a non-number")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Name) and node.id in _LITERAL_NAMES:
        return _LITERAL_NAMES[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(element) for element in node.elts]
    if isinstance(node, ast.Dict):
        keys = [_literal(key) if key is not None else None for key in node.keys]
        if not all(isinstance(key, str) for key in keys):
            raise ValueError("dict keys must be strings")
        return {key: _literal(value) for key, value in zip(keys, node.values, strict=True)}
    raise ValueError("not a literal")


def _gemma_call(node: ast.AST, n: int) -> ToolCall:
    if not isinstance(node, ast.Call):
        raise _Malformed(f'call {n}: expected a function call like name(arg="value")')
    if not isinstance(node.func, ast.Name):
        raise _Malformed(f"call {n}: the function must be a plain name")
    name = node.func.id
    if node.args:
        raise _Malformed(f"call {n} ({name}): positional arguments are not supported; write name=value")
    arguments: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise _Malformed(f"call {n} ({name}): **arguments are not supported; write name=value")
        if keyword.arg in arguments:
            raise _Malformed(f'call {n} ({name}): argument "{keyword.arg}" given twice')
        try:
            arguments[keyword.arg] = _literal(keyword.value)
        except ValueError:
            message = "must be a literal (string, number, True/False/None, list, or dict with string keys)"
            raise _Malformed(f'call {n} ({name}): argument "{keyword.arg}" {message}') from None
    return ToolCall(name, arguments, f"call_{n}")


def _gemma_block(body: str, where: str, first: int) -> list[ToolCall]:
    """The calls of one tool_code body (`where` names it in errors: "tool_code block B" or "call list"):
    a list expression of calls, or call statements one per line; the first call is number `first`."""
    if not body.strip():
        raise _Malformed(f"{where} is empty")
    try:
        tree = ast.parse(body.strip(), mode="exec")
    except (SyntaxError, ValueError) as error:  # ValueError: a null byte in the source
        raise _Malformed(f"{where}: invalid Python ({getattr(error, 'msg', None) or error})") from None
    nodes: list[ast.AST] = []
    for statement in tree.body:
        if not isinstance(statement, ast.Expr):
            raise _Malformed(f'{where}: expected function calls like name(arg="value")')
        value = statement.value
        nodes.extend(value.elts if isinstance(value, ast.List) else [value])
    if not nodes:
        raise _Malformed(f"{where} is empty")
    return [_gemma_call(node, first + i) for i, node in enumerate(nodes)]


def _tool_code_end(text: str, start: int) -> int:
    """Where the tool_code block whose body starts at `start` closes: the first ``` after which the
    body is valid Python (``` inside a string literal is text), else the first ```."""
    closes = [i for i in range(start, len(text)) if text.startswith(_FENCE, i)]
    if not closes:
        raise _Malformed("```tool_code block without a closing ```")
    for close in closes:
        try:
            ast.parse(text[start:close].strip())
            return close
        except (SyntaxError, ValueError):
            continue
    return closes[0]


def _parse_gemma(text: str) -> AssistantTurn:
    calls: list[ToolCall] = []
    spans: list[tuple[int, int]] = []
    at = 0
    try:
        while (opening := _TOOL_CODE_OPEN.search(text, at)) is not None:
            close = _tool_code_end(text, opening.end())
            calls += _gemma_block(text[opening.end() : close], f"tool_code block {len(spans) + 1}", len(calls) + 1)
            at = close + len(_FENCE)
            spans.append((opening.start(), at))
        stripped = text.strip()
        if not spans and _BARE_GEMMA_LIST.match(stripped) and stripped.endswith("]"):
            return AssistantTurn(tool_calls=tuple(_gemma_block(stripped, "call list", 1)))
    except _Malformed as error:
        return AssistantTurn(content=text.strip(), parse_error=str(error))
    return AssistantTurn(content=_pieces(text, spans), tool_calls=tuple(calls))


def parse_gemma(text: str) -> AssistantTurn:
    """Parse one Gemma turn. Never raises.

    Format: Gemma 3 emits no tool-call tokens; the caller prompts a format and detects it. This
    parser follows Google's Gemma documentation: "Function calling with Gemma"
    (https://ai.google.dev/gemma/docs/capabilities/function-calling: calls as Python
    `[func_name1(params_name1=params_value1, ...), func_name2(params)]`, no other text) and the
    Gemma cookbook's agent guide (https://ai.google.dev/gemma/docs/meme-generator: the call
    "wrapped with ```tool_code```", its result given back in a ```tool_output``` fence). The JSON
    variant of the first page ({"name": ..., "parameters": {...}}) is not accepted. Grammar:

        turn      := text (tool_code text)*            with at least one tool_code block, or
                   | ws "[" call ("," call)* [","] "]" ws     the whole turn is the list (no fence)
        tool_code := "```tool_code" [spaces] [newline] BODY "```"
        BODY      := "[" call ("," call)* [","] "]"  |  call (newline call)*   (a list on each line also works)
        call      := NAME "(" [NAME "=" literal ("," NAME "=" literal)* [","]] ")"
        literal   := Python string | int | float | True | False | None | true | false | null
                   | "-" number | list or tuple of literals | dict with string keys and literal values
        text      := any text without "```tool_code"

    BODY is parsed with `ast` (never evaluated): only keyword arguments, names as Python writes
    them (NFKC-normalised identifiers; a Python keyword such as `from` cannot be an argument
    name), tuples become lists, non-finite numbers are rejected. A block ends at the first ```
    after which BODY is valid Python (so ``` inside a string argument is text), else at the first ```.
    content: the text outside the tool_code blocks, each piece stripped, non-empty pieces joined by
    "\\n" (a bare list turn has content ""). A text that only looks like a list of calls part way
    through (not the whole turn) is content. reasoning: always None (Gemma 3 has no thinking
    format). call ids: the n-th call (from 1) gets "call_n".

    Errors (`parse_error`, exactly): "```tool_code block without a closing ```",
    "W is empty", "W: invalid Python (<syntax error>)", 'W: expected function calls like name(arg="value")'
    (W is "tool_code block B", blocks counted from 1, or "call list" for the unfenced form),
    'call N: expected a function call like name(arg="value")', "call N: the function must be a plain name",
    "call N (<name>): positional arguments are not supported; write name=value",
    "call N (<name>): **arguments are not supported; write name=value",
    'call N (<name>): argument "<arg>" given twice',
    'call N (<name>): argument "<arg>" must be a literal (string, number, True/False/None, list, or dict
    with string keys)', "tool call too deeply nested".
    """
    return _guarded(_parse_gemma, text)


def _python_literal(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a Python string literal
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_python_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k), ensure_ascii=False)}: {_python_literal(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as a Gemma tool-call literal")


def format_gemma(turn: AssistantTurn) -> str:
    """The canonical Gemma text of `turn` (what `parse_gemma` accepts): the content, then, if there
    are calls, one ```tool_code fence holding `[name(arg="value", ...), ...]`. Reasoning and call
    ids are not written (the format has neither). Raises TypeError for an argument value that is
    not JSON-like (str, int, float, bool, None, list, dict)."""
    if not turn.tool_calls:
        return turn.content
    calls = ", ".join(
        f"{call.tool}(" + ", ".join(f"{k}={_python_literal(v)}" for k, v in call.arguments.items()) + ")"
        for call in turn.tool_calls
    )
    block = f"```tool_code\n[{calls}]\n```"
    return f"{turn.content}\n{block}" if turn.content else block


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
