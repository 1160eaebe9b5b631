"""Environments with injected faults, loaded by class path from test configs."""

from __future__ import annotations

from rl_core.environments import load_environment
from rl_core.environments.base import EnvSession, Environment, StepResult, Task


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
