"""The context budget measured with the policy's renderer (issue 11, item 5)."""

from __future__ import annotations

import pytest

from rl_core.collector import load_environments
from rl_core.config import load_config
from rl_core.context_budget import ContextBudget, measure_context_budget, prompt_lengths
from rl_core.learner import load_start_policy


@pytest.fixture(scope="module")
def quickstart():
    cfg = load_config("data/configs/quickstart.yaml")
    return cfg, load_start_policy(cfg), load_environments(cfg)


def test_the_batched_prompt_lengths_are_the_rendered_prompts(quickstart):
    cfg, policy, envs = quickstart
    renderer = policy.episode_renderer()
    for env in envs:
        tasks = env.tasks("train")[:40] + env.tasks("heldout")[:40]
        users = [task.prompt for task in tasks]
        expected = [len(renderer.start(env.system_prompt(), [], user).prompt_ids) for user in users]
        assert prompt_lengths(renderer, env.system_prompt(), [], users) == expected


def test_the_quickstart_budget_is_measured_on_its_tasks(quickstart):
    cfg, policy, envs = quickstart
    budget = measure_context_budget(cfg, policy.episode_renderer(), envs)
    everything = [
        (len(policy.episode_renderer().start(env.system_prompt(), [], t.prompt).prompt_ids), f"{env.name}/{t.task_id}")
        for env in envs
        for split in ("train", "heldout")
        for t in env.tasks(split)
    ]
    assert (budget.prompt_tokens, budget.tasks) == (max(everything)[0], len(everything))
    assert budget.prompt_tokens <= cfg.environment.prompt_tokens  # the hand-set cap holds on the shipped tasks
    assert budget.total == 6 * (40 + 40) + budget.prompt_tokens and budget.fits
    assert budget.describe().startswith(
        "context budget: rollout.max_turns * (rollout.max_tokens_per_turn + environment.expected_tool_output) "
        f"+ prompt = 6 * (40 + 40) + {budget.prompt_tokens} = {budget.total} <= policy.context_window (768)"
    )


def test_a_run_whose_measured_budget_does_not_fit_is_refused_before_anything_is_written(tmp_path):
    from rl_core.run import TrainingRun

    # the config's check passes on a hand-set prompt_tokens of 50; the real prompts are longer
    cfg = load_config(
        None, ["environment.prompt_tokens=50", "policy.context_window=560", f"storage.run_dir={tmp_path}"]
    )
    with pytest.raises(ValueError, match=r"= 6 \* \(40 \+ 40\) \+ \d+ = \d+ > policy.context_window \(560\)"):
        TrainingRun(cfg)
    assert list(tmp_path.iterdir()) == []


def test_budget_arithmetic():
    budget = ContextBudget(100, "e/t", 3, 4, 50, 25, 400)
    assert (budget.per_turn, budget.total, budget.fits) == (75, 400, True)
    over = ContextBudget(101, "e/t", 3, 4, 50, 25, 400)
    with pytest.raises(ValueError, match=r"= 401 > policy.context_window \(400\)"):
        over.check()


def test_a_prompt_longer_than_environment_prompt_tokens_is_refused_before_any_episode(tmp_path):
    """The engine would end every episode whose prompt is over environment.prompt_tokens as context_overflow
    before its first turn: the measured budget refuses it and names the setting and the value that fits."""
    from rl_core.run import TrainingRun

    budget = ContextBudget(300, "e/t", 3, 4, 50, 25, 2048, max_prompt_tokens=192)
    assert budget.total <= budget.context_window and budget.prompt_over_limit and not budget.fits
    with pytest.raises(ValueError, match=r"over environment.prompt_tokens \(192\).*at least 300"):
        budget.check()
    assert ContextBudget(192, "e/t", 3, 4, 50, 25, 2048, max_prompt_tokens=192).fits
    cfg = load_config(None, ["environment.prompt_tokens=120", f"storage.run_dir={tmp_path}"])  # quickstart: 171
    with pytest.raises(ValueError, match=r"<= policy.context_window \(768\).*environment.prompt_tokens \(120\)"):
        TrainingRun(cfg)
