"""Expert demonstrations in the policy's own format (the warm start before RL on a real chat model)."""

from __future__ import annotations

import pytest

from rl_core.environments import load_environment
from rl_core.environments.expert import solve
from rl_core.model.demonstrations import expert_demonstrations, native_turn, scripted_token_sampler, turn_ids
from rl_core.model.sft import render_transcript
from rl_core.model.template_renderer import HFTemplateRenderer
from rl_core.rollout import RolloutSettings
from tests.test_native_rollout import hermes_text, native_policy, play  # noqa: F401  (native_policy: a fixture)

SETTINGS = RolloutSettings(max_turns=8, max_tokens_per_turn=400, context_window=4096, temperature=1.0, timeout_s=60.0)


def test_a_text_policy_demonstration_is_the_transcript_the_reference_checkpoint_was_trained_on(tiny_policy):
    env = load_environment("refunds")
    tasks = env.tasks("train")[:3]
    demos = expert_demonstrations(tiny_policy, env, tasks, SETTINGS)
    assert [d.task_id for d in demos] == [t.task_id for t in tasks]
    for demo, task in zip(demos, tasks):
        expert = solve(env, task)
        tokens, mask = render_transcript(tiny_policy, env.system_prompt(), task.prompt, expert.turns)
        assert (demo.tokens, demo.loss_mask) == (tokens, mask)
        assert (demo.finish_reason, demo.reward, demo.sampling.backend) == ("answered", expert.reward, "demonstration")


def test_a_native_policy_demonstration_is_the_expert_as_tool_calls_through_the_chat_template(native_policy):  # noqa: F811
    env = load_environment("inventory")
    tasks = env.tasks("train")[:2]
    demos = expert_demonstrations(native_policy, env, tasks, SETTINGS)
    for demo, task in zip(demos, tasks):
        expert = solve(env, task)
        scripted = play(native_policy, env, task, [hermes_text(a) for a in expert.actions])
        assert demo.tokens == scripted.tokens and demo.loss_mask == scripted.loss_mask
        assert demo.reward == expert.reward and demo.success
        assert all(t.parse_error is None for t in demo.turns)


def test_demonstrations_cut_short_are_left_out(native_policy):  # noqa: F811
    env = load_environment("refunds")
    tight = RolloutSettings(max_turns=1, max_tokens_per_turn=400, context_window=4096, temperature=1.0, timeout_s=60.0)
    assert expert_demonstrations(native_policy, env, env.tasks("train")[:2], tight) == []


def test_turn_ids_write_the_renderer_s_format_and_refuse_what_they_cannot(native_policy, tiny_policy):  # noqa: F811
    renderer = native_policy.episode_renderer()
    ids = turn_ids(native_policy, 'CALL get_order {"order_id": "A1"}')
    assert ids[-1] == renderer.stop_id
    parse = lambda ids: renderer.parser(renderer.decode(ids))  # noqa: E731
    assert [(c.tool, c.arguments) for c in parse(ids).tool_calls] == [("get_order", {"order_id": "A1"})]
    answer = parse(turn_ids(native_policy, 'ANSWER {"decision": "deny", "amount": "0"}'))
    assert [(c.tool, c.arguments) for c in answer.tool_calls] == [
        ("submit_answer", {"decision": "deny", "amount": "0"})
    ]
    text = turn_ids(tiny_policy, "ANSWER {}")
    assert text[-1] == tiny_policy.chat.stop_id
    with pytest.raises(ValueError, match="not a text action"):
        native_turn("hello")
    odd = HFTemplateRenderer(native_policy.tokenizer, lambda text: native_turn("ANSWER {}"), "<|im_end|>")
    with pytest.raises(ValueError, match="no writer"):
        odd.turn_ids(native_turn("ANSWER {}"))


def test_the_scripted_token_sampler_refuses_a_turn_too_many_or_too_long():
    sample = scripted_token_sampler({0: [[5, 6, 2]]})
    [generation] = sample([0], [[1]], [3], 1.0)
    assert (generation.tokens, generation.logprobs, generation.stopped) == ([5, 6, 2], [0.0] * 3, True)
    with pytest.raises(ValueError, match="asked for turn 2; 1 scripted"):
        sample([0], [[1]], [3], 1.0)
    with pytest.raises(ValueError, match="over this turn's limit"):
        scripted_token_sampler({0: [[5, 6, 2]]})([0], [[1]], [2], 1.0)
