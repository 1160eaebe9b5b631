"""The rollout engine: token-in/token-out records, masks, finish reasons, environment faults."""

import torch

from rl_core.environments.base import Environment, EnvSession, StepResult, Task
from rl_core.model.generation import Generation
from rl_core.rollout import RolloutSettings, collect_rollouts
from rl_core.trajectory import Sampling

TASK = Task("t1", "scripted", "train", "Solve task one.")


class ScriptedSession(EnvSession):
    def __init__(self, env):
        self.env, self.turns = env, 0

    def step(self, action_text):
        self.env.seen.append(action_text)
        if self.env.fail_times > 0:
            self.env.fail_times -= 1
            raise ConnectionError("tool backend unreachable")
        self.turns += 1
        if action_text.startswith("ANSWER") or self.turns >= self.env.answer_after:
            return StepResult(None, done=True, reward=1.0, reward_components={"field/x": 1.0}, finish_reason="answered")
        return StepResult(f'{{"result": "{self.turns}"}}', tool_name="lookup", tool_ok=True)

    def finish(self):
        return -0.1, {"format_penalty": -0.1}


class ScriptedEnv(Environment):
    name = "scripted"

    def __init__(self, answer_after=3, fail_times=0):
        self.answer_after, self.fail_times, self.seen = answer_after, fail_times, []

    def system_prompt(self):
        return "Use the tools."

    def tasks(self, split):
        return [TASK]

    def start(self, task):
        return ScriptedSession(self)


def scripted_sampler(policy, text='CALL lookup {"id": "1"}', stop=True):
    """A sampler that always answers `text` (+ stop token), cut at each prompt's limit."""
    body = policy.tokenizer.encode(text, add_special_tokens=False) + ([policy.chat.stop_id] if stop else [])
    calls = []

    def sample(keys, prompts, limits, temperature):
        calls.append(len(prompts))
        out = []
        for limit in limits:
            toks = body[:limit]
            out.append(Generation(toks, [-0.25] * len(toks), stopped=bool(toks) and toks[-1] == policy.chat.stop_id))
        return out

    sample.calls = calls
    return sample


def settings(**kw):
    base = dict(max_turns=5, max_tokens_per_turn=32, context_window=400, temperature=1.0, max_retries=2)
    return RolloutSettings(**{**base, **kw})


def test_record_is_token_in_token_out_with_exact_masks(tiny_policy):
    env = ScriptedEnv(answer_after=3)
    sampler = scripted_sampler(tiny_policy)
    [ep] = collect_rollouts(
        tiny_policy, [(env, TASK)], settings(), group_size=1, run_id="r", iteration=1, token_sampler=sampler
    )
    tok, chat = tiny_policy.tokenizer, tiny_policy.chat
    action = tok.encode('CALL lookup {"id": "1"}', add_special_tokens=False) + [chat.stop_id]
    expected = chat.prompt(tok, "Use the tools.", "Solve task one.")
    expected_mask = [0] * len(expected)
    for turn in range(3):
        expected += action
        expected_mask += [1] * len(action)
        if turn < 2:
            obs = chat.observation(tok, f'{{"result": "{turn + 1}"}}')
            expected += obs
            expected_mask += [0] * len(obs)
    assert ep.tokens == expected
    assert ep.loss_mask == expected_mask
    assert ep.behavior_logprobs == [-0.25 if m else 0.0 for m in expected_mask]
    assert ep.finish_reason == "answered" and ep.reward == 1.0 and ep.success
    assert ep.num_turns == 3 and ep.response_tokens == 3 * len(action)
    assert ep.prompt_tokens == len(chat.prompt(tok, "Use the tools.", "Solve task one."))
    assistant = [t for t in ep.turns if t.role == "assistant"]
    for t in assistant:
        assert set(ep.loss_mask[t.start : t.end]) == {1} and t.text == 'CALL lookup {"id": "1"}'
    assert sum(t.end - t.start for t in assistant) == sum(ep.loss_mask)
    assert env.seen == ['CALL lookup {"id": "1"}'] * 3


def test_generation_is_batched_across_all_live_episodes(tiny_policy):
    sampler = scripted_sampler(tiny_policy)
    work = [(ScriptedEnv(answer_after=2), TASK), (ScriptedEnv(answer_after=3), TASK)]
    eps = collect_rollouts(tiny_policy, work, settings(), group_size=4, run_id="r", iteration=1, token_sampler=sampler)
    assert len(eps) == 8
    assert sampler.calls == [8, 8, 4]  # one call per round, holding every live episode
    assert len({e.group_id for e in eps}) == 2 and [e.sample_index for e in eps[:4]] == [0, 1, 2, 3]


def test_max_turns(tiny_policy):
    [ep] = collect_rollouts(
        tiny_policy,
        [(ScriptedEnv(answer_after=99), TASK)],
        settings(max_turns=2),
        group_size=1,
        run_id="r",
        iteration=1,
        token_sampler=scripted_sampler(tiny_policy),
    )
    assert ep.finish_reason == "max_turns" and ep.num_turns == 2 and ep.reward == -0.1 and not ep.success


def test_token_cap(tiny_policy):
    [ep] = collect_rollouts(
        tiny_policy,
        [(ScriptedEnv(), TASK)],
        settings(max_tokens_per_turn=4),
        group_size=1,
        run_id="r",
        iteration=1,
        token_sampler=scripted_sampler(tiny_policy),
    )
    assert ep.finish_reason == "token_cap" and ep.response_tokens == 4 and ep.reward == -0.1


def test_context_overflow(tiny_policy):
    prompt_len = len(tiny_policy.chat.prompt(tiny_policy.tokenizer, "Use the tools.", "Solve task one."))
    [ep] = collect_rollouts(
        tiny_policy,
        [(ScriptedEnv(answer_after=99), TASK)],
        settings(context_window=prompt_len + 30),
        group_size=1,
        run_id="r",
        iteration=1,
        token_sampler=scripted_sampler(tiny_policy),
    )
    assert ep.finish_reason == "context_overflow" and len(ep.tokens) <= prompt_len + 30


def test_transient_environment_fault_is_retried(tiny_policy):
    env = ScriptedEnv(answer_after=1, fail_times=1)
    [ep] = collect_rollouts(
        tiny_policy,
        [(env, TASK)],
        settings(),
        group_size=1,
        run_id="r",
        iteration=1,
        token_sampler=scripted_sampler(tiny_policy),
    )
    assert ep.finish_reason == "answered" and ep.attempts == 2


def test_permanent_environment_fault_is_recorded_not_raised(tiny_policy):
    env = ScriptedEnv(answer_after=1, fail_times=100)
    eps = collect_rollouts(
        tiny_policy,
        [(env, TASK)],
        settings(max_retries=2),
        group_size=2,
        run_id="r",
        iteration=1,
        token_sampler=scripted_sampler(tiny_policy),
    )
    assert [e.finish_reason for e in eps] == ["env_error", "env_error"]
    assert all(e.attempts == 3 and "tool backend unreachable" in e.env_error and not e.success for e in eps)


def test_real_policy_rollout_masks_line_up(tiny_policy):
    """With the real sampler, masks and log-probs line up with the generated spans."""
    eps = collect_rollouts(
        tiny_policy,
        [(ScriptedEnv(answer_after=2), TASK)],
        settings(max_tokens_per_turn=6),
        group_size=3,
        run_id="r",
        iteration=1,
        generator=torch.Generator().manual_seed(0),
    )
    for ep in eps:
        assert len(ep.tokens) == len(ep.loss_mask) == len(ep.behavior_logprobs)
        generated = [i for t in ep.turns if t.role == "assistant" for i in range(t.start, t.end)]
        assert [i for i, m in enumerate(ep.loss_mask) if m] == generated
        assert all(lp < 0 for lp, m in zip(ep.behavior_logprobs, ep.loss_mask) if m)
        assert ep.finish_reason in ("answered", "token_cap")


def test_episodes_record_what_the_sampler_was_asked(tiny_policy):
    tiny_policy.version = 3
    [scripted] = collect_rollouts(
        tiny_policy,
        [(ScriptedEnv(answer_after=1), TASK)],
        settings(temperature=0.7, max_tokens_per_turn=12),
        group_size=1,
        run_id="r",
        iteration=1,
        token_sampler=scripted_sampler(tiny_policy),
        backend="vllm",
    )
    assert scripted.sampling == Sampling(
        temperature=0.7, top_p=1.0, max_tokens_per_turn=12, backend="vllm", policy_version=3
    )
    [unnamed] = collect_rollouts(
        tiny_policy,
        [(ScriptedEnv(answer_after=1), TASK)],
        settings(),
        group_size=1,
        run_id="r",
        iteration=1,
        token_sampler=scripted_sampler(tiny_policy),
    )
    assert unnamed.sampling.backend == "custom"
    [own] = collect_rollouts(
        tiny_policy,
        [(ScriptedEnv(answer_after=1), TASK)],
        settings(temperature=0.0, max_tokens_per_turn=4),
        group_size=1,
        run_id="r",
        iteration=1,
    )
    assert own.sampling == Sampling(temperature=0.0, top_p=1.0, max_tokens_per_turn=4, backend="hf", policy_version=3)
    assert own.policy_version == 3


def test_text_action_turns_carry_no_parse_error_and_count_none(tiny_policy):
    from rl_core.metrics import rollout_metrics

    work = [(ScriptedEnv(answer_after=2), TASK), (ScriptedEnv(answer_after=3), TASK)]
    eps = collect_rollouts(
        tiny_policy,
        work,
        settings(),
        group_size=2,
        run_id="r",
        iteration=1,
        token_sampler=scripted_sampler(tiny_policy),
    )
    assert all(t.parse_error is None for ep in eps for t in ep.turns)
    assert rollout_metrics(eps)["rollout/tool_parse_errors"] == 0.0
