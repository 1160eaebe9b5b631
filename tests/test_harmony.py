"""GPT-OSS's harmony format (rl_core/model/harmony_renderer.py): rendering, parsing, token-exact SOP episodes.

Fast, offline: the `openai_harmony` library (oss-harmony 0.0.11 embeds the o200k_harmony vocabulary), a Hugging
Face tokenizer converted from it, and a tiny random-init GPT-OSS model built from a config."""

from __future__ import annotations

import json
import random

import openai_harmony as oh
import pytest

from rl_core.environments import load_environment
from rl_core.environments.actions import FinalAnswer, ToolCall, parse_action
from rl_core.environments.base import StepResult
from rl_core.environments.expert import solve
from rl_core.environments.messages import AssistantTurn, ToolResult
from rl_core.environments.sop import ANSWER_TOOL
from rl_core.model.generation import Generation
from rl_core.model.gpt_oss import (
    CALL,
    CHANNEL,
    CONSTRAIN,
    END,
    MESSAGE,
    RETURN,
    START,
    build_tiny_gpt_oss,
    harmony_encoding,
    harmony_tokenizer,
)
from rl_core.model.harmony_renderer import HarmonyRenderer
from rl_core.model.policy import Policy
from rl_core.rollout import RolloutSettings, collect_rollouts

ASSISTANT = 173781  # "assistant"
# <|channel|>analysis<|message|>Need the order.<|end|><|start|>assistant<|channel|>commentary to=functions.get_order
# <|constrain|>json<|message|>{"order_id": "7486"}<|call|>, written out as ids
TOOL_CALL_IDS = [
    *[CHANNEL, 35644, MESSAGE, 23483, 290, 2569, 13, END, START, ASSISTANT, CHANNEL],
    *[12606, 815, 316, 28, 44580, 775, 17446, 220, CONSTRAIN, 4108, MESSAGE],
    *[10848, 2143, 1537, 1243, 392, 39478, 21, 18583, CALL],
]


@pytest.fixture(scope="module")
def enc():
    return harmony_encoding()


@pytest.fixture(scope="module")
def tok():
    return harmony_tokenizer()


@pytest.fixture(scope="module")
def policy(tok):
    return Policy(build_tiny_gpt_oss(tok), tok, None, renderer=HarmonyRenderer(tok))


def ids(enc, text: str) -> list[int]:
    return enc.encode(text, allowed_special="all")


def test_the_tokenizer_encodes_as_the_library(enc, tok):
    assert len(tok) == 201088 and (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (RETURN, 199999, 199998)
    texts = [
        "hello world",
        "Refund order 4821? It's 2026-12-01; déjà vu café\u0301 — 毕老师 😀👍🏽 \r\n\tcode(x)=1234567",
        "<|start|>functions.get_order<|channel|>commentary to=assistant<|message|>{}<|end|><|reserved_200100|>",
        "  two  spaces\n\n\nCAPS WORDS'll don't I'M",
    ]
    rng = random.Random(0)
    alphabet = "abcXYZ 019\n\t\r'’.,;:!?-_/\\\"{}[]()<>|éü中文😀\u0301"
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False) == ids(enc, text), text
        assert tok.decode(ids(enc, text)) == text
    assert tok.decode(TOOL_CALL_IDS) == enc.decode(TOOL_CALL_IDS)
    assert ids(enc, "<|channel|>analysis<|message|>Need the order.<|end|><|start|>assistant") == TOOL_CALL_IDS[:10]


def test_the_prompt_is_the_library_rendering_of_system_developer_and_user(enc):
    env = load_environment("refunds")
    renderer = HarmonyRenderer()
    conv = renderer.start(env.tool_system_prompt(), env.tools(), "Refund order 7486.")
    developer = oh.DeveloperContent.new().with_instructions(env.tool_system_prompt())
    tools = [
        oh.ToolDescription.new(t["function"]["name"], t["function"]["description"], t["function"]["parameters"])
        for t in env.tools()
    ]
    developer = developer.with_function_tools(tools)
    system = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort.LOW)
    messages = [
        oh.Message.from_role_and_content(oh.Role.SYSTEM, system),
        oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer),
        oh.Message.from_role_and_content(oh.Role.USER, "Refund order 7486."),
    ]
    expected = enc.render_conversation_for_completion(oh.Conversation.from_messages(messages), oh.Role.ASSISTANT)
    assert conv.prompt_ids == expected and expected[-2:] == [START, ASSISTANT] and len(tools) == 3
    head = enc.render_conversation(oh.Conversation.from_messages(messages[:2]))
    assert conv.system_length == len(head) and conv.prompt_ids[: len(head)] == head
    text = enc.decode(conv.prompt_ids)
    assert "Reasoning: low" in text and "type submit_answer = (_: {" in text and "Current date" not in text
    assert renderer.start(env.tool_system_prompt(), env.tools(), "Refund order 7486.").prompt_ids == expected
    medium = HarmonyRenderer(reasoning_effort="medium", conversation_start_date="2026-01-02")
    assert "Reasoning: medium" in enc.decode(medium.start("", [], "hi").prompt_ids)
    assert "Current date: 2026-01-02" in enc.decode(medium.start("", [], "hi").prompt_ids)
    assert (renderer.stop_ids, renderer.stop_id, renderer.pad_id) == (frozenset({CALL, RETURN}), CALL, 199999)
    with pytest.raises(ValueError, match="reasoning_effort"):
        HarmonyRenderer(reasoning_effort="extreme")
    with pytest.raises(ValueError, match=r"tools\[0\] is not an OpenAI function schema"):
        renderer.start("s", [{"name": "get_order"}], "u")


def test_a_tool_call_parses_to_the_assistant_turn(enc):
    conv = HarmonyRenderer().start("Use the tools.", [], "Refund order 7486.")
    turn = conv.parse(TOOL_CALL_IDS)
    assert turn == AssistantTurn(
        content="", tool_calls=(ToolCall("get_order", {"order_id": "7486"}),), reasoning="Need the order."
    )
    final = conv.parse(
        ids(
            enc,
            "<|channel|>analysis<|message|>Done.<|end|><|start|>assistant<|channel|>final<|message|>Refunded.<|return|>",
        )
    )
    assert final == AssistantTurn(content="Refunded.", reasoning="Done.")
    # a preamble on commentary is content; constrain without <|constrain|> also parses
    both = conv.parse(
        ids(
            enc,
            "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>commentary "
            'to=functions.get_customer json<|message|>{"customer_id": "1"}<|call|>',
        )
    )
    assert both == AssistantTurn(content="Checking.", tool_calls=(ToolCall("get_customer", {"customer_id": "1"}),))
    assert HarmonyRenderer().reasoning_spans(TOOL_CALL_IDS) == [(0, 8)]  # <|channel|>analysis ... <|end|>


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("hello there<|call|>", "not a harmony message: Unexpected EOS while waiting for message header"),
        (
            '<|channel|>commentary to=functions.get_order <|constrain|>json<|message|>{"order_id": <|call|>',
            "call 1: invalid JSON arguments",
        ),
        (
            '<|channel|>commentary to=functions.get_order<|message|>["7486"]<|call|>',
            "call 1: the arguments must be a JSON object",
        ),
        (
            '<|channel|>commentary to=functions.get_order<|message|>{"order_id": "7486"}',
            "the turn did not end with <|call|> or <|return|>",
        ),
        ("<|channel|>commentary to=browser.search<|message|>{}<|call|>", "unknown recipient 'browser.search'"),
        ("<|channel|>final<|message|>done<|call|>", "<|call|> ended a turn without a function call"),
        ("<|channel|>final<|message|>x<|end|><|start|>user<|message|>hi<|return|>", "the turn wrote a user message"),
        ("<|channel|>thoughts<|message|>x<|return|>", "message on channel 'thoughts'"),
        (
            '<|channel|>commentary to=functions.get_order<|message|>{"v": NaN}<|call|>',
            "call 1: invalid JSON arguments (NaN is not JSON)",
        ),
        (
            "<|channel|>commentary to=functions.get_order<|message|>" + "[" * 5000 + "<|call|>",
            "call 1: invalid JSON arguments (nested too deeply)",
        ),
    ],
)
def test_a_malformed_turn_gives_a_parse_error(enc, text, reason):
    turn = HarmonyRenderer().start("", [], "u").parse(ids(enc, text))
    assert turn.parse_error is not None and turn.parse_error.startswith(reason), turn.parse_error
    assert turn.tool_calls == ()


def test_random_ids_never_raise(enc):
    renderer = HarmonyRenderer()
    conv = renderer.start("", [], "u")
    rng = random.Random(1)
    pool = [CHANNEL, MESSAGE, END, START, CONSTRAIN, CALL, RETURN, ASSISTANT, 35644, 4108, 17196, 12606, 815, 10848, 13]
    for _ in range(300):
        generated = [rng.choice(pool) for _ in range(rng.randint(0, 12))] + [rng.choice([CALL, RETURN])]
        assert isinstance(conv.parse(generated), AssistantTurn)
        assert all(0 <= a < b <= len(generated) for a, b in renderer.reasoning_spans(generated))


def test_extensions_render_only_the_new_messages_and_are_checked(enc):
    conv = HarmonyRenderer().start("Use the tools.", [], "Refund order 7486.")
    result = StepResult(observation="{}", tool_results=[ToolResult(None, "get_order", '{"status": "ok"}', True)])
    extension = conv.extend(TOOL_CALL_IDS, result)
    assert extension == ids(
        enc,
        '<|start|>functions.get_order<|channel|>commentary to=assistant<|message|>{"status": "ok"}<|end|>'
        "<|start|>assistant",
    )
    assert conv.rewrites == [] and conv.ids == conv.prompt_ids + TOOL_CALL_IDS + extension
    # a final answer ending in <|return|>, answered by a user message: the library re-renders <|return|> as <|end|>
    final = ids(
        enc, "<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant<|channel|>final<|message|>No.<|return|>"
    )
    before = list(conv.ids)
    extension = conv.extend(final, StepResult(observation='{"error": "call a tool"}'))
    assert extension == ids(enc, '<|start|>user<|message|>{"error": "call a tool"}<|end|><|start|>assistant')
    assert conv.ids == before + final + extension  # the sampled ids stay
    assert conv.rewrites == [
        "the library re-renders earlier turns differently (e.g. <|return|> as <|end|>, drops analysis)"
    ]


def harmony_call(action_text: str) -> str:
    """The expert's text action as the harmony tool call GPT-OSS would sample (analysis first)."""
    action = parse_action(action_text)
    name, arguments = (
        (ANSWER_TOOL, dict(action.fields)) if isinstance(action, FinalAnswer) else (action.tool, action.arguments)
    )
    return (
        f"<|channel|>analysis<|message|>Next: {name}.<|end|><|start|>assistant<|channel|>commentary "
        f"to=functions.{name} <|constrain|>json<|message|>{json.dumps(arguments)}<|call|>"
    )


def play(policy, env, task, turns: list[list[int]]):
    """One episode of `task` whose policy turns are the id lists `turns` (a scripted token sampler); also returns
    the episode's conversation."""
    renderer, played, conversations = policy.renderer, iter(turns), []
    start = renderer.start
    renderer.start = lambda *a: conversations.append(start(*a)) or conversations[-1]

    def sample(keys, contexts, limits, temperature):
        return [Generation(g, [-0.5] * len(g), True) for g in (next(played) for _ in keys)]

    settings = RolloutSettings(
        max_turns=8, max_tokens_per_turn=400, context_window=4096, temperature=1.0, timeout_s=60.0
    )
    try:
        [episode] = collect_rollouts(
            policy, [(env, task)], settings, group_size=1, run_id="h", iteration=1, token_sampler=sample
        )
    finally:
        del renderer.start
    return episode, conversations[0]


def test_an_sop_episode_is_prompt_sampled_and_extensions_and_the_library_rendering(enc, policy):
    env = load_environment("refunds")
    task = env.tasks("train")[0]
    expert = solve(env, task)
    turns = [ids(enc, harmony_call(a)) for a in expert.actions]
    episode, conv = play(policy, env, task, turns)
    assert (episode.finish_reason, episode.reward, episode.success) == ("answered", expert.reward, True)
    generated = [t for t, m in zip(episode.tokens, episode.loss_mask) if m]
    assert generated == [t for turn in turns for t in turn] and conv.rewrites == []
    # the library's rendering of the whole conversation, built here from the expert's moves, is the episode
    messages = list(conv.messages[:3])
    for action, (_, observation) in zip(expert.actions, expert.turns):
        text = harmony_call(action)
        name = text.split("to=functions.")[1].split(" ")[0]
        arguments = text.split("json<|message|>")[1].removesuffix("<|call|>")
        messages.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, f"Next: {name}.").with_channel("analysis"))
        messages.append(
            oh.Message.from_role_and_content(oh.Role.ASSISTANT, arguments)
            .with_channel("commentary")
            .with_recipient(f"functions.{name}")
            .with_content_type("<|constrain|>json")
        )
        if observation is not None:
            tool = oh.Author.new(oh.Role.TOOL, f"functions.{name}")
            messages.append(
                oh.Message.from_author_and_content(tool, observation)
                .with_channel("commentary")
                .with_recipient("assistant")
            )
    assert episode.tokens == enc.render_conversation(oh.Conversation.from_messages(messages))
    roles = ["system", "user"] + ["assistant", "tool"] * (len(turns) - 1) + ["assistant"]
    assert [t.role for t in episode.turns] == roles
    # reasoning_in_loss false masks exactly the analysis messages (reasoning_spans)
    from rl_core.reasoning_mask import mask_reasoning

    [masked], count = mask_reasoning([episode], policy.renderer.reasoning_spans)
    analysis = [len(t[: t.index(END) + 1]) for t in turns]
    assert count == sum(analysis) and sum(masked.loss_mask) == sum(episode.loss_mask) - sum(analysis)


def test_a_turn_that_does_not_parse_is_an_error_observation_and_counted(enc, policy):
    from rl_core.metrics import rollout_metrics

    env = load_environment("refunds")
    task = env.tasks("train")[0]
    expert = solve(env, task)
    broken = ids(enc, '<|channel|>commentary to=functions.get_order <|constrain|>json<|message|>{"order_id": <|call|>')
    prose = ids(enc, "I will refund it.<|call|>")
    turns = [broken, prose, *(ids(enc, harmony_call(a)) for a in expert.actions)]
    episode, conv = play(policy, env, task, turns)
    assert (episode.finish_reason, episode.reward) == ("answered", expert.reward)
    first, answer, second = episode.turns[2], episode.turns[3], episode.turns[4]
    assert first.parse_error.startswith("call 1: invalid JSON arguments") and answer.tool_ok is False
    assert json.loads(answer.text)["error"] == first.parse_error
    assert second.parse_error.startswith("not a harmony message")
    # the error goes back as a user message; the unparseable turn stops the re-render check
    assert enc.decode(episode.tokens[answer.start : answer.end]).startswith(
        '<|start|>user<|message|>{"error": "call 1:'
    )
    assert conv.rewrites == ["the library cannot parse the sampled turn, so it cannot re-render the episode"]
    assert rollout_metrics([episode])["rollout/tool_parse_errors"] == 2.0
    generated = [t for t, m in zip(episode.tokens, episode.loss_mask) if m]
    assert generated == [t for turn in turns for t in turn]


def test_the_tiny_gpt_oss_policy_plays_real_rollouts(policy):
    import torch

    env = load_environment("refunds")
    settings = RolloutSettings(max_turns=2, max_tokens_per_turn=6, context_window=4096, temperature=1.0, timeout_s=60.0)
    episodes = collect_rollouts(
        policy,
        [(env, env.tasks("train")[0])],
        settings,
        group_size=2,
        run_id="g",
        iteration=1,
        generator=torch.Generator().manual_seed(0),
    )
    prompt = policy.renderer.start(env.tool_system_prompt(), env.tools(), env.tasks("train")[0].prompt).prompt_ids
    for episode in episodes:
        assert episode.finish_reason in ("token_cap", "max_turns", "answered") and episode.env_error is None
        assert episode.tokens[: len(prompt)] == prompt and sum(episode.loss_mask) >= 1


def test_save_then_load_auto_comes_back_as_harmony(policy, tmp_path, tiny_tokenizer):
    from rl_core.model.policy import load_policy, resolve_chat_format, resolve_tool_parser, save_policy

    small = Policy(build_tiny_gpt_oss(policy.tokenizer, hidden_size=16), policy.tokenizer, None, policy.renderer)
    save_policy(small, tmp_path / "gpt-oss")  # 13 MB of weights, 28 MB of tokenizer.json
    loaded = load_policy(tmp_path / "gpt-oss", chat="auto", tool_parser="auto")
    assert isinstance(loaded.renderer, HarmonyRenderer) and loaded.chat is None
    assert loaded.episode_renderer().stop_ids == {CALL, RETURN} and type(loaded.model).__name__ == "GptOssForCausalLM"
    loaded.tokenizer.chat_template = "{{ messages }}"  # GPT-OSS tokenizers carry a template too: harmony still wins
    assert resolve_chat_format("auto", loaded.tokenizer) == "harmony"
    assert resolve_tool_parser("auto", loaded.tokenizer) == "harmony"
    with pytest.raises(ValueError, match="policy.chat_format harmony needs policy.tool_parser harmony or auto"):
        load_policy(tmp_path / "gpt-oss", chat="harmony", tool_parser="hermes")
    with pytest.raises(ValueError, match="policy.tool_parser harmony needs policy.chat_format harmony or auto"):
        load_policy(tmp_path / "gpt-oss", chat="chatml", tool_parser="harmony")
    with pytest.raises(ValueError, match="the tokenizer is not harmony's"):
        HarmonyRenderer(tiny_tokenizer)


def test_the_config_pairs_harmony_format_and_parser():
    from pydantic import ValidationError

    from rl_core.config import load_config

    with pytest.raises(ValidationError, match="policy.tool_parser must be harmony or auto, not 'hermes'"):
        load_config(None, ["policy.chat_format=harmony", "policy.tool_parser=hermes"])
    assert load_config(None, ["policy.chat_format=harmony"]).policy.tool_parser == "auto"  # the default pairs
    with pytest.raises(ValidationError, match="policy.tool_parser harmony needs policy.chat_format harmony or auto"):
        load_config(None, ["policy.tool_parser=harmony", "policy.chat_format=hf_template"])
    for pair in (["harmony", "harmony"], ["harmony", "auto"], ["auto", "harmony"]):
        policy = load_config(None, [f"policy.chat_format={pair[0]}", f"policy.tool_parser={pair[1]}"]).policy
        assert (policy.chat_format, policy.tool_parser) == tuple(pair)


def test_turn_ids_write_what_the_parser_reads_and_demonstrations_play_through_harmony(enc, policy):
    """The renderer writes a policy turn (reasoning, one tool call or a final answer) as the library renders
    it; parsing those ids gives the turn back, and expert demonstrations play token-exact through it."""
    from rl_core.model.demonstrations import expert_demonstrations

    renderer = policy.renderer
    conv = renderer.start("sys", [], "hi")
    call = AssistantTurn(content="", tool_calls=(ToolCall("get_order", {"order_id": "A1"}),), reasoning="look it up")
    ids = renderer.turn_ids(call)
    assert ids[-1] == CALL and enc.decode(ids).startswith("<|channel|>analysis<|message|>look it up<|end|>")
    parsed = conv.parse(ids)
    assert (parsed.reasoning, parsed.parse_error) == ("look it up", None)
    assert [(c.tool, c.arguments) for c in parsed.tool_calls] == [("get_order", {"order_id": "A1"})]
    final = renderer.turn_ids(AssistantTurn(content="all done"))
    assert final[-1] == RETURN and conv.parse(final).content == "all done"
    with pytest.raises(ValueError, match="at most one tool call"):
        renderer.turn_ids(AssistantTurn(tool_calls=(ToolCall("a", {}), ToolCall("b", {}))))
    env = load_environment("refunds")
    tasks = env.tasks("train")[:2]
    settings = RolloutSettings(max_turns=8, max_tokens_per_turn=400, context_window=4096, temperature=1.0)
    demos = expert_demonstrations(policy, env, tasks, settings)
    assert [d.reward for d in demos] == [solve(env, t).reward for t in tasks]
    assert all(t.parse_error is None for d in demos for t in d.turns)


def test_harmony_named_on_one_side_decides_auto_and_a_wrong_tokenizer_is_named(caplog):
    """chat_format harmony with tool_parser auto (the default), or the reverse, is harmony; on a tokenizer
    that is not harmony's the error says so (not a pairing error about a parser nobody named)."""
    import logging

    from rl_core.model.policy import load_policy
    from rl_core.paths import REPO_ROOT

    reference = REPO_ROOT / "data/checkpoints/reference"  # Turnstile's own tokenizer
    for chat, parser in (("harmony", "auto"), ("auto", "harmony")):
        with pytest.raises(ValueError, match="the tokenizer is not harmony's"):
            load_policy(reference, chat=chat, tool_parser=parser)
    with pytest.raises(ValueError, match="has no chat template; use policy.chat_format turnstile or chatml"):
        load_policy(reference, chat="hf_template")
    caplog.set_level(logging.WARNING, logger="rl_core.model.policy")
    load_policy(reference, chat="turnstile", tool_parser="gemma", stop_token="<|end|>")
    assert any(
        "policy.tool_parser (gemma) and policy.stop_token (<|end|>) are not used" in r.message for r in caplog.records
    )
    caplog.clear()
    load_policy(reference)  # the defaults: nothing to warn about
    assert not caplog.records


def test_the_cli_names_a_policy_the_chat_format_cannot_render(capsys):
    """turnstile eval with chat_format hf_template on a tokenizer without a chat template: one line, exit 2."""
    import flows.cli

    assert flows.cli.main(["eval", "--set", "policy.chat_format=hf_template", "--set", "evaluation.max_tasks=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("turnstile: policy.chat_format hf_template: the tokenizer at") and "Traceback" not in err
