"""Environments with injected faults, loaded by class path from test configs."""

from __future__ import annotations

from dataclasses import replace

from rl_core.environments import load_environment
from rl_core.environments.base import Environment, EnvSession, StepResult, Task


class _BrokenSession(EnvSession):
    def step(self, action_text: str) -> StepResult:
        raise ConnectionError("tool backend unreachable")

    def finish(self) -> tuple[float, dict[str, float]]:
        raise ConnectionError("tool backend unreachable")


class _WrappedDomain(Environment):
    """A built-in SOP domain with its prompt and tasks unchanged; subclasses change what `start` returns."""

    def __init__(self, domain: str):
        self.inner = load_environment(domain)
        self.name = self.inner.name

    def system_prompt(self) -> str:
        return self.inner.system_prompt()

    def tasks(self, split: str) -> list[Task]:
        return self.inner.tasks(split)


class FailingDomain(_WrappedDomain):
    """A built-in SOP domain whose every `fail_every`-th episode fails permanently."""

    def __init__(self, domain: str = "refunds", fail_every: int = 20):
        super().__init__(domain)
        self.fail_every = fail_every
        self.started = 0

    def start(self, task: Task) -> EnvSession:
        self.started += 1
        return _BrokenSession() if self.started % self.fail_every == 0 else self.inner.start(task)


class _ZeroRewardSession(EnvSession):
    """Plays the inner session, but every final reward is 0 (the reward signal has collapsed)."""

    def __init__(self, inner: EnvSession):
        self.inner = inner

    def step(self, action_text: str) -> StepResult:
        result = self.inner.step(action_text)
        if result.done:
            result.reward, result.reward_components = 0.0, {}
        return result

    def finish(self) -> tuple[float, dict[str, float]]:
        return 0.0, {}


class CollapsingDomain(_WrappedDomain):
    """A built-in SOP domain whose training episodes score 0 after the first `healthy_episodes`
    (held-out episodes are scored as usual): a reward collapse on cue."""

    def __init__(self, domain: str = "refunds", healthy_episodes: int = 24):
        super().__init__(domain)
        self.healthy_episodes = healthy_episodes
        self.trained = 0

    def start(self, task: Task) -> EnvSession:
        session = self.inner.start(task)
        if task.split != "train":
            return session
        self.trained += 1
        return session if self.trained <= self.healthy_episodes else _ZeroRewardSession(session)


class _NonFiniteSession(EnvSession):
    """Plays the inner session, but its final reward (or one reward component) is `value`."""

    def __init__(self, inner: EnvSession, value: float, component: str | None):
        self.inner, self.value, self.component = inner, value, component

    def _spoil(self, reward: float, components: dict[str, float]) -> tuple[float, dict[str, float]]:
        if self.component is None:
            return self.value, components
        return reward, {**components, self.component: self.value}

    def step(self, action_text: str) -> StepResult:
        result = self.inner.step(action_text)
        if result.done:
            result.reward, result.reward_components = self._spoil(result.reward, dict(result.reward_components))
        return result

    def finish(self) -> tuple[float, dict[str, float]]:
        return self._spoil(*self.inner.finish())


class NonFiniteRewardDomain(_WrappedDomain):
    """A built-in SOP domain whose every `every`-th episode ends with a non-finite reward:
    `value` ("nan", "inf" or "-inf") as the reward, or as reward component `component` when given."""

    def __init__(self, domain: str = "refunds", every: int = 4, value: str = "nan", component: str | None = None):
        super().__init__(domain)
        self.every, self.value, self.component = every, float(value), component
        self.started = 0

    def start(self, task: Task) -> EnvSession:
        self.started += 1
        session = self.inner.start(task)
        return _NonFiniteSession(session, self.value, self.component) if self.started % self.every == 0 else session


class _HalfEmojiSession(EnvSession):
    """Plays the inner session, but every observation ends with half an emoji (a lone surrogate)."""

    def __init__(self, inner: EnvSession):
        self.inner = inner

    def step(self, action_text: str) -> StepResult:
        result = self.inner.step(action_text)
        if result.observation is not None:
            result.observation += " \ud83d"  # what json.loads('"\\ud83d"') gives: not valid Unicode
        return result

    def finish(self) -> tuple[float, dict[str, float]]:
        return self.inner.finish()


class HalfEmojiDomain(_WrappedDomain):
    """A built-in SOP domain whose tool answers end with a lone UTF-16 surrogate ("\\ud83d")."""

    def __init__(self, domain: str = "refunds"):
        super().__init__(domain)

    def start(self, task: Task) -> EnvSession:
        return _HalfEmojiSession(self.inner.start(task))


class SurrogateIdDomain(_WrappedDomain):
    """A built-in SOP domain whose task ids end with a lone UTF-16 surrogate ("\\ud83d"): the rows
    store them repaired (U+FFFD), so re-scoring must find the task by its stored id."""

    def __init__(self, domain: str = "refunds"):
        super().__init__(domain)

    def tasks(self, split: str) -> list[Task]:
        return [replace(task, task_id=task.task_id + "\ud83d") for task in self.inner.tasks(split)]

    def start(self, task: Task) -> EnvSession:
        return self.inner.start(task)
