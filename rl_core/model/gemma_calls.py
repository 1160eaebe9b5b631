"""Gemma's tool calls: `parse_gemma` and `format_gemma` (registered as `gemma` in rl_core/model/tool_parsers.py).

Gemma 3 has no tool-call tokens; Google's documented prompt-defined convention writes Python-style
keyword calls in a ```tool_code fence (or as a bare `[call, ...]` list), read here with Python's `ast`
(literals only: nothing is evaluated). Sources: https://ai.google.dev/gemma/docs/capabilities/function-calling
and https://ai.google.dev/gemma/docs/meme-generator (calls in ```tool_code```, results in ```tool_output```).
"""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

from rl_core.environments.actions import ToolCall
from rl_core.environments.messages import AssistantTurn
from rl_core.model.call_syntax import MalformedCall, guarded, outside_spans

_TOOL_CODE_OPEN = re.compile(r"```tool_code(?!\w)[ \t]*\n?")
_FENCE = "```"
_BARE_GEMMA_LIST = re.compile(r"\[\s*[A-Za-z_]\w*\s*\(")


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
        raise MalformedCall(f'call {n}: expected a function call like name(arg="value")')
    if not isinstance(node.func, ast.Name):
        raise MalformedCall(f"call {n}: the function must be a plain name")
    name = node.func.id
    if node.args:
        raise MalformedCall(f"call {n} ({name}): positional arguments are not supported; write name=value")
    arguments: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise MalformedCall(f"call {n} ({name}): **arguments are not supported; write name=value")
        if keyword.arg in arguments:
            raise MalformedCall(f'call {n} ({name}): argument "{keyword.arg}" given twice')
        try:
            arguments[keyword.arg] = _literal(keyword.value)
        except ValueError:
            message = "must be a literal (string, number, True/False/None, list, or dict with string keys)"
            raise MalformedCall(f'call {n} ({name}): argument "{keyword.arg}" {message}') from None
    return ToolCall(name, arguments, f"call_{n}")


def _gemma_block(body: str, where: str, first: int) -> list[ToolCall]:
    """The calls of one tool_code body (`where` names it in errors: "tool_code block B" or "call list"):
    a list expression of calls, or call statements one per line; the first call is number `first`."""
    if not body.strip():
        raise MalformedCall(f"{where} is empty")
    try:
        tree = ast.parse(body.strip(), mode="exec")
    except (SyntaxError, ValueError) as error:  # ValueError: a null byte in the source
        raise MalformedCall(f"{where}: invalid Python ({getattr(error, 'msg', None) or error})") from None
    nodes: list[ast.AST] = []
    for statement in tree.body:
        if not isinstance(statement, ast.Expr):
            raise MalformedCall(f'{where}: expected function calls like name(arg="value")')
        value = statement.value
        nodes.extend(value.elts if isinstance(value, ast.List) else [value])
    if not nodes:
        raise MalformedCall(f"{where} is empty")
    return [_gemma_call(node, first + i) for i, node in enumerate(nodes)]


def _tool_code_end(text: str, start: int) -> int:
    """Where the tool_code block whose body starts at `start` closes: the first ``` after which the
    body is valid Python (``` inside a string literal is text), else the first ```."""
    closes = [i for i in range(start, len(text)) if text.startswith(_FENCE, i)]
    if not closes:
        raise MalformedCall("```tool_code block without a closing ```")
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
    except MalformedCall as error:
        return AssistantTurn(content=text.strip(), parse_error=str(error))
    return AssistantTurn(content=outside_spans(text, spans), tool_calls=tuple(calls))


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
    return guarded(_parse_gemma, text)


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
