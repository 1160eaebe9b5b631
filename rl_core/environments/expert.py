"""Scripted expert for SOP domains: plays a domain's declarative `procedure` in a live session.

The procedure (domain.json "procedure") is a list of steps, run in order until an answer:

  {"call": tool, "args": {name: value}, "save_as": label}
      call the tool; its observation (a JSON object) is saved under `label`
  {"if": {"ref": value, "op": op, "value": value}, "then": [steps], "else": [steps]}
      op: equals (string compare) | in (`value` is a list) | lte | gte (numeric compare);
      "else" is optional; a branch that does not answer falls through to the next step
  {"answer": {field: value}}
      the final answer; ends the episode

A value is a literal string, or a reference: "$input.<name>" (a task input) or
"$<label>.<field>" (a field of an observation saved earlier).

The expert reads only the task's inputs and the observations the environment returns,
never `task.expected`, so a perfect score checks that a domain's procedure, fixtures and
expected answers agree. With `mistake_rate` > 0 each conditional takes the wrong branch
with that probability (imperfect demonstrations); without an `rng` the draws are seeded by
the task id, so every call is reproducible.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from rl_core.environments.actions import format_answer, format_call
from rl_core.environments.base import EnvSession, Task
from rl_core.environments.sop import SOPEnvironment


class ExpertError(RuntimeError):
    """The procedure cannot be followed on this task (a domain data or procedure bug)."""


@dataclass
class ExpertEpisode:
    """One scripted episode: (action_text, observation_text) per turn; the answer turn's observation is None."""

    task_id: str
    turns: list[tuple[str, str | None]]
    reward: float
    reward_components: dict[str, float]
    success: bool
    mistakes: int = 0

    @property
    def actions(self) -> list[str]:
        return [action for action, _ in self.turns]


def solve(
    env: SOPEnvironment, task: Task, *, mistake_rate: float = 0.0, rng: random.Random | None = None
) -> ExpertEpisode:
    """Play `task` in a fresh session of `env` by following the domain's procedure."""
    if not 0.0 <= mistake_rate <= 1.0:
        raise ValueError(f"mistake_rate must be in [0, 1], got {mistake_rate}")
    player = _Player(env.start(task), task, mistake_rate, rng or random.Random(task.task_id))
    if not player.run(env.domain.procedure):
        raise ExpertError(f"{env.name} procedure ended without an answer on task {task.task_id}")
    reward, components = player.final
    return ExpertEpisode(
        task.task_id, player.turns, reward, components, reward >= env.success_threshold(), player.mistakes
    )


def expert_actions(
    env: SOPEnvironment, task: Task, *, mistake_rate: float = 0.0, rng: random.Random | None = None
) -> list[str]:
    """Just the expert's action texts for `task` (see `solve`)."""
    return solve(env, task, mistake_rate=mistake_rate, rng=rng).actions


@dataclass
class _Player:
    session: EnvSession
    task: Task
    mistake_rate: float
    rng: random.Random
    turns: list[tuple[str, str | None]] = field(default_factory=list)
    saved: dict[str, dict[str, Any]] = field(default_factory=dict)
    final: tuple[float, dict[str, float]] = (0.0, {})
    mistakes: int = 0

    def run(self, steps: list[dict[str, Any]]) -> bool:
        """Run steps in order; True once the episode has been answered."""
        for step in steps:
            if "call" in step:
                self._call(step)
            elif "if" in step:
                branch = step["then"] if self._decide(step["if"]) else step.get("else", [])
                if self.run(branch):
                    return True
            elif "answer" in step:
                self._answer(step["answer"])
                return True
            else:
                raise ExpertError(f"unknown procedure step {step}")
        return False

    def _call(self, step: dict[str, Any]) -> None:
        arguments = {name: self._resolve(value) for name, value in step["args"].items()}
        action = format_call(step["call"], arguments)
        result = self.session.step(action)
        self.turns.append((action, result.observation))
        if not result.tool_ok:
            raise ExpertError(f"task {self.task.task_id}: {action} failed: {result.observation}")
        if "save_as" in step:
            self.saved[step["save_as"]] = json.loads(result.observation)

    def _answer(self, fields: dict[str, str]) -> None:
        action = format_answer({name: self._resolve(value) for name, value in fields.items()})
        result = self.session.step(action)
        self.turns.append((action, result.observation))
        if not result.done:
            raise ExpertError(f"task {self.task.task_id}: answer rejected: {result.observation}")
        self.final = (result.reward, result.reward_components)

    def _decide(self, condition: dict[str, Any]) -> bool:
        outcome = _compare(self._resolve(condition["ref"]), condition["op"], self._resolve(condition["value"]))
        if self.mistake_rate > 0 and self.rng.random() < self.mistake_rate:
            self.mistakes += 1
            return not outcome
        return outcome

    def _resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self._resolve(item) for item in value]
        if not (isinstance(value, str) and value.startswith("$")):
            return value
        label, _, name = value[1:].partition(".")
        source = self.task.inputs if label == "input" else self.saved.get(label)
        if source is None or name not in source:
            raise ExpertError(f"task {self.task.task_id}: reference {value} has no value")
        return source[name]


def _compare(left: Any, op: str, right: Any) -> bool:
    if op == "equals":
        return str(left) == str(right)
    if op == "in":
        return str(left) in [str(item) for item in right]
    if op in ("lte", "gte"):
        try:
            a, b = float(left), float(right)
        except (TypeError, ValueError) as err:
            raise ExpertError(f"{op} needs numbers, got {left!r} and {right!r}") from err
        return a <= b if op == "lte" else a >= b
    raise ExpertError(f"unknown condition op {op!r}")
