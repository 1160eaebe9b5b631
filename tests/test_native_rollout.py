"""A chat model's own template and native tool calls through the rollout engine (issue 11, item 2).

A policy whose renderer is `HFTemplateRenderer` (a Hermes/Qwen-style ChatML template with tools, a
small trained tokenizer) plays SOP episodes; a scripted token sampler writes the expert's moves as
Hermes tool calls. The episode must be answered with the expert's reward, each tool result must come
back through the template, and the episode's tokens must be exactly the template's own rendering of
the conversation: what the policy was fed and sampled, nothing re-tokenized.
"""

from __future__ import annotations

import json

import pytest

from rl_core.environments import load_environment
from rl_core.environments.actions import FinalAnswer, ToolCall, parse_action
from rl_core.environments.expert import solve
from rl_core.environments.messages import AssistantTurn
from rl_core.environments.sop import ANSWER_TOOL
from rl_core.model.generation import Generation
from rl_core.model.policy import Policy, build_tiny_model
from rl_core.model.template_renderer import HFTemplateRenderer
from rl_core.model.tool_parsers import format_hermes, parse_hermes
from rl_core.rollout import RolloutSettings, collect_rollouts
from tests.test_template_renderer import CORPUS, EXTRA_TOKENS, HERMES_TEMPLATE


@pytest.fixture(scope="module")
def native_policy():
    from rl_core.model.tokenizer import build_tokenizer

    env = load_environment("refunds")
    corpus = [*CORPUS, env.tool_system_prompt(), json.dumps(env.tools())] * 5
    tok = build_tokenizer(corpus, vocab_size=600)
    tok.add_tokens(EXTRA_TOKENS, special_tokens=True)
    tok.chat_template = HERMES_TEMPLATE
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_positions=4096)
    renderer = HFTemplateRenderer(tok, parse_hermes, "<|im_end|>")
    return Policy(model, tok, None, renderer=renderer)


def hermes_text(action_text: str) -> str:
    """The expert's text action as the Hermes tool call a chat model would write."""
    action = parse_action(action_text)
    if isinstance(action, FinalAnswer):
        return format_hermes(AssistantTurn(tool_calls=(ToolCall(ANSWER_TOOL, dict(action.fields)),)))
    assert isinstance(action, ToolCall)
    return format_hermes(AssistantTurn(tool_calls=(action,)))


def scripted(policy: Policy, turns: dict[int, list[str]]):
    """A token sampler that writes, for episode key k, the texts turns[k] one per call, then stops."""
    stop = policy.episode_renderer().stop_id
    played = {key: 0 for key in turns}

    def sample(keys, contexts, limits, temperature):
        out = []
        for key, limit in zip(keys, limits):
            text = turns[key][played[key]]
            played[key] += 1
            ids = [*policy.tokenizer.encode(text, add_special_tokens=False), stop]
            assert len(ids) <= limit
            out.append(Generation(ids, [-0.5] * len(ids), True))
        return out

    return sample


def play(policy: Policy, env, task, texts: list[str]):
    """One episode of `task` whose policy turns are `texts` (the scripted token sampler)."""
    [episode] = collect_rollouts(
        policy,
        [(env, task)],
        settings(),
        group_size=1,
        run_id="native",
        iteration=1,
        token_sampler=scripted(policy, {0: texts}),
    )
    return episode


def settings(**overrides) -> RolloutSettings:
    values = dict(max_turns=8, max_tokens_per_turn=400, context_window=4096, temperature=1.0, timeout_s=60.0)
    return RolloutSettings(**{**values, **overrides})


def test_the_expert_played_as_native_tool_calls_is_answered_and_token_exact(native_policy):
    env = load_environment("refunds")
    task = env.tasks("train")[0]
    expert = solve(env, task)
    texts = [hermes_text(action) for action in expert.actions]
    episode = play(native_policy, env, task, texts)
    assert (episode.finish_reason, episode.reward, episode.success) == ("answered", expert.reward, True)
    # the template's own rendering of the conversation is the episode, token for token
    messages = [{"role": "system", "content": env.tool_system_prompt()}, {"role": "user", "content": task.prompt}]
    for text, (_, observation) in zip(texts, expert.turns):
        messages.append({"role": "assistant", "content": text})
        if observation is not None:
            messages.append({"role": "tool", "content": observation})
    rendered = native_policy.tokenizer.apply_chat_template(
        messages, tools=env.tools(), tokenize=False, add_generation_prompt=False
    )
    assert rendered.endswith("<|im_end|>\n")
    expected = native_policy.tokenizer.encode(rendered.removesuffix("\n"), add_special_tokens=False)
    assert episode.tokens == expected
    # generated tokens are exactly the sampled ones, with their log-probs
    generated = [t for t, m in zip(episode.tokens, episode.loss_mask) if m]
    stop = native_policy.episode_renderer().stop_id
    sampled = [t for text in texts for t in [*native_policy.tokenizer.encode(text, add_special_tokens=False), stop]]
    assert generated == sampled
    assert [lp for lp, m in zip(episode.behavior_logprobs, episode.loss_mask) if m] == [-0.5] * len(sampled)
    prompt = native_policy.tokenizer.decode(episode.tokens[: episode.loss_mask.index(1)])
    assert '"name": "submit_answer"' in prompt and "<tools>" in prompt  # the tools, rendered by the template
    assert "CALL" not in prompt  # the tool system prompt: no text action syntax


def test_the_config_names_the_renderer_and_the_tool_parser(native_policy, tmp_path):
    from rl_core.config import load_config
    from rl_core.learner import load_start_policy
    from rl_core.model.tool_parsers import parse_gemma

    native_policy.model.save_pretrained(tmp_path / "chat-model")
    native_policy.tokenizer.save_pretrained(tmp_path / "chat-model")
    overrides = [
        f"policy.path={tmp_path / 'chat-model'}",
        "policy.chat_format=hf_template",
        "policy.context_window=1024",
    ]
    policy = load_start_policy(load_config(None, [*overrides, "policy.stop_token=<|im_end|>"]))
    renderer = policy.episode_renderer()
    assert isinstance(renderer, HFTemplateRenderer) and renderer.native_tools and policy.chat is None
    assert renderer.stop_id == policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    gemma = load_start_policy(
        load_config(None, [*overrides, "policy.tool_parser=gemma", "policy.stop_token=<|im_end|>"])
    )
    assert gemma.episode_renderer().parser is parse_gemma
    with pytest.raises(ValueError, match="chat template"):  # Turnstile's own tokenizer has none
        load_start_policy(load_config(None, ["policy.chat_format=hf_template"]))


def test_a_tool_call_that_does_not_parse_is_answered_with_an_error_recorded_on_its_turn_and_counted(native_policy):
    from rl_core.metrics import rollout_metrics

    env = load_environment("refunds")
    task = env.tasks("train")[0]
    expert = solve(env, task)
    broken = '<tool_call>\n{"name": "get_order", "arguments": {"order_id": \n</tool_call>'
    texts = [broken, *(hermes_text(action) for action in expert.actions)]
    episode = play(native_policy, env, task, texts)
    assert episode.finish_reason == "answered" and episode.reward == expert.reward
    assert [t.role for t in episode.turns[2:4]] == ["assistant", "tool"]
    first, answer = episode.turns[2], episode.turns[3]
    assert first.parse_error == parse_hermes(broken).parse_error and first.parse_error.startswith(
        "call 1: invalid JSON"
    )
    assert json.loads(answer.text)["error"].startswith("call 1: invalid JSON") and answer.tool_ok is False
    # every later turn was a valid tool call
    assistant = [t for t in episode.turns if t.role == "assistant"]
    assert len(assistant) == len(texts) and all(t.parse_error is None for t in assistant[1:])
    assert rollout_metrics([episode])["rollout/tool_parse_errors"] == 1.0
    # the expert alone parses every turn: one error over the two episodes is 0.5 per episode
    clean = play(native_policy, env, task, texts[1:])
    assert rollout_metrics([episode, clean])["rollout/tool_parse_errors"] == 0.5
    # the parse error survives the trajectory record
    from rl_core.trajectory import episodes_to_table, table_to_episodes

    [read] = table_to_episodes(episodes_to_table([episode]))
    assert read.turns[2].parse_error == first.parse_error


def test_auto_picks_the_format_and_the_parser_from_the_tokenizer(native_policy, tiny_tokenizer):
    import copy

    from rl_core.model.policy import resolve_chat_format, resolve_tool_parser

    assert resolve_chat_format("auto", tiny_tokenizer) == "turnstile"  # Turnstile's role tokens
    assert resolve_chat_format("auto", native_policy.tokenizer) == "hf_template"  # a chat template
    bare = copy.deepcopy(native_policy.tokenizer)
    bare.chat_template = None
    assert resolve_chat_format("auto", bare) == "turnstile"  # no template: its Turnstile role tokens
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2, "hello": 3}
    chatml_only = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")))
    assert resolve_chat_format("auto", chatml_only) == "chatml"  # neither a template nor Turnstile's tokens
    assert resolve_chat_format("chatml", native_policy.tokenizer) == "chatml"  # a name given is kept
    assert resolve_tool_parser("auto", native_policy.tokenizer) == "hermes"
    bare.add_tokens(["<start_of_turn>", "<end_of_turn>"], special_tokens=True)
    assert resolve_tool_parser("auto", bare) == "gemma"
    assert resolve_tool_parser("hermes", bare) == "hermes"


def test_reasoning_spans_of_a_sampled_turn_cover_the_think_block(native_policy):
    """The renderer finds a turn's <think> block by its token ids (for algorithm.reasoning_in_loss false)."""
    renderer = native_policy.episode_renderer()
    tok = native_policy.tokenizer
    think = tok.encode("<think>\nlook up the order first\n</think>\n\n", add_special_tokens=False)
    call = tok.encode(hermes_text('CALL get_order {"order_id": "A1"}'), add_special_tokens=False)
    ids = [*think, *call, renderer.stop_id]
    closing = len(tok.encode("<think>\nlook up the order first\n</think>", add_special_tokens=False))
    assert renderer.reasoning_spans(ids) == [(0, closing)]
    assert renderer.reasoning_spans([*call, renderer.stop_id]) == []


def test_a_non_extending_turn_keeps_the_sampled_ids_and_is_said_once(native_policy, caplog):
    """A sampled turn the template re-tokenizes differently (a non-canonical split of its text): the engine
    keeps the sampled ids, renders only the new messages, and says so once per collection, with the reasons
    counted in policy turns (every later turn of the episode takes the fallback too)."""
    import logging

    from rl_core.model.demonstrations import scripted_token_sampler, turn_ids

    tok, renderer = native_policy.tokenizer, native_policy.episode_renderer()
    canonical = tok.encode("I will check the order", add_special_tokens=False)
    split = tok.encode("I will check the ord", add_special_tokens=False) + tok.encode("er", add_special_tokens=False)
    assert split != canonical  # the same text, not as the tokenizer would write it
    env = load_environment("refunds")
    task = env.tasks("train")[0]
    moves = [turn_ids(native_policy, action) for action in solve(env, task).actions]
    caplog.set_level(logging.WARNING, logger="rl_core.rollout")
    for _ in range(2):
        [episode] = collect_rollouts(
            native_policy,
            [(env, task)],
            settings(),
            group_size=1,
            run_id="native",
            iteration=1,
            token_sampler=scripted_token_sampler({0: [[*split, renderer.stop_id], *moves]}),
        )
        assert episode.finish_reason == "answered"
        first = episode.turns[2]
        assert episode.tokens[first.start : first.end] == [*split, renderer.stop_id]  # sampled ids kept
    said = [r.getMessage() for r in caplog.records if "did not extend" in r.getMessage()]
    assert len(said) == 2  # one warning per collection
    later = len(moves) - 1  # the expert's moves after the split turn, but the last (answered: no extension)
    assert said[0].startswith(f"the chat template did not extend {1 + later} policy turn(s) of this collection (")
    assert "re-tokenized assistant text differs from the sampled ids: 1" in said[0]
    assert f"episode ids differ from the template's rendering of the history (an earlier fallback): {later}" in said[0]


def test_a_renderer_that_raises_never_stops_the_collection(native_policy):
    """A renderer bug on a sampled turn is a parse error for that turn; one that cannot render the
    environment's answer ends only that episode (env_error); tool results with lone surrogates are repaired
    before the renderer sees them (recorded on the episode)."""
    import copy

    from rl_core.environments.messages import ToolResult
    from rl_core.model.demonstrations import scripted_token_sampler, turn_ids

    env = load_environment("refunds")
    task = env.tasks("train")[0]
    moves = [turn_ids(native_policy, action) for action in solve(env, task).actions]

    def collect(policy, session_hook=None, max_turns=8):
        real_start = env.start
        if session_hook is not None:
            env.start = lambda t: session_hook(real_start(t))
        try:
            [episode] = collect_rollouts(
                policy,
                [(env, task)],
                settings(max_turns=max_turns),
                group_size=1,
                run_id="native",
                iteration=1,
                token_sampler=scripted_token_sampler({0: moves}),
            )
        finally:
            env.start = real_start
        return episode

    policy = copy.copy(native_policy)
    renderer = copy.copy(native_policy.episode_renderer())
    policy.renderer = renderer
    opened = renderer.start

    def broken_parse(*args):
        conversation = opened(*args)
        conversation.parse = lambda ids: 1 / 0
        return conversation

    renderer.start = broken_parse
    episode = collect(policy, max_turns=len(moves))
    assert episode.finish_reason == "max_turns"
    errors = [t.parse_error for t in episode.turns if t.role == "assistant"]
    assert len(errors) == len(moves) and all(e.startswith("unparseable turn (ZeroDivisionError") for e in errors)

    def broken_extend(*args):
        conversation = opened(*args)
        conversation.extend = lambda ids, result: (_ for _ in ()).throw(ValueError("template says no"))
        return conversation

    renderer.start = broken_extend
    episode = collect(policy)
    assert episode.finish_reason == "env_error" and "could not render the environment's answer" in episode.env_error
    assert "template says no" in episode.env_error

    def surrogate(session):
        respond = session.respond

        def answer(turn):
            result = respond(turn)
            results = [ToolResult(r.call_id, r.tool, r.content + "\ud800", r.ok) for r in result.tool_results]
            return type(result)(**{**result.__dict__, "tool_results": results})

        session.respond = answer
        return session

    episode = collect(native_policy, surrogate)
    assert episode.finish_reason == "answered" and "surrogate code point(s) repaired" in episode.env_error
    assert "\ufffd" in native_policy.tokenizer.decode(episode.tokens)


def test_reasoning_spans_follow_the_parser(native_policy):
    """Only what the parser reads as reasoning (a leading <think> block) is a reasoning span; a <think> the
    parser reads as content stays in the loss."""
    renderer = native_policy.episode_renderer()
    tok = native_policy.tokenizer
    later = tok.encode("Sure <think>x</think>\n" + hermes_text("ANSWER {}"), add_special_tokens=False)
    ids = [*later, renderer.stop_id]
    assert renderer.parser(renderer.decode(ids)).reasoning is None and renderer.reasoning_spans(ids) == []
    two = tok.encode("<think>a</think> text <think>b</think>", add_special_tokens=False) + [renderer.stop_id]
    assert len(renderer.reasoning_spans(two)) == 1 and renderer.reasoning_spans(two)[0][0] == 0
