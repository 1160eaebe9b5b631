"""Tool-call parsers (rl_core/model/tool_parsers.py): hand-written turns with their exact AssistantTurns,
every error with its exact parse_error, and property tests (format random calls, parse them back)."""

from __future__ import annotations

import json
import keyword

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rl_core.environments.actions import ToolCall
from rl_core.environments.messages import AssistantTurn
from rl_core.model.tool_parsers import (
    TOOL_PARSERS,
    format_gemma,
    format_hermes,
    parse_gemma,
    parse_hermes,
    tool_parser,
)


def call(tool, n, **arguments):
    return ToolCall(tool, arguments, f"call_{n}")


# ---------------------------------------------------------------------------------------------- hermes


def test_hermes_qwen3_turn_with_reasoning_content_and_two_calls():
    text = (
        "<think>\nThe user wants the order and its refund policy.\n</think>\n\n"
        "Let me look that up.\n"
        '<tool_call>\n{"name": "get_order", "arguments": {"order_id": "4821"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_policy", "arguments": '
        '{"kind": "refund", "limits": {"max": 120, "tiers": [1, 2.5]}}}\n</tool_call>'
    )
    assert parse_hermes(text) == AssistantTurn(
        content="Let me look that up.",
        tool_calls=(
            call("get_order", 1, order_id="4821"),
            call("get_policy", 2, kind="refund", limits={"max": 120, "tiers": [1, 2.5]}),
        ),
        reasoning="The user wants the order and its refund policy.",
    )


def test_hermes_plain_answer_and_empty_think_block():
    assert parse_hermes("  The refund is approved.  ") == AssistantTurn(content="The refund is approved.")
    assert parse_hermes("<think>\n\n</think>\n\nDone.") == AssistantTurn(content="Done.", reasoning="")
    assert parse_hermes("") == AssistantTurn()


def test_hermes_think_opened_by_the_prompt():
    # Templates that put "<think>\n" in the generation prompt: the turn starts inside the reasoning.
    text = 'I need the order.\n</think>\n\n<tool_call>\n{"name": "get_order", "arguments": {}}\n</tool_call>'
    assert parse_hermes(text) == AssistantTurn(tool_calls=(call("get_order", 1),), reasoning="I need the order.")


def test_hermes_think_that_does_not_open_the_turn_is_content():
    text = "Answer: use <think> tags </think> like this"
    assert parse_hermes(text) == AssistantTurn(content=text)


def test_hermes_text_between_and_after_calls_is_content():
    text = (
        'First.<tool_call>{"name": "a", "arguments": {}}</tool_call> then '
        '<tool_call> {"name": "b", "arguments": {"x": null, "y": true}} </tool_call>\nlast.'
    )
    assert parse_hermes(text) == AssistantTurn(
        content="First.\nthen\nlast.", tool_calls=(call("a", 1), call("b", 2, x=None, y=True))
    )


def test_hermes_unicode_and_arguments_as_a_json_string():
    text = (
        '<tool_call>\n{"name": "lookup_customer", "arguments": "{\\"name\\": \\"毕老师 Zoë 👋🏽\\"}"}\n</tool_call>\n'
        "<tool_call>\n"
        + json.dumps({"name": "note", "arguments": {"text": 'café\u0301 \n\t"quoted"'}}, ensure_ascii=True)
        + "\n</tool_call>"
    )
    assert parse_hermes(text) == AssistantTurn(
        tool_calls=(call("lookup_customer", 1, name="毕老师 Zoë 👋🏽"), call("note", 2, text='café\u0301 \n\t"quoted"'))
    )


def test_hermes_markup_inside_json_strings_is_text():
    text = (
        "<think>I will write <tool_call> tags.</think>\n"
        '<tool_call>\n{"name": "note", "arguments": {"text": "</tool_call> <tool_call> </think>"}}\n</tool_call>'
    )
    assert parse_hermes(text) == AssistantTurn(
        tool_calls=(call("note", 1, text="</tool_call> <tool_call> </think>"),),
        reasoning="I will write <tool_call> tags.",
    )


def test_hermes_missing_arguments_means_no_arguments():
    assert parse_hermes('<tool_call>{"name": "list_orders"}</tool_call>') == AssistantTurn(
        tool_calls=(call("list_orders", 1),)
    )


HERMES_ERRORS = [
    ("<think>\nstill thinking", "<think> without </think>"),
    ("<think>a<think>b</think>c", "<think> inside <think>"),
    ('<tool_call>\n{"name": "a", "arguments": {}}', "call 1: <tool_call> without </tool_call>"),
    (
        '<tool_call>{"name": "a"}</tool_call><tool_call>{"name": "b"}<tool_call>{"name": "c"}</tool_call>',
        "call 2: expected </tool_call> after the JSON object",
    ),
    ('<tool_call>{"name": "a"} and more</tool_call>', "call 1: expected </tool_call> after the JSON object"),
    ('{"name": "a"}</tool_call>', "</tool_call> without <tool_call>"),
    ('<tool_call>{"name": "a"}</tool_call> oops </tool_call>', "</tool_call> without <tool_call>"),
    (
        '<tool_call>{"name": "a"}</tool_call>\n<tool_call>\n{"name": "b", "arguments": {"x": 1,}}\n</tool_call>',
        "call 2: invalid JSON (Expecting property name enclosed in double quotes at line 1 column 36)",
    ),
    ("<tool_call>\n\n</tool_call>", "call 1: invalid JSON (Expecting value at line 1 column 1)"),
    ('<tool_call>{"name": "a", "arguments": {"x": NaN}}</tool_call>', "call 1: invalid JSON (NaN is not JSON)"),
    (
        '<tool_call>{"name": "a", "arguments": {"x": 1e999}}</tool_call>',
        "call 1: invalid JSON (number 1e999 out of range)",
    ),
    ('<tool_call>["a", {}]</tool_call>', 'call 1: expected a JSON object {"name": ..., "arguments": {...}}'),
    (
        '<tool_call>{"name": "a", "parameters": {"x": 1}}</tool_call>',
        'call 1: unexpected key "parameters" (expected "name" and "arguments")',
    ),
    ('<tool_call>{"arguments": {}}</tool_call>', 'call 1: missing "name"'),
    ('<tool_call>{"name": 7, "arguments": {}}</tool_call>', 'call 1: "name" must be a non-empty string'),
    ('<tool_call>{"name": " ", "arguments": {}}</tool_call>', 'call 1: "name" must be a non-empty string'),
    ('<tool_call>{"name": "a", "arguments": [1]}</tool_call>', 'call 1 (a): "arguments" must be a JSON object'),
    ('<tool_call>{"name": "a", "arguments": null}</tool_call>', 'call 1 (a): "arguments" must be a JSON object'),
    (
        '<tool_call>{"name": "a", "arguments": "x=1"}</tool_call>',
        'call 1 (a): "arguments" is a string that is not a JSON object',
    ),
    ('<tool_call>{"name": "a", "arguments": "[1]"}</tool_call>', 'call 1 (a): "arguments" must be a JSON object'),
    ("<tool_call>" + "[" * 100_000 + "</tool_call>", "tool call too deeply nested"),
]


@pytest.mark.parametrize(("text", "reason"), HERMES_ERRORS)
def test_hermes_errors(text, reason):
    assert parse_hermes(text) == AssistantTurn(content=text.strip(), parse_error=reason)


def test_hermes_error_keeps_a_parsed_reasoning_block():
    text = "<think>plan</think>\nCalling.\n<tool_call>{bad}</tool_call>"
    assert parse_hermes(text) == AssistantTurn(
        content="Calling.\n<tool_call>{bad}</tool_call>",
        reasoning="plan",
        parse_error="call 1: invalid JSON (Expecting property name enclosed in double quotes at line 1 column 2)",
    )


def test_format_hermes_is_qwens_layout():
    turn = AssistantTurn(content="Checking.", tool_calls=(call("get_order", 1, order_id="é"),), reasoning="r")
    expected = (
        "<think>\nr\n</think>\n\nChecking.\n"
        '<tool_call>\n{"name": "get_order", "arguments": {"order_id": "é"}}\n</tool_call>'
    )
    assert format_hermes(turn) == expected
    assert parse_hermes(expected) == turn


# ---------------------------------------------------------------------------------------------- gemma


def test_gemma_tool_code_block_with_content_around_it():
    text = (
        "I'll look up the order first.\n"
        "```tool_code\n"
        'get_order(order_id="4821", verbose=True, limit=-3, ratio=0.5, tags=["a", "b"], '
        "extra={'nested': {'deep': (1, None)}}, flag=true, missing=null)\n"
        "```\n"
        "Then I'll decide."
    )
    assert parse_gemma(text) == AssistantTurn(
        content="I'll look up the order first.\nThen I'll decide.",
        tool_calls=(
            call(
                "get_order",
                1,
                order_id="4821",
                verbose=True,
                limit=-3,
                ratio=0.5,
                tags=["a", "b"],
                extra={"nested": {"deep": [1, None]}},
                flag=True,
                missing=None,
            ),
        ),
    )


def test_gemma_list_lines_and_several_blocks():
    text = (
        '```tool_code\n[get_order(order_id="1"), get_customer(name="Zoë 毕")]\n```\n'
        "and\n"
        '```tool_code\nlist_orders()\nget_policy(kind="refund",)\n```'
    )
    assert parse_gemma(text) == AssistantTurn(
        content="and",
        tool_calls=(
            call("get_order", 1, order_id="1"),
            call("get_customer", 2, name="Zoë 毕"),
            call("list_orders", 3),
            call("get_policy", 4, kind="refund"),
        ),
    )


def test_gemma_fence_inside_a_string_argument_is_text():
    text = '```tool_code\nnote(text="use ``` fences", tail="```")\n```\nok'
    assert parse_gemma(text) == AssistantTurn(
        content="ok", tool_calls=(call("note", 1, text="use ``` fences", tail="```"),)
    )


def test_gemma_bare_list_is_the_documented_prompt_format():
    text = '  [get_product_name_by_PID(PID="807ZPKBL9V"), list_orders()]\n'
    assert parse_gemma(text) == AssistantTurn(
        tool_calls=(call("get_product_name_by_PID", 1, PID="807ZPKBL9V"), call("list_orders", 2))
    )


def test_gemma_plain_text_and_lookalikes_are_content():
    for text in ["The refund is approved.", "[1, 2, 3]", "See f(x=1) here", "```python\nf(a=1)\n```", ""]:
        assert parse_gemma(text) == AssistantTurn(content=text.strip())
    assert parse_gemma("```tool_codex\nf(a=1)\n```") == AssistantTurn(content="```tool_codex\nf(a=1)\n```")


GEMMA_ERRORS = [
    ('```tool_code\nget_order(order_id="1")\n', "```tool_code block without a closing ```"),
    ("```tool_code\n  \n```", "tool_code block 1 is empty"),
    ("```tool_code\n[]\n```", "tool_code block 1 is empty"),
    (
        '```tool_code\nf(a=1)\n```\n```tool_code\nf(a="1"\n```',
        "tool_code block 2: invalid Python ('(' was never closed)",
    ),
    ("```tool_code\nx = f(a=1)\n```", 'tool_code block 1: expected function calls like name(arg="value")'),
    ("```tool_code\n[f(a=1), 3]\n```", 'call 2: expected a function call like name(arg="value")'),
    ("```tool_code\napi.f(a=1)\n```", "call 1: the function must be a plain name"),
    ('```tool_code\nf("x")\n```', "call 1 (f): positional arguments are not supported; write name=value"),
    ("```tool_code\nf(**kw)\n```", "call 1 (f): **arguments are not supported; write name=value"),
    ("```tool_code\nf(a=1, a=2)\n```", 'call 1 (f): argument "a" given twice'),
    (
        "```tool_code\nf(a='\x00')\n```",
        "tool_code block 1: invalid Python (source code string cannot contain null bytes)",
    ),
    ("[f(a=1), g(b=1]", "call list: invalid Python (closing parenthesis ']' does not match opening parenthesis '(')"),
]
_LITERAL = "must be a literal (string, number, True/False/None, list, or dict with string keys)"
GEMMA_ERRORS += [
    (f"```tool_code\nf(a={value})\n```", f'call 1 (f): argument "a" {_LITERAL}')
    for value in ["g()", "x", "1 + 2", "{1: 2}", "{1, 2}", "b'x'", "-True", "1e999", "...", "lambda: 0"]
]


@pytest.mark.parametrize(("text", "reason"), GEMMA_ERRORS)
def test_gemma_errors(text, reason):
    assert parse_gemma(text) == AssistantTurn(content=text.strip(), parse_error=reason)


def test_format_gemma_writes_one_tool_code_fence():
    turn = AssistantTurn(
        content="Checking.", tool_calls=(call("f", 1, a="é", b=[1, None], c={"k": False}), call("g", 2))
    )
    expected = 'Checking.\n```tool_code\n[f(a="é", b=[1, None], c={"k": False}), g()]\n```'
    assert format_gemma(turn) == expected
    assert parse_gemma(expected) == turn
    with pytest.raises(TypeError, match="set"):
        format_gemma(AssistantTurn(tool_calls=(call("f", 1, a={1}),)))


# ---------------------------------------------------------------------------------------------- registry


def test_registry():
    assert tool_parser("hermes") is parse_hermes
    assert tool_parser("gemma") is parse_gemma
    assert set(TOOL_PARSERS) == {"hermes", "gemma"}
    with pytest.raises(ValueError, match=r"unknown tool parser 'harmony'; known: gemma, hermes"):
        tool_parser("harmony")


# ---------------------------------------------------------------------------------------------- properties

_NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True).filter(lambda s: not keyword.iskeyword(s))
_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
_VALUES = st.recursive(
    _SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3), max_leaves=8
)
_CALLS = st.lists(st.tuples(_NAMES, st.dictionaries(_NAMES, _VALUES, max_size=4)), max_size=4)
# content that cannot contain the formats' markup ("<", "`", "[") and has no surrounding whitespace
_CONTENT = st.text(st.characters(blacklist_characters="<`[", blacklist_categories=("Cs",))).map(str.strip)


def _turn(calls, content, reasoning=None):
    tool_calls = tuple(ToolCall(name, args, f"call_{i}") for i, (name, args) in enumerate(calls, 1))
    return AssistantTurn(content=content, tool_calls=tool_calls, reasoning=reasoning)


@settings(max_examples=150, deadline=None)
@given(calls=_CALLS, content=_CONTENT, reasoning=st.none() | _CONTENT)
def test_hermes_round_trip(calls, content, reasoning):
    turn = _turn(calls, content, reasoning)
    assert parse_hermes(format_hermes(turn)) == turn


@settings(max_examples=150, deadline=None)
@given(calls=_CALLS, content=_CONTENT)
def test_gemma_round_trip(calls, content):
    turn = _turn(calls, content)
    assert parse_gemma(format_gemma(turn)) == turn


@settings(max_examples=300, deadline=None)
@given(
    text=st.lists(
        st.sampled_from(["<think>", "</think>", "<tool_call>", "</tool_call>", "```tool_code\n", "```", "[f(", ")]"])
        | st.text(max_size=20),
        max_size=8,
    ).map("".join)
)
def test_parsers_never_raise(text):
    for parse in TOOL_PARSERS.values():
        turn = parse(text)
        assert isinstance(turn, AssistantTurn)
        assert (turn.parse_error is None) or (turn.tool_calls == () and turn.content == turn.content.strip())


def test_a_parser_bug_is_a_parse_error_not_a_crash(monkeypatch):
    import rl_core.model.tool_parsers as tool_parsers

    def broken(rest, body_start, n):
        raise KeyError(body_start)

    monkeypatch.setattr(tool_parsers, "_hermes_call", broken)
    text = ' <tool_call>{"name": "a"}</tool_call> '
    assert parse_hermes(text) == AssistantTurn(content=text.strip(), parse_error="unparseable turn (KeyError)")
