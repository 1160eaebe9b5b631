"""The environment interface every Turnstile environment implements.

An `Environment` owns a set of tasks and a system prompt; `start(task)` opens an
`EnvSession` for one episode. The rollout engine hands the session each policy turn and gets
back a `StepResult`: either an observation to show the policy (the episode goes on) or
`done=True` with the final reward. A turn arrives in one of two forms:
- as text (`EnvSession.step(action_text)`), in Turnstile's action format (`CALL tool {...}` /
  `ANSWER {...}`, rl_core/environments/actions.py);
- as a structured message (`EnvSession.respond(turn)`, an `AssistantTurn` with parsed tool calls,
  rl_core/environments/messages.py), for chat models that call tools natively: the environment
  describes its tools as JSON schemas (`Environment.tools()`) and answers each call with a
  `ToolResult` (`StepResult.tool_results`). The default `respond` adapts a structured turn to
  `step`, so a text-format environment needs nothing more.

Contract for implementers (including user environments loaded by class path):
- `step` must not raise for bad policy output; malformed actions become error
  observations. An exception from `step` is treated as an environment fault: the rollout
  engine retries the same step and records `env_error` when retries run out.
- `finish()` scores an episode that ended without the environment saying done
  (max turns, token cap, context overflow); it must not raise either.
- Rewards are finite floats; `reward_components` holds their logged parts (str -> finite
  float). A reward or component that is NaN, +inf, -inf or not a number is an environment
  fault: the episode ends as `env_error` with reward 0.0 and is never trained on.
- Texts (system prompt, task prompt, observation, tool name) are `str`; anything else ends
  the episode as `env_error`. Text that is not valid Unicode (lone UTF-16 surrogates) is
  repaired (U+FFFD) and the repair noted in the episode's `env_error` column.
- `name` is a non-empty str (set on the class or in the constructor): episodes, metrics and
  re-scoring are keyed by it. An environment without one is refused by `load_environments`,
  and its episodes end as `env_error` in a rollout.
- An environment is built from its config entry's keyword arguments
  (`environment.domains[i].kwargs`); the constructor's signature is checked against them when
  the config is built, so give it named parameters rather than `**kwargs` where you can.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from rl_core.environments.messages import AssistantTurn, ToolResult, respond_through_text


@dataclass(frozen=True)
class Task:
    """One prompt the policy must solve. `expected` is the reference output (may be empty)."""

    task_id: str
    env_name: str
    split: str
    prompt: str
    inputs: dict[str, Any] = field(default_factory=dict)
    expected: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    """What the environment answers to one policy turn.

    observation: text to show the policy next (None when done).
    done: the episode is over; `reward`/`reward_components` are final.
    finish_reason: when done, why (`answered` for a final answer, `parse_error` if the
        environment gives up on unparseable output).
    tool_name / tool_ok: the tool the turn called, and whether the call succeeded.
    tool_results: for a structured turn (`EnvSession.respond`), one result per tool call, in
        call order (empty for a text turn, or when the turn called no tool).
    """

    observation: str | None
    done: bool = False
    reward: float = 0.0
    reward_components: dict[str, float] = field(default_factory=dict)
    finish_reason: str | None = None
    tool_name: str | None = None
    tool_ok: bool | None = None
    tool_results: list[ToolResult] = field(default_factory=list)


class EnvSession(ABC):
    """State of one episode inside an environment."""

    @abstractmethod
    def step(self, action_text: str) -> StepResult:
        """Apply one policy turn (its decoded text) and return the environment's answer."""

    @abstractmethod
    def finish(self) -> tuple[float, dict[str, float]]:
        """Reward and components for an episode cut off before a final answer."""

    def respond(self, turn: AssistantTurn) -> StepResult:
        """Apply one policy turn given as a structured message (text, reasoning, parsed tool calls) and
        return the environment's answer, with one `ToolResult` per tool call. Must not raise for bad
        policy output (same contract as `step`). Default: the text adapter `respond_through_text`."""
        return respond_through_text(self, turn)


class Environment(ABC):
    """A family of tasks sharing tools and a system prompt."""

    name: str

    @abstractmethod
    def system_prompt(self) -> str:
        """Text shown to the policy before the task (procedure, tools, answer format)."""

    @abstractmethod
    def tasks(self, split: str) -> list[Task]:
        """Tasks of a split (`train` or `heldout`), in a stable order."""

    @abstractmethod
    def start(self, task: Task) -> EnvSession:
        """Open a fresh session for one episode of `task`."""

    def tools(self) -> list[dict[str, Any]]:
        """The tools a policy may call natively, as OpenAI function schemas
        ([{"type": "function", "function": {"name", "description", "parameters"}}]); [] for an
        environment that only speaks the text action format."""
        return []

    def tool_system_prompt(self) -> str:
        """The system prompt for a policy that calls `tools()` natively (the chat template renders the
        tools, so the text action syntax is left out). Default: `system_prompt()`."""
        return self.system_prompt()

    def success_threshold(self) -> float:
        """Reward at or above which an episode counts as a success."""
        return 1.0
