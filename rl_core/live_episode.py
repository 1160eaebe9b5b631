"""An episode being played by the rollout engine, and the checks on what its environment hands over.

`LiveEpisode` holds the growing token record of one episode (tokens, loss mask, the token
token sampler's log-probs, turns) and ends it: `end` accepts the environment's reward and components
only as finite real numbers, `text` accepts environment text only as a `str` (repairing invalid
Unicode, the repair noted). An answer the engine cannot use raises `EnvFault`, which ends the
episode as env_error without a retry. The rules are those of rollout.py's module docstring.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from rl_core.environments.base import Environment, EnvSession, StepResult, Task
from rl_core.model.renderers import Conversation
from rl_core.model.tokenizer import repair_unicode
from rl_core.trajectory import Turn


class EnvFault(Exception):
    """An environment answer the engine cannot use (wrong type, non-finite reward): not retried."""


@dataclass
class LiveEpisode:
    """One episode while it is played: its environment session and its growing token record.

    `tokens`, `loss_mask` (1 on generated ids) and `logprobs` (the token sampler's, 0 elsewhere)
    grow together through `append`; `turns` index spans of `tokens`. `finish_reason` is None
    while the episode is live and set once by `end` / `fail`; `attempts` is the most tries any
    environment call needed; `repairs` notes environment text made valid Unicode.
    """

    env: Environment
    task: Task
    session: EnvSession
    group_id: str
    sample_index: int
    tokens: list[int]
    turns: list[Turn]
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    attempts: int = 1
    finish_reason: str | None = None
    reward: float = 0.0
    components: dict[str, float] = field(default_factory=dict)
    env_error: str | None = None
    env_name: str = ""  # the environment's name as valid text (read when the episode opens)
    repairs: list[str] = field(default_factory=list)  # environment text made valid Unicode
    conversation: Conversation | None = None  # how this episode is rendered (set when it opens)

    def append(self, ids: list[int], generated: bool, logprobs: list[float] | None = None) -> None:
        """Add `ids` to the record: generated ones (loss mask 1) with their `logprobs`, others with 0."""
        self.tokens += ids
        self.loss_mask += [1 if generated else 0] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)

    def end(self, reason: str, reward: object, components: object) -> None:
        """End the episode as `reason` with the environment's reward and components.

        A reward or component that is not a finite real number (NaN, +inf, -inf, a string ...)
        ends it as `env_error` instead, with reward 0.0 and no components.
        """
        if reason == "env_error":
            self.env_error = self.env_error or "the environment ended the episode as env_error"
            self.finish_reason, self.reward, self.components = reason, 0.0, {}
            return
        try:
            checked_reward, checked_components = _checked_reward(self, reward, components)
        except EnvFault as fault:
            self.env_error = str(fault)
            self.finish_reason, self.reward, self.components = "env_error", 0.0, {}
            return
        self.finish_reason, self.reward, self.components = reason, checked_reward, checked_components

    def fail(self, message: str) -> None:
        """End the episode as env_error with `message`."""
        self.env_error = message
        self.end("env_error", 0.0, {})

    def text(self, value: object, what: str) -> str:
        """Environment text as valid Unicode (a repair is noted); raises EnvFault if it is not a str."""
        if not isinstance(value, str):
            raise EnvFault(f"{what} must be a str, got {type(value).__name__}")
        text, invalid = repair_unicode(value)
        if invalid:
            self.repairs.append(
                f"{what} was not valid Unicode: {invalid} surrogate code point(s) repaired (lone ones replaced "
                "with U+FFFD)"
            )
        return text

    @property
    def policy_turns(self) -> int:
        """Number of policy (assistant) turns so far."""
        return sum(1 for t in self.turns if t.role == "assistant")


def _number(value: object, what: str) -> float:
    """`value` as a float; raises EnvFault unless it is a finite real number."""
    if value is None or isinstance(value, (str, bytes)):
        raise EnvFault(f"environment returned a {what} that is not a number: {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except OverflowError:  # e.g. the int 10**400: beyond every float, as good as inf
        raise EnvFault(f"environment returned a non-finite {what}: {value!r:.80} is beyond the float range") from None
    except Exception:  # TypeError, ValueError, or whatever a __float__ of the environment's raises
        raise EnvFault(f"environment returned a {what} that is not a number: {value!r}") from None
    if not math.isfinite(number):
        raise EnvFault(f"environment returned a non-finite {what}: {number}")
    return number


def truth_value(value: object, what: str) -> bool:
    """`bool(value)`; raises EnvFault when the environment's value has no truth value (e.g. a numpy array)."""
    try:
        return bool(value)
    except Exception as exc:
        raise EnvFault(
            f"environment returned a {what} that is not a truth value: {type(exc).__name__}: {exc}"
        ) from None


def _checked_reward(live: LiveEpisode, reward: object, components: object) -> tuple[float, dict[str, float]]:
    """The reward and components as finite floats; raises EnvFault naming every bad value."""
    if not isinstance(components, Mapping):
        raise EnvFault(
            f"environment returned reward_components of type {type(components).__name__}, not a mapping of str to float"
        )
    values = [
        ("reward", None, reward),
        *((f"reward component {key!r}", key, value) for key, value in components.items()),
    ]
    faults: list[str] = []
    checked_reward, checked = 0.0, {}
    for what, key, value in values:
        try:
            number = _number(value, what)
        except EnvFault as fault:
            faults.append(str(fault))
            continue
        if key is None:
            checked_reward = number
        else:
            checked[live.text(key if isinstance(key, str) else str(key), "reward component name")] = number
    if faults:
        raise EnvFault("; ".join(faults))
    return checked_reward, checked


class NoSession(EnvSession):
    """Placeholder for an episode whose environment could not be started."""

    def step(self, action_text: str) -> StepResult:
        raise RuntimeError("episode has no environment session")

    def finish(self) -> tuple[float, dict[str, float]]:
        return 0.0, {}


def identifier(live: LiveEpisode, value: object, what: str) -> str:
    """An environment-given name or id as valid text (str() of a non-str), a repair noted."""
    return live.text(value if isinstance(value, str) else str(value), what)
