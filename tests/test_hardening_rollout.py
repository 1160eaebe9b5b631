"""Hardening of the rollout engine and environment loading (issue 9, items 2, 3, 6, 15, 16).

- 2: no sampler is ever asked for fewer than 1 token; a full context ends only its episode as
  context_overflow.
- 3: a non-finite reward (NaN, +inf, -inf, in the reward or a component) ends its episode as
  env_error with reward 0.0 and a message naming the value.
- 6: environment text that is not valid Unicode is repaired and noted, or (not text at all)
  ends only its episode as env_error; nothing an environment hands over fails the batch.
- 15: environment.prompt_tokens is enforced: a longer prompt ends the episode as context_overflow.
- 16: environments given by class path carry their own constructor arguments; loading is
  checked when the config is built, with errors naming the entry.
"""

from __future__ import annotations

import datetime
import fractions
import io
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from rl_core.collector import load_environments, rollout_settings
from rl_core.config import EnvironmentEntry, RunConfig, dump_config, load_config
from rl_core.environments import load_environment
from rl_core.environments.base import Environment, EnvSession, StepResult, Task
from rl_core.evaluation import evaluate
from rl_core.model.generation import Generation
from rl_core.model.policy import load_policy
from rl_core.model.tokenizer import repair_unicode
from rl_core.rollout import RolloutSettings, collect_rollouts
from rl_core.trajectory import episodes_to_table
from tests.fault_envs import CollapsingDomain, FailingDomain, HalfEmojiDomain, NonFiniteRewardDomain

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "checkpoints" / "reference"


@pytest.fixture(scope="module")
def reference_policy():
    return load_policy(REFERENCE)


# --- scripted environments and sampler ------------------------------------------------------


class _Session(EnvSession):
    """Answers `answer_after` turns with observations, then ends with `reward`/`components`."""

    def __init__(self, env: "_Env", index: int):
        self.env, self.index, self.turns = env, index, 0

    def step(self, action_text):
        self.turns += 1
        if self.turns >= self.env.answer_after:
            reward, components = self.env.outcome(self.index)
            return StepResult(None, done=True, reward=reward, reward_components=components, finish_reason="answered")
        return StepResult(self.env.observation, tool_name=self.env.tool_name, tool_ok=True)

    def finish(self):
        return self.env.outcome(self.index)


class _Env(Environment):
    """A scripted environment whose texts and per-episode outcomes a test sets."""

    def __init__(
        self,
        name="scripted",
        answer_after=2,
        outcomes=None,
        observation='{"ok": "1"}',
        tool_name="lookup",
        system="Use the tools.",
        prompt="Solve task one.",
    ):
        self.name, self.answer_after, self.outcomes = name, answer_after, outcomes or [(1.0, {"field/x": 1.0})]
        self.observation, self.tool_name, self.system, self.prompt = observation, tool_name, system, prompt
        self.started = 0

    def outcome(self, index):
        return self.outcomes[index % len(self.outcomes)]

    def system_prompt(self):
        return self.system

    def tasks(self, split):
        return [Task("t1", self.name, split, self.prompt)]

    def start(self, task):
        self.started += 1
        return _Session(self, self.started - 1)


def _sampler(policy, text='CALL lookup {"id": "1"}'):
    """Always answers `text` + stop, cut at each context's limit; fails the test on a limit < 1."""
    body = policy.tokenizer.encode(text, add_special_tokens=False) + [policy.chat.stop_id]
    seen: list[int] = []

    def sample(keys, contexts, limits, temperature):
        assert min(limits) >= 1, f"sampler asked for {min(limits)} tokens"
        seen.extend(limits)
        out = []
        for limit in limits:
            tokens = body[:limit]
            out.append(Generation(tokens, [-0.5] * len(tokens), stopped=tokens[-1] == policy.chat.stop_id))
        return out

    sample.seen = seen
    return sample


def _settings(**overrides) -> RolloutSettings:
    return RolloutSettings(
        **{**dict(max_turns=4, max_tokens_per_turn=32, context_window=400, temperature=1.0, max_retries=1), **overrides}
    )


def _collect(policy, work, settings=None, group_size=1, sampler=None):
    return collect_rollouts(
        policy,
        work,
        settings or _settings(),
        group_size=group_size,
        run_id="r",
        iteration=1,
        token_sampler=sampler or _sampler(policy),
    )


def _parquet_roundtrip(episodes) -> list[float]:
    """Write the batch as Parquet (as the store does) and read the rewards back."""
    buffer = io.BytesIO()
    pq.write_table(episodes_to_table(episodes), buffer)
    return pq.read_table(io.BytesIO(buffer.getvalue())).column("reward").to_pylist()


# --- item 2: a full context -------------------------------------------------------------------


class _AnswerAtOnce(Environment):
    """A short-prompt environment that takes the first policy turn as the final answer."""

    name = "short"

    def system_prompt(self):
        return "Answer."

    def tasks(self, split):
        return [Task("short-0", self.name, split, "Say anything.")]

    def start(self, task):
        class Session(EnvSession):
            def step(self, action_text):
                return StepResult(
                    None, done=True, reward=1.0, reward_components={"answered": 1.0}, finish_reason="answered"
                )

            def finish(self):
                return 0.0, {}

        return Session()


def test_issue_input_context_filled_exactly_ends_that_episode_and_the_batch_goes_on(reference_policy):
    """The issue's input: refunds-train-0000, reference policy, temperature 0, 40 tokens a turn,
    context window 165, 2 turns. Its first observation ends exactly at the window; the next round
    used to ask the sampler for 0 tokens and `ValueError: every token limit must be >= 1` lost the
    batch. The settings are the issue's config through `rollout_settings`; its
    `environment.prompt_tokens=1` is a prompt budget that item 15 now enforces (it would end every
    episode at its 115-token prompt, tested below), so the budget is lifted here to reach the
    full-context point."""
    cfg = RunConfig.model_validate(
        {
            "policy": {"context_window": 165},
            "environment": {"domains": ["refunds"], "prompt_tokens": 1, "expected_tool_output": 0},
            "rollout": {
                "max_turns": 2,
                "max_tokens_per_turn": 40,
                "temperature": 0.0,
                "group_size": 2,
                "global_batch_size": 2,
            },
        }
    )
    settings = replace(rollout_settings(cfg), max_prompt_tokens=None)
    [refunds] = load_environments(cfg)
    tasks = {task.task_id: task for task in refunds.tasks("train")}
    short = _AnswerAtOnce()
    work = [
        (refunds, tasks["refunds-train-0000"]),
        (short, short.tasks("train")[0]),
        (refunds, tasks["refunds-train-0001"]),
    ]
    episodes = collect_rollouts(reference_policy, work, settings, group_size=2, run_id="r", iteration=1)

    full = episodes[:2]
    for ep in full:  # greedy: both samples are the same episode
        assert ep.finish_reason == "context_overflow"
        assert len(ep.tokens) == 165 and ep.turns[-1].role == "tool" and ep.turns[-1].end == 165
        assert ep.num_turns == 1 and ep.env_error is None
    for ep in episodes[2:4]:  # the others played on in the same batch
        assert ep.finish_reason in ("answered", "token_cap") and ep.num_turns == 1 and ep.response_tokens >= 1
    for ep in episodes[4:]:
        assert ep.num_turns == 1 and ep.response_tokens >= 1 and len(ep.tokens) <= 165
        assert ep.finish_reason == "context_overflow"  # its observation did not fit
    assert all(len(ep.tokens) <= 165 for ep in episodes)


def test_sampler_is_never_asked_for_less_than_one_token_wherever_the_context_fills(tiny_policy):
    """Windows ending exactly after the prompt, inside and at the end of each turn, and exactly
    after each observation: no limit below 1 reaches the sampler, and an episode that cannot
    generate ends as context_overflow within the window."""
    env = _Env(answer_after=3)
    tok, chat = tiny_policy.tokenizer, tiny_policy.chat
    prompt = len(chat.prompt(tok, env.system, env.prompt))
    action = len(tok.encode('CALL lookup {"id": "1"}', add_special_tokens=False)) + 1
    observation = len(chat.observation(tok, env.observation))
    full = prompt + 3 * action + 2 * observation  # the whole answered episode
    for window in range(prompt - 1, full + 2):
        sampler = _sampler(tiny_policy)
        [ep] = _collect(tiny_policy, [(env, env.tasks("train")[0])], _settings(context_window=window), sampler=sampler)
        assert len(ep.tokens) <= max(window, prompt)  # a prompt longer than the window is kept whole
        if window < full:
            assert ep.finish_reason == "context_overflow", window
        else:
            assert ep.finish_reason == "answered" and len(ep.tokens) == full, window
        if window <= prompt:
            assert sampler.seen == [] and ep.response_tokens == 0
    # the ends of the context the issue names, each filled exactly
    for window in (prompt, prompt + action, prompt + action + observation, prompt + 2 * (action + observation)):
        sampler = _sampler(tiny_policy)
        [ep] = _collect(tiny_policy, [(env, env.tasks("train")[0])], _settings(context_window=window), sampler=sampler)
        assert ep.finish_reason == "context_overflow" and len(ep.tokens) <= window and min(sampler.seen, default=1) >= 1


def test_rollout_settings_reject_limits_below_one():
    for field in ("max_turns", "max_tokens_per_turn", "context_window", "max_prompt_tokens"):
        with pytest.raises(ValueError, match=f"RolloutSettings.{field}"):
            _settings(**{field: 0})
    with pytest.raises(ValueError, match="RolloutSettings.temperature"):
        _settings(temperature=math.nan)


# --- item 3: non-finite rewards ---------------------------------------------------------------


def test_non_finite_reward_in_one_episode_of_four_is_an_env_error_of_that_episode(tiny_policy):
    env = _Env(
        answer_after=2,
        outcomes=[(1.0, {"field/x": 1.0}), (math.nan, {"field/x": 0.5}), (0.5, {"field/x": 0.5}), (0.0, {})],
    )
    episodes = _collect(tiny_policy, [(env, env.tasks("train")[0])], group_size=4)
    assert [ep.finish_reason for ep in episodes] == ["answered", "env_error", "answered", "answered"]
    assert [ep.reward for ep in episodes] == [1.0, 0.0, 0.5, 0.0]
    bad = episodes[1]
    assert bad.env_error == "environment returned a non-finite reward: nan"
    assert bad.reward_components == {} and not bad.success and bad.num_turns == 2
    assert all(math.isfinite(r) for r in _parquet_roundtrip(episodes))


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_reward_component_is_an_env_error_naming_it(tiny_policy, value):
    env = _Env(answer_after=1, outcomes=[(1.0, {"field/x": 1.0}), (1.0, {"field/x": 1.0, "field/y": value})])
    good, bad = _collect(tiny_policy, [(env, env.tasks("train")[0])], group_size=2)
    assert good.finish_reason == "answered" and good.reward == 1.0 and good.reward_components == {"field/x": 1.0}
    assert bad.finish_reason == "env_error" and bad.reward == 0.0 and bad.reward_components == {}
    assert bad.env_error == f"environment returned a non-finite reward component 'field/y': {value}"
    assert all(math.isfinite(r) for r in _parquet_roundtrip([good, bad]))


def test_non_finite_score_of_a_cut_off_episode_is_an_env_error(tiny_policy):
    """finish() (max_turns, token cap, overflow) is checked like step()'s final reward."""
    env = _Env(answer_after=99, outcomes=[(-math.inf, {"format_penalty": -0.1})])
    [ep] = _collect(tiny_policy, [(env, env.tasks("train")[0])], _settings(max_turns=2))
    assert ep.finish_reason == "env_error" and ep.reward == 0.0 and ep.num_turns == 2
    assert ep.env_error == "environment returned a non-finite reward: -inf"


class _FloatRaises:
    def __float__(self):
        raise RuntimeError("the reward service is down")


@pytest.mark.parametrize(
    "outcome, message",
    [
        (("1.0", {}), "environment returned a reward that is not a number: '1.0'"),
        ((None, {}), "environment returned a reward that is not a number: None"),
        ((1.0, [("field/x", 1.0)]), "reward_components of type list"),
        ((1.0, {"field/x": "high"}), "reward component 'field/x' that is not a number"),
        # beyond every float (float() raises OverflowError): as good as inf
        ((10**400, {}), "non-finite reward: 1000"),
        ((1.0, {"field/x": -fractions.Fraction(10**400, 3)}), "non-finite reward component 'field/x'"),
        # a number type of the environment's whose conversion raises something else
        ((_FloatRaises(), {}), "reward that is not a number"),
    ],
)
def test_rewards_that_are_not_numbers_are_env_errors(tiny_policy, outcome, message):
    env = _Env(answer_after=1, outcomes=[outcome])
    [ep] = _collect(tiny_policy, [(env, env.tasks("train")[0])])
    assert ep.finish_reason == "env_error" and ep.reward == 0.0 and message in ep.env_error


class _Answers(Environment):
    """Answers every policy turn with `result`."""

    name = "answers"

    def __init__(self, result):
        self.result = result

    def system_prompt(self):
        return "Answer."

    def tasks(self, split):
        return [Task("a-0", self.name, split, "Go.")]

    def start(self, task):
        result = self.result

        class Session(EnvSession):
            def step(self, action_text):
                return result

            def finish(self):
                return 0.0, {}

        return Session()


@pytest.mark.parametrize(
    "result, message",
    [
        (StepResult('{"ok": 1}', tool_ok=np.array([True, False])), "tool_ok that is not a truth value"),
        (StepResult('{"ok": 1}', done=np.array([True, False])), "done that is not a truth value"),
        (
            StepResult(None, done=True, reward=1.0, finish_reason=np.array(["answered", "answered"])),
            "finish_reason array(",
        ),
    ],
)
def test_step_fields_the_engine_cannot_read_end_only_that_episode(tiny_policy, result, message):
    """A numpy array where a flag or a finish reason belongs used to raise `ValueError: The truth
    value of an array ... is ambiguous` out of collect_rollouts."""
    bad, good = _Answers(result), _Env(name="good", answer_after=1)
    episodes = _collect(tiny_policy, [(bad, bad.tasks("train")[0]), (good, good.tasks("train")[0])])
    assert [ep.finish_reason for ep in episodes] == ["env_error", "answered"]
    assert message in episodes[0].env_error


def test_non_finite_reward_domain_one_in_four(reference_policy):
    """The fault environment the flow tests use: every 4th refunds episode ends with reward NaN."""
    env = NonFiniteRewardDomain("refunds", every=4)
    task = env.tasks("train")[0]
    episodes = collect_rollouts(
        reference_policy,
        [(env, task)],
        _settings(max_turns=3, max_tokens_per_turn=40, context_window=768, temperature=0.0),
        group_size=8,
        run_id="r",
        iteration=1,
    )
    assert [ep.finish_reason == "env_error" for ep in episodes] == [False, False, False, True] * 2
    assert all("non-finite reward: nan" in ep.env_error for ep in episodes[3::4])
    assert all(math.isfinite(r) for r in _parquet_roundtrip(episodes))


# --- item 6: text that is not valid Unicode --------------------------------------------------


def test_repair_unicode():
    assert repair_unicode("plain") == ("plain", 0)
    assert repair_unicode("half \ud83d") == ("half \ufffd", 1)
    assert repair_unicode("\ud83d\ude00") == ("\U0001f600", 2)  # a split pair is joined
    assert repair_unicode("\ude00\ud83d") == ("\ufffd\ufffd", 2)
    with pytest.raises(TypeError):
        repair_unicode(b"bytes")


@pytest.mark.parametrize("where", ["observation", "tool_name", "system", "prompt"])
def test_lone_surrogate_from_the_environment_is_repaired_and_noted(tiny_policy, where):
    bad = _Env(answer_after=2, **{where: "half an emoji \ud83d"})
    good = _Env(name="good", answer_after=2)
    episodes = _collect(tiny_policy, [(bad, bad.tasks("train")[0]), (good, good.tasks("train")[0])], group_size=2)
    assert [ep.finish_reason for ep in episodes] == ["answered"] * 4
    label = {
        "observation": "observation after policy turn 1",
        "tool_name": "tool name after policy turn 1",
        "system": "system prompt",
        "prompt": "task prompt",
    }[where]
    for ep in episodes[:2]:
        assert ep.env_error.startswith(f"{label} was not valid Unicode: 1 surrogate code point(s) repaired")
        texts = [t.text for t in ep.turns] + [t.tool_name or "" for t in ep.turns]
        assert any("half an emoji \ufffd" in text for text in texts)
        assert all(repair_unicode(text)[1] == 0 for text in texts)
    assert all(ep.env_error is None for ep in episodes[2:])
    assert len(_parquet_roundtrip(episodes)) == 4  # the batch is writable


@pytest.mark.parametrize(
    "where, value", [("observation", {"result": 1}), ("tool_name", 7), ("system", None), ("prompt", b"bytes")]
)
def test_environment_text_that_is_not_a_string_ends_only_that_episode(tiny_policy, where, value):
    bad = _Env(answer_after=2, **{where: value})
    good = _Env(name="good", answer_after=2)
    episodes = _collect(tiny_policy, [(bad, bad.tasks("train")[0]), (good, good.tasks("train")[0])])
    assert [ep.finish_reason for ep in episodes] == ["env_error", "answered"]
    assert f"must be a str, got {type(value).__name__}" in episodes[0].env_error
    assert len(_parquet_roundtrip(episodes)) == 2


def test_identifiers_that_are_not_valid_unicode_still_give_a_writable_row(tiny_policy):
    env = _Env(name="env\udc80", answer_after=1)
    [ep] = _collect(tiny_policy, [(env, Task("task\ud800", env.name, "train", "Solve."))])
    assert ep.env_name == "env\ufffd" and ep.task_id == "task\ufffd" and "\ud800" not in ep.group_id
    assert "environment name was not valid Unicode" in ep.env_error and ep.finish_reason == "answered"
    assert len(_parquet_roundtrip([ep])) == 1


class _RaisesText(_Env):
    """Its sessions raise exceptions whose messages hold lone surrogates (a tool's error text): in
    `step` when `in_step`, else in `finish` (the step answers an observation)."""

    def __init__(self, in_step: bool):
        super().__init__(name="raises")
        self.in_step = in_step

    def start(self, task):
        in_step = self.in_step

        class Session(EnvSession):
            def step(self, action_text):
                if in_step:
                    raise ValueError("tool answered \ud83d")
                return StepResult('{"ok": "1"}')

            def finish(self):
                raise ValueError("scorer answered \udc00")

        return Session()


@pytest.mark.parametrize(
    "in_step, message", [(True, "ValueError: tool answered \ufffd"), (False, "ValueError: scorer answered \ufffd")]
)
def test_environment_exception_text_that_is_not_valid_unicode_gives_a_writable_row(tiny_policy, in_step, message):
    """The env_error column quotes the environment's exception; a lone surrogate in it used to fail
    the Parquet write of the whole batch."""
    bad, good = _RaisesText(in_step), _Env(name="good", answer_after=1)
    episodes = _collect(
        tiny_policy, [(bad, bad.tasks("train")[0]), (good, good.tasks("train")[0])], _settings(max_turns=1)
    )
    assert [ep.finish_reason for ep in episodes] == ["env_error", "answered"]
    assert episodes[0].env_error == message
    assert len(_parquet_roundtrip(episodes)) == 2


class _Nameless(_Env):
    """An environment that never sets `name` (the ABC only annotates it)."""

    def __init__(self):
        super().__init__()
        del self.name

    def tasks(self, split):
        return [Task("t1", "nameless", split, self.prompt)]


def test_environment_without_a_name_ends_only_its_episodes(tiny_policy):
    bad, good = _Nameless(), _Env(name="good", answer_after=1)
    episodes = _collect(tiny_policy, [(bad, bad.tasks("train")[0]), (good, good.tasks("train")[0])])
    assert [(ep.env_name, ep.finish_reason) for ep in episodes] == [("_Nameless", "env_error"), ("good", "answered")]
    assert episodes[0].env_error.startswith("environment name could not be read: AttributeError")
    assert bad.started == 0 and len(_parquet_roundtrip(episodes)) == 2
    cfg = RunConfig.model_validate({"environment": {"domains": ["access", "tests.test_hardening_rollout:_Nameless"]}})
    with pytest.raises(
        ValueError,
        match=r"environment.domains\[1\] \('tests.test_hardening_rollout:_Nameless'\) built an environment "
        r"whose `name` is None",
    ):
        load_environments(cfg)


def test_evaluation_survives_an_environment_with_a_lone_surrogate(reference_policy):
    """The evaluation path plays through the same rollout code (the issue: the step-0 evaluation
    failed three times on a tool answer holding "\\ud83d")."""
    broken, healthy = HalfEmojiDomain("refunds"), load_environment("access")
    settings = _settings(max_turns=3, max_tokens_per_turn=40, context_window=768)
    report = evaluate(reference_policy, [broken, healthy], settings, split="heldout", max_tasks=2)
    assert set(report.per_env) == {"refunds", "access"}
    episodes = collect_rollouts(
        reference_policy,
        [(broken, broken.tasks("heldout")[0])],
        replace(settings, temperature=0.0),
        group_size=1,
        run_id="eval",
        iteration=0,
    )
    tool_turns = [turn for turn in episodes[0].turns if turn.role == "tool"]
    assert tool_turns and all(turn.text.endswith(" \ufffd") for turn in tool_turns)
    assert "was not valid Unicode" in episodes[0].env_error and episodes[0].finish_reason != "env_error"


# --- item 15: environment.prompt_tokens is enforced -------------------------------------------


def test_prompt_longer_than_the_budget_ends_as_context_overflow(tiny_policy):
    env = _Env(answer_after=1)
    prompt = len(tiny_policy.chat.prompt(tiny_policy.tokenizer, env.system, env.prompt))
    sampler = _sampler(tiny_policy)
    [over] = _collect(
        tiny_policy, [(env, env.tasks("train")[0])], _settings(max_prompt_tokens=prompt - 1), sampler=sampler
    )
    assert over.finish_reason == "context_overflow" and over.response_tokens == 0 and over.prompt_tokens == prompt
    assert sampler.seen == []
    [fits] = _collect(tiny_policy, [(env, env.tasks("train")[0])], _settings(max_prompt_tokens=prompt))
    assert fits.finish_reason == "answered"


def test_issue_input_prompt_tokens_8_ends_every_episode_at_its_prompt(reference_policy):
    """The issue: with prompt_tokens=8, domains whose prompts are 115 tokens ran normally."""
    cfg = load_config(None, ["environment.prompt_tokens=8", "environment.domains=[refunds]"])
    settings = rollout_settings(cfg)
    assert settings.max_prompt_tokens == 8
    [env] = load_environments(cfg)
    episodes = collect_rollouts(
        reference_policy, [(env, t) for t in env.tasks("train")[:2]], settings, group_size=2, run_id="r", iteration=1
    )
    assert [ep.finish_reason for ep in episodes] == ["context_overflow"] * 4
    assert all(ep.response_tokens == 0 and ep.prompt_tokens == 115 for ep in episodes)
    assert (
        "context_overflow" in RunConfig.model_fields["environment"].annotation.model_fields["prompt_tokens"].description
    )


def test_quickstart_prompt_budget_holds_every_shipped_prompt(reference_policy):
    """The quickstart keeps working: every shipped prompt fits environment.prompt_tokens."""
    cfg = load_config()
    longest = max(
        len(reference_policy.chat.prompt(reference_policy.tokenizer, env.system_prompt(), task.prompt))
        for env in load_environments(cfg)
        for split in ("train", "heldout")
        for task in env.tasks(split)
    )
    assert 150 < longest <= cfg.environment.prompt_tokens


# --- item 16: environment arguments per environment -------------------------------------------


TWO_ENVS = [
    {"name": "tests.fault_envs:FailingDomain", "kwargs": {"domain": "refunds", "fail_every": 1000}},
    {"name": "tests.fault_envs:CollapsingDomain", "kwargs": {"domain": "inventory", "healthy_episodes": 5}},
]


def test_two_class_path_environments_with_their_own_arguments_load_and_run(reference_policy, tmp_path):
    cfg = RunConfig.model_validate({"environment": {"domains": TWO_ENVS}})
    assert cfg.environment.domains == [EnvironmentEntry(**entry) for entry in TWO_ENVS]
    failing, collapsing = load_environments(cfg)
    assert isinstance(failing, FailingDomain) and (failing.name, failing.fail_every) == ("refunds", 1000)
    assert isinstance(collapsing, CollapsingDomain) and (collapsing.name, collapsing.healthy_episodes) == (
        "inventory",
        5,
    )
    work = [(env, env.tasks("train")[0]) for env in (failing, collapsing)]
    episodes = collect_rollouts(
        reference_policy, work, replace(rollout_settings(cfg), max_turns=2), group_size=1, run_id="r", iteration=1
    )
    assert [ep.env_name for ep in episodes] == ["refunds", "inventory"]
    assert all(ep.finish_reason != "env_error" and ep.num_turns >= 1 for ep in episodes)
    # the config file round-trips, mapping entries included
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_plain_class_path_entries_still_take_env_kwargs():
    cfg = load_config(
        None,
        [
            "environment.domains=['tests.fault_envs:FailingDomain', access]",
            "environment.env_kwargs={domain: refunds, fail_every: 20}",
        ],
    )
    assert cfg.environment.entries() == [
        ("tests.fault_envs:FailingDomain", {"domain": "refunds", "fail_every": 20}),
        ("access", {}),
    ]
    failing, access = load_environments(cfg)
    assert failing.fail_every == 20 and access.name == "access"


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            {"name": "tests.fault_envs:CollapsingDomain", "kwargs": {"domain": "inventory", "fail_every": 3}},
            "unexpected keyword argument 'fail_every'",
        ),
        ({"name": "tests.fault_envs:NoSuchClass"}, "has no attribute 'NoSuchClass'"),
        ({"name": "tests.no_such_module:Env"}, "cannot import module 'tests.no_such_module'"),
        ({"name": "refunds", "kwargs": {"fail_every": 3}}, "built-in domain 'refunds' takes no keyword arguments"),
        ("refundz", "unknown environment 'refundz'"),
        # imports, is an Environment, accepts the arguments, but cannot be instantiated
        ("tests.test_hardening_rollout:NoStart", "NoStart is abstract: it does not implement ['start']"),
        (
            {"name": "tests.test_hardening_rollout:Named", "kwargs": {"name": "x", "domains_dir": "/data"}},
            "'domains_dir' cannot reach an environment class",
        ),
    ],
)
def test_bad_environment_entry_is_named_when_the_config_is_built(entry, message):
    with pytest.raises(ValidationError) as error:
        RunConfig.model_validate({"environment": {"domains": [TWO_ENVS[0], entry]}})
    assert "environment.domains[1]" in str(error.value) and message in str(error.value)


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            {"name": "tests.fault_envs:CollapsingDomain", "kwarg": {"domain": "inventory"}},
            "environment.domains[1]: a mapping entry takes the keys name and kwargs, got unknown key(s) ['kwarg']",
        ),
        ({"kwargs": {"domain": "inventory"}}, "environment.domains[1]: a mapping entry needs name"),
        (
            {"name": "tests.fault_envs:CollapsingDomain", "kwargs": ["inventory"]},
            "environment.domains[1] ('tests.fault_envs:CollapsingDomain'): kwargs must be a mapping",
        ),
        (3, "environment.domains[1]: an entry is a domain name, a 'package.module:Class' path or a mapping"),
    ],
)
def test_misshapen_environment_entry_is_refused_in_one_line_naming_it(entry, message):
    """A mapping with a misspelt key, without a name or with non-mapping kwargs, or an entry that is
    neither text nor a mapping: one error naming environment.domains[i], not one per union member."""
    import flows.cli

    with pytest.raises(ValidationError) as error:
        RunConfig.model_validate({"environment": {"domains": [TWO_ENVS[0], entry]}})
    assert len(error.value.errors()) == 1
    line = flows.cli.config_error_line(error.value)
    assert line.startswith(message) and ".str" not in line and "EnvironmentEntry" not in line


class NoStart(Environment):
    """An Environment subclass that forgot `start`."""

    name = "no-start"

    def system_prompt(self):
        return "Answer."

    def tasks(self, split):
        return []


class NeedsURL(_Env):
    """A user environment with a required constructor argument."""

    def __init__(self, url: str):
        super().__init__(name=url)


def test_missing_constructor_argument_is_named():
    with pytest.raises(ValidationError, match=r"environment.domains\[0\].*missing a required argument: 'url'"):
        RunConfig.model_validate({"environment": {"domains": ["tests.test_hardening_rollout:NeedsURL"]}})
    cfg = RunConfig.model_validate(
        {"environment": {"domains": ["tests.test_hardening_rollout:NeedsURL"], "env_kwargs": {"url": "http://x"}}}
    )
    assert [env.name for env in load_environments(cfg)] == ["http://x"]


def test_environments_that_cannot_be_built_or_share_a_name_are_named():
    broken = RunConfig.model_validate(
        {
            "environment": {
                "domains": ["access", {"name": "tests.fault_envs:FailingDomain", "kwargs": {"domain": "nope"}}]
            }
        }
    )
    with pytest.raises(
        ValueError,
        match=r"environment.domains\[1\] \('tests.fault_envs:FailingDomain'\) could not be built: ValueError: "
        r"unknown environment 'nope'",
    ):
        load_environments(broken)
    twice = RunConfig.model_validate(
        {
            "environment": {
                "domains": ["refunds", {"name": "tests.fault_envs:FailingDomain", "kwargs": {"domain": "refunds"}}]
            }
        }
    )
    with pytest.raises(
        ValueError,
        match=r"environment.domains\[0\] and environment.domains\[1\] both build an environment named 'refunds'",
    ):
        load_environments(twice)


def test_turnstile_train_refuses_a_bad_entry_in_one_line_before_starting_prefect(tmp_path, capsys):
    import flows.cli

    bad = (
        "environment.domains=[{name: 'tests.fault_envs:FailingDomain', kwargs: {domain: refunds}}, "
        "{name: 'tests.fault_envs:CollapsingDomain', kwargs: {domain: inventory, fail_every: 3}}]"
    )
    run_dir = tmp_path / "runs"
    assert flows.cli.main(["train", "--set", bad, "--set", f"storage.run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert (
        err.startswith("turnstile: bad config: environment.domains[1] ('tests.fault_envs:CollapsingDomain')")
        and "fail_every" in err
    )
    assert not run_dir.exists()  # nothing was prepared: no Prefect home, no run folder


def test_mapping_entries_are_logged_as_params_that_rebuild_the_config():
    from rl_core.config import apply_overrides
    from tasks.tracking import flatten_config

    cfg = RunConfig.model_validate({"environment": {"domains": ["access", *TWO_ENVS]}})
    params = flatten_config(cfg)
    assert json.loads(params["environment.domains"]) == ["access", *TWO_ENVS]
    assert RunConfig.model_validate(apply_overrides({}, [f"{key}={value}" for key, value in params.items()])) == cfg


class Named(_Env):
    """A user environment whose constructor takes `name` (load_environment's first parameter) and
    a typed value (a date, as YAML reads `2024-01-01`)."""

    def __init__(self, name: str, start: datetime.date | None = None, **options):
        super().__init__(name=name)
        self.start_date, self.options = start, options


def test_a_constructor_argument_called_name_reaches_the_class():
    """`name` used to collide with load_environment(name, ...): TypeError 'got multiple values for
    argument name' after the config check had passed."""
    cfg = RunConfig.model_validate(
        {
            "environment": {
                "domains": [
                    {
                        "name": "tests.test_hardening_rollout:Named",
                        "kwargs": {"name": "first", "start": datetime.date(2024, 1, 1)},
                    },
                    {"name": "tests.test_hardening_rollout:Named", "kwargs": {"name": "second"}},
                ]
            }
        }
    )
    first, second = load_environments(cfg)
    assert (first.name, first.start_date, second.name, second.start_date) == (
        "first",
        datetime.date(2024, 1, 1),
        "second",
        None,
    )
    assert load_environment("tests.test_hardening_rollout:Named", None, name="direct").name == "direct"


def test_typed_yaml_arguments_survive_the_run_config_so_the_run_can_continue(tmp_path):
    """A date argument was written to config.yaml as its ISO text: the same config then no longer
    matched the run's (`turnstile train` refused to continue it) and a resumed run built the
    environment with a str."""
    from rl_core.runs.folder import load_run_config, record_run_config

    path = tmp_path / "config.yaml"
    path.write_text(
        "environment:\n"
        "  domains:\n"
        "    - {name: 'tests.test_hardening_rollout:Named', kwargs: {name: dated, start: 2024-01-01}}\n"
        "    - tests.test_hardening_rollout:Named\n"
        "  env_kwargs: {name: plain, start: 2023-12-31}\n"
    )
    cfg = load_config(path)
    assert cfg.environment.domains[0].kwargs["start"] == datetime.date(2024, 1, 1)
    run_dir = tmp_path / "run"
    record_run_config(cfg, run_dir)
    record_run_config(cfg, run_dir)  # the same config again: accepted
    stored = load_run_config(run_dir)
    assert stored == cfg and stored.environment.env_kwargs["start"] == datetime.date(2023, 12, 31)
    assert [env.start_date for env in load_environments(stored)] == [
        datetime.date(2024, 1, 1),
        datetime.date(2023, 12, 31),
    ]


def test_rescoring_finds_tasks_whose_ids_were_repaired_and_checks_replayed_rewards(tiny_policy):
    """Rows store a task id holding a lone surrogate repaired (U+FFFD); re-scoring looked the stored
    id up among the environment's raw ids and failed the whole re-scoring. A replayed reward
    component that is not finite is an environment fault there too, as in a rollout."""
    from rl_core.replay.scoring import TaskCatalog, load_scorer

    cfg = RunConfig.model_validate(
        {"environment": {"domains": [{"name": "tests.fault_envs:SurrogateIdDomain", "kwargs": {"domain": "refunds"}}]}}
    )
    catalog = TaskCatalog(cfg)
    env = catalog.environment("refunds")
    raw = env.tasks("train")[0]
    [episode] = _collect(tiny_policy, [(env, raw)], _settings(max_turns=2))
    assert episode.task_id == raw.task_id[:-1] + "\ufffd"
    assert catalog.task(episode) == raw
    assert load_scorer("environment", catalog)(episode, raw) == episode.reward

    spoiled = NonFiniteRewardDomain("refunds", every=1, value="nan", component="field/decision")
    task = spoiled.tasks("train")[0]
    [episode] = _collect(tiny_policy, [(load_environment("refunds"), task)], _settings(max_turns=2))
    catalog.environments = {"refunds": spoiled}
    with pytest.raises(ValueError, match="non-finite reward component 'field/decision': nan"):
        load_scorer("environment", catalog)(episode, task)
