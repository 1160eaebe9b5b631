"""The context budget of a run, measured with the policy's renderer on the run's own tasks.

Field practice states the budget of a multi-turn episode as

    max_turns * (max_tokens_per_turn + expected_tool_output) + prompt <= context window

(tokens). The config check (`RunConfig`) can only use the hand-set `environment.prompt_tokens`;
once the policy and the environments are loaded, `measure_context_budget` renders every task's
first prompt exactly as the rollout engine will (the renderer's system prompt, tools and task, and
the opening of the first policy turn: for a chat template, the tool schemas it renders count too)
and uses the longest as `prompt`. `TrainingRun` refuses a run whose measured budget does not fit
(`ContextBudget.check`), and the flow logs the budget line (`ContextBudget.describe`).
"""

from __future__ import annotations

from dataclasses import dataclass

from rl_core.config import RunConfig
from rl_core.environments.base import Environment
from rl_core.model.renderers import Renderer


@dataclass(frozen=True)
class ContextBudget:
    """The measured budget. prompt_tokens: the longest first prompt over the measured tasks (tokens),
    of task `longest_task` ("env/task_id"); tasks: how many were measured; the other fields are the
    config's (`rollout.max_turns`, `rollout.max_tokens_per_turn`, `environment.expected_tool_output`,
    `policy.context_window`, and `environment.prompt_tokens` as `max_prompt_tokens`: the longest prompt an
    episode may start with; None = no such limit)."""

    prompt_tokens: int
    longest_task: str
    tasks: int
    max_turns: int
    max_tokens_per_turn: int
    expected_tool_output: int
    context_window: int
    max_prompt_tokens: int | None = None

    @property
    def per_turn(self) -> int:
        """Tokens budgeted per turn: a policy turn and the environment's answer."""
        return self.max_tokens_per_turn + self.expected_tool_output

    @property
    def total(self) -> int:
        """max_turns * (max_tokens_per_turn + expected_tool_output) + prompt, in tokens."""
        return self.max_turns * self.per_turn + self.prompt_tokens

    @property
    def fits(self) -> bool:
        """The budget fits the context window and the longest prompt fits `max_prompt_tokens`."""
        return self.total <= self.context_window and not self.prompt_over_limit

    @property
    def prompt_over_limit(self) -> bool:
        """The longest prompt is over `environment.prompt_tokens` (the rollout engine would end every such
        episode as context_overflow before its first turn)."""
        return self.max_prompt_tokens is not None and self.prompt_tokens > self.max_prompt_tokens

    def describe(self) -> str:
        """The budget in one line, the way field practice states it (and, when the longest prompt is over
        `environment.prompt_tokens`, what to set)."""
        relation = "<=" if self.total <= self.context_window else ">"
        over = (
            f"; the longest prompt ({self.prompt_tokens} tokens) is over environment.prompt_tokens "
            f"({self.max_prompt_tokens}), so such episodes would end as context_overflow before their first turn: "
            f"set environment.prompt_tokens to at least {self.prompt_tokens}"
            if self.prompt_over_limit
            else ""
        )
        return (
            f"context budget: rollout.max_turns * (rollout.max_tokens_per_turn + environment.expected_tool_output) "
            f"+ prompt = {self.max_turns} * ({self.max_tokens_per_turn} + {self.expected_tool_output}) + "
            f"{self.prompt_tokens} = {self.total} {relation} policy.context_window ({self.context_window}); the prompt "
            f"is the longest of {self.tasks} tasks as the policy's renderer writes it ({self.longest_task}){over}"
        )

    def check(self) -> None:
        """Raise ValueError (the budget line) when the budget does not fit the context window or the longest
        prompt is over `environment.prompt_tokens`."""
        if not self.fits:
            raise ValueError(self.describe())


def prompt_lengths(renderer: Renderer, system: str, tools: list[dict], users: list[str]) -> list[int]:
    """The first prompt's length (tokens) of each task prompt in `users`: the renderer's batched
    `prompt_lengths` when it has one (it must equal `len(start(...).prompt_ids)`), else one `start` each."""
    batched = getattr(renderer, "prompt_lengths", None)
    if batched is not None:
        return batched(system, tools, users)
    return [len(renderer.start(system, tools, user).prompt_ids) for user in users]


def measure_context_budget(cfg: RunConfig, renderer: Renderer, envs: list[Environment]) -> ContextBudget:
    """Render the first prompt of every task of the training split and the evaluation split of `envs` with
    `renderer` (native renderers: `tool_system_prompt` and `tools()`; text ones: `system_prompt`) and
    return the budget with the longest. Raises ValueError when no environment has a task in those splits."""
    longest, where, count = -1, "", 0
    for env in envs:
        system = env.tool_system_prompt() if renderer.native_tools else env.system_prompt()
        tools = env.tools() if renderer.native_tools else []
        tasks = [
            task
            for split in dict.fromkeys((cfg.environment.train_split, cfg.evaluation.split))
            for task in env.tasks(split)
        ]
        count += len(tasks)
        for task, length in zip(tasks, prompt_lengths(renderer, system, tools, [task.prompt for task in tasks])):
            if length > longest:
                longest, where = length, f"{env.name}/{task.task_id}"
    if count == 0:
        raise ValueError("no task to measure the context budget on (every environment's splits are empty)")
    r, e = cfg.rollout, cfg.environment
    return ContextBudget(
        longest,
        where,
        count,
        r.max_turns,
        r.max_tokens_per_turn,
        e.expected_tool_output,
        cfg.policy.context_window,
        e.prompt_tokens,
    )
